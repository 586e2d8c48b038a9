"""Flow-matching math for SD3 / SD3.5 and FLUX.1: noising, training sigmas, and the sampler step as a Gaussian policy.

Pure functions of tensors; the transformers and the pipelines live elsewhere. `s` (sigma) runs from 0 (data) to 1
(noise) and each function takes it as a number or one per row.

- Forward process and target (rectified flow; Esser et al. 2024, "Scaling Rectified Flow Transformers for
  High-Resolution Image Synthesis", arXiv 2403.03206; diffusers `FlowMatchEulerDiscreteScheduler.scale_noise`):
  x_s = (1 - s) x_0 + s eps, and the transformer predicts the velocity dx_s/ds = eps - x_0.
- Training sigmas (same paper: logit-normal sampling and the resolution-dependent timestep shift; diffusers
  `training_utils.compute_density_for_timestep_sampling` with "logit_normal", and the `shift` of
  `FlowMatchEulerDiscreteScheduler`): s = sigmoid(n), n ~ N(mean, std^2), then s' = shift s / (1 + (shift - 1) s).
- Sampling: the ODE step is Euler, x' = x + (s' - s) v (`FlowMatchEulerDiscreteScheduler.step`). For online RL the
  step is made stochastic with an SDE that has the ODE's marginals (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470,
  `sde_step_with_logprob` in flow_grpo/diffusers_patch/sd3_sde_with_logprob.py): with dt = s' - s < 0 and noise
  level a,

      sigma_t = a sqrt(s / (1 - s))        (at s = 1 the denominator takes the schedule's first sigma below 1)
      mean    = x (1 + sigma_t^2 dt / (2 s)) + v (1 + sigma_t^2 (1 - s) / (2 s)) dt
      std     = sigma_t sqrt(-dt)

  and the step's log-probability is the Gaussian log-density of x', constants included, averaged over the latent
  (`sampling.gaussian_log_prob`, shared with the DDIM policy).
- Coefficients-preserving sampling (CPS; Wang and Yu 2025, arXiv 2509.05952; Flow-GRPO's `sde_type="cps"` in the
  same `sde_step_with_logprob`, the step of its Flow-GRPO-Fast recipes): from the velocity's estimates of the data
  and the noise, x0_hat = x - s v and x1_hat = x + (1 - s) v,

      std  = s' sin(a pi / 2)
      mean = (1 - s') x0_hat + sqrt(s'^2 - std^2) x1_hat

  so the fresh noise std z and the old noise's part together keep the noise coefficient s' of x_s' exactly (a = 0:
  the Euler step; a = 1: all the noise drawn afresh). Unlike the SDE's, its fresh noise does not shrink with the
  step, so it does not approach the ODE's marginals as the steps get many: it is meant for few steps. Its
  "log-probability" is Flow-GRPO's surrogate, the Gaussian's without its constants nor its 1 / (2 std^2):
  -(x' - mean)^2 averaged over the latent (`cps_log_prob`); the recipes' PPO clip (1e-5) is set for that scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .likelihood import NoisedRows
from .sampling import gaussian_log_prob

# the logit-normal's mean and std: the SD3 paper's choice (arXiv 2403.03206, section 3.1: rf/lognorm(0.00, 1.00)),
# and the defaults of diffusers' train_dreambooth_lora_{sd3,flux}.py (--logit_mean 0, --logit_std 1)
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


def _per_row(value, like: torch.Tensor) -> torch.Tensor:
    """`value` (a number, a 0-dim tensor, or one per row) in fp32, shaped to broadcast over `like`: one per row
    becomes (N, 1, ..., 1) on `like`'s device; one value stays a 0-dim tensor where it is, which torch applies to
    `like` as a scalar, as `FlowMatchEulerDiscreteScheduler.step` applies its sigmas."""
    value = torch.as_tensor(value, dtype=torch.float32)
    return value.to(like.device).view(-1, *[1] * (like.ndim - 1)) if value.ndim else value


def flow_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s, target) in fp32: x_s = (1 - s) x_0 + s eps and the velocity target eps - x_0, with `sigmas` one per
    row (or one for all). The per-sample error is then |v_theta(x_s) - target|^2 averaged over the latent."""
    x0, eps = latents.float(), noise.float()
    s = _per_row(sigmas, x0)
    return (1 - s) * x0 + s * eps, eps - x0


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = shift s / (1 + (shift - 1) s): more of the steps or draws at high noise for shift > 1; 0 and 1 stay
    fixed, shift 1 changes nothing. The same map `FlowMatchEulerDiscreteScheduler` applies with its `shift`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def logit_normal_sigmas(batch_size: int, generator: torch.Generator | None = None, mean: float = 0.0,
                        std: float = 1.0, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training sigmas, one per row, as SD3 and FLUX train: s = sigmoid(n) with n ~ N(mean, std^2), then shifted.

    Defaults: mean 0 and std 1 (the SD3 paper's logit-normal, and the defaults of diffusers' training scripts);
    shift 1 (none): pass the model's scheduler `shift`. For one generator state the unshifted draws equal
    `compute_density_for_timestep_sampling("logit_normal", ...)`. Unlike diffusers' scripts, which look s up in the
    scheduler's 1000-entry table (`timesteps[int(u * 1000)]`: discretised, and mirrored to ~1 - u since the table
    runs from noise to data), s is used as drawn, as in the paper."""
    n = torch.normal(mean, std, size=(batch_size,), generator=generator, device=device)
    return shift_sigmas(torch.sigmoid(n), shift)


def flow_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timestep SD3's transformer is called with for sigma s: s * num_train_timesteps (the scheduler config's;
    diffusers' default 1000), as `FlowMatchEulerDiscreteScheduler.timesteps` holds it. FLUX's transformer multiplies
    its timestep by 1000 itself, and diffusers' `FluxPipeline` passes it timestep / 1000, i.e. s."""
    return sigmas * num_train_timesteps


