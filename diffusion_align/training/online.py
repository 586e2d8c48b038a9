"""The online loop, for Pref-GRPO and GRPO: the model samples, is rewarded, and updates on its own samples.

Each step, on each process:
  its prompts (one seeded order that all processes share; each process takes its own groups, never part of one)
  -> `group_size` images per prompt, keeping every step's log-probability: DDIM with eta > 0 for the UNet families
     (sampling.py), Flow-GRPO's SDE or CPS step for SD3 and FLUX (flow.py), at every step or in online.sde_window's
     steps alone (the ODE elsewhere); guided as the pipeline guides (SDXL: zero embeddings where
     force_zeros_for_empty_prompt; FLUX: no CFG, FLUX.1-dev's guidance input)
  -> rewards: the scorer's scores (grpo), or win rates inside the group from pairwise preferences (pref_grpo)
  -> advantages z-scored within each group, by its own std or all the step's (online.advantage_std; a group whose
     rewards all tie carries none and is left out)
  -> `updates_per_rollout` clipped policy updates, each over a part of the samples and a random ~60% of their
     denoising steps (never the last; one draw per update, or per sample with online.per_sample_timesteps; with
     online.sde_window, each sampling call's window),
     micro-batched exactly as sampled so the first update's ratio is 1.
Set-up, checkpoints and exact resume, metrics and the saved model are shared with the offline loop (run.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import diffusers
import torch

from ..config import Config, ConfigError, OnlineConfig
from ..devices import reward_dtype
from ..evaluation.generate import read_prompts
from ..files import write_image_atomic
from ..models.loading import pipeline_index, vae_downsampling
from ..objectives import (bradley_terry_preferences, clipped_policy_loss, gaussian_policy_kl, group_advantages,
                          pairwise_win_rates)
from ..progress import progress
from ..rewards import VLMJudge, judge_preferences, load_scorer, parse_scorer_spec
from .flow import FlowSDEPolicy
from .inputs import timestep_sampling_set
from .sampling import (DDIMPolicy, Trajectory, applies_cfg, decode_images, group_conditioning,
                       sample_with_logprob, step_distribution, zeros_for_empty_prompt)
from .checkpoints import save_checkpoint
from .outputs import MetricsLog
from .safety import SkippedUpdates
from .sharding import clip_gradients, gradient_sync
from .run import (TrainResult, apply_update, finish_run, log_step, model_family, resume_run, set_up_models,
                  start_run, tracker_hparams)

logger = logging.getLogger("diffusion_align")

GRID_PROMPTS, GRID_SEEDS = 4, 4


# metrics logged as their largest over a step's micro-batches, updates and processes, not their mean: the drift of
# the policy from the sampler (a mean of maxima understated it about 4x)
MAXIMA = ("log_ratio_abs_max",)


def check_online_config(cfg: Config) -> None:
    """Settings the online loop cannot run with, named before any model is loaded: all of them in one error, so that
    a config moved from an offline method is mended in one go."""
    o, t = cfg.online, cfg.train
    rows, split = o.prompts_per_step * o.group_size, t.batch_size * o.updates_per_rollout
    tracked = [parse_scorer_spec(spec)[0] for spec in o.track]
    problems = {
        f"method.name={cfg.method.name} samples its own images: set online.prompts to a prompt file (.txt one per "
        "line, .jsonl or .csv)": o.prompts is None,
        "method.beta, method.inversion_steps, method.label_smoothing and train.timestep_sampling are offline "
        "settings (train.logit_mean and logit_std too); online methods take online.clip_range and online.kl_beta, "
        "and train their trajectories' steps":
            cfg.method.beta is not None or cfg.method.inversion_steps is not None or bool(cfg.method.label_smoothing)
            or timestep_sampling_set(t),
        "data.cache and method.precomputed_reference are offline settings: online methods sample their own images "
        "and score them against the current reference": cfg.data.cache or cfg.method.precomputed_reference,
        "online.judge compares pairs: it is a pref_grpo setting (grpo rewards pointwise scores)":
            o.judge is not None and cfg.method.name != "pref_grpo",
        f"online.judge_answers must be two answers (first, second), got {o.judge_answers}": len(o.judge_answers) != 2,
        f"online.track={o.track}: each scorer is logged as tracked_<name>, so two of one name would be one metric; "
        "track one weights of each scorer": len(set(tracked)) != len(tracked),
        "model.compile=true is an offline setting: online methods sample with the uncompiled UNet and would train the "
        "compiled one, whose kernels differ, so the first update's ratio would not be 1 (online.clip_range="
        f"{o.clip_range}); set model.compile=false": cfg.model.compile,
        "train.grad_accum must be 1 for online methods: each update already accumulates over its micro-batches and "
        "trained timesteps (raise online.prompts_per_step for a larger update)": t.grad_accum != 1,
        "train.scale_lr is an offline setting (Diffusion-DPO's lr per pair): online methods take train.lr as it "
        "stands": t.scale_lr,
        "online.sample_steps must be >= 2 (the last step is never trained) and online.train_fraction in (0, 1]; got "
        f"{o.sample_steps} and {o.train_fraction}": o.sample_steps < 2 or not 0 < o.train_fraction <= 1,
        f"online.sde_window={o.sde_window} must fit in the first half of the online.sample_steps={o.sample_steps} "
        "(Flow-GRPO-Fast's window), where it is the steps trained; online.per_sample_timesteps draws other steps":
            o.sde_window > o.sample_steps // 2 or (o.sde_window > 0 and o.per_sample_timesteps),
        f"online.prompts_per_step x online.group_size = {rows} images per process must split into "
        f"online.updates_per_rollout = {o.updates_per_rollout} updates of whole micro-batches of train.batch_size = "
        f"{t.batch_size} images: make {rows} a multiple of {split}": rows % split != 0,
    }
    found = [problem for problem, applies in problems.items() if applies]
    if found:
        raise ConfigError(found[0] if len(found) == 1 else
                          f"{len(found)} settings to mend: " + "; ".join(f"({i}) {p}" for i, p in enumerate(found, 1)))


def step_prompts(prompts: list[str], seed: int, step: int, per_process: int, rank: int, world: int) -> list[str]:
    """The prompts process `rank` samples at `step` (1-based): passes through `prompts` in a seeded order, the
    step's prompts dealt out to the processes in turn. A function of the step alone, so a resumed run continues
    with the same prompts."""
    first = ((step - 1) * world + rank) * per_process
    orders = {}  # pass -> its order, drawn once
    chosen = []
    for index in range(first, first + per_process):
        epoch, position = divmod(index, len(prompts))
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))
        chosen.append(prompts[orders[epoch][position]])
    return chosen


def trained_steps(sample_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """A random `fraction` of the denoising steps (at least one), never the last: at the last step sigma is ~0 at
    eta = 1 and the log-probability is all noise."""
    count = trained_step_count(sample_steps, fraction)
    return sorted(torch.randperm(sample_steps - 1, generator=generator)[:count].tolist())


def trained_step_count(sample_steps: int, fraction: float) -> int:
    return min(sample_steps - 1, max(1, round(fraction * sample_steps)))


def backwards_per_update(o, batch_size: int) -> tuple[int, int]:
    """(micro-batches, backward passes) of one optimiser update: each micro-batch backpropagates once per trained
    step (the SDE window's, or `trained_steps`'), and the gradients add up until the update."""
    micro = o.prompts_per_step * o.group_size // batch_size // o.updates_per_rollout
    steps = o.sde_window or trained_step_count(o.sample_steps, o.train_fraction)
    return micro, micro * steps


def sde_window(sample_steps: int, size: int, generator: torch.Generator) -> range:
    """Flow-GRPO-Fast's window: `size` consecutive steps at a random place in the first half of the sampling steps,
    the only stochastic and trained ones of a rollout."""
    start = int(torch.randint(0, sample_steps // 2 - size + 1, (1,), generator=generator))
    return range(start, start + size)


def generator_seeds(seed: int, rank: int) -> tuple[int, int]:
    """Process `rank`'s seeds of its sampling noise and of its choices (steps, orders, windows, judge orders): odd
    and even multiples of 10,000 past train.seed, so no process's noise replays another's choices (on CPUs both are
    one kind of generator)."""
    return seed + 10_000 * (2 * rank + 1), seed + 20_000 * (rank + 1)


def latent_shape(parts, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of the denoiser's latents for square images of `resolution` pixels."""
    factor = vae_downsampling(parts.vae.config)
    channels = parts.family.input_shapes(parts.denoiser.config)[0]
    return channels, resolution // factor, resolution // factor


