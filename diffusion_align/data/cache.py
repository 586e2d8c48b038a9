"""The latent and text-embedding cache: every image's VAE posterior and every text's encoder states, computed once, so
that training (`data.cache=true`) loads neither the VAE nor the text encoders and decodes no image.

    key.json                   what the cache was made from (`cache_key`): using it for anything else is an error
    texts.json                 the cached texts in order: "" (prompt dropout's empty prompt), then every caption
    latents-00000.safetensors  per source row of the shard: `mean_0`, `std_0`, `mean_1`, `std_1`, the unscaled
                               posterior of jpg_0 / jpg_1 in the cache dtype; with flips, `*_flip` of the mirrored
                               images; `size_0/1` (original h, w), `crop_0/1` (top, left); `ok` (0: an image did not
                               decode, so the pair is skipped when trained on)
    texts-00000.safetensors    per text: `hidden` (tokens, dim), and for SDXL, SD3 and FLUX `pooled`
    .shards/                   the shard records (`shards.run_shards`): an interrupted build resumes

Images are resized and centre-cropped as `PairTransform` does; a training item takes its flips from the same coins
and its posterior sample from `likelihood.PairDraws`, so a cached run sees what an uncached one does (exactly with
an fp32 cache; to the cache dtype's rounding otherwise).

Sizes in fp16: a text is 77 x 768 x 2 B = 118 kB for SD1.5 (SDXL 77 x 2048: 315 kB), but SD3's and FLUX's include
T5's states: (77 + 256) x 4096 x 2 B = 2.7 MB for SD3 and 512 x 4096 x 2 B = 4.2 MB for FLUX. Every 10,000
distinct captions take 1.2 GB for SD1.5, 3.2 GB for SDXL, 27 GB for SD3 and 42 GB for FLUX; an image's latents (mean
and std) take 2 x 16 x 64 x 64 x 2 B = 262 kB for SD3 and FLUX at 512 px. So for them the texts are what costs, in
proportion to their tokens (model.max_sequence_length shortens T5's). A Pick-a-Pic-sized cache, v2's train split
(959,040 rows, ties kept as the cache keeps them; 58,960 distinct prompts among its untied pairs: methods.md) for SD3
or FLUX at 512 px in fp16: latents 2 x 959,040 x 262 kB = 503 GB (1.0 TB with flips; four times that at 1024 px),
texts about 161 GB (SD3) or 247 GB (FLUX), 99 GB for SD3 at the configs/sd35 recipes' 128 T5 tokens, or
75 / 37 GB with model.max_sequence_length=77.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import T5_MAX_TOKENS
from ..files import write_safetensors_atomic, write_text_atomic
from ..models.conditioning import CaptionTruncation, TextStates, encode_texts
from ..models.loading import (check_resolution, component_digest, load_components, pipeline_family, pipeline_index,
                              place, text_subfolders, vae_config)
from ..progress import progress
from .pairs import IMAGE_COLUMNS, PairDataset, PairTransform, decode_image, load_pairs, pair_item, raw_images
from .shards import SHARD_RECORDS, differences, run_shards

logger = logging.getLogger("diffusion_align")

CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TEXT_COLUMNS = ("caption", "caption_0", "caption_1")  # DCPO's per-image captions are cached where present
LATENT_SHARD_ROWS = 1000  # SD1.5 at 512 px in fp16: 128 kB a row, 256 kB with flips
TEXT_SHARD_ROWS = 2048    # SD1.5: 118 kB a text in fp16
T5_TEXT_SHARD_ROWS = 64   # SD3 / FLUX, whose texts hold T5's states: 2.7 / 4.2 MB a text in fp16


def cache_key(source: str, split: str, pretrained: str, revision: str | None = None, variant: str | None = None,
              vae: str | None = None, resolution: int = 512, flips: bool = False, dtype: str = "fp16",
              max_sequence_length: int | None = None) -> dict:
    """Everything a cached tensor depends on: the source rows, the VAE and text encoders and tokenizers (digests of
    their files), T5's token count when not the pipeline's default, the preprocessing (resolution, centre crop,
    mirrored copies) and the storage dtype."""
    pairs, _ = load_pairs(source, split, keep_ties=True, extra_columns="all")
    # not the scheduler: no cached tensor depends on it, and a stale key is an error (the reference errors, which
    # do depend on it, add it to their own key: training.reference)
    models = encoder_digests(pretrained, revision, variant, vae)
    vae_settings = vae_config(pretrained, revision, vae)
    # SD3's and FLUX's VAEs also shift their latents (a key without one reads as 0, as earlier caches were made)
    shift = {"shift_factor": vae_settings["shift_factor"]} if vae_settings.get("shift_factor") else {}
    return {"source": {"path": source, "split": split, "rows": len(pairs), "fingerprint": pairs._fingerprint},
            "models": models, **t5_length(max_sequence_length),
            "scaling_factor": vae_settings.get("scaling_factor", 0.18215), **shift,
            "resolution": resolution, "crop": "center", "flips": flips, "dtype": dtype}


def t5_length(max_sequence_length: int | None) -> dict:
    """The key entry of T5's token count for data the text encoders made (a latent cache, reference errors): none at
    the pipeline's default, so that keys made before the setting existed stay valid."""
    return {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}


