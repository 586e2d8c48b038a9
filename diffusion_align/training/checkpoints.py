"""Resumable checkpoints: `<output_dir>/checkpoint-<step>/`, written atomically.

A checkpoint is first written to `checkpoint-<step>.tmp` and renamed when complete, so a crash never leaves a
half-written `checkpoint-<step>`. It holds the trained weights (safetensors, loadable by diffusers), the
optimiser and lr-schedule state, the weights' EMA if the run keeps one (`ema/`, in the weights' own layout, so that
`export` and `generate` read it as they read `final/`: ema.py), and per process the random generators and how many
batches it has drawn, so a resumed run sees the same data and noise as an uninterrupted one. Only tensors and plain
containers are pickled, and they are read back with `torch.load(..., weights_only=True)`.
A sharded run (train.sharding=fsdp2) writes its trainable weights, optimiser and EMA as shards instead, each process
its own (`sharded/`, torch.distributed.checkpoint); a ZeRO-2 run (zero2), the weights (and EMA) once and per process
its part of the optimiser (`optimizer_<process>.pt`). Either resumes only as a run of its kind on as many processes.
A sharded checkpoint's weights are gathered in one process for `export` by `gather_sharded`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

from ..config import config_to_yaml
from ..files import EMA_FOLDER, SHARDED_STATE, WRITE_ERRORS, list_checkpoints, read_back, replace_dir, save_torch
from ..models.loading import pipeline_family, pipeline_index
from ..models.policy import Policy
from .safety import RunStopped, check_finite_weights
from .sharding import (is_sharded, load_partition, load_sharded, load_sharded_weights, save_partition,
                       save_sharded, zero_optimizer)

logger = logging.getLogger("diffusion_align")
RUN_KINDS = {"whole": "data-parallel", "sharded": "sharded (fsdp2)", "partitioned": "ZeRO-2 (zero2)"}


def optimizer_layout(policy, optimizer) -> str:
    """How a run's optimiser (and weights) are split: `sharded` (FSDP2: weights and optimiser), `partitioned`
    (ZeRO-2: the optimiser only) or `whole`."""
    if is_sharded(policy.denoiser):
        return "sharded"
    return "whole" if zero_optimizer(optimizer) is None else "partitioned"


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """`latest` -> the newest checkpoint in output_dir (None if there is none yet); a path -> that folder."""
    if resume is None:
        return None
    if resume == "latest" and not output_dir.is_dir():  # a typo in the folder would otherwise start a new run
        raise FileNotFoundError(f"train.resume=latest: {output_dir} does not exist, so there is no run to resume; "
                                "check train.output_dir, or leave train.resume unset to start a new run")
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"train.resume={resume}: no trainer_state.json there; expected a checkpoint-<step> "
                                f"folder written by diffusion-align, or `latest`")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, policy, optimizer, lr_scheduler,
                    process_state: dict, keep: int | None, ema=None) -> Path:
    """Collective: every process calls it. `process_state` holds this process's generators and counters; `ema`:
    the run's EMA (ema.py), or None.

    NaN or inf weights are never saved, and a failed write (a full disk) stops the run with the older checkpoints
    intact (`RunStopped`; under torchrun the other processes are stopped with it)."""
    check_finite_weights(policy.trainable_parameters(), step, output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_torch(process_state, tmp / f"process_{accelerator.process_index}.pt")
        layout = optimizer_layout(policy, optimizer)
        if layout == "sharded":
            save_sharded(tmp / SHARDED_STATE, policy.denoiser, optimizer, ema)
        elif layout == "partitioned":
            save_partition(tmp / f"optimizer_{accelerator.process_index}.pt", optimizer)
        if accelerator.is_main_process:
            if layout != "sharded":
                policy.save(tmp)
                if ema is not None:
                    with ema.copied_in():
                        policy.save(tmp / EMA_FOLDER)
            if layout == "whole":
                save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            save_torch(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if accelerator.scaler is not None:
                save_torch(accelerator.scaler.state_dict(), tmp / "grad_scaler.pt")
            if (output_dir / "config.yaml").is_file():  # what a resume is compared with
                shutil.copyfile(output_dir / "config.yaml", tmp / "config.yaml")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "num_processes": accelerator.num_processes, "sharded": layout == "sharded",
                     "optimizer": layout, "ema": ema is not None}
            if ema is not None:
                state["ema_updates"] = ema.updates
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            replace_dir(tmp, final)
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        raise RunStopped(f"step {step}: could not write {final} ({err}); "
                         + (f"the previous checkpoint {previous[-1][1]} is intact, resume from it with "
                            "train.resume=latest once the cause is fixed" if previous else
                            "there is no earlier checkpoint")) from err
    if accelerator.is_main_process and keep is not None:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            # out of list_checkpoints' sight first: a kill while removing it leaves no half checkpoint to resume
            old.rename(old.with_name(f".{old.name}.removed"))
        for doomed in output_dir.glob(".checkpoint-*.removed"):  # this one's, and any a kill left
            shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, policy, optimizer, lr_scheduler, ema=None) -> tuple[int, dict]:
    """Restore weights, optimiser and `ema` (if kept); returns the step and this process's saved state."""
    with read_back(path / "trainer_state.json"):
        state = json.loads((path / "trainer_state.json").read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes; this run has "
                         f"{accelerator.num_processes}. Resume with the same number of processes so every "
                         "process continues its own data stream.")
    layout = optimizer_layout(policy, optimizer)
    written = state.get("optimizer", "sharded" if state.get("sharded") else "whole")
    if written != layout:
        raise ValueError(f"{path} was written by a {RUN_KINDS[written]} run; this run is {RUN_KINDS[layout]}. "
                         "Resume with the train.sharding it was written with.")
    if state.get("ema", False) != (ema is not None):  # an older checkpoint's config may not name train.ema_decay
        raise ValueError(f"{path} was written {'with' if state.get('ema') else 'without'} an EMA of the weights; "
                         f"this run keeps {'one' if ema is not None else 'none'}. Resume with the train.ema_decay it "
                         "was written with.")
    if layout == "sharded":
        with read_back(path / SHARDED_STATE):
            load_sharded(path / SHARDED_STATE, policy.denoiser, optimizer, ema)
    else:
        if ema is not None:  # through the weights, which then take their live values
            if not (path / EMA_FOLDER).is_dir():
                raise FileNotFoundError(f"{path / EMA_FOLDER}: no such folder, though the checkpoint was written with "
                                        "an EMA (diffusion-align before 2026-12-06 kept it in ema.safetensors, which "
                                        "only that version resumes)")
            with read_back(path / EMA_FOLDER):
                policy.load(path / EMA_FOLDER)
            ema.take_weights()
            ema.updates = state["ema_updates"]
        with read_back(path):
            policy.load(path)
    if layout == "partitioned":
        with read_back(path / f"optimizer_{accelerator.process_index}.pt"):
            load_partition(path / f"optimizer_{accelerator.process_index}.pt", optimizer)
    elif layout == "whole":
        with read_back(path / "optimizer.pt"):
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    with read_back(path / "lr_scheduler.pt"):
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "grad_scaler.pt").exists():
        with read_back(path / "grad_scaler.pt"):
            accelerator.scaler.load_state_dict(torch.load(path / "grad_scaler.pt", weights_only=True))
    with read_back(path / f"process_{accelerator.process_index}.pt"):
        process_state = torch.load(path / f"process_{accelerator.process_index}.pt", weights_only=True)
    return state["step"], process_state


