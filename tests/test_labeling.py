"""label_pairs / pairs_from_folder: golden labels and agreement on a constructed set, skipping, resuming, loading."""

import io
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffusion_align.data.pairs import decode_image, load_pairs, outcomes, preference_rows
from diffusion_align.rewards import load_scorer
from diffusion_align.rewards.labeling import (
    agreement, choose_pairs, hard_labels, label_pairs, outcome_counts, pairs_from_folder, reward_scores,
)
from diffusion_align.rewards.tiny import save_tiny_scorer


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    return str(save_tiny_scorer("pickscore", tmp_path_factory.mktemp("pickscore")))


class FakeScorer:
    """score = 10 * mean red level in [0, 1], so a solid image's score is known; P(a over b) = sigmoid(a - b).

    Counts the images it scores; `fail_after` calls to score_batch it raises, like a run that crashes."""

    name = column = "fake"
    convention = "10 x mean red level (test scorer)"
    batch_size, device, needs_prompts, path = 4, "cpu", True, None

    def __init__(self, fail_after: int | None = None):
        self.images_scored, self.calls, self.fail_after = 0, 0, fail_after

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image.convert("RGB").resize((8, 8)), np.float32)).permute(2, 0, 1) / 255

    def score_batch(self, pixel_values, prompts):
        assert len(prompts) == len(pixel_values)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.images_scored += len(pixel_values)
        return pixel_values[:, 0].mean((1, 2)) * 10

    def score(self, images, prompts):
        return self.score_batch(torch.stack([self.preprocess(im) for im in images]), prompts)

    def preference_prob_from_scores(self, scores_a, scores_b):
        return torch.sigmoid(scores_a - scores_b)


def solid(red: int, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (red, 30, 60)).save(buf, format=fmt)
    return buf.getvalue()


# (red_0, red_1, human label_0, has_label); score = red / 25.5. Margin 0.1 makes row 2 an AI tie (4.0 vs 4.078).
ROWS = [
    (204, 51, 1.0, True),    # 0: AI image_0, human image_0: agree
    (51, 204, 1.0, True),    # 1: AI image_1, human image_0: disagree
    (102, 104, 0.0, True),   # 2: AI tie,     human image_1: half
    (204, None, 1.0, True),  # 3: corrupt jpg_1: skipped
    (153, 102, 0.5, True),   # 4: AI image_0, human tie
    (102, 153, 0.0, True),   # 5: AI image_1, human image_1: agree
    (255, 0, None, True),    # 6: AI image_0, no human label (null)
    (0, 255, 1.0, False),    # 7: AI image_1, no human label (has_label false)
    (100, 100, 0.5, True),   # 8: AI tie,     human tie
    (10, 200, 0.0, True),    # 9: AI image_1, human image_1: agree
]
MARGIN = 0.1


def write_constructed(path):
    table = pa.table({
        "caption": [f"prompt {i}" for i in range(len(ROWS))],
        "jpg_0": [solid(r0) for r0, _, _, _ in ROWS],
        "jpg_1": [b"not an image" if r1 is None else solid(r1) for _, r1, _, _ in ROWS],
        "label_0": pa.array([h for _, _, h, _ in ROWS], pa.float64()),
        "label_1": pa.array([None if h is None else 1 - h for _, _, h, _ in ROWS], pa.float64()),
        "has_label": [ok for _, _, _, ok in ROWS],
        "model_0": [f"m{i}" for i in range(len(ROWS))],
    })
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def constructed(tmp_path):
    return write_constructed(tmp_path / "pairs.parquet")


def read_out(out_dir):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out_dir.glob("pairs-*.parquet"))]).to_pylist()


# ---------------------------------------------------------------- pure parts

def test_hard_labels_use_the_margin_in_scorer_units():
    l0, l1 = hard_labels(np.array([8.0, 4.0, 4.0, 4.0, 3.0]), np.array([2.0, 4.1, 4.0, 4.1000001, 3.25]), 0.1)
    assert l0.tolist() == [1.0, 0.5, 0.5, 0.0, 0.0]
    assert (l0 + l1).tolist() == [1.0] * 5
    assert hard_labels(np.array([4.0]), np.array([4.0]), 0.0)[0].tolist() == [0.5]  # margin 0: only equal scores


