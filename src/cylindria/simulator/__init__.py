"""A stand-in for ComfyUI 0.8.0, one aiohttp application per simulated GPU."""

from .server import ComfySimulator, serve
from .settings import COMFYUI_VERSION, DEFAULT_MODELS, SimSettings

__all__ = ["COMFYUI_VERSION", "DEFAULT_MODELS", "ComfySimulator", "SimSettings", "serve"]
