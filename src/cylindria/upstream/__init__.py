"""Everything that talks out: the ComfyUI client, GPUs, listeners, webhooks."""
