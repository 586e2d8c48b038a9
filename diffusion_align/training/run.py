"""A training run's set-up and bookkeeping, shared by the offline loop (trainer.py) and the online one (online.py):
the accelerator and output folder, the models and optimiser, resume, one metrics record, the final model."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler

from ..config import Config, ConfigError, config_to_dict, config_to_yaml
from ..devices import MIXED_PRECISION_DTYPES, process_state
from ..evaluation.plots import plot_run
from ..files import WRITE_ERRORS, write_text_atomic
from ..models.kohya import kohya_labels
from ..models.families import Family
from ..models.loading import (DiffusionComponents, check_resolution, compile_denoiser, component_digest,
                              load_components, pipeline_family, pipeline_index, place, set_attention)
from ..models.policy import Policy
from .checkpoints import load_checkpoint, resolve_resume
from .ema import EMA
from .outputs import MetricsLog, save_final
from .safety import RunStopped, check_finite_weights, check_output_dir, clear_run
from .sharding import deepspeed_accelerator, gathered_policy, model_state_bytes, resolve_sharding, shard

logger = logging.getLogger("diffusion_align")


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator, after the settings this machine or the run cannot honour are refused."""
    if cfg.train.lr_scheduler == "constant" and cfg.train.warmup_steps:  # diffusers' constant takes no warm-up
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps} does nothing with train.lr_scheduler=constant; "
                          "use train.lr_scheduler=constant_with_warmup, or train.warmup_steps=0 (which a run resumed "
                          "under constant may set: it never warmed up)")
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on this machine use bf16 or no")
    trackers = None if cfg.train.report_to == "none" else cfg.train.report_to
    if trackers == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to=wandb needs wandb (pip install diffusion-align[wandb]); "
                          "or use train.report_to=tensorboard")
    # a second train() in one process may use another precision, or another strategy (zero2's process state is
    # DeepSpeed's)
    AcceleratorState._reset_state(reset_partial_state=True)
    if resolve_sharding(cfg) == "zero2":
        return deepspeed_accelerator(cfg, log_with=trackers, project_dir=cfg.train.output_dir)
    state = process_state(cfg.train.process_timeout)  # as the command line's logging made it: cpu=True without a GPU
    # on several processes, DDP's gradients are views of its all-reduce buckets rather than a second copy of them
    # (the same values; the planner counts one copy)
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    return Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers,
                       project_dir=cfg.train.output_dir, cpu=state.device.type == "cpu", kwargs_handlers=[ddp])


def model_family(cfg: Config) -> tuple[Family, dict]:
    """model.pretrained's family, reading model.max_sequence_length T5 tokens, and its denoiser's config; the key
    set for a family without T5, and a train.resolution whose latents the denoiser cannot cut into tokens, are
    refused here, before any model is loaded."""
    m = cfg.model
    family, config = pipeline_family(m.pretrained, pipeline_index(m.pretrained, m.revision), m.revision)
    check_resolution(cfg.train.resolution, family, config, m.pretrained, m.revision, m.vae, "train.resolution")
    try:
        return family.with_max_sequence_length(m.max_sequence_length), config
    except ValueError as err:
        raise ConfigError(f"model.max_sequence_length={m.max_sequence_length} ({m.pretrained}): {err}; set it to "
                          "null") from None


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


def apply_update(accelerator: Accelerator, models: Models, grad_norm: float) -> bool:
    """Step the optimiser unless the gradient is not finite, then the EMA if the run keeps one (an update that
    was skipped is not counted: ema.py); whether the weights were updated.

    One NaN/inf batch must not poison the weights (the norm is all-reduced, so every process agrees). With fp16,
    accelerate's GradScaler makes that call itself (the unscaled norm is inf after an overflow) and says so in
    `optimizer_step_was_skipped`."""
    if accelerator.scaler is None and not math.isfinite(grad_norm):
        return False
    models.optimizer.step()
    if accelerator.optimizer_step_was_skipped:
        return False
    if models.ema is not None:
        models.ema.update()
    return True


@dataclasses.dataclass
class TrainResult:
    final_dir: Path                  # the saved model (LoRA weights or a full pipeline)
    denoiser: torch.nn.Module        # the trained denoiser, in this process
    metrics: dict = dataclasses.field(default_factory=dict)  # the last logged step


@dataclasses.dataclass
class Models:
    """What a run trains and conditions with, on the device; `denoiser` is the policy denoiser as accelerate prepared it
    (DDP-wrapped on many processes, DeepSpeed's engine under zero2), `policy.denoiser` the same module unwrapped; under
    fsdp2, both are the one module, sharded in place."""

    parts: DiffusionComponents
    policy: Policy
    denoiser: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    frozen_dtype: torch.dtype
    sharding: str = "none"
    ema: EMA | None = None  # train.ema_decay's average of the trainable weights


