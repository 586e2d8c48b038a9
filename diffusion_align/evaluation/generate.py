"""Generate one image per (prompt, seed) with an SD1.x / SD2.x / SDXL, SD3 / SD3.5 or FLUX.1 pipeline, optionally
with a LoRA.

Output, in one folder: `p0003-s0002.png` (the prompt's number in the folder, the seed) and `metadata.jsonl` in the
Hugging Face imagefolder convention, one line per image: `file_name`, `prompt`, `seed`, `prompt_index` (the number
in the name), the settings (`model`, `lora`, `scheduler`, `steps`, `guidance`, `height`, `width`,
`negative_prompt`, `dtype`, and SD3's / FLUX's `max_sequence_length` when one is given), and
`nsfw_content_detected`: true where the pipeline's safety checker replaced the image with black (kept, so that a
rerun does not make it again), null where the pipeline has no checker.
`score`, `compare` and `label --from-images` read the prompts and seeds from it.

Seeds: each image's starting noise comes from its own CPU generator seeded with its seed, so it is the same whatever
the batch size, the other images of the batch or the device (diffusers' advice for reproducible noise). Pixels still
carry float rounding: about one level in 255 between batch sizes on CPU, more between devices or dtypes.

Resuming: an image is done once its metadata line is written. The image is written first (whole, by rename), its
line after (one append, flushed and fsynced), so a crash between the two leaves an image without a line, which the
next run makes again and overwrites; a line cut short is dropped. An image whose line is there but whose file is
gone is made again under its line. A prompt keeps its number across runs; prompts new to the folder get the next
numbers, and repeats in a prompts file are made once. A folder holds one set of settings: a rerun with others is an
error, so that comparisons between folders never mix them. The settings include `weights`, a digest of the
pipeline's files and the LoRA's (`models.loading.weights_digest`): a model or LoRA retrained at the same path is
other settings, never resumed as the old one. With `prune=True` a rerun instead removes the images of other
settings, prompts or seeds (lines first, then files), so the folder holds exactly this run's images.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data.shards import differences
from ..devices import default_device
from ..files import HUB_ID, jsonl_records, local_or_hub, write_image_atomic, write_text_atomic
from ..progress import progress
from .scoring import METADATA_NAME, PROMPT_KEYS

logger = logging.getLogger("diffusion_align")

PROMPT_FORMATS = (".txt", ".jsonl", ".csv")
# max_sequence_length is recorded only when given (a folder made before it existed holds none): a missing setting
# compares as None
SETTINGS = ("model", "lora", "weights", "scheduler", "steps", "guidance", "height", "width", "negative_prompt",
            "dtype", "max_sequence_length")
RECORD_KEYS = ("file_name", "prompt", "seed", "prompt_index")
# torch's CPU generator, which draws each image's noise, reads a seed's low 32 bits only: a larger seed would repeat
# a smaller one's image under another name
MAX_SEED = 2**32 - 1
_SEED_PART = re.compile(r"([0-9]+)(?:-([0-9]+))?")


# ---------------------------------------------------------------- prompts and seeds

def read_prompts(path) -> list[str]:
    """The prompts of a prompts file in file order (repeats included), each stripped of surrounding whitespace.

    `.txt`: one prompt a line; blank lines and lines starting with "#" are skipped. `.jsonl`: one JSON object a line
    with "prompt", "text" or "caption" (the first present wins; other keys are ignored). `.csv`: a header row with a
    prompt, text or caption column (any case). An empty prompt or a malformed line is an error naming file:line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FORMATS:
        raise ValueError(f"{path}: expected a prompts file ending in {', '.join(PROMPT_FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (spreadsheet exports) is no prompt
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    read = {".txt": _txt_prompts, ".jsonl": _jsonl_prompts, ".csv": _csv_prompts}[suffix]
    prompts = []
    for where, key, value in read(text, path):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{where}: expected "{key}" to be a non-empty string, got {value!r}')
        prompts.append(value.strip())
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def _txt_prompts(text: str, path: Path):
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield f"{path}:{lineno}", "prompt", line


def _jsonl_prompts(text: str, path: Path):
    for where, record in jsonl_records(text, path):
        key = next((k for k in PROMPT_KEYS if record.get(k) is not None), None) if isinstance(record, dict) else None
        if key is None:
            raise ValueError(f"{where}: expected a JSON object with one of the keys {', '.join(PROMPT_KEYS)}, "
                             f"got {json.dumps(record)[:80]}")
        yield where, key, record[key]


def _csv_prompts(text: str, path: Path):
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        key = next((k for k in PROMPT_KEYS if k in header), None)
        if key is None:
            raise ValueError(f"{path}:1: expected a header row with a column named {' / '.join(PROMPT_KEYS)}, "
                             f"found {header}")
        column = header.index(key)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{reader.line_num}"  # the line the row ends on (a quoted prompt may span lines)
            if column >= len(row):
                raise ValueError(f"{where}: expected a {key} in column {column + 1}, the row has {len(row)} fields")
            yield where, key, row[column]
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None


def parse_seeds(text: str) -> list[int]:
    """Comma-separated seeds and inclusive ranges, in the order given: "0-3" -> [0, 1, 2, 3]; "0-3,10"; "7"."""
    seeds = []
    for part in text.split(","):
        match = _SEED_PART.fullmatch(part.strip())
        if not match:
            raise ValueError(f"seeds {text!r}: cannot read {part.strip()!r}; expected non-negative integers and "
                             "ranges, e.g. 0-3 or 0,2,5 or 0-3,10")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ValueError(f"seeds {text!r}: the range {part.strip()} runs backwards; write {last}-{first}")
        if last > MAX_SEED:  # checked before the range is built
            raise ValueError(f"seeds {text!r}: {last} is past the largest seed, {MAX_SEED}")
        seeds += range(first, last + 1)
    return _checked_seeds(seeds, repr(text))


def _checked_seeds(seeds: Sequence[int], given: str) -> list[int]:
    seen = set()
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seeds {given}: expected integers from 0 to {MAX_SEED}, got {seed!r}")
        if seed in seen:  # the same image twice: most likely overlapping ranges by mistake
            raise ValueError(f"seeds {given}: seed {seed} is given twice")
        seen.add(seed)
    if not seeds:
        raise ValueError(f"seeds {given}: expected at least one seed")
    return list(seeds)


# ---------------------------------------------------------------- the folder's metadata

def read_records(path: Path) -> list[tuple[str, dict]]:
    """(file:line, record) for each line of the metadata.jsonl a generate run wrote. A last line without a line break
    is read as the others where it is whole (JSON), and given its break; otherwise it is a line cut short by a crash,
    removed from the file once every other line is known to be generate's, and its image is made again."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    tail = raw[end:]
    try:
        text = raw[:end].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    whole_tail = bool(tail) and _is_json(tail)
    records = _generated_records(text + (tail.decode("utf-8") + "\n" if whole_tail else ""), path)
    if tail and not whole_tail and not records and not tail.startswith(b'{"file_name"'[:len(tail)]):
        raise ValueError(f"{path}: expected lines written by diffusion-align generate, got {tail[:80]!r}; generate "
                         "into another folder")  # its only line, not one of generate's cut short: not ours to cut
    if whole_tail:
        with path.open("ab") as f:
            f.write(b"\n")
    elif tail:
        logger.warning("%s: dropped a last line cut short by an interrupted run; its image is made again", path)
        os.truncate(path, end)
    return records


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included; a generate line cut short never parses (no closing brace)
        return False
    return True


def _generated_records(text: str, path: Path) -> list[tuple[str, dict]]:
    records, files, jobs = [], {}, {}
    for where, record in jsonl_records(text, path):
        if not isinstance(record, dict) or not _is_generated(record):
            raise ValueError(f"{where}: expected a line written by diffusion-align generate (with "
                             f"{', '.join(RECORD_KEYS)} and the settings), got {json.dumps(record)[:80]}; generate "
                             f"into another folder")
        for seen, key in ((files, record["file_name"]), (jobs, (record["prompt"], record["seed"]))):
            if key in seen:
                raise ValueError(f"{where}: {key} is already described at {seen[key]}")
            seen[key] = where
        records.append((where, record))
    return records


def _is_generated(record: dict) -> bool:
    name, prompt, seed, number = (record.get(k) for k in RECORD_KEYS)
    return (isinstance(name, str) and name == Path(name).name and isinstance(prompt, str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (seed, number)))


def _lines(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _changed_settings(record: dict, settings: dict) -> str:
    """How a metadata line's settings differ from `settings` ("" when they do not)."""
    return differences({k: record.get(k) for k in SETTINGS}, {k: settings.get(k) for k in SETTINGS})


def _append_lines(path: Path, records: list[dict]) -> None:
    """One write of whole lines, flushed to disk: a crash leaves whole lines and at most one cut short at the end."""
    with path.open("a", encoding="utf-8") as f:
        f.write(_lines(records))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- the pipeline

def _source(name: str, what: str) -> str:
    """A local path made absolute (so metadata names it from anywhere), or a hub id as given."""
    if os.path.exists(name) or HUB_ID.fullmatch(name):
        return local_or_hub(name)
    raise FileNotFoundError(f"{what} {name!r}: no such file or folder, and not a hub id (owner/name)")


def _trained_lora(lora: str) -> str:
    """The LoRA a folder stands for (`export.weights_folder`): a run's final/ or newest checkpoint, and a checkpoint
    of a run that keeps an EMA of its weights its `ema/`, the LoRA the run's final/ would hold (the LoRA file of the
    checkpoint itself, given as a file, is the live weights training resumes from).
    Refused, each saying what to do instead (`export.weights_kind` tells them apart): a sharded checkpoint, whose
    weights `export` gathers, and a whole pipeline (a full fine-tune's final/) or full fine-tune's checkpoint, which
    are not LoRAs."""
    from ..models.export import weights_folder, weights_kind

    if os.path.isdir(lora):  # a run folder, its final/ or a checkpoint: the weights it stands for
        lora = str(weights_folder(Path(lora)))
    kind = weights_kind(Path(lora))
    if kind == "sharded":
        raise ValueError(f"--lora {lora}: a sharded (fsdp2) checkpoint, whose LoRA is in shards; gather it into one "
                         f"file first: diffusion-align export {lora} --format diffusers --out LORA_FOLDER")
    if kind == "pipeline":
        raise ValueError(f"--lora {lora}: a whole pipeline (model_index.json), not a LoRA; generate from it with "
                         f"--model {lora}")
    if kind in ("unet", "transformer"):
        raise ValueError(f"--lora {lora}: a full fine-tune's checkpoint (a whole {kind}/), not a LoRA; export it "
                         f"as a pipeline first: diffusion-align export {lora} --format merged --out FOLDER, then "
                         f"generate with --model FOLDER")
    return lora


def load_pipeline(model: str, lora: str | None = None, scheduler: str | None = None, device=None, dtype=None):
    """A text-to-image pipeline on `device` in `dtype`, with the LoRA loaded and the scheduler swapped.

    `model`: a hub id or a diffusers pipeline folder. `lora`: a folder or file `pipe.load_lora_weights` reads.
    `scheduler`: the class name of a scheduler compatible with the pipeline's, built from its config (so it keeps
    the checkpoint's noise schedule and prediction type).
    """
    from diffusers import DiffusionPipeline

    from ..models.families import FAMILIES
    from ..models.loading import pipeline_index
    from ..models.policy import LORA_WEIGHTS, check_lora_naming

    pipeline_index(model, what="model")  # not a pipeline, or out of reach: one line
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    text_to_image = list(dict.fromkeys(family.lora_pipeline for family in FAMILIES.values()))
    if type(pipe).__name__ not in text_to_image:
        raise ValueError(f"{model} loads a {type(pipe).__name__}; expected a text-to-image pipeline of the families "
                         f"diffusion-align trains ({', '.join(text_to_image)})")
    if scheduler is not None:
        compatible = {cls.__name__: cls for cls in pipe.scheduler.compatibles}
        if scheduler not in compatible:
            raise ValueError(f"unknown scheduler {scheduler!r} for {type(pipe).__name__}; expected one of "
                             f"{', '.join(sorted(compatible))}")
        pipe.scheduler = compatible[scheduler].from_config(pipe.scheduler.config)
    if lora is not None:
        file = Path(lora) / LORA_WEIGHTS if os.path.isdir(lora) else Path(lora)
        if file.suffix == ".safetensors" and file.is_file():
            check_lora_naming(file)
        try:
            pipe.load_lora_weights(lora)
        except OSError as err:  # diffusers' "no file named ... found": bad input, not a failed write
            raise ValueError(f"--lora {lora}: cannot load a LoRA from it ({err})") from None
        denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        loaded = pipe.get_list_adapters()  # diffusers only warns where no key is for the pipeline's denoiser
        if denoiser not in loaded:
            raise ValueError(f"--lora {lora}: none of its weights loaded onto the {denoiser} of this "
                             f"{type(pipe).__name__} ({'only its ' + ', '.join(loaded) if loaded else 'none at all'}): "
                             "a LoRA of another model family? Generate with the base it was trained on")
    pipe.set_progress_bar_config(disable=True)  # one bar over all images, not one per call
    return pipe.to(device)


def _check_size(model: str, height: int | None, width: int | None) -> None:
    """Refuse a size off the transformer's latent patches as training does (`loading.check_resolution`), before any
    image: FLUX rounds it down with a warning only, so the images would not be the size recorded."""
    from ..models.loading import check_resolution, pipeline_family, pipeline_index
    if height is None and width is None:
        return
    family, denoiser_config = pipeline_family(model, pipeline_index(model, what="model"))
    for name, side in (("height", height), ("width", width)):
        if side is not None:
            check_resolution(side, family, denoiser_config, model, name=name)


def _settings(pipe, model: str, lora: str | None, steps: int | None, guidance: float | None, height: int | None,
              width: int | None, negative_prompt: str | None, dtype: torch.dtype, t5: dict) -> dict:
    """The settings as they take effect: the pipeline's defaults filled in, so two runs compare by value. `t5`:
    the pipeline call's {"max_sequence_length": tokens} when one is given (recorded then only), which a pipeline
    without T5 refuses; a negative prompt the pipeline would ignore is refused too."""
    from ..models.loading import weights_digest
    defaults = inspect.signature(type(pipe).__call__).parameters
    if t5 and "max_sequence_length" not in defaults:
        raise ValueError(f"max_sequence_length={t5['max_sequence_length']}: a {type(pipe).__name__} has no T5 text "
                         "encoder and takes no max_sequence_length; it is an SD3 and FLUX setting")
    if negative_prompt is not None and "true_cfg_scale" in defaults:  # FLUX: read only with true CFG, not run here
        raise ValueError(f"negative_prompt={negative_prompt!r}: a {type(pipe).__name__} ignores it unless it runs "
                         "true classifier-free guidance (true_cfg_scale > 1), which generate does not; FLUX.1 is "
                         "guidance-distilled: leave the negative prompt out")
    # what the pipelines draw by default: their denoiser's sample size in latents (FLUX: a fixed 128), in pixels
    size = (getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return {"model": model, "lora": lora, "weights": weights_digest(model, lora),
            "scheduler": type(pipe.scheduler).__name__,
            "steps": steps or defaults["num_inference_steps"].default,
            "guidance": float(defaults["guidance_scale"].default if guidance is None else guidance),
            "height": height or size, "width": width or size, "negative_prompt": negative_prompt,
            "dtype": str(dtype).removeprefix("torch."), **t5}


# ---------------------------------------------------------------- generate_images

@dataclass
class _Job:
    file_name: str
    prompt: str
    seed: int
    prompt_index: int
    listed: bool  # its metadata line is there already (the image was deleted): not written again


@dataclass
class GenerateReport:
    out_dir: Path
    metadata: Path
    settings: dict
    prompts: int  # distinct prompts of this run
    repeated_prompts: int  # lines of the prompts file repeating an earlier one: made once
    seeds: list[int]
    generated: int  # images made by this run
    kept: int  # images of this run's prompts and seeds already in the folder, not made again
    blacked_out: list[str]  # made by this run, replaced with black by the safety checker

    def __str__(self) -> str:
        s = self.settings
        lora = f" + LoRA {s['lora']}" if s["lora"] else ""
        lines = [f"{self.out_dir}: generated {self.generated} images, kept {self.kept} from an earlier run "
                 f"({self.prompts} prompts x {len(self.seeds)} seeds); metadata: {self.metadata}",
                 f"  {s['model']}{lora}: {s['scheduler']}, {s['steps']} steps, guidance {s['guidance']:g}, "
                 f"{s['width']}x{s['height']} px"
                 + ("" if s["negative_prompt"] is None else f", negative prompt {s['negative_prompt']!r}")
                 + (f", {s['max_sequence_length']} T5 tokens" if "max_sequence_length" in s else "")]
        if self.repeated_prompts:
            lines.append(f"  {self.repeated_prompts} repeated prompt lines: each prompt is generated once")
        if self.blacked_out:
            lines.append(f"  {len(self.blacked_out)} images were blacked out by the pipeline's safety checker "
                         f"(nsfw_content_detected in the metadata), e.g. {', '.join(self.blacked_out[:5])}")
        return "\n".join(lines)


def generate_images(model: str, prompts_file, seeds: str | Sequence[int], out_dir, lora: str | None = None,
                    steps: int | None = None, guidance: float | None = None, height: int | None = None,
                    width: int | None = None, batch_size: int = 4, scheduler: str | None = None, device=None,
                    dtype: torch.dtype | None = None, negative_prompt: str | None = None,
                    prune: bool = False, max_sequence_length: int | None = None) -> GenerateReport:
    """Generate every (prompt, seed) of `prompts_file` (see `read_prompts`) x `seeds` (a list, or text for
    `parse_seeds`) not yet in `out_dir`; see the module docstring for the files and how a rerun resumes.

    `steps`, `guidance`, `height`, `width` default to the pipeline's own (50 steps; guidance 7.5 for SD, 5.0 for
    SDXL; the checkpoint's native size). `batch_size`: images per pipeline call. `device`: default cuda when
    available; `dtype`: default float16 on cuda, float32 elsewhere. See `load_pipeline` for model, lora, scheduler.
    `prune`: remove the folder's images of other settings, prompts or seeds instead of refusing other settings.
    `max_sequence_length`: the T5 tokens SD3 / FLUX encode prompts to (default: the pipeline's, 256 / 512); a model
    trained with model.max_sequence_length is sampled at that length.
    """
    prompts = read_prompts(prompts_file)
    distinct = list(dict.fromkeys(prompts))
    seeds = parse_seeds(seeds) if isinstance(seeds, str) else _checked_seeds(seeds, repr(seeds))
    if batch_size < 1 or (steps is not None and steps < 1):
        raise ValueError(f"batch_size and steps must be >= 1, got {batch_size} and {steps}")
    if max_sequence_length is not None and max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be >= 1 (T5 tokens), got {max_sequence_length}")
    for name, side in (("height", height), ("width", width)):
        if side is not None and (side < 8 or side % 8):
            raise ValueError(f"{name} must be a positive multiple of 8 (the pipelines' rule), got {side}")
    out_dir = Path(out_dir)
    metadata = out_dir / METADATA_NAME
    records = read_records(metadata)  # before the model loads: a bad folder fails fast

    device = default_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    model, lora = _source(str(model), "model"), None if lora is None else _trained_lora(_source(str(lora), "LoRA"))
    pipe = load_pipeline(model, lora, scheduler, device, dtype)  # first: it names a pipeline of no family
    _check_size(model, height, width)
    t5 = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    settings = _settings(pipe, model, lora, steps, guidance, height, width, negative_prompt, dtype, t5)
    if prune:
        records = _prune(records, settings, {(p, s) for p in distinct for s in seeds}, metadata)
    for where, record in records:
        changed = _changed_settings(record, settings)
        if changed:
            raise ValueError(f"{where}: {out_dir} was generated with other settings ({changed}); rerun with the "
                             f"same settings to resume, or generate into another folder")

    todo, kept = _jobs(records, distinct, seeds, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blacked_out = []
    with progress(total=len(todo), unit="img", desc=f"generating {out_dir}") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            out = pipe(prompt=[job.prompt for job in batch],
                       negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch),
                       num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                       height=settings["height"], width=settings["width"], output_type="pil",
                       generator=[torch.Generator().manual_seed(job.seed) for job in batch], **t5)
            flags = getattr(out, "nsfw_content_detected", None)  # SDXL has no checker; SD's may be switched off
            lines = []
            for k, (job, image) in enumerate(zip(batch, out.images)):
                nsfw = None if flags is None else bool(flags[k])
                write_image_atomic(image, out_dir / job.file_name)
                if nsfw:
                    blacked_out.append(job.file_name)
                if not job.listed:
                    lines.append({"file_name": job.file_name, "prompt": job.prompt, "seed": job.seed,
                                  "prompt_index": job.prompt_index, **settings,
                                  "nsfw_content_detected": nsfw})
            if lines:
                _append_lines(metadata, lines)  # after the images: the line is what marks an image done
            bar.update(len(batch))
    if blacked_out:
        logger.warning("%s: the safety checker blacked out %d images, e.g. %s", out_dir, len(blacked_out),
                       blacked_out[0])
    return GenerateReport(out_dir, metadata, settings, len(distinct), len(prompts) - len(distinct), seeds,
                          len(todo), kept, blacked_out)


def _prune(records: list[tuple[str, dict]], settings: dict, wanted: set, metadata: Path) -> list[tuple[str, dict]]:
    """The records of `settings` and a wanted (prompt, seed); the others' lines are removed from `metadata` (one
    atomic rewrite), then their images, so a crash between the two leaves only unlisted files."""
    kept = [(w, r) for w, r in records if (r["prompt"], r["seed"]) in wanted and not _changed_settings(r, settings)]
    if len(kept) < len(records):
        logger.info("%s: removing %d images of other settings, prompts or seeds", metadata.parent,
                    len(records) - len(kept))
        write_text_atomic(metadata, _lines(r for _, r in kept))
        listed = {r["file_name"] for _, r in kept}
        for _, record in records:
            if record["file_name"] not in listed:
                (metadata.parent / record["file_name"]).unlink(missing_ok=True)
    return kept


def _jobs(records: list[tuple[str, dict]], prompts: list[str], seeds: list[int],
          out_dir: Path) -> tuple[list[_Job], int]:
    """The (prompt, seed) images still to make, prompt by prompt, and how many are there already."""
    done = {(r["prompt"], r["seed"]): r for _, r in records}
    numbers = {}
    for _, record in records:
        numbers.setdefault(record["prompt"], record["prompt_index"])
    next_number = max(numbers.values(), default=-1) + 1
    todo, kept = [], 0
    for prompt in prompts:
        if prompt not in numbers:
            numbers[prompt], next_number = next_number, next_number + 1
        for seed in seeds:
            record = done.get((prompt, seed))
            if record is not None and (out_dir / record["file_name"]).is_file():
                kept += 1
            elif record is not None:
                todo.append(_Job(record["file_name"], prompt, seed, record["prompt_index"], listed=True))
            else:
                todo.append(_Job(f"p{numbers[prompt]:04d}-s{seed:04d}.png", prompt, seed, numbers[prompt], False))
    return todo, kept
