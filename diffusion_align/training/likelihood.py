"""Per-sample denoising error: the diffusion-ELBO stand-in for a log-likelihood.

Rows come in pair layout `[w_1..w_B, l_1..l_B]` (or winners alone, one row per pair). Both images of a pair get
the same noise and the same timestep, so their errors differ only through the images and the model.

Units. An epsilon model's error is |eps_hat - eps|^2. A v-prediction model is trained on |v_hat - v|^2, and at the
same x_t the noise it implies, eps_hat = sqrt(abar_t) v_hat + sqrt(1 - abar_t) x_t, is off by
eps_hat - eps = sqrt(abar_t) (v_hat - v): its velocity error is its epsilon error divided by abar_t. On SD2.1's
schedule 1 / abar_t averages 21.3 over t (3.6 at t = 500, 214.6 at t = 999), so a beta tuned on epsilon models is
~21x stronger on raw velocity errors. `epsilon_units` gives the factor that converts.

The flow-matching transformers (SD3, FLUX) are trained on rectified flow's velocity (`flow.FlowNoising`); their
errors stay in those units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


@dataclass
class PairDraws:
    """Every random choice a training step makes for its pairs. Each pair's come from its own generator, seeded by
    (seed, epoch, pair index): the same on any device, process count, batch or resume, so a pass made before
    training (precomputed reference errors) sees exactly what the training step will."""

    keep: list[bool]          # False: the pair is conditioned on the empty prompt (prompt dropout)
    timesteps: torch.Tensor   # (pairs,): the training scheduler's (DDPM: long; flow: 1000 s, fp32)
    noise: torch.Tensor       # (pairs, C, H, W): forward noise, shared by the pair's rows
    posterior: torch.Tensor   # (rows, C, H, W): the standard normal draws of each row's VAE posterior sample

    @classmethod
    def draw(cls, seed: int, keys: list[tuple[int, int]], latent_shape: tuple[int, ...], rows_per_pair: int,
             prompt_dropout: float, process) -> PairDraws:
        """`process`: the forward process (`DDPMNoising`, `flow.FlowNoising`), which draws each pair's timestep."""
        keep, timesteps, noise, posterior = [], [], [], []
        for epoch, index in keys:
            state = np.random.SeedSequence([seed, epoch, index, 1]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state))  # [seed, epoch, index] alone seeds augmentation
            keep.append(torch.rand((), generator=generator).item() >= prompt_dropout)
            timesteps.append(process.draw_timestep(generator, latent_shape))
            noise.append(torch.randn(latent_shape, generator=generator))
            posterior.append(torch.randn((2, *latent_shape), generator=generator))  # winner, loser
        rows = torch.stack(posterior).transpose(0, 1).flatten(0, 1)  # [w_1..w_B, l_1..l_B]
        return cls(keep, torch.stack(timesteps), torch.stack(noise), rows[:rows_per_pair * len(keys)])


class DDPMNoising:
    """The UNet families' forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at a timestep drawn
    uniformly from the scheduler's, and the UNet's target (`prediction_target`)."""

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(self.num_train_timesteps, (), generator=generator)

    def noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedRows:
        return NoisedRows(self.scheduler.add_noise(latents, noise, timesteps), timesteps,
                          prediction_target(self.scheduler, latents, noise, timesteps))


def noise_rows(process, latents: torch.Tensor, draws: PairDraws) -> NoisedRows:
    """Forward-noise the rows by `process` (`DDPMNoising`, `flow.FlowNoising`) with the pairs' drawn noise and
    timesteps, shared by the rows of one pair."""
    rows_per_pair = latents.shape[0] // len(draws.keep)
    noise = draws.noise.to(latents.device, latents.dtype).repeat(rows_per_pair, 1, 1, 1)
    return process.noise(latents, noise, draws.timesteps.to(latents.device).repeat(rows_per_pair))


def denoising_errors(denoiser, rows: NoisedRows, cond: Conditioning) -> torch.Tensor:
    """Squared error of the UNet's prediction, averaged over C, H, W in fp32: one number per row."""
    pred = cond.denoise(denoiser, rows.noisy, rows.timesteps)
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


@dataclass
class Posteriors:
    """The VAE's latent distribution of each row (unscaled, in the VAE's dtype), from the VAE or a latent cache, and
    the VAE's normalisation: latents = (z - shift_factor) * scaling_factor (shift 0 for the UNet families' VAEs;
    SD3's and FLUX's have one)."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float = 0.0

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """(mean + std * noise - shift) * scale in fp32: diffusers' `latent_dist.sample()` for that noise,
        normalised as the pipelines' training scripts do."""
        return self._normalised(self.mean + self.std * noise.to(self.mean.device, self.mean.dtype))

    def mode(self) -> torch.Tensor:
        """The mean, normalised, in fp32 (`data.latents=mean`)."""
        return self._normalised(self.mean)

    def _normalised(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return (z - self.shift_factor if self.shift_factor else z) * self.scaling_factor


@torch.no_grad()
def encode_posteriors(vae, pixel_values: torch.Tensor, batch_size: int | None = None) -> Posteriors:
    """The VAE posteriors of the images; training samples them (as the published trainers do) with `PairDraws`.

    `batch_size` images a VAE call (diffusers' --vae_encode_batch_size; None: all in one): a call's activations
    grow with its images, about 0.6 GB an image at 512 px in fp32. Always in the VAE's own dtype, never under an
    enclosing autocast: a VAE kept in fp32 (SDXL's, whose config says force_upcast) would otherwise run its
    convolutions in fp16 and return NaN latents."""
    with torch.autocast(vae.device.type, enabled=False):
        posteriors = [vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
                      for chunk in pixel_values.split(batch_size or len(pixel_values))]
    mean, std = (torch.cat([getattr(p, name) for p in posteriors]) for name in ("mean", "std"))
    return Posteriors(mean, std, vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0)
