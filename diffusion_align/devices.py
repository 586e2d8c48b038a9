"""Where models run when the user does not say."""

from __future__ import annotations

import torch


def default_device(device=None) -> torch.device:
    """`device` as asked, else CUDA when there is a GPU, else the CPU."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
