"""Contact sheets of image folders side by side: rows are prompt x seed, columns are the folders.

Each folder's images, prompts and seeds are found as `scoring.collect_images` finds them (metadata.jsonl, a .txt
beside each image, or the `prompt` argument). Rows are matched across folders by (prompt, seed); where a folder
records no seed, its images of a prompt match the other folders' seed-less images of that prompt in file-name
order (the first with the first, ...), never an image with a seed. Two images of one folder with the same prompt
and seed likewise fill two rows. Rows follow the prompts in the order the folders first list them, then the seeds;
rows given a note (`notes`, by prompt and seed: e.g. a judge's verdict) come first, in the notes' order, each with
its note under its seed.

`make_grid` draws the rows as PNG (or JPEG, ...) pages; `review.write_review_page` shows the same rows in a browser.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import PIL.Image
from PIL import ImageDraw, ImageFont, ImageOps

from ..files import written_beside
from .scoring import ScoringError, collect_images, open_image

BACKGROUND = (255, 255, 255)
LETTERBOX = (40, 40, 40)  # the bars around an image of another aspect ratio than the cell
PLACEHOLDER = (250, 226, 226)  # the cell of a missing or unreadable image, crossed out in PLACEHOLDER_INK
PLACEHOLDER_INK = (190, 40, 40)
BEST = (0, 150, 70)  # frame and score of the best image in a row
TEXT, FAINT, RULE = (20, 20, 20), (110, 110, 110), (215, 215, 215)


@dataclass(frozen=True)
class Row:
    """One prompt x seed: per folder, the image's path relative to that folder, or None where it has none."""

    prompt: str | None
    seed: int | None
    occurrence: int  # among that folder's images with this prompt and seed: 0 for the first, 1 for the next, ...
    files: tuple[str | None, ...]
    note: str | None = None

    @property
    def label(self) -> str:
        """How the row is told apart from others of its prompt: "seed 42", or "no seed, #2"."""
        if self.seed is None:
            return f"no seed, #{self.occurrence + 1}"
        return f"seed {self.seed}" + (f" (#{self.occurrence + 1})" if self.occurrence else "")


def folder_labels(dirs: Sequence) -> list[str]:
    """Short distinct names of folders: each one's name, or as many trailing path parts as tell it from the others
    ("a/samples" and "b/samples"); a folder whose every suffix is another's gets its full path."""
    parts = [Path(d).resolve().parts for d in dirs]
    repeated = [str(Path(d)) for d, p in zip(dirs, parts) if parts.count(p) > 1]
    if repeated:
        raise ValueError(f"the same folder is given more than once: {', '.join(dict.fromkeys(repeated))}")
    labels = []
    for i, p in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i]
        k = next((k for k in range(1, len(p)) if all(q[-k:] != p[-k:] for q in others)), None)
        labels.append(str(PurePosixPath(*p[-k:])) if k else Path(*p).as_posix())
    return labels


def match_rows(dirs: Sequence, prompt: str | None = None,
               notes: dict[tuple[str, int], str] | None = None) -> tuple[list[str], list[Row]]:
    """The folders' labels and the rows matched across them, as the module describes."""
    if not dirs:
        raise ValueError("expected one or more image folders")
    labels = folder_labels(dirs)
    files: dict[tuple, list[str | None]] = {}  # (prompt, seed, occurrence) -> file per folder
    for column, folder in enumerate(dirs):
        entries = collect_images(folder, prompt)
        if not entries:
            raise ScoringError(f"{folder}: no images found")
        seen: Counter = Counter()
        for entry in entries:
            key = (entry.prompt, entry.seed, seen[entry.prompt, entry.seed])
            seen[entry.prompt, entry.seed] += 1
            files.setdefault(key, [None] * len(dirs))[column] = entry.file
    first = {}  # prompt -> rank of first appearance (dicts keep insertion order)
    for prompt_, _, _ in files:
        first.setdefault(prompt_, len(first))
    noted = {key: rank for rank, key in enumerate(notes or {})}
    order = sorted(files, key=lambda k: (noted.get(k[:2], len(noted)), first[k[0]], k[1] is None, k[1] or 0, k[2]))
    return labels, [Row(p, s, n, tuple(files[p, s, n]), (notes or {}).get((p, s))) for p, s, n in order]


