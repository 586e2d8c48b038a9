"""The one training loop for every offline preference method.

pairs -> latents + conditioning (`inputs.py`, from the VAE and text encoders or a latent cache) -> per-sample
denoising errors (policy, and reference if the method needs it, or precomputed: `reference.py`)
-> the method's objective -> optimiser step -> metrics, checkpoints, final model.
Runs as is on a CPU, one GPU, or many processes under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import Config, ConfigError, config_to_dict, config_to_yaml
from ..data.cache import CachedPairDataset, LatentCache, build_cache
from ..data.pairs import PairDataset, PairTransform, load_pairs, make_pair_loader
from ..evaluation.plots import plot_run
from ..files import write_text_atomic
from ..models.kohya import kohya_labels
from ..models.loading import (DiffusionComponents, compile_unet, component_digest, load_components, place,
                              set_attention)
from ..models.policy import Policy
from ..rewards.labeling import reward_scores
from .checkpoints import load_checkpoint, resolve_resume, save_checkpoint
from .inputs import PairInputs
from .inversion import invert_rows
from .likelihood import denoising_errors, epsilon_units, noise_rows
from .methods import METHODS, ONLINE_METHODS, Errors
from .outputs import MetricsLog, save_final
from .reference import check_precomputable, epochs_needed, precompute_reference, reference_key, reference_unet
from .safety import RunStopped, SkippedUpdates, check_finite_weights, check_output_dir, clear_run

logger = logging.getLogger("diffusion_align")

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(cfg: Config) -> Accelerator:
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on this machine use bf16 or no")
    trackers = None if cfg.train.report_to == "none" else cfg.train.report_to
    if trackers == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to=wandb needs wandb (pip install diffusion-align[wandb]); "
                          "or use train.report_to=tensorboard")
    AcceleratorState._reset_state()  # a second train() in one process may use another precision
    # without cpu=True accelerate treats torchrun's CPU processes as independent single-process runs
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers,
                       project_dir=cfg.train.output_dir, cpu=on_cpu)


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=t.weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes (pip install diffusion-align[bnb])") from None
        adamw = bnb.optim.AdamW8bit
    else:
        adamw = torch.optim.AdamW
    return adamw(params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_eps)


def apply_update(accelerator: Accelerator, optimizer, grad_norm: float) -> bool:
    """Step the optimiser unless the gradient is not finite; whether the weights were updated.

    One NaN/inf batch must not poison the weights (the norm is all-reduced, so every process agrees). With fp16,
    accelerate's GradScaler makes that call itself (the unscaled norm is inf after an overflow) and says so in
    `optimizer_step_was_skipped`."""
    if accelerator.scaler is None and not math.isfinite(grad_norm):
        return False
    optimizer.step()
    return not accelerator.optimizer_step_was_skipped


@dataclasses.dataclass
class TrainResult:
    final_dir: Path                  # the saved model (LoRA weights or a full pipeline)
    unet: torch.nn.Module            # the trained UNet, in this process
    metrics: dict = dataclasses.field(default_factory=dict)  # the last logged step


@dataclasses.dataclass
class Models:
    """What a run trains and conditions with, on the device; `unet` is the policy UNet as accelerate prepared it
    (DDP-wrapped on many processes), `policy.unet` the same module unwrapped."""

    parts: DiffusionComponents
    policy: Policy
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    frozen_dtype: torch.dtype


def start_run(cfg: Config) -> tuple[Accelerator, Path]:
    """The accelerator and the output folder, checked (a run there is resumed or replaced only when asked), with the
    resolved config written into it."""
    output_dir = Path(cfg.train.output_dir)
    check_output_dir(cfg, resolve_resume(output_dir, cfg.train.resume))
    accelerator = make_accelerator(cfg)
    accelerator.wait_for_everyone()  # every process has checked the folder before the main process changes it
    if accelerator.is_main_process:
        if cfg.train.overwrite:
            clear_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "config.yaml", config_to_yaml(cfg))
    accelerator.wait_for_everyone()
    return accelerator, output_dir


def set_up_models(cfg: Config, accelerator: Accelerator, needs_reference: bool, lr: float,
                  encoders: bool = True, before_policy=None) -> Models:
    """Load the pipeline's parts (without the VAE and text encoders when `encoders` is False: a latent cache stands
    in), place the frozen ones in the half-precision dtype (an SDXL VAE that must stay fp32 says so), wrap the UNet
    as the policy and prepare it with its optimiser and lr schedule. `before_policy(parts, frozen_dtype, unet_digest)`
    runs on the untouched pretrained UNet first (precomputed reference errors)."""
    t = cfg.train
    parts = load_components(cfg.model.pretrained, cfg.model.revision, cfg.model.variant, cfg.model.vae, encoders)
    if cfg.model.prediction_type not in (None, parts.prediction_type):
        raise ConfigError(f"model.prediction_type={cfg.model.prediction_type}, but {cfg.model.pretrained}'s scheduler "
                          f"says {parts.prediction_type}; training against the wrong target ruins the model (set "
                          f"model.prediction_type=null to follow the checkpoint)")
    device, frozen_dtype = accelerator.device, DTYPES[t.mixed_precision]
    for module in parts.text_encoders:
        place(module, device, frozen_dtype)
    if parts.vae is not None:
        place(parts.vae, device, torch.float32 if parts.vae.config.get("force_upcast", False) else frozen_dtype)
    attention = set_attention(parts.unet, cfg.model.attention, device)
    if cfg.model.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    if cfg.model.channels_last:
        parts.unet.to(memory_format=torch.channels_last)
    # the base UNet's digest keys the precomputed reference errors and labels a kohya LoRA: hashed once (local
    # weights are read whole)
    unet_digest = (component_digest(cfg.model.pretrained, "unet", cfg.model.revision, cfg.model.variant)
                   if cfg.model.lora_rank is not None or before_policy is not None else None)
    if before_policy is not None:
        before_policy(parts, frozen_dtype, unet_digest)
    set_seed(t.seed)  # identical LoRA initialisation on every process, whatever ran before
    kohya = None if cfg.model.lora_rank is None else kohya_labels(
        parts.family, parts.prediction_type, Path(cfg.train.output_dir).name, cfg.method.name, unet_digest)
    policy = Policy(parts.unet, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_target_modules,
                    parts.family, needs_reference, cfg.model.ref_offload, device, frozen_dtype, kohya)
    optimizer = make_optimizer(cfg, policy.trainable_parameters(), lr)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                                 num_training_steps=t.max_steps)
    unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    if cfg.model.compile:  # the training forward only: the reference and inversion call policy.unet as it is
        unet = compile_unet(unet, device)
    logger.info("%s: %s, %s prediction, %s attention, %d trainable parameters", cfg.model.pretrained, parts.family,
                parts.prediction_type, attention, sum(p.numel() for p in policy.trainable_parameters()))
    return Models(parts, policy, unet, optimizer, lr_scheduler, frozen_dtype)


def resume_run(cfg: Config, accelerator: Accelerator, models: Models, output_dir: Path) -> tuple[int, dict | None]:
    """(step to continue after, this process's saved state) from train.resume; (0, None) for a fresh start."""
    checkpoint = resolve_resume(output_dir, cfg.train.resume)
    if checkpoint is None:
        if cfg.train.resume == "latest":
            logger.info("train.resume=latest: no checkpoint in %s yet, starting at step 0", output_dir)
        return 0, None
    step, saved = load_checkpoint(accelerator, checkpoint, models.policy, models.optimizer, models.lr_scheduler)
    logger.info("resumed from %s at step %d", checkpoint, step)
    return step, saved


def log_step(accelerator: Accelerator, metrics_log: MetricsLog | None, step: int, means: dict, totals: dict,
             extra: dict) -> dict:
    """One metrics record: `means` (tensors) averaged over processes, `totals` summed, `extra` as this process has
    it; written to metrics.jsonl by the main process and sent to the tracker."""
    device = accelerator.device
    record = {"step": step}
    for given, how in ((means, "mean"), (totals, "sum")):
        if given:
            values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in given.values()])
            record.update(zip(given, accelerator.reduce(values, how).tolist()))
    record.update(extra)
    if metrics_log is not None:
        metrics_log.write(record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    return record


def finish_run(cfg: Config, accelerator: Accelerator, models: Models, output_dir: Path, summary: dict,
               record: dict) -> TrainResult:
    """Save the final model, its card and the training curves; end the trackers."""
    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(models.unet, keep_torch_compile=False)
    if accelerator.is_main_process:
        check_finite_weights(models.policy.trainable_parameters(), cfg.train.max_steps, output_dir)
        try:
            save_final(cfg, models.policy, unet, output_dir, models.parts.family, summary)
        except OSError as err:
            shutil.rmtree(output_dir / "final.tmp", ignore_errors=True)
            raise RunStopped(f"could not write the final model to {output_dir / 'final'} ({err}); what was there "
                             f"is intact, and so are the checkpoints in {output_dir}") from err
        logger.info("final model: %s; curves: %s", (output_dir / "final").resolve(), plot_run(output_dir))
    accelerator.end_training()
    return TrainResult(output_dir / "final", unet, record)


def train(cfg: Config) -> TrainResult:
    """Run the configured method and save the final model."""
    if cfg.method.name in ONLINE_METHODS:
        from .online import train_online
        return train_online(cfg)
    method = METHODS[cfg.method.name]
    t = cfg.train
    accelerator, output_dir = start_run(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    world, effective_batch = accelerator.num_processes, accelerator.num_processes * t.batch_size * t.grad_accum
    beta = method.default_beta if cfg.method.beta is None else cfg.method.beta
    if main and (warning := method.beta_warning(beta)):
        logger.warning(warning)
    method_cfg = dataclasses.replace(cfg.method, beta=beta)
    if cfg.method.inversion_steps and not method.inversion:
        raise ConfigError(f"method.inversion_steps is an smpo setting; {method.name} noises with forward noise")
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
                                   cfg.data.split, cfg.data.streaming, num_workers=cfg.data.num_workers)
        pairs, stats = load_pairs(cfg.data.path, cfg.data.split, cfg.data.keep_ties, cfg.data.streaming,
                                  cfg.data.max_pairs, extra_columns, seed=t.seed, keep_unlabelled=False,
                                  orient_by=orient_by, scores=scores, source_rows=cfg.data.cache)
    logger.info("data %s: %s rows; dropped %s ties, %s without a usable label (null, NaN, or %s outside [0, 1]), %s "
                "without a reward score; %s pairs", cfg.data.path, stats.rows, stats.ties_dropped, stats.unlabelled,
                stats.out_of_range, stats.unscored, stats.pairs)

    cache = latent_cache(cfg, accelerator, output_dir) if cfg.data.cache else None
    transform = PairTransform(t.resolution, cfg.data.center_crop, cfg.data.random_flip)
    items = pairs if cfg.data.streaming else (  # a stream is decoded as it is read (make_pair_loader)
        CachedPairDataset(pairs, cache, transform, t.seed, extra_columns) if cache is not None
        else PairDataset(pairs, transform, t.seed, extra_columns))
    # workers decode images; a cached item is a few tensor slices, cheaper in this process than sent from a worker
    # (two workers cost a tiny LoRA step 12 ms of its 80 on 2 cores: benchmarks/README.md)
    workers = 0 if cache is not None else cfg.data.num_workers

    def pair_inputs(parts, frozen_dtype) -> PairInputs:
        return PairInputs(parts.family, method, t.seed, cfg.data.prompt_dropout, t.resolution,
                          parts.noise_scheduler.config.num_train_timesteps, device, parts.vae, parts.tokenizers,
                          parts.text_encoders, cache, text_dtype=frozen_dtype)

    reference, precomputed = None, cfg.method.precomputed_reference

    def precompute(parts, frozen_dtype, unet_digest) -> None:
        nonlocal reference
        key = reference_key(cfg, method, pairs, len(pairs), epochs_needed(cfg, len(pairs), world),
                            None if cache is None else cache.key, unet_digest)
        with accelerator.main_process_first():  # the main process computes; the others load its file
            reference = precompute_reference(key, output_dir if cache is None else cache.folder, items,
                                             pair_inputs(parts, frozen_dtype),
                                             lambda: reference_unet(parts.unet, cfg.model.lora_rank is not None,
                                                                    device, frozen_dtype),
                                             parts.noise_scheduler, accelerator.autocast,
                                             cfg.method.reference_batch_size or 4 * t.batch_size, workers)

    models = set_up_models(cfg, accelerator, method.needs_reference and not precomputed, lr,
                           encoders=cache is None, before_policy=precompute if precomputed else None)
    parts, policy, unet, optimizer, lr_scheduler = (models.parts, models.policy, models.unet, models.optimizer,
                                                    models.lr_scheduler)
    # v-prediction errors are compared in epsilon units unless asked otherwise (see likelihood.py)
    convert_units = parts.prediction_type == "v_prediction" and cfg.method.v_prediction_errors == "epsilon"
    inversion_steps = 0
    if method.inversion:
        default = 10 if parts.family == "sdxl" else 5
        inversion_steps = default if cfg.method.inversion_steps is None else cfg.method.inversion_steps

    # randomness: each pair's draws are seeded by (seed, epoch, pair), so a resumed run needs only its place
    inputs = pair_inputs(parts, models.frozen_dtype)
    batches_drawn, skipped_rows = 0, 0
    start_step, saved = resume_run(cfg, accelerator, models, output_dir)
    if saved is not None:
        batches_drawn, skipped_rows = saved["batches_drawn"], saved["skipped_rows"]
    skipped_updates = SkippedUpdates(t.max_nonfinite_steps, saved)

    loader = iter(make_pair_loader(items, transform, t.batch_size, t.seed, accelerator.process_index, world,
                                   start_batch=batches_drawn, num_workers=workers,
                                   extra_columns=extra_columns))

    def next_batch() -> dict:
        """The next batch with at least one decodable pair; undecodable rows are logged and counted."""
        nonlocal batches_drawn, skipped_rows
        while True:
            batch = next(loader)
            batches_drawn += 1
            for index, why in batch["skipped"]:
                logger.warning("skipped row %d: %s", index, why)
            skipped_rows += len(batch["skipped"])
            if batch["prompts"]:
                return batch

    def batch_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        latents, cond, draws = inputs(batch)  # the VAE and text encoders run in their own dtypes, outside autocast
        if inversion_steps:  # the policy inverts without grad; calling it unwrapped skips DDP's bookkeeping
            noised = invert_rows(policy.unet, parts.noise_scheduler, latents, draws.timesteps, cond, inversion_steps)
        else:
            noised = noise_rows(parts.noise_scheduler, latents, draws)
        errors = Errors(denoising_errors(unet, noised, cond), pref_prob=method.pref_prob(batch, cfg.method),
                        num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps,
                        preference_units=epsilon_units(parts.noise_scheduler, noised.timesteps) if convert_units
                        else None)
        if reference is not None:
            errors.reference = reference.rows(batch["keys"]).to(device)
        elif method.needs_reference:
            with torch.no_grad(), policy.reference() as reference_unet:
                errors.reference = denoising_errors(reference_unet, noised, cond)
        return method.objective(errors, method_cfg)

    # ---- the loop ----
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", resume_step=start_step) if main else None
    if t.report_to != "none":
        accelerator.init_trackers("diffusion-align", config=tracker_hparams(cfg))
    with tqdm(total=t.max_steps, initial=start_step, disable=not main, desc="train") as progress:
        record, trainable = {}, policy.trainable_parameters()
        for step in range(start_step + 1, t.max_steps + 1):
            started, sums, pairs_seen = time.perf_counter(), {}, 0
            for micro in range(t.grad_accum):
                batch = next_batch()
                pairs_seen += len(batch["prompts"])
                sync = micro == t.grad_accum - 1  # all-reduce gradients once, on the last micro-step
                with nullcontext() if sync else accelerator.no_sync(unet):
                    with accelerator.autocast():
                        loss, metrics = batch_loss(batch)
                    accelerator.backward(loss / t.grad_accum)
                for name, value in {"loss": loss.detach(), **metrics}.items():
                    sums[name] = sums.get(name, 0.0) + value.float() / t.grad_accum
            grad_norm = float(accelerator.clip_grad_norm_(trainable, t.max_grad_norm or float("inf")))
            step_lr = lr_scheduler.get_last_lr()[0]  # the lr this step used
            skipped_updates.after_update(apply_update(accelerator, optimizer, grad_norm), grad_norm, f"step {step}",
                                         output_dir)
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(1)

            if step % t.log_every == 0 or step == t.max_steps:
                record = log_step(accelerator, metrics_log, step, sums,
                                  {"pairs_per_s": pairs_seen / (time.perf_counter() - started),
                                   "skipped_rows": skipped_rows},
                                  {"lr": step_lr, "grad_norm": grad_norm, "nonfinite_steps": skipped_updates.total})
                progress.set_postfix(loss=f"{record['loss']:.4f}", **({"acc": f"{record['implicit_acc']:.2f}"}
                                                                     if "implicit_acc" in record else {}))
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                state = {"batches_drawn": batches_drawn, "skipped_rows": skipped_rows, **skipped_updates.state()}
                path = save_checkpoint(accelerator, output_dir, step, policy, optimizer, lr_scheduler, state,
                                       t.checkpoints_keep)
                logger.info("saved %s", path)

    if inputs.truncation.count:
        logger.warning("%d captions read in training were longer than the text encoder reads, and were cut",
                       inputs.truncation.count)
    summary = {"method": method.name, "beta": beta, "steps": t.max_steps, "effective batch": effective_batch,
               "lr": lr, "resolution": t.resolution, "pairs": stats.pairs, "ties dropped": stats.ties_dropped,
               "skipped rows": skipped_rows, "captions cut at the text encoder's length": inputs.truncation.count}
    return finish_run(cfg, accelerator, models, output_dir, summary, record)


def latent_cache(cfg: Config, accelerator: Accelerator, output_dir: Path) -> LatentCache:
    """data.cache: the run's latent cache, made (or completed) first by the main process; a stale one is an error."""
    d, m = cfg.data, cfg.model
    if d.streaming or not d.center_crop:
        raise ConfigError("data.cache=true stores each image's centre crop by source row: it needs "
                          "data.streaming=false and data.center_crop=true")
    folder = Path(d.cache_dir) if d.cache_dir else output_dir / "latent-cache"
    if accelerator.is_main_process:
        report = build_cache(d.path, folder, m.pretrained, d.split, m.revision, m.variant, m.vae, cfg.train.resolution,
                             flips=d.random_flip != "no", dtype=d.cache_dtype, batch_size=d.cache_batch_size,
                             device=accelerator.device, num_workers=d.num_workers)
        logger.info("latent cache %s", report)
    accelerator.wait_for_everyone()
    return LatentCache(folder)


def tracker_hparams(cfg: Config) -> dict:
    """Tracker hyper-parameters must be scalars."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
