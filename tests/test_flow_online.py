"""The online methods on the flow-matching transformers (SD3, FLUX.1-dev): the sampler as a policy against the
pipelines (at noise level 0 it is StableDiffusion3Pipeline / FluxPipeline: their sigmas, shift, guidance and
conditioning), re-scoring a stored trajectory, and the online loop end to end, with what the transformer received."""

import math

import pytest
import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from diffusion_align.config import ConfigError, load_config
from diffusion_align.models.families import get_family
from diffusion_align.models.families.flux import pack_latents, unpack_latents
from diffusion_align.models.loading import load_components
from diffusion_align.training import online
from diffusion_align.training.flow import FlowSDEPolicy
from diffusion_align.training.sampling import group_conditioning, guided_output, sample_with_logprob
from diffusion_align.training.trainer import train
from rescoring import assert_rescoring_gives_ratio_one

PROMPTS = ["a red circle", "a blue square"]


def policy_and_groups(model, family, noise_level, group_size, guidance, sde_type="sde"):
    parts = load_components(str(model))
    fam = get_family(family)
    sampler = FlowSDEPolicy(parts.noise_scheduler.from_config(parts.noise_scheduler.config), noise_level,
                            fam.linspace_sigmas, sde_type)
    embedded = guidance if parts.guidance is not None else None
    cond, uncond = group_conditioning(family, parts.tokenizers, parts.text_encoders, PROMPTS, group_size, 32,
                                      guidance=embedded)
    return parts, sampler, cond, uncond


