"""`train`: the one training loop for every offline preference method (the online ones: online.py).

pairs -> latents + conditioning (`inputs.py`, from the VAE and text encoders or a latent cache) -> per-sample
denoising errors (policy, and reference if the method needs it, or precomputed: `reference.py`)
-> the method's objective -> optimiser step -> metrics, checkpoints, final model.
Runs as is on a CPU, one GPU, or many processes under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from ..config import Config, ConfigError
from ..data.cache import CachedPairDataset, LatentCache, build_cache
from ..data.pairs import PairDataset, PairTransform, load_pairs, make_pair_loader
from ..progress import progress
from ..rewards.labeling import reward_scores
from .checkpoints import save_checkpoint
from .inputs import PairInputs, check_timestep_sampling, forward_process
from .inversion import invert_rows
from .likelihood import denoising_errors, epsilon_units, noise_rows
from .methods import METHODS, ONLINE_METHODS, Errors
from .online import train_online
from .outputs import MetricsLog
from .reference import check_precomputable, epochs_needed, precompute_reference, reference_key, reference_denoiser
from .run import (TrainResult, apply_update, finish_run, log_step, model_family, resume_run, set_up_models,
                  start_run, tracker_hparams)
from .safety import RunStopped, SkippedUpdates
from .sharding import clip_gradients, gradient_sync

logger = logging.getLogger("diffusion_align")


def train(cfg: Config) -> TrainResult:
    """Run the configured method and save the final model."""
    if cfg.method.name in ONLINE_METHODS:
        return train_online(cfg)
    method = METHODS[cfg.method.name]
    t = cfg.train
    accelerator, output_dir = start_run(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    world, effective_batch = accelerator.num_processes, accelerator.num_processes * t.batch_size * t.grad_accum
    family, _ = model_family(cfg)
    beta, warning = method.resolve_beta(cfg.method.beta, flow=family.denoiser == "transformer")
    if main and warning:
        logger.warning(warning)
    method_cfg = dataclasses.replace(cfg.method, beta=beta)
    if cfg.method.inversion_steps and not method.inversion:
        raise ConfigError(f"method.inversion_steps is an smpo setting; {method.name} noises with forward noise")
    if cfg.method.label_smoothing and method.objective is not METHODS["dpo"].objective:
        raise ConfigError(f"method.label_smoothing is a dpo and dcpo setting (conservative DPO); {method.name}'s "
                          "loss does not take it")
    if cfg.data.keep_ties and not method.soft_labels:
        raise ConfigError(f"data.keep_ties=true: {method.name} trains each pair as a preference for its winner, and a "
                          "tie has none (it would train as if the first image won); it is an smpo setting, whose "
                          "reward scores orient the pairs people tied")
    check_timestep_sampling(family, t)
    if method.inversion and cfg.method.inversion_steps is None and family.inversion_steps is None:
        raise ConfigError(f"smpo on {family}: SmPO publishes no inversion setting for flow-matching models; set "
                          "method.inversion_steps (SmPO inverts SD1.5 in 5 steps and SDXL in 10), or 0 for forward "
                          "noise")
    if cfg.method.precomputed_reference:
        check_precomputable(cfg, method)
    lr = t.lr * effective_batch if t.scale_lr else t.lr
    logger.info("method %s (beta %s), effective batch %d = %d processes x %d pairs x %d accumulation, lr %g",
                method.name, beta, effective_batch, world, t.batch_size, t.grad_accum, lr)

    # ---- data first: a wrong path fails before minutes of model loading ----
    extra_columns = method.extra_columns(cfg.method)
    with accelerator.main_process_first():  # the main process builds the datasets and score caches; others reuse them
        scores, orient_by = None, None
        if method.soft_labels:  # SmPO: human ties dropped, then pairs oriented by reward scores (computed once)
            orient_by = cfg.method.pref_column
            scores = reward_scores(cfg.data.path, orient_by, cfg.method.pref_scorer, output_dir / "soft-labels",
                                   cfg.data.split, cfg.data.streaming, num_workers=cfg.data.num_workers,
                                   keep_ties=cfg.data.keep_ties, max_pairs=cfg.data.max_pairs, seed=t.seed)
        pairs, stats = load_pairs(cfg.data.path, cfg.data.split, cfg.data.keep_ties, cfg.data.streaming,
                                  cfg.data.max_pairs, extra_columns, seed=t.seed, keep_unlabelled=False,
                                  orient_by=orient_by, scores=scores,
                                  source_rows=cfg.data.cache and not cfg.data.streaming)  # a stream: refused below
    if stats.pairs is None:  # a stream counts nothing before it is read
        logger.info("data %s: streamed; ties and rows Pick-a-Pic flags unlabelled are filtered out as it is read, "
                    "undecodable or unlabelled rows skipped and counted", cfg.data.path)
    else:
        logger.info("data %s: %s rows; dropped %s ties, %s without a usable label (null, NaN, or %s outside [0, 1]), "
                    "%s without a reward score; %s pairs", cfg.data.path, stats.rows, stats.ties_dropped,
                    stats.unlabelled, stats.out_of_range, stats.unscored, stats.pairs)
    if stats.pairs == 0:  # a stream (pairs None) is checked as it is read
        raise ValueError(f"{cfg.data.path}: no preference pair is left to train on: of {stats.rows} rows, "
                         f"{stats.ties_dropped} are ties (dropped; data.keep_ties=true keeps them), {stats.unlabelled} "
                         f"have no usable label (null, NaN, or outside [0, 1]) and {stats.unscored} no reward score")

    cache = latent_cache(cfg, accelerator, output_dir) if cfg.data.cache else None
    transform = PairTransform(t.resolution, cfg.data.center_crop, cfg.data.random_flip)
    items = pairs if cfg.data.streaming else (  # a stream is decoded as it is read (make_pair_loader)
        CachedPairDataset(pairs, cache, transform, t.seed, extra_columns) if cache is not None
        else PairDataset(pairs, transform, t.seed, extra_columns, stats.source_rows))
    # workers decode images; a cached item is a few tensor slices, cheaper in this process than sent from a worker
    # (two workers cost a tiny LoRA step 12 ms of its 80 on 2 cores: benchmarks/README.md)
    workers = 0 if cache is not None else cfg.data.num_workers

    def pair_inputs(parts, frozen_dtype) -> PairInputs:
        return PairInputs(parts.family, method, t.seed, cfg.data.prompt_dropout, t.resolution,
                          forward_process(parts.family, parts.noise_scheduler, t), device, parts.vae, parts.tokenizers,
                          parts.text_encoders, cache, text_dtype=frozen_dtype, latents=cfg.data.latents,
                          guidance=parts.guidance, vae_batch=cfg.data.vae_encode_batch_size)

    reference, precomputed = None, cfg.method.precomputed_reference

    def precompute(parts, frozen_dtype, denoiser_digest, fsdp2) -> None:
        nonlocal reference
        key = reference_key(cfg, method, pairs, len(pairs), epochs_needed(cfg, len(pairs), world),
                            None if cache is None else cache.key, denoiser_digest, fsdp2)
        folder = output_dir if cache is None else cache.folder

        def make_denoiser():
            if parts.denoiser.device.type == "meta":  # a sharded run's other process, which read no weights
                raise RuntimeError(f"process {accelerator.process_index} found no reference errors of this run in "
                                   f"{folder}, where the main process writes them: every process of a sharded run "
                                   "must see that folder (train.output_dir, or data.cache's)")
            return reference_denoiser(parts.denoiser, cfg.model.lora_rank is not None, device, frozen_dtype,
                                      fsdp2)
        with accelerator.main_process_first():  # the main process computes; the others load its file
            reference = precompute_reference(key, folder, items, pair_inputs(parts, frozen_dtype), make_denoiser,
                                             accelerator.autocast,
                                             cfg.method.reference_batch_size or 4 * t.batch_size, workers)

    models = set_up_models(cfg, accelerator, method.needs_reference and not precomputed, lr,
                           encoders=cache is None, before_policy=precompute if precomputed else None)
    parts, policy, denoiser, optimizer, lr_scheduler = (models.parts, models.policy, models.denoiser,
                                                        models.optimizer, models.lr_scheduler)
    # v-prediction errors are compared in epsilon units unless asked otherwise (see likelihood.py)
    convert_units = parts.prediction_type == "v_prediction" and cfg.method.v_prediction_errors == "epsilon"
    inversion_steps = 0
    if method.inversion:
        inversion_steps = (family.inversion_steps if cfg.method.inversion_steps is None
                           else cfg.method.inversion_steps)

    # randomness: each pair's draws are seeded by (seed, epoch, pair), so a resumed run needs only its place
    inputs = pair_inputs(parts, models.frozen_dtype)
    batches_drawn, skipped_rows = 0, 0
    start_step, saved = resume_run(cfg, accelerator, models, output_dir)
    if saved is not None:
        batches_drawn, skipped_rows = saved["batches_drawn"], saved["skipped_rows"]
        if saved.get("pairs", stats.pairs) != stats.pairs:  # (checkpoints before 2026-12-06 do not say)
            raise ValueError(f"train.resume: the checkpoint was trained on {saved['pairs']} pairs, but {cfg.data.path} "
                             f"now gives {stats.pairs}: its batches would be drawn in another order from where it "
                             "stopped, some pairs twice and others never. Restore the data it was trained on, or "
                             "start afresh (train.overwrite=true)")
    skipped_updates = SkippedUpdates(t.max_nonfinite_steps, saved)

    loader = iter(make_pair_loader(items, transform, t.batch_size, t.seed, accelerator.process_index, world,
                                   start_batch=batches_drawn, num_workers=workers, extra_columns=extra_columns,
                                   read_whole=cfg.data.max_pairs is not None))  # a stream's first N pairs

    # a whole pass of this process's batches without one decodable pair, or with more than max_skipped_share of its
    # rows undecodable: the data is broken, say so and stop
    pass_batches = None if stats.pairs is None else max(1, stats.pairs // (t.batch_size * world))
    last_skipped = ""

    def next_batch() -> dict:
        """The next batch with at least one decodable pair; undecodable rows are logged and counted."""
        nonlocal batches_drawn, skipped_rows, last_skipped
        empty = 0
        while True:
            batch = next(loader)
            batches_drawn += 1
            for _, why in batch["skipped"]:
                logger.warning("skipped %s", why)  # the message names the row
                last_skipped = why
            skipped_rows += len(batch["skipped"])
            empty = 0 if batch["prompts"] else empty + 1
            if pass_batches is not None and empty >= pass_batches:
                raise RunStopped(f"{cfg.data.path}: no pair of a whole pass over the data ({empty} batches, "
                                 f"{skipped_rows} rows skipped in all) could be decoded; the last: {last_skipped}. "
                                 "Check the image columns (jpg_0, jpg_1)")
            drawn = batches_drawn * t.batch_size  # every batch draws batch_size rows
            if pass_batches is not None and batches_drawn >= pass_batches and \
                    skipped_rows > cfg.data.max_skipped_share * drawn:
                raise RunStopped(f"{cfg.data.path}: {skipped_rows} of the {drawn} rows drawn "
                                 f"({skipped_rows / drawn:.0%}) could not be decoded, more than data.max_skipped_share="
                                 f"{cfg.data.max_skipped_share:g}; the last: {last_skipped}. Check the image columns "
                                 "(jpg_0, jpg_1)")
            if batch["prompts"]:
                return batch

    def batch_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        latents, cond, draws = inputs(batch)  # the VAE and text encoders run in their own dtypes, outside autocast
        if inversion_steps:  # the policy inverts without grad; calling it unwrapped skips DDP's bookkeeping
            noised = invert_rows(policy.denoiser, inputs.process, latents, draws.timesteps, cond, inversion_steps)
        else:
            noised = noise_rows(inputs.process, latents, draws)
        errors = Errors(denoising_errors(denoiser, noised, cond), pref_prob=method.pref_prob(batch, cfg.method),
                        num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps,
                        preference_units=epsilon_units(parts.noise_scheduler, noised.timesteps) if convert_units
                        else None)
        if reference is not None:
            errors.reference = reference.rows(batch["keys"]).to(device)
        elif method.needs_reference:
            with torch.no_grad(), policy.reference() as reference_denoiser:
                errors.reference = denoising_errors(reference_denoiser, noised, cond)
        return method.objective(errors, method_cfg)

    # ---- the loop ----
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", resume_step=start_step) if main else None
    if t.report_to != "none":
        accelerator.init_trackers("diffusion-align", config=tracker_hparams(cfg))
    with progress(total=t.max_steps, initial=start_step, disable=not main, desc="train") as bar:
        record, trainable = {}, policy.trainable_parameters()
        for step in range(start_step + 1, t.max_steps + 1):
            started, sums, pairs_seen = time.perf_counter(), {}, 0
            for micro in range(t.grad_accum):
                batch = next_batch()
                pairs_seen += len(batch["prompts"])
                sync = micro == t.grad_accum - 1  # all-reduce gradients once, on the last micro-step
                with gradient_sync(accelerator, denoiser, sync):
                    with accelerator.autocast():
                        loss, metrics = batch_loss(batch)
                    accelerator.backward(loss / t.grad_accum)
                for name, value in {"loss": loss.detach(), **metrics}.items():
                    sums[name] = sums.get(name, 0.0) + value.float() / t.grad_accum
            grad_norm = clip_gradients(accelerator, trainable, t.max_grad_norm or float("inf"))
            step_lr = lr_scheduler.get_last_lr()[0]  # the lr this step used
            skipped_updates.after_update(apply_update(accelerator, models, grad_norm), grad_norm, f"step {step}",
                                         output_dir)
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)

            if step % t.log_every == 0 or step == t.max_steps:
                record = log_step(accelerator, metrics_log, step, sums,
                                  {"pairs_per_s": pairs_seen / (time.perf_counter() - started),
                                   "skipped_rows": skipped_rows},
                                  {"lr": step_lr, "grad_norm": grad_norm, "nonfinite_steps": skipped_updates.total},
                                  models)
                bar.set_postfix(loss=f"{record['loss']:.4f}", **({"acc": f"{record['implicit_acc']:.2f}"}
                                                                     if "implicit_acc" in record else {}))
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                state = {"batches_drawn": batches_drawn, "skipped_rows": skipped_rows, "pairs": stats.pairs,
                         **skipped_updates.state()}
                path = save_checkpoint(accelerator, output_dir, step, policy, optimizer, lr_scheduler, state,
                                       t.checkpoints_keep, models.ema)
                logger.info("saved %s", path)

    if inputs.truncation.count:
        logger.warning("%d captions read in training were longer than the text encoder reads, and were cut",
                       inputs.truncation.count)
    summary = {"method": method.name, "beta": beta, "steps": t.max_steps, "effective batch": effective_batch,
               "lr": lr, "resolution": t.resolution,
               **({} if stats.pairs is None else {"pairs": stats.pairs, "ties dropped": stats.ties_dropped}),
               "skipped rows": skipped_rows, "captions cut at the text encoder's length": inputs.truncation.count}
    return finish_run(cfg, accelerator, models, output_dir, summary, record)


def latent_cache(cfg: Config, accelerator: Accelerator, output_dir: Path) -> LatentCache:
    """data.cache: the run's latent cache, made (or completed) first by the main process; a stale one is an error."""
    d = cfg.data
    if d.streaming or not d.center_crop:
        raise ConfigError("data.cache=true stores each image's centre crop by source row: it needs "
                          "data.streaming=false and data.center_crop=true")
    folder = Path(d.cache_dir) if d.cache_dir else output_dir / "latent-cache"
    if accelerator.is_main_process:
        logger.info("latent cache %s", make_latent_cache(cfg, folder, accelerator.device))
    accelerator.wait_for_everyone()
    return LatentCache(folder)


def make_latent_cache(cfg: Config, folder: Path, device):
    """Make (or complete) `cfg`'s latent cache in `folder` on `device` (None: CUDA where there is one), as a run
    does before it trains: a run of `cfg` then finds it made."""
    d, m = cfg.data, cfg.model
    return build_cache(d.path, folder, m.pretrained, d.split, m.revision, m.variant, m.vae, cfg.train.resolution,
                       flips=d.random_flip != "no", dtype=d.cache_dtype, batch_size=d.cache_batch_size, device=device,
                       num_workers=d.num_workers, max_sequence_length=m.max_sequence_length)
