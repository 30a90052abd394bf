"""NoLA label-free adaptation of CLIP, in plain PyTorch (no Dagster imports anywhere here)."""

__version__ = "0.1.0"
