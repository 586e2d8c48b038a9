"""Per-sample denoising error: the diffusion-ELBO stand-in for a log-likelihood.

Rows come in pair layout `[w_1..w_B, l_1..l_B]` (or winners alone, one row per pair). Both images of a pair get
the same noise and the same timestep, so their errors differ only through the images and the model.

Units. An epsilon model's error is |eps_hat - eps|^2. A v-prediction model is trained on |v_hat - v|^2, and at the
same x_t the noise it implies, eps_hat = sqrt(abar_t) v_hat + sqrt(1 - abar_t) x_t, is off by
eps_hat - eps = sqrt(abar_t) (v_hat - v): its velocity error is its epsilon error divided by abar_t. On SD2.1's
schedule 1 / abar_t averages 21.3 over t (3.6 at t = 500, 214.6 at t = 999), so a beta tuned on epsilon models is
~21x stronger on raw velocity errors. `epsilon_units` gives the factor that converts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from ..models.conditioning import Conditioning


@dataclass
class NoisedRows:
    noisy: torch.Tensor      # x_t
    timesteps: torch.Tensor  # t per row
    target: torch.Tensor     # what the UNet should predict at x_t


def prediction_target(scheduler: DDPMScheduler, latents, noise, timesteps) -> torch.Tensor:
    """eps for epsilon models, the velocity sqrt(abar)*eps - sqrt(1-abar)*x0 for v-prediction (SD2.x 768)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (expected epsilon or v_prediction)")


def noise_rows(scheduler: DDPMScheduler, latents: torch.Tensor, rows_per_pair: int,
               generator: torch.Generator) -> NoisedRows:
    """Forward-noise the rows, sharing noise and timestep between the rows of one pair."""
    pairs = latents.shape[0] // rows_per_pair
    noise = torch.randn((pairs, *latents.shape[1:]), generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), generator=generator,
                              device=latents.device)
    noise, timesteps = noise.repeat(rows_per_pair, 1, 1, 1), timesteps.repeat(rows_per_pair)
    return NoisedRows(scheduler.add_noise(latents, noise, timesteps), timesteps,
                      prediction_target(scheduler, latents, noise, timesteps))


def denoising_errors(unet, rows: NoisedRows, cond: Conditioning) -> torch.Tensor:
    """Squared error of the UNet's prediction, averaged over C, H, W in fp32: one number per row."""
    pred = unet(rows.noisy, rows.timesteps, **cond.unet_kwargs()).sample
    return (pred.float() - rows.target.float()).pow(2).mean(dim=(1, 2, 3))


def abar_at(scheduler, levels: torch.Tensor, below_zero: float) -> torch.Tensor:
    """abar of each row's noise level in fp32, shaped (rows, 1, 1, 1); a level below 0 gets `below_zero` (1 for the
    clean latent, or a DDIM scheduler's final level)."""
    alphas = scheduler.alphas_cumprod.to(levels.device, torch.float32)
    return torch.where(levels >= 0, alphas[levels.clamp(min=0)], below_zero).view(-1, 1, 1, 1)


def epsilon_units(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per row, the factor that turns an error against the model's own target into the error of the noise it
    implies (fp32): 1 for epsilon models, abar_t for v-prediction (see the module docstring)."""
    if scheduler.config.prediction_type != "v_prediction":
        return torch.ones(timesteps.shape, device=timesteps.device)
    return scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE latents (sampled from the posterior, as in the published trainers) times the scaling factor.

    Always in the VAE's own dtype, never under an enclosing autocast: a VAE kept in fp32 (SDXL's, whose config says
    force_upcast) would otherwise run its convolutions in fp16 and return NaN latents."""
    with torch.autocast(vae.device.type, enabled=False):
        posterior = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * vae.config.scaling_factor
