"""The bad-input corpus (tests/bad_inputs.py) through every entry point: train data, score, compare, label, grid,
import-review and configs. Each broken item is named and skipped, the rest of the job is done, and nothing already
written is lost. docs/robustness.md lists every case and its behaviour."""

import json
import logging
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bad_inputs import BROKEN, corpus, encoded, noisy, write_corpus
from diffusion_align.data.pairs import load_pairs
from diffusion_align.evaluation.compare import compare_folders
from diffusion_align.evaluation.grid import make_grid
from diffusion_align.evaluation.review import import_review
from diffusion_align.evaluation.scoring import read_scores, score_folder
from diffusion_align.rewards import load_scorer
from diffusion_align.rewards.labeling import label_pairs
from diffusion_align.rewards.tiny import save_tiny_scorer
from test_train import read_metrics, run

GOOD = sorted(set(corpus()) - set(BROKEN))
LONG_CAPTION = " ".join(["a very detailed red circle on a white background"] * 30)  # ~300 tokens


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return load_scorer("pickscore", save_tiny_scorer("pickscore", tmp_path_factory.mktemp("scorer") / "pickscore"),
                       device="cpu")


@pytest.fixture
def folder(tmp_path):
    return write_corpus(tmp_path / "corpus")


def corpus_pairs(path, extra_rows=()):
    """A Pick-a-Pic-style parquet: one pair per corpus image (it wins against a good image), captions empty, long
    and unicode among them, then `extra_rows`."""
    good = encoded(noisy(seed=9), "PNG")
    captions = ["", LONG_CAPTION, "ünïcode ☃ prompt"]
    rows = [{"caption": captions[i % 3], "jpg_0": data, "jpg_1": good, "label_0": 1.0, "label_1": 0.0}
            for i, data in enumerate(corpus().values())]
    pq.write_table(pa.Table.from_pylist([*rows, *extra_rows]), path)
    return path


def broken_rows() -> list[int]:
    return [i for i, name in enumerate(corpus()) if name in BROKEN]


def test_score_names_the_broken_files_does_the_rest_and_keeps_it(folder, tmp_path, scorer, caplog):
    out = tmp_path / "scores.csv"
    report = score_folder(folder, [scorer], out, num_workers=0)
    assert sorted(r["file"] for r in report.rows) == GOOD
    assert all(math.isfinite(r["pickscore"]) for r in report.rows)
    reasons = dict(report.unreadable)
    assert sorted(reasons) == sorted(BROKEN)
    assert "DecompressionBombError" in reasons["enormous.png"] and "truncated" in reasons["truncated.png"]
    assert "metadata.jsonl:13: file_name '../outside.png' points outside the scored folder; line skipped" in caplog.text
    _, rows = read_scores(out)
    again = score_folder(folder, [scorer], out, num_workers=0)  # a rerun keeps every score and scores nothing new
    assert again.scored == 0 and again.resumed == len(GOOD) and read_scores(out)[1] == rows


def test_compare_pairs_what_both_folders_can_show(folder, tmp_path, scorer):
    other = write_corpus(tmp_path / "other")
    result = compare_folders(folder, other, scorer, out_prefix=tmp_path / "cmp" / "c", num_workers=0, n_resamples=50)
    assert result.pairs == len(GOOD) and result.win_rate == 0.5  # the same images: every pair ties
    assert sorted(f for f, _ in result.unreadable_a) == sorted(BROKEN) == sorted(f for f, _ in result.unreadable_b)


def test_grid_draws_the_rest_and_lists_the_unreadable(folder, tmp_path, scorer):
    report = make_grid([folder], tmp_path / "grid.png", scorer=scorer, cell_size=32, rows_per_page=20)
    assert report.pages == [tmp_path / "grid.png"] and report.rows == len(corpus())
    assert sorted(f.split("/", 1)[1] for f, _ in report.unreadable) == sorted(BROKEN)
    assert len(report.scores) == len(GOOD) and all(map(math.isfinite, report.scores.values())), "each readable one"


def test_import_review_leaves_out_pairs_with_broken_images(folder, tmp_path):
    other = write_corpus(tmp_path / "other")
    choices = tmp_path / "choices.jsonl"
    lines = [{"prompt": "p", "seed": i, "folder_a": "corpus", "folder_b": "other", "file_a": name, "file_b": name,
              "left": "a", "choice": "a", "time": "2026-01-01T00:00:00.000Z"} for i, name in enumerate(corpus())]
    choices.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    report = import_review(choices, [folder, other], tmp_path / "imported")
    assert report.pairs == len(GOOD) and len(report.unreadable) == len(BROKEN)
    for i in broken_rows():
        assert any(why.startswith(f"{choices}:{i + 1}: cannot read image") for why in report.unreadable)
    pairs, stats = load_pairs(str(tmp_path / "imported"))
    assert stats.pairs == len(GOOD)


