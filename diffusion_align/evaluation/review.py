"""A review page for people to judge image folders, and its choices back into preference pairs.

`write_review_page` writes one self-contained HTML file (images embedded as data: URIs, no network, no external
scripts) with two views of the rows `grid.match_rows` finds (prompt x seed, one column per folder):

- side by side: every folder's image of each row, with the folder names and file names;
- blind A/B, for two of the folders: one row at a time, the two images in an order drawn per pair from `seed`
  (recorded in the page and the export), folder and file names hidden. Keys: ArrowLeft = left better,
  ArrowRight = right better, ArrowDown or t = tie, s = skip, Backspace = back to the previous pair.

Choices are kept in the browser's localStorage (per page) so a reload loses nothing, and "Export" downloads them as
JSONL, one line per judged pair:

    {"prompt", "seed", "folder_a", "folder_b", "file_a", "file_b", "left": "a"|"b",
     "choice": "a"|"b"|"tie"|"skip", "time": ISO 8601, "sha256_a", "sha256_b"}

with the choice in terms of folders (a = folder_a better), not sides, files relative to their folder, and the
sha256 of each file's bytes as the page showed them (exports from before have none); a seed too large for a
JavaScript number (over 2**53 - 1) is written as a string. The same text is
`window.exportChoices()`. `import_review` turns such files into Pick-a-Pic-style parquet for training.

Everything the page shows from the folders (prompts, names) is set as text, never parsed as HTML, and the data
block escapes "<", so no prompt or file name can end it; a Content-Security-Policy allows only the page's own
script and style, and images from data: URIs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import pyarrow as pa
import PIL.Image

from ..data.shards import SHARD_RECORDS, replace_shards
from ..files import jsonl_records, write_text_atomic
from ..images import to_rgb
from .grid import best_columns, check_prompts, match_rows, open_images, score_images, shown_score

logger = logging.getLogger("diffusion_align")

# Formats every browser shows as they are; others (TIFF) are embedded re-encoded as PNG.
BROWSER_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                 ".gif": "image/gif", ".bmp": "image/bmp"}
CHOICES = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}  # choice -> (label_0, label_1); "skip" is dropped
EXPORT_KEYS = ("prompt", "seed", "folder_a", "folder_b", "file_a", "file_b", "left", "choice", "time")
SHA256 = re.compile("[0-9a-f]{64}")
JS_EXACT_INTEGER = 2**53 - 1  # JavaScript numbers hold integers exactly up to this; seeds beyond go as strings


def _stored_bytes(path: Path) -> bytes:
    """The file's bytes as stored (a corrupt image shows as a broken one); none for a file that cannot be read, such
    as a broken link, which shows so too."""
    try:
        return path.read_bytes()
    except OSError as err:
        logger.warning("%s: cannot be read (%s); it shows as a broken image", path, err.strerror or err)
        return b""


def _data_uri(path: Path, data: bytes) -> str:
    """The file `path`, whose bytes are `data`, as a data: URI the browser shows."""
    kind = BROWSER_TYPES.get(path.suffix.lower())
    if not kind:
        buf = io.BytesIO()
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                to_rgb(image).save(buf, format="PNG")
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            logger.warning("%s: cannot convert to PNG for the page (%s: %s); it shows as a broken image", path,
                           type(err).__name__, err)
            buf = io.BytesIO()  # no data: the browser's broken-image sign, as for an unreadable PNG or JPEG
        kind, data = "image/png", buf.getvalue()
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _script_json(value) -> str:
    """JSON that can sit inside <script>: with "<" escaped no "</script>" or "<!--" can appear, and with ASCII only
    the page reads the same whatever encoding a tool assumes."""
    return json.dumps(value, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def review_data(dirs: Sequence, prompt: str | None = None, ab: Sequence | None = None, seed: int = 0,
                title: str | None = None, scorer=None, scores: dict | None = None,
                notes: dict[tuple[str, int], str] | None = None) -> dict:
    """What the page shows, as JSON-ready data (images embedded): `folders` (labels), `rows` (prompt, seed, label,
    note or null, cells: {file, image, sha256, and with a scorer score and best} or null), `images` (data: URIs), `ab` (the two
    folders compared blind and the pairs, each a row with both images and the folder shown left; null with one
    folder), `scorer` (its column name, or null), `id`. Arguments as for `write_review_page`."""
    labels, rows = match_rows(dirs, prompt, notes)
    if scores is None:
        scores = _scores(rows, dirs, labels, scorer) if scorer is not None else {}
    images: list[str] = []
    table = []
    for r, row in enumerate(rows):
        cells = []
        best = best_columns(scores, r, len(labels))
        for c, (folder, file) in enumerate(zip(dirs, row.files)):
            if file is None:
                cells.append(None)
                continue
            data = _stored_bytes(Path(folder) / file)
            # the digest goes into the export, so an import finds an image regenerated since under its name
            cells.append({"file": file, "image": len(images), "sha256": hashlib.sha256(data).hexdigest()})
            if (r, c) in scores:
                cells[-1].update(score=shown_score(scores[r, c]), best=c in best)
            images.append(_data_uri(Path(folder) / file, data))
        exact = row.seed is None or abs(row.seed) <= JS_EXACT_INTEGER
        table.append({"prompt": row.prompt, "seed": row.seed if exact else str(row.seed), "label": row.label,
                      "note": row.note, "cells": cells})
    compared = None
    if len(labels) >= 2:
        a, b = blind_pair(ab, labels)
        rng = random.Random(seed)
        pairs = [{"row": i, "left": "a" if rng.random() < 0.5 else "b"}
                 for i, row in enumerate(rows) if row.files[a] is not None and row.files[b] is not None]
        compared = {"folders": [labels[a], labels[b]], "columns": [a, b], "seed": seed, "pairs": pairs}
    data = {"title": title or "Review: " + ", ".join(labels), "folders": labels, "rows": table, "ab": compared,
            "scorer": None if scorer is None else scorer.column}
    data["images"] = images
    # names the page's saved choices in localStorage: the same rows, sides and images resume; anything else (a folder
    # regenerated under the same names) starts afresh
    data["id"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return data


def _scores(rows: list, dirs: Sequence, labels: list[str], scorer, chunk: int = 16) -> dict:
    """Every readable image's score by (row, column), opened and scored `chunk` rows at a time (bounded memory);
    unreadable images have none (the page shows them as the browser does)."""
    check_prompts(rows, scorer, labels)
    scores = {}
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        images = open_images(part, [Path(d) for d in dirs], labels, [], [])
        scores.update({(start + r, c): v for (r, c), v in score_images(images, part, scorer).items()})
    return scores


def blind_pair(ab: Sequence | None, labels: list[str]) -> tuple[int, int]:
    """Column indices of the two folders to compare blind, given by index (an int, or its digits from the command
    line) or label, a label first (default the first two)."""
    if ab is None:
        return 0, 1
    if len(ab) != 2:
        raise ValueError(f"expected two folders to compare blind, got {len(ab)}: {list(ab)}")
    indices = []
    for which in ab:
        if isinstance(which, str) and which not in labels and which.isdecimal():
            which = int(which)
        if isinstance(which, int) and 0 <= which < len(labels):
            indices.append(which)
        elif which in labels:
            indices.append(labels.index(which))
        else:
            raise ValueError(f"no folder {which!r} to compare blind; the folders are {', '.join(labels)} "
                             f"(or their indices 0 to {len(labels) - 1})")
    if indices[0] == indices[1]:
        raise ValueError(f"expected two different folders to compare blind, got {labels[indices[0]]!r} twice")
    return indices[0], indices[1]


def write_review_page(dirs: Sequence, out, prompt: str | None = None, ab: Sequence | None = None, seed: int = 0,
                      title: str | None = None, scorer=None, scores: dict | None = None,
                      notes: dict[tuple[str, int], str] | None = None) -> Path:
    """Write the review page of the folders `dirs` to `out` (atomically); returns `out`.

    `prompt`: for images that record none (as in `grid.make_grid`). `ab`: the two folders compared blind, by index
    into `dirs` or by label (`grid.folder_labels`: the folder's name where that tells it apart); default the first
    two. `seed`: draws which side each pair's images are shown on. `scorer` (rewards.load_scorer): each image's
    score is shown under it in the side-by-side view, the row's best marked as in the grid; never in the blind A/B
    view, where it would sway the choice. `scores`: those of the same `dirs` and `prompt` already computed by
    `scorer` (`grid.make_grid`'s report.scores), shown without scoring again. `notes`: rows shown first, each with
    its note, in the side-by-side view only (as `grid.match_rows`); the blind view takes its pairs in the same
    order. The page embeds every image as stored,
    so its size is about the images' total.
    """
    out = Path(out)
    page = _page(review_data(dirs, prompt, ab, seed, title, scorer, scores, notes))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    return out


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _page(data: dict) -> str:
    policy = (f"default-src 'none'; img-src data:; style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
              f"base-uri 'none'; form-action 'none'")
    return (_HTML.replace("@POLICY@", policy).replace("@STYLE@", _STYLE).replace("@SCRIPT@", _SCRIPT)
            .replace("@DATA@", _script_json(data)))


# ---------------------------------------------------------------- import

@dataclass
class ImportReport:
    out_dir: Path
    pairs: int  # rows written
    choices: dict[str, int]  # "a", "b", "tie" -> rows written with that choice
    skipped: int  # "skip" lines, dropped
    folders: dict[str, str]  # folder name in the export -> the --images folder it was read from
    shards: list[Path]
    unreadable: list[str] = field(default_factory=list)  # "file:line: why" of judged pairs left out (or changed)

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {n}" for k, n in self.choices.items())
        lines = [f"{self.out_dir}: {self.pairs} pairs ({counts}; ties have labels 0.5/0.5), {self.skipped} skipped "
                 f"pairs dropped, in {len(self.shards)} shard(s)"]
        lines += [f"  {name}: {path}" for name, path in self.folders.items()]
        lines += ([f"  left out, {len(self.unreadable)} pair(s) whose image cannot be read or changed since the page:"]
                  if self.unreadable else [])
        lines += [f"    {why}" for why in self.unreadable]
        return "\n".join(lines)


def read_choices(path) -> list[dict]:
    """The records of an exported choices file, each checked and with `where` ("file:line") added; ValueError
    naming the line of a bad one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); expected the JSONL the review page exports") from None
    return [_choice_record(record, where) for where, record in jsonl_records(text, path)]


def _choice_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in EXPORT_KEYS if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a review export has {list(EXPORT_KEYS)}")
    for key in ("folder_a", "folder_b", "file_a", "file_b", "time"):
        if not isinstance(record[key], str) or not record[key]:
            raise ValueError(f"{where}: expected {key!r} to be a non-empty string, got {record[key]!r}")
    if record["prompt"] is not None and not isinstance(record["prompt"], str):
        raise ValueError(f"{where}: expected 'prompt' to be a string or null, got {record['prompt']!r}")
    seed = record["seed"]
    if not (seed is None or type(seed) is int or isinstance(seed, str) and seed.lstrip("-").isdigit()):
        raise ValueError(f"{where}: expected 'seed' to be an integer (as a string where too large for JavaScript) "
                         f"or null, got {seed!r}")
    if record["left"] not in ("a", "b"):
        raise ValueError(f"{where}: expected 'left' to be \"a\" or \"b\", got {record['left']!r}")
    if record["choice"] not in (*CHOICES, "skip"):
        raise ValueError(f"{where}: expected 'choice' to be one of {[*CHOICES, 'skip']}, got {record['choice']!r}")
    for key in ("sha256_a", "sha256_b"):  # the image the person saw; exports from before have none
        if record.get(key) is not None and not (isinstance(record[key], str) and SHA256.fullmatch(record[key])):
            raise ValueError(f"{where}: expected {key!r} to be a sha256 (64 hex digits) or absent, got {record[key]!r}")
    for key in ("file_a", "file_b"):
        name = PurePosixPath(record[key])
        if name.is_absolute() or ".." in name.parts:
            raise ValueError(f"{where}: {key} {record[key]!r} points outside its folder")
    record["where"] = where
    return record


def match_folders(names: Sequence[str], image_dirs: Sequence) -> dict[str, Path]:
    """The folder each exported folder name stands for: the one of `image_dirs` whose path ends in that name (a
    name may have several parts, "a/samples", where the page told same-named folders apart)."""
    found, missing = {}, []
    for name in names:
        parts = PurePosixPath(name).parts
        hits = [Path(d) for d in image_dirs if Path(d).resolve().parts[-len(parts):] == parts]
        if len(hits) > 1:
            raise ValueError(f"folder {name!r} of the export matches several --images: {', '.join(map(str, hits))}")
        if hits:
            found[name] = hits[0]
        else:
            missing.append(name)
    if missing:
        given = ", ".join(map(str, image_dirs)) or "none"
        raise ValueError(f"the export names folder(s) {', '.join(map(repr, missing))} that no --images folder "
                         f"ends in (given: {given}); pass each folder the page was made from")
    return found


def import_review(choices: Sequence, image_dirs: Sequence, out_dir, shard_size: int = 1000) -> ImportReport:
    """Pick-a-Pic-style pairs from review exports (`choices`: one or more JSONL files, e.g. one per person).

    Each judged line becomes a row: `caption` (the prompt; "" where none was recorded), `jpg_0` / `jpg_1` (the
    bytes of folder_a's and folder_b's files, as stored), `label_0` / `label_1` (a: 1/0, b: 0/1, tie: 0.5/0.5),
    and `folder_0` / `folder_1`, `image_0_path` / `image_1_path` (relative to its folder), `left` and `time` from
    the export; "skip" lines are dropped and counted. The images are read from `image_dirs`, matched by
    folder name (`match_folders`). Output: `out_dir/pairs-00000.parquet`, ... (`shard_size` rows each), replacing
    an earlier import's shards only once all are written; `data.pairs.load_pairs(out_dir)` reads it (ties only with
    keep_ties=True).
    """
    if isinstance(choices, (str, os.PathLike)):
        choices = [choices]
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    records = [r for path in choices for r in read_choices(path)]
    kept = [r for r in records if r["choice"] != "skip"]
    if not kept:
        raise ValueError(f"{', '.join(map(str, choices))}: no judged pairs to import "
                         f"({len(records) - len(kept)} skipped)")
    folders = match_folders(list(dict.fromkeys(r[k] for r in kept for k in ("folder_a", "folder_b"))), image_dirs)
    readable, unreadable = [], []  # every image decoded before anything is written; the bytes are read shard by shard
    for record in kept:
        why = next((w for side in ("a", "b") if (w := _unreadable(record, side, folders))), None)
        if why is None:
            readable.append(record)
        else:
            logger.warning("%s; pair left out", why)
            unreadable.append(why)
    kept = readable
    if not kept:
        raise ValueError(f"no pair could be imported: every judged pair has an unreadable image, e.g. {unreadable[0]}")
    out_dir = Path(out_dir)
    if (out_dir / SHARD_RECORDS).is_dir():  # its records would then describe these shards as theirs
        raise ValueError(f"{out_dir}: holds the resumable shards of another tool (label, captions, pairs from a "
                         f"folder: {SHARD_RECORDS}/); import into a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = replace_shards(out_dir, (_pairs_table(kept[start:start + shard_size], folders)
                                      for start in range(0, len(kept), shard_size)), ".import-review.tmp")
    counts = {c: sum(r["choice"] == c for r in kept) for c in CHOICES}
    return ImportReport(out_dir, len(kept), counts, len(records) - len(kept) - len(unreadable),
                        {k: str(v) for k, v in folders.items()}, shards, unreadable)


