"""Where the models run by default: one rule for the tokenizer and the diffusion models."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the vision tower, as BLIP-2 ran it; Stable Diffusion), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32
