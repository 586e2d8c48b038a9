"""What keeps a run from losing work or going silently wrong: an output folder holding a run is replaced only when
asked, a resumed run must be the run that wrote the checkpoint, and a run stops with a message (never a half-written
checkpoint or NaN weights) when its writes fail or its gradients stay non-finite."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from ..config import Config, ConfigError, config_to_dict
from ..files import list_checkpoints, read_back
from .methods import ONLINE_METHODS

logger = logging.getLogger("diffusion_align")

# what a run writes into its output_dir (caches of data and scores, the latent cache and reference-errors.safetensors
# included, are keyed by all they depend on and outlive runs: never deleted)
RUN_ENTRIES = ("final", ".final.tmp", "final.old", "metrics.jsonl", ".metrics.jsonl.tmp", "config.yaml",
               ".config.yaml.tmp", "training_curves.png", "diffusion-align", "wandb", "grids")
# keys that say how long to run, how to record it and how to compute (not what): they may change on resume (max_steps
# only under a schedule that does not stretch to it: `HORIZON_FREE_SCHEDULES`)
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.output_dir", "train.resume", "train.overwrite", "train.log_every", "train.report_to",
    "train.checkpoint_every", "train.checkpoints_keep", "train.max_nonfinite_steps", "train.process_timeout",
    "data.num_workers", "data.cache_dir", "data.cache_batch_size", "data.vae_encode_batch_size",
    "method.reference_batch_size",
    "model.ref_offload", "model.gradient_checkpointing", "model.compile", "model.attention",
    "model.cudnn_attention", "online.track", "online.grid_every"})


def _flow_sde_kl(cfg: Config) -> bool:
    """Whether online.sde_kl decides the run's objective: a KL on the flow families' SDE steps."""
    if not (cfg.online.kl_beta > 0 and cfg.online.sde_type == "sde"):
        return False
    from ..models.loading import pipeline_family, pipeline_index
    m = cfg.model
    return pipeline_family(m.pretrained, pipeline_index(m.pretrained, m.revision), m.revision)[0].denoiser \
        == "transformer"


def _scored_in_half_precision(cfg: Config) -> bool:
    """Whether online.reward_dtype decides the run's rewards: online.reward scores them (no judge) in a run whose
    frozen dtype is not fp32, which is the dtype they were scored in before the key."""
    return cfg.method.name in ONLINE_METHODS and cfg.online.judge is None \
        and cfg.train.mixed_precision != "no"


# keys added since runs were saved without them, whose default trains otherwise than those runs did: the value such a
# run trained with, where it matters (a resume without it would change the objective part-way)
ADDED_KEYS = {"online.sde_kl": ("gaussian", _flow_sde_kl), "online.reward_dtype": ("frozen", _scored_in_half_precision),
              "train.ema_repeats": (1, lambda cfg: cfg.train.ema_decay > 0),
              "online.deterministic_last_step": (False, lambda cfg: cfg.method.name in ONLINE_METHODS),
              "online.sde_window_per": ("step", lambda cfg: cfg.method.name in ONLINE_METHODS
                                        and cfg.online.sde_window > 0 and not cfg.online.same_noise_per_group)}

# lr schedules whose values do not depend on train.max_steps; the others (linear, cosine, ...) decay to it
HORIZON_FREE_SCHEDULES = ("constant", "constant_with_warmup")


class RunStopped(RuntimeError):
    """The run cannot go on (a failed write, diverged training); the message says what is intact and what to do."""


def run_entries(output_dir: Path) -> list[str]:
    """The names of a run's files and folders in `output_dir`, checkpoints included."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name in RUN_ENTRIES or p.name.startswith("checkpoint-")
                  or p.name.startswith(".checkpoint-") and p.name.endswith(".removed"))  # pruning cut short


def trained_entries(output_dir: Path) -> list[str]:
    """What shows that a run trained there: a final model, metrics or checkpoints (a config.yaml alone is a run
    stopped by a bad setting before its first step, and is simply replaced)."""
    return [name for name in run_entries(output_dir) if name in ("final", "metrics.jsonl")
            or (name.startswith("checkpoint-") and not name.endswith(".tmp"))]


def check_output_dir(cfg: Config, checkpoint: Path | None) -> None:
    """Refuse to start in a folder that holds a run unless it is resumed or `train.overwrite` says so, and refuse a
    resume that would mix two runs in the folder or whose config differs from the checkpoint's (`checkpoint`: what
    train.resume resolved to)."""
    t, output_dir = cfg.train, Path(cfg.train.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"train.output_dir={output_dir} is a file; expected a folder (new, or holding a run)")
    if t.overwrite and t.resume is not None:
        raise ConfigError(f"train.overwrite=true deletes the run in {output_dir}, train.resume={t.resume} continues "
                          "it: choose one")
    found = trained_entries(output_dir)
    if t.overwrite or (t.resume is None and not found):
        return
    if t.resume is None:
        raise ConfigError(f"train.output_dir={output_dir} already holds a run ({', '.join(found)}): continue it with "
                          "train.resume=latest, replace it with train.overwrite=true, or choose another output_dir")
    if checkpoint is None:  # resume=latest and no checkpoint yet: a run cut short before its first one starts again
        if "final" in found:
            raise ConfigError(f"train.resume=latest: {output_dir} holds a finished model (final/) but no checkpoint "
                              "to resume from; start again with train.overwrite=true")
        return
    check_one_timeline(t.resume, checkpoint, output_dir, found)
    if (step := checkpoint_step(checkpoint)) > t.max_steps:  # no step to take: final/ would be its weights
        raise ConfigError(f"train.resume={t.resume}: {checkpoint.name} is at step {step}, past train.max_steps="
                          f"{t.max_steps}, so the run would end at once with its weights, reported as "
                          f"{t.max_steps} steps'; raise train.max_steps, or resume from a checkpoint at step "
                          f"{t.max_steps} or before (train.resume=PATH)")
    saved = next((p for p in (checkpoint / "config.yaml", checkpoint.parent / "config.yaml") if p.is_file()), None)
    if saved is None:
        logger.warning("train.resume: no config.yaml in %s or its folder; the config cannot be compared", checkpoint)
        return
    changed = changed_keys(yaml.safe_load(saved.read_text()), cfg)
    if changed:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        added = [f"{key}={old}" for key, old, _ in changed if key in ADDED_KEYS]
        raise ConfigError(f"train.resume={t.resume}: {checkpoint} was trained with another config ({shown}). Only "
                          f"these keys may change on resume: {', '.join(sorted(RESUMABLE_KEYS))}. To train with the "
                          "new settings, start afresh (train.overwrite=true or another output_dir)"
                          + (f"; to resume as it trained (saved before {', '.join(k.split('=')[0] for k in added)} "
                             f"existed), set {' '.join(added)}" if added else ""))


