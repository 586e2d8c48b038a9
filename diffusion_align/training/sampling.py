"""Sampling with log-probabilities, for online methods (Pref-GRPO, GRPO): each sampler step as a Gaussian policy.

The UNet families sample with DDIM, which with eta > 0 draws x_prev ~ N(mu, sigma^2 I) (Song et al., 2020, eq. 12
and 16):

    sigma = eta * sqrt((1 - abar_p) / (1 - abar_t)) * sqrt(1 - abar_t / abar_p)
    mu    = sqrt(abar_p) * x0_hat + sqrt(1 - abar_p - sigma^2) * eps_hat

with x0_hat and eps_hat from the model output (epsilon or v-prediction, classifier-free guidance already applied)
and abar_p the level of the previous timestep (t - T / steps; the scheduler's final level below 0); the flow
families with Flow-GRPO's SDE or CPS step (flow.py, `FlowSDEPolicy`). Either policy gives a step's Gaussian
(`transition`), draws it (`step`) and scores the next latents under it (`log_prob`): the Gaussian log-density,
constants included, averaged over the latent elements (CPS: Flow-GRPO's surrogate of it). `sample_with_logprob`
denoises groups of images with their guidance (`guided_output`: classifier-free in one batched call, or FLUX's
guidance input) and keeps the trajectory; `step_distribution` gives a stored step's Gaussian under the current
policy (with gradients), from which the training loop re-scores the step and measures the KL to the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from ..models.conditioning import Conditioning, encode_prompts
from ..models.families import Family, get_family
from .likelihood import abar_at


def ddim_transition(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                    eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian N(mu, sigma^2 I) of one DDIM step from `sample` at `timestep` (an int, or one per row), in fp32:
    (mu like `sample`, sigma of shape (N, 1, ..., 1)). sigma is 0 at eta = 0."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before stepping")
    if scheduler.config.thresholding:
        raise ValueError("ddim_step_with_logprob does not implement dynamic thresholding; use a scheduler "
                         "config with thresholding=False (as Stable Diffusion's)")
    x_t, out = sample.float(), model_output.float()
    t = torch.as_tensor(timestep, device=sample.device).long().expand(sample.shape[0])
    final = float(scheduler.final_alpha_cumprod)  # the level below timestep 0
    a_t = abar_at(scheduler, t, final)
    a_p = abar_at(scheduler, t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps, final)
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
    return a_p ** 0.5 * x0 + (1 - a_p - sigma ** 2) ** 0.5 * eps, sigma


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2), constants included, averaged over all but the first dimension: one value per row."""
    x = x.float()
    log_prob = -((x - mean) ** 2) / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddim_step_with_logprob(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                           eta: float = 1.0, prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One DDIM step from `sample` at `timestep` (an int, or one per row): (prev_sample, log_prob per row).

    `prev_sample` given: its log-probability under this step (re-scoring a stored trajectory); otherwise it is
    drawn with `generator`. The step math runs in fp32; prev_sample comes back in `sample`'s dtype and its
    log-probability is that of the returned (rounded) tensor, so re-scoring it gives the same value. With eta = 0
    the step is deterministic, equal to `DDIMScheduler.step`, and has no density: log_prob is None.
    """
    mu, sigma = ddim_transition(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = torch.randn(mu.shape, generator=generator, device=mu.device) if eta > 0 else 0.0
        prev_sample = mu + sigma * noise
    prev_sample = prev_sample.to(sample.dtype)
    return prev_sample, None if eta == 0 else gaussian_log_prob(prev_sample, mu, sigma)


class DDIMPolicy:
    """The UNet families' sampler as a policy: DDIM steps with `eta` (0: deterministic, no density)."""

    def __init__(self, scheduler: DDIMScheduler, eta: float = 1.0):
        self.scheduler, self.eta = scheduler, eta

    def set_steps(self, steps: int, latent_shape: tuple[int, ...], device=None) -> torch.Tensor:
        """Set `steps` sampling steps; returns the timesteps the UNet is called with, one per step."""
        self.scheduler.set_timesteps(steps, device=device)
        self.timesteps = self.scheduler.timesteps
        return self.timesteps

    def transition(self, model_output: torch.Tensor, step, sample: torch.Tensor):
        """(mean, std) of step `step` (an index, or one per row) from `sample`: `ddim_transition`."""
        return ddim_transition(self.scheduler, model_output, self.timesteps[step], sample, self.eta)

    def log_prob(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The log-probability per row of the next latents `x` under a step's (mean, std): `gaussian_log_prob`."""
        return gaussian_log_prob(x, mean, std)

    def kl_std(self, std: torch.Tensor, step) -> torch.Tensor:
        """The std that the KL to the reference divides by: the step's (the two Gaussians' KL, as DDPO-style KLs
        on DDIM steps take it)."""
        return std

    def step(self, model_output: torch.Tensor, step: int, sample: torch.Tensor, generator=None, noisy: bool = True):
        """(next sample, its log_prob per row): `ddim_step_with_logprob`; `noisy` False: at eta 0, log_prob None."""
        return ddim_step_with_logprob(self.scheduler, model_output, self.timesteps[step], sample,
                                      self.eta if noisy else 0.0, generator=generator)


@dataclass
class Trajectory:
    """A batch of sampled images' denoising paths: the policy's actions and their log-probabilities."""

    latents: list[torch.Tensor]  # x_T, ..., x_0: steps + 1 tensors of (N, C, H, W)
    timesteps: torch.Tensor      # the `steps` timesteps, x_k -> x_{k+1} taken at timesteps[k]
    log_probs: torch.Tensor | None  # (steps, N): each step's log-probability when sampled, NaN at a deterministic
                                    # step; None when all steps were deterministic

    def latents_at(self, step: int | torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x_step of `rows` (all by default); `step` one index for all rows, or a tensor of one index per row."""
        rows = torch.arange(len(self.latents[0])) if rows is None else rows
        if not torch.is_tensor(step):
            return self.latents[step][rows]
        return torch.stack([self.latents[s][r] for s, r in zip(step.tolist(), rows.tolist())])


def zeros_for_empty_prompt(family: Family | str, index: dict) -> bool:
    """Whether the pipeline guides against zero text embeddings rather than the encoded "": SDXL pipelines do when
    their `force_zeros_for_empty_prompt` (model_index.json; true in SDXL base 1.0, and the pipeline's default when
    the key is absent) is set and no negative prompt is given. SD1.x / SD2.x pipelines always encode ""."""
    return get_family(family).zeros_for_empty_prompt(index)


def group_conditioning(family: Family | str, tokenizers: list, text_encoders: list, prompts: list[str], group_size: int,
                       resolution: int, zero_uncond: bool = False,
                       guidance: float | None = None) -> tuple[Conditioning, Conditioning | None]:
    """(conditional, unconditional) rows for `group_size` images of each prompt, rows [p1 x G, p2 x G, ...]: each
    prompt encoded once, the empty prompt once. SDXL is conditioned on its full-resolution, uncropped size.
    `zero_uncond` (`zeros_for_empty_prompt`): the unconditional rows' text embeddings (and SDXL's pooled embedding)
    are zeros, as the pipeline uses them, so the policy is trained under the guidance it is sampled with. A family
    sampled without classifier-free guidance (FLUX) has no unconditional rows (None); its guidance-distilled
    transformers (FLUX.1-dev) read `guidance` as an input instead."""
    family = get_family(family)
    per_image = torch.arange(len(prompts)).repeat_interleave(group_size)
    if not family.classifier_free_guidance:
        return encode_prompts(family, tokenizers, text_encoders, prompts, guidance=guidance).select(per_image), None
    texts = [*prompts, ""]
    sizes = torch.tensor([[resolution, resolution]] * len(texts))
    encoded = encode_prompts(family, tokenizers, text_encoders, texts, sizes, torch.zeros_like(sizes), resolution)
    uncond = encoded.select(torch.full_like(per_image, len(prompts)))
    if zero_uncond:
        uncond.encoder_hidden_states = torch.zeros_like(uncond.encoder_hidden_states)
        if uncond.added_cond_kwargs is not None:  # the size conditioning stays: the pipeline keeps it too
            uncond.added_cond_kwargs["text_embeds"] = torch.zeros_like(uncond.added_cond_kwargs["text_embeds"])
    return encoded.select(per_image), uncond


def applies_cfg(guidance: float) -> bool:
    """Whether classifier-free guidance runs at this scale: above 1, as the pipelines decide
    (`do_classifier_free_guidance`); at 1 or below they call the denoiser on the conditional rows alone."""
    return guidance > 1


def guided_output(model, sample: torch.Tensor, timestep, cond: Conditioning, uncond: Conditioning | None,
                  guidance: float) -> torch.Tensor:
    """Classifier-free guidance in one batched denoiser call: u + guidance * (c - u), as the SD pipelines do; with
    no unconditional rows (FLUX), or where `applies_cfg` says none runs, the conditional call alone. `timestep`: one
    for all rows, or one per row."""
    if uncond is None or not applies_cfg(guidance):
        return cond.denoise(model, sample, timestep)
    if torch.is_tensor(timestep) and timestep.ndim:
        timestep = torch.cat([timestep, timestep])
    both = Conditioning.cat([uncond, cond])
    out_uncond, out_cond = both.denoise(model, torch.cat([sample, sample]), timestep).chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


@torch.no_grad()
def sample_with_logprob(model, policy, cond: Conditioning, uncond: Conditioning | None,
                        latents: torch.Tensor | list[torch.Tensor], steps: int, guidance: float,
                        generator: torch.Generator | None = None, noisy_steps=None, until: int | None = None
                        ) -> Trajectory:
    """Denoise `latents` (x_T, one row per image) in `steps` steps of `policy` (`DDIMPolicy`, `FlowSDEPolicy`)
    with guidance, keeping the trajectory. `noisy_steps`: the step indices drawn from the policy's Gaussian (all by
    default); the others are its deterministic step (DDIM at eta 0, the flow ODE), as Flow-GRPO-Fast's window.
    `latents` may instead be a path's beginning x_T, ..., x_k taken by deterministic steps (a list), which sampling
    continues from step k; `until` stops after that many steps (a beginning to continue), default all `steps`."""
    path = list(latents) if isinstance(latents, (list, tuple)) else [latents]
    timesteps = policy.set_steps(steps, tuple(path[0].shape[1:]), path[0].device)
    noisy_steps = range(steps) if noisy_steps is None else noisy_steps
    log_probs = [None] * (len(path) - 1)
    if any(step in noisy_steps for step in range(len(path) - 1)):
        raise ValueError(f"a path's first {len(path) - 1} steps continue only where they are deterministic; "
                         f"{list(noisy_steps)} are drawn from the policy")
    for step in range(len(path) - 1, steps if until is None else until):
        t = timesteps[step]
        output = guided_output(model, path[-1], t, cond, uncond, guidance)
        prev, log_prob = policy.step(output, step, path[-1], generator=generator, noisy=step in noisy_steps)
        path.append(prev)
        log_probs.append(log_prob)
    if all(log_prob is None for log_prob in log_probs):
        return Trajectory(path, timesteps.clone(), None)
    nan = torch.full((len(path[0]),), float("nan"), device=path[0].device)
    return Trajectory(path, timesteps.clone(), torch.stack([nan if p is None else p for p in log_probs]))


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> list:
    """PIL images of final latents, decoded in the VAE's own dtype outside any autocast (latents / scaling_factor,
    plus the shift_factor of the flow families' VAEs)."""
    from PIL import Image
    with torch.autocast(latents.device.type, enabled=False):
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        if vae.config.get("shift_factor") is not None:
            latents = latents + vae.config.shift_factor
        pixels = vae.decode(latents).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def step_distribution(model, policy, trajectory: Trajectory, step: int | torch.Tensor, cond: Conditioning,
                      uncond: Conditioning | None, guidance: float,
                      rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The current policy's Gaussian (mean, std) for a stored step, for `rows` of the batch (all by default), with
    gradients: the training side of the ratio exp(log_prob - old log_prob) (the policy's `log_prob` of the stored
    next latents) and of the KL to a reference policy. `step`: one step index for all rows, or a tensor of one per
    row (each sample training its own steps). `policy` holds the steps the trajectory was sampled with."""
    rows = torch.arange(len(trajectory.latents[0])) if rows is None else rows
    sample, t = trajectory.latents_at(step, rows), trajectory.timesteps[step]
    output = guided_output(model, sample, t, cond.select(rows), None if uncond is None else uncond.select(rows),
                           guidance)
    return policy.transition(output, step, sample)
