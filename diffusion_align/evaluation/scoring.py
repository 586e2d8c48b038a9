"""Score every image under a folder with one or more reward models.

Writes one CSV row per image (`file` relative to the folder, `prompt`, `seed` where known, one column per scorer)
and, beside the CSV, `<stem>.summary.json` (per scorer: convention, overall and per-prompt mean / population std
(ddof=0) / count, plus the files that could not be read) and a histogram `<stem>.<column>.png` per scorer.

Prompts come from `metadata.jsonl` files (the Hugging Face imagefolder convention: `file_name` relative to the
folder holding the metadata, and `prompt`, `text` or `caption`, optionally `seed`), else from a `.txt` with the
image's stem beside it, else from the `prompt` argument. Hidden files and folders (a leading ".") are ignored, and so
are the files a run writes (names starting with the CSV's stem and a dot, beside the CSV).

A rerun with the same CSV scores only the images not in it yet; rows are appended a batch at a time with one write,
so an interrupted run leaves whole rows (a cut-short last row is dropped on the next run). The rows of images changed
or deleted since they were scored are dropped. A CSV resumes only with the folder, scorers (their weights and dtype)
and JPEG decoding that made it. The summary and histograms always cover every row in the CSV.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch
from matplotlib.figure import Figure

from ..data.shards import differences, preprocessing_entry
from ..files import jsonl_records, write_text_atomic, written_beside
from ..images import to_rgb
from ..progress import progress
from .plots import as_text

logger = logging.getLogger("diffusion_align")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"
SUMMARY_SUFFIX = ".summary.json"  # what `score` writes beside its CSV, X.csv: X.summary.json
PROMPT_KEYS = ("prompt", "text", "caption")  # the caption columns imagefolder datasets use; the first present wins
# "stamp": the image file's size and modification time when it was scored, so that an image replaced under the same
# name is scored again (a CSV from before stamps, without the column, is still read and resumed by names)
BASE_COLUMNS = ("file", "prompt", "seed", "stamp")
UNSTAMPED_COLUMNS = BASE_COLUMNS[:3]


class ScoringError(ValueError):
    """A problem with the inputs (folder, metadata, CSV) that the user can fix; the message names the place."""


@dataclass(frozen=True)
class ImageEntry:
    file: str  # path relative to the scored folder, "/"-separated: the CSV key
    prompt: str | None
    seed: int | None


def _walk(root: Path):
    """Every non-hidden file under `root`, hidden folders pruned."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (Path(dirpath, name) for name in filenames if not name.startswith("."))


