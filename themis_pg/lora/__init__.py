"""LoRA adapters as table rows: their files, the registry, demo adapters."""