DEFAULT_CFG = 5.0  # online.guidance's null on the CFG families: DanceGRPO's SD setting


def online_guidance(o, parts) -> tuple[float, float | None]:
    """(the guidance the steps are sampled and re-scored with, FLUX.1-dev's guidance input or None): online.guidance,
    or where it is null the family's own: the input a guidance-distilled FLUX.1-dev trains with (3.5, as FluxPipeline
    samples), CFG 5 for the others."""
    guidance = o.guidance if o.guidance is not None else parts.guidance or DEFAULT_CFG
    return guidance, guidance if parts.guidance is not None else None


def rows_per_image(o, family) -> int:
    """Denoiser rows per image in the online loop's calls: 2 under classifier-free guidance (the unconditional and
    conditional rows in one call, `guided_output`), 1 without it (FLUX, or guidance <= 1)."""
    guidance = o.guidance if o.guidance is not None else DEFAULT_CFG
    return 2 if family.classifier_free_guidance and applies_cfg(guidance) else 1


def sampling_policy(cfg: Config, family):
    """The sampler the online methods train as a policy: DDIM at online.eta for the UNet families (on the pipeline's
    noise schedule, with what the pipeline sets on a DDIM config), Flow-GRPO's SDE or CPS step (online.sde_type) at
    online.noise_level on the flow families' scheduler."""
    o, load = cfg.online, dict(subfolder="scheduler", revision=cfg.model.revision)
    default = OnlineConfig()
    if family.denoiser == "unet":
        if o.sde_type != default.sde_type or o.noise_level != default.noise_level:
            raise ConfigError(f"online.sde_type={o.sde_type} and online.noise_level={o.noise_level}: the flow "
                              "families' step (SD3, FLUX); the UNet families sample with DDIM at online.eta")
        if not 0 < o.eta <= 1:  # above 1, DDIM's 1 - abar_prev - sigma^2 turns negative: NaN samples, all tied
            raise ConfigError(f"online.eta={o.eta}: the policy's DDIM steps have a log-probability only with eta > 0, "
                              "and a variance only with eta <= 1")
        scheduler = diffusers.DDIMScheduler.from_pretrained(cfg.model.pretrained, **load,
                                                             **family.pipeline_ddim_settings)
        return DDIMPolicy(scheduler, o.eta)
    if o.eta != default.eta:
        raise ConfigError(f"online.eta={o.eta} is DDIM's, for the UNet families; {family} samples with the flow SDE "
                          "at online.noise_level")
    if o.noise_level <= 0:
        raise ConfigError(f"online.noise_level={o.noise_level}: the flow SDE's steps have a log-probability only with "
                          "a noise level > 0 (Flow-GRPO: 0.7)")
    if o.sde_type == "cps" and o.noise_level > 1:
        raise ConfigError(f"online.noise_level={o.noise_level} with online.sde_type=cps: CPS's noise level is the "
                          "fraction of the noise drawn afresh at each step, in (0, 1] (Flow-GRPO-Fast: 0.8)")
    scheduler = family.training_scheduler_cls.from_pretrained(cfg.model.pretrained, **load)
    return FlowSDEPolicy(scheduler, o.noise_level, family.linspace_sigmas, o.sde_type, o.sde_kl)


