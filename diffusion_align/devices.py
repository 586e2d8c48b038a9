"""Where models run when the user does not say, and the dtype each `train.mixed_precision` computes in."""

from __future__ import annotations

from datetime import timedelta

import torch

# train.mixed_precision -> the dtype autocast computes in and the frozen models are held in
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reward_dtype(cfg) -> torch.dtype:
    """The dtype an online run's scorers (online.reward, online.track) score in: fp32, or with
    online.reward_dtype=frozen train.mixed_precision's, the frozen models' (`cfg`: a Config)."""
    return torch.float32 if cfg.online.reward_dtype == "fp32" else MIXED_PRECISION_DTYPES[cfg.train.mixed_precision]


def default_device(device=None) -> torch.device:
    """`device` as asked, else CUDA when there is a GPU, else the CPU."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def process_state(timeout_minutes: float | None = None):
    """accelerate's view of this process (its rank among a run's processes). On a machine without a GPU it must be
    made with cpu=True, or accelerate reads each of torchrun's CPU processes as a separate single-process run; made
    here first, the Accelerator of a training run finds it so. `timeout_minutes`: how long the process group, made
    by the first call under a distributed launch, lets a collective wait (`train.process_timeout`; torch's default
    when None)."""
    from accelerate import PartialState
    timeout = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
    return PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()), **timeout)