def check_one_timeline(resume: str, checkpoint: Path, output_dir: Path, found: list[str]) -> None:
    """Refuse a resume that would mix two runs' checkpoints in `output_dir`: from one of its checkpoints with later
    ones beside it (train.checkpoints_keep prunes by step, and a later resume=latest would take the abandoned run's
    newest), or from another folder's checkpoint into a folder that holds a run (`found`: its trained entries)."""
    if checkpoint.resolve().parent != output_dir.resolve():
        if found:
            raise ConfigError(f"train.resume={resume} is a checkpoint of another folder, and train.output_dir="
                              f"{output_dir} already holds a run ({', '.join(found)}): the two runs' checkpoints and "
                              "metrics would mix. Resume into a new output_dir")
        return
    step = checkpoint_step(checkpoint)
    later = [path.name for at, path in list_checkpoints(output_dir) if at > step]
    if later:
        raise ConfigError(f"train.resume={resume}: {output_dir} holds checkpoints after {checkpoint.name} "
                          f"({', '.join(later)}), which the resumed run would mix with its own (checkpoints_keep "
                          "prunes by step, and resume=latest would pick the newest). Move them out of the folder (or "
                          "delete them), then resume again")


def checkpoint_step(checkpoint: Path) -> int:
    with read_back(checkpoint / "trainer_state.json"):
        return json.loads((checkpoint / "trainer_state.json").read_text())["step"]


def changed_keys(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs and may not change on resume; keys the saved config
    lacks (written by an older version) are not compared, but for `ADDED_KEYS`, compared with what it trained with."""
    changed = []
    for section, values in config_to_dict(cfg).items():
        for name, value in values.items():
            key = f"{section}.{name}"
            before, matters = ADDED_KEYS.get(key, (value, None))
            old = (saved.get(section) or {}).get(name, before if matters and matters(cfg) else value)
            # a decaying schedule rebuilt for another max_steps jumps to another point of another curve; under
            # constant the warm-up never applied (make_accelerator now refuses one), so it may be set to 0
            fixed = key not in RESUMABLE_KEYS or (key == "train.max_steps"
                                                  and cfg.train.lr_scheduler not in HORIZON_FREE_SCHEDULES)
            if key == "train.warmup_steps" and cfg.train.lr_scheduler == "constant" == (saved.get("train") or {}).get(
                    "lr_scheduler"):
                fixed = False
            if fixed and old != value:
                changed.append((key, old, value))
    return changed


def clear_run(output_dir: Path) -> None:
    """train.overwrite: delete the run's files, so no mix of two runs remains."""
    entries = run_entries(output_dir)
    for name in entries:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if entries:  # a first run has nothing to clear, and says nothing
        logger.info("train.overwrite=true: cleared the previous run in %s", output_dir)


def check_finite_weights(parameters, step: int, output_dir: Path) -> None:
    """Never save NaN or inf weights. Collective when the weights are sharded (every process checks its shards)."""
    from .sharding import all_finite  # here, so that the command line reads this module without loading torch
    if not all_finite(list(parameters)):
        raise RunStopped(f"step {step}: the trained weights hold NaN or inf values, so they were not saved; the "
                         f"checkpoints in {output_dir} are intact. Lower train.lr, or use bf16 instead of fp16")


class SkippedUpdates:
    """Optimiser steps skipped for a non-finite gradient: in all (logged) and in a row (the run stops at `limit`)."""

    def __init__(self, limit: int, saved: dict | None = None):
        self.limit = limit
        self.total = saved["nonfinite_steps"] if saved else 0
        self.in_a_row = saved.get("nonfinite_in_a_row", 0) if saved else 0

    def state(self) -> dict:
        return {"nonfinite_steps": self.total, "nonfinite_in_a_row": self.in_a_row}

    def after_update(self, updated: bool, grad_norm: float, where: str, output_dir: Path) -> None:
        if updated:
            self.in_a_row = 0
            return
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        logger.warning("%s: gradient norm is %s; update skipped", where, grad_norm)
        if self.in_a_row >= self.limit:
            raise RunStopped(f"{where}: the gradient was not finite for {self.in_a_row} updates in a row (each was "
                             f"skipped; train.max_nonfinite_steps={self.limit}), so the run stopped; its checkpoints "
                             f"in {output_dir} are intact. Lower train.lr, check the data, or use bf16 instead of fp16")
