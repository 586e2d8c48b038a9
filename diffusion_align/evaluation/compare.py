"""Compare two folders of generated images (say, before and after alignment) with one reward model.

Images are paired within a prompt: an image of A and an image of B are compared when they have the same prompt and
do not record different seeds (metadata.jsonl `seed`). So with seeds on both sides images pair one to one by seed;
without them every A image of a prompt meets every B image of it (all pairs: file names carry no meaning across
folders, and all pairs uses every image). A pair is won by the higher score; a tie counts 0.5.

Scores only compare within a prompt, so the prompt is the unit: each prompt gets a win rate and a mean score
difference over its pairs, the overall numbers weigh prompts equally, and the bootstrap intervals resample prompts
(so one prompt gets no interval: NaN, null in the summary).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import write_text_atomic
from .scoring import ScoringError, image_folder, score_folder

N_RESAMPLES = 2000
# Resamples drawn per numpy call: bounds memory (chunk x prompts indices) whatever the number of prompts.
_CHUNK_CELLS = 1 << 22


def pair_outcomes(scores_a, scores_b, tie_margin: float = 0.0) -> np.ndarray:
    """1 where a > b, 0.5 where equal (or no further apart than `tie_margin`: a difference a rater would not see,
    as `label --tie-margin` and the toy raters tie), 0 where a < b, element by element. A NaN score is refused:
    every comparison with it is false, so it would lose on either side."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"expected paired scores of the same shape, got {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("expected scores, got NaN: a pair with a NaN score has no winner")
    tie = (a == b) | (np.abs(a - b) <= tie_margin)
    return np.where(tie, 0.5, (a > b).astype(np.float64))


def win_rate(scores_a, scores_b, tie_margin: float = 0.0) -> float:
    """Fraction of pairs (a_i, b_i) that a wins, ties (`pair_outcomes`) counting half."""
    outcomes = pair_outcomes(scores_a, scores_b, tie_margin)
    if outcomes.size == 0:
        raise ValueError("win_rate of no pairs")
    return float(outcomes.mean())


def bootstrap_interval(values, n_resamples: int = N_RESAMPLES, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (one per prompt), resampling them with replacement.

    The same seed and number of values draw the same resamples, so intervals of two statistics over the same
    prompts come from the same resampled prompt sets.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of per-prompt values, got shape {v.shape}")
    _check_resampling(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // v.size)
    means = np.concatenate([v[rng.integers(0, v.size, (min(chunk, n_resamples - start), v.size))].mean(axis=1)
                            for start in range(0, n_resamples, chunk)])
    return _percentile_interval(means, confidence)


def seeds_bootstrap_interval(values_by_seed, n_resamples: int = N_RESAMPLES, confidence: float = 0.95,
                             seed: int = 0, same_prompts: bool = True) -> tuple[float, float]:
    """Percentile interval for the mean over training seeds of each seed's mean over prompts, `values_by_seed`
    being (seeds, prompts): one value per prompt for each training seed.

    Each resample draws the seeds with replacement and the prompts with replacement, and takes the mean of the drawn
    cells, so both sources of variance widen it. With `same_prompts` (column j is the same prompt for every seed, as
    when every seed is judged on one prompt set) the prompts are drawn once per resample, for all the drawn seeds
    alike: the design is crossed, and a prompt hard for every seed is in or out for all of them (Owen's pigeonhole
    bootstrap). Drawn per seed, the prompts' share of the variance would shrink with the number of seeds, as if
    three seeds judged on the same prompts were judged on three times as many. Without it (each seed judged on
    prompts of its own, the columns only counting them) each drawn seed draws its own prompts. With one seed, or
    seeds that agree on every prompt, it is `bootstrap_interval` over one seed's prompts."""
    v = np.asarray(values_by_seed, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"expected a non-empty (seeds, prompts) array of per-prompt values, got shape {v.shape}")
    _check_resampling(n_resamples, confidence)
    seeds, prompts = v.shape
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // v.size)
    means = []
    for start in range(0, n_resamples, chunk):
        n = min(chunk, n_resamples - start)
        drawn_prompts = rng.integers(0, prompts, (n, 1 if same_prompts else seeds, prompts))
        drawn_seeds = rng.integers(0, seeds, (n, seeds, 1)) if seeds > 1 else np.zeros((n, 1, 1), dtype=np.int64)
        means.append(v[drawn_seeds, drawn_prompts].mean(axis=(1, 2)))
    return _percentile_interval(np.concatenate(means), confidence)


def _check_resampling(n_resamples: int, confidence: float) -> None:
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError(f"expected confidence in (0, 1) and n_resamples >= 1, got {confidence} and {n_resamples}")


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of the resampled means."""
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass
class PromptComparison:
    prompt: str
    images_a: int
    images_b: int
    pairs: int
    pairs_by_seed: int
    mean_a: float  # over the pairs, so mean_a - mean_b is the mean difference
    mean_b: float
    win_rate: float


def match_prompts(rows_a: Sequence[dict], rows_b: Sequence[dict], column: str,
                  tie_margin: float = 0.0) -> list[PromptComparison]:
    """Pair rows (dicts with "prompt", "seed", `column`) of A and B as the module describes; sorted by prompt. A pair
    whose scores are no further apart than `tie_margin` is a tie."""
    by_prompt_a, by_prompt_b = _group(rows_a), _group(rows_b)
    out = []
    for prompt in sorted(by_prompt_a.keys() & by_prompt_b.keys()):
        a_rows, b_rows = by_prompt_a[prompt], by_prompt_b[prompt]
        pairs = [(a, b) for a in a_rows for b in b_rows
                 if a["seed"] is None or b["seed"] is None or a["seed"] == b["seed"]]
        if not pairs:
            continue  # seeds on both sides, none shared
        sa = np.array([a[column] for a, _ in pairs], dtype=np.float64)
        sb = np.array([b[column] for _, b in pairs], dtype=np.float64)
        by_seed = sum(a["seed"] is not None and b["seed"] is not None for a, b in pairs)
        out.append(PromptComparison(prompt, len(a_rows), len(b_rows), len(pairs), by_seed,
                                    float(sa.mean()), float(sb.mean()), win_rate(sa, sb, tie_margin)))
    return out


def _group(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt"], []).append(row)
    return groups


@dataclass
class CompareResult:
    dir_a: str
    dir_b: str
    scorer: str  # the score column, e.g. "pickscore"
    convention: str
    win_rate: float  # of A over B, prompts weighted equally
    win_rate_interval: tuple[float, float]
    mean_diff: float  # mean over prompts of (mean A - mean B)
    mean_diff_interval: tuple[float, float]
    prompts: list[PromptComparison]
    prompts_only_a: int
    prompts_only_b: int
    prompts_without_pairs: int  # in both folders, but every seed differs
    images_a: int
    images_b: int
    confidence: float
    n_resamples: int
    seed: int
    tie_margin: float  # scores no further apart are a tie (the scorer's units)
    unreadable_a: list[tuple[str, str]]  # (file, reason) as score_folder lists them
    unreadable_b: list[tuple[str, str]]
    unscored_a: int  # images whose score is NaN (say, a scorer overflowing in fp16): left out of the pairs
    unscored_b: int
    files: dict[str, str]  # what was written: label -> path

    @property
    def pairs(self) -> int:
        return sum(p.pairs for p in self.prompts)

    @property
    def pairs_by_seed(self) -> int:
        return sum(p.pairs_by_seed for p in self.prompts)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("prompts")  # the per-prompt table goes to the CSV
        for side in ("unreadable_a", "unreadable_b"):
            out[side] = [{"file": f, "reason": r} for f, r in out[side]]
        out.update(pairs=self.pairs, pairs_by_seed=self.pairs_by_seed, matched_prompts=len(self.prompts))
        return out

    def __str__(self) -> str:
        return format_report(self)


def format_report(result: CompareResult, max_prompts: int = 10) -> str:
    """A short human-readable report: the overall numbers, how images were paired, and the extreme prompts."""
    r, pct = result, f"{result.confidence:.0%}"

    def interval(bounds: tuple[float, float], spec: str) -> str:
        return ("no interval: one prompt" if math.isnan(bounds[0])
                else f"{pct} interval {bounds[0]:{spec}}, {bounds[1]:{spec}}")
    lines = [
        f"{r.scorer}: A = {r.dir_a} ({r.images_a} images), B = {r.dir_b} ({r.images_b} images)",
        f"  score: {r.convention}",
        f"  win rate of A over B: {r.win_rate:.3f}  [{interval(r.win_rate_interval, '.3f')}]  (ties count 0.5"
        + (f"; a tie: scores {r.tie_margin:g} apart or less)" if r.tie_margin else ")"),
        f"  mean score difference A - B: {r.mean_diff:+.4g}  [{interval(r.mean_diff_interval, '+.4g')}]",
        f"  {r.pairs} pairs over {len(r.prompts)} prompts, prompts weighted equally; intervals from "
        f"{r.n_resamples} resamples of the prompts (seed {r.seed})" + (
            "; the prompt is the unit resampled, so one prompt gives none: compare images of several prompts"
            if len(r.prompts) == 1 else ""),
    ]
    without_seed = r.pairs - r.pairs_by_seed
    if without_seed:
        lines.append(f"  {without_seed} pairs without seeds on both sides: there every A image of a prompt is "
                     f"compared with every B image of it")
    unmatched = [(r.prompts_only_a, "prompts only in A"), (r.prompts_only_b, "prompts only in B"),
                 (r.prompts_without_pairs, "prompts in both without a shared seed"),
                 (len(r.unreadable_a), "unreadable images in A"), (len(r.unreadable_b), "unreadable images in B"),
                 (r.unscored_a, "images in A scored NaN"), (r.unscored_b, "images in B scored NaN")]
    if any(n for n, _ in unmatched):
        lines.append("  left out: " + ", ".join(f"{n} {what}" for n, what in unmatched if n))
    shown = sorted(r.prompts, key=lambda p: (p.win_rate, p.prompt))
    if len(shown) > max_prompts:
        shown = shown[:max_prompts // 2] + shown[-(max_prompts - max_prompts // 2):]
        lines.append(f"  prompts with the lowest and highest win rates ({max_prompts} of {len(r.prompts)}):")
    else:
        lines.append("  per prompt:")
    lines.append(f"    {'win':>5} {'pairs':>5} {'mean A':>9} {'mean B':>9}  prompt")
    lines += [f"    {p.win_rate:5.2f} {p.pairs:5d} {p.mean_a:9.4g} {p.mean_b:9.4g}  {_short(p.prompt)}" for p in shown]
    lines += [f"  {what}: {path}" for what, path in r.files.items()]
    return "\n".join(lines)


def _short(prompt: str, width: int = 70) -> str:
    one_line = " ".join(prompt.split())
    return one_line if len(one_line) <= width else one_line[:width - 3] + "..."


def compare_folders(dir_a, dir_b, scorer, out_prefix=None, prompt: str | None = None, batch_size: int | None = None,
                    num_workers: int = 2, fast_jpeg: bool = False, n_resamples: int = N_RESAMPLES,
                    confidence: float = 0.95, seed: int = 0, tie_margin: float = 0.0) -> CompareResult:
    """Score both folders (cached in `<out_prefix>.a.csv` / `.b.csv`, so a rerun scores only new images), pair
    their images, and write the per-prompt table `<out_prefix>.csv` and the summary `<out_prefix>.json`.

    `out_prefix` defaults to `compare-<name of A>-vs-<name of B>` in the working directory; it may not lie inside
    either folder (its files would be scored as images). `prompt`, `batch_size`, `num_workers` and `fast_jpeg` go
    to score_folder. `tie_margin`: scores no further apart are a tie, as `label --tie-margin` ties them.
    """
    _check_resampling(n_resamples, confidence)  # before minutes of scoring, not after
    if not (math.isfinite(tie_margin) and tie_margin >= 0):
        raise ScoringError(f"tie_margin must be a finite number >= 0 (in the scorer's units), got {tie_margin}")
    dir_a, dir_b = image_folder(dir_a), image_folder(dir_b)
    if out_prefix is None:
        out_prefix = f"compare-{dir_a.resolve().name}-vs-{dir_b.resolve().name}"
    out_prefix = Path(out_prefix)
    out_dir = out_prefix.parent.resolve()
    for d in (dir_a, dir_b):
        if out_dir == d.resolve() or d.resolve() in out_dir.parents:
            raise ScoringError(f"output prefix {out_prefix} lies inside the compared folder {d}; choose another "
                               f"--out (its files would be scored as images)")
    out_dir.mkdir(parents=True, exist_ok=True)

    reports = [score_folder(d, [scorer], out_prefix.with_name(f"{out_prefix.name}.{side}.csv"), prompt=prompt,
                            batch_size=batch_size, num_workers=num_workers, fast_jpeg=fast_jpeg)
               for d, side in ((dir_a, "a"), (dir_b, "b"))]
    # a NaN score (kept by score_folder, which records what the scorer said) has no winner: its image sits out
    rows_a, rows_b = ([row for row in report.rows if not math.isnan(row[scorer.column])] for report in reports)
    prompts = match_prompts(rows_a, rows_b, scorer.column, tie_margin)
    if not prompts:
        raise ScoringError(f"no pairs: {dir_a} and {dir_b} share no prompt (with a shared seed where both record "
                           f"one); A has {len(_group(rows_a))} prompts, B {len(_group(rows_b))}, "
                           f"e.g. {_examples(rows_a)} and {_examples(rows_b)}")
    wins = [p.win_rate for p in prompts]
    diffs = [p.mean_a - p.mean_b for p in prompts]

    def interval(values: list[float]) -> tuple[float, float]:
        # one prompt leaves nothing to resample: no interval (NaN), not a zero-width one
        return bootstrap_interval(values, n_resamples, confidence, seed) if len(values) > 1 else (math.nan, math.nan)
    in_a, in_b = _group(rows_a).keys(), _group(rows_b).keys()
    csv_path, json_path = (out_prefix.with_name(f"{out_prefix.name}.{ext}") for ext in ("csv", "json"))
    result = CompareResult(
        dir_a=str(dir_a), dir_b=str(dir_b), scorer=scorer.column, convention=scorer.convention,
        win_rate=float(np.mean(wins)), win_rate_interval=interval(wins),
        mean_diff=float(np.mean(diffs)), mean_diff_interval=interval(diffs),
        prompts=prompts, prompts_only_a=len(in_a - in_b), prompts_only_b=len(in_b - in_a),
        prompts_without_pairs=len(in_a & in_b) - len(prompts), images_a=len(reports[0].rows),
        images_b=len(reports[1].rows), confidence=confidence, n_resamples=n_resamples, seed=seed,
        tie_margin=tie_margin,
        unreadable_a=reports[0].unreadable, unreadable_b=reports[1].unreadable,
        unscored_a=len(reports[0].rows) - len(rows_a), unscored_b=len(reports[1].rows) - len(rows_b),
        files={"per-prompt table": str(csv_path), "summary": str(json_path),
               "scores of A": str(reports[0].csv), "scores of B": str(reports[1].csv)},
    )
    write_text_atomic(csv_path, _prompt_table(prompts))
    write_text_atomic(json_path, json.dumps(_json_safe(result.to_dict()), indent=2, ensure_ascii=False) + "\n")
    return result


def _examples(rows: Sequence[dict]) -> str:
    return repr(_short(rows[0]["prompt"], 40)) if rows else "none"


def _prompt_table(prompts: list[PromptComparison]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["prompt", "images_a", "images_b", "pairs", "pairs_by_seed", "mean_a", "mean_b", "mean_diff",
                     "win_rate"])
    writer.writerows([p.prompt, p.images_a, p.images_b, p.pairs, p.pairs_by_seed, f"{p.mean_a:.9g}",
                      f"{p.mean_b:.9g}", f"{p.mean_a - p.mean_b:.9g}", f"{p.win_rate:.9g}"] for p in prompts)
    return buf.getvalue()


def _json_safe(value):
    """NaN and infinities (a scorer that returned NaN) become null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
