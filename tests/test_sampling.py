"""One DDIM step as a Gaussian policy: equal to diffusers' step at eta = 0, its log-probability against
torch.distributions.Normal, and the re-scoring of a stored step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_align.sampling import ddim_step_with_logprob


def scheduler(prediction_type="epsilon", steps=20):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta_zero_is_diffusers_ddim_step(prediction_type):
    s = scheduler(prediction_type)
    sample, output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in (s.timesteps[0], s.timesteps[10], s.timesteps[-1]):  # the last step lands on the final level
        prev, log_prob = ddim_step_with_logprob(s, output, t, sample, eta=0.0)
        assert torch.equal(prev, s.step(output, t, sample, eta=0.0).prev_sample) and log_prob is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_prob_is_the_gaussian_density_of_the_step(prediction_type):
    s = scheduler(prediction_type)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = int(s.timesteps[5])
    prev, log_prob = ddim_step_with_logprob(s, output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(0))
    # mean and std of the step, from diffusers' own eta = 0 step and its variance
    mean = s.step(output, t, sample, eta=0.0).prev_sample  # eta = 0 gives mu with sigma = 0 in the direction term
    variance = s._get_variance(t, t - 1000 // 20)
    std = math.sqrt(variance)
    a_p = float(s.alphas_cumprod[t - 50])
    eps = output if prediction_type == "epsilon" else (
        float(s.alphas_cumprod[t]) ** 0.5 * output + (1 - float(s.alphas_cumprod[t])) ** 0.5 * sample)
    mu = mean - ((1 - a_p) ** 0.5 - (1 - a_p - variance) ** 0.5) * eps  # the direction term shrinks with sigma
    expected = torch.distributions.Normal(mu, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, atol=1e-4, rtol=1e-5)
    # diffusers' own eta = 1 step with the same noise lands on the same sample
    noise = (prev - mu) / std
    torch.testing.assert_close(s.step(output, t, sample, eta=1.0, variance_noise=noise).prev_sample, prev,
                               atol=1e-5, rtol=1e-5)


def test_a_stored_step_is_rescored_not_redrawn():
    s = scheduler()
    sample, output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = int(s.timesteps[3])
    prev, log_prob = ddim_step_with_logprob(s, output, t, sample, generator=torch.Generator().manual_seed(1))
    again, rescored = ddim_step_with_logprob(s, output, t, sample, prev_sample=prev)
    assert torch.equal(again, prev) and torch.allclose(rescored, log_prob, atol=1e-6)
    # the per-row timestep form gives the same as one timestep for all rows
    _, per_row = ddim_step_with_logprob(s, output, torch.tensor([t, t]), sample, prev_sample=prev)
    assert torch.allclose(per_row, log_prob, atol=1e-6)
    # a sample further from the mean is less likely
    _, far = ddim_step_with_logprob(s, output, t, sample, prev_sample=prev + 1.0)
    assert (far < log_prob).all()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), output, t, sample)
