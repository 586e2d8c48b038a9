"""Preference labels from a reward model: score both images of each pair and write Pick-a-Pic-style pairs.

For a pair with scores s0, s1 (the scorer's own units, e.g. PickScore's logit-scaled cosine) the output adds

    <column>_0, <column>_1   s0, s1
    label_0, label_1         1/0 if s0 - s1 > tie_margin, 0/1 if s1 - s0 > tie_margin, else 0.5/0.5 (an AI tie)
    pref_prob_0              P(image 0 preferred) = scorer.preference_prob_from_scores(s0, s1)
    human_label_0/1          the labels the pair came with (kept as they are when the source already has them;
                             left out where the source is a labelling output without them, whose label_0/1 were
                             a scorer's: `pairs_from_folder`'s, or has no label_0/label_1: pairs to be labelled)

and keeps every other column as it was. Output: `pairs-00000.parquet`, ... (one shard per `shard_size` source rows,
each written whole or not at all), `.shards/pairs-00000.json` (what each shard holds: its settings, source rows and
skipped rows; a rerun keeps the shards whose record matches and labels only the rest) and `labels.json` (the
report). `data.pairs.load_pairs(out_dir)` reads the result, so generate -> label -> train needs no people.

`reward_scores` keeps only what SmPO needs from a scorer, to join to the source at load time, for the rows it
trains on (`data.pairs.preference_rows`), in a folder named by a digest of those rows: shards `pairs-00000.parquet`,
... (one per `shard_size` of the rows) of `row` (the source row) and `<column>_0` / `<column>_1` (float32), no
images, with the same `.shards/` records (settings: source, split, how many rows and which (`selection`), scorer
and its weights path, column; skipped rows). Rows whose images do not decode have no score.

Agreement with people: over the pairs with a strict human preference (human ties and unlabelled pairs are left
out), agreement = (pairs where the scorer picks the same image + 0.5 * pairs the scorer calls a tie) / pairs.
A human label is absent where label_0/label_1 are null or `has_label` is false (Pick-a-Pic's flag), and in a
source that is a labelling output without human_label_0/1 (its label_0/1 being a scorer's).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..data.pairs import NO_LABEL, check_out_dir, decode_pair, first_rows, flag_values, load_pairs, outcomes, \
    parquet_footer, parquet_sources, preference_rows
from ..data.shards import CAPTIONS_REPORT, LABEL_REPORT as REPORT_NAME, SHARD_RECORDS, differences, finished_run, \
    preprocessing_entry, replace_shards, run_shards, write_json
from ..files import local_or_hub, report_dict
from ..progress import progress
from .base import preprocessing_tag

SCORE_SHARD_SIZE = 10_000  # pairs per reward_scores shard: ~120 kB of parquet, minutes of scoring
OUTCOMES = ("image_0", "image_1", "tie")  # indices 0, 1, 2 in outcome arrays (data.pairs.outcomes); -1 = no label

logger = logging.getLogger("diffusion_align")


# ---------------------------------------------------------------- labels and agreement (pure)

def hard_labels(scores_0: np.ndarray, scores_1: np.ndarray, tie_margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(label_0, label_1): 1/0 or 0/1 for the higher score, 0.5/0.5 where |s0 - s1| <= tie_margin."""
    diff = np.asarray(scores_0, np.float64) - np.asarray(scores_1, np.float64)
    label_0 = np.where(np.abs(diff) <= tie_margin, 0.5, (diff > 0).astype(np.float64))
    return label_0, 1.0 - label_0


def outcome_counts(human: np.ndarray, ai: np.ndarray) -> np.ndarray:
    """4x3 counts: rows human image_0 / image_1 / tie / no label, columns AI image_0 / image_1 / tie."""
    counts = np.zeros((4, 3), dtype=np.int64)
    np.add.at(counts, (np.where(human == NO_LABEL, 3, human), ai), 1)
    return counts


