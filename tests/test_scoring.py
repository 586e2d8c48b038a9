import csv
import json
import os
from pathlib import Path
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_align.evaluation.scoring import (
    ScoringError, collect_images, find_images, plot_histogram, read_metadata, read_scores, score_folder,
)


class RednessScorer:
    """The scorer interface without a model: the score is the mean red channel in [0, 1]; counts what it scores."""

    def __init__(self, column="redness", needs_prompts=True, batch_size=3):
        self.name = self.column = column
        self.convention = "mean red channel, 0 (none) to 1 (full red)"
        self.batch_size, self.device, self.needs_prompts = batch_size, "cpu", needs_prompts
        self.scored, self.prompts = 0, []

    def preprocess(self, image):
        pixels = torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255)
        return pixels.permute(2, 0, 1)

    def score_batch(self, pixel_values, prompts):
        self.scored += len(prompts)
        self.prompts += prompts
        return pixel_values[:, 0].mean(dim=(1, 2))


class BluenessScorer(RednessScorer):
    def score_batch(self, pixel_values, prompts):
        self.scored += len(prompts)
        return pixel_values[:, 2].mean(dim=(1, 2))


def solid(path, red, blue=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (red, 0, blue)).save(path, format=fmt)
    return path


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.fixture
def folder(tmp_path):
    """Nested images; prompts from a root and a nested metadata.jsonl (prompt / text / caption), .txt files and
    none; a corrupt PNG, a truncated JPEG, a non-image file, hidden files and folders."""
    root = tmp_path / "images"
    solid(root / "a.png", 51)
    solid(root / "sub" / "b.png", 102)
    solid(root / "c.png", 255)
    solid(root / "sub" / "d.PNG", 0)
    solid(root / "sub" / "deeper" / "e.png", 153)
    write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "prompt": "a cat", "seed": 1},
                                          {"file_name": "sub/b.png", "text": "a dog", "seed": 2}])
    write_jsonl(root / "sub" / "metadata.jsonl", [{"file_name": "d.PNG", "caption": "a dog"}])
    (root / "c.png").with_suffix(".txt").write_text("a cat\n")
    (root / "sub" / "deeper" / "e.txt").write_text("a bird")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    jpeg = solid(tmp_path / "whole.jpg", 200)
    (root / "sub" / "cut.JPG").write_bytes(jpeg.read_bytes()[:200])
    (root / "notes.md").write_text("not an image")
    solid(root / ".cache" / "x.png", 1)
    solid(root / ".y.png", 1)
    (root / "broken.txt").write_text("a cat")
    (root / "sub" / "cut.txt").write_text("a dog")
    return root


EXPECTED = {  # file -> (prompt, seed, redness)
    "a.png": ("a cat", 1, 0.2), "c.png": ("a cat", None, 1.0), "sub/b.png": ("a dog", 2, 0.4),
    "sub/d.PNG": ("a dog", None, 0.0), "sub/deeper/e.png": ("a bird", None, 0.6),
}


def rel(root, paths):
    return [p.relative_to(root).as_posix() for p in paths]


def test_find_images_recursive_sorted_case_insensitive(folder):
    assert rel(folder, find_images(folder)) == ["a.png", "broken.png", "c.png", "sub/b.png", "sub/cut.JPG",
                                                "sub/d.PNG", "sub/deeper/e.png"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_images(folder / "nowhere")


def test_prompts_from_metadata_txt_and_fallback(folder):
    solid(folder / "f.webp", 10, fmt="WEBP")
    solid(folder / "g.png", 10)
    (folder / "g.txt").write_text("from the txt")
    write_jsonl(folder / "more" / "metadata.jsonl", [{"file_name": "../g.png", "prompt": "metadata wins"}])
    entries = {e.file: (e.prompt, e.seed) for e in collect_images(folder, prompt="fallback")}
    assert entries["a.png"] == ("a cat", 1)
    assert entries["sub/b.png"] == ("a dog", 2)  # "text" key, from the root metadata
    assert entries["sub/d.PNG"] == ("a dog", None)  # "caption" key, from the nested metadata
    assert entries["c.png"] == ("a cat", None)  # .txt, stripped
    assert entries["f.webp"] == ("fallback", None)
    assert entries["g.png"] == ("metadata wins", None)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a.png"]', "expected a JSON object, got list"),
    ('{"prompt": "x"}', 'expected "file_name"'),
    ('{"file_name": "a.png", "prompt": 3}', 'expected "prompt" to be a string'),
    ('{"file_name": "a.png", "prompt": "x", "seed": "7"}', 'expected "seed" to be an integer'),
    ('{"file_name": "./a.png", "prompt": "again"}', r"sub/a\.png is already described at .*metadata\.jsonl:1"),
])
def test_bad_metadata_line_names_file_and_line(tmp_path, line, message):
    meta = tmp_path / "sub" / "metadata.jsonl"
    write_jsonl(meta, ['{"file_name": "a.png", "prompt": "cat"}', "", line])
    with pytest.raises(ScoringError, match=f"{re.escape(str(meta))}:3: {message}"):
        read_metadata(tmp_path)


