"""Per-sample denoising error: the diffusion-ELBO stand-in for a log-likelihood.

Rows come in pair layout `[w_1..w_B, l_1..l_B]` (or winners alone, one row per pair). Both images of a pair get
the same noise and the same timestep, so their errors differ only through the images and the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from .conditioning import Conditioning


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


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE latents (sampled from the posterior, as in the published trainers) times the scaling factor."""
    posterior = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    return posterior.sample(generator=generator).float() * vae.config.scaling_factor
