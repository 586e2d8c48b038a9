"""The online loop (pref_grpo, grpo) on tiny models: its settings, prompt dealing and step choice, what the UNet and
the objective receive (ratio 1 on the first update, trained steps never the last, each row's own prompt), tied
groups left out, exact resume, and a run of both modes end to end."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffusion_align.config import ConfigError, load_config
from diffusion_align.evaluation.plots import read_metrics
from diffusion_align.models.conditioning import encode_prompts
from diffusion_align.models.loading import load_components
from diffusion_align.models.policy import LORA_WEIGHTS
from diffusion_align.training import online
from diffusion_align.training.trainer import train

PROMPTS = ["a red circle", "a green square", "a blue triangle", "a yellow star", "a purple moon"]
SMALL = ["online.group_size=4", "online.prompts_per_step=2", "online.sample_steps=4", "train.batch_size=2",
         "train.resolution=32", "train.report_to=none", "train.lr=1e-2", "train.max_steps=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    from diffusion_align.rewards.tiny import save_tiny_scorer
    root = tmp_path_factory.mktemp("online")
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    return {"model": tiny_models["sd"], "prompts": root / "prompts.txt",
            "scorer": save_tiny_scorer("pickscore", root / "pickscore", seed=0)}


def config(setup, out, *overrides, method="pref_grpo"):
    return load_config(None, [f"method.name={method}", f"model.pretrained={setup['model']}",
                              f"online.prompts={setup['prompts']}", f"online.reward=pickscore={setup['scorer']}",
                              f"train.output_dir={out}", *SMALL, *overrides])


@pytest.mark.parametrize("override, message", [
    ("online.prompts=null", "set online.prompts"),
    ("train.grad_accum=2", "train.grad_accum must be 1"),
    ("online.group_size=1", "'online.group_size' .* must be at least 2"),
    ("train.scale_lr=true", "train.scale_lr is an offline setting"),  # it was ignored
    ("online.sample_steps=1", "online.sample_steps must be >= 2"),
    ("train.batch_size=3", "8 images per process must split into"),
    ("online.updates_per_rollout=8", "a multiple of 16"),
    ("method.beta=5000", "offline settings"),
    ("method.label_smoothing=0.1", "offline settings"),
    ("train.timestep_sampling=uniform", "offline settings"),
    ("train.logit_mean=1", "offline settings"),
    ("data.cache=true", "offline settings"),
    ("method.precomputed_reference=true", "offline settings"),
    ("online.judge_answers=A,B,C", "must be two answers"),
    ("online.track=[pickscore=a,pickscore=b]", "two of one name would be one metric"),
    ("model.compile=true", "model.compile=true is an offline setting"),  # the rollout would not be compiled
    ("online.same_noise_per_group=maybe", "'online.same_noise_per_group' .* expects bool"),
    ("online.per_sample_timesteps=2", "'online.per_sample_timesteps' .* expects bool"),
])
def test_settings_it_cannot_run_with_are_named(setup, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        online.check_online_config(config(setup, tmp_path, override))


@pytest.mark.parametrize("override, message", [
    ("online.eta=0", "only with eta > 0"),
    ("online.eta=1.2", "a variance only with eta <= 1"),  # every sample NaN, every group tied: nothing trained
    ("online.noise_level=0.9", "the flow families' step"),  # ignored by DDIM
])
def test_the_unet_familys_sampler_settings(setup, tmp_path, override, message):
    from diffusion_align.models.families import get_family
    with pytest.raises(ConfigError, match=message):
        online.sampling_policy(config(setup, tmp_path, override), get_family("sd"))
    assert online.sampling_policy(config(setup, tmp_path, "online.eta=0.5"), get_family("sd")).eta == 0.5


def test_every_setting_to_mend_is_named_in_one_error(setup, tmp_path):
    """An offline config switched to an online method: all of what to mend at once, not one per attempt."""
    with pytest.raises(ConfigError) as info:
        online.check_online_config(config(setup, tmp_path, "online.prompts=null", "method.beta=5000",
                                          "train.grad_accum=2"))
    message = str(info.value)
    assert message.startswith("3 settings to mend: (1) method.name=pref_grpo samples its own images")
    assert "(2) method.beta, method.inversion_steps, method.label_smoothing and train.timestep_sampling are " \
        "offline" in message
    assert "(3) train.grad_accum" in message


def test_a_judge_is_a_pref_grpo_setting(setup, tmp_path):
    with pytest.raises(ConfigError, match="pref_grpo setting"):
        online.check_online_config(config(setup, tmp_path, "online.judge=x", method="grpo"))


def test_prompts_are_dealt_to_processes_in_whole_groups_and_passes():
    prompts = [f"p{i}" for i in range(10)]
    dealt = [online.step_prompts(prompts, 3, step, 3, rank, 2) for step in (1, 2, 3) for rank in (0, 1)]
    flat = [p for chunk in dealt for p in chunk]
    assert sorted(flat[:10]) == sorted(prompts) and sorted(flat[10:]) != flat[10:]  # a pass, then a new order
    assert not set(dealt[0]) & set(dealt[1])  # one step's processes sample different prompts
    assert online.step_prompts(prompts, 3, 2, 3, 1, 2) == dealt[3]  # a function of the step: resume-safe
    assert online.step_prompts(prompts, 4, 1, 3, 0, 2) != dealt[0]


def test_trained_steps_are_a_fraction_and_never_the_last():
    generator = torch.Generator().manual_seed(0)
    draws = [online.trained_steps(20, 0.6, generator) for _ in range(50)]
    assert all(len(d) == 12 and d == sorted(d) and max(d) <= 18 for d in draws)
    assert len({tuple(d) for d in draws}) > 40
    assert online.trained_steps(2, 0.6, generator) == [0] and len(online.trained_steps(20, 1.0, generator)) == 19


def test_the_objective_sees_ratio_one_first_and_each_row_its_own_prompt(setup, tmp_path, monkeypatch):
    seen, calls = [], []
    real_loss, real_step = online.clipped_policy_loss, online.step_distribution

    def recording_loss(log_prob, old_log_prob, advantages, clip_range):
        seen.append((log_prob - old_log_prob).detach().abs().max().item())
        return real_loss(log_prob, old_log_prob, advantages, clip_range)

    def recording_step(unet, sampler, trajectory, step, cond, uncond, guidance, rows=None):
        calls.append((step, len(trajectory.timesteps), cond.encoder_hidden_states.detach().clone(),
                      uncond.encoder_hidden_states.detach().clone()))
        return real_step(unet, sampler, trajectory, step, cond, uncond, guidance, rows)

    monkeypatch.setattr(online, "clipped_policy_loss", recording_loss)
    monkeypatch.setattr(online, "step_distribution", recording_step)
    cfg = config(setup, tmp_path / "run", "train.max_steps=1", "online.train_fraction=0.5")
    result = train(cfg)
    # 8 images = 4 micro-batches of 2, 2 updates of 2 micro-batches, 2 trained steps of 4 each
    assert len(seen) == len(calls) == 2 * 2 * 2
    assert max(seen[:4]) < 1e-5, "the first update re-scores the samples under the sampling policy"
    assert min(seen[4:]) > 1e-5, "the second update sees the policy the first one changed"
    assert all(step < total - 1 for step, total, _, _ in calls), "the last step is never trained"
    step_prompts = online.step_prompts(PROMPTS, 0, 1, 2, 0, 1)
    loaded = load_components(str(setup["model"]))
    expected = encode_prompts("sd", loaded.tokenizers, loaded.text_encoders,
                              [*step_prompts, ""]).encoder_hidden_states
    prompts_seen = set()
    for _, _, cond, uncond in calls:
        assert torch.allclose(uncond, expected[2].expand_as(uncond), atol=1e-6)  # the empty prompt
        # a micro-batch of 2 lies inside one group of 4: both rows carry that group's prompt
        match = [[i for i in range(2) if torch.allclose(row, expected[i], atol=1e-6)] for row in cond]
        assert match[0] == match[1] and len(match[0]) == 1
        prompts_seen.add(match[0][0])
    assert prompts_seen == {0, 1}
    assert result.metrics["zero_std_groups"] == 0 and 0 < result.metrics["clip_fraction"] < 1


def test_every_row_of_a_group_that_takes_part_weighs_the_same(setup, tmp_path, monkeypatch):
    """Rewards [1, 0.5, 0] (Pref-GRPO win rates with a tie in the middle, here grpo scores) give advantages
    [1, 0, -1]: the middle row takes part, so the update's summed loss is divided by all 6 rows of the two groups
    (x the trained steps), not by the 4 with a non-zero advantage (which made the gradient x1.5)."""
    from accelerate import Accelerator
    real_scorer, real_loss, real_backward = online.load_scorer, online.clipped_policy_loss, Accelerator.backward
    policy_losses, losses = [], []

    def fixed_scorer(*args, **kwargs):
        scorer = real_scorer(*args, **kwargs)
        scorer.score = lambda images, prompts: torch.tensor([1.0, 0.5, 0.0] * (len(images) // 3))
        return scorer

    def recording_loss(*args):
        loss, metrics = real_loss(*args)
        policy_losses.append(loss.item())
        return loss, metrics

    def recording_backward(self, loss, **kwargs):
        losses.append(loss.item())
        return real_backward(self, loss, **kwargs)

    monkeypatch.setattr(online, "load_scorer", fixed_scorer)
    monkeypatch.setattr(online, "clipped_policy_loss", recording_loss)
    monkeypatch.setattr(Accelerator, "backward", recording_backward)
    train(config(setup, tmp_path, "online.group_size=3", "online.updates_per_rollout=1", "online.train_fraction=0.5",
                 "train.max_steps=1", method="grpo"))
    # one update: 3 micro-batches of 2 rows (advantages [1, 0], [-1, 1], [0, -1]) x 2 trained steps
    assert len(losses) == len(policy_losses) == 6 and max(abs(p) for p in policy_losses) > 0.4
    assert losses == pytest.approx([p * 2 / (6 * 2) for p in policy_losses], rel=1e-5, abs=1e-9)


def test_same_noise_per_group_and_per_sample_timesteps(setup, tmp_path, monkeypatch):
    """The authors' options: a group's images start from one noise (different across groups), and each image trains
    its own random train_fraction of the steps (never the last); the first update still sees ratio 1."""
    starts, calls = [], []
    real_sample, real_step = online.sample_with_logprob, online.step_distribution

    def recording_sample(unet, sampler, cond, uncond, latents, *args, **kwargs):
        starts.append(latents[0].clone())  # x_T: a group's images share their path's beginning
        return real_sample(unet, sampler, cond, uncond, latents, *args, **kwargs)

    def recording_step(unet, sampler, trajectory, step, *args, **kwargs):
        calls.append((id(trajectory), step))
        return real_step(unet, sampler, trajectory, step, *args, **kwargs)

    monkeypatch.setattr(online, "sample_with_logprob", recording_sample)
    monkeypatch.setattr(online, "step_distribution", recording_step)
    result = train(config(setup, tmp_path, "online.same_noise_per_group=true", "online.per_sample_timesteps=true",
                          "online.sample_steps=6", "online.train_fraction=0.5", "online.updates_per_rollout=1",
                          "train.max_steps=1"))
    latents = torch.cat(starts)  # 2 groups of 4 images, sampled 2 at a time
    assert all(torch.equal(latents[i], latents[i // 4 * 4]) for i in range(8))
    assert not torch.equal(latents[0], latents[4])
    per_row = {}
    for trajectory, step in calls:  # a micro-batch of 2 rows, one step index each
        for row, index in enumerate(step.tolist()):
            per_row.setdefault((trajectory, row), []).append(index)
    # each of the 8 images trains round(0.5 x 6) = 3 different steps of the 5 before the last, its own draw
    assert len(per_row) == 8 and all(len(set(v)) == len(v) == 3 and max(v) < 5 for v in per_row.values())
    assert len({tuple(sorted(v)) for v in per_row.values()}) > 1
    assert any(len(set(step.tolist())) > 1 for _, step in calls)  # rows of one micro-batch at different steps
    assert result.metrics["log_ratio_abs_max"] < 1e-5


def test_a_positive_advantage_raises_the_log_probability_of_its_trajectory(tiny_models):
    from diffusers import DDIMScheduler
    from diffusion_align.models.policy import Policy
    from diffusion_align.objectives import clipped_policy_loss
    from diffusion_align.training.sampling import (DDIMPolicy, gaussian_log_prob, group_conditioning,
                                                   sample_with_logprob)
    parts = load_components(str(tiny_models["sd"]))
    policy = Policy(parts.denoiser, lora_rank=4)
    sampler = DDIMPolicy(DDIMScheduler.from_pretrained(tiny_models["sd"], subfolder="scheduler"), eta=1.0)
    cond, uncond = group_conditioning("sd", parts.tokenizers, parts.text_encoders, ["a red circle"], 2, 32)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    trajectory = sample_with_logprob(policy.denoiser, sampler, cond, uncond, latents, 4, 5.0,
                                     generator=torch.Generator().manual_seed(1))
    advantages = torch.tensor([1.0, -1.0])
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)

    def log_probs(step=1):
        mean, std = online.step_distribution(policy.denoiser, sampler, trajectory, step, cond, uncond, 5.0)
        return gaussian_log_prob(trajectory.latents[step + 1], mean, std)

    loss, _ = clipped_policy_loss(log_probs(), trajectory.log_probs[1], advantages, clip_range=1.0)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        change = log_probs() - trajectory.log_probs[1]
    assert change[0] > 1e-6 and change[1] < -1e-6


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_ddim_policy_steps_as_the_pipeline_does(setup, tmp_path, tiny_models, family):
    """SD1.x's scheduler configs are PNDM's, without clip_sample (DDIMScheduler's default clips x0 at +-1), and may
    carry an old steps_offset: StableDiffusionPipeline sets both when it builds, and so does the policy. The SDXL
    pipeline sets neither: the policy takes the config as it is."""
    from diffusers import DDIMScheduler, DiffusionPipeline
    model = tmp_path / "model"
    shutil.copytree(tiny_models[family], model)
    config_file = model / "scheduler" / "scheduler_config.json"
    settings = json.loads(config_file.read_text())
    settings.pop("clip_sample", None)
    config_file.write_text(json.dumps({**settings, "steps_offset": 0}))
    pipe = DiffusionPipeline.from_pretrained(model, scheduler=DDIMScheduler.from_pretrained(model,
                                                                                             subfolder="scheduler"))
    cfg = config(setup, tmp_path / "run", f"model.pretrained={model}")
    sampler = online.sampling_policy(cfg, online.model_family(cfg)[0])
    expected = (False, 1) if family == "sd" else (True, 0)
    assert (pipe.scheduler.config.clip_sample, pipe.scheduler.config.steps_offset) == expected
    assert (sampler.scheduler.config.clip_sample, sampler.scheduler.config.steps_offset) == expected


@pytest.mark.parametrize("reward_dtype, expected", [("fp32", torch.float32), ("frozen", torch.bfloat16)])
def test_the_scorers_score_in_online_reward_dtype(setup, tmp_path, monkeypatch, reward_dtype, expected):
    """A bf16 run's reward and tracked scorers load in fp32 (Flow-GRPO's) unless online.reward_dtype=frozen."""
    real, loaded = online.load_scorer, []

    def recording_load(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    class Loaded(Exception):
        pass

    def stop(*args, **kwargs):  # the scorers are loaded: no need to sample
        raise Loaded
    from diffusion_align.rewards.tiny import save_tiny_scorer
    hps = save_tiny_scorer("hpsv2", tmp_path / "hps")
    monkeypatch.setattr(online, "load_scorer", recording_load)
    monkeypatch.setattr(online, "latent_shape", stop)
    with pytest.raises(Loaded):
        train(config(setup, tmp_path / "run", "train.mixed_precision=bf16", f"online.reward_dtype={reward_dtype}",
                     f"online.track=[hpsv2={hps}]"))
    assert [(s.name, {p.dtype for p in s.model.parameters()}) for s in loaded] == [("pickscore", {expected}),
                                                                                   ("hpsv2", {expected})]


def test_groups_whose_rewards_all_tie_are_left_out(setup, tmp_path, monkeypatch, caplog):
    real = online.load_scorer

    def constant_scorer(*args, **kwargs):
        scorer = real(*args, **kwargs)
        scorer.score = lambda images, prompts: torch.zeros(len(images))
        return scorer

    monkeypatch.setattr(online, "load_scorer", constant_scorer)
    with caplog.at_level(logging.WARNING, logger="diffusion_align"):
        result = train(config(setup, tmp_path / "run", "train.max_steps=1", method="grpo"))
    assert "step 1: every group's rewards tie" in caplog.text
    assert result.metrics["zero_std_groups"] == 2 and result.metrics["advantage_abs_mean"] == 0
    lora = load_file(result.final_dir / LORA_WEIGHTS)
    assert all(torch.count_nonzero(v) == 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)


def test_metrics_are_of_the_updates_that_ran_and_the_drift_is_a_maximum(setup, tmp_path, monkeypatch):
    """Group 0 ties, group 1 does not; 2 updates of 4 rows, one per group: the tied one is skipped. The metrics were
    divided by both updates (ratio_mean 0.5 where every ratio is 1), and log_ratio_abs_max was a mean of maxima."""
    real_scorer, real_step, real_loss = online.load_scorer, online.step_distribution, online.clipped_policy_loss
    drifts, log_ratios = [], []

    def half_tied_scorer(*args, **kwargs):
        scorer = real_scorer(*args, **kwargs)
        scorer.score = lambda images, prompts: torch.tensor([0.0] * 4 + [1.0, 0.5, 0.0, 0.25])
        return scorer

    def drifting_step(*args):  # the policy's mean moved by a known amount at one step of one micro-batch
        mean, std = real_step(*args)
        drifts.append(len(drifts) == 1)
        return mean + 0.1 * std * drifts[-1], std

    def recording_loss(log_prob, old, *args):
        log_ratios.append((log_prob - old).abs().max().item())
        return real_loss(log_prob, old, *args)

    monkeypatch.setattr(online, "load_scorer", half_tied_scorer)
    monkeypatch.setattr(online, "step_distribution", drifting_step)
    monkeypatch.setattr(online, "clipped_policy_loss", recording_loss)
    result = train(config(setup, tmp_path, "train.batch_size=4", "online.updates_per_rollout=2", "train.max_steps=1",
                          "online.train_fraction=0.5", method="grpo"))
    assert result.metrics["zero_std_groups"] == 1 and len(drifts) == 2  # 1 update x 1 micro-batch x 2 steps
    # the largest |log ratio| of the step, the drifted step's (the other's is 0): not their mean
    assert log_ratios[0] == 0 and log_ratios[1] > 0
    assert result.metrics["log_ratio_abs_max"] == pytest.approx(log_ratios[1], rel=1e-6)
    assert result.metrics["ratio_mean"] > 0.9  # of the update that ran, not halved by the one skipped


def test_resume_reaches_the_uninterrupted_weights(setup, tmp_path):
    common = ("train.max_steps=3", "train.checkpoint_every=2", "online.kl_beta=0.1")
    whole = train(config(setup, tmp_path / "whole", *common))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "whole/checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = train(config(setup, resumed_dir, *common, "train.resume=latest"))
    a, b = load_file(whole.final_dir / LORA_WEIGHTS), load_file(resumed.final_dir / LORA_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scores = [[r["score_mean"] for r in read_metrics(d / "metrics.jsonl")] for d in (resumed_dir, tmp_path / "whole")]
    assert scores[0] == scores[1][2:]  # step 3 sampled the same images as in the uninterrupted run


@pytest.mark.parametrize("method", ["pref_grpo", "grpo"])
def test_both_modes_end_to_end(setup, tmp_path, method):
    from diffusers import StableDiffusionPipeline
    result = train(config(setup, tmp_path, "online.grid_every=2", method=method))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("score_mean", "score_std", "reward_std", "advantage_abs_mean", "ratio_mean", "clip_fraction",
                "approx_kl", "grad_norm", "zero_std_groups", "images_per_s", "log_ratio_abs_max"):
        assert key in records[-1], key
    if method == "pref_grpo":  # win rates: the group mean is 0.5 by construction
        assert abs(records[-1]["reward_mean"] - 0.5) < 1e-6
    else:
        assert records[-1]["reward_mean"] == records[-1]["score_mean"]
    assert (tmp_path / "grids/step-000002.png").is_file() and (tmp_path / "training_curves.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(setup["model"])
    pipe.load_lora_weights(result.final_dir)  # the saved LoRA is what diffusers loads


def test_pref_grpo_with_a_vlm_judge(setup, tmp_path, monkeypatch):
    from diffusion_align.models.tiny import save_tiny_captioner
    judge = save_tiny_captioner(tmp_path / "judge", "llava", seed=0)  # a chat VLM of a real class
    calls, real = [], online.judge_preferences

    def spy(judge, images, prompts, group_size, order, generator):
        calls.append((type(judge).__name__, len(images), group_size, order))
        return real(judge, images, prompts, group_size, order, generator)

    monkeypatch.setattr(online, "judge_preferences", spy)
    result = train(config(setup, tmp_path / "run", "train.max_steps=1", f"online.judge={judge}",
                          "online.judge_answers=sun,sky", "online.judge_order=both"))
    record = read_metrics(tmp_path / "run/metrics.jsonl")[-1]
    assert calls == [("VLMJudge", 8, 4, "both")]  # the step's two groups of four, judged in both orders
    assert abs(record["reward_mean"] - 0.5) < 1e-6 and record["reward_std"] > 0  # win rates from the judge
    assert result.final_dir.is_dir()


def test_a_full_fine_tune_with_a_kl_to_its_frozen_copy(setup, tmp_path, monkeypatch):
    from diffusion_align.models.policy import Policy
    references = []
    real = Policy.reference

    def spy(self):
        references.append(self.ref_denoiser is not None and self.ref_denoiser is not self.denoiser)
        return real(self)

    monkeypatch.setattr(Policy, "reference", spy)
    result = train(config(setup, tmp_path, "model.lora_rank=null", "online.kl_beta=0.5", "train.max_steps=1",
                          "train.lr=1e-4", method="grpo"))
    assert references and all(references)  # the KL is taken against the frozen copy made before training
    assert (result.final_dir / "unet" / "config.json").is_file() and result.metrics["kl"] >= 0


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_the_other_families_sample_and_train(setup, tmp_path, tiny_models, family):
    """SD2 (v-prediction) and SDXL (two encoders, size conditioning): one update, which sees ratio 1."""
    result = train(config(setup, tmp_path, f"model.pretrained={tiny_models[family]}", "train.max_steps=1",
                          "online.updates_per_rollout=1", "online.grid_every=1"))
    assert result.metrics["log_ratio_abs_max"] < 1e-5 and (tmp_path / "grids/step-000001.png").is_file()