def test_a_metadata_line_outside_the_folder_is_skipped_and_named(tmp_path, caplog):
    meta = tmp_path / "sub" / "metadata.jsonl"
    write_jsonl(meta, ['{"file_name": "../../x.png", "prompt": "x"}', '{"file_name": "a.png", "prompt": "cat"}'])
    assert read_metadata(tmp_path) == {"sub/a.png": ("cat", None)}
    assert f"{meta}:1: file_name '../../x.png' points outside the scored folder; line skipped" in caplog.text


def test_missing_prompt_names_the_image_unless_no_scorer_reads_prompts(folder, tmp_path):
    solid(folder / "sub" / "lonely.png", 10)
    with pytest.raises(ScoringError, match=r"1 image\(s\) have no prompt, e\.g\. sub/lonely\.png; .*redness"):
        score_folder(folder, [RednessScorer()], tmp_path / "s.csv", num_workers=0)
    blind = RednessScorer(needs_prompts=False)
    report = score_folder(folder, [blind], tmp_path / "s2.csv", num_workers=0)
    assert {r["file"]: r["prompt"] for r in report.rows}["sub/lonely.png"] == ""


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_histogram_takes_dollar_signs_in_its_title_as_text(tmp_path):
    """A folder named `cost_$10_vs_$20` is text in the title, not matplotlib's mathtext, which cannot parse it."""
    plot_histogram([0.1, 0.2, 0.4], tmp_path / "h.png", "cost_$10_vs_$20", "score $x (a_$b)")
    with Image.open(tmp_path / "h.png") as png:
        assert png.size == (640, 400)


def test_score_folder_rows_unreadable_summary_histograms(folder, tmp_path):
    red, blue = RednessScorer(), BluenessScorer("blueness", batch_size=2)
    out = tmp_path / "out" / "scores.csv"
    report = score_folder(folder, [red, blue], out, batch_size=2, num_workers=2)

    rows = read_csv(out)
    assert list(rows[0]) == ["file", "prompt", "seed", "stamp", "redness", "blueness"]
    assert [r["file"] for r in rows] == sorted(EXPECTED)  # sorted order, unreadable ones left out
    for r in rows:
        prompt, seed, redness = EXPECTED[r["file"]]
        assert (r["prompt"], r["seed"]) == (prompt, "" if seed is None else str(seed))
        assert float(r["redness"]) == pytest.approx(redness, abs=1e-6)
        assert float(r["blueness"]) == 0.0
    assert red.scored == blue.scored == 5 and report.scored == 5 and report.resumed == 0
    assert sorted(f for f, _ in report.unreadable) == ["broken.png", "sub/cut.JPG"]
    assert all(reason for _, reason in report.unreadable)

    summary = json.loads((tmp_path / "out" / "scores.summary.json").read_text())
    assert summary == report.summary and summary["rows"] == 5
    s = summary["scorers"]["redness"]
    assert s["convention"] == red.convention and s["count"] == 5
    values = [0.2, 1.0, 0.4, 0.0, 0.6]  # mean 0.44; population variance (0.0576+0.3136+0.0016+0.1936+0.0256)/5
    assert s["mean"] == pytest.approx(0.44) and s["std"] == pytest.approx(np.sqrt(0.592 / 5))
    assert (s["min"], s["max"]) == (pytest.approx(min(values)), pytest.approx(max(values)))
    per_prompt = {p["prompt"]: p for p in s["per_prompt"]}
    assert [p["prompt"] for p in s["per_prompt"]] == ["a bird", "a cat", "a dog"]
    assert per_prompt["a cat"]["count"] == 2 and per_prompt["a cat"]["mean"] == pytest.approx(0.6)
    assert per_prompt["a cat"]["std"] == pytest.approx(0.4)
    assert per_prompt["a dog"]["mean"] == pytest.approx(0.2) and per_prompt["a dog"]["std"] == pytest.approx(0.2)
    assert per_prompt["a bird"] == {"prompt": "a bird", "count": 1, "mean": pytest.approx(0.6), "std": 0.0}
    assert sorted(u["file"] for u in summary["unreadable"]) == ["broken.png", "sub/cut.JPG"]

    for column in ("redness", "blueness"):
        png = tmp_path / "out" / f"scores.{column}.png"
        assert report.histograms[column] == png
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100
    assert "scored 5 images" in str(report) and "broken.png" in str(report)


