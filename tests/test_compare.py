import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_align.evaluation import compare
from diffusion_align.evaluation.compare import (
    bootstrap_interval, compare_folders, match_prompts, pair_outcomes, seeds_bootstrap_interval, win_rate,
)
from diffusion_align.evaluation.scoring import ScoringError


class RednessScorer:
    """The scorer interface without a model: the score is the mean red channel in [0, 1]; counts what it scores."""

    name = column = "redness"
    convention = "mean red channel, 0 (none) to 1 (full red)"
    batch_size, device, needs_prompts = 4, "cpu", True

    def __init__(self):
        self.scored = 0

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32) / 255).permute(2, 0, 1)

    def score_batch(self, pixel_values, prompts):
        self.scored += len(prompts)
        return pixel_values[:, 0].mean(dim=(1, 2))


# ---------------------------------------------------------------- statistics


def test_win_rate_counts_ties_as_half():
    a, b = [3.0, 1.0, 2.0, 2.0, 5.0], [1.0, 3.0, 2.0, 0.0, 5.0]
    assert pair_outcomes(a, b).tolist() == [1.0, 0.0, 0.5, 1.0, 0.5]
    assert win_rate(a, b) == 3 / 5
    assert win_rate([1.0], [1.0]) == 0.5
    # with a tie margin, a difference under it is a tie too (the raters' 0.02 in the toy world)
    assert pair_outcomes([0.50, 0.51, 0.60, 0.40, 0.519], [0.5] * 5, tie_margin=0.02).tolist() == [
        0.5, 0.5, 1.0, 0.0, 0.5]
    # a gap of exactly the margin is a tie, as `label --tie-margin` and the raters tie it
    from diffusion_align.rewards.labeling import hard_labels
    gaps = ([21.25, 21.5, 0.5], [21.0, 21.0, 0.25])
    assert pair_outcomes(*gaps, tie_margin=0.25).tolist() == hard_labels(*gaps, 0.25)[0].tolist() == [0.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="same shape"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no pairs"):
        win_rate([], [])
    with pytest.raises(ValueError, match="NaN"):  # every comparison with NaN is false: it would lose either side
        pair_outcomes([float("nan"), 1.0], [1.0, 1.0])


def test_bootstrap_interval_golden_values():
    assert bootstrap_interval([1.0] * 7) == (1.0, 1.0)  # A always wins: no spread to resample
    # two prompts, win rates 0 and 1: the resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so both 2.5% tails sit on the extremes
    assert bootstrap_interval([0.0, 1.0], n_resamples=2000, seed=0) == (0.0, 1.0)


def test_bootstrap_interval_contains_estimate_and_is_reproducible(monkeypatch):
    values = [1.0, 0.5, 0.0, 1.0, 1.0, 0.75, 0.25, 1.0, 0.5, 1.0]
    low, high = bootstrap_interval(values, seed=3)
    assert 0.0 <= low < np.mean(values) < high <= 1.0
    assert bootstrap_interval(values, seed=3) == (low, high)
    assert bootstrap_interval(values, seed=4) != (low, high)
    assert bootstrap_interval(values, confidence=0.5, seed=3)[0] > low  # a narrower interval
    monkeypatch.setattr(compare, "_CHUNK_CELLS", 1)  # one resample per draw: the same resamples, in pieces
    assert bootstrap_interval(values, seed=3) == (low, high)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


def test_the_seeds_bootstrap_resamples_seeds_and_prompts():
    assert seeds_bootstrap_interval([[0.5, 0.5], [0.5, 0.5]]) == (0.5, 0.5)
    # every prompt agrees within a seed: only the seeds vary, and the resampled mean over two seeds is 0, 0.5 or 1
    # with probabilities 1/4, 1/2, 1/4, so both tails sit on the extremes (likewise 0.2, 0.5, 0.8 for one prompt)
    assert seeds_bootstrap_interval([[0.0, 0.0], [1.0, 1.0]]) == (0.0, 1.0)
    assert seeds_bootstrap_interval([[0.2], [0.8]]) == pytest.approx((0.2, 0.8))
    values = [1.0, 0.5, 0.0, 1.0, 1.0, 0.75, 0.25, 1.0, 0.5, 1.0]
    assert seeds_bootstrap_interval([values], seed=3) == bootstrap_interval(values, seed=3)  # one seed: prompts only
    # two seeds that differ by an offset: the seed spread widens the interval beyond the prompts' alone
    by_seed = np.array([values, np.clip(np.array(values) - 0.3, 0, 1)])
    low, high = seeds_bootstrap_interval(by_seed, seed=1)
    prompts_low, prompts_high = bootstrap_interval(by_seed.mean(axis=0), seed=1)
    assert low < prompts_low < by_seed.mean() < prompts_high < high
    # seeds judged on the same prompts that agree on each add nothing: the interval is one seed's (the prompts are
    # drawn once for all the drawn seeds); drawn per seed, as for seeds judged on prompts of their own, three copies
    # would pass for three times the prompts and narrow it
    crossed = seeds_bootstrap_interval([values] * 3, seed=3)
    assert crossed == pytest.approx(bootstrap_interval(values, seed=3))
    nested_low, nested_high = seeds_bootstrap_interval([values] * 3, seed=3, same_prompts=False)
    assert nested_high - nested_low < 0.75 * (crossed[1] - crossed[0])
    with pytest.raises(ValueError, match=r"\(seeds, prompts\) array"):
        seeds_bootstrap_interval([1.0, 2.0])


def row(prompt, score, seed=None):
    return {"prompt": prompt, "seed": seed, "redness": score}


def test_match_prompts_by_seed_all_pairs_and_mixed():
    rows_a = [row("p1", 0.9, 1), row("p1", 0.1, 2),  # seeds on both sides: one to one
              row("p2", 0.3), row("p2", 0.8),  # no seeds: every A image meets every B image
              row("p3", 0.6, 1), row("p3", 0.2),  # mixed: only different recorded seeds keep images apart
              row("p4", 0.5, 1), row("only A", 0.5)]
    rows_b = [row("p1", 0.5, 2), row("p1", 0.5, 1),
              row("p2", 0.5), row("p2", 0.3), row("p2", 0.7),
              row("p3", 0.4, 1), row("p3", 0.1, 2),
              row("p4", 0.5, 2), row("only B", 0.5)]
    got = {p.prompt: p for p in match_prompts(rows_a, rows_b, "redness")}
    assert list(got) == ["p1", "p2", "p3"]  # p4 shares no seed; the others are in one folder only
    p1, p2, p3 = got["p1"], got["p2"], got["p3"]
    assert (p1.pairs, p1.pairs_by_seed, p1.win_rate, p1.mean_a, p1.mean_b) == (2, 2, 0.5, 0.5, 0.5)
    # 0.3 vs (0.5, 0.3, 0.7): lose, tie, lose; 0.8 beats all three: (0 + 0.5 + 0 + 3) / 6
    assert (p2.images_a, p2.images_b, p2.pairs, p2.pairs_by_seed) == (2, 3, 6, 0)
    assert p2.win_rate == pytest.approx(3.5 / 6)
    assert (p2.mean_a, p2.mean_b) == (pytest.approx(0.55), pytest.approx(0.5))
    # (0.6 s1, 0.4 s1) win; (0.2, 0.4 s1) lose; (0.2, 0.1 s2) win; (0.6 s1, 0.1 s2) not paired
    assert (p3.pairs, p3.pairs_by_seed, p3.win_rate) == (3, 1, pytest.approx(2 / 3))


# ---------------------------------------------------------------- compare_folders


def make_folder(root, images):
    """images: (file, prompt, seed, red level 0-255); prompts and seeds go to metadata.jsonl."""
    root.mkdir(parents=True)
    lines = []
    for file, prompt, seed, red in images:
        Image.new("RGB", (8, 8), (red, 0, 0)).save(root / file)
        lines.append(json.dumps({"file_name": file, "prompt": prompt, **({} if seed is None else {"seed": seed})}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def folders(tmp_path):
    a = make_folder(tmp_path / "before", [
        ("1.png", "p1", 1, 255), ("2.png", "p1", 2, 102),  # seed 1: 1.0 beats 0.6; seed 2: a 0.4 tie
        ("3.png", "p2", 1, 51),  # a 0.2 tie
        ("4.png", "p3", None, 0), ("5.png", "p3", None, 153),  # 0.0 and 0.6 against 0.4: one loss, one win
        ("6.png", "only in A", None, 10)])
    b = make_folder(tmp_path / "after", [
        ("x1.png", "p1", 1, 153), ("x2.png", "p1", 2, 102), ("x3.png", "p2", 1, 51), ("x4.png", "p3", None, 102),
        ("x5.png", "only in B", 3, 10)])
    return a, b


def test_compare_folders_golden(folders, tmp_path):
    scorer = RednessScorer()
    result = compare_folders(*folders, scorer, tmp_path / "out" / "cmp", num_workers=0)
    assert scorer.scored == 6 + 5
    # per prompt: p1 win 0.75, diff (1.0 + 0.4) / 2 - (0.6 + 0.4) / 2 = 0.2; p2 win 0.5, diff 0;
    # p3 win 0.5, diff 0.3 - 0.4 = -0.1. Prompts weigh equally.
    assert result.win_rate == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert result.mean_diff == pytest.approx((0.2 + 0.0 - 0.1) / 3)
    # resampling 3 prompts: all three p1 has probability 1/27 > 2.5%, so the extremes are the interval ends
    assert result.win_rate_interval == pytest.approx((0.5, 0.75))
    assert result.mean_diff_interval == pytest.approx((-0.1, 0.2))
    assert (result.pairs, result.pairs_by_seed, len(result.prompts)) == (5, 3, 3)
    assert (result.prompts_only_a, result.prompts_only_b, result.images_a, result.images_b) == (1, 1, 6, 5)

    with open(tmp_path / "out" / "cmp.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["prompt"], t["pairs"], t["pairs_by_seed"]) for t in table] == [
        ("p1", "2", "2"), ("p2", "1", "1"), ("p3", "2", "0")]
    assert [float(t["win_rate"]) for t in table] == [0.75, 0.5, 0.5]
    assert float(table[0]["mean_a"]) == pytest.approx(0.7) and float(table[0]["mean_b"]) == pytest.approx(0.5)
    assert float(table[2]["mean_diff"]) == pytest.approx(-0.1)

    summary = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert summary["win_rate"] == pytest.approx(result.win_rate)
    assert summary["win_rate_interval"] == pytest.approx([0.5, 0.75])
    assert (summary["pairs"], summary["matched_prompts"], summary["n_resamples"]) == (5, 3, 2000)
    assert summary["convention"] == scorer.convention and summary["scorer"] == "redness"

    report = str(result)
    assert "win rate of A over B: 0.583  [95% interval 0.500, 0.750]" in report
    assert "2 pairs without seeds on both sides" in report
    assert "left out: 1 prompts only in A, 1 prompts only in B" in report

    again = RednessScorer()
    assert compare_folders(*folders, again, tmp_path / "out" / "cmp", num_workers=0).win_rate == result.win_rate
    assert again.scored == 0  # both folders' scores come from the cached CSVs
    # every pair's scores are at most 0.4 apart: under a tie margin of 0.45 each prompt ties
    tied = compare_folders(*folders, again, tmp_path / "out" / "cmp", num_workers=0, tie_margin=0.45)
    assert [p.win_rate for p in tied.prompts] == [0.5, 0.5, 0.5] and tied.win_rate == 0.5
    assert json.loads((tmp_path / "out" / "cmp.json").read_text())["tie_margin"] == 0.45
    assert "(ties count 0.5; a tie: scores 0.45 apart or less)" in str(tied)


def test_images_scored_nan_sit_out_on_either_side(folders, tmp_path):
    """A scorer that returns NaN for the 0.6-red images (A's 5.png, B's x1.png): p1 keeps its seed-2 tie (seed 1 lost
    its B image), p2 its tie, p3 A's 0.0 against 0.4. A over B: (0.5 + 0.5 + 0) / 3, B over A the rest."""
    class NanAt06(RednessScorer):
        def score_batch(self, pixel_values, prompts):
            red = super().score_batch(pixel_values, prompts)
            return torch.where((red - 0.6).abs() < 1e-3, float("nan"), red)
    a_over_b = compare_folders(*folders, NanAt06(), tmp_path / "ab", num_workers=0)
    b_over_a = compare_folders(*reversed(folders), NanAt06(), tmp_path / "ba", num_workers=0)
    assert a_over_b.win_rate == pytest.approx(1 / 3) and b_over_a.win_rate == pytest.approx(2 / 3)
    assert (a_over_b.unscored_a, a_over_b.unscored_b, a_over_b.images_a, a_over_b.pairs) == (1, 1, 6, 3)
    assert "1 images in A scored NaN, 1 images in B scored NaN" in str(a_over_b)


def test_identical_images_tie_whether_their_scores_are_cached_or_fresh(tmp_path):
    """A red level of 26 scores 0.10196..., which the scores CSV holds to 9 digits: a fresh score kept to more digits
    never equalled a cached one, so identical images stopped tying once one side came from its CSV."""
    images = [(f"{k}.png", f"p{k}", None, 26) for k in range(3)]
    a, b = make_folder(tmp_path / "a", images), make_folder(tmp_path / "b", images)
    scorer = RednessScorer()
    assert compare_folders(a, b, scorer, tmp_path / "first", num_workers=0).win_rate == 0.5
    (tmp_path / "first.b.csv").unlink()  # B scored again (say, a run stopped before B), A read from its CSV
    (tmp_path / "first.b.summary.json").unlink()
    result = compare_folders(a, b, scorer, tmp_path / "first", num_workers=0)
    assert scorer.scored == 9 and result.win_rate == 0.5 and [p.win_rate for p in result.prompts] == [0.5] * 3


def test_one_prompt_gets_no_interval(tmp_path):
    """The prompts are resampled: one prompt has no spread to resample, which is no interval, not a zero-width one."""
    a = make_folder(tmp_path / "a", [(f"{k}.png", "one", k, 40 * k) for k in range(4)])
    b = make_folder(tmp_path / "b", [(f"{k}.png", "one", k, 100) for k in range(4)])
    result = compare_folders(a, b, RednessScorer(), tmp_path / "cmp", num_workers=0)
    assert result.win_rate == 0.25 and np.isnan(result.win_rate_interval).all()  # 120 beats 100, the rest lose
    assert np.isnan(result.mean_diff_interval).all()
    assert "[no interval: one prompt]" in str(result) and "one prompt gives none" in str(result)
    summary = json.loads((tmp_path / "cmp.json").read_text())
    assert summary["win_rate_interval"] == [None, None]


def test_compare_errors_name_the_problem(folders, tmp_path):
    a, b = folders
    other = make_folder(tmp_path / "other", [("z.png", "unrelated", None, 9)])
    with pytest.raises(ScoringError, match=f"{re.escape(str(a))} and {re.escape(str(other))} share no prompt"):
        compare_folders(a, other, RednessScorer(), tmp_path / "cmp", num_workers=0)
    with pytest.raises(ScoringError, match="lies inside the compared folder"):
        compare_folders(a, b, RednessScorer(), b / "results" / "cmp", num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        compare_folders(a, tmp_path / "missing", RednessScorer(), tmp_path / "cmp", num_workers=0)

    class Unscorable(RednessScorer):  # a confidence of 2 is refused before anything is scored or written
        def score(self, *args, **kwargs):
            raise AssertionError("scored before the settings were checked")
    with pytest.raises(ValueError, match=r"expected confidence in \(0, 1\)"):
        compare_folders(a, b, Unscorable(), tmp_path / "early", num_workers=0, confidence=2)
    assert not list(tmp_path.glob("early*"))


def test_compare_with_tiny_pickscore(tmp_path):
    from diffusion_align.rewards.tiny import save_tiny_scorer
    from diffusion_align.rewards import load_scorer
    scorer = load_scorer("pickscore", save_tiny_scorer("pickscore", tmp_path / "pickscore"), device="cpu")
    images = [(f"{i}.png", f"prompt {i % 3}", i, 40 * i) for i in range(6)]
    a = make_folder(tmp_path / "a", images)
    b = make_folder(tmp_path / "b", [(f, p, s, 255 - red) for f, p, s, red in images])
    same = compare_folders(a, a, scorer, tmp_path / "self", num_workers=2)
    # a folder against itself: every pair a tie
    assert (same.win_rate, same.win_rate_interval, same.mean_diff) == (0.5, (0.5, 0.5), 0.0)
    result = compare_folders(a, b, scorer, tmp_path / "ab", num_workers=2)
    flipped = compare_folders(b, a, scorer, tmp_path / "ba", num_workers=2)
    assert (result.pairs, result.pairs_by_seed) == (6, 6)
    assert flipped.win_rate == pytest.approx(1 - result.win_rate)
    assert flipped.mean_diff == pytest.approx(-result.mean_diff)
    # the same numbers from the scorer directly, pair by pair (pairs share seed i)
    pil = {d: [Image.open(d / f).convert("RGB") for f, *_ in images] for d in (a, b)}
    prompts = [p for _, p, _, _ in images]
    sa, sb = scorer.score(pil[a], prompts).numpy(), scorer.score(pil[b], prompts).numpy()
    per_prompt = [win_rate(sa[k::3], sb[k::3]) for k in range(3)]
    assert result.win_rate == pytest.approx(np.mean(per_prompt))
    assert result.mean_diff == pytest.approx(np.mean([(sa[k::3] - sb[k::3]).mean() for k in range(3)]), abs=1e-5)