def encoder_digests(pretrained: str, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None) -> dict:
    """Digests of what turns a pair into the UNet's inputs (`component_digest`): the VAE (model.vae's replacement
    when given), the text encoders and their tokenizers."""
    models = {"vae": component_digest(vae, None, None, None) if vae else
              component_digest(pretrained, "vae", revision, variant)}
    for name in text_subfolders(pretrained, revision):
        models[name] = component_digest(pretrained, name, revision, variant)
        tokenizer = name.replace("text_encoder", "tokenizer")
        models[tokenizer] = component_digest(pretrained, tokenizer, revision, None)
    return models


def check_key(folder: Path, key: dict) -> dict | None:
    """The key `folder`'s cache was made with, where it is `key` (None: no cache yet); a cache made otherwise is an
    error. The source's path may be spelt otherwise (relative, absolute) where its fingerprint, which covers the
    files' resolved paths and times, is the same: the cache's own spelling is returned, which its shards record."""
    path = folder / "key.json"
    if not path.is_file():
        return None
    made = json.loads(path.read_text(encoding="utf-8"))
    source = made.get("source") or {}
    spelt = {**key, "source": {**key["source"], "path": source.get("path")}} \
        if source.get("fingerprint") == key["source"]["fingerprint"] else key
    if made != spelt:
        old, new = _flat(made), _flat(key)
        changed = differences(old, {name: new.get(name) for name in {**old, **new}})  # a key either lacks: None
        raise ValueError(f"{folder} is a latent cache made from other inputs ({changed}); a stale cache is never "
                         f"used: give data.cache_dir (or --out) a new folder, or delete this one")
    return made


def _flat(key: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in key.items():
        flat.update(_flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value})
    return flat


@dataclass
class CacheReport:
    rows: int
    texts: int
    skipped: int          # rows with an image that did not decode (kept as not ok)
    shards_reused: int
    folder: Path
    truncated: int = 0    # texts longer than the text encoder reads (cut there)

    def __str__(self) -> str:
        return (f"{self.folder}: {self.rows} rows ({self.skipped} with an undecodable image), {self.texts} texts "
                f"({self.truncated} cut at the text encoder's length); {self.shards_reused} shards kept from an "
                "earlier run")


class _SourceImages(torch.utils.data.Dataset):
    """Source rows [start, stop) decoded and preprocessed: each image plain and (with flips) mirrored."""

    def __init__(self, pairs, start: int, stop: int, transform: PairTransform, flips: bool):
        self.pairs, self.start, self.stop = raw_images(pairs), start, stop
        self.transform, self.flips = transform, flips

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        row = self.pairs[self.start + i]
        res, item = self.transform.resolution, {"ok": True}
        for k, column in enumerate(IMAGE_COLUMNS):
            try:
                image = decode_image(row[column], f"row {self.start + i}, column {column}")
            except ValueError as err:
                logger.warning("%s", err)
                item["ok"] = False
                image = None
            for flip in (False, True) if self.flips else (False,):
                pixels, size, crop = (self.transform.apply(image, flip, None) if image is not None else
                                      (torch.zeros(3, res, res), (res, res), (0, 0)))
                item[f"pixels_{k}{'_flip' if flip else ''}"] = pixels
                item[f"size_{k}"], item[f"crop_{k}"] = torch.tensor(size), torch.tensor(crop)
        return item