@dataclass
class GridReport:
    pages: list[Path]
    folders: list[str]  # column labels
    rows: int
    missing: list[tuple[str, str]]  # (folder, "prompt, seed ...") of each cell without an image
    unreadable: list[tuple[str, str]]  # (folder/file, reason): drawn as placeholders
    scorer: str | None = None  # the score column, when scored
    best: dict[str, int] = field(default_factory=dict)  # folder -> rows where it scored best (shared bests count)
    scores: dict[tuple[int, int], float] = field(default_factory=dict)  # (row, column) -> score, all pages

    def __str__(self) -> str:
        lines = [f"{self.rows} rows x {len(self.folders)} folders ({', '.join(self.folders)}) on "
                 f"{len(self.pages)} page(s): {', '.join(map(str, self.pages))}"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing image(s), e.g. {self.missing[0][0]}: {self.missing[0][1]}")
        lines += [f"  unreadable: {file}: {reason}" for file, reason in self.unreadable]
        if self.scorer and len(self.folders) > 1:
            lines.append(f"  best {self.scorer} in a row: " + ", ".join(f"{f} {n}" for f, n in self.best.items()))
        return "\n".join(lines)


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it, else Pillow's own scalable font (Pillow >= 10.1 ships one)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)  # Pillow also searches the system font folders
    except OSError:
        return ImageFont.load_default(size)


def wrap_text(text: str, font, width: int, max_lines: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (words split only when one alone is too wide); past
    `max_lines` the last line ends in an ellipsis."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and font.getlength(word) > width:  # a word wider than the column: cut it
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines


class _Layout:
    """Pixel positions on a page: a prompt column, then one cell per folder, each with a score line when scored."""

    def __init__(self, columns: int, cell: int, prompt_width: int, scored: bool):
        self.cell, self.prompt_width = cell, prompt_width
        size = max(11, cell // 18)
        self.font = load_font(size)
        self.line = size * 4 // 3  # room for ascenders and descenders, whichever font was found
        self.pad = max(4, cell // 40)  # also the room for the best-image frame between cells
        self.header = self.line + 2 * self.pad
        self.score = self.line + self.pad if scored else 0
        self.row = cell + self.score + 2 * self.pad
        self.width = prompt_width + columns * (cell + 2 * self.pad)

    def cell_box(self, row: int, column: int) -> tuple[int, int]:
        return (self.prompt_width + column * (self.cell + 2 * self.pad) + self.pad,
                self.header + row * self.row + self.pad)


def make_grid(dirs: Sequence, out, scorer=None, rows_per_page: int = 10, cell_size: int = 256,
              prompt: str | None = None, prompt_width: int | None = None,
              notes: dict[tuple[str, int], str] | None = None) -> GridReport:
    """Draw the folders' images side by side, rows matched by prompt and seed (see the module docstring).

    Each image is scaled to fit a `cell_size` square, letterboxed in LETTERBOX; a folder without an image for a row
    gets a crossed-out placeholder saying "missing" (or "unreadable"). The prompt is printed, wrapped, in a column
    `prompt_width` wide (default max(160, cell_size)) left of its row, the seed under it; the folder names head
    the columns. With a `scorer` (rewards.load_scorer), each image's score is printed under it, and the best score
    of each row (higher is better; every score that prints the same as the best counts) is framed and printed in
    BEST. `notes`: rows shown first, each with its note (see the module docstring). Pages hold `rows_per_page`
    rows: the first page is always `out`, the next `<stem>-002<suffix>`, `<stem>-003<suffix>`, ... (pages of that
    name left by an earlier, longer run are removed). The image format follows the suffix of `out`; pages are
    written atomically.
    """
    if rows_per_page < 1 or cell_size < 16:
        raise ValueError(f"expected rows_per_page >= 1 and cell_size >= 16, got {rows_per_page} and {cell_size}")
    out = Path(out)
    image_format = PIL.Image.registered_extensions().get(out.suffix.lower())
    if image_format is None:
        raise ValueError(f"{out}: unknown image type {out.suffix!r}; use e.g. .png or .jpg")
    for folder in map(Path, dirs):  # the next run would find the pages as images of that folder
        if folder.resolve() == out.parent.resolve() or folder.resolve() in out.parent.resolve().parents:
            raise ValueError(f"{out}: lies inside the compared folder {folder}, whose images the next run would find "
                             f"it among; write the grid elsewhere")
    labels, rows = match_rows(dirs, prompt, notes)
    if scorer is not None:
        check_prompts(rows, scorer, labels)
    layout = _Layout(len(labels), cell_size, prompt_width or max(160, cell_size), scorer is not None)
    report = GridReport([], labels, len(rows), [], [])
    if scorer is not None:
        report.scorer, report.best = scorer.column, dict.fromkeys(labels, 0)
    chunks = [rows[i:i + rows_per_page] for i in range(0, len(rows), rows_per_page)]
    for number, chunk in enumerate(chunks, 1):
        path = page_path(out, number)
        page = _draw_page(chunk, (number - 1) * rows_per_page, [Path(d) for d in dirs], labels, layout, scorer,
                          report)
        out.parent.mkdir(parents=True, exist_ok=True)
        with written_beside(path) as tmp:
            page.save(tmp, format=image_format)
        report.pages.append(path)
    _remove_stale_pages(out, report.pages)
    return report


def page_path(out: Path, number: int) -> Path:
    """Page `number` of a grid written to `out`: `out` itself, then `<stem>-002<suffix>` on."""
    return out if number == 1 else out.with_name(f"{out.stem}-{number:03d}{out.suffix}")


def _remove_stale_pages(out: Path, pages: list[Path]) -> None:
    """The pages after this run's last that an earlier run wrote would look current: removed, counting on from
    there while one exists, so a file of another name (`results-2024.png`, `results-001.png`) is never touched."""
    number = max(len(pages), 1) + 1
    while page_path(out, number).is_file():
        page_path(out, number).unlink()
        number += 1


def _draw_page(rows: list[Row], first_row: int, dirs: list[Path], labels: list[str], layout: _Layout, scorer,
               report: GridReport) -> PIL.Image.Image:
    page = PIL.Image.new("RGB", (layout.width, layout.header + len(rows) * layout.row), BACKGROUND)
    draw = ImageDraw.Draw(page)
    for c, label in enumerate(labels):
        x, _ = layout.cell_box(0, c)
        text = wrap_text(label, layout.font, layout.cell, 1)[0]
        draw.text((x + (layout.cell - layout.font.getlength(text)) / 2, layout.pad), text, fill=TEXT,
                  font=layout.font)
    images = open_images(rows, dirs, labels, report.missing, report.unreadable)
    scores = score_images(images, rows, scorer) if scorer is not None else {}
    report.scores.update({(first_row + r, c): value for (r, c), value in scores.items()})
    for r, row in enumerate(rows):
        _draw_prompt(draw, layout, r, row)
        best = best_columns(scores, r, len(labels))
        for c, file in enumerate(row.files):
            x, y = layout.cell_box(r, c)
            if (r, c) in images:
                # scored as stored, as `score` scores it; shown upright, as browsers show it
                _paste_letterboxed(page, ImageOps.exif_transpose(images[r, c]), x, y, layout.cell)
            else:
                _placeholder(draw, x, y, layout, "missing" if file is None else "unreadable")
            if (r, c) in scores:
                if c in best:
                    report.best[labels[c]] += 1
                _draw_score(draw, layout, x, y, scores[r, c], c in best)
    return page


def open_images(rows: list[Row], dirs: list[Path], labels: list[str], missing: list,
                unreadable: list) -> dict[tuple[int, int], PIL.Image.Image]:
    """The rows' readable images by (row, column), as `score` reads them; the missing and unreadable ones are
    appended to those lists."""
    images = {}
    for r, row in enumerate(rows):
        for c, file in enumerate(row.files):
            if file is None:
                missing.append((labels[c], f"{row.prompt!r}, {row.label}"))
                continue
            try:
                images[r, c] = open_image(dirs[c] / file, None)
            except ValueError as err:
                unreadable.append((f"{labels[c]}/{file}", f"{type(err).__name__}: {err}"))
    return images


def check_prompts(rows: list[Row], scorer, labels: list[str]) -> None:
    without = [f"{labels[c]}/{file}" for row in rows if row.prompt is None for c, file in enumerate(row.files) if file]
    if scorer.needs_prompts and without:
        raise ScoringError(f"scorer {scorer.name} needs a prompt for each image; {len(without)} have none, e.g. "
                           f"{', '.join(without[:5])}: give them one in a metadata.jsonl, a .txt beside each image, "
                           f"or one prompt for all")


def score_images(images: dict[tuple[int, int], PIL.Image.Image], rows: list[Row], scorer) -> dict:
    """Each image's score by (row, column), with its row's prompt."""
    if not images:
        return {}
    keys = list(images)
    values = scorer.score([images[k] for k in keys], [rows[r].prompt or "" for r, _ in keys])
    return dict(zip(keys, values.tolist()))


def shown_score(score: float) -> str:
    return f"{score:.4g}"


def best_columns(scores: dict, r: int, columns: int) -> set[int]:
    """The columns of row `r` with its best score as shown (4 significant digits): scores that print the same are
    all the best, so the mark never picks one of two equal-looking numbers. None where fewer than two images of the
    row have a score: one beats nothing (a missing or unreadable image beside it, or a grid of one folder)."""
    shown = {c: float(shown_score(scores[r, c])) for c in range(columns)
             if math.isfinite(scores.get((r, c), math.nan))}
    if len(shown) < 2:
        return set()
    top = max(shown.values())
    return {c for c, value in shown.items() if value == top}


def _draw_prompt(draw: ImageDraw.ImageDraw, layout: _Layout, r: int, row: Row) -> None:
    """A rule above the row, and the prompt wrapped to the prompt column with the seed under it."""
    top, pad = layout.header + r * layout.row, layout.pad
    draw.line([(0, top), (layout.width, top)], fill=RULE)
    width = layout.prompt_width - 2 * pad
    note = wrap_text(row.note, layout.font, width, 2) if row.note else []
    max_lines = max(1, (layout.row - 2 * pad) // layout.line - 1 - len(note))  # one line is the seed's
    text = row.prompt if row.prompt is not None else "(no prompt recorded)"
    lines = wrap_text(text, layout.font, width, max_lines)
    for i, line in enumerate(lines):
        draw.text((pad, top + pad + i * layout.line), line, fill=TEXT, font=layout.font)
    for i, line in enumerate([row.label, *note]):
        draw.text((pad, top + pad + (len(lines) + i) * layout.line), line, fill=FAINT, font=layout.font)


def _draw_score(draw: ImageDraw.ImageDraw, layout: _Layout, x: int, y: int, score: float, best: bool) -> None:
    """The score centred under the cell; the best of the row framed and printed in BEST."""
    cell, pad = layout.cell, layout.pad
    if best:
        draw.rectangle([x - pad + 1, y - pad + 1, x + cell + pad - 2, y + cell + pad - 2], outline=BEST,
                       width=max(2, pad - 1))
    text = shown_score(score) + ("  best" if best else "")
    draw.text((x + (cell - layout.font.getlength(text)) / 2, y + cell + pad), text, fill=BEST if best else TEXT,
              font=layout.font)


def _paste_letterboxed(page: PIL.Image.Image, image: PIL.Image.Image, x: int, y: int, cell: int) -> None:
    """Scale to fit the cell (up or down, keeping the aspect ratio) and centre it on LETTERBOX bars."""
    fitted = ImageOps.contain(image, (cell, cell), PIL.Image.Resampling.LANCZOS)
    page.paste(LETTERBOX, (x, y, x + cell, y + cell))
    page.paste(fitted, (x + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))


def _placeholder(draw: ImageDraw.ImageDraw, x: int, y: int, layout: _Layout, word: str) -> None:
    cell = layout.cell
    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=PLACEHOLDER, outline=PLACEHOLDER_INK, width=2)
    draw.line([(x, y), (x + cell - 1, y + cell - 1)], fill=PLACEHOLDER_INK, width=2)
    draw.line([(x, y + cell - 1), (x + cell - 1, y)], fill=PLACEHOLDER_INK, width=2)
    width = layout.font.getlength(word)
    box = [x + (cell - width) / 2 - layout.pad, y + (cell - layout.line) / 2 - layout.pad,
           x + (cell + width) / 2 + layout.pad, y + (cell + layout.line) / 2 + layout.pad]
    draw.rectangle(box, fill=PLACEHOLDER)  # so the word stays legible over the cross
    draw.text((box[0] + layout.pad, box[1] + layout.pad), word, fill=PLACEHOLDER_INK, font=layout.font)