@pytest.mark.parametrize("family, guidance", [("sd3", 4.0), ("flux", 3.5)])
def test_noise_level_zero_is_the_pipeline(tiny_flow_models, family, guidance):
    """The ODE (noise level 0) through our sampler is the family's pipeline on the same initial noise: its step
    schedule (SD3's constant shift on the scheduler's spacing; FLUX's linspace sigmas shifted by mu from the token
    count), its guidance (SD3: CFG against the encoded ""; FLUX.1-dev: the guidance input, no CFG) and conditioning."""
    parts, sampler, cond, uncond = policy_and_groups(tiny_flow_models[family], family, 0.0, 2, guidance)
    assert (uncond is None) == (family == "flux")
    latents = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    trajectory = sample_with_logprob(parts.denoiser, sampler, cond, uncond, latents, steps=4, guidance=guidance)
    assert len(trajectory.latents) == 5 and trajectory.log_probs is None
    pipe = DiffusionPipeline.from_pretrained(tiny_flow_models[family])
    pipe.set_progress_bar_config(disable=True)
    packed = family == "flux"
    expected = pipe([p for p in PROMPTS for _ in range(2)], num_inference_steps=4, guidance_scale=guidance,
                    latents=pack_latents(latents) if packed else latents, output_type="latent", height=32,
                    width=32).images
    expected = unpack_latents(expected, 16, 16) if packed else expected
    torch.testing.assert_close(trajectory.latents[-1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trajectory.timesteps, pipe.scheduler.timesteps)


def test_guidance_one_is_the_conditional_call_alone(tiny_flow_models, monkeypatch):
    """At guidance <= 1 StableDiffusion3Pipeline skips classifier-free guidance, and so does the sampler (Flow-GRPO-
    Fast's no-CFG recipes): each transformer call has the images' rows alone, and the ODE ends where the pipeline's
    does."""
    rows, real_forward = [], SD3Transformer2DModel.forward

    def counting(self, hidden_states, *args, **kwargs):
        rows.append(len(hidden_states))
        return real_forward(self, hidden_states, *args, **kwargs)
    parts, sampler, cond, uncond = policy_and_groups(tiny_flow_models["sd3"], "sd3", 0.0, 2, 1.0)
    latents = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(SD3Transformer2DModel, "forward", counting)
    trajectory = sample_with_logprob(parts.denoiser, sampler, cond, uncond, latents, steps=3, guidance=1.0)
    assert rows == [4, 4, 4]
    sample_with_logprob(parts.denoiser, sampler, cond, uncond, latents, steps=3, guidance=1.5)
    assert rows[3:] == [8, 8, 8]  # CFG: the unconditional rows too
    monkeypatch.undo()
    pipe = DiffusionPipeline.from_pretrained(tiny_flow_models["sd3"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe([p for p in PROMPTS for _ in range(2)], num_inference_steps=3, guidance_scale=1.0,
                    latents=latents, output_type="latent", height=32, width=32).images
    torch.testing.assert_close(trajectory.latents[-1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, sde_type", [("sd3", "sde"), ("flux", "sde"), ("sd3", "cps")])
def test_rescoring_a_flow_trajectory_gives_ratio_one(tiny_flow_models, family, sde_type):
    parts, sampler, cond, uncond = policy_and_groups(tiny_flow_models[family], family, 0.7, 3, 3.5, sde_type)
    cases = [(0, torch.tensor([4, 1])), (2, torch.tensor([4, 1])), (torch.tensor([1, 3]), torch.tensor([4, 1]))]
    assert_rescoring_gives_ratio_one(parts.denoiser, sampler, cond, uncond, 16, 3.5, cases)  # one step, or one per row


def test_the_first_step_from_pure_noise_by_hand():
    """From s = 1 Flow-GRPO's sigma_t takes the next sigma s1 in its denominator, so the step's std is a sqrt((1 - s1)
    / (1 - s1)) = a exactly, and its mean x (1 - a^2 / 2) + v (s1 - 1) (the sqrt(s / (1 - s)) term at s = 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sampler = FlowSDEPolicy(FlowMatchEulerDiscreteScheduler(shift=3.0), noise_level=0.7)
    sampler.set_steps(4, (16, 8, 8))
    s1 = float(sampler.sigmas[1])
    assert sampler.sigmas[0] == 1 and 0 < s1 < 1 and sampler.sigmas[-1] == 0
    x, v = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    mean, std = sampler.transition(v, 0, x)
    torch.testing.assert_close(std, torch.tensor(0.7))
    torch.testing.assert_close(mean, x * (1 - 0.49 / 2) + v * (s1 - 1))


@pytest.fixture(scope="module")
def online_setup(tmp_path_factory):
    from diffusion_align.rewards.tiny import save_tiny_scorer
    root = tmp_path_factory.mktemp("flow-online")
    (root / "prompts.txt").write_text("a red circle\na green square\na blue triangle\n")
    return root / "prompts.txt", save_tiny_scorer("pickscore", root / "pickscore", seed=0)


def online_config(tiny_flow_models, online_setup, family, out, *overrides, method="pref_grpo"):
    prompts, scorer = online_setup
    return load_config(None, [f"method.name={method}", f"model.pretrained={tiny_flow_models[family]}",
                              f"online.prompts={prompts}", f"online.reward=pickscore={scorer}",
                              f"train.output_dir={out}", "online.group_size=4", "online.prompts_per_step=1",
                              "online.sample_steps=4", "online.guidance=3.5", "train.batch_size=2",
                              "train.resolution=32", "train.report_to=none", "train.lr=1e-2", "train.max_steps=1",
                              *overrides])


@pytest.mark.parametrize("family, method", [("sd3", "pref_grpo"), ("sd3", "grpo"), ("flux", "grpo"),
                                            ("flux", "pref_grpo")])
def test_the_online_loop_trains_the_transformer(tiny_flow_models, online_setup, tmp_path, monkeypatch, family,
                                                method):
    """One rollout and one update (pref_grpo rewarding win rates, grpo the scores): it re-scores the samples at
    ratio 1, the trained steps are never the last, the transformer sees the pipeline's timesteps and guidance (SD3:
    CFG rows of the encoded ""; FLUX.1-dev: its guidance input 3.5 and no unconditional rows), and the LoRA changes
    the policy."""
    calls, real_step = [], online.step_distribution

    def recording_step(model, sampler, trajectory, step, cond, uncond, guidance, rows=None):
        calls.append({"step": step, "timesteps": trajectory.timesteps.clone(), "uncond": uncond,
                      "guidance": cond.guidance, "sigmas": sampler.sigmas.clone()})
        return real_step(model, sampler, trajectory, step, cond, uncond, guidance, rows)

    monkeypatch.setattr(online, "step_distribution", recording_step)
    result = train(online_config(tiny_flow_models, online_setup, family, tmp_path, "online.grid_every=1",
                                 "online.updates_per_rollout=1", method=method))
    assert result.metrics["log_ratio_abs_max"] < 1e-5
    if method == "pref_grpo":  # win rates inside the group of 4: their mean is 0.5 by construction
        assert result.metrics["reward_mean"] == pytest.approx(0.5, abs=1e-6) and result.metrics["reward_std"] > 0
    else:  # the scores themselves
        assert result.metrics["reward_mean"] == result.metrics["score_mean"] != 0.5
    assert calls and all(c["step"] < 3 for c in calls)  # 4 steps: the last (index 3) is never trained
    pipe = DiffusionPipeline.from_pretrained(tiny_flow_models[family])
    if family == "flux":  # FluxPipeline's schedule for 64 image tokens
        pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256))
        assert all(c["uncond"] is None and torch.equal(c["guidance"], torch.full((2,), 3.5)) for c in calls)
    else:
        pipe.scheduler.set_timesteps(4)
        parts = load_components(str(tiny_flow_models[family]))
        empty = online.group_conditioning(family, parts.tokenizers, parts.text_encoders, ["x"], 1, 32)[1]
        assert all(torch.allclose(c["uncond"].encoder_hidden_states,
                                  empty.encoder_hidden_states.expand_as(c["uncond"].encoder_hidden_states))
                   for c in calls)
    for c in calls:
        torch.testing.assert_close(c["timesteps"], pipe.scheduler.timesteps)
        torch.testing.assert_close(c["sigmas"], pipe.scheduler.sigmas)
    assert (tmp_path / "grids" / "step-000001.png").is_file()
    card = (result.final_dir / "README.md").read_text()
    assert "| noise level | 0.7 |" in card and "| eta |" not in card


@pytest.mark.parametrize("family, method, sde_kl", [("sd3", "grpo", "flow_grpo"), ("flux", "pref_grpo", "gaussian")])
def test_the_online_loop_with_a_kl_to_the_base_transformer(tiny_flow_models, online_setup, tmp_path, monkeypatch,
                                                           family, method, sde_kl):
    """online.kl_beta > 0 on a LoRA, one rollout and two updates: at each trained step the reference (adapters off,
    no gradients) gets exactly the transformer inputs the policy got and gives the base transformer's output; the
    KL logged is Flow-GRPO's, mean (mu - mu_ref)^2 / (2 sigma_t^2) with its std_dev_t sigma_t = a sqrt(s / (1 - s)),
    or with online.sde_kl=gaussian the Gaussians', over the step's std sigma_t sqrt(s - s'): 0 exactly at the first
    update (lora_B is 0), > 0 at the second."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    calls, real_step = [], online.step_distribution

    def recording_step(model, sampler, trajectory, step, *args):
        seen = []
        hook = model.register_forward_hook(lambda module, inputs, kwargs, output: seen.append(
            ({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}, output[0].detach().clone())),
            with_kwargs=True)
        try:
            mean, std = real_step(model, sampler, trajectory, step, *args)
        finally:
            hook.remove()
        (received, output), = seen  # one transformer call (SD3: its CFG rows batched)
        calls.append({"step": step, "received": received, "output": output, "mean": mean.detach(), "std": std,
                      "sigmas": sampler.sigmas.clone(), "grad": torch.is_grad_enabled(),
                      "adapters_off": {m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)}})
        return mean, std

    monkeypatch.setattr(online, "step_distribution", recording_step)
    result = train(online_config(tiny_flow_models, online_setup, family, tmp_path, "online.kl_beta=0.5",
                                 "online.updates_per_rollout=2", f"online.sde_kl={sde_kl}", method=method))
    policy, reference = calls[0::2], calls[1::2]
    assert len(calls) == 8  # 2 updates x 1 micro-batch x 2 trained steps (0.6 of 4), each policy then reference
    assert all(p["grad"] and p["adapters_off"] == {False} for p in policy)
    assert all(not r["grad"] and r["adapters_off"] == {True} for r in reference)
    base = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family].from_pretrained(
        tiny_flow_models[family], subfolder="transformer")
    kls = []
    for p, r in zip(policy, reference):
        assert r["step"] == p["step"] < 3 and p["received"].keys() == r["received"].keys()
        assert all(torch.equal(p["received"][k], r["received"][k]) for k in p["received"])
        with torch.no_grad():
            torch.testing.assert_close(r["output"], base(**r["received"], return_dict=False)[0], rtol=0, atol=1e-6)
        s, s_next = float(p["sigmas"][p["step"]]), float(p["sigmas"][p["step"] + 1])
        sigma_t = 0.7 * (s / (1 - (float(p["sigmas"][1]) if s == 1 else s))) ** 0.5
        torch.testing.assert_close(p["std"], torch.tensor(sigma_t * (s - s_next) ** 0.5))
        torch.testing.assert_close(r["std"], p["std"])
        kl_std = sigma_t if sde_kl == "flow_grpo" else sigma_t * (s - s_next) ** 0.5
        kls.append(float(((p["mean"] - r["mean"]) ** 2 / (2 * kl_std ** 2)).mean()))
    assert kls[:2] == [0.0, 0.0] and all(torch.equal(p["output"], r["output"]) for p, r in zip(policy[:2], reference))
    assert min(kls[2:]) > 0  # the first update moved the policy off the reference
    # the logged KL: the mean over each update's trained steps, then over the updates
    assert result.metrics["kl"] == pytest.approx(sum(kls) / 4, rel=1e-4)


@pytest.mark.parametrize("family, scale, guidance_input", [("sd3", 5.0, None), ("flux", 3.5, 3.5)])
def test_online_guidance_left_null_is_the_familys(tiny_flow_models, online_setup, tmp_path, monkeypatch, family,
                                                  scale, guidance_input):
    """online.guidance=null: SD3 samples and re-scores with CFG 5; FLUX.1-dev with its guidance input 3.5 (what
    FluxPipeline samples with and the offline methods train with), not a CFG scale fed to the embedding."""
    seen, real_sample = [], online.sample_with_logprob

    def recording_sample(model, sampler, cond, uncond, latents, steps, guidance, **kwargs):
        seen.append((guidance, cond.guidance))
        return real_sample(model, sampler, cond, uncond, latents, steps, guidance, **kwargs)
    monkeypatch.setattr(online, "sample_with_logprob", recording_sample)
    result = train(online_config(tiny_flow_models, online_setup, family, tmp_path, "online.guidance=null"))
    assert seen and all(g == scale for g, _ in seen)
    assert all((embedded is None) if guidance_input is None else torch.equal(embedded, torch.full((2,), 3.5))
               for _, embedded in seen)
    assert (result.final_dir / "README.md").read_text().count(f"| guidance | {scale} |") == 1


def test_a_flow_run_needs_a_noise_level(tiny_flow_models, online_setup, tmp_path):
    with pytest.raises(ConfigError, match="online.noise_level=0.0: the flow SDE's steps have a log-probability"):
        train(online_config(tiny_flow_models, online_setup, "sd3", tmp_path, "online.noise_level=0"))


def test_the_sde_window_lies_in_the_first_half_and_covers_it():
    generator = torch.Generator().manual_seed(0)
    windows = {tuple(online.sde_window(10, 2, generator)) for _ in range(200)}
    assert windows == {(0, 1), (1, 2), (2, 3), (3, 4)}  # 10 steps: the first half is steps 0-4
    assert {tuple(online.sde_window(4, 2, generator)) for _ in range(20)} == {(0, 1)}


def test_a_window_samples_the_ode_outside_it(tiny_flow_models):
    """Steps outside the window are the ODE's, bit for bit, with no log-probability (NaN); inside, the SDE's."""
    parts, sampler, cond, uncond = policy_and_groups(tiny_flow_models["sd3"], "sd3", 0.7, 1, 3.5)
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    ode = sample_with_logprob(parts.denoiser, sampler, cond, uncond, latents, 4, 3.5, noisy_steps=())
    windowed = sample_with_logprob(parts.denoiser, sampler, cond, uncond, latents, 4, 3.5,
                                   generator=torch.Generator().manual_seed(1), noisy_steps=range(1, 2))
    assert ode.log_probs is None
    assert torch.equal(windowed.latents[1], ode.latents[1]) and not torch.equal(windowed.latents[2], ode.latents[2])
    assert windowed.log_probs[[0, 2, 3]].isnan().all() and torch.isfinite(windowed.log_probs[1]).all()


def test_a_path_taken_before_the_window_continues_as_if_sampled_whole(tiny_flow_models):
    """A window's deterministic steps taken first (`until`) and continued later give the trajectory sampled in one
    go, bit for bit; taken for one row and repeated for a group of images starting from its noise, they give what
    the group's rows take each; a continued path whose steps were drawn is refused."""
    parts, sampler, cond, uncond = policy_and_groups(tiny_flow_models["sd3"], "sd3", 0.7, 2, 3.5)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)).repeat(4, 1, 1, 1)
    window = range(2, 3)

    def sampled(latents, rows=slice(None)):
        picked = [c.select(torch.arange(4)[rows]) for c in (cond, uncond)]
        return sample_with_logprob(parts.denoiser, sampler, *picked, latents, 6, 3.5,
                                   generator=torch.Generator().manual_seed(1), noisy_steps=window)
    whole = sampled(noise)
    begun = sample_with_logprob(parts.denoiser, sampler, cond, uncond, noise, 6, 3.5, noisy_steps=window, until=2)
    assert len(begun.latents) == 3 and begun.log_probs is None
    continued = sampled(begun.latents)
    assert all(torch.equal(a, b) for a, b in zip(continued.latents, whole.latents))
    assert torch.equal(continued.log_probs.nan_to_num(), whole.log_probs.nan_to_num())
    assert continued.log_probs[[0, 1, 3, 4, 5]].isnan().all() and torch.isfinite(continued.log_probs[2]).all()
    one = sample_with_logprob(parts.denoiser, sampler, cond.select(torch.tensor([0])), uncond.select(torch.tensor([0])),
                              noise[:1], 6, 3.5, noisy_steps=window, until=2)
    shared = sampled([x.expand(2, -1, -1, -1) for x in one.latents], rows=slice(0, 2))  # prompt 1's two images
    for a, b in zip(shared.latents, whole.latents):
        torch.testing.assert_close(a, b[:2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="continue only where they are deterministic"):
        sample_with_logprob(parts.denoiser, sampler, cond, uncond, begun.latents, 6, 3.5, noisy_steps=range(1, 2))


def test_a_group_takes_the_steps_before_its_window_once(tiny_flow_models, online_setup, tmp_path, monkeypatch):
    """With one initial noise per group, the deterministic steps before the window are the same path for all of a
    group's images: the transformer takes them for one row per group, the window and after for every image, and the
    stored trajectories still re-score at ratio 1."""
    rows_per_call, real_forward = [], SD3Transformer2DModel.forward

    def counting(self, hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():  # the rollout's calls, CFG's two halves in one
            rows_per_call.append(len(hidden_states) // 2)
        return real_forward(self, hidden_states, *args, **kwargs)
    monkeypatch.setattr(SD3Transformer2DModel, "forward", counting)
    monkeypatch.setattr(online, "sde_window", lambda steps, size, generator: range(2, 3))
    result = train(online_config(tiny_flow_models, online_setup, "sd3", tmp_path, "online.sde_window=1",
                                 "online.same_noise_per_group=true", "online.sample_steps=6", "train.batch_size=4",
                                 "online.prompts_per_step=2", "online.updates_per_rollout=1"))
    # 2 groups of 4 images, 4 a call: steps 0-1 for one row per group, steps 2-5 for each image (2 calls a step);
    # each image sampled whole would be 6 steps of 2 calls of 4 rows
    assert rows_per_call == [2, 2] + [4] * 8
    assert result.metrics["log_ratio_abs_max"] < 1e-5


def test_the_online_loop_trains_the_window_alone(tiny_flow_models, online_setup, tmp_path, monkeypatch):
    """online.sde_window=1 of 4 steps: each sampling call's one stochastic step, in the first half, drawn for that
    call (as Flow-GRPO-Fast's pipeline calls draw theirs; one a step made every update's gradient one window's), is
    the step its micro-batch trains, at ratio 1; a window that does not fit the first half is refused."""
    trained, sampled, real_step, real_sample = [], [], online.step_distribution, online.sample_with_logprob
    drawn, real_window = [], online.sde_window

    def recording_window(*args):
        drawn.append(real_window(*args))
        return drawn[-1]

    def recording_sample(*args, noisy_steps=None, **kwargs):
        trajectory = real_sample(*args, noisy_steps=noisy_steps, **kwargs)
        sampled.append((trajectory, [int(s) for s in torch.isfinite(trajectory.log_probs).all(dim=1).nonzero()]))
        return trajectory

    def recording_step(model, sampler, trajectory, step, *args):
        trained.append((trajectory, step))
        return real_step(model, sampler, trajectory, step, *args)

    monkeypatch.setattr(online, "sample_with_logprob", recording_sample)
    monkeypatch.setattr(online, "step_distribution", recording_step)
    monkeypatch.setattr(online, "sde_window", recording_window)
    result = train(online_config(tiny_flow_models, online_setup, "sd3", tmp_path, "online.sde_window=1",
                                 "online.updates_per_rollout=1", "train.max_steps=4"))
    # 4 rollouts of 2 micro-batches, a window drawn for each, its one stochastic step in the first half
    windows = [steps for _, steps in sampled]
    assert windows == [list(w) for w in drawn] and len(windows) == 8 and {(0,), (1,)} == set(map(tuple, windows))
    assert any(windows[2 * step] != windows[2 * step + 1] for step in range(4))  # one step, two windows
    # each micro-batch trains its own sampling call's window, and every micro-batch is trained
    own = {id(trajectory): steps for trajectory, steps in sampled}
    assert all([step] == own[id(trajectory)] for trajectory, step in trained) and len(trained) == 8
    assert {id(trajectory) for trajectory, _ in trained} == set(own)
    sampled.clear()  # online.sde_window_per=step: one window for all of a step's calls (this loop's before)
    train(online_config(tiny_flow_models, online_setup, "sd3", tmp_path / "per-step", "online.sde_window=1",
                        "online.sde_window_per=step", "online.updates_per_rollout=1", "train.max_steps=2"))
    assert len(sampled) == 4 and sampled[0][1] == sampled[1][1] and sampled[2][1] == sampled[3][1]
    assert result.metrics["log_ratio_abs_max"] < 1e-5
    with pytest.raises(ConfigError, match="online.sde_window=3 must fit in the first half"):
        train(online_config(tiny_flow_models, online_setup, "sd3", tmp_path / "x", "online.sde_window=3"))


def test_a_deterministic_last_step_rewards_its_x0_estimate(tiny_flow_models, online_setup, tmp_path, monkeypatch):
    """online.deterministic_last_step (Pref-GRPO's FLUX code decodes the last step's x0 estimate, x - s v, which the
    ODE's last step to s' = 0 is): the last step of every rollout is that step, the others drawn, and the images
    rewarded are of those final latents."""
    sampled, decoded, real_sample, real_decode = [], [], online.sample_with_logprob, online.decode_images

    def recording_sample(model, sampler, cond, uncond, latents, steps, guidance, **kwargs):
        trajectory = real_sample(model, sampler, cond, uncond, latents, steps, guidance, **kwargs)
        last = trajectory.latents[-2]
        with torch.no_grad():
            velocity = guided_output(model, last, trajectory.timesteps[-1], cond, uncond, guidance)
        sampled.append((trajectory, last - sampler.sigmas[-2] * velocity.float()))
        return trajectory

    monkeypatch.setattr(online, "sample_with_logprob", recording_sample)
    monkeypatch.setattr(online, "decode_images", lambda vae, latents: decoded.append(latents) or real_decode(vae,
                                                                                                            latents))
    train(online_config(tiny_flow_models, online_setup, "flux", tmp_path, "online.deterministic_last_step=true"))
    assert len(sampled) == 2 and all(d is t.latents[-1] for d, (t, _) in zip(decoded, sampled))
    for trajectory, x0_estimate in sampled:
        assert torch.isnan(trajectory.log_probs[-1]).all() and torch.isfinite(trajectory.log_probs[:-1]).all()
        torch.testing.assert_close(trajectory.latents[-1], x0_estimate, atol=1e-5, rtol=1e-5)


def test_the_online_loop_samples_and_trains_cps_steps(tiny_flow_models, online_setup, tmp_path, monkeypatch):
    """online.sde_type=cps in a window of 1 of 4 steps (Flow-GRPO-Fast's sampler): the step trained is a CPS step
    (std s' sin(0.8 pi / 2) at its next sigma), its stored log-probability is Flow-GRPO's surrogate of the stored
    next latents, -(x' - mean)^2, re-scored at ratio 1; the model card names the step; a CPS noise level above 1
    is refused."""
    calls, real_step = [], online.step_distribution

    def recording_step(model, sampler, trajectory, step, *args):
        mean, std = real_step(model, sampler, trajectory, step, *args)
        calls.append((sampler.sigmas[step + 1].item(), std.item(), trajectory.latents_at(step + 1),
                      trajectory.log_probs[step], mean.detach()))
        return mean, std

    monkeypatch.setattr(online, "step_distribution", recording_step)
    result = train(online_config(tiny_flow_models, online_setup, "flux", tmp_path, "online.sde_type=cps",
                                 "online.noise_level=0.8", "online.sde_window=1", "online.updates_per_rollout=1",
                                 method="grpo"))
    assert len(calls) == 2 and result.metrics["log_ratio_abs_max"] < 1e-5
    for sigma_next, std, latents, stored, mean in calls:
        assert 0 < sigma_next < 1 and std == pytest.approx(sigma_next * math.sin(0.4 * math.pi), rel=1e-6)
        torch.testing.assert_close(stored, -((latents - mean) ** 2).mean(dim=(1, 2, 3)), atol=1e-6, rtol=1e-5)
        assert ((latents - mean) / std).std() == pytest.approx(1.0, abs=0.1)  # a fresh N(0, std^2) draw
    assert "| SDE type | cps |" in (result.final_dir / "README.md").read_text()
    with pytest.raises(ConfigError, match="noise level is the fraction of the noise drawn afresh"):
        train(online_config(tiny_flow_models, online_setup, "sd3", tmp_path / "a", "online.sde_type=cps",
                            "online.noise_level=1.5"))


def test_each_familys_sampler_settings_are_refused_on_the_other(tiny_models, tiny_flow_models, online_setup, tmp_path):
    with pytest.raises(ConfigError, match="online.sde_type=cps and online.noise_level=0.7: the flow families' step"):
        train(online_config(tiny_models, online_setup, "sd", tmp_path, "online.sde_type=cps"))
    with pytest.raises(ConfigError, match="online.eta=0.5 is DDIM's, for the UNet families"):  # ignored by the SDE
        train(online_config(tiny_flow_models, online_setup, "sd3", tmp_path / "flow", "online.eta=0.5"))


def test_the_review_tools_on_an_online_flux_lora(tiny_flow_models, online_setup, tmp_path):
    """What an online FLUX run wrote goes through the everyday tools: `generate` with the LoRA (the pipeline with
    `load_lora_weights`, not the base), `compare` of base and aligned folders with a scorer, the grid and the
    review page over both."""
    import numpy as np
    from PIL import Image

    from diffusion_align.evaluation.compare import compare_folders
    from diffusion_align.evaluation.generate import generate_images
    from diffusion_align.evaluation.grid import make_grid
    from diffusion_align.evaluation.review import write_review_page
    from diffusion_align.rewards import load_scorer
    result = train(online_config(tiny_flow_models, online_setup, "flux", tmp_path / "run", "train.lr=0.1"))
    prompts, scorer_dir = online_setup
    model, fast = tiny_flow_models["flux"], dict(steps=2, height=32, width=32)
    base = generate_images(model, prompts, "0,1", tmp_path / "base", **fast).out_dir
    aligned = generate_images(model, prompts, "0,1", tmp_path / "aligned", lora=str(result.final_dir), **fast).out_dir
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(result.final_dir)
    expected = pipe("a red circle", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    got = np.asarray(Image.open(aligned / "p0000-s0001.png"), dtype=np.float64)
    assert np.abs(got - np.round(expected * 255)).max() <= 1
    assert np.abs(got - np.asarray(Image.open(base / "p0000-s0001.png"), dtype=np.float64)).mean() > 1
    compared = compare_folders(base, aligned, load_scorer("pickscore", scorer_dir), tmp_path / "compare",
                               num_workers=0)
    assert len(compared.prompts) == 3 and all(c.pairs == 2 for c in compared.prompts)  # 3 prompts x 2 seeds
    assert len(make_grid([base, aligned], tmp_path / "grid.png").pages) == 1
    assert "p0002-s0001.png" in write_review_page([base, aligned], tmp_path / "review.html").read_text()