def test_agreement_golden():
    human = outcomes([1, 1, 0, 0.5, 0, None, 1, 0.5, 0], [0, 0, 1, 0.5, 1, None, 0, 0.5, 1],
                     [True, True, True, True, True, True, False, True, True])
    assert human.tolist() == [0, 0, 1, 2, 1, -1, -1, 2, 1]
    ai = np.array([0, 1, 2, 0, 1, 0, 1, 2, 1])
    counts = outcome_counts(human, ai)
    assert counts.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1], [1, 1, 0]]
    result = agreement(counts)
    # strict human pairs: 0 (agree), 1 (disagree), 2 (AI tie: 0.5), 4 and 8 (agree) -> 3.5 / 5
    assert result["agreement"] == pytest.approx(0.7)
    assert (result["human_strict_pairs"], result["human_ties"], result["no_human_label"]) == (5, 2, 2)
    assert result["confusion"]["human image_1"] == {"ai image_0": 0, "ai image_1": 2, "ai tie": 1}
    assert agreement(np.zeros((4, 3)))["agreement"] is None  # no strict pairs: no number, not 0


def test_choose_pairs_caps_with_best_vs_worst_first():
    scores = np.array([3.0, 9.0, 1.0, 5.0, 7.0])
    assert len(choose_pairs(scores, None, np.random.default_rng(0))) == 10
    picked = choose_pairs(scores, 3, np.random.default_rng(0))
    assert picked[0] == (1, 2) and len(set(picked)) == 3 and all(i < j for i, j in picked)
    assert picked == choose_pairs(scores, 3, np.random.default_rng(0))  # seeded
    assert choose_pairs(scores, 1, np.random.default_rng(0)) == [(1, 2)]
    assert choose_pairs(np.array([2.0]), 3, np.random.default_rng(0)) == []


# ---------------------------------------------------------------- label_pairs

def test_label_pairs_golden_on_a_constructed_set(constructed, tmp_path):
    out = tmp_path / "labelled"
    report = label_pairs(constructed, FakeScorer(), out, tie_margin=MARGIN, batch_size=3, shard_size=4)
    assert report.pairs_scored == 9 and report.ai_ties == 2 and report.shards == 3 and report.shards_reused == 0
    assert [i for i, _ in report.skipped] == [3] and "row 3, column jpg_1" in report.skipped[0][1]
    a = report.agreement
    assert a["agreement"] == pytest.approx(0.7) and a["human_strict_pairs"] == 5
    assert a["confusion"] == {
        "human image_0": {"ai image_0": 1, "ai image_1": 1, "ai tie": 0},
        "human image_1": {"ai image_0": 0, "ai image_1": 2, "ai tie": 1},
        "human tie": {"ai image_0": 1, "ai image_1": 0, "ai tie": 1},
        "human none": {"ai image_0": 1, "ai image_1": 1, "ai tie": 0},
    }

    rows = read_out(out)
    assert [r["model_0"] for r in rows] == [f"m{i}" for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]  # other columns kept
    for r, (r0, r1, human, _) in zip(rows, [row for i, row in enumerate(ROWS) if i != 3]):
        s0, s1 = r0 / 25.5, r1 / 25.5
        assert (r["fake_0"], r["fake_1"]) == (pytest.approx(s0, abs=1e-5), pytest.approx(s1, abs=1e-5))
        expected = 0.5 if abs(s0 - s1) <= MARGIN else float(s0 > s1)
        assert (r["label_0"], r["label_1"]) == (expected, 1 - expected)
        assert r["pref_prob_0"] == pytest.approx(1 / (1 + np.exp(s1 - s0)), abs=1e-6)
        assert r["human_label_0"] == human

    saved = json.loads((out / "labels.json").read_text())
    assert saved["scorer"] == {"name": "fake", "column": "fake", "convention": FakeScorer.convention, "path": None}
    assert saved["tie_margin"] == MARGIN and saved["agreement"]["agreement"] == pytest.approx(0.7)
    assert saved["skipped"][0]["item"] == 3


def test_output_loads_with_the_trainers_loader(constructed, tmp_path):
    out = tmp_path / "labelled"
    label_pairs(constructed, FakeScorer(), out, tie_margin=MARGIN, shard_size=4)
    strict, stats = load_pairs(str(out))  # the trainer's default: AI ties dropped
    assert stats.rows == 9 and stats.ties_dropped == 2 and len(strict) == 7
    kept, _ = load_pairs(str(out), keep_ties=True, extra_columns=["fake_0", "fake_1", "pref_prob_0"])
    row = kept[0]
    assert decode_image(row["jpg_0"], "out").getpixel((0, 0)) == (204, 30, 60) and row["label_0"] == 1.0