def test_a_broken_link_or_a_vanished_image_is_skipped_not_fatal(folder, tmp_path):
    """`score` (and `compare`, `label --from-images`) stopped at an image it listed but could not stat."""
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    report = score_folder(folder, [RednessScorer()], tmp_path / "scores.csv", num_workers=0)
    assert report.scored == 5 and sorted(f for f, _ in report.unreadable) == ["broken.png", "gone.png", "sub/cut.JPG"]
    assert dict(report.unreadable)["gone.png"] == "cannot be read (No such file or directory)"


def test_a_file_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path):
    """The name's row could not be written to the UTF-8 CSV: the error stopped the run, and every rerun, with the
    other images of its batch unscored."""
    root = tmp_path / "images"
    root.mkdir()
    solid(root / "ok.png", 255)
    solid(Path(os.fsdecode(bytes(root) + b"/caf\xe9.png")), 128)
    report = score_folder(root, [RednessScorer()], tmp_path / "scores.csv", prompt="a red square", num_workers=0)
    assert [r["file"] for r in read_csv(tmp_path / "scores.csv")] == ["ok.png"] and report.scored == 1
    assert report.unreadable == [("caf\\xe9.png", "its file name is not UTF-8 text, which the scores are written "
                                                    "in; rename it")]
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    assert summary["unreadable"] == [{"file": "caf\\xe9.png", "reason": report.unreadable[0][1]}]


def test_resume_scores_only_new_files_and_summary_covers_all(folder, tmp_path):
    out = tmp_path / "scores.csv"
    score_folder(folder, [RednessScorer()], out, num_workers=0)
    again = RednessScorer()
    report = score_folder(folder, [again], out, num_workers=0)
    assert again.scored == 0 and report.scored == 0 and report.resumed == 5
    assert len(report.unreadable) == 2  # retried, still unreadable

    solid(folder / "sub" / "new.png", 255)
    (folder / "sub" / "new.txt").write_text("a bird")
    third = RednessScorer()
    report = score_folder(folder, [third], out, num_workers=0)
    assert third.scored == 1 and third.prompts == ["a bird"] and report.resumed == 5
    assert [r["file"] for r in read_csv(out)][-1] == "sub/new.png"
    summary = report.summary["scorers"]["redness"]
    assert summary["count"] == 6 and summary["mean"] == pytest.approx((0.2 + 1.0 + 0.4 + 0.0 + 0.6 + 1.0) / 6)


def test_the_row_of_a_deleted_image_goes(folder, tmp_path):
    """`compare` pairs every row: a folder regenerated with fewer seeds kept its old images' scores (issue 24)."""
    out = tmp_path / "scores.csv"
    score_folder(folder, [RednessScorer()], out, num_workers=0)
    gone = sorted(EXPECTED)[0]
    (folder / gone).unlink()
    again = RednessScorer()
    report = score_folder(folder, [again], out, num_workers=0)
    assert again.scored == 0 and report.resumed == 4 and report.summary["scorers"]["redness"]["count"] == 4
    assert [r["file"] for r in read_csv(out)] == sorted(EXPECTED)[1:]