def build_cache(source: str, out_dir, pretrained: str, split: str = "train", revision: str | None = None,
                variant: str | None = None, vae: str | None = None, resolution: int = 512, flips: bool = False,
                dtype: str = "fp16", batch_size: int = 16, device: str | torch.device | None = None,
                num_workers: int = 2, max_sequence_length: int | None = None) -> CacheReport:
    """Encode every source row's images and every text into `out_dir` (resumable; see the module docstring);
    SD3's and FLUX's texts at `max_sequence_length` T5 tokens (None: the pipeline's default), the length the model
    is then trained and sampled at."""
    out_dir = Path(out_dir)
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size} and num_workers={num_workers}: expected at least 1 image a batch "
                         "and 0 or more workers")
    if max_sequence_length is not None and not 1 <= max_sequence_length <= T5_MAX_TOKENS:
        raise ValueError(f"max_sequence_length={max_sequence_length}: expected 1 to {T5_MAX_TOKENS} T5 tokens, what "
                         "the pipelines and model.max_sequence_length take")
    if resolution <= 0 or resolution % 8:  # every supported VAE downsamples by 8: the latents need whole pixels
        raise ValueError(f"resolution={resolution}: expected a positive multiple of 8 (the VAE downsamples by 8)")
    index = pipeline_index(pretrained, revision, what="--model")  # a missing folder or unreachable hub id: one line
    # a UNet family refuses a T5 length, a flow family a resolution whose latents are not whole tokens
    family, denoiser_config = pipeline_family(pretrained, index, revision, max_sequence_length)
    check_resolution(resolution, family, denoiser_config, pretrained, revision, vae)
    key = cache_key(source, split, pretrained, revision, variant, vae, resolution, flips, dtype, max_sequence_length)
    made = check_key(out_dir, key)
    if made is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "key.json", json.dumps(key, indent=2) + "\n")
    key = made or key  # as the shards record it
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = CACHE_DTYPES[dtype]
    compute = torch.float32 if device.type == "cpu" else store  # CPUs are slow in half precision
    loaded = []

    def encoders():
        """The VAE and text encoders, loaded when a first shard is to be made (a finished cache needs none)."""
        if not loaded:
            parts = load_components(pretrained, revision, variant, vae, denoiser=False,
                                    max_sequence_length=max_sequence_length)
            place(parts.vae, device, torch.float32 if parts.vae.config.get("force_upcast") else compute)
            for encoder in parts.text_encoders:
                place(encoder, device, compute)
            loaded.append(parts)
        return loaded[0]

    pairs, _ = load_pairs(source, split, keep_ties=True, extra_columns="all")
    transform = PairTransform(resolution, center_crop=True)
    settings = {"key": key}

    def latent_shard(start: int, stop: int, desc: str):
        loader = torch.utils.data.DataLoader(_SourceImages(pairs, start, stop, transform, flips),
                                             batch_size=batch_size, num_workers=num_workers)
        parts_of = {}
        for batch in progress(loader, desc=f"latents {desc}", leave=False):
            for name, value in batch.items():
                if name.startswith("pixels_"):
                    vae_model = encoders().vae
                    with torch.no_grad(), torch.autocast(device.type, enabled=False):
                        dist = vae_model.encode(value.to(device, vae_model.dtype)).latent_dist
                    stem = name.removeprefix("pixels_")
                    image, _, flip = stem.partition("_")
                    for stat in ("mean", "std"):
                        parts_of.setdefault(f"{stat}_{image}{'_' if flip else ''}{flip}", []).append(
                            getattr(dist, stat).to("cpu", store))
                else:
                    parts_of.setdefault(name, []).append(value)
        tensors = {name: torch.cat(values).contiguous() for name, values in parts_of.items()}
        tensors["ok"] = tensors["ok"].to(torch.uint8)
        return tensors, {"skipped": int((tensors["ok"] == 0).sum())}

    latent_records = run_shards(out_dir, len(pairs), LATENT_SHARD_ROWS, settings, latent_shard, stem="latents",
                                suffix=".safetensors", write=_write_tensors)

    columns = [c for c in TEXT_COLUMNS if c in pairs.column_names]
    found = pairs.select_columns(columns).with_format("arrow")[:]
    texts = sorted({t or "" for c in columns for t in found[c].to_pylist()} - {""})
    texts = ["", *texts]
    write_text_atomic(out_dir / "texts.json", json.dumps(texts, ensure_ascii=False) + "\n")

    truncation = CaptionTruncation()

    def text_shard(start: int, stop: int, desc: str):
        chunks, truncated = [], truncation.count
        parts = encoders()
        for at in progress(range(start, stop, batch_size * 4), desc=f"texts {desc}", leave=False):
            chunk = texts[at:min(at + batch_size * 4, stop)]
            truncation.check(parts.family, parts.tokenizers, chunk)
            chunks.append(encode_texts(parts.family, parts.tokenizers, parts.text_encoders, chunk))
        tensors = {"hidden": torch.cat([c.hidden for c in chunks]).to("cpu", store).contiguous()}
        if chunks[0].pooled is not None:
            tensors["pooled"] = torch.cat([c.pooled for c in chunks]).to("cpu", store).contiguous()
        return tensors, {"skipped": 0, "truncated": truncation.count - truncated}

    text_rows = TEXT_SHARD_ROWS if family.denoiser == "unet" else T5_TEXT_SHARD_ROWS
    text_records = run_shards(out_dir, len(texts), text_rows, {"key": key, "texts": len(texts)}, text_shard,
                              stem="texts", suffix=".safetensors", write=_write_tensors)
    loaded.clear()  # free the encoders before training starts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    records = latent_records + text_records
    return CacheReport(rows=len(pairs), texts=len(texts), skipped=sum(r["skipped"] for r, _ in latent_records),
                       shards_reused=sum(reused for _, reused in records), folder=out_dir,
                       truncated=sum(r.get("truncated", 0) for r, _ in text_records))


