"""Cylindria: one job API in front of the ComfyUI instances of a multi-GPU host."""

__version__ = "0.1.0"