def flow_sde_transition(velocity: torch.Tensor, sigma, sigma_next, sample: torch.Tensor, noise_level: float,
                        sigma_below_one: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian N(mean, std^2 I) of one Flow-GRPO SDE step from `sample` at `sigma` to `sigma_next` (numbers,
    or one per row), in fp32: (mean like `sample`, std 0-dim or (N, 1, ..., 1)). See the module docstring.

    sigma_t = a sqrt(s / (1 - s)) is infinite at s = 1, where a schedule starts; there, as Flow-GRPO does, the
    denominator takes `sigma_below_one`, the schedule's first sigma below 1 (`scheduler.sigmas[1]` after
    `set_timesteps`); it is required only when some sigma is 1.
    """
    x, v = sample.float(), velocity.float()
    s, s_next = _per_row(sigma, x), _per_row(sigma_next, x)
    dt = s_next - s
    if sigma_below_one is not None:
        s_for_denominator = torch.where(s >= 1, float(sigma_below_one), s)
    elif (s >= 1).any():
        raise ValueError("a step from sigma = 1 needs sigma_below_one (the schedule's first sigma below 1)")
    else:
        s_for_denominator = s
    std_t = noise_level * (s / (1 - s_for_denominator)).sqrt()
    # x' = x + [v + sigma_t^2 / (2 s) (x + (1 - s) v)] dt: the term -sigma_t^2 / 2 * grad log p_s, written with the
    # velocity (grad log p_s = -(x + (1 - s) v) / s on the rectified-flow path), keeps the ODE's marginals.
    mean = x * (1 + std_t ** 2 * dt / (2 * s)) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * (-dt).sqrt()


def flow_cps_transition(velocity: torch.Tensor, sigma, sigma_next, sample: torch.Tensor,
                        noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian N(mean, std^2 I) of one CPS step from `sample` at `sigma` to `sigma_next` (numbers, or one per
    row), in fp32: (mean like `sample`, std 0-dim or (N, 1, ..., 1)). See the module docstring; at s' = 0 (the last
    step) std is 0 and the step is deterministic."""
    if not 0 <= noise_level <= 1:
        raise ValueError(f"CPS's noise level is the fraction of the noise drawn afresh, in [0, 1]; got {noise_level}")
    x, v = sample.float(), velocity.float()
    s, s_next = _per_row(sigma, x), _per_row(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)
    data, noise = x - s * v, x + (1 - s) * v
    return (1 - s_next) * data + (s_next ** 2 - std ** 2).sqrt() * noise, std


