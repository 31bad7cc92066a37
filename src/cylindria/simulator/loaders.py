"""Loader nodes for input files (images, masks, videos, audio), and their companion nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .nodes import InputFile, NodeContext, NodeResult, NodeSpec, SimImage, SimLatent

MASK_CHANNELS = ("alpha", "red", "green", "blue")
# LoadImage's mask when the image has no alpha channel: 64x64 zeros, as in ComfyUI.
EMPTY_MASK_SIZE = 64


@dataclass(frozen=True, slots=True)
class SimMask:
    """A batch of uniform masks, `value` 0..255 standing for 0.0..1.0."""

    width: int
    height: int
    batch: int
    value: int
    sources: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return (f"tensor([{self.batch}, {self.height}, {self.width}] "
                f"filled with {self.value / 255:.4f})")


@dataclass(frozen=True, slots=True)
class SimVideo:
    """A video file: the simulator takes it for one frame of the image its file stands for."""

    frame: SimImage
    fps: float = 24.0

    def __repr__(self) -> str:
        return "<comfy_api.latest._input_impl.video_types.VideoFromFile object>"


@dataclass(frozen=True, slots=True)
class SimAudio:
    sample_rate: int = 44100
    sources: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return (f"{{'waveform': tensor([1, 2, {self.sample_rate}]), "
                f"'sample_rate': {self.sample_rate}}}")


async def _load_image(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    source = await ctx.read_input(inp["image"])
    sources = frozenset({source.sha256})
    r, g, b, a = source.rgba
    image = SimImage(source.width, source.height, 1, (r, g, b), sources)
    if source.has_alpha:
        # ComfyUI's mask is the inverted alpha: transparent means "to paint".
        mask = SimMask(source.width, source.height, 1, 255 - a, sources)
    else:
        mask = SimMask(EMPTY_MASK_SIZE, EMPTY_MASK_SIZE, 1, 0, sources)
    return NodeResult((image, mask))


async def _load_image_mask(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    source = await ctx.read_input(inp["image"])
    r, g, b, a = source.rgba
    # The image is taken as RGBA, so every channel exists (alpha 255 when it had none).
    value = {"alpha": 255 - a, "red": r, "green": g, "blue": b}[inp["channel"]]
    return NodeResult((SimMask(source.width, source.height, 1, value,
                               frozenset({source.sha256})),))


async def _mask_to_image(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    mask: SimMask = inp["mask"]
    level = mask.value
    return NodeResult((SimImage(mask.width, mask.height, mask.batch, (level, level, level),
                                mask.sources),))


async def _vae_encode_for_inpaint(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    pixels, mask = inp["pixels"], inp["mask"]
    # The masked part is repainted: the mask's strength shades what the sampler starts from.
    rgb = tuple(c * (255 - mask.value) // 255 for c in pixels.rgb)
    return NodeResult((SimLatent(pixels.width, pixels.height, pixels.batch, rgb,
                                 pixels.sources | mask.sources),))


async def _load_video(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    source = await ctx.read_input(inp["file"])
    r, g, b, _ = source.rgba
    frame = SimImage(source.width, source.height, 1, (r, g, b), frozenset({source.sha256}))
    return NodeResult((SimVideo(frame),))


async def _get_video_components(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    video: SimVideo = inp["video"]
    return NodeResult((video.frame, SimAudio(sources=video.frame.sources), video.fps))


async def _load_audio(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    source = await ctx.read_input(inp["audio"])
    return NodeResult((SimAudio(sources=frozenset({source.sha256})),))


def loader_specs() -> dict[str, NodeSpec]:
    """The input loaders and their companions, keyed by class_type. Their file options
    are filled in per /object_info request from the input folder."""
    specs = [
        NodeSpec(
            "LoadImage", "Load Image", "image", "nodes", _load_image,
            required={"image": [[], {"image_upload": True}]},
            outputs=("IMAGE", "MASK"), cost=0.05,
            input_file=InputFile("image", "image", ("image",))),
        NodeSpec(
            "LoadImageMask", "Load Image (as Mask)", "mask", "nodes", _load_image_mask,
            required={"image": [[], {"image_upload": True}],
                      "channel": [list(MASK_CHANNELS), {}]},
            outputs=("MASK",), cost=0.05,
            input_file=InputFile("image", "image", None)),
        NodeSpec(
            "MaskToImage", "Convert Mask to Image", "mask", "comfy_extras.nodes_mask",
            _mask_to_image, required={"mask": ["MASK", {}]}, outputs=("IMAGE",), cost=0.02),
        NodeSpec(
            "VAEEncodeForInpaint", "VAE Encode (for Inpainting)", "latent/inpaint", "nodes",
            _vae_encode_for_inpaint,
            required={"pixels": ["IMAGE", {}], "vae": ["VAE", {}], "mask": ["MASK", {}],
                      "grow_mask_by": ["INT", {"default": 6, "min": 0, "max": 64,
                                               "step": 1}]},
            outputs=("LATENT",), cost=1.0),
        NodeSpec(
            "LoadVideo", "Load Video", "image/video", "comfy_extras.nodes_video", _load_video,
            required={"file": [[], {"video_upload": True}]}, outputs=("VIDEO",), cost=0.05,
            input_file=InputFile("file", "video", ("video",), by_mtime=True)),
        NodeSpec(
            "GetVideoComponents", "Get Video Components", "image/video",
            "comfy_extras.nodes_video", _get_video_components,
            required={"video": ["VIDEO", {}]}, outputs=("IMAGE", "AUDIO", "FLOAT"),
            output_names=("images", "audio", "fps"), cost=0.1),
        NodeSpec(
            "LoadAudio", "Load Audio", "audio", "comfy_extras.nodes_audio", _load_audio,
            required={"audio": [[], {"audio_upload": True}]}, outputs=("AUDIO",), cost=0.05,
            input_file=InputFile("audio", "audio", ("audio", "video"))),
    ]
    return {spec.name: spec for spec in specs}