def _write_tensors(tensors: dict, path: Path) -> int:
    write_safetensors_atomic(tensors, path)
    return len(next(iter(tensors.values())))


class LatentCache:
    """Reads a finished cache (memory-mapped): posteriors by source row, text states by text."""

    def __init__(self, folder, key: dict | None = None):
        self.folder = Path(folder)
        if not (self.folder / "key.json").is_file() or not (self.folder / "texts.json").is_file():
            raise FileNotFoundError(f"{self.folder} is not a finished latent cache (no key.json or texts.json); "
                                    f"make it with `diffusion-align cache`")
        if key is not None:
            check_key(self.folder, key)
        self.key = json.loads((self.folder / "key.json").read_text(encoding="utf-8"))
        self.text_rows = {t: i for i, t in enumerate(json.loads((self.folder / "texts.json").read_text("utf-8")))}
        self._shards = {stem: self._shard_rows(stem) for stem in ("latents", "texts")}
        self._open = {}

    def _shard_rows(self, stem: str) -> list[tuple[int, int, Path]]:
        shards = []
        for record_path in sorted((self.folder / SHARD_RECORDS).glob(f"{stem}-*.json")):
            start, stop = json.loads(record_path.read_text(encoding="utf-8"))["rows"]
            shards.append((start, stop, self.folder / f"{record_path.stem}.safetensors"))
        return shards

    def _locate(self, stem: str, row: int):
        for start, stop, path in self._shards[stem]:
            if start <= row < stop:
                if path not in self._open:  # opened lazily: each DataLoader worker maps its own
                    self._open[path] = safe_open(path, "pt")
                return self._open[path], row - start
        raise KeyError(f"{self.folder}: no {stem} shard holds row {row}; the cache is unfinished (rerun "
                       f"`diffusion-align cache` to complete it)")

    def image(self, row: int, column: int, flip: bool) -> dict:
        """Source row `row`'s image `column` (0 or 1), mirrored or not: its posterior, original size and crop."""
        shard, j = self._locate("latents", row)
        if not shard.get_slice("ok")[j:j + 1].item():
            raise ValueError(f"row {row}: an image of this pair did not decode when the cache was built")
        suffix = "_flip" if flip else ""
        if flip and not self.key["flips"]:
            raise ValueError(f"{self.folder} holds no mirrored images (made without flips); rebuild it with flips")
        return {"mean": shard.get_slice(f"mean_{column}{suffix}")[j],
                "std": shard.get_slice(f"std_{column}{suffix}")[j],
                "original_size": tuple(shard.get_slice(f"size_{column}")[j].tolist()),
                "crop_top_left": tuple(shard.get_slice(f"crop_{column}")[j].tolist())}

    def texts(self, prompts: list[str]) -> TextStates:
        """The cached states of each prompt (one row each)."""
        hidden, pooled = [], []
        for prompt in prompts:
            if prompt not in self.text_rows:
                raise KeyError(f"{self.folder}: the text {prompt[:60]!r} is not cached (the cache's source has other "
                               f"captions)")
            shard, j = self._locate("texts", self.text_rows[prompt])
            hidden.append(shard.get_slice("hidden")[j])
            if "pooled" in shard.keys():
                pooled.append(shard.get_slice("pooled")[j])
        return TextStates(torch.stack(hidden), torch.stack(pooled) if pooled else None)


class CachedPairDataset(PairDataset):
    """`pairs.PairDataset` read from a latent cache: the same items (orientation, flip coins, extras) with each
    image's posterior (`mean_w`, `std_w`, ...) in place of its pixels. `pairs` needs a `source_row` column."""

    def __init__(self, pairs, cache: LatentCache, transform: PairTransform, seed: int, extra_columns=()):
        super().__init__(pairs.remove_columns([c for c in IMAGE_COLUMNS if c in pairs.column_names]), transform, seed,
                         extra_columns)
        self.cache = cache

    def item(self, row: dict, epoch: int, index: int) -> dict:
        """The training item of a row: its images' cached posteriors (`pair_item`)."""
        def images(order, generator):
            item = {}
            for suffix, column, flip in zip("wl", order, self.transform.flips(generator)):
                for name, value in self.cache.image(int(row["source_row"]), column, flip).items():
                    item[f"{name}_{suffix}"] = value
            return item
        return pair_item(row, epoch, index, self.seed, self.paired, self.plain, images)