def agreement(counts: np.ndarray) -> dict:
    """Agreement with people from `outcome_counts`, and the same counts keyed by name (a confusion table)."""
    counts = np.asarray(counts)
    strict = int(counts[:2].sum())
    credit = counts[0, 0] + counts[1, 1] + 0.5 * (counts[0, 2] + counts[1, 2])
    return {
        "human_strict_pairs": strict,
        "agreement": float(credit / strict) if strict else None,
        "human_ties": int(counts[2].sum()),
        "no_human_label": int(counts[3].sum()),
        "confusion": {f"human {h}": {f"ai {a}": int(counts[i, j]) for j, a in enumerate(OUTCOMES)}
                      for i, h in enumerate((*OUTCOMES, "none"))},
    }


# ---------------------------------------------------------------- scoring

class PairImages(torch.utils.data.Dataset):
    """Item i = both images of row `indices[i]` through `preprocess` (stacked, (2, 3, H, W)) with the caption,
    or the reason they cannot be decoded; `preprocess` is model-free, so this runs in DataLoader workers."""

    def __init__(self, pairs: datasets.Dataset, indices, preprocess):
        self.pairs, self.indices, self.preprocess = pairs, indices, preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        row = self.pairs[index]
        try:
            images = decode_pair(row, index)
        except (ValueError, OSError) as err:  # an undecodable pair is reported and skipped, not fatal
            return {"index": index, "error": str(err)}
        return {"index": index, "pixels": torch.stack([self.preprocess(im) for im in images]),
                "prompt": row["caption"] or ""}


def collate_pair_images(items: list[dict]) -> dict:
    """PairImages items -> pixels (2n, 3, H, W), rows [0_1, 1_1, 0_2, 1_2, ...], each caption twice, and the
    (index, reason) of the undecodable rows."""
    good = [it for it in items if "error" not in it]
    return {"errors": [(it["index"], it["error"]) for it in items if "error" in it],
            "indices": [it["index"] for it in good],
            "pixels": torch.cat([it["pixels"] for it in good]) if good else None,
            "prompts": [it["prompt"] for it in good for _ in (0, 1)]}


