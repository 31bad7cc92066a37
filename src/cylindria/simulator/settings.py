"""The simulator's settings, and what the imitated ComfyUI release says about itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODELS: tuple[str, ...] = (
    "v1-5-pruned-emaonly.safetensors",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_refiner_1.0.safetensors",
)
COMFYUI_VERSION = "0.8.0"
SERVER_FEATURES: dict[str, Any] = {
    "supports_preview_metadata": True,
    "max_upload_size": 100 * 1024 * 1024,
    "extension": {"manager": {"supports_v4": True}},
}


@dataclass(frozen=True, slots=True)
class SimSettings:
    # Simulated time per progress tick (sampler step, streamed frame); 0 runs flat out.
    step_seconds: float = 0.25
    models: tuple[str, ...] = DEFAULT_MODELS
    # Where SaveImage writes; None means a private directory removed on cleanup.
    output_dir: Path | None = None
    vram_total: int = 24 * 1024**3
    # Simulated seconds a GPU spends loading a model file it does not hold in VRAM.
    model_load_seconds: float = 0.0
    # GiB of VRAM model files may fill before the least recently used are unloaded;
    # 0 is unlimited. Sizes per file are in vram.py.
    vram_budget_gib: float = 0.0
    # Bytes a POST body may hold: ComfyUI's --max-upload-size (100 MB by default).
    max_upload_size: int = 100 * 1024 * 1024


def server_features(settings: SimSettings) -> dict[str, Any]:
    """The feature flags /features and the websocket report, with this server's upload limit."""
    return {**SERVER_FEATURES, "max_upload_size": settings.max_upload_size}