def test_label_skips_and_names_the_broken_rows(tmp_path, scorer):
    source = corpus_pairs(tmp_path / "pairs.parquet")
    report = label_pairs(str(source), scorer, tmp_path / "labelled")
    assert report.pairs_scored == len(GOOD)
    assert sorted(row for row, _ in report.skipped) == broken_rows()
    assert all(f"row {row}, column jpg_0" in why for row, why in report.skipped)


def test_training_skips_broken_images_and_unusable_labels(tmp_path, tiny_models, caplog):
    caplog.set_level(logging.INFO, logger="diffusion_align")
    good = encoded(noisy(seed=9), "PNG")
    unusable = [{"caption": "x", "jpg_0": good, "jpg_1": good, "label_0": l0, "label_1": l1}
                for l0, l1 in ((None, None), (float("nan"), 1.0), (2.0, -1.0))]
    source = corpus_pairs(tmp_path / "pairs.parquet", unusable)
    steps = len(corpus()) // 2  # one epoch of 2-pair batches (the unusable rows are dropped first)
    run(tmp_path, tiny_models["sd"], source, f"train.max_steps={steps}", "train.batch_size=2", "train.log_every=1")
    assert re.search(r"dropped 0 ties, 3 without a usable label \(null, NaN, or 1 outside \[0, 1\]\)", caplog.text)
    assert "rows have a label outside [0, 1], e.g. row 14 (label_0 2.0 / -1.0)" in caplog.text
    for row in broken_rows():  # each named when its batch is drawn; the awkward images train
        assert re.search(rf"skipped row {row}, column jpg_0: ", caplog.text), row
    records = read_metrics(tmp_path / "run")
    assert records[-1]["skipped_rows"] >= len(BROKEN) and all(math.isfinite(r["loss"]) for r in records)
    assert "captions longer than the text encoder's 77 tokens are cut there" in caplog.text
    assert caplog.text.count("are cut there") == 1, "warned once"
    assert re.search(r"\d+ captions read in training were longer than the text encoder reads", caplog.text)


@pytest.mark.parametrize("column, values, message", [
    ("label_0", ["yes", "no"], "column label_0 holds string values (e.g. 'yes'); expected numbers"),
    ("caption", [3, 4], "column caption holds int64 values; expected text"),
])
def test_wrong_column_types_are_named(tmp_path, column, values, message):
    good = encoded(noisy(seed=9), "PNG")
    rows = [{"caption": "x", "jpg_0": good, "jpg_1": good, "label_0": 1.0, "label_1": 0.0} for _ in values]
    for row, value in zip(rows, values):
        row[column] = value
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_pairs(str(path))


def test_data_with_nothing_to_train_on_is_named_before_a_model_loads(tmp_path, tiny_models, capsys):
    """A 0-row parquet (datasets gave a bare traceback), and labels that leave no pair (all null / NaN, or all tied:
    the batch sampler said "lower the batch size"): one line each, from train and from cache (issue 24)."""
    from diffusion_align.cli import main as cli_main
    from test_train import TINY_CONFIG
    good = encoded(noisy(seed=9), "PNG")
    empty, untrainable = tmp_path / "empty.parquet", tmp_path / "untrainable.parquet"
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64())])
    pq.write_table(schema.empty_table(), empty)
    pq.write_table(pa.Table.from_pylist([{"caption": "x", "jpg_0": good, "jpg_1": good, "label_0": l0, "label_1": l1}
                                         for l0, l1 in ((None, None), (float("nan"), 1.0), (0.5, 0.5))], schema),
                   untrainable)

    def error(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli_main([str(a) for a in args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]  # above it: datasets' progress bars, when a parquet was read

    train = ["train", TINY_CONFIG, f"model.pretrained={tiny_models['sd']}", f"train.output_dir={tmp_path / 'run'}"]
    assert f"{empty}: the parquet holds no rows" in error(*train, f"data.path={empty}")
    assert (f"{untrainable}: no preference pair is left to train on: of 3 rows, 1 are ties (dropped; data.keep_ties="
            "true keeps them), 2 have no usable label") in error(*train, f"data.path={untrainable}")
    weights = save_tiny_scorer("pickscore", tmp_path / "pickscore")
    assert f"{empty}: the parquet holds no rows" in error("label", empty, "--out", tmp_path / "labels", "--scorer",
                                                         f"pickscore={weights}")
    cache = ["cache", untrainable, "--out", tmp_path / "cache"]
    assert "--model=" + str(tmp_path / "missing") + ": no such folder" in error(*cache, "--model",
                                                                                tmp_path / "missing")
    assert "resolution=12: expected a positive multiple of 8" in error(*cache, "--model", tiny_models["sd"],
                                                                        "--resolution", 12)
    assert not (tmp_path / "cache").exists()