def test_rerun_resumes_finished_shards(constructed, tmp_path):
    out = tmp_path / "labelled"
    crashing = FakeScorer(fail_after=2)  # batch_size 4 images = 2 pairs per call: dies inside shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        label_pairs(constructed, crashing, out, tie_margin=MARGIN, batch_size=4, shard_size=4)
    assert sorted(p.name for p in out.glob("pairs-*.parquet")) == ["pairs-00000.parquet"]
    with pytest.raises(ValueError, match=r"holds part of its pairs only: shards in \.shards/ but no labels\.json"):
        load_pairs(str(out))  # not trained on as if it were the whole output
    with pytest.raises(ValueError, match=r"labelled holds part of its pairs only: shards in \.shards/ but no"):
        load_pairs(str(out / "*.parquet"))  # nor given as a glob
    with pytest.raises(ValueError, match=r"labelled holds part of its pairs only: shards in \.shards/ but no"):
        load_pairs(str(tmp_path))  # nor read inside a folder given whole

    counting = FakeScorer()
    report = label_pairs(constructed, counting, out, tie_margin=MARGIN, batch_size=4, shard_size=4)
    assert counting.images_scored == 2 * 6  # rows 4..9 only; shard 0 (rows 0-3) was kept
    assert report.shards_reused == 1 and report.pairs_scored == 9 and [i for i, _ in report.skipped] == [3]
    assert report.agreement["agreement"] == pytest.approx(0.7)

    again = FakeScorer()
    assert label_pairs(constructed, again, out, tie_margin=MARGIN, batch_size=4, shard_size=4).shards_reused == 3
    assert again.images_scored == 0
    with pytest.raises(ValueError, match="tie_margin=0.1 there, 0.2 now"):
        label_pairs(constructed, FakeScorer(), out, tie_margin=0.2, shard_size=4)
    with pytest.raises(ValueError, match="past the 1 this run writes"):
        label_pairs(constructed, FakeScorer(), out, tie_margin=MARGIN, shard_size=4, max_pairs=3)
    assert len(load_pairs(str(out))[0]) == 7

    # a rerun over more rows (here: the first 6, then all) that stopped before its report, which is the smaller
    # run's: shard 1 was remade over rows 4-7 (it held 4-5), shard 2 stopped
    smaller = tmp_path / "smaller"
    label_pairs(constructed, FakeScorer(), smaller, tie_margin=MARGIN, shard_size=4, max_pairs=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        label_pairs(constructed, FakeScorer(fail_after=2), smaller, tie_margin=MARGIN, batch_size=4, shard_size=4)
    assert len(list((smaller / ".shards").glob("pairs-*.json"))) == 2  # as many shards as the report counts
    with pytest.raises(ValueError, match=r"its shards hold 7 pairs of source rows 0-7 but its labels\.json counts 5 "
                                         r"of 6 rows: a rerun over more rows stopped"):
        load_pairs(str(smaller))
    # one that remade the last shard over more rows, all of them skipped (as many pairs), then stopped
    label_pairs(constructed, FakeScorer(), smaller, tie_margin=MARGIN, shard_size=4, max_pairs=6)
    record_path = smaller / ".shards" / "pairs-00001.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "rows": [4, 8]}))
    with pytest.raises(ValueError, match=r"hold 5 pairs of source rows 0-7 but its labels\.json counts 5 of 6 rows"):
        load_pairs(str(smaller))


def test_a_rerun_on_a_changed_source_or_scorer_dtype_is_refused(constructed, tmp_path):
    """Shards were kept by path, split and row count alone: a source rewritten in place (its images swapped) had its
    old labels and scores joined to the new rows by row number, and a scorer in another dtype mixed precisions."""
    out, cache = tmp_path / "labelled", tmp_path / "soft-labels"
    label_pairs(constructed, FakeScorer(), out, tie_margin=MARGIN, shard_size=4)
    reward_scores(constructed, "fake", FakeScorer(), cache, shard_size=4)
    half = FakeScorer()
    half.dtype = torch.bfloat16
    with pytest.raises(ValueError, match=r"other settings \(dtype='torch.float32' there, 'torch.bfloat16' now\)"):
        label_pairs(constructed, half, out, tie_margin=MARGIN, shard_size=4)
    with pytest.raises(ValueError, match=r"other settings \(dtype='torch.float32' there, 'torch.bfloat16' now\)"):
        reward_scores(constructed, "fake", half, cache, shard_size=4)
    swapped = pq.read_table(constructed)  # rewritten in place, each pair's images swapped
    pq.write_table(swapped.rename_columns([{"jpg_0": "jpg_1", "jpg_1": "jpg_0"}.get(c, c)
                                           for c in swapped.column_names]), constructed)
    for make in (lambda: label_pairs(constructed, FakeScorer(), out, tie_margin=MARGIN, shard_size=4),
                 lambda: reward_scores(constructed, "fake", FakeScorer(), cache, shard_size=4)):
        with pytest.raises(ValueError, match=r"other settings \(fingerprint='[0-9a-f]+' there, '[0-9a-f]+' now\)"):
            make()
    # a record made before the source's fingerprint and the dtype were recorded is not compared on them
    for record in [*(out / ".shards").glob("*.json"), *(cache / ".shards").glob("*.json")]:
        old = json.loads(record.read_text())
        del old["settings"]["fingerprint"], old["settings"]["dtype"]
        record.write_text(json.dumps(old))
    assert label_pairs(constructed, FakeScorer(), out, tie_margin=MARGIN, shard_size=4).shards_reused == 3


def test_relabelling_keeps_the_human_labels(constructed, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    label_pairs(constructed, FakeScorer(), first, tie_margin=MARGIN)
    report = label_pairs(str(first), FakeScorer(), second, tie_margin=100.0)  # every pair is an AI tie now
    assert report.ai_ties == 9 and report.agreement["agreement"] == pytest.approx(0.5)
    rows = read_out(second)
    assert [r["human_label_0"] for r in rows] == [h for i, (_, _, h, _) in enumerate(ROWS) if i != 3]
    assert all(r["label_0"] == 0.5 for r in rows)


def test_output_folder_holding_the_source_is_refused(constructed, tmp_path):
    before = (tmp_path / "pairs.parquet").read_bytes()
    for out, why in [(tmp_path, "holds source file"), (tmp_path / "sub", "lies in source folder")]:
        with pytest.raises(ValueError, match=f"^{out}: the output folder {why} .*write to another folder"):
            label_pairs(str(tmp_path), "pickscore=/no/such/weights", out)  # refused before the scorer loads
    with pytest.raises(ValueError, match="holds source file .*pairs.parquet"):
        label_pairs(constructed, FakeScorer(), tmp_path)
    assert (tmp_path / "pairs.parquet").read_bytes() == before and not list(tmp_path.glob("pairs-*"))


def test_save_to_disk_source_with_image_features(tmp_path):
    rows = {"caption": ["a", "b"], "jpg_0": [{"bytes": solid(200), "path": None}, {"bytes": solid(20), "path": None}],
            "jpg_1": [{"bytes": solid(100), "path": None}, {"bytes": b"broken", "path": None}],
            "label_0": [0.0, 1.0], "label_1": [1.0, 0.0]}
    ds = datasets.Dataset.from_dict(rows).cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    report = label_pairs(str(tmp_path / "saved"), FakeScorer(), tmp_path / "out")
    assert report.pairs_scored == 1 and report.agreement["agreement"] == 0.0  # scorer picks image 0, people 1
    kept, _ = load_pairs(str(tmp_path / "out"))
    assert decode_image(kept[0]["jpg_1"], "out").getpixel((0, 0)) == (100, 30, 60)


def test_real_pickscore_end_to_end(tiny_pairs, tiny_pickscore, tmp_path):
    out = tmp_path / "out"
    report = label_pairs(str(tiny_pairs), f"pickscore={tiny_pickscore}", out, batch_size=6, shard_size=5,
                         num_workers=2)  # the scorer's preprocess runs in worker processes
    assert report.scorer["path"] == tiny_pickscore and report.scorer["column"] == "pickscore"
    assert report.pairs_scored == 16 and report.shards == 4 and report.agreement["human_strict_pairs"] == 16
    rows = read_out(out)
    scorer = load_scorer("pickscore", tiny_pickscore, device="cpu")
    images = [decode_image(r[c], c) for r in rows for c in ("jpg_0", "jpg_1")]
    expected = scorer.score(images, [r["caption"] for r in rows for _ in (0, 1)]).view(-1, 2)
    got = torch.tensor([[r["pickscore_0"], r["pickscore_1"]] for r in rows])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # batched 3 pairs at a time vs 32 images
    prob = scorer.preference_prob_from_scores(got[:, 0], got[:, 1])
    torch.testing.assert_close(torch.tensor([r["pref_prob_0"] for r in rows]), prob)
    assert [r["label_0"] for r in rows] == [0.5 if a == b else float(a > b) for a, b in got.tolist()]
    pairs, stats = load_pairs(str(out), keep_ties=True)
    assert stats.pairs == 16


# ---------------------------------------------------------------- pairs_from_folder

@pytest.fixture
def image_folder(tmp_path):
    """Prompt A: 4 files via metadata.jsonl (one corrupt); prompt B: 4 files with a .txt each; prompt C: 1 file."""
    root = tmp_path / "images"
    (root / "b").mkdir(parents=True)
    meta = []
    for i, red in enumerate((40, 220, 130, None)):
        name = f"a{i}.png"
        (root / name).write_bytes(b"broken" if red is None else solid(red))
        meta.append({"file_name": name, "prompt": "prompt A"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    for i, red in enumerate((10, 250, 90, 160)):
        (root / "b" / f"b{i}.jpg").write_bytes(solid(red, "JPEG"))
        (root / "b" / f"b{i}.txt").write_text("prompt B\n")
    (root / "c.png").write_bytes(solid(77))
    (root / "c.txt").write_text("prompt C")
    return root


def test_pairs_from_folder_groups_by_prompt_and_orients_labels(image_folder, tmp_path):
    out = tmp_path / "pairs"
    report = pairs_from_folder(image_folder, FakeScorer(), out)
    assert report.pairs_scored == 3 + 6 and [f for f, _ in report.skipped] == ["a3.png"]
    assert report.inputs["prompts"] == 3 and report.inputs["prompts_paired"] == 2
    rows = read_out(out)
    assert {r["caption"] for r in rows} == {"prompt A", "prompt B"}
    for r in rows:
        assert r["jpg_0"] == (image_folder / r["image_0_path"]).read_bytes()  # the original files, not re-encoded
        assert r["label_0"] == float(r["fake_0"] > r["fake_1"]) and r["label_0"] + r["label_1"] == 1
        assert r["num_example_per_prompt"] == (3 if r["caption"] == "prompt A" else 6)
    pairs, stats = load_pairs(str(out))
    assert stats.pairs == 9


def test_relabelling_a_folder_output_finds_no_human_labels(image_folder, tmp_path):
    pairs_from_folder(image_folder, FakeScorer(), tmp_path / "pairs")  # label_0/1: the scorer's, no human_label_*
    report = label_pairs(str(tmp_path / "pairs"), FakeScorer(), tmp_path / "again")
    # its label_0/1 were taken for people's, and a second scorer "agreed with people" on the first's labels
    a = report.agreement
    assert (a["agreement"], a["human_strict_pairs"], a["no_human_label"]) == (None, 0, 9)
    assert not any(k.startswith("human_label") for r in read_out(tmp_path / "again") for k in r)  # none came
    assert "agreement with people" not in str(report)
    # SmPO on it (the demo's generate -> label -> relabel -> train): pairs without people's labels are decided by
    # their label_0/1, not dropped as unlabelled (all 9 were)
    pairs, stats = load_pairs(str(tmp_path / "again"), extra_columns=["fake_0", "fake_1"], orient_by="fake")
    assert (stats.pairs, stats.unlabelled) == (9, 0)
    assert [r["label_0"] for r in pairs] == [float(r["fake_0"] > r["fake_1"]) for r in pairs]
    stream, _ = load_pairs(str(tmp_path / "again"), streaming=True, extra_columns=["fake_0", "fake_1"],
                           orient_by="fake")
    assert [r["label_0"] for r in stream] == [r["label_0"] for r in pairs]


def test_a_has_label_of_1_0_with_nulls_counts_as_one_of_true_false(constructed, tmp_path):
    """A null in a has_label of integers was read as true by the agreement (and fit-reward), false by training."""
    table = pq.read_table(constructed)
    reports = []
    for kind in (pa.bool_(), pa.int64(), pa.float64()):
        flags = pa.array([None if i == 1 else ok for i, (*_, ok) in enumerate(ROWS)], pa.bool_()).cast(kind)
        pq.write_table(table.set_column(table.schema.get_field_index("has_label"), "has_label", flags),
                       tmp_path / f"{kind}.parquet")
        reports.append(label_pairs(str(tmp_path / f"{kind}.parquet"), FakeScorer(), tmp_path / str(kind),
                                   tie_margin=MARGIN).agreement)
    assert reports[0] == reports[1] == reports[2] and reports[0]["human_strict_pairs"] == 4


def test_pairs_without_labels_are_labelled(constructed, tmp_path):
    """A source of pairs without label_0/label_1 (caption, jpg_0, jpg_1: someone's own pairs) was refused for the
    columns `label` makes; it gets the scorer's labels and no human_label_* (dummy ones would count as people's)."""
    table = pq.read_table(constructed).drop_columns(["label_0", "label_1", "has_label"])
    pq.write_table(table, tmp_path / "unlabelled.parquet")
    report = label_pairs(str(tmp_path / "unlabelled.parquet"), FakeScorer(), tmp_path / "out", tie_margin=MARGIN)
    assert report.pairs_scored == 9 and report.agreement["no_human_label"] == 9
    rows = read_out(tmp_path / "out")
    assert [r["label_0"] for r in rows] == [1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.0, 0.5, 0.0]
    assert not any(k.startswith("human_label") for r in rows for k in r)
    assert load_pairs(str(tmp_path / "out"))[1].pairs == 7  # trains as it is (the two AI ties dropped)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label_0', 'label_1'\]"):
        load_pairs(str(tmp_path / "unlabelled.parquet"), keep_ties=True)  # training still needs its labels


def test_pairs_from_folder_caps_pairs_per_prompt(image_folder, tmp_path):
    out = tmp_path / "pairs"
    pairs_from_folder(image_folder, FakeScorer(), out, max_pairs_per_prompt=2, seed=1)
    rows = read_out(out)
    b = [r for r in rows if r["caption"] == "prompt B"]
    assert len(rows) == 4 and len(b) == 2 and all(r["num_example_per_prompt"] == 2 for r in rows)
    assert {b[0]["image_0_path"], b[0]["image_1_path"]} == {"b/b0.jpg", "b/b1.jpg"}  # best (250) vs worst (10)
    again = FakeScorer()
    pairs_from_folder(image_folder, again, out, max_pairs_per_prompt=2, seed=1)
    assert again.images_scored == 0 and read_out(out) == rows  # scores resumed from scores.csv; same pairs
    with pytest.raises(ValueError, match="other settings"):
        other = FakeScorer()
        other.name = "other"
        pairs_from_folder(image_folder, other, out)


def test_an_interrupted_swap_of_shards_keeps_the_earlier_ones(tmp_path, monkeypatch):
    """replace_shards (pairs_from_folder, import-review) deleted the earlier shards past the new count, then moved
    the new ones in one by one: Ctrl-C between two moves left old and new shards mixed and one old shard lost."""
    from diffusion_align.data import shards
    out = tmp_path / "pairs"
    out.mkdir()
    for k in range(3):
        pq.write_table(pa.table({"v": [f"old {k}"]}), out / f"pairs-0000{k}.parquet")
    replace, moves_in = os.replace, []

    def interrupted(src, dst):
        if Path(dst).parent == out and Path(src).parent.name == ".pairs.tmp":
            moves_in.append(src)
            if len(moves_in) == 2:  # Ctrl-C as the second new shard moves in
                raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(shards.os, "replace", interrupted)
    new = (pa.table({"v": [f"new {k}"]}) for k in range(2))
    with pytest.raises(KeyboardInterrupt):
        shards.replace_shards(out, new, ".pairs.tmp")
    assert sorted(os.listdir(out)) == [f"pairs-0000{k}.parquet" for k in range(3)]  # nothing beside them
    assert [pq.read_table(out / f"pairs-0000{k}.parquet")["v"][0].as_py() for k in range(3)] == ["old 0", "old 1",
                                                                                                 "old 2"]
    monkeypatch.setattr(shards.os, "replace", replace)
    written = shards.replace_shards(out, (pa.table({"v": [f"new {k}"]}) for k in range(2)), ".pairs.tmp")
    assert written == [out / "pairs-00000.parquet", out / "pairs-00001.parquet"] and sorted(os.listdir(out)) == [
        "pairs-00000.parquet", "pairs-00001.parquet"]
    assert [pq.read_table(path)["v"][0].as_py() for path in written] == ["new 0", "new 1"]


def test_pairs_from_folder_with_real_pickscore(image_folder, tiny_pickscore, tmp_path):
    report = pairs_from_folder(image_folder, f"pickscore={tiny_pickscore}", tmp_path / "pairs", max_pairs_per_prompt=4)
    assert report.pairs_scored == 3 + 4 and report.scorer["path"] == tiny_pickscore
    scorer = load_scorer("pickscore", tiny_pickscore, device="cpu")
    for r in read_out(tmp_path / "pairs"):
        images = [decode_image(str(image_folder / r[f"image_{i}_path"]), "file") for i in (0, 1)]
        expected = scorer.score(images, [r["caption"]] * 2)
        torch.testing.assert_close(torch.tensor([r["pickscore_0"], r["pickscore_1"]]), expected,
                                   rtol=1e-5, atol=1e-4)
        s0, s1 = r["pickscore_0"], r["pickscore_1"]
        assert r["label_0"] == (0.5 if s0 == s1 else float(s0 > s1))


# ---------------------------------------------------------------- reward_scores (SmPO's soft labels)

def test_reward_scores_cache_holds_scores_only_and_is_reused(constructed, tmp_path):
    cache = tmp_path / "soft-labels"
    scorer = FakeScorer()
    scores = reward_scores(constructed, "fake", scorer, cache, shard_size=4)
    # only the rows with a human preference are scored: not the ties (4, 8) nor the unlabelled rows (6, 7); row 3's
    # jpg_1 does not decode: no score
    for k in (0, 1):  # score = red / 25.5
        expected = [row[k] / 25.5 if i in (0, 1, 2, 5, 9) else np.nan for i, row in enumerate(ROWS)]
        np.testing.assert_allclose(scores[f"fake_{k}"], expected, atol=1e-5)
    assert scorer.images_scored == 10
    [folder] = cache.iterdir()  # named by the rows scored
    shards = sorted(folder.glob("pairs-*.parquet"))  # rows 0-3, then 5 and 9
    assert len(shards) == 2 and all(pq.read_schema(p).names == ["row", "fake_0", "fake_1"] for p in shards)
    assert [pq.read_table(p)["row"].to_pylist() for p in shards] == [[0, 1, 2], [5, 9]]
    record = json.loads((folder / ".shards" / "pairs-00000.json").read_text())
    assert record["settings"]["rows"] == 6 and record["settings"]["scorer"] == "fake"
    assert record["skipped"][0][0] == 3 and "row 3, column jpg_1" in record["skipped"][0][1]

    again = FakeScorer()  # a later run, or another process once the main one has finished
    np.testing.assert_array_equal(reward_scores(constructed, "fake", again, cache, shard_size=4)["fake_0"],
                                  scores["fake_0"])
    assert again.images_scored == 0

    other = write_constructed(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"other settings \(source=.*pairs.parquet' there, .*other.parquet' now"):
        reward_scores(other, "fake", FakeScorer(), cache, shard_size=4)
    with pytest.raises(ValueError, match="data.streaming=true cannot use reward scores.*data.streaming=false"):
        reward_scores(constructed, "fake", FakeScorer(), tmp_path / "streamed", streaming=True)
    with pytest.raises(ValueError, match="no columns fake_0 / fake_1 .*method.pref_scorer"):
        reward_scores(constructed, "fake", None, tmp_path / "none")


def test_reward_scores_with_max_pairs_score_only_the_sample(constructed, tmp_path):
    # a sample of 3 of the 6 rows with a human preference (0, 1, 2, 3, 5, 9), row 3 among them: it does not decode
    seed = next(s for s in range(20) if 3 in preference_rows(constructed, max_pairs=3, seed=s))
    sample = preference_rows(constructed, max_pairs=3, seed=seed)
    assert len(sample) == 3 and set(sample) <= {0, 1, 2, 3, 5, 9}
    cache, scorer = tmp_path / "soft-labels", FakeScorer()
    scores = reward_scores(constructed, "fake", scorer, cache, max_pairs=3, seed=seed)
    scored = [i for i in sample if i != 3]
    assert list(np.flatnonzero(np.isfinite(scores["fake_0"]))) == scored and scorer.images_scored == 4
    # the training draws the same sample, then drops the row without a score
    pairs, stats = load_pairs(constructed, extra_columns=["model_0"], max_pairs=3, seed=seed, keep_unlabelled=False,
                              orient_by="fake", scores=scores)
    assert pairs["model_0"] == [f"m{i}" for i in scored] and (stats.unscored, stats.pairs) == (1, 2)
    # another sample is scored into a folder beside, the first one kept
    other = next(s for s in range(20) if set(preference_rows(constructed, max_pairs=3, seed=s)) != set(sample))
    scorer = FakeScorer()
    scores = reward_scores(constructed, "fake", scorer, cache, max_pairs=3, seed=other)
    other_scored = [i for i in preference_rows(constructed, max_pairs=3, seed=other) if i != 3]
    assert list(np.flatnonzero(np.isfinite(scores["fake_0"]))) == other_scored
    assert scorer.images_scored == 2 * len(other_scored) and len(list(cache.iterdir())) == 2


def test_a_larger_max_pairs_extends_an_earlier_labelling(constructed, tmp_path):
    first = label_pairs(constructed, FakeScorer(), tmp_path / "out", max_pairs=4, shard_size=4)
    scorer = FakeScorer()
    more = label_pairs(constructed, scorer, tmp_path / "out", shard_size=4)
    assert (first.shards, more.shards, more.shards_reused) == (1, 3, 1) and scorer.images_scored == 12


def test_a_shard_replaced_since_is_made_again(constructed, tmp_path):
    """Another tool writing its pairs-00000.parquet into the folder: the record still matched, and was trusted."""
    label_pairs(constructed, FakeScorer(), tmp_path / "out", shard_size=4)
    shard = tmp_path / "out" / "pairs-00000.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 1), shard)
    scorer = FakeScorer()
    report = label_pairs(constructed, scorer, tmp_path / "out", shard_size=4)
    assert report.shards_reused == 2 and scorer.images_scored == 6 and pq.read_metadata(shard).num_rows == 3


def test_a_record_of_a_shard_without_rows_is_past_the_end_of_a_smaller_rerun(tmp_path):
    """A last shard whose rows were all skipped writes its record and no file. A rerun over fewer rows kept that
    record, and its output read as unfinished for good, telling the user to rerun."""
    from diffusion_align.data.shards import run_shards

    def shard(start, stop, desc):  # rows 4 and 5 cannot be read
        return pa.table({"row": pa.array(range(start, min(stop, 4)), pa.int64())}), {"skipped": []}
    run_shards(tmp_path, 6, 2, {"x": 1}, shard)
    assert sorted(p.name for p in tmp_path.glob("pairs-*")) == ["pairs-00000.parquet", "pairs-00001.parquet"]
    with pytest.raises(ValueError, match=r"holds shards past the 2 this run writes \(\.shards/pairs-00002\.json\)"):
        run_shards(tmp_path, 4, 2, {"x": 1}, shard)
    with pytest.raises(ValueError, match=r"past the 1 this run writes \(pairs-00001\.parquet, "
                                         r"\.shards/pairs-00002\.json\)"):  # a shard's file, not its record too
        run_shards(tmp_path, 2, 2, {"x": 1}, shard)


def test_a_cache_of_every_row_made_before_is_read_not_scored_again(constructed, tmp_path):
    """Runs made before scoring only the rows they train on left a cache of every row in the cache folder itself."""
    from diffusion_align.data.shards import run_shards
    fresh = reward_scores(constructed, "fake", FakeScorer(), tmp_path / "fresh", shard_size=4)
    [folder] = (tmp_path / "fresh").iterdir()
    settings = json.loads((folder / ".shards" / "pairs-00000.json").read_text())["settings"]
    every_row = {k: v for k, v in settings.items() if k != "selection"} | {"rows": 10}

    def shard(start, stop, desc):  # that layout: every source row's scores (99 for rows the training leaves out)
        rows = [i for i in range(start, stop) if i != 3]
        scores = [fresh["fake_0"][i] if np.isfinite(fresh["fake_0"][i]) else 99.0 for i in rows]
        return pa.table({"row": pa.array(rows, pa.int64()), "fake_0": pa.array(scores, pa.float32()),
                         "fake_1": pa.array(scores, pa.float32())}), {"skipped": []}
    run_shards(tmp_path / "old", 10, 4, every_row, shard)
    scorer = FakeScorer()
    again = reward_scores(constructed, "fake", scorer, tmp_path / "old", shard_size=4)
    np.testing.assert_array_equal(again["fake_0"], fresh["fake_0"])  # the rows trained on only
    assert scorer.images_scored == 0 and not any(p.is_dir() and p.name.startswith("rows-")
                                                 for p in (tmp_path / "old").iterdir())


def test_smpo_pairs_drop_human_ties_then_follow_the_reward(constructed, tmp_path):
    scores = reward_scores(constructed, "fake", FakeScorer(), tmp_path / "soft-labels")
    columns = ["fake_0", "fake_1", "model_0"]
    pairs, stats = load_pairs(constructed, extra_columns=columns, keep_unlabelled=False, orient_by="fake",
                              scores=scores)
    # rows 4 and 8 are human ties, rows 6 and 7 have no human label (null; has_label false), row 3 no score; row 1:
    # the reward disagrees
    assert (stats.rows, stats.ties_dropped, stats.unlabelled, stats.unscored, stats.pairs) == (10, 2, 2, 1, 5)
    assert pairs["model_0"] == ["m0", "m1", "m2", "m5", "m9"]
    assert pairs["label_0"] == [1.0, 0.0, 0.0, 0.0, 0.0]

    # the same pairs from a `diffusion-align label` output: ties on human_label_0/1, not on its AI labels
    label_pairs(constructed, FakeScorer(), tmp_path / "labelled", tie_margin=100.0)  # every AI label a tie
    assert reward_scores(str(tmp_path / "labelled"), "fake", None, tmp_path / "unused") is None
    pairs, stats = load_pairs(str(tmp_path / "labelled"), extra_columns=columns, keep_unlabelled=False,
                              orient_by="fake")
    assert (stats.rows, stats.ties_dropped, stats.unlabelled, stats.pairs) == (9, 2, 2, 5)
    assert pairs["model_0"] == ["m0", "m1", "m2", "m5", "m9"]
    assert pairs["label_0"] == [1.0, 0.0, 0.0, 0.0, 0.0]
