"""SmPO's DDIM/ReNoise inversion, and the flow models' Euler/ReNoise one: the grid, the step formulas against hand
computations, the implied noise (or velocity), and round trips on the tiny pipelines.

Round-trip errors are relative, ||x0_rec - x0|| / ||x0|| per row, and are compared with the noise-to-signal ratio
sqrt((1 - abar_t) / abar_t): the x0 error that a wrong unit noise would cause at t.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd_schedule import alpha_bar, sd_scheduler

from diffusion_align.models.conditioning import Conditioning, encode_prompts
from diffusion_align.models.loading import load_components
from diffusion_align.training.flow import FlowNoising
from diffusion_align.training.inversion import (ddim_invert, ddim_sample_back, flow_invert, flow_sample_back,
                                                implied_noise, inversion_grid, invert_rows)
from diffusion_align.training.likelihood import DDPMNoising, denoising_errors, prediction_target

NO_TEXT = Conditioning(torch.zeros(1, 77, 8))  # for the stand-in UNets, which ignore it


def noise_to_signal(t: int) -> float:
    return math.sqrt((1 - alpha_bar(t)) / alpha_bar(t))


def relative_error(x, x0) -> torch.Tensor:
    return (x - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)


def tiny(tiny_models, family: str, rows: int):
    """The tiny pipeline's parts, one prompt's conditioning per row, and unit-scale clean latents."""
    parts = load_components(str(tiny_models[family]))
    prompts = [f"a {c} circle" for c in ("red", "blue", "green", "yellow", "purple", "orange")][:rows]
    sizes = dict(original_sizes=torch.tensor([[32, 32]] * rows), crop_top_left=torch.zeros(rows, 2, dtype=torch.long),
                 resolution=32) if family == "sdxl" else {}
    cond = encode_prompts(family, parts.tokenizers, parts.text_encoders, prompts, **sizes)
    latents = torch.randn(rows, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return parts, cond, latents


def test_grid_runs_from_the_clean_latent_to_t():
    t = torch.tensor([0, 1, 3, 4, 5, 37, 999])
    grid = inversion_grid(t, steps=5)
    assert grid.shape == (7, 6)
    assert (grid[:, 0] == -1).all()  # level -1 is the clean latent
    assert torch.equal(grid[:, -1], t)  # the label is the level reached, exactly
    assert (grid.diff(dim=1) >= 0).all()
    assert grid[999 == t].tolist() == [[-1, 199, 399, 599, 799, 999]]
    assert grid[37 == t].tolist() == [[-1, 6, 14, 21, 29, 37]]
    for row, step in enumerate(t.tolist()):
        if step + 1 >= 5:  # enough levels for 5 distinct steps
            assert (grid[row].diff() > 0).all()
        else:  # fewer: unit steps through every level, idling on the repeats
            assert sorted(set(grid[row].tolist())) == list(range(-1, step + 1))
    assert grid[0].tolist() == [-1, -1, -1, -1, -1, 0]
    with pytest.raises(ValueError, match="at least one step"):
        inversion_grid(t, steps=0)


def constant_noise_unet(prediction_type: str, noise: torch.Tensor):
    """A stand-in UNet whose noise prediction is `noise` at every latent and level (given as a velocity,
    v = (eps - sqrt(1 - abar) x) / sqrt(abar), for v-prediction)."""
    def unet(x, t, encoder_hidden_states):
        if prediction_type == "epsilon":
            return SimpleNamespace(sample=noise)
        a = torch.tensor([alpha_bar(int(s)) for s in t]).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(noise - (1 - a).sqrt() * x) / a.sqrt())
    return unet


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_constant_noise_model_inverts_to_forward_noise(prediction_type):
    # DDIM with a constant noise prediction keeps x0_pred = x0, so inversion must equal forward noising with that
    # noise; this holds only if the walk starts at abar = 1 (treating x0 as level 0 would scale it by sqrt(abar_0)).
    scheduler = sd_scheduler(prediction_type)
    x0, noise, t = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3), torch.tensor([0, 2, 500, 999])
    z = ddim_invert(constant_noise_unet(prediction_type, noise), scheduler, x0, t, NO_TEXT, steps=5)
    for row, step in enumerate(t.tolist()):
        a = alpha_bar(step)
        assert torch.allclose(z[row], math.sqrt(a) * x0[row] + math.sqrt(1 - a) * noise[row], atol=1e-5)
    assert torch.allclose(implied_noise(scheduler, x0, z, t), noise, atol=1e-4)


def test_one_renoise_step_by_hand():
    # steps=1: eps_1 = eps(x0, label 0), z' = sqrt(a) x0 + sqrt(1 - a) eps_1, eps_2 = eps(z', t),
    # z = sqrt(a) x0 + sqrt(1 - a) (eps_1 + eps_2) / 2
    calls = []

    def unet(x, t, encoder_hidden_states):
        calls.append(t.tolist())
        return SimpleNamespace(sample=0.5 * x + t.view(-1, 1, 1, 1) / 1000)

    x0, t = torch.randn(2, 4, 3, 3), torch.tensor([250, 0])
    z = ddim_invert(unet, sd_scheduler(), x0, t, NO_TEXT, steps=1)
    assert calls == [[0, 0], [250, 0]]  # the clean latent is shown to the UNet as timestep 0
    z_plain = ddim_invert(unet, sd_scheduler(), x0, t, NO_TEXT, steps=1, renoise=False)
    assert len(calls) == 3
    for row, step in enumerate(t.tolist()):
        a = alpha_bar(step)
        eps_1 = 0.5 * x0[row]
        tentative = math.sqrt(a) * x0[row] + math.sqrt(1 - a) * eps_1
        eps_2 = 0.5 * tentative + step / 1000
        assert torch.allclose(z[row], math.sqrt(a) * x0[row] + math.sqrt(1 - a) * (eps_1 + eps_2) / 2, atol=1e-6)
        assert torch.allclose(z_plain[row], tentative, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "sd2"])  # epsilon and v-prediction
def test_implied_noise_reproduces_the_inverted_latent(tiny_models, family):
    parts, cond, latents = tiny(tiny_models, family, rows=6)
    scheduler = parts.noise_scheduler
    rows = invert_rows(parts.denoiser, DDPMNoising(scheduler), latents, torch.tensor([50, 400, 900]), cond, steps=5)
    noise = implied_noise(scheduler, latents, rows.noisy, rows.timesteps)
    assert torch.allclose(scheduler.add_noise(latents, noise, rows.timesteps), rows.noisy, atol=1e-5)
    assert torch.allclose(rows.target, prediction_target(scheduler, latents, noise, rows.timesteps), atol=1e-6)
    # shared t within a pair ([w1 w2 w3 l1 l2 l3]), but each image gets the noise its own inversion implies
    assert torch.equal(rows.timesteps[:3], rows.timesteps[3:])
    assert len(set(rows.timesteps[:3].tolist())) == 3
    assert relative_error(noise[:3], noise[3:]).min() > 0.1


def test_inversion_round_trips_on_the_tiny_sd_unet(tiny_models):
    # A random UNet is no smooth denoiser: with 5 steps the round trip is meaningful up to t ~ 500 (noise/signal 1.6);
    # at t = 999 (noise/signal 14.6) it misses by ~180% with 5 steps and ~35% with 50. Seen here (t = 100..400):
    # ReNoise 0.0023-0.021, plain DDIM inversion 0.0045-0.043, label one grid stride off 0.019-0.14.
    parts, cond, latents = tiny(tiny_models, "sd", rows=4)
    unet, scheduler = parts.denoiser, parts.noise_scheduler
    t = torch.tensor([100, 200, 300, 400])  # a different grid per row, in one batch

    def round_trip(z, label):
        return relative_error(ddim_sample_back(unet, scheduler, z, label, cond, steps=5), latents)

    z = ddim_invert(unet, scheduler, latents, t, cond, steps=5)
    error = round_trip(z, t)
    plain = round_trip(ddim_invert(unet, scheduler, latents, t, cond, steps=5, renoise=False), t)
    mislabelled = torch.minimum(round_trip(z, t - t // 5), round_trip(z, t + t // 5))
    for row, step in enumerate(t.tolist()):
        assert error[row] < 0.03 * noise_to_signal(step)
    assert (error < 0.75 * plain).all()
    assert (error < 0.3 * mislabelled).all()


def test_round_trip_at_the_smallest_timesteps(tiny_models):
    parts, cond, latents = tiny(tiny_models, "sd", rows=4)
    t = torch.tensor([0, 1, 3, 4])  # t + 1 <= steps: every level of the grid is used
    z = ddim_invert(parts.denoiser, parts.noise_scheduler, latents, t, cond, steps=5)
    error = relative_error(ddim_sample_back(parts.denoiser, parts.noise_scheduler, z, t, cond, steps=5), latents)
    for row, step in enumerate(t.tolist()):
        assert error[row] < 0.01 * noise_to_signal(step)  # seen: ~1e-4 against 0.029-0.059


def test_v_prediction_round_trip_on_the_tiny_sd2_unet(tiny_models):
    # seen: ReNoise 0.012-0.084, plain 0.024-0.15 (t = 100..400, 5 steps)
    parts, cond, latents = tiny(tiny_models, "sd2", rows=4)
    unet, scheduler = parts.denoiser, parts.noise_scheduler
    t = torch.tensor([100, 200, 300, 400])
    errors = [relative_error(ddim_sample_back(unet, scheduler, ddim_invert(
        unet, scheduler, latents, t, cond, steps=5, renoise=renoise), t, cond, steps=5), latents)
        for renoise in (True, False)]
    for row, step in enumerate(t.tolist()):
        assert errors[0][row] < 0.1 * noise_to_signal(step)
    assert (errors[0] < 0.75 * errors[1]).all()


def test_sdxl_size_conditioning_reaches_the_inversion(tiny_models):
    parts, cond, latents = tiny(tiny_models, "sdxl", rows=2)
    rows = invert_rows(parts.denoiser, DDPMNoising(parts.noise_scheduler), latents, torch.tensor([300]), cond, steps=3)
    assert rows.noisy.shape == latents.shape and torch.isfinite(rows.noisy).all()
    cond.added_cond_kwargs["time_ids"] = cond.added_cond_kwargs["time_ids"] * 2
    resized = invert_rows(parts.denoiser, DDPMNoising(parts.noise_scheduler), latents, torch.tensor([300]), cond,
                          steps=3)
    assert torch.equal(resized.timesteps, rows.timesteps)
    assert not torch.allclose(resized.noisy, rows.noisy)


def test_no_gradient_flows_through_the_inversion(tiny_models):
    parts, cond, latents = tiny(tiny_models, "sd", rows=2)
    grad_enabled = []

    def recording_unet(x, t, **kwargs):
        grad_enabled.append(torch.is_grad_enabled())
        return parts.denoiser(x, t, **kwargs)

    rows = invert_rows(recording_unet, DDPMNoising(parts.noise_scheduler), latents, torch.tensor([300]), cond, steps=3)
    assert grad_enabled == [False] * 6  # 2 * steps forwards, none recorded for backward
    assert not rows.noisy.requires_grad and not rows.target.requires_grad
    denoising_errors(parts.denoiser, rows, cond).sum().backward()  # the policy's gradient comes from here alone
    assert all(p.grad is not None for p in parts.denoiser.parameters() if p.requires_grad)


# ---------------------------------------------------------------- the flow models' inversion (SD3, FLUX)

class StandIn:
    """A stand-in transformer family: `cond.denoise(model, x, t)` calls model(x, t)."""
    @staticmethod
    def denoise(model, sample, timesteps, cond):
        return model(sample, timesteps)


FLOW_TEXT = Conditioning(torch.zeros(1, 4, 8), family=StandIn())


def test_a_constant_velocity_model_inverts_to_forward_noise():
    """With v = eps - x0 everywhere, Euler from s = 0 lands exactly on (1 - s) x0 + s eps, and the implied target
    is that velocity: the flow counterpart of the constant-noise DDIM check."""
    x0, eps = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    process = FlowNoising(FlowMatchEulerDiscreteScheduler())
    timesteps = torch.tensor([100.0, 500.0, 950.0])
    rows = invert_rows(lambda x, t: eps - x0, process, x0, timesteps, FLOW_TEXT, steps=4)
    s = (timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(rows.noisy, (1 - s) * x0 + s * eps, atol=1e-5)
    assert torch.allclose(rows.target, eps - x0, atol=1e-4) and torch.equal(rows.timesteps, timesteps)


def test_one_flow_renoise_step_by_hand():
    """steps=1 with v(x, t) = a x, a = 0.5 + t / 1000: v1 = a(0) x0 at s = 0, tentative z' = x0 + s v1,
    v2 = a(s) z', z = x0 + s (v1 + v2) / 2; without ReNoise z = x0 + s v1."""
    calls = []

    def model(x, t):
        calls.append(t.tolist())
        return (0.5 + t.view(-1, 1, 1, 1) / 1000) * x

    x0, sigmas = torch.randn(2, 4, 3, 3), torch.tensor([0.25, 0.75])
    z = flow_invert(model, x0, sigmas, FLOW_TEXT, steps=1)
    assert calls == [[0.0, 0.0], [250.0, 750.0]]  # the clean latent is shown as timestep 0
    for row, s in enumerate(sigmas.tolist()):
        v1 = 0.5 * x0[row]
        v2 = (0.5 + s) * (x0[row] + s * v1)
        assert torch.allclose(z[row], x0[row] + s * (v1 + v2) / 2, atol=1e-6)
    plain = flow_invert(model, x0, sigmas, FLOW_TEXT, steps=1, renoise=False)
    assert torch.allclose(plain, x0 * (1 + 0.5 * sigmas.view(-1, 1, 1, 1)), atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_inversion_round_trips_on_the_tiny_transformers(tiny_flow_models, family):
    """Euler back from the inverted latent returns close to the clean latent, ReNoise closer than plain Euler
    inversion, and both far closer than going back from the wrong noise level. Seen here (s = 0.1..0.4, 5 steps, both
    families): ReNoise 0.0004-0.006, plain Euler inversion 0.0009-0.011, back from 1.2 s 0.012-0.048."""
    parts = load_components(str(tiny_flow_models[family]))
    prompts = ["a red circle", "a blue square", "a green triangle", "a large yellow circle"]
    cond = encode_prompts(family, parts.tokenizers, parts.text_encoders, prompts, guidance=parts.guidance)
    latents = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def round_trip(renoise, back_from=1.0):
        z = flow_invert(parts.denoiser, latents, sigmas, cond, steps=5, renoise=renoise)
        return relative_error(flow_sample_back(parts.denoiser, z, back_from * sigmas, cond, steps=5), latents)

    error, plain, mislabelled = round_trip(True), round_trip(False), round_trip(True, back_from=1.2)
    assert (error < 0.01).all() and (error < 0.75 * plain).all() and (error < 0.3 * mislabelled).all()
