"""The one training loop for every offline preference method.

pairs -> latents + conditioning -> per-sample denoising errors (policy, and reference if the method needs it)
-> the method's objective -> optimiser step -> metrics, checkpoints, final model.
Runs as is on a CPU, one GPU, or many processes under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
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
from ..data.pairs import PairTransform, load_pairs, make_pair_loader
from ..evaluation.plots import plot_run
from ..files import write_text_atomic
from ..models.conditioning import encode_prompts
from ..models.loading import DiffusionComponents, load_components, place, set_attention
from ..models.policy import Policy
from ..rewards.labeling import reward_scores
from .checkpoints import load_checkpoint, resolve_resume, save_checkpoint
from .inversion import invert_rows
from .likelihood import denoising_errors, encode_latents, epsilon_units, noise_rows
from .methods import METHODS, ONLINE_METHODS, Errors
from .outputs import MetricsLog, save_final

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
    """The accelerator and the output folder, with the resolved config written into it."""
    accelerator = make_accelerator(cfg)
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "config.yaml", config_to_yaml(cfg))
    return accelerator, output_dir


def set_up_models(cfg: Config, accelerator: Accelerator, needs_reference: bool, lr: float) -> Models:
    """Load the pipeline's parts, place the frozen ones in the half-precision dtype (an SDXL VAE that must stay fp32
    says so), wrap the UNet as the policy and prepare it with its optimiser and lr schedule."""
    t = cfg.train
    set_seed(t.seed)  # identical LoRA initialisation on every process
    parts = load_components(cfg.model.pretrained, cfg.model.revision, cfg.model.variant, cfg.model.vae)
    if cfg.model.prediction_type not in (None, parts.prediction_type):
        raise ConfigError(f"model.prediction_type={cfg.model.prediction_type}, but {cfg.model.pretrained}'s scheduler "
                          f"says {parts.prediction_type}; training against the wrong target ruins the model (set "
                          f"model.prediction_type=null to follow the checkpoint)")
    device, frozen_dtype = accelerator.device, DTYPES[t.mixed_precision]
    for module in parts.text_encoders:
        place(module, device, frozen_dtype)
    place(parts.vae, device, torch.float32 if parts.vae.config.get("force_upcast", False) else frozen_dtype)
    attention = set_attention(parts.unet, cfg.model.attention, device)
    if cfg.model.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    policy = Policy(parts.unet, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_target_modules,
                    parts.family, needs_reference, cfg.model.ref_offload, device, frozen_dtype)
    optimizer = make_optimizer(cfg, policy.trainable_parameters(), lr)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                                 num_training_steps=t.max_steps)
    unet, optimizer = accelerator.prepare(policy.unet, optimizer)
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
    unet = accelerator.unwrap_model(models.unet)
    if accelerator.is_main_process:
        save_final(cfg, models.policy, unet, output_dir, models.parts.family, summary)
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
                                  orient_by=orient_by, scores=scores)
    logger.info("data %s: %s rows; dropped %s ties, %s with a null/NaN label, %s without a reward score; %s pairs",
                cfg.data.path, stats.rows, stats.ties_dropped, stats.unlabelled, stats.unscored, stats.pairs)

    models = set_up_models(cfg, accelerator, method.needs_reference, lr)
    parts, policy, unet, optimizer, lr_scheduler = (models.parts, models.policy, models.unet, models.optimizer,
                                                    models.lr_scheduler)
    # v-prediction errors are compared in epsilon units unless asked otherwise (see likelihood.py)
    convert_units = parts.prediction_type == "v_prediction" and cfg.method.v_prediction_errors == "epsilon"
    inversion_steps = 0
    if method.inversion:
        default = 10 if parts.family == "sdxl" else 5
        inversion_steps = default if cfg.method.inversion_steps is None else cfg.method.inversion_steps

    # ---- randomness: explicit generators, saved in checkpoints so a resumed run continues identically ----
    noise_gen = torch.Generator(device).manual_seed(t.seed + 10_000 * (accelerator.process_index + 1))
    dropout_gen = torch.Generator().manual_seed(t.seed + 20_000 * (accelerator.process_index + 1))
    batches_drawn, skipped_rows, nonfinite_steps = 0, 0, 0
    start_step, saved = resume_run(cfg, accelerator, models, output_dir)
    if saved is not None:
        noise_gen.set_state(saved["noise_gen"])
        dropout_gen.set_state(saved["dropout_gen"])
        batches_drawn, skipped_rows = saved["batches_drawn"], saved["skipped_rows"]
        nonfinite_steps = saved["nonfinite_steps"]

    transform = PairTransform(t.resolution, cfg.data.center_crop, cfg.data.random_flip)
    loader = iter(make_pair_loader(pairs, transform, t.batch_size, t.seed, accelerator.process_index, world,
                                   start_batch=batches_drawn, num_workers=cfg.data.num_workers,
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
        rows = method.rows_per_pair * len(batch["prompts"])  # SFT uses the winner rows only
        keep = (torch.rand(len(batch["prompts"]), generator=dropout_gen) >= cfg.data.prompt_dropout).tolist()
        # the VAE and text encoders run in their own dtypes even inside the loop's autocast (fp32 SDXL VAE)
        latents = encode_latents(parts.vae, batch["pixel_values"][:rows], noise_gen)
        cond = encode_prompts(parts.family, parts.tokenizers, parts.text_encoders, method.row_prompts(batch, keep),
                              batch["original_sizes"][:rows], batch["crop_top_left"][:rows], t.resolution)
        if inversion_steps:  # the policy inverts without grad; calling it unwrapped skips DDP's bookkeeping
            noised = invert_rows(policy.unet, parts.noise_scheduler, latents, method.rows_per_pair, cond,
                                 inversion_steps, noise_gen)
        else:
            noised = noise_rows(parts.noise_scheduler, latents, method.rows_per_pair, noise_gen)
        errors = Errors(denoising_errors(unet, noised, cond), pref_prob=method.pref_prob(batch, cfg.method),
                        num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps,
                        preference_units=epsilon_units(parts.noise_scheduler, noised.timesteps) if convert_units
                        else None)
        if method.needs_reference:
            with torch.no_grad(), policy.reference() as reference:
                errors.reference = denoising_errors(reference, noised, cond)
        return method.objective(errors, method_cfg)

    # ---- the loop ----
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", resume_step=start_step) if main else None
    if t.report_to != "none":
        accelerator.init_trackers("diffusion-align", config=tracker_hparams(cfg))
    progress = tqdm(total=t.max_steps, initial=start_step, disable=not main, desc="train")
    record = {}
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
        grad_norm = float(accelerator.clip_grad_norm_(unet.parameters(), t.max_grad_norm or float("inf")))
        step_lr = lr_scheduler.get_last_lr()[0]  # the lr this step used
        if not apply_update(accelerator, optimizer, grad_norm):
            nonfinite_steps += 1
            logger.warning("step %d: gradient norm is %s; update skipped", step, grad_norm)
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            record = log_step(accelerator, metrics_log, step, sums,
                              {"pairs_per_s": pairs_seen / (time.perf_counter() - started),
                               "skipped_rows": skipped_rows},
                              {"lr": step_lr, "grad_norm": grad_norm, "nonfinite_steps": nonfinite_steps})
            progress.set_postfix(loss=f"{record['loss']:.4f}", **({"acc": f"{record['implicit_acc']:.2f}"}
                                                                 if "implicit_acc" in record else {}))
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            state = {"noise_gen": noise_gen.get_state(), "dropout_gen": dropout_gen.get_state(),
                     "batches_drawn": batches_drawn, "skipped_rows": skipped_rows, "nonfinite_steps": nonfinite_steps}
            path = save_checkpoint(accelerator, output_dir, step, policy, optimizer, lr_scheduler, state,
                                   t.checkpoints_keep)
            logger.info("saved %s", path)
    progress.close()

    summary = {"method": method.name, "beta": beta, "steps": t.max_steps, "effective batch": effective_batch,
               "lr": lr, "resolution": t.resolution, "pairs": stats.pairs, "ties dropped": stats.ties_dropped,
               "skipped rows": skipped_rows}
    return finish_run(cfg, accelerator, models, output_dir, summary, record)


def tracker_hparams(cfg: Config) -> dict:
    """Tracker hyper-parameters must be scalars."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
