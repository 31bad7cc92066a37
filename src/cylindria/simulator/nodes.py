"""The node classes of the ComfyUI simulator: their /object_info entries and what they do."""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .png import png_bytes

if TYPE_CHECKING:
    from .inputs import Source

MAX_RESOLUTION = 16384
PREVIEW_METHODS = frozenset({"auto", "latent2rgb", "taesd"})

SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
SCHEDULERS = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
)
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
BLEND_MODES = ("normal", "multiply", "screen", "overlay", "soft_light", "difference")


# --- values flowing between nodes -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SimImage:
    """A batch of solid-colour images: all a simulated node ever needs to know."""

    width: int
    height: int
    batch: int
    rgb: tuple[int, int, int]
    # SHA-256 of the input files the images were made from (SaveImage records them).
    sources: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        r, g, b = (round(c / 255, 4) for c in self.rgb)
        return (f"tensor([{self.batch}, {self.height}, {self.width}, 3] "
                f"filled with [{r:.4f}, {g:.4f}, {b:.4f}])")


@dataclass(frozen=True, slots=True)
class SimLatent:
    width: int
    height: int
    batch: int
    rgb: tuple[int, int, int] = (0, 0, 0)
    sources: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"{{'samples': tensor([{self.batch}, 4, {self.height // 8}, {self.width // 8}])}}"


@dataclass(frozen=True, slots=True)
class SimModelPart:
    kind: str
    checkpoint: str

    def __repr__(self) -> str:
        return f"<comfy.{self.kind} {self.checkpoint}>"


@dataclass(frozen=True, slots=True)
class SimConditioning:
    text: str
    checkpoint: str

    def __repr__(self) -> str:
        return f"[[tensor([1, 77, 768]), {{'pooled_output': {self.text!r}}}]]"


# --- the catalogue ----------------------------------------------------------------------

class NodeContext(Protocol):
    """What a running node may ask of the simulator."""

    prompt: dict[str, Any]
    extra_data: dict[str, Any]

    async def work(self, cost: float) -> None:
        """Spend `cost` progress steps' worth of simulated time."""

    async def tick(self, value: int, total: int, preview: bytes | None = None) -> None:
        """Report progress (and optionally a PNG preview); interrupts surface here."""

    async def load(self, kind: str, name: str) -> None:
        """Bring the model file `name` from the folder `kind` into VRAM, spending the
        load time unless it is there already."""

    async def save(self, images: SimImage, prefix: str, kind: str) -> list[dict[str, str]]:
        """Write the batch into the output ("output") or temp ("temp") directory."""

    async def read_input(self, name: str) -> Source:
        """Read the file a loader names (relative to the input folder), off the event loop."""


@dataclass(slots=True)
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


Runner = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]


@dataclass(frozen=True, slots=True)
class InputFile:
    """An input naming a file of the input folder. The node's own validation (ComfyUI's
    VALIDATE_INPUTS) checks that the file exists, in place of the option list."""

    input: str
    # The word of the error: "Invalid <kind> file: <name>".
    kind: str
    # Content types /object_info offers as options (None: every file).
    listed: tuple[str, ...] | None
    # Whether the cache tells versions apart by modification time (LoadVideo) rather
    # than by content.
    by_mtime: bool = False


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    display_name: str
    category: str
    python_module: str
    run: Runner
    required: dict[str, list[Any]] = field(default_factory=dict)
    optional: dict[str, list[Any]] = field(default_factory=dict)
    hidden: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    output_node: bool = False
    description: str = ""
    # Multiple of SimSettings.step_seconds spent before the node returns.
    cost: float = 0.0
    # ComfyUI nodes whose IS_CHANGED returns the time are never served from cache.
    always_run: bool = False
    input_file: InputFile | None = None

    def input_spec(self, name: str) -> tuple[list[Any] | None, str | None]:
        if name in self.required:
            return self.required[name], "required"
        if name in self.optional:
            return self.optional[name], "optional"
        return None, None

    def object_info(self, files: list[str] | None = None) -> dict[str, Any]:
        """The /object_info entry; `files` are the options of the input naming a file."""
        required = self.required
        if self.input_file is not None and files is not None:
            name = self.input_file.input
            required = {**required, name: [files, *required[name][1:]]}
        inputs: dict[str, Any] = {"required": required}
        order: dict[str, list[str]] = {"required": list(self.required)}
        if self.optional:
            inputs["optional"] = self.optional
            order["optional"] = list(self.optional)
        if self.hidden:
            inputs["hidden"] = self.hidden
            order["hidden"] = list(self.hidden)
        return {
            "input": inputs,
            "input_order": order,
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.output_names or self.outputs),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }


