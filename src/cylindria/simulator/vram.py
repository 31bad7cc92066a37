"""The model files a simulated GPU holds in VRAM, and what loading them has cost."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

GIB = 1024**3

# What a model file takes in VRAM, by the model folder its loader reads from, when its
# name is not in KNOWN_SIZES. Figures of typical files: an SD 1.5 checkpoint, a
# Flux-sized diffusion model in fp8, T5-XXL in fp8, an SD VAE, an SD 1.5 LoRA, an SD 1.5
# ControlNet, a 4x ESRGAN upscaler.
KIND_SIZES: dict[str, int] = {
    "checkpoints": 4_265_146_304,
    "diffusion_models": 11_901_525_888,
    "text_encoders": 4_893_934_904,
    "vae": 334_641_164,
    "loras": 151_108_832,
    "controlnet": 1_445_157_124,
    "upscale_models": 66_961_958,
}
# The simulator's default checkpoints (settings.DEFAULT_MODELS), as large as the real files.
KNOWN_SIZES: dict[str, int] = {
    "v1-5-pruned-emaonly.safetensors": 4_265_146_304,
    "sd_xl_base_1.0.safetensors": 6_938_078_334,
    "sd_xl_refiner_1.0.safetensors": 6_075_981_930,
}


def model_size(kind: str, name: str) -> int:
    """Bytes the model file `name`, read from the folder `kind`, takes in VRAM."""
    known = KNOWN_SIZES.get(name)
    if known is not None:
        return known
    return KIND_SIZES.get(kind, KIND_SIZES["checkpoints"])


class Vram:
    """Model files in VRAM, least recently used first, within a budget; and the running
    totals of loads, which outlive clear() as the ledger outlives a restart."""

    def __init__(self, budget_gib: float) -> None:
        # 0 (or less) means no budget: nothing is ever evicted.
        self.budget = int(budget_gib * GIB) if budget_gib > 0 else 0
        self._loaded: OrderedDict[str, int] = OrderedDict()
        self.loads = 0
        self.load_seconds = 0.0
        # The file being loaded right now, if any.
        self.loading: str | None = None

    @property
    def loaded(self) -> list[str]:
        """Names of the files in VRAM, least recently used first."""
        return list(self._loaded)

    @property
    def used(self) -> int:
        return sum(self._loaded.values())

    def use(self, name: str) -> bool:
        """Whether `name` is in VRAM; if so it becomes the most recently used."""
        if name not in self._loaded:
            return False
        self._loaded.move_to_end(name)
        return True

    def add(self, name: str, size: int, seconds: float) -> list[str]:
        """Count a load of `name` that took `seconds`, then hold it, evicting the least
        recently used files until it fits; returns the evicted names. A file larger than
        the whole budget is held alone."""
        self.loads += 1
        self.load_seconds += seconds
        self._loaded.pop(name, None)
        evicted: list[str] = []
        if self.budget:
            used = self.used
            while self._loaded and used + size > self.budget:
                old, old_size = self._loaded.popitem(last=False)
                used -= old_size
                evicted.append(old)
        self._loaded[name] = size
        return evicted

    def clear(self) -> None:
        """Unload every file (the totals stay)."""
        self._loaded.clear()

    def snapshot(self) -> dict[str, Any]:
        """The body of GET /_sim/models."""
        return {"loaded": self.loaded, "loads": self.loads,
                "load_seconds": round(self.load_seconds, 6)}