def image_folder(path) -> Path:
    """`path`, a folder of images to read; FileNotFoundError naming it where there is no such folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    return path


def find_images(root) -> list[Path]:
    """All images under `root` (recursive, extensions case-insensitive, hidden files and folders left out), sorted
    by their path relative to `root`."""
    root = image_folder(root)
    files = list(_walk(root))
    plots = _score_plots(files)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p not in plots]
    return sorted(images, key=lambda p: p.relative_to(root).as_posix())


def _score_plots(files: list[Path]) -> set[Path]:
    """The histograms a `score` whose CSV lies in the folder wrote beside it, as its summary names their scorers
    (`output_paths`): plots, not images of the folder, for every command that reads it."""
    plots = set()
    for summary in (f for f in files if f.name.endswith(SUMMARY_SUFFIX)):
        try:
            columns = list(json.loads(summary.read_text(encoding="utf-8"))["scorers"])
        except (OSError, ValueError, KeyError, TypeError):  # another tool's JSON
            continue
        plots.update(output_paths(summary.with_name(summary.name.removesuffix(SUMMARY_SUFFIX) + ".csv"),
                                  columns)[1].values())
    return plots


class OutsideTheFolder(ScoringError):
    """A metadata.jsonl line naming a file outside the folder it describes."""


def read_metadata(root) -> dict[str, tuple[str | None, int | None]]:
    """(prompt, seed) for each image named in a metadata.jsonl under `root`, keyed by path relative to `root`."""
    root = Path(root)
    found: dict[str, tuple[str | None, int | None]] = {}
    where: dict[str, str] = {}
    for meta in sorted(p for p in _walk(root) if p.name == METADATA_NAME):
        try:
            text = meta.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ScoringError(f"{meta}: not UTF-8 text ({err})") from None
        folder = os.path.relpath(meta.parent, root)
        for here, record in jsonl_records(text, meta, ScoringError):
            try:
                file, prompt, seed = _metadata_record(record, here, folder)
            except OutsideTheFolder as err:  # it describes no image of this folder: the others are still read
                logger.warning("%s; line skipped", err)
                continue
            if file in where:
                raise ScoringError(f"{here}: {file} is already described at {where[file]}")
            found[file], where[file] = (prompt, seed), here
    return found


def _metadata_record(record, here: str, folder: str) -> tuple[str, str | None, int | None]:
    if not isinstance(record, dict):
        raise ScoringError(f"{here}: expected a JSON object, got {type(record).__name__}")
    name = record.get("file_name")
    if not isinstance(name, str) or not name:
        raise ScoringError(f'{here}: expected "file_name" (the image path relative to this metadata.jsonl), '
                           f"got {name!r}")
    file = os.path.normpath(os.path.join(folder, name))
    if os.path.isabs(name) or file == ".." or file.startswith(".." + os.sep):
        raise OutsideTheFolder(f"{here}: file_name {name!r} points outside the scored folder")
    key = next((k for k in PROMPT_KEYS if record.get(k) is not None), None)
    prompt = None if key is None else record[key]
    if prompt is not None and not isinstance(prompt, str):
        raise ScoringError(f'{here}: expected "{key}" to be a string, got {prompt!r}')
    seed = record.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ScoringError(f'{here}: expected "seed" to be an integer, got {seed!r}')
    return Path(file).as_posix(), prompt, seed


def _txt_prompt(image: Path) -> str | None:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return txt.read_text(encoding="utf-8").strip() or None
    except UnicodeDecodeError as err:
        raise ScoringError(f"{txt}: not UTF-8 text ({err})") from None


def collect_images(root, prompt: str | None = None, images: Sequence[Path] | None = None) -> list[ImageEntry]:
    """Each image under `root` (or the given `images`) with its prompt (metadata, .txt, `prompt`) and seed."""
    root = Path(root)
    metadata = read_metadata(root)
    entries = []
    for path in find_images(root) if images is None else images:
        file = path.relative_to(root).as_posix()
        meta_prompt, seed = metadata.get(file, (None, None))
        text = meta_prompt if meta_prompt is not None else _txt_prompt(path)
        entries.append(ImageEntry(file, text if text is not None else prompt, seed))
    stray = sorted(metadata.keys() - {e.file for e in entries})
    if stray:  # usually a typo in file_name; that image then falls back to a .txt or --prompt
        logger.warning("%s: %d metadata.jsonl entries name no image found there, e.g. %s", root, len(stray), stray[0])
    return entries


def open_image(path: Path, draft_size: int | None) -> PIL.Image.Image:
    """Decode fully now, so truncated files fail here; ValueError with the reason. The pixels as stored, as the
    reward models' own code reads them (an EXIF orientation is not applied).

    `draft_size`: let the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT while both sides stay >= it (other
    formats ignore it). The preprocessing then shrinks less; the result is close to, not equal to, a full decode.
    """
    try:
        with PIL.Image.open(path) as image:
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))
            return to_rgb(image)
    except PIL.UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"cannot decode image ({type(err).__name__}: {err})") from None


def _input_size(preprocessors: list) -> int:
    """The largest side any scorer's preprocess outputs: JPEGs decoded at least this large lose nothing it keeps."""
    probe = PIL.Image.new("RGB", (1024, 1024))
    return max(max(preprocess(probe).shape[-2:]) for preprocess in preprocessors)


class _ImageDataset(torch.utils.data.Dataset):
    """Opens one image and runs every scorer's (model-free) preprocess on it; runs in DataLoader workers."""

    def __init__(self, root: Path, files: list[str], preprocessors: list, draft_size: int | None):
        self.root, self.files, self.preprocessors, self.draft_size = root, files, preprocessors, draft_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        try:
            image = open_image(self.root / self.files[index], self.draft_size)
        except ValueError as err:
            return {"index": index, "error": str(err)}
        return {"index": index, "pixels": [preprocess(image) for preprocess in self.preprocessors]}


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if "error" not in it]
    pixels = [torch.stack(stack) for stack in zip(*(it["pixels"] for it in good))]
    return {"errors": [(it["index"], it["error"]) for it in items if "error" in it],
            "indices": [it["index"] for it in good], "pixels": pixels}