def _int(default: int, lo: int, hi: int, step: int = 1, **extra: Any) -> list[Any]:
    return ["INT", {"default": default, "min": lo, "max": hi, "step": step, **extra}]


def _rgb(color: int) -> tuple[int, int, int]:
    return ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)


def _digest_rgb(*parts: Any) -> tuple[int, int, int]:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return (digest[0], digest[1], digest[2])


async def _empty_image(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    return NodeResult((SimImage(inp["width"], inp["height"], inp["batch_size"],
                                _rgb(inp["color"])),))


async def _image_invert(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    image: SimImage = inp["image"]
    r, g, b = image.rgb
    return NodeResult((SimImage(image.width, image.height, image.batch,
                                (255 - r, 255 - g, 255 - b), image.sources),))


async def _image_scale(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    image: SimImage = inp["image"]
    width, height = inp["width"], inp["height"]
    if width == 0 and height == 0:
        width, height = image.width, image.height
    elif width == 0:
        width = max(1, round(image.width * height / image.height))
    elif height == 0:
        height = max(1, round(image.height * width / image.width))
    # lanczos goes through PIL image by image in ComfyUI: by far the slowest method.
    await ctx.work(image.batch * (0.25 if inp["upscale_method"] == "lanczos" else 0.02))
    return NodeResult((SimImage(width, height, image.batch, image.rgb, image.sources),))


def _blend(mode: str, a: float, b: float) -> float:
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return 2 * a * b if a <= 0.5 else 1 - 2 * (1 - a) * (1 - b)
    if mode == "soft_light":
        if b <= 0.5:
            return a - (1 - 2 * b) * a * (1 - a)
        g = ((16 * a - 12) * a + 4) * a if a <= 0.25 else a ** 0.5
        return a + (2 * b - 1) * (g - a)
    if mode == "difference":
        return a - b
    return b


async def _image_blend(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    first: SimImage = inp["image1"]
    second: SimImage = inp["image2"]
    factor: float = inp["blend_factor"]
    # image2 is resized to image1's size, so the result has image1's shape.
    rgb = tuple(
        round(255 * min(1.0, max(0.0, a * (1 - factor)
                                 + _blend(inp["blend_mode"], a, b) * factor)))
        for a, b in ((x / 255, y / 255) for x, y in zip(first.rgb, second.rgb, strict=True)))
    return NodeResult((SimImage(first.width, first.height, first.batch,
                                (rgb[0], rgb[1], rgb[2]), first.sources | second.sources),))


async def _save_image(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    records = await ctx.save(inp["images"], inp["filename_prefix"], "output")
    return NodeResult((), {"images": records})


async def _preview_image(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    records = await ctx.save(inp["images"], f"ComfyUI_temp_{suffix}", "temp")
    return NodeResult((), {"images": records})


async def _save_image_websocket(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    images: SimImage = inp["images"]
    for index in range(images.batch):
        await ctx.work(1.0)
        # value runs 0..N-1 of N, as the real node reports before each send.
        await ctx.tick(index, images.batch,
                       png_bytes(images.width, images.height, images.rgb))
    return NodeResult(())


async def _checkpoint_loader(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    name = inp["ckpt_name"]
    await ctx.load("checkpoints", name)
    return NodeResult((SimModelPart("ModelPatcher", name), SimModelPart("CLIP", name),
                       SimModelPart("VAE", name)))


async def _clip_text_encode(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    clip: SimModelPart = inp["clip"]
    return NodeResult((SimConditioning(inp["text"], clip.checkpoint),))


async def _empty_latent(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    return NodeResult((SimLatent(inp["width"], inp["height"], inp["batch_size"]),))


async def _ksampler(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    latent: SimLatent = inp["latent_image"]
    steps: int = inp["steps"]
    # An encoded input image (img2img) also shapes the result.
    start = (latent.rgb,) if latent.sources else ()
    rgb = _digest_rgb(inp["model"].checkpoint, inp["seed"], inp["positive"].text,
                      inp["negative"].text, steps, inp["cfg"], inp["sampler_name"],
                      inp["scheduler"], inp["denoise"], *start)
    previews = ctx.extra_data.get("preview_method") in PREVIEW_METHODS
    for step in range(steps):
        await ctx.work(1.0)
        # Latent previews are small; the fraction done tints them towards the result.
        shade = tuple(c * (step + 1) // steps for c in rgb)
        preview = (png_bytes(max(1, latent.width // 8), max(1, latent.height // 8), shade)
                   if previews else None)
        await ctx.tick(step + 1, steps, preview)
    return NodeResult((SimLatent(latent.width, latent.height, latent.batch, rgb,
                                 latent.sources),))


async def _vae_decode(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    latent: SimLatent = inp["samples"]
    return NodeResult((SimImage(latent.width, latent.height, latent.batch, latent.rgb,
                                latent.sources),))


async def _vae_encode(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    pixels: SimImage = inp["pixels"]
    return NodeResult((SimLatent(pixels.width, pixels.height, pixels.batch, pixels.rgb,
                                 pixels.sources),))


async def _preview_any(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    source = inp.get("source")
    text = source if isinstance(source, str) else str(source)
    return NodeResult((), {"text": [text]})


async def _regex_replace(ctx: NodeContext, inp: dict[str, Any]) -> NodeResult:
    flags = 0
    if inp.get("case_insensitive", True):
        flags |= re.IGNORECASE
    if inp.get("multiline", False):
        flags |= re.MULTILINE
    if inp.get("dotall", False):
        flags |= re.DOTALL
    result = re.sub(inp["regex_pattern"], inp["replace"], inp["string"],
                    count=inp.get("count", 0), flags=flags)
    return NodeResult((result,))


def build_catalogue(models: tuple[str, ...]) -> dict[str, NodeSpec]:
    """Every node class the simulator offers, keyed by class_type, in /object_info order."""
    image = ["IMAGE", {}]
    specs = [
        NodeSpec(
            "CheckpointLoaderSimple", "Load Checkpoint", "loaders", "nodes", _checkpoint_loader,
            required={"ckpt_name": [list(models), {
                "tooltip": "The name of the checkpoint (model) to load."}]},
            outputs=("MODEL", "CLIP", "VAE"), output_names=("MODEL", "CLIP", "VAE"),
            description="Loads a diffusion model checkpoint, diffusion models are used to "
                        "denoise latents.", cost=2.0),
        NodeSpec(
            "CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning", "nodes",
            _clip_text_encode,
            required={"text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                      "clip": ["CLIP", {}]},
            outputs=("CONDITIONING",),
            description="Encodes a text prompt using a CLIP model into an embedding that "
                        "can be used to guide the diffusion model.", cost=0.2),
        NodeSpec(
            "EmptyLatentImage", "Empty Latent Image", "latent", "nodes", _empty_latent,
            required={"width": _int(512, 16, MAX_RESOLUTION, 8),
                      "height": _int(512, 16, MAX_RESOLUTION, 8),
                      "batch_size": _int(1, 1, 4096)},
            outputs=("LATENT",),
            description="Create a new batch of empty latent images to be denoised via "
                        "sampling.", cost=0.05),
        NodeSpec(
            "KSampler", "KSampler", "sampling", "nodes", _ksampler,
            required={
                "model": ["MODEL", {}],
                "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                "steps": _int(20, 1, 10000),
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                  "round": 0.01}],
                "sampler_name": [list(SAMPLERS), {}],
                "scheduler": [list(SCHEDULERS), {}],
                "positive": ["CONDITIONING", {}],
                "negative": ["CONDITIONING", {}],
                "latent_image": ["LATENT", {}],
                "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
            },
            outputs=("LATENT",),
            description="Uses the provided model, positive and negative conditioning to "
                        "denoise the latent image."),
        NodeSpec(
            "VAEDecode", "VAE Decode", "latent", "nodes", _vae_decode,
            required={"samples": ["LATENT", {}], "vae": ["VAE", {}]},
            outputs=("IMAGE",),
            description="Decodes latent images back into pixel space images.", cost=2.0),
        NodeSpec(
            "VAEEncode", "VAE Encode", "latent", "nodes", _vae_encode,
            required={"pixels": ["IMAGE", {}], "vae": ["VAE", {}]},
            outputs=("LATENT",), cost=1.0),
        NodeSpec(
            "EmptyImage", "EmptyImage", "image", "nodes", _empty_image,
            required={"width": _int(512, 1, MAX_RESOLUTION),
                      "height": _int(512, 1, MAX_RESOLUTION),
                      "batch_size": _int(1, 1, 4096),
                      "color": _int(0, 0, 0xFFFFFF, display="color")},
            outputs=("IMAGE",), cost=0.05),
        NodeSpec(
            "ImageInvert", "Invert Image", "image", "nodes", _image_invert,
            required={"image": image}, outputs=("IMAGE",), cost=0.05),
        NodeSpec(
            "ImageScale", "Upscale Image", "image/upscaling", "nodes", _image_scale,
            required={"image": image,
                      "upscale_method": [list(UPSCALE_METHODS), {}],
                      "width": _int(512, 0, MAX_RESOLUTION),
                      "height": _int(512, 0, MAX_RESOLUTION),
                      "crop": [["disabled", "center"], {}]},
            outputs=("IMAGE",)),
        NodeSpec(
            "ImageBlend", "Image Blend", "image/postprocessing",
            "comfy_extras.nodes_post_processing", _image_blend,
            required={"image1": image, "image2": image,
                      "blend_factor": ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0,
                                                 "step": 0.01}],
                      "blend_mode": [list(BLEND_MODES), {}]},
            outputs=("IMAGE",), cost=0.05),
        NodeSpec(
            "SaveImage", "Save Image", "image", "nodes", _save_image,
            required={"images": ["IMAGE", {"tooltip": "The images to save."}],
                      "filename_prefix": ["STRING", {
                          "default": "ComfyUI",
                          "tooltip": "The prefix for the file to save. This may include "
                                     "formatting information such as %date:yyyy-MM-dd% or "
                                     "%Empty Latent Image.width% to include values from "
                                     "nodes."}]},
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
            output_node=True, description="Saves the input images to your ComfyUI output "
                                          "directory.", cost=0.1),
        NodeSpec(
            "PreviewImage", "Preview Image", "image", "nodes", _preview_image,
            required={"images": ["IMAGE", {}]},
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
            output_node=True, description="Saves the input images to your ComfyUI output "
                                          "directory.", cost=0.1),
        NodeSpec(
            "SaveImageWebsocket", "SaveImageWebsocket", "api node/image",
            "custom_nodes.websocket_image_save", _save_image_websocket,
            required={"images": ["IMAGE", {}]}, output_node=True, always_run=True),
        NodeSpec(
            "PreviewAny", "Preview Any", "utils", "comfy_extras.nodes_preview_any",
            _preview_any, required={"source": ["*", {}]}, output_node=True),
        NodeSpec(
            "RegexReplace", "Regex Replace", "utils/string", "comfy_extras.nodes_string",
            _regex_replace,
            required={"string": ["STRING", {"multiline": True}],
                      "regex_pattern": ["STRING", {"multiline": True}],
                      "replace": ["STRING", {"multiline": True}]},
            optional={"case_insensitive": ["BOOLEAN", {"default": True}],
                      "multiline": ["BOOLEAN", {"default": False}],
                      "dotall": ["BOOLEAN", {"default": False}],
                      "count": _int(0, 0, 100)},
            outputs=("STRING",),
            description="Find and replace text using regex patterns."),
    ]
    return {spec.name: spec for spec in specs}
