"""Reference errors computed before training (`method.precomputed_reference=true`).

Every pair's draws are fixed by (seed, epoch, pair) (`likelihood.PairDraws`), so the frozen reference UNet's error
on each pair in each epoch the run will reach can be computed up front, without grad and in large batches. Training
then holds no reference model (a full fine-tune keeps one UNet, not two) and runs no reference pass.

The errors are computed as the live reference would compute them: the base UNet's weights in the frozen dtype
(train.mixed_precision's half-precision dtype, as `Policy` places a LoRA's base and a full fine-tune's reference
copy), under the training autocast.

Stored in `reference-errors.safetensors` (beside the latent cache, or in the run's folder): `errors`, shaped
(epochs, pairs, rows per pair), fp32, NaN where a pair was skipped; the key it was made with (`reference_key`:
everything the errors depend on) sits in the file's metadata, and a file made with another key is recomputed.
Being keyed so, the file is a cache like the latent cache, not part of a run: `train.overwrite=true` keeps it, and
a rerun that would compute the same errors loads them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import Config, ConfigError
from ..data.cache import encoder_digests, t5_length
from ..data.pairs import collate_pairs
from ..files import write_safetensors_atomic
from ..models.loading import component_digest, place
from ..models.policy import frozen_reference
from ..progress import progress
from .inputs import PairInputs
from .likelihood import denoising_errors, noise_rows

logger = logging.getLogger("diffusion_align")

REFERENCE_FILE = "reference-errors.safetensors"


class ReferenceErrors:
    def __init__(self, errors: torch.Tensor):
        self.errors = errors  # (epochs, pairs, rows per pair)

    def rows(self, keys: list[tuple[int, int]]) -> torch.Tensor:
        """The reference errors of the pairs `keys` in row layout [w_1..w_B, l_1..l_B]."""
        epochs = [epoch for epoch, _ in keys]
        if max(epochs) >= self.errors.shape[0]:
            raise RuntimeError(f"reference errors were precomputed for {self.errors.shape[0]} epochs, but the run "
                               f"reached epoch {max(epochs)} (whole batches of undecodable pairs draw extra batches)"
                               f"; delete {REFERENCE_FILE} to compute them again for more")
        picked = self.errors[epochs, [index for _, index in keys]]  # (pairs, rows per pair)
        return picked.T.flatten()


def check_precomputable(cfg: Config, method) -> None:
    if not method.needs_reference:
        raise ConfigError(f"method.precomputed_reference=true: {method.name} has no reference model")
    if method.inversion and cfg.method.inversion_steps != 0:
        raise ConfigError("method.precomputed_reference=true: smpo's ReNoise inversion runs the policy, so the noised "
                          "latents (and the reference's errors on them) change as it trains; set "
                          "method.inversion_steps=0 (forward noise) to precompute")
    if cfg.data.streaming:
        raise ConfigError("method.precomputed_reference=true needs data.streaming=false (errors are stored by pair)")


def epochs_needed(cfg: Config, num_pairs: int, world: int) -> int:
    """The epochs the run's batches reach (the sampler drops each epoch's incomplete last global batch)."""
    batches_per_epoch = num_pairs // (cfg.train.batch_size * world)
    return math.ceil(cfg.train.max_steps * cfg.train.grad_accum / max(batches_per_epoch, 1))


def reference_key(cfg: Config, method, pairs, num_pairs: int, epochs: int, cache_key: dict | None,
                  denoiser_digest: str, fsdp2: bool) -> dict:
    """Everything the errors depend on: the UNet; the scheduler (its betas noise the latents, its step count numbers
    the draws' timesteps); what makes the inputs, which is the latent cache's key when there is one (it covers the
    VAE, text encoders, tokenizers, T5's token count and source rows) and those components' digests and T5's token
    count otherwise; the pairs; the draws (seed, epochs, rows per pair, prompt dropout, timestep sampling); the
    preprocessing (crop, flips, posterior draw or mean); and the precision. Called once a run: each digest reads its
    local weight files once."""
    d, m = cfg.data, cfg.model
    inputs = cache_key if cache_key is not None else {**encoder_digests(m.pretrained, m.revision, m.variant, m.vae),
                                                      **t5_length(m.max_sequence_length)}
    return {"unet": denoiser_digest, "scheduler": component_digest(m.pretrained, "scheduler", m.revision),
            "inputs": inputs, "pairs": pairs._fingerprint,
            "num_pairs": num_pairs, "epochs": epochs, "method": {
                "rows_per_pair": method.rows_per_pair, "per_image_captions": method.per_image_captions},
            "seed": cfg.train.seed, "resolution": cfg.train.resolution, "mixed_precision": cfg.train.mixed_precision,
            "timesteps": [cfg.train.timestep_sampling, cfg.train.logit_mean, cfg.train.logit_std],
            "data": {"center_crop": d.center_crop, "random_flip": d.random_flip, "prompt_dropout": d.prompt_dropout,
                     "latents": d.latents},
            # a full fine-tune's reference in half precision, not under fsdp2: only its autocast layers cast
            # (`frozen_reference`; errors made before, by a copy cast whole, are not these)
            **({"reference_cast": "autocast layers"} if cfg.model.lora_rank is None and not fsdp2
               and cfg.train.mixed_precision != "no" else {})}


def reference_denoiser(denoiser: torch.nn.Module, lora: bool, device: torch.device,
                       dtype: torch.dtype, fsdp2: bool) -> torch.nn.Module:
    """The pretrained `denoiser` as the live reference runs: on `device` in the frozen `dtype`. A LoRA's base is placed
    so in place (`Policy` places it so anyway); a full fine-tune's reference is `Policy`'s copy, which leaves the
    policy's fp32 weights unrounded."""
    if lora or denoiser.dtype == dtype:
        return place(denoiser, device, dtype)
    return frozen_reference(denoiser, dtype, fsdp2).to(device)  # cast before moving: no fp32 copy on the device


def precompute_reference(key: dict, folder: Path, items, inputs: PairInputs,
                         make_denoiser: Callable[[], torch.nn.Module], autocast, batch_size: int,
                         num_workers: int = 0) -> ReferenceErrors:
    """The reference errors of every pair in every epoch of `key` (loaded from `folder` when made with that key);
    `make_denoiser()` gives the reference denoiser, and is called only when the errors are computed."""
    path = folder / REFERENCE_FILE
    if path.is_file():
        with safe_open(path, "pt") as f:
            if json.loads(f.metadata().get("key", "null")) == key:
                logger.info("reference errors: %s", path)
                return ReferenceErrors(f.get_tensor("errors"))
        logger.info("%s was made for another run; computing the reference errors again", path)
    epochs, num_pairs, rows_per_pair = key["epochs"], key["num_pairs"], inputs.method.rows_per_pair
    errors = torch.full((epochs, num_pairs, rows_per_pair), float("nan"))
    batches = [[(epoch, i) for i in range(start, min(start + batch_size, num_pairs))]
               for epoch in range(epochs) for start in range(0, num_pairs, batch_size)]
    loader = torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=collate_pairs,
                                         num_workers=num_workers)
    denoiser = make_denoiser()
    for batch in progress(loader, total=len(batches), desc="reference errors"):
        if not batch["prompts"]:
            continue
        with torch.no_grad(), autocast():
            latents, cond, draws = inputs(batch)
            rows = denoising_errors(denoiser, noise_rows(inputs.process, latents, draws), cond).float().cpu()
        epoch_of, index_of = zip(*batch["keys"])
        errors[list(epoch_of), list(index_of)] = rows.view(rows_per_pair, -1).T
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic({"errors": errors}, path, metadata={"key": json.dumps(key)})
    logger.info("reference errors of %d pairs x %d epochs written to %s", num_pairs, epochs, path)
    return ReferenceErrors(errors)