def gather_sharded(source, out: Path, live: bool = False):
    """A sharded (fsdp2) checkpoint's weights, its EMA if it keeps one (else, or with `live`, the weights training
    resumes from), gathered whole from every process's shards in this one process and written into `out` as an
    unsharded checkpoint holds them (`Policy.save`). `source`: export's Source of the checkpoint; returns the Source
    of what was written."""
    with read_back(source.folder / "trainer_state.json"):
        state = json.loads((source.folder / "trainer_state.json").read_text())
    ema = state.get("ema", False) and not live
    family, _ = pipeline_family(source.base, pipeline_index(source.base, source.revision, what="--base"),
                                source.revision)
    m = source.config.model
    denoiser = family.denoiser_cls.from_pretrained(source.base, subfolder=family.denoiser, revision=source.revision,
                                                   variant=source.variant)
    policy = Policy(denoiser, m.lora_rank, m.lora_alpha, m.lora_target_modules or family.lora_targets, family,
                    needs_reference=False)
    trained = {name: p for name, p in policy.denoiser.named_parameters() if p.requires_grad}
    with torch.no_grad():
        load_sharded_weights(source.folder / SHARDED_STATE, trained, ema)
    policy.save(out)
    (out / "training_config.yaml").write_text(config_to_yaml(source.config))  # as final/ keeps it
    logger.info("%s: %s gathered from its shards", source.folder,
                "the EMA of the run's weights (train.ema_decay)" if ema else "the weights")
    return dataclasses.replace(source, folder=out, kind="lora" if policy.is_lora else family.denoiser)
