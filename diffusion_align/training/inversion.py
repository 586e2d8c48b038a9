"""SmPO's noising: DDIM inversion of the clean latents by the policy, refined ReNoise-style, in place of forward
noise.

Each row walks its own integer grid of noise levels from the clean latent to its drawn timestep t:

    g_k = -1 + floor((t + 1) * k / steps),   k = 0 .. steps

Level -1 is the clean latent itself (abar = 1); level s >= 0 has abar_s = scheduler.alphas_cumprod[s]. So g_0 is
the clean latent, g_steps = t exactly, and the inverted latent carries the label of the level it reached. For
t + 1 >= steps the levels strictly increase; for t + 1 < steps some repeat and the row takes t + 1 unit steps
(-1, 0, 1, .., t): a DDIM step between equal levels is the identity (exactly at a = 1, up to fp32 rounding
elsewhere), so all rows step together whatever their t. The grid comes from the training scheduler's
`alphas_cumprod`, not from DDIMInverseScheduler, whose timestep bookkeeping changed in diffusers 0.22 (SmPO's code
pinned 0.20).

This is not the authors' grid, though it takes their step counts (5 SD1.5, 10 SDXL). Their code sets one grid over
the whole schedule (DDIMInverseScheduler.set_timesteps(5): levels T / 5 apart) and walks the levels below the
drawn t, so a row takes 0 to 5 steps (about 3 on average) and ends on a grid level, yet is trained as if at t (the
implied noise uses abar_t); its ReNoise prediction is taken at the current level, not the next. Here every row
takes `steps` steps (2 x steps UNet calls, about 1.7 times theirs on average) and ends exactly at t, whose label it
carries.

One DDIM step from abar a to abar a' with a noise prediction eps (fp32):

    x0_pred = (z - sqrt(1 - a) eps) / sqrt(a),    z' = sqrt(a') x0_pred + sqrt(1 - a') eps

Inversion with one ReNoise refinement: eps_1 = eps(z_k, g_k), tentative z' = step(z_k, eps_1),
eps_2 = eps(z', g_{k+1}), then z_{k+1} = step(z_k, (eps_1 + eps_2) / 2). The first step leaves the clean latent
(a = 1, so x0_pred = x0 exactly); the UNet sees it as timestep 0, the least noisy level it was trained on.
v-prediction outputs become noise with the abar of the timestep the UNet was given,
eps = sqrt(abar) v + sqrt(1 - abar) z (put x0 = (z - sqrt(1 - abar) eps) / sqrt(abar) into the velocity
v = sqrt(abar) eps - sqrt(1 - abar) x0).

The training target is the noise implied by the inverted latent, eps_hat = (z - sqrt(abar_t) x0) / sqrt(1 - abar_t)
(or the velocity from x0 and eps_hat), so z = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_hat holds exactly. The inversion
is deterministic: the two images of a pair share t but each gets the noise its own inversion implies.

Flow-matching transformers (SD3, FLUX) invert their own sampler, the Euler ODE, run forwards in s: from the clean
latent (s = 0) to each row's s = t / 1000 on the grid s_k = s k / steps,

    z_{k+1} = z_k + (s_{k+1} - s_k) v,    ReNoise: v = (v(z_k, s_k) + v(z_k + (s_{k+1} - s_k) v(z_k, s_k), s_{k+1})) / 2

(the velocity averaged with the one at the tentative next latent, as above with the noise), and train on the velocity
the inverted latent implies: z = (1 - s) x0 + s eps_hat, so eps_hat - x0 = (z - x0) / s. SmPO publishes no flow
setting (its steps are DDIM's on SD1.5 / SDXL): this is its recipe carried over to the flow sampler.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from ..models.conditioning import Conditioning
from .flow import FlowNoising
from .likelihood import DDPMNoising, NoisedRows, abar_at, prediction_target

CLEAN = 1.0  # abar of level -1, the clean latent


def inversion_grid(timesteps: torch.Tensor, steps: int) -> torch.Tensor:
    """Levels (rows, steps + 1), non-decreasing from -1 (clean) to each row's timestep."""
    if steps < 1:
        raise ValueError(f"inversion needs at least one step, got steps={steps}")
    k = torch.arange(steps + 1, device=timesteps.device)
    return (timesteps.long()[:, None] + 1) * k // steps - 1