def _score_pairs(pairs, rows, scorer, batch_size: int, num_workers: int, desc: str):
    """Scores of `rows`: (indices, (n, 2) float64 scores, [(index, reason)] skipped)."""
    loader = torch.utils.data.DataLoader(
        PairImages(pairs, rows, scorer.preprocess), batch_size=max(1, batch_size // 2),
        num_workers=num_workers, collate_fn=collate_pair_images)
    indices, scores, skipped = [], [], []
    with torch.inference_mode(), progress(total=len(rows), unit="pair", desc=desc) as bar:
        for batch in loader:
            skipped += batch["errors"]
            if batch["indices"]:
                s = scorer.score_batch(batch["pixels"], batch["prompts"])
                if tuple(s.shape) != (2 * len(batch["indices"]),):
                    raise RuntimeError(f"scorer {scorer.name}: score_batch returned shape {tuple(s.shape)} for "
                                       f"{2 * len(batch['indices'])} images")
                indices += batch["indices"]
                scores.append(s.double().view(-1, 2).numpy())
            bar.update(len(batch["indices"]) + len(batch["errors"]))
    scores = np.concatenate(scores) if scores else np.zeros((0, 2))
    finite = np.isfinite(scores).all(axis=1)  # a NaN would silently become a "0/1" label
    skipped += [(i, f"row {i}: scorer {scorer.name} returned a non-finite score {tuple(s)}")
                for i, s, ok in zip(indices, scores.tolist(), finite) if not ok]
    return [i for i, ok in zip(indices, finite) if ok], scores[finite], sorted(skipped)


def _label_columns(scorer, scores: np.ndarray, tie_margin: float) -> dict[str, pa.Array]:
    """The columns the scorer adds: its two scores, hard labels, and P(image 0 preferred)."""
    s0, s1 = scores[:, 0], scores[:, 1]
    label_0, label_1 = hard_labels(s0, s1, tie_margin)
    prob = scorer.preference_prob_from_scores(torch.from_numpy(s0).float(), torch.from_numpy(s1).float())
    return {f"{scorer.column}_0": pa.array(s0, pa.float32()), f"{scorer.column}_1": pa.array(s1, pa.float32()),
            "label_0": pa.array(label_0), "label_1": pa.array(label_1),
            "pref_prob_0": pa.array(prob.float().numpy(), pa.float32())}


# ---------------------------------------------------------------- scorers

def _scorer_and_path(scorer) -> tuple[object, str | None]:
    """A scorer object, or a "name[=path]" spec loaded here; and the weights path to record."""
    if isinstance(scorer, str):
        from . import load_scorer, parse_scorer_spec
        name, path = parse_scorer_spec(scorer)
        return load_scorer(name, path), path
    return scorer, scorer.path


def _scorer_settings(name: str, path, dtype, convention: str | None) -> dict:
    """What a shard's scores depend on besides its rows (the source's fingerprint): the scorer, its weights (a local
    path made absolute, so that a rerun from elsewhere finds the same ones), the dtype it ran in, and its
    preprocessing where it changed since (`base.PREPROCESSING`; `convention`: the scorer's)."""
    return {"scorer": name, "scorer_path": None if path is None else local_or_hub(str(path)),
            "dtype": str(dtype or torch.float32), **preprocessing_entry(preprocessing_tag(name, convention))}


# ---------------------------------------------------------------- label_pairs

@dataclass
class LabelReport:
    out_dir: Path
    scorer: dict  # name, column, convention, path
    tie_margin: float
    pairs_scored: int  # rows written, over all shards (reused ones included)
    skipped: list[tuple[int, str]]  # (source row, reason): not written
    ai_ties: int
    agreement: dict  # see `agreement`
    shards: int
    shards_reused: int
    inputs: dict = field(default_factory=dict)  # what was labelled: source and split, or the folder and its counts

    def to_dict(self) -> dict:
        return report_dict(self)

    def __str__(self) -> str:
        a = self.agreement
        lines = [f"{self.out_dir}: {self.pairs_scored} pairs labelled by {self.scorer['name']} "
                 f"({self.scorer['convention']}), tie margin {self.tie_margin}: {self.ai_ties} AI ties, "
                 f"{len(self.skipped)} skipped; {self.shards} shards ({self.shards_reused} kept from an earlier run)"]
        if a.get("agreement") is not None:
            lines.append(f"  agreement with people on {a['human_strict_pairs']} strict pairs: {a['agreement']:.4f} "
                         f"(AI ties count 0.5); {a['human_ties']} human ties, {a['no_human_label']} unlabelled")
        lines += [f"  skipped {item}: {reason}" for item, reason in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more (all listed in {self.out_dir / REPORT_NAME})")
        return "\n".join(lines)


def label_pairs(source, scorer, out_dir, tie_margin: float = 0.0, batch_size: int | None = None,
                shard_size: int = 1000, num_workers: int = 0, split: str = "train",
                max_pairs: int | None = None) -> LabelReport:
    """Score both images of every pair in `source` (anything `load_pairs` reads; ties kept) and write the
    labelled pairs to `out_dir`; see the module docstring for the columns and files.

    `scorer`: a loaded scorer or a "name[=path]" spec. `tie_margin` is in the scorer's units. `batch_size`: images
    per scorer call (default the scorer's). Images are decoded once, in `num_workers` DataLoader processes.
    Undecodable rows (or non-finite scores) are skipped and listed. A rerun with the same settings keeps the
    finished shards and labels only the others; other settings (the source rewritten since, another scorer, its
    weights or dtype) are an error naming the difference.
    """
    out_dir, source = Path(out_dir), str(source)
    _check_settings(tie_margin, shard_size)
    check_out_dir(source, out_dir)  # before the scorer loads
    pairs, fingerprint = first_rows(source, split, max_pairs, labels=False)
    check_captions_kept(source, pairs.column_names)
    scorer, scorer_path = _scorer_and_path(scorer)
    to_score = pairs.select_columns(["caption", "jpg_0", "jpg_1"])  # what DataLoader workers need to see
    settings = {"source": local_or_hub(source), "split": split, "fingerprint": fingerprint,
                **_scorer_settings(scorer.name, scorer_path, getattr(scorer, "dtype", None),
                                   getattr(scorer, "convention_key", None)),
                "column": scorer.column, "tie_margin": tie_margin, "shard_size": shard_size}

    def label_shard(start: int, stop: int, desc: str):
        indices, scores, bad = _score_pairs(to_score, range(start, stop), scorer, batch_size or scorer.batch_size,
                                            num_workers, f"labelling {desc}")
        table = _labelled_table(pairs, start, stop, indices, scores, scorer, tie_margin)
        has_label = flag_values(table["has_label"], source) if "has_label" in table.column_names else None
        human = (outcomes(*_columns(table, "human_label_0", "human_label_1"), has_label)
                 if "human_label_0" in table.column_names else np.full(len(table), NO_LABEL))
        ai = outcomes(*_columns(table, "label_0", "label_1"))
        return table, {"skipped": bad, "counts": outcome_counts(human, ai).tolist()}

    results = run_shards(out_dir, len(pairs), shard_size, settings, label_shard)
    counts = sum((np.asarray(r["counts"], np.int64) for r, _ in results), np.zeros((4, 3), np.int64))
    written = sum(r["written"] for r, _ in results)
    skipped = [tuple(s) for r, _ in results for s in r["skipped"]]
    reused = sum(kept for _, kept in results)
    report = LabelReport(out_dir, _scorer_info(scorer, scorer_path), tie_margin, written, skipped,
                         int(counts[:, 2].sum()), agreement(counts), len(results), reused,
                         {"source": settings["source"], "split": split, "rows": len(pairs)})
    write_json(out_dir / REPORT_NAME, report.to_dict())
    return report


def check_captions_kept(source: str, columns: list[str] | None = None) -> None:
    """Refuse to relabel pairs whose DCPO captions (`captions --strategy perturbation` or `hybrid`) sit on the loser
    the source's labels chose: a pair whose winner changed would train its perturbed caption as the winner's.
    Captions that each describe their own image (`captioning`, as the report beside every parquet file of the source
    says) are kept. `columns`: the source's (None: its first parquet file's, read from the footer; a hub or
    save_to_disk source is checked once opened)."""
    files = parquet_sources(source)
    if columns is None and not files:
        return
    if not {"caption_0", "caption_1"} & set(columns or parquet_footer(str(files[0])).schema.to_arrow_schema().names):
        return
    strategies = {_captions_strategy(folder) for folder in {f.parent for f in files}} or {None}
    if strategies == {"captioning"}:
        return
    strategy = min(strategies - {"captioning"}, key=lambda s: s is None)  # a perturbing one before an unknown one
    how = (f"were made by `captions --strategy {strategy}`, which perturbs the caption of each pair's loser as its "
           "labels say" if strategy else
           f"come with no {CAPTIONS_REPORT} to say how they were made; made by `captions --strategy perturbation` or "
           "`hybrid`, the caption of each pair's loser is perturbed as its labels say")
    raise ValueError(f"{source}: its caption_0/caption_1 {how}. Relabelled, a pair whose "
                     "winner changes would train its perturbed caption as the winner's: label first, then make the "
                     "captions of the labelled pairs (or drop the two columns where each caption describes its own "
                     "image)")


def _captions_strategy(folder: Path) -> str | None:
    """The strategy the captions report in `folder` records; None where there is none to read."""
    try:
        return json.loads((folder / CAPTIONS_REPORT).read_text(encoding="utf-8")).get("strategy")
    except (OSError, ValueError, AttributeError):
        return None


def _columns(table: pa.Table, *names: str) -> list[np.ndarray]:
    return [table[n].to_numpy(zero_copy_only=False) for n in names]  # nulls become NaN (floats) or None


def _check_settings(tie_margin: float, shard_size: int) -> None:
    if not (math.isfinite(tie_margin) and tie_margin >= 0):
        raise ValueError(f"tie_margin must be a finite number >= 0 (in the scorer's units), got {tie_margin}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 pairs, got {shard_size}")


def _scorer_info(scorer, path) -> dict:
    return {"name": scorer.name, "column": scorer.column, "convention": scorer.convention, "path": path}


def _labelled_table(pairs: datasets.Dataset, start: int, stop: int, indices: list[int], scores: np.ndarray,
                    scorer, tie_margin: float) -> pa.Table:
    """Source rows `indices` (all columns as stored) with the human labels moved aside and the scorer's added."""
    rows = pairs.with_format("arrow")[start:stop]
    rows = rows.take(pa.array([i - start for i in indices], pa.int64())).replace_schema_metadata(None)
    # A source labelled before keeps its human labels; its old label_0/1 were another scorer's, so a labelling
    # output without human labels (pairs_from_folder's, marked by pref_prob_0) has none, and gets no human_label_*
    # columns: SmPO's loader then decides ties on label_0/1 (null ones would drop every pair as unlabelled).
    if "human_label_0" in rows.column_names:
        human = [rows[f"human_label_{i}"].cast(pa.float64()) for i in (0, 1)]
    elif "pref_prob_0" in rows.column_names or "label_0" not in rows.column_names:  # a source of unlabelled pairs
        human = []
    else:
        human = [rows[f"label_{i}"].cast(pa.float64()) for i in (0, 1)]
    added = _label_columns(scorer, scores, tie_margin)
    rows = rows.drop_columns([c for c in rows.column_names if c in added or c.startswith("human_label_")])
    for i, labels in enumerate(human):
        rows = rows.append_column(f"human_label_{i}", labels)
    for name, values in added.items():
        rows = rows.append_column(name, values)
    return rows


def reward_scores(source: str, column: str, scorer, cache_dir, split: str = "train", streaming: bool = False,
                  batch_size: int | None = None, num_workers: int = 0, shard_size: int = SCORE_SHARD_SIZE,
                  keep_ties: bool = False, max_pairs: int | None = None, seed: int | None = None
                  ) -> dict[str, np.ndarray] | None:
    """The reward columns `<column>_0` / `<column>_1` of `source`, for `load_pairs(scores=...)`, one float32 value
    per source row: scored for the rows the training draws its pairs from (`preference_rows(source, split,
    keep_ties, max_pairs, seed)`), NaN for the others and for rows whose images do not decode. None where
    `source` has these columns itself.

    They are computed once with `scorer` (a "NAME[=PATH]" spec, loaded in the convention whose column is `column`,
    or a loaded scorer) into `cache_dir/rows-<digest of the rows>`, so another sample of rows (data.max_pairs) is
    cached beside; see the module docstring. A cache of another source (or the source rewritten since), split,
    scorer, weights or dtype is an error naming the difference. A finished cache is read without loading the scorer
    (later runs, and the other processes of a run once the main one has finished it). `streaming`: as load_pairs;
    a stream has no row numbers to join by, so its scores must be in the pairs themselves.
    """
    pairs, _ = load_pairs(source, split=split, keep_ties=True, streaming=streaming, extra_columns="all")
    names = [f"{column}_0", f"{column}_1"]
    if set(names) <= set(pairs.column_names or next(iter(pairs))):
        return None
    if scorer is None:
        raise ValueError(f"{source}: no columns {names[0]} / {names[1]} with reward scores; add them with "
                         f"`diffusion-align label` or name a scorer to compute them (method.pref_scorer)")
    if isinstance(scorer, str):
        from . import load_scorer, parse_scorer_spec
        name, path = parse_scorer_spec(scorer)
        convention = _convention(name, column)  # checked now, not after the first shard
    elif scorer.column != column:
        raise ValueError(f"scorer {scorer.name} writes column {scorer.column!r}, not {column!r}")
    else:
        name, path, convention = scorer.name, scorer.path, None
    if isinstance(pairs, datasets.IterableDataset):
        how = f"--scorer {scorer} --convention {name}={convention}" if convention else f"--scorer {name}"
        raise ValueError(f"{source}: data.streaming=true cannot use reward scores computed into {cache_dir}: they are "
                         f"joined by source row, and a stream split across processes has no row numbers. Set "
                         f"data.streaming=false, or write the scores into a copy of the pairs (images included) "
                         f"with `diffusion-align label {source} {how} --out DIR` and train on DIR")

    rows = preference_rows(source, split, keep_ties, max_pairs, seed, opened=pairs)
    selection = hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()
    settings = {"source": local_or_hub(source), "split": split, "rows": len(rows), "selection": selection,
                "fingerprint": pairs._fingerprint,
                **_scorer_settings(name, path, None if convention else getattr(scorer, "dtype", None),
                                   convention or getattr(scorer, "convention_key", None)),
                "column": column, "shard_size": shard_size}
    columns = {n: np.full(len(pairs), np.nan, np.float32) for n in names}
    # a finished cache of every row, in cache_dir itself, as runs made before scoring only their rows left it
    every_row = {k: v for k, v in settings.items() if k != "selection"} | {"rows": len(pairs)}
    if finished_run(Path(cache_dir), len(pairs), shard_size, every_row):
        logger.info("%s: reusing its scores of every row of %s", cache_dir, source)
        _read_scores(Path(cache_dir), columns, rows)
        return columns
    cache_dir, loaded = Path(cache_dir) / f"rows-{selection[:16]}", []  # the scorer, loaded once a shard is to do
    to_score = pairs.select_columns(["caption", "jpg_0", "jpg_1"])  # what DataLoader workers need to see

    def score_shard(start: int, stop: int, desc: str):
        if not loaded:
            loaded.append(load_scorer(name, path, convention=convention) if convention else scorer)
        indices, scores, bad = _score_pairs(to_score, rows[start:stop], loaded[0],
                                            batch_size or loaded[0].batch_size, num_workers, f"scoring {desc}")
        table = pa.table({"row": pa.array(indices, pa.int64()), names[0]: pa.array(scores[:, 0], pa.float32()),
                          names[1]: pa.array(scores[:, 1], pa.float32())})
        return table, {"skipped": bad}

    run_shards(cache_dir, len(rows), shard_size, settings, score_shard)
    _read_scores(cache_dir, columns, rows)
    return columns


def _read_scores(cache_dir: Path, columns: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Fill `columns` at `rows` with the scores of a reward_scores cache."""
    for shard in sorted(cache_dir.glob("pairs-*.parquet")):
        table = pq.read_table(shard)
        wanted = np.isin(table["row"].to_numpy(), rows)
        for name, values in columns.items():
            values[table["row"].to_numpy()[wanted]] = table[name].to_numpy()[wanted]


def _convention(name: str, column: str) -> str:
    """The convention of scorer `name` whose output column is `column`."""
    from .registry import load_spec
    conventions = {entry["column"]: key for key, entry in load_spec(name)["conventions"].items()}
    if column not in conventions:
        raise ValueError(f"scorer {name} writes columns {sorted(conventions)}, not {column!r}")
    return conventions[column]


# ---------------------------------------------------------------- pairs_from_folder

def choose_pairs(scores: np.ndarray, max_pairs: int | None, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of one prompt's images: all of them, or with `max_pairs` at most that many:
    best vs worst first (the clearest preference), then others drawn at random without replacement."""
    n = len(scores)
    every = list(itertools.combinations(range(n), 2))
    if max_pairs is None or len(every) <= max_pairs:
        return every
    order = np.argsort(scores, kind="stable")
    best_worst = tuple(sorted((int(order[0]), int(order[-1]))))
    rest = [p for p in every if p != best_worst]
    drawn = rng.choice(len(rest), size=max_pairs - 1, replace=False) if max_pairs > 1 else []
    return [best_worst, *sorted(rest[i] for i in drawn)]


def pairs_from_folder(image_dir, scorer, out_dir, max_pairs_per_prompt: int | None = None, seed: int = 0,
                      tie_margin: float = 0.0, batch_size: int | None = None, num_workers: int = 0,
                      shard_size: int = 1000) -> LabelReport:
    """Preference pairs from a folder of generated images, labelled by `scorer`, in the label_pairs layout.

    Images and prompts are found as `evaluation.scoring.score_folder` finds them (metadata.jsonl with `file_name` and
    `prompt`/`text`/`caption`, or a .txt beside each image); every image is scored once, into
    `out_dir/scores.csv` (a rerun scores only new images; a summary and histogram lie beside it). Images of the
    same prompt are paired: all n(n-1)/2 pairs, or at most `max_pairs_per_prompt` (best vs worst plus random
    others, drawn from `seed` and the prompt, so one prompt's pairs do not depend on the other prompts).
    Rows: `caption`, `jpg_0`/`jpg_1` (the original files' bytes), `image_0_path`/`image_1_path` (relative to
    `image_dir`), the label columns, and `num_example_per_prompt` (pairs written for that prompt). The new shards
    replace the old ones only once all are written, so a crash leaves the previous set whole.
    """
    from ..evaluation.scoring import score_folder
    _check_settings(tie_margin, shard_size)
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None (all pairs), got {max_pairs_per_prompt}")
    scorer, scorer_path = _scorer_and_path(scorer)
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    _check_folder_record(out_dir / SHARD_RECORDS / "folder.json",
                         {"image_dir": str(image_dir.resolve()), "scorer": scorer.name, "scorer_path": scorer_path,
                          "column": scorer.column})
    scored = score_folder(image_dir, [scorer], out_dir / "scores.csv", batch_size=batch_size,
                          num_workers=num_workers)
    skipped, by_prompt = list(scored.unreadable), {}
    for row in sorted(scored.rows, key=lambda r: r["file"]):  # score_folder dropped the rows of deleted images
        if not row["prompt"]:  # possible with scorers that read no prompt
            skipped.append((row["file"], "no prompt (metadata.jsonl or a .txt beside it): cannot be paired"))
        elif not math.isfinite(row[scorer.column]):  # a NaN would silently become a "0/1" label
            skipped.append((row["file"], f"scorer {scorer.name} returned a non-finite score {row[scorer.column]}"))
        else:
            by_prompt.setdefault(row["prompt"], []).append((row["file"], row[scorer.column]))

    rows = []
    for prompt in sorted(by_prompt):
        files, scores = zip(*by_prompt[prompt])
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")])
        chosen = choose_pairs(np.asarray(scores), max_pairs_per_prompt, rng)
        rows += [(prompt, files[i], files[j], scores[i], scores[j], len(chosen)) for i, j in chosen]

    ai = np.zeros(3, np.int64)

    def tables():
        nonlocal ai
        for start in range(0, len(rows), shard_size):
            table = _folder_table(rows[start:start + shard_size], image_dir, scorer, tie_margin)
            ai += np.bincount(outcomes(*_columns(table, "label_0", "label_1")), minlength=3)
            yield table
    new = replace_shards(out_dir, tables(), ".pairs.tmp")

    counts = np.zeros((4, 3), np.int64)
    counts[3] = ai  # no human labels here: every pair sits in the "no label" row
    report = LabelReport(out_dir, _scorer_info(scorer, scorer_path), tie_margin, len(rows), skipped, int(ai[2]),
                         agreement(counts), len(new), 0,
                         {"image_dir": str(image_dir.resolve()), "images": sum(map(len, by_prompt.values())),
                          "prompts": len(by_prompt), "prompts_paired": sum(len(v) > 1 for v in by_prompt.values()),
                          "max_pairs_per_prompt": max_pairs_per_prompt, "seed": seed})
    write_json(out_dir / REPORT_NAME, report.to_dict())
    return report


def _check_folder_record(path: Path, settings: dict) -> None:
    """scores.csv is resumed, so it must come from the same folder and scorer (same column, other weights)."""
    if path.is_file():
        changed = differences(json.loads(path.read_text(encoding="utf-8")), settings)
        if changed:
            raise ValueError(f"{path.parent.parent}: holds scores and pairs made with other settings ({changed}); "
                             f"write to a new folder")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)


def _folder_table(rows: list[tuple], image_dir: Path, scorer, tie_margin: float) -> pa.Table:
    caption, file_0, file_1, s0, s1, per_prompt = (list(c) for c in zip(*rows))
    columns = {"caption": pa.array(caption, pa.string()),
               "jpg_0": pa.array([(image_dir / f).read_bytes() for f in file_0], pa.binary()),
               "jpg_1": pa.array([(image_dir / f).read_bytes() for f in file_1], pa.binary()),
               **_label_columns(scorer, np.stack([s0, s1], axis=1).astype(np.float64), tie_margin),
               "num_example_per_prompt": pa.array(per_prompt, pa.int64()),
               "image_0_path": pa.array(file_0, pa.string()), "image_1_path": pa.array(file_1, pa.string())}
    return pa.table(columns)