def train_online(cfg: Config) -> TrainResult:
    """Run pref_grpo or grpo (see the module docstring) and save the final model."""
    check_online_config(cfg)
    o, t = cfg.online, cfg.train
    family, _ = model_family(cfg)
    sampler = sampling_policy(cfg, family)
    prompts = read_prompts(o.prompts)
    accelerator, output_dir = start_run(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    logger.info("method %s: %d prompts x %d images per process per step, %d processes, %d updates per step, lr %g",
                cfg.method.name, o.prompts_per_step, o.group_size, world, o.updates_per_rollout, t.lr)

    models = set_up_models(cfg, accelerator, needs_reference=o.kl_beta > 0, lr=t.lr)
    parts, policy, denoiser, optimizer = models.parts, models.policy, models.denoiser, models.optimizer
    scorer = load_scorer(*parse_scorer_spec(o.reward), device=device, dtype=reward_dtype(cfg))
    tracked = [load_scorer(*parse_scorer_spec(spec), device=device, dtype=reward_dtype(cfg)) for spec in o.track]
    judge = None
    if o.judge is not None:
        judge = VLMJudge(o.judge, device=device, dtype=models.frozen_dtype, answers=tuple(o.judge_answers))
    shape = latent_shape(parts, t.resolution)
    zero_uncond = zeros_for_empty_prompt(parts.family, pipeline_index(cfg.model.pretrained, cfg.model.revision))
    guidance, guidance_input = online_guidance(o, parts)

    # ---- randomness: noise on the device, choices on the CPU; both saved in checkpoints ----
    noise_seed, choice_seed = generator_seeds(t.seed, rank)
    noise_gen = torch.Generator(device).manual_seed(noise_seed)
    choice_gen = torch.Generator().manual_seed(choice_seed)
    start_step, saved = resume_run(cfg, accelerator, models, output_dir)
    if saved is not None:
        noise_gen.set_state(saved["noise_gen"])
        choice_gen.set_state(saved["choice_gen"])
    skipped_updates = SkippedUpdates(t.max_nonfinite_steps, saved)

    def draw_window() -> range | None:
        """The sampling call's stochastic steps: Flow-GRPO-Fast's window, or all (None) but perhaps the last."""
        if o.sde_window:
            return sde_window(o.sample_steps, o.sde_window, choice_gen)
        return range(o.sample_steps - 1) if o.deterministic_last_step else None

    def rollout(step_prompt_list: list[str]) -> tuple[list[Trajectory], list, list, list]:
        """Sample this step's groups, `train.batch_size` images at a time: trajectories, their conditioning, images,
        and each sampling call's stochastic steps (None: all): with online.sde_window, a window a call, as
        Flow-GRPO-Fast's pipeline calls draw theirs, or one a step (sde_window_per=step, or same_noise_per_group,
        whose groups take the steps before it once)."""
        cond, uncond = group_conditioning(parts.family, parts.tokenizers, parts.text_encoders, step_prompt_list,
                                          o.group_size, t.resolution, zero_uncond, guidance_input)
        window = draw_window()
        if o.same_noise_per_group:  # one initial noise per group, drawn before the step's sampling noise
            group_path = [torch.randn((len(step_prompt_list), *shape), generator=noise_gen, device=device)]
            if o.sde_window and window.start > 0:  # the steps before the window: a group's images take them
                group_path = shared_steps(group_path[0], cond, uncond, window, t.batch_size)  # alike, so once
        trajectories, conds, images, windows = [], [], [], []
        for start in range(0, len(step_prompt_list) * o.group_size, t.batch_size):
            rows = torch.arange(start, start + t.batch_size)
            if start > 0 and o.sde_window_per == "call" and not o.same_noise_per_group:
                window = draw_window()
            latents = ([x[rows // o.group_size] for x in group_path] if o.same_noise_per_group else
                       torch.randn((t.batch_size, *shape), generator=noise_gen, device=device))
            conds.append((cond.select(rows), None if uncond is None else uncond.select(rows)))
            with accelerator.autocast():  # as in training, so the re-scored steps match
                trajectory = sample_with_logprob(policy.denoiser, sampler, *conds[-1], latents, o.sample_steps,
                                                 guidance, generator=noise_gen, noisy_steps=window)
            trajectories.append(trajectory)
            windows.append(window)
            images += decode_images(parts.vae, trajectory.latents[-1])
        return trajectories, conds, images, windows

    def shared_steps(noise: torch.Tensor, cond, uncond, window: range, batch: int) -> list[torch.Tensor]:
        """x_T, ..., x_window.start of each group (a row of `noise` each): the deterministic steps before the window,
        which a group's images, starting from one noise, take alike; `batch` groups a call."""
        firsts = torch.arange(0, len(noise) * o.group_size, o.group_size)  # a row of each group
        paths = []
        for start in range(0, len(noise), batch):
            rows = firsts[start:start + batch]
            with accelerator.autocast():
                paths.append(sample_with_logprob(policy.denoiser, sampler, cond.select(rows),
                                                 None if uncond is None else uncond.select(rows),
                                                 noise[start:start + batch], o.sample_steps, guidance,
                                                 noisy_steps=window, until=window.start).latents)
        return [torch.cat(step) for step in zip(*paths)]

    def rewards_of(images: list, row_prompts: list[str], scores: torch.Tensor) -> torch.Tensor:
        if cfg.method.name == "grpo":
            return scores
        if judge is not None:
            pref = judge_preferences(judge, images, row_prompts, o.group_size, o.judge_order, choice_gen)
        else:
            pref = bradley_terry_preferences(scores.view(-1, o.group_size) * scorer.preference_scale,
                                             o.pref_temperature)
        return pairwise_win_rates(pref).flatten()

    def update(trajectories: list[Trajectory], conds: list, advantages: torch.Tensor, micro: list[int],
               steps: torch.Tensor, active: float) -> tuple[float, dict]:
        """One optimiser update over micro-batches `micro`; `steps` [rows, count]: the denoising steps each of their
        rows trains, micro-batch after micro-batch. `active`: this update's rows in groups that take part (not all
        tied), averaged over processes; the summed loss is divided by it and by count (DDP then averages over
        processes), so each taking part row weighs the same and tied groups' rows are left out of the mean."""
        sums, count = {}, steps.shape[1]
        for position, index in enumerate(micro):
            trajectory, (cond, uncond) = trajectories[index], conds[index]
            adv = advantages[index * t.batch_size:(index + 1) * t.batch_size].to(device)
            own = steps[position * t.batch_size:(position + 1) * t.batch_size]
            for k in range(count):
                # one step for the whole micro-batch (the sampling call's form), or one per row
                step_index = own[:, k] if o.per_sample_timesteps else int(own[0, k])
                last = position == len(micro) - 1 and k == count - 1  # all-reduce gradients once, at the end
                with gradient_sync(accelerator, denoiser, last):
                    with accelerator.autocast():
                        mean, std = step_distribution(denoiser, sampler, trajectory, step_index, cond, uncond,
                                                      guidance)
                        log_prob = sampler.log_prob(trajectory.latents_at(step_index + 1), mean, std)
                        old = trajectory.log_probs[step_index, torch.arange(t.batch_size)]
                        policy_loss, metrics = clipped_policy_loss(log_prob, old, adv, o.clip_range)
                        # mean x rows = the summed loss (tied groups' rows add 0), over the rows taking part
                        loss = policy_loss * t.batch_size / (active * count)
                        metrics["log_ratio_abs_max"] = (log_prob - old).abs().max().detach()
                        if o.kl_beta > 0:
                            with torch.no_grad(), policy.reference() as reference:
                                ref_mean, _ = step_distribution(reference, sampler, trajectory, step_index, cond,
                                                                uncond, guidance)
                            kl = gaussian_policy_kl(mean, ref_mean, sampler.kl_std(std, step_index))
                            loss = loss + o.kl_beta * kl.mean() / (len(micro) * count)
                            metrics["kl"] = kl.mean().detach()
                    accelerator.backward(loss)
                for name, value in {"policy_loss": policy_loss.detach(), **metrics}.items():
                    value = value.float()
                    sums[name] = torch.maximum(sums.get(name, value), value) if name in MAXIMA else \
                        sums.get(name, 0.0) + value / (len(micro) * count)
        grad_norm = clip_gradients(accelerator, policy.trainable_parameters(), t.max_grad_norm or float("inf"))
        return grad_norm, sums

    # ---- the loop ----
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", resume_step=start_step) if main else None
    if t.report_to != "none":
        accelerator.init_trackers("diffusion-align", config=tracker_hparams(cfg))
    with progress(total=t.max_steps, initial=start_step, disable=not main, desc=cfg.method.name) as bar:
        micro_per_update, _ = backwards_per_update(o, t.batch_size)
        record = {}
        for step in range(start_step + 1, t.max_steps + 1):
            started = time.perf_counter()
            step_prompt_list = step_prompts(prompts, t.seed, step, o.prompts_per_step, rank, world)
            row_prompts = [p for p in step_prompt_list for _ in range(o.group_size)]
            with torch.no_grad():
                trajectories, conds, images, windows = rollout(step_prompt_list)
                scores = scorer.score(images, row_prompts)
                rewards = rewards_of(images, row_prompts, scores)
                tracked_means = {f"tracked_{s.name}": s.score(images, row_prompts).mean() for s in tracked}
            # Flow-GRPO's global std: of every process's rewards this step (the same on all of them)
            shared_std = accelerator.gather(rewards.to(device)).float().std(correction=0) \
                if o.advantage_std == "global" else None
            advantages = group_advantages(rewards, o.group_size, clip=o.adv_clip, shared_std=shared_std)
            tied = (advantages.view(-1, o.group_size) == 0).all(dim=1)  # all-tie groups: left out of the updates
            if bool(tied.all()):
                logger.warning("step %d: every group's rewards tie, so this process learns nothing from its samples "
                               "(a reward that cannot tell them apart, or NaN images?)", step)
            # the rows of the other groups, those whose advantage is exactly 0 included (win rates [1, 0.5, 0])
            taking_part = (~tied).repeat_interleave(o.group_size)

            order = torch.randperm(len(trajectories), generator=choice_gen).tolist()
            grad_norms, ran = [], []  # each update that ran: its grad norm, its metrics
            for u in range(o.updates_per_rollout):
                micro = order[u * micro_per_update:(u + 1) * micro_per_update]
                rows = torch.cat([torch.arange(i * t.batch_size, (i + 1) * t.batch_size) for i in micro])
                if o.sde_window:  # each micro-batch trains its sampling call's window
                    steps = torch.tensor([list(windows[i]) for i in micro]).repeat_interleave(t.batch_size, dim=0)
                else:
                    draws = len(rows) if o.per_sample_timesteps else 1
                    steps = torch.tensor([trained_steps(o.sample_steps, o.train_fraction, choice_gen)
                                          for _ in range(draws)]).expand(len(rows), -1)
                active = accelerator.reduce(torch.tensor(float(taking_part[rows].sum()), device=device), "mean")
                if active.item() == 0:
                    continue  # only tied groups in this part, on every process: nothing to learn from it
                grad_norm, metrics = update(trajectories, conds, advantages, micro, steps, active.item())
                skipped_updates.after_update(apply_update(accelerator, models, grad_norm), grad_norm,
                                             f"step {step}, update {u + 1}", output_dir)
                optimizer.zero_grad(set_to_none=True)
                grad_norms.append(grad_norm)
                ran.append(metrics)
            step_lr = models.lr_scheduler.get_last_lr()[0]
            models.lr_scheduler.step()
            bar.update(1)

            if step % t.log_every == 0 or step == t.max_steps:
                # the step's spread and extremes over every process's samples (the same on each, so the mean over
                # processes that log_step takes leaves them as they are)
                every_reward, every_score = (accelerator.gather(v.to(device)).float() for v in (rewards, scores))
                # over the updates that ran (a part of only tied groups runs none); the drift's largest, not a mean
                per_update = {name: [m[name] for m in ran] for name in (ran[0] if ran else {})}
                means = {"reward_mean": rewards.mean(), "reward_std": every_reward.std(), "score_mean": scores.mean(),
                         "score_std": every_score.std(), "score_min": every_score.min(),
                         "score_max": every_score.max(), "advantage_abs_mean": advantages.abs().mean(),
                         **tracked_means, **{name: sum(v) / len(v) for name, v in per_update.items()
                                             if name not in MAXIMA}}
                record = log_step(accelerator, metrics_log, step, means,
                                  {"zero_std_groups": tied.sum(),
                                   "images_per_s": len(images) / (time.perf_counter() - started)},
                                  {"lr": step_lr, "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                                   "nonfinite_steps": skipped_updates.total}, models,
                                  maxima={name: max(v) for name, v in per_update.items() if name in MAXIMA})
                bar.set_postfix(score=f"{record['score_mean']:.4f}")
            if o.grid_every and step % o.grid_every == 0:  # every process samples (a sharded UNet's forward
                # gathers its weights from all), the main one writes
                save_progress_grid(policy.denoiser, sampler, parts, prompts[:GRID_PROMPTS], cfg, accelerator,
                                   output_dir / "grids" / f"step-{step:06d}.png", zero_uncond)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                state = {"noise_gen": noise_gen.get_state(), "choice_gen": choice_gen.get_state(),
                         **skipped_updates.state()}
                path = save_checkpoint(accelerator, output_dir, step, policy, optimizer, models.lr_scheduler, state,
                                       t.checkpoints_keep, models.ema)
                logger.info("saved %s", path)

    summary = {"method": cfg.method.name, "steps": t.max_steps, "processes": world,
               "prompts per process per step": o.prompts_per_step, "group size": o.group_size,
               "sampling steps": o.sample_steps,
               **({"eta": o.eta} if family.denoiser == "unet" else {"noise level": o.noise_level,
                                                                     "SDE type": o.sde_type}),
               "advantage std": o.advantage_std,
               "guidance": guidance, "clip range": o.clip_range,
               "same noise per group": o.same_noise_per_group, "per-sample timesteps": o.per_sample_timesteps,
               **({"SDE window": f"{o.sde_window} steps, placed per {o.sde_window_per}"} if o.sde_window else {}),
               **({"last step": "deterministic"} if o.deterministic_last_step else {}),
               "kl beta": o.kl_beta, "lr": t.lr, "resolution": t.resolution, "reward": o.reward,
               "judge": o.judge or "none", "prompts": len(prompts)}
    return finish_run(cfg, accelerator, models, output_dir, summary, record)


@torch.no_grad()
def save_progress_grid(denoiser, sampler, parts, prompts: list[str], cfg: Config, accelerator, path: Path,
                       zero_uncond: bool = False) -> Path:
    """`prompts` (rows) x GRID_SEEDS fixed seeds (columns), sampled deterministically (DDIM at eta 0, the flow ODE):
    the same noise at every step of training, so the grids show how the model changes. `zero_uncond`: as
    `group_conditioning`.
    Called by every process (a sharded UNet gathers its weights from all); the main process writes the grid."""
    from PIL import Image
    o, t = cfg.online, cfg.train
    guidance, guidance_input = online_guidance(o, parts)
    cond, uncond = group_conditioning(parts.family, parts.tokenizers, parts.text_encoders, prompts, GRID_SEEDS,
                                      t.resolution, zero_uncond, guidance_input)
    shape = latent_shape(parts, t.resolution)
    latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]
                         for _ in prompts for seed in range(GRID_SEEDS)]).to(accelerator.device)
    with accelerator.autocast():
        trajectory = sample_with_logprob(denoiser, sampler, cond, uncond, latents, o.sample_steps, guidance,
                                         noisy_steps=())
    images = decode_images(parts.vae, trajectory.latents[-1])
    if not accelerator.is_main_process:
        return path
    size = images[0].size
    grid = Image.new("RGB", (size[0] * GRID_SEEDS, size[1] * len(prompts)))
    for i, image in enumerate(images):
        grid.paste(image, ((i % GRID_SEEDS) * size[0], (i // GRID_SEEDS) * size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomic(grid, path)
    path.with_suffix(".txt").write_text("".join(p + "\n" for p in prompts))
    return path