def test_a_csv_resumes_only_with_the_scorer_settings_that_made_it(folder, tmp_path):
    """Same column, other weights, dtype or decoding: the old scores would be reported as the new scorer's."""
    out = tmp_path / "scores.csv"
    weights = tmp_path / "weights"
    weights.mkdir()

    def scorer(path=None, dtype=torch.float32, preprocessing=None):
        made = RednessScorer()
        made.path, made.dtype, made.preprocessing = path, dtype, preprocessing
        return made
    score_folder(folder, [scorer(str(weights))], out, num_workers=0)
    before = out.read_bytes()
    # a scorer whose preprocessing changed since (rewards.base.PREPROCESSING): scores made before are not resumed
    for other, message in ((scorer(), rf"'weights': '{re.escape(str(weights))}'.* there, .*'weights': None"),
                           (scorer(str(weights), torch.float16), "'dtype': 'torch.float16'"),
                           (scorer(str(weights), preprocessing="hps-float-resize"),
                            "'preprocessing': 'hps-float-resize'")):
        with pytest.raises(ScoringError, match=f"of other scorer settings .*{message}"):
            score_folder(folder, [other], out, num_workers=0)
    with pytest.raises(ScoringError, match="fast_jpeg=False there, True now"):
        score_folder(folder, [scorer(str(weights))], out, num_workers=0, fast_jpeg=True)
    assert out.read_bytes() == before
    again = scorer(str(tmp_path / "." / "weights"))  # the same folder, however it is written
    assert score_folder(folder, [again], out, num_workers=0).resumed == 5 and again.scored == 0

    class Interrupted(RednessScorer):  # Ctrl-C in the second batch: the CSV holds the first one's rows
        def score_batch(self, pixel_values, prompts):
            if self.scored:
                raise KeyboardInterrupt
            return super().score_batch(pixel_values, prompts)
    stopped = tmp_path / "stopped.csv"
    with pytest.raises(KeyboardInterrupt):
        score_folder(folder, [Interrupted()], stopped, num_workers=0)
    assert 0 < len(read_scores(stopped)[1]) < 5
    with pytest.raises(ScoringError, match="of other scorer settings .*'dtype': 'torch.float16'"):
        score_folder(folder, [scorer(dtype=torch.float16)], stopped, num_workers=0)  # resumed in another dtype


def test_outputs_inside_the_folder_are_not_scored(folder):
    """Nor read as images of it by the other commands: `compare` stopped at the histogram's missing prompt."""
    out = folder / "sub" / "scores.csv"
    score_folder(folder, [RednessScorer()], out, num_workers=0)
    assert (folder / "sub" / "scores.redness.png").is_file()
    again = RednessScorer()
    score_folder(folder, [again], out, num_workers=0)
    assert again.scored == 0
    other = RednessScorer()
    score_folder(folder, [other], folder / "other.csv", num_workers=0)
    assert other.scored == len(EXPECTED)  # the readable images, not the first run's histogram (no prompt: an error)
    assert "sub/scores.redness.png" not in {p.relative_to(folder).as_posix() for p in find_images(folder)}
    (folder / "sub" / "plain.summary.json").write_text('{"another": "tool"}')  # a JSON of another tool: no error
    assert len(find_images(folder)) == len(EXPECTED) + 2


def test_interrupted_last_row_is_dropped_and_rescored(folder, tmp_path):
    out = tmp_path / "scores.csv"
    score_folder(folder, [RednessScorer()], out, num_workers=0)
    text = out.read_bytes()
    out.write_bytes(text[:-7])  # the last row's score and line break cut off
    again = RednessScorer()
    report = score_folder(folder, [again], out, num_workers=0)
    assert again.scored == 1 and report.resumed == 4
    assert [r["file"] for r in read_csv(out)] == sorted(EXPECTED)[:4] + [sorted(EXPECTED)[4]]


