"""Sampling with log-probabilities, for online methods (Pref-GRPO, GRPO): one DDIM step as a Gaussian policy.

DDIM with eta > 0 draws x_prev ~ N(mu, sigma^2 I) (Song et al., 2020, eq. 12 and 16):

    sigma = eta * sqrt((1 - abar_p) / (1 - abar_t)) * sqrt(1 - abar_t / abar_p)
    mu    = sqrt(abar_p) * x0_hat + sqrt(1 - abar_p - sigma^2) * eps_hat

with x0_hat and eps_hat from the model output (epsilon or v-prediction, classifier-free guidance already applied)
and abar_p the level of the previous timestep (t - T / steps; the scheduler's final level below 0). The step's
log-probability is the Gaussian log-density of x_prev, constants included, averaged over the latent elements.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler


def _abar(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """abar per row (fp32, broadcastable over C, H, W); a level below 0 is the scheduler's final one."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=timesteps.device)
    return torch.where(timesteps >= 0, alphas[timesteps.clamp(min=0)], final).view(-1, 1, 1, 1)


def ddim_step_with_logprob(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                           eta: float = 1.0, prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One DDIM step from `sample` at `timestep` (an int, or one per row): (prev_sample, log_prob per row).

    `prev_sample` given: its log-probability under this step (re-scoring a stored trajectory); otherwise it is
    drawn with `generator`. The step math runs in fp32; prev_sample comes back in `sample`'s dtype. With eta = 0
    the step is deterministic, equal to `DDIMScheduler.step`, and has no density: log_prob is None.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before stepping")
    if scheduler.config.thresholding:
        raise ValueError("ddim_step_with_logprob does not implement dynamic thresholding; use a scheduler "
                         "config with thresholding=False (as Stable Diffusion's)")
    x_t, out = sample.float(), model_output.float()
    t = torch.as_tensor(timestep, device=sample.device).long().expand(sample.shape[0])
    a_t = _abar(scheduler, t)
    a_p = _abar(scheduler, t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0, eps = (x_t - (1 - a_t) ** 0.5 * out) / a_t ** 0.5, out
    elif kind == "v_prediction":
        x0, eps = a_t ** 0.5 * x_t - (1 - a_t) ** 0.5 * out, a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x_t
    else:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported (expected epsilon or v_prediction)")
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5  # written as DDIMScheduler.step writes it
    mu = a_p ** 0.5 * x0 + (1 - a_p - sigma ** 2) ** 0.5 * eps
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device) if eta > 0 else 0.0
        prev = mu + sigma * noise
    else:
        prev = prev_sample.float()
    if eta == 0:
        return prev.to(sample.dtype), None
    log_prob = -((prev - mu) ** 2) / (2 * sigma ** 2) - sigma.log() - 0.5 * math.log(2 * math.pi)
    return prev.to(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
