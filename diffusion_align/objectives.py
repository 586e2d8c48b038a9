"""Preference objectives: pure functions of per-sample denoising errors.

Inputs are the per-sample errors from `likelihood.denoising_errors` (mean over C, H, W, fp32), one value per pair
for the winner (`_w`) and the loser (`_l`), from the policy (`model_`) and the frozen reference (`ref_`).
A lower error means a higher ELBO, so `-(err - ref_err)` is the implicit log-likelihood ratio of a sample.
Every function returns `(loss, metrics)`; metrics are detached 0-dim tensors, ready to average across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float = 5000.0) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO (Wallace et al., 2023), in the authors' convention.

        inside = -(beta / 2) * ((m_w - r_w) - (m_l - r_l))
        loss   = mean over pairs of -logsigmoid(inside)

    beta = 5000 here is the same objective as `-logsigmoid(2500 * ((r_w - r_l) - (m_w - m_l)))` in the diffusers
    port. At initialisation (policy == reference) inside = 0 and the loss is log 2 = 0.6931.
    Metrics: implicit_acc (fraction of pairs with inside > 0, ties count 0.5), reward_margin (mean inside: the
    implicit reward of the winner minus the loser), and the mean errors of policy and reference.
    """
    inside = -0.5 * beta * ((model_err_w - ref_err_w) - (model_err_l - ref_err_l))
    loss = -F.logsigmoid(inside).mean()  # per pair, then the mean: logsigmoid of a batch mean is a known bug
    return loss, {**_preference_metrics(inside), **_error_metrics(model_err_w, model_err_l, ref_err_w, ref_err_l)}


def sft_loss(model_err_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning baseline: the plain diffusion loss on the preferred images, mean(m_w)."""
    loss = model_err_w.mean()
    return loss, _error_metrics(model_err_w)


def _preference_metrics(inside: torch.Tensor) -> dict:
    inside = inside.detach()
    acc = (inside > 0).float() + 0.5 * (inside == 0).float()
    return {"implicit_acc": acc.mean(), "reward_margin": inside.mean()}


def _error_metrics(model_err_w, model_err_l=None, ref_err_w=None, ref_err_l=None) -> dict:
    named = {"model_err_w": model_err_w, "model_err_l": model_err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l}
    return {name: err.detach().mean() for name, err in named.items() if err is not None}