def test_csv_round_trips_awkward_prompts(tmp_path):
    prompt = 'two\nlines, "quotes"\r\nand a lone\rcarriage return, é'
    solid(tmp_path / "img" / "a.png", 51)
    write_jsonl(tmp_path / "img" / "metadata.jsonl", [{"file_name": "a.png", "prompt": prompt, "seed": 5}])
    score_folder(tmp_path / "img", [RednessScorer()], tmp_path / "s.csv", num_workers=0)
    header, rows = read_scores(tmp_path / "s.csv")
    assert header == ["file", "prompt", "seed", "stamp", "redness"]
    stat = (tmp_path / "img" / "a.png").stat()
    assert rows == [{"file": "a.png", "prompt": prompt, "seed": 5, "stamp": f"{stat.st_size}-{stat.st_mtime_ns}",
                     "redness": pytest.approx(0.2)}]


def test_an_image_replaced_under_its_name_or_given_another_prompt_is_scored_again(folder, tmp_path):
    """Rows used to be kept by file name alone: an image regenerated in place kept its old score (issue 24)."""
    out = tmp_path / "scores.csv"
    score_folder(folder, [RednessScorer()], out, num_workers=0)
    before = {r["file"]: r for r in read_scores(out)[1]}
    replaced = next(f for f in sorted(before) if f.endswith(".png") and not f.startswith("sub/"))
    solid(folder / replaced, 255)  # new pixels, size and time under the same name
    os.utime(folder / replaced, ns=(1, 1))  # whatever the clock: the time differs from the stamp
    again = RednessScorer()
    report = score_folder(folder, [again], out, num_workers=0)
    assert again.scored == 1 and report.resumed == 4
    after = {r["file"]: r for r in read_scores(out)[1]}
    assert after[replaced]["redness"] == pytest.approx(1.0) != before[replaced]["redness"]
    assert {f: r for f, r in after.items() if f != replaced} == {f: r for f, r in before.items() if f != replaced}
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "prompt": "a lion", "seed": 1},
                                            {"file_name": "sub/b.png", "text": "a dog", "seed": 2}])
    reprompted = RednessScorer()
    score_folder(folder, [reprompted], out, num_workers=0)
    assert reprompted.prompts == ["a lion"]
    # another seed: `compare` pairs images by seed, so the row must say the new one
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "prompt": "a lion", "seed": 7},
                                            {"file_name": "sub/b.png", "text": "a dog", "seed": 2}])
    reseeded = RednessScorer()
    score_folder(folder, [reseeded], out, num_workers=0)
    assert reseeded.prompts == ["a lion"] and {r["file"]: r["seed"] for r in read_scores(out)[1]}["a.png"] == 7
    # a CSV written before stamps (no stamp column) still resumes, by names, and keeps its columns
    header, rows = read_scores(out)
    legacy = tmp_path / "legacy.csv"
    legacy.write_text("file,prompt,seed,redness\r\n" + "".join(
        f'{r["file"]},"{r["prompt"]}",{"" if r["seed"] is None else r["seed"]},{r["redness"]}\r\n' for r in rows[:-1]))
    third = RednessScorer()
    score_folder(folder, [third], legacy, num_workers=0)
    assert third.scored == 1 and read_scores(legacy)[0] == ["file", "prompt", "seed", "redness"]


def test_malformed_csv_row_names_the_line(tmp_path):
    bad = tmp_path / "s.csv"
    bad.write_text("file,prompt,seed,redness\r\na.png,cat,,0.5\r\nb.png,dog,,high\r\nc.png,cat,,0.1\r\n")
    with pytest.raises(ScoringError, match=r"s\.csv:3: expected an integer seed and numeric scores"):
        read_scores(bad)
    bad.write_text("file,prompt,seed,redness\r\na.png,cat,,0.5,extra\r\n")
    with pytest.raises(ScoringError, match=r"s\.csv:2: expected 4 fields"):
        read_scores(bad)


def test_resume_refuses_other_scorers_or_another_folder(folder, tmp_path):
    out = tmp_path / "scores.csv"
    score_folder(folder, [RednessScorer()], out, num_workers=0)
    with pytest.raises(ScoringError, match=r"has score columns \['redness'\], this run writes \['blueness'\]"):
        score_folder(folder, [BluenessScorer("blueness")], out, num_workers=0)
    other = tmp_path / "other"
    solid(other / "a.png", 1)
    with pytest.raises(ScoringError, match=f"are of {re.escape(str(folder))}, not {re.escape(str(other))}"):
        score_folder(other, [RednessScorer()], out, prompt="x", num_workers=0)


