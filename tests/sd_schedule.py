"""The DDPM schedule SD1.5 / SD2.1 / SDXL train with, built by hand for golden values in the tests."""

import math

from diffusers import DDPMScheduler


def sd_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction_type)


def alpha_bar(t: int) -> float:
    """SD's "scaled_linear" schedule by hand: betas = linspace(sqrt(b0), sqrt(b1), 1000)^2, abar_t = prod(1 - beta)."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)]
    return math.prod(1 - b for b in betas[: t + 1])