def _image_path(record: dict, side: str, folders: dict[str, Path]) -> Path:
    return folders[record[f"folder_{side}"]] / record[f"file_{side}"]


def _unreadable(record: dict, side: str, folders: dict[str, Path]) -> str | None:
    """Why the image cannot be imported (missing, not an image, truncated: it is decoded in full; or not the image
    the person judged: its bytes changed since the page showed them), or None."""
    path = _image_path(record, side, folders)
    try:
        with PIL.Image.open(path) as image:
            image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{record['where']}: cannot read image {path} ({type(err).__name__}: {err})"
    judged = record.get(f"sha256_{side}")
    if judged is not None and hashlib.sha256(path.read_bytes()).hexdigest() != judged:
        return f"{record['where']}: image {path} changed since the page showed it (another sha256): not the one judged"
    return None


def _pairs_table(records: list[dict], folders: dict[str, Path]) -> pa.Table:
    labels = [CHOICES[r["choice"]] for r in records]
    return pa.table({
        "caption": pa.array([r["prompt"] or "" for r in records], pa.string()),
        "jpg_0": pa.array([_image_path(r, "a", folders).read_bytes() for r in records], pa.binary()),
        "jpg_1": pa.array([_image_path(r, "b", folders).read_bytes() for r in records], pa.binary()),
        "label_0": pa.array([l0 for l0, _ in labels], pa.float64()),
        "label_1": pa.array([l1 for _, l1 in labels], pa.float64()),
        "folder_0": pa.array([r["folder_a"] for r in records], pa.string()),
        "folder_1": pa.array([r["folder_b"] for r in records], pa.string()),
        "image_0_path": pa.array([r["file_a"] for r in records], pa.string()),
        "image_1_path": pa.array([r["file_b"] for r in records], pa.string()),
        "left": pa.array([r["left"] for r in records], pa.string()),
        "time": pa.array([r["time"] for r in records], pa.string()),
    })


