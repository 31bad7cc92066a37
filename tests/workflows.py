"""API-format workflows the tests submit (the simulator runs them as ComfyUI would)."""

from __future__ import annotations

import itertools
from typing import Any

_colors = itertools.count(1000)


def quick(color: int | None = None, prefix: str = "cyl/ok") -> dict[str, Any]:
    """EmptyImage -> ImageInvert -> SaveImage; a new colour each call defeats the cache."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64,
                                                      "batch_size": 1,
                                                      "color": next(_colors) if color is None
                                                      else color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": prefix}},
    }


def txt2img(steps: int = 4, seed: int | None = None,
            ckpt: str = "v1-5-pruned-emaonly.safetensors") -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk",
                                                         "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512,
                                                           "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": next(_colors) if seed is None else seed, "steps": steps, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                    "filename_prefix": "cyl/txt2img"}},
    }


def below_min() -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64,
                                                      "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": "cyl/bad"}},
    }


def fails_at_runtime() -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64,
                                                      "batch_size": 1,
                                                      "color": next(_colors)}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": "../escape"}},
    }


def websocket_images(batch: int = 3) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32,
                                                      "batch_size": batch,
                                                      "color": next(_colors)}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


UI_EXPORT = {
    "id": "c3542981-0401-4733-b660-c90a3b5736e6", "revision": 0, "last_node_id": 2,
    "last_link_id": 1,
    "nodes": [{"id": 1, "type": "EmptyImage", "widgets_values": [64, 64, 1, 0]},
              {"id": 2, "type": "SaveImage", "widgets_values": ["x"]}],
    "links": [[1, 1, 0, 2, 0, "IMAGE"]], "version": 0.4,
}


def img2img(image: str, prefix: str = "cyl/img2img") -> dict[str, Any]:
    """LoadImage -> ImageInvert -> SaveImage: `image` names the input file."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": prefix}},
    }



def two_saves(steps: int = 8, seed: int | None = None) -> dict[str, Any]:
    """Saves twice: two images of an EmptyImage at once (node 11), then a sampler's
    result at the end (node 9)."""
    workflow = txt2img(steps=steps, seed=seed)
    workflow["10"] = {"class_type": "EmptyImage", "inputs": {
        "width": 64, "height": 64, "batch_size": 2, "color": next(_colors)}}
    workflow["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0],
                                                            "filename_prefix": "cyl/early"}}
    return workflow
