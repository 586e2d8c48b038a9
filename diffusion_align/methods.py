"""The training methods: each is an objective plus what it needs from the shared loop.

A method says whether the loop must run a reference UNet and whether it needs the loser rows; the loop itself
(`trainer.py`) is the same for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .objectives import diffusion_dpo_loss, sft_loss


@dataclass(frozen=True)
class Method:
    name: str
    needs_reference: bool
    rows_per_pair: int  # 2: winner and loser rows [w_1..w_B, l_1..l_B]; 1: winners only
    default_beta: float | None
    # (model_err, ref_err or None, beta) -> (loss, metrics); errors are per row in the layout above
    objective: Callable[[torch.Tensor, torch.Tensor | None, float | None], tuple[torch.Tensor, dict]]

    def loss(self, model_err, ref_err, beta):
        return self.objective(model_err, ref_err, self.default_beta if beta is None else beta)


def _dpo(model_err, ref_err, beta):
    return diffusion_dpo_loss(*model_err.chunk(2), *ref_err.chunk(2), beta=beta)


def _sft(model_err, ref_err, beta):
    return sft_loss(model_err)


METHODS = {
    "dpo": Method("dpo", needs_reference=True, rows_per_pair=2, default_beta=5000.0, objective=_dpo),
    "sft": Method("sft", needs_reference=False, rows_per_pair=1, default_beta=None, objective=_sft),
}