# ---------------------------------------------------------------- the page

_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="@POLICY@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Review</title>
<style>@STYLE@</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <nav>
    <button type="button" id="show-grid" aria-pressed="true">Side by side</button>
    <button type="button" id="show-ab" aria-pressed="false">Blind A/B</button>
    <button type="button" id="export">Export choices</button>
  </nav>
</header>
<main id="grid-view"></main>
<main id="ab-view" hidden>
  <p class="status"><span id="progress"></span> judged <span id="position"></span></p>
  <p id="ab-prompt" class="prompt"></p>
  <div id="ab-pair" class="pair">
    <figure><img id="ab-left" alt="left image"><figcaption>Left</figcaption></figure>
    <figure><img id="ab-right" alt="right image"><figcaption>Right</figcaption></figure>
  </div>
  <p id="ab-done" hidden>Every pair has a choice. Export them to keep them (Backspace goes back to change one).</p>
  <div class="keys">
    <button type="button" data-choice="left"><kbd>&larr;</kbd> left better</button>
    <button type="button" data-choice="tie"><kbd>&darr;</kbd> or <kbd>t</kbd> tie</button>
    <button type="button" data-choice="right"><kbd>&rarr;</kbd> right better</button>
    <button type="button" data-choice="skip"><kbd>s</kbd> skip</button>
    <button type="button" id="back"><kbd>Backspace</kbd> back</button>
  </div>