def test_empty_folder_and_duplicate_columns_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoringError, match="no images found"):
        score_folder(tmp_path / "empty", [RednessScorer()], tmp_path / "s.csv", num_workers=0)
    with pytest.raises(ScoringError, match="distinct columns"):
        score_folder(tmp_path / "empty", [RednessScorer(), RednessScorer()], tmp_path / "s.csv", num_workers=0)


class SizeRecorder(RednessScorer):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def preprocess(self, image):
        self.sizes.append(image.size)
        return super().preprocess(image)


def test_fast_jpeg_decodes_jpegs_smaller_and_scores_close(tmp_path):
    ramp = np.linspace(0, 255, 512, dtype=np.uint8)
    picture = Image.fromarray(np.stack([np.tile(ramp, (384, 1))] * 3, axis=-1))
    (tmp_path / "img").mkdir()
    picture.save(tmp_path / "img" / "a.jpg", quality=95)
    picture.save(tmp_path / "img" / "b.png")
    exact = score_folder(tmp_path / "img", [RednessScorer()], tmp_path / "exact.csv", prompt="x", num_workers=0)
    recorder = SizeRecorder()
    fast = score_folder(tmp_path / "img", [recorder], tmp_path / "fast.csv", prompt="x", num_workers=0,
                        fast_jpeg=True)
    # the scorer keeps 8x8 px, so the JPEG decodes at 1/8 scale, still >= 8 px a side; PNGs are decoded whole
    assert recorder.sizes[-2:] == [(64, 48), (512, 384)]
    assert fast.summary["fast_jpeg"] and not exact.summary["fast_jpeg"]
    assert [r["redness"] for r in fast.rows] == pytest.approx([r["redness"] for r in exact.rows], abs=2e-3)


# ---------------------------------------------------------------- the real scorer classes, tiny random weights


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    from diffusion_align.rewards.tiny import save_tiny_scorer
    from diffusion_align.rewards import load_scorer
    root = tmp_path_factory.mktemp("tiny-scorers")
    return {name: load_scorer(name, save_tiny_scorer(name, root / name), device="cpu", batch_size=2)
            for name in ("pickscore", "aesthetic")}


def test_tiny_pickscore_and_aesthetic_end_to_end(folder, tmp_path, tiny_scorers):
    pick, aesthetic = tiny_scorers["pickscore"], tiny_scorers["aesthetic"]
    out = tmp_path / "scores.csv"
    report = score_folder(folder, [pick, aesthetic], out, num_workers=2)
    header, rows = read_scores(out)
    assert header == ["file", "prompt", "seed", "stamp", "pickscore", "aesthetic"]
    assert [r["file"] for r in rows] == sorted(EXPECTED)
    images = [Image.open(folder / r["file"]).convert("RGB") for r in rows]
    prompts = [r["prompt"] for r in rows]
    # the DataLoader path gives what the scorers' own score() gives
    assert [r["pickscore"] for r in rows] == pytest.approx(pick.score(images, prompts).tolist(), abs=1e-5)
    assert [r["aesthetic"] for r in rows] == pytest.approx(aesthetic.score(images, prompts).tolist(), abs=1e-5)
    assert report.summary["scorers"]["pickscore"]["convention"] == pick.convention
    assert sorted(f for f, _ in report.unreadable) == ["broken.png", "sub/cut.JPG"]
    for png in report.histograms.values():
        with Image.open(png) as im:
            assert im.format == "PNG"


def test_prompt_free_scorer_needs_no_prompt(tmp_path, tiny_scorers):
    solid(tmp_path / "img" / "a.png", 10)
    solid(tmp_path / "img" / "b.png", 200)
    report = score_folder(tmp_path / "img", [tiny_scorers["aesthetic"]], tmp_path / "s.csv", num_workers=0)
    assert [r["prompt"] for r in report.rows] == ["", ""]
    with pytest.raises(ScoringError, match="a.png, b.png; scorer.s. pickscore need one"):
        score_folder(tmp_path / "img", [tiny_scorers["pickscore"]], tmp_path / "s2.csv", num_workers=0)
