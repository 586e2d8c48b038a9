"""The toy world's oracle as a scorer, `toy-oracle`: the ground truth that `toy-pickscore` stands in for.

Behind the scorer interface, `score`, `compare`, `grid` and `online.track` use it like any reward model; its
prompts must be toy-world prompts (`diffusion_align.toy`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..toy.oracle import RATER_TEMPERATURE, oracle_scores, to_pixels
from .base import Scorer


class _ToTensor:
    """PIL image -> (3, 32, 32) float32 in [0, 1]; picklable, as scorers' preprocess must be."""

    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(to_pixels(image) / 255.0).permute(2, 0, 1).float()


class ToyOracleScorer(Scorer):
    """`oracle_scores` of the images against their prompts (rules: diffusion_align/toy/oracle.py)."""

    preference_scale = 1 / RATER_TEMPERATURE  # the simulated raters' Bradley-Terry probability

    def __init__(self, name: str, path: str | None = None, device=None, dtype=None, batch_size: int = 64,
                 convention: str | None = None):
        if path is not None:
            raise ValueError(f"{name} is a rule, not a model: it takes no weights path (got {path!r})")
        super().__init__(name, path, convention, batch_size, device, dtype)
        self.preprocess = _ToTensor()

    @classmethod
    def models_on_meta(cls, name, path):
        return []  # rules on pixels

    def score_batch(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return oracle_scores(list(pixel_values.cpu()), prompts)