def cps_log_prob(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's log-probability of a CPS step, one value per row: -(x - mean)^2 averaged over all but the first
    dimension (the Gaussian's exponent without its 1 / (2 std^2), and no constants)."""
    return -((x.float() - mean) ** 2).mean(dim=tuple(range(1, x.ndim)))


SDE_TYPES = ("sde", "cps")
SDE_KLS = ("flow_grpo", "gaussian")  # an SDE step's KL to the reference: Flow-GRPO's, or the Gaussians'


def flow_step_transition(velocity: torch.Tensor, sigma, sigma_next, sample: torch.Tensor, noise_level: float,
                         sde_type: str = "sde", sigma_below_one: float | None = None):
    """(mean, std) of one step of `sde_type`: Flow-GRPO's SDE (`flow_sde_transition`) or CPS
    (`flow_cps_transition`)."""
    if sde_type == "cps":
        return flow_cps_transition(velocity, sigma, sigma_next, sample, noise_level)
    if sde_type != "sde":
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    return flow_sde_transition(velocity, sigma, sigma_next, sample, noise_level, sigma_below_one)


def flow_step_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sde_type: str = "sde") -> torch.Tensor:
    """The log-probability per row of `x` under a step's (mean, std): the Gaussian's for the SDE, Flow-GRPO's
    surrogate for CPS (`cps_log_prob`)."""
    return cps_log_prob(x, mean) if sde_type == "cps" else gaussian_log_prob(x, mean, std)


def flow_sde_step_with_logprob(velocity: torch.Tensor, sigma, sigma_next, sample: torch.Tensor, noise_level: float,
                               prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None,
                               sigma_below_one: float | None = None,
                               sde_type: str = "sde") -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step from `sample` at `sigma` to `sigma_next` (numbers, or one per row): (next sample, log_prob per row).

    `prev_sample` given: its log-probability under this step (re-scoring a stored trajectory); otherwise it is drawn
    as mean + std z with z = randn(generator). The step math runs in fp32; the next sample comes back in `sample`'s
    dtype and its log-probability is that of the returned (rounded) tensor, so re-scoring it gives the same value.
    `sigma_below_one`: see `flow_sde_transition`; `sde_type`: "sde" (Flow-GRPO's SDE) or "cps".

    noise_level 0 is the ODE: the Euler step x + (s' - s) v, with one sigma for all rows equal bit for bit to
    `FlowMatchEulerDiscreteScheduler.step` (which casts to the velocity's dtype; pipelines pass both in the latents'
    dtype), with no density: log_prob is None.
    """
    if noise_level == 0:
        if prev_sample is not None:
            raise ValueError("a deterministic step (noise_level 0) has no density to re-score prev_sample with")
        x = sample.float()
        dt = _per_row(sigma_next, x) - _per_row(sigma, x)
        # The scheduler's own expression, not an fp32 one: a 0-dim fp32 dt times a bf16 / fp16 velocity stays in
        # the velocity's dtype (on CPU torch rounds dt to it first), then joins the fp32 sample. Sigmas one per row
        # give an fp32 product instead.
        return (x + dt * velocity).to(sample.dtype), None
    mean, std = flow_step_transition(velocity, sigma, sigma_next, sample, noise_level, sde_type, sigma_below_one)
    if prev_sample is None:
        prev_sample = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
    prev_sample = prev_sample.to(sample.dtype)
    return prev_sample, flow_step_log_prob(prev_sample, mean, std, sde_type)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """The transformer's image tokens for latents (C, H, W): one per 2x2 patch (SD3's patch_size 2, FLUX's packing)."""
    return latent_shape[-2] * latent_shape[-1] // 4


def training_shift(scheduler_config, latent_shape: tuple[int, ...]) -> float:
    """The shift of the training sigmas at this latent size. SD3's scheduler has a constant `shift` (3.0 for SD3 and
    SD3.5); FLUX's shifts by the image token count (`use_dynamic_shifting`): mu grows linearly from base_shift at
    base_image_seq_len tokens to max_shift at max_image_seq_len (FluxPipeline's `calculate_shift`) and the shift is
    e^mu (the scheduler's exponential time shift e^mu / (e^mu + 1/s - 1) is `shift_sigmas` with shift e^mu), the same
    shift FluxPipeline samples with at that size (methods.md: FLUX "a shift that grows with the token count")."""
    c = scheduler_config
    if not c.get("use_dynamic_shifting", False):
        return float(c.get("shift", 1.0))
    if c.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"a scheduler with time_shift_type={c['time_shift_type']!r} shifts in another form than "
                         "FLUX's; only the exponential one is supported")
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    mu = c["base_shift"] + slope * (image_seq_len(latent_shape) - c["base_image_seq_len"])
    return math.exp(mu)


class FlowNoising:
    """The flow-matching transformers' forward process: s drawn as `sampling` says (`logit_normal`, mean and std
    `logit_mean`, `logit_std`: how SD3 and FLUX train; or `uniform` on (0, 1)), then shifted (`training_shift`);
    x_s = (1 - s) x_0 + s eps, target the velocity eps - x_0 (`flow_noise`). Timesteps are the scheduler's, 1000 s
    (`flow_timesteps`); the transformers' calls convert them as their pipelines do."""

    def __init__(self, scheduler, sampling: str = "logit_normal", logit_mean: float = LOGIT_MEAN,
                 logit_std: float = LOGIT_STD):
        if sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"sampling must be logit_normal or uniform, got {sampling!r}")
        self.scheduler, self.sampling, self.logit_mean, self.logit_std = scheduler, sampling, logit_mean, logit_std
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        shift = training_shift(self.scheduler.config, latent_shape)
        if self.sampling == "uniform":
            sigma = shift_sigmas(torch.rand(1, generator=generator), shift)
        else:
            sigma = logit_normal_sigmas(1, generator, self.logit_mean, self.logit_std, shift)
        return flow_timesteps(sigma[0], self.num_train_timesteps)

    def noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedRows:
        noisy, target = flow_noise(latents, noise, timesteps / self.num_train_timesteps)
        return NoisedRows(noisy.to(latents.dtype), timesteps, target.to(latents.dtype))


class FlowSDEPolicy:
    """The flow families' sampler as a policy for the online methods: the steps their pipelines take (`set_steps`),
    each one Flow-GRPO's SDE step at `noise_level`, or its CPS step (`sde_type`; noise level 0: the Euler ODE,
    deterministic, no density). `sde_kl`: the KL to the reference of an SDE step (`kl_std`)."""

    def __init__(self, scheduler, noise_level: float, linspace_sigmas: bool = False, sde_type: str = "sde",
                 sde_kl: str = "flow_grpo"):
        if sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
        if sde_kl not in SDE_KLS:
            raise ValueError(f"sde_kl must be one of {SDE_KLS}, got {sde_kl!r}")
        self.scheduler, self.noise_level, self.linspace_sigmas = scheduler, noise_level, linspace_sigmas
        self.sde_type, self.sde_kl = sde_type, sde_kl

    def set_steps(self, steps: int, latent_shape: tuple[int, ...], device=None) -> torch.Tensor:
        """Set the sigmas of `steps` steps as the family's pipeline does: FluxPipeline passes linspace(1, 1/steps,
        steps) (`linspace_sigmas`), StableDiffusion3Pipeline the step count alone; both shift them by the image
        token count where the scheduler shifts dynamically (mu, as `training_shift`). Returns the timesteps the
        transformer is called with (1000 s), one per step; `sigmas` holds the steps' s and the final 0."""
        mu = (math.log(training_shift(self.scheduler.config, latent_shape))
              if self.scheduler.config.get("use_dynamic_shifting", False) else None)
        sigmas = np.linspace(1.0, 1 / steps, steps) if self.linspace_sigmas else None
        self.scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)
        self.sigmas = self.scheduler.sigmas.float().cpu()
        self.sigma_below_one = float(self.sigmas[1])  # where sigma_t's denominator meets s = 1 (flow_sde_transition)
        return self.scheduler.timesteps

    def transition(self, velocity: torch.Tensor, step, sample: torch.Tensor):
        """(mean, std) of step `step` (an index, or one per row) from `sample`: `flow_step_transition`."""
        return flow_step_transition(velocity, self.sigmas[step], self.sigmas[step + 1], sample, self.noise_level,
                                    self.sde_type, self.sigma_below_one)

    def log_prob(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The log-probability per row of the next latents `x` under a step's (mean, std): `flow_step_log_prob`."""
        return flow_step_log_prob(x, mean, std, self.sde_type)

    def kl_std(self, std: torch.Tensor, step) -> torch.Tensor:
        """The std that the KL to the reference (`gaussian_policy_kl`) divides by. An SDE step's with sde_kl
        "flow_grpo": Flow-GRPO's `std_dev_t` = sigma_t, the step's std without sqrt(s - s') (`scripts/train_sd3.py`:
        its KL is the two Gaussians' times the step's length), so that its published weight (train.beta) means the
        same here. Otherwise the step's std: the Gaussians' KL."""
        if self.sde_type == "cps" or self.sde_kl == "gaussian":
            return std
        return std / _per_row(self.sigmas[step] - self.sigmas[step + 1], std).sqrt()

    def step(self, velocity: torch.Tensor, step: int, sample: torch.Tensor, generator=None, noisy: bool = True):
        """(next sample, its log_prob per row): `flow_sde_step_with_logprob`; `noisy` False: the ODE, log_prob
        None."""
        return flow_sde_step_with_logprob(velocity, self.sigmas[step], self.sigmas[step + 1], sample,
                                          self.noise_level if noisy else 0.0, generator=generator,
                                          sigma_below_one=self.sigma_below_one, sde_type=self.sde_type)
