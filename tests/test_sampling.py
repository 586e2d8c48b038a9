"""One DDIM step as a Gaussian policy: equal to diffusers' step at eta = 0, its log-probability against
torch.distributions.Normal, and the re-scoring of a stored step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_align.training.sampling import DDIMPolicy, ddim_step_with_logprob, ddim_transition
from rescoring import assert_rescoring_gives_ratio_one


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_an_eta_between_zero_and_one_is_diffusers_step(prediction_type):
    """eta = 0.5, where sigma = eta * ... and eta**2 * ... differ (at eta 0 and 1 they agree): the drawn sample is
    DDIMScheduler.step's with the same noise, and its log-probability the Normal density of that step."""
    s = scheduler(prediction_type)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = int(s.timesteps[7])
    prev, log_prob = ddim_step_with_logprob(s, output, t, sample, eta=0.5, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))  # the noise the step drew
    expected = s.step(output, t, sample, eta=0.5, variance_noise=noise).prev_sample
    torch.testing.assert_close(prev, expected, atol=1e-5, rtol=1e-5)
    mean = s.step(output, t, sample, eta=0.5, variance_noise=torch.zeros_like(sample)).prev_sample
    std = 0.5 * math.sqrt(s._get_variance(t, t - 1000 // 20))
    density = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, density, atol=1e-4, rtol=1e-5)


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


def test_a_bf16_step_scores_the_sample_it_returns():
    """bf16 latents: the step draws in fp32 and returns the sample rounded to bf16; its log-probability is the
    rounded sample's, so re-scoring the stored trajectory gives it exactly (ratio 1), as the flow step's does."""
    s = scheduler()
    sample, output = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    t = int(s.timesteps[3])
    prev, log_prob = ddim_step_with_logprob(s, output, t, sample, generator=torch.Generator().manual_seed(1))
    mu, sigma = ddim_transition(s, output, t, sample, 1.0)
    assert prev.dtype == torch.bfloat16
    density = torch.distributions.Normal(mu, sigma).log_prob(prev.float()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, density, rtol=1e-6, atol=1e-6)  # the fp32 draw's differs by about 5e-4
    _, rescored = ddim_step_with_logprob(s, output, t, sample, prev_sample=prev)
    assert torch.equal(rescored, log_prob)


# ---------------------------------------------------------------- sampling groups with the trajectory

@pytest.fixture(scope="module")
def tiny_sd(tiny_models):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd"])
    pipe.scheduler = scheduler()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _groups(pipe, prompts, group_size):
    from diffusion_align.training.sampling import group_conditioning
    return group_conditioning("sd", [pipe.tokenizer], [pipe.text_encoder], prompts, group_size, 32)


def test_eta_zero_sampling_is_the_pipeline(tiny_sd):
    from diffusion_align.training.sampling import sample_with_logprob
    prompts = ["a red circle", "a blue square"]
    cond, uncond = _groups(tiny_sd, prompts, group_size=2)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    trajectory = sample_with_logprob(tiny_sd.unet, DDIMPolicy(scheduler(steps=4), eta=0.0), cond, uncond, latents,
                                     steps=4, guidance=3.0)
    expected = tiny_sd([p for p in prompts for _ in range(2)], num_inference_steps=4, guidance_scale=3.0, eta=0.0,
                       latents=latents, output_type="latent", height=32, width=32).images
    torch.testing.assert_close(trajectory.latents[-1], expected, atol=1e-5, rtol=1e-5)
    assert len(trajectory.latents) == 5 and trajectory.log_probs is None


def test_rescoring_the_trajectory_gives_ratio_one(tiny_sd):
    cond, uncond = _groups(tiny_sd, ["a red circle", "a green triangle"], group_size=3)
    cases = [(step, rows) for step in range(4) for rows in (None, torch.tensor([4, 1]))]
    assert_rescoring_gives_ratio_one(tiny_sd.unet, DDIMPolicy(scheduler(steps=4), eta=1.0), cond, uncond, 4, 5.0, cases)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_unconditional_rows_are_the_pipelines(tiny_models, tmp_path, force_zeros):
    """SDXL guides against zero text embeddings where its model_index.json sets force_zeros_for_empty_prompt (true in
    SDXL base 1.0), else against the encoded "": the rows the rollout guides with are what encode_prompt gives."""
    import json
    import shutil

    from diffusers import StableDiffusionXLPipeline

    from diffusion_align.models.loading import load_components, pipeline_index
    from diffusion_align.training.sampling import group_conditioning, zeros_for_empty_prompt
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_models["sdxl"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": force_zeros}))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    _, negative, _, negative_pooled = pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True)
    parts = load_components(str(folder))
    zero = zeros_for_empty_prompt(parts.family, pipeline_index(str(folder)))
    assert zero == force_zeros
    _, uncond = group_conditioning("sdxl", parts.tokenizers, parts.text_encoders, ["a red circle"], 2, 32, zero)
    torch.testing.assert_close(uncond.encoder_hidden_states, negative.expand(2, -1, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(uncond.added_cond_kwargs["text_embeds"], negative_pooled.expand(2, -1), atol=1e-6,
                               rtol=1e-6)
    if force_zeros:
        assert not uncond.encoder_hidden_states.any() and not uncond.added_cond_kwargs["text_embeds"].any()
    else:
        assert uncond.encoder_hidden_states.abs().amax() > 0.1
    assert uncond.added_cond_kwargs["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # sizes stay
    assert not zeros_for_empty_prompt("sd", {"force_zeros_for_empty_prompt": True})  # SD pipelines encode ""