</main>
<script type="application/json" id="review-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""

_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f3f3f3; color: #222; }
header { display: flex; gap: 1em; align-items: center; justify-content: space-between; padding: .5em 1em;
         background: #fff; border-bottom: 1px solid #ccc; position: sticky; top: 0; z-index: 1; }
h1 { font-size: 1.1em; margin: 0; overflow-wrap: anywhere; }
button { font: inherit; padding: .3em .8em; cursor: pointer; }
button[aria-pressed="true"] { background: #333; color: #fff; }
main { padding: 1em; }
.grid-row { display: grid; grid-template-columns: minmax(10em, 1fr) repeat(var(--columns), minmax(0, 2fr));
            gap: .6em; padding: .6em 0; border-bottom: 1px solid #ddd; }
.folder { font-weight: 600; text-align: center; overflow-wrap: anywhere; }
.prompt { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; }
.seed, .file { color: #777; font-size: .85em; margin: 0; overflow-wrap: anywhere; }
.note { font-size: .9em; margin: .3em 0 0; overflow-wrap: anywhere; }
.score { font-size: .9em; white-space: pre; }
.score.best { color: #009646; font-weight: 600; }  /* BEST of the grid pages */
figure.best img { outline: 4px solid #009646; outline-offset: -4px; }
figure { margin: 0; text-align: center; }
figure img, .missing { display: block; box-sizing: border-box; width: 100%; aspect-ratio: 1; }
figure img { object-fit: contain; background: #282828; }  /* letterboxed square cells, as in the grid */
.missing { display: flex; align-items: center; justify-content: center; color: #b02828;
           background: #fae2e2; border: 2px dashed #b02828; }
.status { margin: 0 0 .5em; color: #555; }
#ab-prompt { font-size: 1.25em; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 1em 0; }
.pair img { width: 100%; height: 72vh; object-fit: contain; }
.keys { display: flex; flex-wrap: wrap; gap: .5em; justify-content: center; }
[hidden] { display: none !important; }  /* over the display of .pair and the like */
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3em; background: #fafafa; color: #222; }
"""

_SCRIPT = """
"use strict";
const DATA = JSON.parse(document.getElementById("review-data").textContent);
const AB = DATA.ab;
const $ = (id) => document.getElementById(id);

// Every text from the folders goes through textContent: a prompt is shown, never parsed as HTML.
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
const promptText = (row) => row.prompt === null ? "(no prompt recorded)" : row.prompt;

function buildGrid() {
  const view = $("grid-view");
  view.style.setProperty("--columns", DATA.folders.length);
  const head = el("div", "grid-row");
  head.append(el("div", "folder", "Prompt"), ...DATA.folders.map((name) => el("div", "folder", name)));
  view.append(head);
  for (const row of DATA.rows) {
    const line = el("div", "grid-row");
    const text = el("div");
    text.append(el("p", "prompt", promptText(row)), el("p", "seed", row.label));
    if (row.note !== null) text.append(el("p", "note", row.note));  // side by side only, like the scores
    line.append(text);
    row.cells.forEach((cell, column) => {
      const figure = el("figure");
      if (cell === null) {
        figure.append(el("div", "missing", "missing"), el("figcaption", "file", DATA.folders[column]));
      } else {
        const img = el("img");
        img.src = DATA.images[cell.image];
        img.alt = DATA.folders[column] + ": " + cell.file;
        figure.append(img, el("figcaption", "file", cell.file));
        if (cell.score !== undefined) {  // side by side only: the blind view never shows scores
          figure.append(el("figcaption", cell.best ? "score best" : "score", cell.score + (cell.best ? "  best" : "")));
          if (cell.best) figure.classList.add("best");
        }
      }
      line.append(figure);
    });
    view.append(line);
  }
}

// Blind A/B: choices[i] = {choice, time} for AB.pairs[i], choice in terms of folders ("a" = AB.folders[0]).
const storageKey = "diffusion-align-review:" + DATA.id;
let choices = {};
let current = 0;

function load() {
  try {
    choices = JSON.parse(localStorage.getItem(storageKey)) || {};
  } catch (err) {  // storage unavailable (some browsers' file:// pages) or unreadable: start afresh
    choices = {};
  }
  while (current < AB.pairs.length && choices[current]) current += 1;
}

function save() {
  try {
    localStorage.setItem(storageKey, JSON.stringify(choices));
  } catch (err) {
    // without storage the choices live until the page closes; Export still has them
  }
}

function showPair() {
  const total = AB.pairs.length;
  $("progress").textContent = Object.keys(choices).length + " / " + total;
  const done = current >= total;
  $("position").textContent = done ? "" : "(pair " + (current + 1) + ")";
  $("ab-pair").hidden = done;
  $("ab-done").hidden = !done;
  if (done) {
    $("ab-prompt").textContent = "";
    return;
  }
  const pair = AB.pairs[current];
  const row = DATA.rows[pair.row];
  const [left, right] = pair.left === "a" ? AB.columns : [AB.columns[1], AB.columns[0]];
  $("ab-prompt").textContent = promptText(row);
  $("ab-left").src = DATA.images[row.cells[left].image];
  $("ab-right").src = DATA.images[row.cells[right].image];
}

function choose(side) {
  if (current >= AB.pairs.length) return;
  const left = AB.pairs[current].left;
  const choice = side === "left" ? left : side === "right" ? (left === "a" ? "b" : "a") : side;
  choices[current] = {choice: choice, time: new Date().toISOString()};
  save();
  current += 1;
  showPair();
}

function back() {
  if (current > 0) current -= 1;
  showPair();
}

function exportChoices() {
  if (AB === null) return "";
  const lines = [];
  AB.pairs.forEach((pair, i) => {
    if (!choices[i]) return;
    const row = DATA.rows[pair.row];
    lines.push(JSON.stringify({
      prompt: row.prompt, seed: row.seed, folder_a: AB.folders[0], folder_b: AB.folders[1],
      file_a: row.cells[AB.columns[0]].file, file_b: row.cells[AB.columns[1]].file,
      left: pair.left, choice: choices[i].choice, time: choices[i].time,
      sha256_a: row.cells[AB.columns[0]].sha256, sha256_b: row.cells[AB.columns[1]].sha256,
    }) + "\\n");
  });
  return lines.join("");
}
window.exportChoices = exportChoices;

function download() {
  const url = URL.createObjectURL(new Blob([exportChoices()], {type: "application/x-ndjson"}));
  const link = el("a");
  link.href = url;
  link.download = "choices.jsonl";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);  // after the download has started
}

function setMode(ab) {
  $("grid-view").hidden = ab;
  $("ab-view").hidden = !ab;
  $("show-grid").setAttribute("aria-pressed", String(!ab));
  $("show-ab").setAttribute("aria-pressed", String(ab));
  if (ab) showPair();
}

const KEYS = {ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", t: "tie", s: "skip"};
document.addEventListener("keydown", (event) => {
  if ($("ab-view").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (key === "Backspace") back();
  else if (KEYS[key]) choose(KEYS[key]);
  else return;
  event.preventDefault();  // no scrolling on arrows, no history on Backspace
});

document.title = DATA.title;
$("title").textContent = DATA.title;
buildGrid();
$("show-grid").addEventListener("click", () => setMode(false));
$("export").addEventListener("click", download);
if (AB === null) {
  $("show-ab").disabled = true;
  $("show-ab").title = "needs two folders";
  $("export").disabled = true;
} else {
  $("show-ab").title = "blind: " + AB.pairs.length + " pairs of two folders, sides drawn at random";
  $("show-ab").addEventListener("click", () => setMode(true));
  document.querySelectorAll("[data-choice]").forEach((button) =>
    button.addEventListener("click", () => choose(button.dataset.choice)));
  $("back").addEventListener("click", back);
  load();
}
"""