def start_run(cfg: Config) -> tuple[Accelerator, Path]:
    """The accelerator and the output folder, checked (a run there is resumed or replaced only when asked), with the
    resolved config written into it."""
    output_dir = Path(cfg.train.output_dir)
    resolve_sharding(cfg)  # a setting sharding cannot run with fails here, before anything is loaded
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
    as the policy and prepare it with its optimiser and lr schedule, or shard it (train.sharding: sharding.py).
    `before_policy(parts, frozen_dtype, denoiser_digest, fsdp2)` runs on the untouched pretrained UNet first
    (precomputed reference errors)."""
    t, sharding = cfg.train, resolve_sharding(cfg)
    device, frozen_dtype = accelerator.device, MIXED_PRECISION_DTYPES[t.mixed_precision]
    fsdp = sharding.startswith("fsdp2")
    # sharded, the main process alone reads the denoiser's weights and sends each process its shards (`shard`)
    parts = load_components(cfg.model.pretrained, cfg.model.revision, cfg.model.variant, cfg.model.vae, encoders,
                            max_sequence_length=cfg.model.max_sequence_length,
                            denoiser_dtype=frozen_dtype if cfg.model.lora_rank is not None else None,
                            denoiser_weights=not fsdp or accelerator.is_main_process)
    if cfg.model.prediction_type not in (None, parts.prediction_type):
        raise ConfigError(f"model.prediction_type={cfg.model.prediction_type}, but {cfg.model.pretrained}'s scheduler "
                          f"says {parts.prediction_type}; training against the wrong target ruins the model (set "
                          f"model.prediction_type=null to follow the checkpoint)")
    for module in parts.text_encoders:
        place(module, device, frozen_dtype)
    if parts.vae is not None:
        place(parts.vae, device, torch.float32 if parts.vae.config.get("force_upcast", False) else frozen_dtype)
    attention = set_attention(parts.denoiser, cfg.model.attention, device, cfg.model.cudnn_attention)
    if cfg.model.gradient_checkpointing:
        parts.denoiser.enable_gradient_checkpointing()
    if cfg.model.channels_last:
        parts.denoiser.to(memory_format=torch.channels_last)
    # the base denoiser's digest keys the precomputed reference errors and labels a kohya LoRA: hashed once (local
    # weights are read whole)
    m = cfg.model
    denoiser_digest = (component_digest(m.pretrained, parts.family.denoiser, m.revision, m.variant)
                   if m.lora_rank is not None or before_policy is not None else None)
    if before_policy is not None:
        before_policy(parts, frozen_dtype, denoiser_digest, fsdp)
    set_seed(t.seed)  # identical LoRA initialisation on every process, whatever ran before
    kohya = None if cfg.model.lora_rank is None or parts.family.kohya_version is None else kohya_labels(
        parts.family, parts.prediction_type, Path(cfg.train.output_dir).name, cfg.method.name, denoiser_digest)
    # sharded, the policy is made on the CPU (on the meta device in the processes that did not read the weights), and
    # each block moves to the device as it is sharded: no process ever holds the whole UNet there
    where = ("cpu" if accelerator.is_main_process else "meta") if fsdp else device
    policy = Policy(parts.denoiser, cfg.model.lora_rank, cfg.model.lora_alpha,
                    cfg.model.lora_target_modules or parts.family.lora_targets, parts.family, needs_reference,
                    cfg.model.ref_offload, where, frozen_dtype, kohya, fsdp2=fsdp)
    if fsdp:
        compute_dtype = None if t.mixed_precision == "no" else frozen_dtype
        for module in filter(None, (policy.denoiser, policy.ref_denoiser)):
            shard(module, sharding, compute_dtype)
    optimizer = make_optimizer(cfg, policy.trainable_parameters(), lr)  # after sharding: it holds the shards
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                                 num_training_steps=t.max_steps)
    if fsdp:  # accelerate's prepare would wrap it for data-parallel training
        denoiser = policy.denoiser
    else:  # data-parallel, or DeepSpeed's engine (zero2)
        denoiser, optimizer = accelerator.prepare(policy.denoiser, optimizer)
    if cfg.model.compile:  # the training forward only: the reference and inversion call policy.denoiser as it is
        denoiser = compile_denoiser(denoiser, device)
    logger.info("%s: %s, %s prediction, %s attention, %d trainable parameters%s", cfg.model.pretrained, parts.family,
                parts.prediction_type, attention, sum(p.numel() for p in policy.trainable_parameters()),
                "" if sharding == "none" else f", {sharding} over {accelerator.num_processes} processes")
    ema = None
    if t.ema_decay:  # of the weights as the optimiser holds them: under fsdp2, this process's shards
        trainable = {name: p for name, p in policy.denoiser.named_parameters() if p.requires_grad}
        ema = EMA(trainable, t.ema_decay, t.ema_every, t.ema_repeats)
    return Models(parts, policy, denoiser, optimizer, lr_scheduler, frozen_dtype, sharding, ema)


def resume_run(cfg: Config, accelerator: Accelerator, models: Models, output_dir: Path) -> tuple[int, dict | None]:
    """(step to continue after, this process's saved state) from train.resume; (0, None) for a fresh start."""
    checkpoint = resolve_resume(output_dir, cfg.train.resume)
    if checkpoint is None:
        if cfg.train.resume == "latest":
            logger.info("train.resume=latest: no checkpoint in %s yet, starting at step 0", output_dir)
        return 0, None
    step, saved = load_checkpoint(accelerator, checkpoint, models.policy, models.optimizer, models.lr_scheduler,
                                  models.ema)
    logger.info("resumed from %s at step %d", checkpoint, step)
    return step, saved


def log_step(accelerator: Accelerator, metrics_log: MetricsLog | None, step: int, means: dict, totals: dict,
             extra: dict, models: Models | None = None, maxima: dict | None = None) -> dict:
    """One metrics record: `means` (tensors) averaged over processes, `totals` summed, `maxima` their largest,
    `extra` as this process has it, and the bytes of `models`' weights, gradients, optimiser states and EMA this
    process holds; written to metrics.jsonl by the main process and sent to the tracker."""
    device = accelerator.device
    record = {"step": step}
    for given, how in ((means, "mean"), (totals, "sum"), (maxima, "max")):
        if given:
            values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in given.values()])
            reduced = accelerator.gather(values[None]).amax(0) if how == "max" else accelerator.reduce(values, how)
            record.update(zip(given, reduced.tolist()))
    record.update(extra)
    if models is not None:  # this process's (the main one's): 1/N of data-parallel's when sharded over N
        kept = [m for m in (models.policy.denoiser, models.policy.ref_denoiser) if m is not None]
        ema = [] if models.ema is None else list(models.ema.average.values())
        record["model_states_gib"] = model_state_bytes(kept, models.optimizer, ema) / 2 ** 30
    if metrics_log is not None:
        metrics_log.write(record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    return record


def finish_run(cfg: Config, accelerator: Accelerator, models: Models, output_dir: Path, summary: dict,
               record: dict) -> TrainResult:
    """Save the final model, its card and the training curves; end the trackers. With an EMA, the final model (and
    the returned denoiser) is the EMA: it is copied into the trained weights, in place (sharded, shard by shard)."""
    accelerator.wait_for_everyone()
    # the module as saved: without accelerate's autocast around its forward, which a caller would not expect
    denoiser = accelerator.unwrap_model(models.denoiser, keep_fp32_wrapper=False, keep_torch_compile=False)
    if models.ema is not None:
        models.ema.copy_to_weights()
        t = cfg.train
        repeats = f", {t.ema_repeats} times each" if t.ema_repeats > 1 else ""
        summary = {**summary, "weights": f"the EMA (decay {t.ema_decay:g}, every {t.ema_every} updates{repeats})"}
    fsdp = models.sharding.startswith("fsdp2")
    if fsdp:  # the run is over: its optimiser states, reference and EMA (copied in) make room for the gather
        models.optimizer.state.clear()
        models.policy.ref_denoiser = models.ema = None
    # sharded: gathered whole once, into the main process's memory, and saved as an unsharded run saves
    policy = gathered_policy(models.policy) if fsdp else models.policy
    if accelerator.is_main_process:
        check_finite_weights(policy.trainable_parameters(), cfg.train.max_steps, output_dir)
        try:
            save_final(cfg, policy, policy.denoiser, output_dir, models.parts.family, summary)
        except WRITE_ERRORS as err:
            raise RunStopped(f"could not write the final model to {output_dir / 'final'} ({err}); what was there "
                             f"is intact, and so are the checkpoints in {output_dir}") from err
        logger.info("final model: %s; curves: %s", (output_dir / "final").resolve(), plot_run(output_dir))
    accelerator.end_training()
    return TrainResult(output_dir / "final", denoiser, record)


def tracker_hparams(cfg: Config) -> dict:
    """Tracker hyper-parameters must be scalars."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