def _ddim_step(z: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
    x0_pred = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0_pred + (1 - a_next).sqrt() * eps


def _predict_noise(denoiser, scheduler: DDPMScheduler, z: torch.Tensor, levels: torch.Tensor, cond: Conditioning,
                   dtype: torch.dtype) -> torch.Tensor:
    """The UNet's noise prediction (fp32) at the fp32 latents z of the given levels."""
    t = levels.clamp(min=0)
    out = cond.denoise(denoiser, z.to(dtype), t).float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        a = abar_at(scheduler, t, CLEAN)
        return a.sqrt() * out + (1 - a).sqrt() * z
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (expected epsilon or v_prediction)")


@torch.no_grad()
def ddim_invert(denoiser, scheduler: DDPMScheduler, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                steps: int, renoise: bool = True) -> torch.Tensor:
    """The clean latents inverted to each row's timestep (fp32): `steps` DDIM steps, each refined once by ReNoise
    unless renoise=False. 2 * steps UNet forwards (steps without ReNoise), all without grad."""
    grid = inversion_grid(timesteps, steps)
    z = latents.float()
    for k in range(steps):
        level, next_level = grid[:, k], grid[:, k + 1]
        a, a_next = abar_at(scheduler, level, CLEAN), abar_at(scheduler, next_level, CLEAN)
        eps = _predict_noise(denoiser, scheduler, z, level, cond, latents.dtype)
        if renoise:  # average with the prediction at the tentative next latent, then redo the step from z
            tentative = _ddim_step(z, eps, a, a_next)
            eps = (eps + _predict_noise(denoiser, scheduler, tentative, next_level, cond, latents.dtype)) / 2
        z = _ddim_step(z, eps, a, a_next)
    return z


@torch.no_grad()
def ddim_sample_back(denoiser, scheduler: DDPMScheduler, z: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                     steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from each row's timestep back to the clean latent along the inversion grid (fp32);
    the last step lands on abar = 1, so it returns x0_pred. For checking the inversion."""
    grid = inversion_grid(timesteps, steps)
    x = z.float()
    for k in range(steps, 0, -1):
        level, prev_level = grid[:, k], grid[:, k - 1]
        eps = _predict_noise(denoiser, scheduler, x, level, cond, z.dtype)
        x = _ddim_step(x, eps, abar_at(scheduler, level, CLEAN), abar_at(scheduler, prev_level, CLEAN))
    return x


def implied_noise(scheduler: DDPMScheduler, latents: torch.Tensor, z: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
    """eps_hat = (z - sqrt(abar_t) x0) / sqrt(1 - abar_t) in fp32: the noise that forward-noises x0 into z."""
    a = abar_at(scheduler, timesteps, CLEAN)
    return (z.float() - a.sqrt() * latents.float()) / (1 - a).sqrt()


def invert_rows(denoiser, process: DDPMNoising | FlowNoising, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, steps: int) -> NoisedRows:
    """SmPO's replacement for `likelihood.noise_rows`: each pair's timestep (`timesteps`, one per pair) is shared by
    its rows, each row inverted by `denoiser` (the policy, no grad) with the sampler of `process`'s family (DDIM, or the
    flow models' Euler ODE) and trained on the noise its inversion implies."""
    timesteps = timesteps.to(latents.device).repeat(latents.shape[0] // timesteps.shape[0])
    if isinstance(process, FlowNoising):
        sigmas = timesteps.float() / process.num_train_timesteps
        z = flow_invert(denoiser, latents, sigmas, cond, steps, process.num_train_timesteps)
        target = (z - latents.float()) / sigmas.view(-1, 1, 1, 1)
        return NoisedRows(z.to(latents.dtype), timesteps, target.to(latents.dtype))
    scheduler = process.scheduler
    z = ddim_invert(denoiser, scheduler, latents, timesteps, cond, steps)
    noise = implied_noise(scheduler, latents, z, timesteps)
    target = prediction_target(scheduler, latents.float(), noise, timesteps)
    return NoisedRows(z.to(latents.dtype), timesteps, target.to(latents.dtype))


def _velocity(model, z: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, dtype: torch.dtype,
              num_train_timesteps: int) -> torch.Tensor:
    return cond.denoise(model, z.to(dtype), sigmas * num_train_timesteps).float()


@torch.no_grad()
def flow_invert(model, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, steps: int,
                num_train_timesteps: int = 1000, renoise: bool = True) -> torch.Tensor:
    """The clean latents carried by the Euler ODE to each row's sigma (fp32): `steps` equal steps from s = 0, each
    refined once by ReNoise unless renoise=False (see the module docstring); all without grad."""
    if steps < 1:
        raise ValueError(f"inversion needs at least one step, got steps={steps}")
    z = latents.float()
    for k in range(steps):
        s, s_next = sigmas * k / steps, sigmas * (k + 1) / steps
        ds = (s_next - s).view(-1, 1, 1, 1)
        v = _velocity(model, z, s, cond, latents.dtype, num_train_timesteps)
        if renoise:
            v = (v + _velocity(model, z + ds * v, s_next, cond, latents.dtype, num_train_timesteps)) / 2
        z = z + ds * v
    return z


@torch.no_grad()
def flow_sample_back(model, z: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, steps: int,
                     num_train_timesteps: int = 1000) -> torch.Tensor:
    """The Euler ODE from each row's sigma back to s = 0 along the inversion's grid (fp32), as the pipelines sample.
    For checking the inversion."""
    x = z.float()
    for k in range(steps, 0, -1):
        s, s_prev = sigmas * k / steps, sigmas * (k - 1) / steps
        x = x + (s_prev - s).view(-1, 1, 1, 1) * _velocity(model, x, s, cond, z.dtype, num_train_timesteps)
    return x
