"""The training methods: each is an objective plus what it needs from the shared loop.

A method says whether the loop runs a reference UNet, whether it needs the loser rows, which dataset columns it
reads (DCPO's per-image captions, SmPO's reward scores) and how it is noised; `trainer.py` is the same loop for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import MethodConfig
from ..objectives import diffusion_dpo_loss, mapo_loss, sft_loss, smpo_loss, smpo_pref_prob


@dataclass
class Errors:
    """What an objective sees: per-row denoising errors in the layout [w_1..w_B, l_1..l_B] (winners only for
    one-row methods), and per pair the soft preference where the method uses one.

    `model` and `reference` are errors against the UNet's own target (the velocity on v-prediction models);
    `preference_units` per row converts them for the preference terms (`likelihood.epsilon_units`, or ones)."""

    model: torch.Tensor
    reference: torch.Tensor | None = None
    pref_prob: torch.Tensor | None = None
    num_train_timesteps: int = 1000
    preference_units: torch.Tensor | None = None

    def for_preference(self, errors: torch.Tensor) -> torch.Tensor:
        return errors if self.preference_units is None else errors * self.preference_units


@dataclass(frozen=True)
class Method:
    name: str
    objective: Callable[[Errors, MethodConfig], tuple[torch.Tensor, dict]]  # cfg.beta already resolved
    default_beta: float | None
    published_betas: tuple[float, float] | None = None  # the lowest and highest beta the method's papers used
    flow_beta: float | None = None  # the published beta on flow-matching transformers' velocity errors (SD3, FLUX)
    needs_reference: bool = True
    rows_per_pair: int = 2  # 2: winner and loser rows; 1: winners only
    per_image_captions: bool = False  # DCPO: each row conditioned on its own image's caption
    soft_labels: bool = False  # SmPO: a reward model's per-pair preference probability
    inversion: bool = False  # SmPO: noise by ReNoise DDIM inversion (method.inversion_steps)

    def extra_columns(self, cfg: MethodConfig) -> tuple[str, ...]:
        """Dataset columns beyond Pick-a-Pic's that this method reads (per image: `_0` / `_1`)."""
        if self.per_image_captions:
            return "caption_0", "caption_1"
        if self.soft_labels:
            return f"{cfg.pref_column}_0", f"{cfg.pref_column}_1"
        return ()

    def row_prompts(self, batch: dict, keep: list[bool]) -> list[str]:
        """The text each UNet row is conditioned on; a pair with keep False gets the empty prompt (dropout)."""
        if self.per_image_captions:  # captions swap with their images, so caption_w describes the winner
            return [c if k else "" for c, k in zip(batch["caption_w"] + batch["caption_l"], keep + keep)]
        return [p if k else "" for p, k in zip(batch["prompts"], keep)] * self.rows_per_pair

    def pref_prob(self, batch: dict, cfg: MethodConfig) -> torch.Tensor | None:
        if not self.soft_labels:
            return None
        return smpo_pref_prob(batch[f"{cfg.pref_column}_w"], batch[f"{cfg.pref_column}_l"], cfg.score_min,
                              cfg.score_max)

    def resolve_beta(self, beta: float | None, flow: bool) -> tuple[float | None, str | None]:
        """(the beta to train with, a warning or None): method.beta, or the method's published default for the
        family's kind (UNet, or flow-matching transformer); a beta far from the published ones, or a flow model
        trained with a beta published for UNets only, is warned about. A beta named for a flow model of a method
        that publishes none for them is taken as it is: the UNet values are no yardstick for velocity errors."""
        on_flow = flow and self.flow_beta is not None  # a beta published for flow models applies
        default = self.flow_beta if on_flow else self.default_beta
        if beta is None:
            if flow and not on_flow and default is not None:
                return default, (f"{self.name} publishes no beta for flow-matching models; training with its UNet "
                                 f"default {default:g}, whose scale may not carry over to velocity errors: tune "
                                 "method.beta")
            return default, None
        if flow and not on_flow:
            return beta, None
        low, high = (self.flow_beta, self.flow_beta) if on_flow else self.published_betas or (None, None)
        if low is None or low / 10 <= beta <= high * 10:
            return beta, None
        published = f"{low:g}" if low == high else f"{low:g} to {high:g}"
        return beta, (f"method.beta={beta:g} is far from {self.name}'s published beta ({published})"
                      f"{' on flow-matching models' if on_flow else ''}; if it was meant for another method, set "
                      f"method.beta=null to use {self.name}'s default ({default:g})")


def _dpo(err: Errors, cfg: MethodConfig):
    model, reference = err.for_preference(err.model), err.for_preference(err.reference)
    return diffusion_dpo_loss(*model.chunk(2), *reference.chunk(2), beta=cfg.beta,
                              label_smoothing=cfg.label_smoothing)


def _smpo(err: Errors, cfg: MethodConfig):
    model, reference = err.for_preference(err.model), err.for_preference(err.reference)
    return smpo_loss(*model.chunk(2), *reference.chunk(2), pref_prob=err.pref_prob.to(model), beta=cfg.beta)


def _mapo(err: Errors, cfg: MethodConfig):
    return mapo_loss(*err.for_preference(err.model).chunk(2), beta=cfg.beta, snr_value=cfg.mapo_snr_value,
                     num_train_timesteps=err.num_train_timesteps, diffusion_err_w=err.model.chunk(2)[0])


def _sft(err: Errors, cfg: MethodConfig):
    return sft_loss(err.model)


# Published betas: Diffusion-DPO 5000 (authors' SD1.5 and SDXL launchers), MaPO 0.1 (paper and code), SmPO 2000
# (SD1.5) and 5000 (SDXL), DCPO 500 (paper); see ../shared/reference/methods.md. On flow-matching transformers:
# Flow-DPO 100 (yifan123/flow_grpo config/dpo.py on SD3.5-M, the same loss on mean velocity errors).
METHODS = {
    "dpo": Method("dpo", _dpo, default_beta=5000.0, published_betas=(5000.0, 5000.0), flow_beta=100.0),
    "mapo": Method("mapo", _mapo, default_beta=0.1, published_betas=(0.1, 0.1), needs_reference=False),
    "smpo": Method("smpo", _smpo, default_beta=5000.0, published_betas=(2000.0, 5000.0), soft_labels=True,
                   inversion=True),
    "dcpo": Method("dcpo", _dpo, default_beta=500.0, published_betas=(500.0, 500.0), per_image_captions=True),
    "sft": Method("sft", _sft, default_beta=None, needs_reference=False, rows_per_pair=1),
}
# Online methods sample their own images instead of reading pairs; their loop is online.py.
ONLINE_METHODS = ("pref_grpo", "grpo")