def _score(scorer, pixels: torch.Tensor, prompts: list[str], batch_size: int) -> list[float]:
    out = []
    for start in range(0, len(prompts), batch_size):
        scores = scorer.score_batch(pixels[start:start + batch_size], prompts[start:start + batch_size])
        if tuple(scores.shape) != (len(prompts[start:start + batch_size]),):
            raise RuntimeError(f"scorer {scorer.name}: score_batch returned shape {tuple(scores.shape)} for "
                               f"{len(prompts[start:start + batch_size])} images")
        out += [float(_cell(v)) for v in scores.tolist()]  # as the CSV holds them: a cached score equals a fresh one
    return out


def read_scores(path) -> tuple[list[str], list[dict]]:
    """Header and typed rows of a scores CSV (seed int or None, every score column float).

    A last row cut short by an interrupted write is dropped (and the file rewritten without it); any other
    malformed row is a ScoringError naming the line.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.end < len(raw):
            raise ScoringError(f"{path}: not UTF-8 text ({err})") from None
        text = raw[:err.start].decode("utf-8")  # a character cut in two by an interrupted write: dropped below
    buf = io.StringIO(text, newline="")
    reader = csv.reader(buf, strict=True)
    records, line_ends, cut = [], [], False
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if buf.tell() < len(text):
                raise ScoringError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
            cut = True  # the file ends inside a quoted prompt: an interrupted write
            break
        records.append(record)
        line_ends.append(reader.line_num)
    if records and not cut and not text.endswith("\n"):
        records.pop()  # the last write stopped before its line break
        line_ends.pop()
        cut = True
    if not records:
        return [], []
    header = records[0]
    if len(set(header)) != len(header) or not (header[:len(BASE_COLUMNS)] == list(BASE_COLUMNS) or
                                               header[:3] == list(UNSTAMPED_COLUMNS) and "stamp" not in header):
        raise ScoringError(f"{path}: expected a scores CSV with columns {list(BASE_COLUMNS)} + one per scorer, "
                           f"found {header}")
    score_columns = score_columns_of(header)
    rows, seen = [], {}
    for record, line in zip(records[1:], line_ends[1:]):
        row = _typed_row(header, record, score_columns, f"{path}:{line}")
        if row["file"] in seen:
            raise ScoringError(f"{path}:{line}: {row['file']} already has a row (line {seen[row['file']]})")
        seen[row["file"]] = line
        rows.append(row)
    if cut:
        logger.warning("%s: dropped a last row cut short by an interrupted run", path)
        _write_rows(path, header, rows, mode="w")
    return header, rows


def score_columns_of(header: list[str]) -> list[str]:
    return header[len(BASE_COLUMNS) if "stamp" in header else len(UNSTAMPED_COLUMNS):]


def image_stamp(path: Path) -> str:
    """The file's size and modification time (ns): what make and rsync compare to see a file changed."""
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _typed_row(header: list[str], record: list[str], score_columns: list[str], where: str) -> dict:
    if len(record) != len(header):
        raise ScoringError(f"{where}: expected {len(header)} fields ({', '.join(header)}), found {len(record)}")
    row = dict(zip(header, record))
    try:
        row["seed"] = int(row["seed"]) if row["seed"] else None
        row.update({c: float(row[c]) for c in score_columns})
    except ValueError as err:
        raise ScoringError(f"{where}: expected an integer seed and numeric scores ({err})") from None
    return row


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode's escapes of bytes that are not UTF-8
        return False
    return True


def _write_rows(path: Path, header: list[str], rows: list[dict], mode: str = "a") -> None:
    """Append (or, with mode "w", atomically rewrite) whole rows with one write, so a crash never splits one."""
    buf = io.StringIO()
    # "\r\n" line ends: prompts with "\r" or "\n" get quoted; extrasaction: a CSV from before stamps goes on without
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    if mode == "w":
        writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    if mode == "w":
        with written_beside(path) as tmp:
            tmp.write_bytes(buf.getvalue().encode("utf-8"))
    else:
        with path.open("a", newline="", encoding="utf-8") as f:
            f.write(buf.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    return format(value, ".9g") if isinstance(value, float) else str(value)  # 9 digits: float32 round trips


def _stats(values: list[float], extremes: bool = False) -> dict:
    """count, mean, population std (and min, max); null where there are no values or a NaN (JSON has no NaN)."""
    names = ("mean", "std", "min", "max") if extremes else ("mean", "std")
    if not values:
        return {"count": 0} | dict.fromkeys(names)
    v = np.asarray(values, dtype=np.float64)
    stats = {"mean": v.mean(), "std": v.std(), "min": v.min(), "max": v.max()}
    return {"count": len(v)} | {k: float(stats[k]) if math.isfinite(stats[k]) else None for k in names}


def summarize(rows: list[dict], scorers) -> dict:
    """Per scorer: convention, overall count/mean/std/min/max and the same per prompt (sorted by prompt)."""
    out = {}
    for scorer in scorers:
        values = [r[scorer.column] for r in rows]
        by_prompt: dict[str, list[float]] = {}
        for r in rows:
            by_prompt.setdefault(r["prompt"], []).append(r[scorer.column])
        out[scorer.column] = {
            "scorer": scorer.name, "convention": scorer.convention, **_stats(values, extremes=True),
            "per_prompt": [{"prompt": p, **_stats(v)} for p, v in sorted(by_prompt.items())],
        }
    return out


def plot_histogram(values: list[float], path: Path, title: str, xlabel: str) -> None:
    """A PNG histogram, written atomically; pyplot is never touched, so no GUI backend or global state."""
    finite = [v for v in values if math.isfinite(v)]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.hist(finite, bins=min(50, max(10, len(finite) // 10)), color="tab:blue")
    ax.set_title(as_text(title), fontsize=10)  # the folder's name
    ax.set_xlabel(as_text(xlabel), fontsize=8, wrap=True)
    ax.set_ylabel("images")
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts
    with written_beside(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


@dataclass
class ScoreReport:
    root: Path
    csv: Path
    summary_path: Path
    histograms: dict[str, Path]
    rows: list[dict]  # every row in the CSV, earlier runs' included
    scored: int  # images scored by this run
    resumed: int  # images already in the CSV, not scored again
    unreadable: list[tuple[str, str]]  # (file relative to root, reason): skipped, retried by the next run
    summary: dict

    def __str__(self) -> str:
        lines = [f"{self.root}: scored {self.scored} images, {self.resumed} already in {self.csv}, "
                 f"{len(self.unreadable)} unreadable; {len(self.rows)} rows in all"]
        for column, s in self.summary["scorers"].items():
            lines.append(f"  {column}: mean {_fmt(s['mean'])}, std {_fmt(s['std'])} over {s['count']} images "
                         f"({len(s['per_prompt'])} prompts) - {s['convention']}")
        lines += [f"  unreadable: {file}: {reason}" for file, reason in self.unreadable[:10]]
        if len(self.unreadable) > 10:
            lines.append(f"  ... and {len(self.unreadable) - 10} more (all listed in {self.summary_path})")
        lines.append(f"  summary: {self.summary_path}")
        lines += [f"  histogram ({column}): {path}" for column, path in self.histograms.items()]
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def output_paths(out_csv: Path, columns: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """Where score_folder writes its summary and histograms, beside `out_csv`."""
    return (out_csv.with_name(out_csv.stem + SUMMARY_SUFFIX),
            {c: out_csv.with_name(f"{out_csv.stem}.{c}.png") for c in columns})


def score_folder(root, scorers, out_csv, prompt: str | None = None, batch_size: int | None = None,
                 num_workers: int = 2, fast_jpeg: bool = False) -> ScoreReport:
    """Score the images under `root` not yet in `out_csv` with every scorer; write the summary and histograms.

    Images are decoded and preprocessed in `num_workers` DataLoader processes (0: in this one) and scored in
    batches of `batch_size` (default: each scorer's own `batch_size`). Unreadable images are skipped and listed.
    An image without a prompt is an error, unless no scorer reads prompts (`needs_prompts` false): it gets "".
    `fast_jpeg`: decode JPEGs DCT-scaled down to no less than the scorers' input size (see `open_image`): about
    twice as fast to decode and preprocess, and scores differ slightly from a full decode (benchmarks/README.md).
    """
    root, out_csv, scorers = Path(root), Path(out_csv), list(scorers)
    columns = [s.column for s in scorers]
    if not scorers or len(set(columns)) != len(columns) or set(columns) & set(BASE_COLUMNS):
        raise ScoringError(f"expected one or more scorers with distinct columns other than {BASE_COLUMNS}, "
                           f"got {columns}")
    images = find_images(root)  # not the histograms of this run (or another) whose CSV lies in the folder
    if not images:
        raise ScoringError(f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    summary_path, histograms = output_paths(out_csv, columns)

    header, rows = read_scores(out_csv) if out_csv.is_file() else ([], [])
    if header and sorted(score_columns_of(header)) != sorted(columns):
        raise ScoringError(f"{out_csv}: has score columns {score_columns_of(header)}, this run writes {columns}; "
                           f"score with the same scorers to resume, or write to another CSV")
    scored_with = _scored_with(scorers, fast_jpeg)
    _check_resumable(summary_path, root, scored_with)
    if not header:
        header = [*BASE_COLUMNS, *columns]
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        # the summary says what the CSV is scored with from its first row on: a run stopped before its end is
        # resumed with the same scorers only
        _write_summary(summary_path, root, out_csv, fast_jpeg, scored_with, [], scorers, [])
        _write_rows(out_csv, header, [], mode="w")
    entries, stamps, gone = collect_images(root, prompt, images), {}, []
    for e in entries:
        try:
            stamps[e.file] = image_stamp(root / e.file)
        except OSError as err:  # a broken link, or deleted since it was listed
            gone.append((e.file, f"cannot be read ({err.strerror or err})"))
    entries = [e for e in entries if e.file in stamps]
    prompts = {e.file: e.prompt or "" for e in entries}
    seeds = {e.file: e.seed for e in entries}
    # a row is kept while its image, prompt and seed are those it recorded: an image replaced under its name, or
    # given another prompt or seed (which `compare` pairs by), is scored again (rows without a stamp, from before
    # stamps, are kept by name), and the row of an image deleted since goes
    stale = {r["file"] for r in rows if r["file"] not in stamps or (
        r.get("stamp", stamps[r["file"]]) != stamps[r["file"]] or r["prompt"] != prompts[r["file"]]
        or r["seed"] != seeds[r["file"]])}
    if stale:
        logger.info("%s: %d images changed (their file, prompt or seed) or deleted since they were scored: their "
                    "rows were dropped", root, len(stale))
        rows = [r for r in rows if r["file"] not in stale]
        _write_rows(out_csv, header, rows, mode="w")
    done = {r["file"] for r in rows}
    todo = [e for e in entries if e.file not in done and _utf8(e.file)]
    # a name the file system holds in another encoding cannot be a row of the UTF-8 CSV: skipped, shown escaped
    misnamed = [(e.file.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
                 "its file name is not UTF-8 text, which the scores are written in; rename it")
                for e in entries if not _utf8(e.file)]
    _check_prompts(root, todo, scorers)

    unreadable = []
    preprocessors = [s.preprocess for s in scorers]
    draft_size = _input_size(preprocessors) if fast_jpeg else None
    dataset = _ImageDataset(root, [e.file for e in todo], preprocessors, draft_size)
    loader_batch = batch_size or max(s.batch_size for s in scorers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=loader_batch, num_workers=num_workers, collate_fn=_collate,
        pin_memory=any(torch.device(s.device).type == "cuda" for s in scorers))
    # inference_mode: no autograd bookkeeping whatever the scorer does; the bar shows only on a terminal
    with torch.inference_mode(), progress(total=len(todo), unit="img", desc=f"scoring {root}") as bar:
        for batch in loader:
            unreadable += [(todo[i].file, reason) for i, reason in batch["errors"]]
            if batch["indices"]:
                scored = [todo[i] for i in batch["indices"]]
                new = [{"file": e.file, "prompt": e.prompt or "", "seed": e.seed, "stamp": stamps[e.file]}
                       for e in scored]
                texts = [row["prompt"] for row in new]
                for scorer, pixels in zip(scorers, batch["pixels"]):
                    for row, score in zip(new, _score(scorer, pixels, texts, batch_size or scorer.batch_size)):
                        row[scorer.column] = score
                _write_rows(out_csv, header, new)
                rows += new
            bar.update(len(batch["indices"]) + len(batch["errors"]))
    scored = len(todo) - len(unreadable)
    unreadable += misnamed + gone
    for file, reason in unreadable:
        logger.warning("%s: skipped %s: %s", root, file, reason)

    summary = _write_summary(summary_path, root, out_csv, fast_jpeg, scored_with, rows, scorers, unreadable)
    if rows:
        for scorer in scorers:
            s = summary["scorers"][scorer.column]
            plot_histogram([r[scorer.column] for r in rows], histograms[scorer.column],
                           f"{scorer.column} over {s['count']} images of {root.name}: mean {_fmt(s['mean'])}, "
                           f"std {_fmt(s['std'])}", scorer.convention)
    return ScoreReport(root, out_csv, summary_path, histograms if rows else {}, rows, scored,
                       len(done), unreadable, summary)


def _write_summary(path: Path, root: Path, out_csv: Path, fast_jpeg: bool, scored_with: dict, rows: list[dict],
                   scorers, unreadable: list[tuple[str, str]]) -> dict:
    summary = {"root": str(root.resolve()), "csv": str(out_csv), "rows": len(rows), "fast_jpeg": fast_jpeg,
               "scored_with": scored_with, "scorers": summarize(rows, scorers),
               "unreadable": [{"file": f, "reason": r} for f, r in unreadable]}
    write_text_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _scored_with(scorers, fast_jpeg: bool) -> dict:
    """What a score depends on besides its image and prompt: each scorer's weights (a local folder as its absolute
    path; None: the registry's) and dtype, and the JPEG decoding."""
    def weights(path):
        return str(Path(path).resolve()) if path is not None and os.path.exists(path) else path
    return {"fast_jpeg": fast_jpeg, **{s.column: {"scorer": s.name, "weights": weights(getattr(s, "path", None)),
                                                  "dtype": str(getattr(s, "dtype", None)),
                                                  **preprocessing_entry(getattr(s, "preprocessing", None))}
                                       for s in scorers}}


def _check_resumable(summary_path: Path, root: Path, scored_with: dict) -> None:
    """A CSV resumes only for the folder it was made from (the same relative names elsewhere are other images) and
    with the scorers and decoding that made it (`_scored_with`; a summary from before it was recorded is not
    compared)."""
    if not summary_path.is_file():
        return
    try:
        previous = json.loads(summary_path.read_text(encoding="utf-8"))
    except ValueError:
        return  # an unreadable summary is rewritten at the end of this run
    there = f"{summary_path.parent}: the scores there ({summary_path.name}) are"
    if previous.get("root") and previous["root"] != str(root.resolve()):
        raise ScoringError(f"{there} of {previous['root']}, not {root.resolve()}; write to another CSV (or delete "
                           "that one and its summary)")
    changed = differences(previous.get("scored_with", scored_with), scored_with)
    if changed:
        raise ScoringError(f"{there} of other scorer settings ({changed}); write to another CSV (or delete that one "
                           "and its summary)")


def _check_prompts(root: Path, todo: list[ImageEntry], scorers) -> None:
    """Fail before any scoring when an image lacks a prompt a scorer needs; files that are not images by their
    header are left to the loader, which lists them as unreadable."""
    if not any(s.needs_prompts for s in scorers):
        return
    missing = [e.file for e in todo if e.prompt is None and _has_image_header(root / e.file)]
    if missing:
        raise ScoringError(
            f"{root}: {len(missing)} image(s) have no prompt, e.g. {', '.join(missing[:5])}; scorer(s) "
            f"{', '.join(s.name for s in scorers if s.needs_prompts)} need one: give each a line with file_name and "
            f"prompt in a {METADATA_NAME}, a .txt of the same name beside it, or one prompt for all (--prompt)")


def _has_image_header(path: Path) -> bool:
    try:
        PIL.Image.open(path).close()  # reads the header only
    except Exception:  # PIL raises many types; the loader reports the reason
        return False
    return True
