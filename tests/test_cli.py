"""The commands end to end on tiny local models: make-tiny -> label -> train, score, compare, fit-reward."""

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_align.cli import main
from diffusion_align.rewards import load_scorer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    main(["make-tiny", str(out), "--family", "sd", "--scorers", "pickscore", "aesthetic", "--pairs", "12"])
    return out


def image_folder(root, rows, slot):
    """A folder of one image per pair (image `slot`), with metadata.jsonl prompts and seeds."""
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as meta:
        for i, row in enumerate(rows):
            Image.open(io.BytesIO(row[f"jpg_{slot}"])).save(root / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "prompt": row["caption"], "seed": 0}) + "\n")
    return root


def test_make_tiny_label_then_train(tiny, tmp_path, capsys):
    pickscore = f"pickscore={tiny / 'tiny-scorer-pickscore'}"
    main(["label", str(tiny / "tiny-pairs.parquet"), "--scorer", pickscore, "--out", str(tmp_path / "labelled"),
          "--workers", "0"])
    assert "12 pairs labelled by pickscore" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "labelled" / "pairs-00000.parquet").to_pylist()
    assert {"pickscore_0", "pickscore_1", "pref_prob_0", "human_label_0"} <= table[0].keys()
    main(["train", str(Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"), f"model.pretrained={tiny / 'tiny-sd'}",
          f"data.path={tmp_path / 'labelled'}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
          "train.report_to=none"])
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_label_refuses_an_out_holding_its_source_before_the_scorer_loads(tiny, tmp_path, capsys, monkeypatch):
    import shutil
    from diffusion_align import rewards
    shutil.copy(tiny / "tiny-pairs.parquet", tmp_path / "pairs-00000.parquet")
    monkeypatch.setattr(rewards, "load_scorer", lambda *a, **k: pytest.fail("loaded the scorer first"))
    with pytest.raises(SystemExit):
        main(["label", str(tmp_path), "--scorer", f"pickscore={tiny / 'tiny-scorer-pickscore'}", "--out",
              str(tmp_path)])
    assert "holds source file" in capsys.readouterr().err


def test_score_and_compare_folders(tiny, tmp_path, capsys):
    rows = pq.read_table(tiny / "tiny-pairs.parquet").to_pylist()
    folder_a, folder_b = image_folder(tmp_path / "a", rows, 0), image_folder(tmp_path / "b", rows, 1)
    main(["score", str(folder_a), "--scorer", f"pickscore={tiny / 'tiny-scorer-pickscore'}",
          "--scorer", f"aesthetic={tiny / 'tiny-scorer-aesthetic'}", "--out", str(tmp_path / "scores.csv"),
          "--workers", "0"])
    with open(tmp_path / "scores.csv") as f:
        scored = list(csv.DictReader(f))
    assert len(scored) == 12 and {"file", "prompt", "pickscore", "aesthetic"} <= scored[0].keys()
    scorer = load_scorer("pickscore", tiny / "tiny-scorer-pickscore")
    first = next(r for r in scored if r["file"] == "0.png")
    expected = scorer.score([Image.open(folder_a / "0.png")], [rows[0]["caption"]]).item()
    assert float(first["pickscore"]) == pytest.approx(expected, abs=1e-4)

    main(["compare", str(folder_a), str(folder_b), "--scorer", f"pickscore={tiny / 'tiny-scorer-pickscore'}",
          "--out", str(tmp_path / "ab"), "--workers", "0"])
    summary = json.loads((tmp_path / "ab.json").read_text())
    assert 0.0 <= summary["win_rate"] <= 1.0
    assert "win rate" in capsys.readouterr().out


def test_fit_reward_output_loads_as_pickscore(tiny, tmp_path):
    main(["fit-reward", str(tiny / "tiny-pairs.parquet"), "--base", str(tiny / "tiny-scorer-pickscore"),
          "--out", str(tmp_path / "fitted"), "--steps", "3", "--batch-size", "4", "--warmup-steps", "0",
          "--val-fraction", "0.3", "--eval-pairs", "4", "--workers", "0"])
    assert load_scorer("pickscore", tmp_path / "fitted").name == "pickscore"


def test_scorer_errors_are_reported_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(tmp_path), "--scorer", "pickscroe", "--out", str(tmp_path / "s.csv")])
    assert exit_info.value.code == 2
    assert "unknown scorer 'pickscroe'; known scorers: pickscore" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", str(tmp_path), "--scorer", f"hpsv2={tmp_path / 'missing.pt'}", "--out", str(tmp_path / "s.csv")])
    assert "HPS_v2_compressed.pt" in capsys.readouterr().err


def test_a_missing_input_fails_before_the_scorer_loads(tiny, tmp_path, capsys, monkeypatch):
    """score, compare, grid and label name a missing image folder or pairs source at once, not after loading the
    scorer (a minute for PickScore's ViT-H on a GPU)."""
    import diffusion_align.rewards

    def refuse(*args, **kwargs):
        raise AssertionError("the scorer was loaded before the inputs were checked")
    monkeypatch.setattr(diffusion_align.rewards, "load_scorer", refuse)
    images, missing = tmp_path / "images", tmp_path / "missing"
    images.mkdir()
    scorer = ["--scorer", f"pickscore={tiny / 'tiny-scorer-pickscore'}"]
    for argv, message in [
        (["score", str(missing), "--out", str(tmp_path / "s.csv")], f"image folder not found: {missing}"),
        (["compare", str(images), str(missing)], f"image folder not found: {missing}"),
        (["grid", str(missing), str(images), "--out", str(tmp_path / "g.png")], f"image folder not found: {missing}"),
        (["label", str(missing), "--from-images", "--out", str(tmp_path / "p")], f"image folder not found: {missing}"),
        (["label", str(tmp_path / "pairs-*.parquet"), "--out", str(tmp_path / "p")], "no parquet files found for"),
        (["label", str(missing / "pairs.parquet"), "--out", str(tmp_path / "p")], "pairs source not found"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *scorer])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "p").exists() and not (tmp_path / "g.png").exists()


def test_captions_then_dcpo(tiny, tmp_path, capsys):
    main(["captions", str(tiny / "tiny-pairs.parquet"), "--strategy", "perturbation", "--strength", "weak",
          "--out", str(tmp_path / "captions"), "--workers", "0"])
    table = pq.read_table(tmp_path / "captions" / "pairs-00000.parquet").to_pylist()
    winner_slot = [0 if r["label_0"] > r["label_1"] else 1 for r in table]
    assert all(r[f"caption_{w}"] == r["caption"] != r[f"caption_{1 - w}"] for r, w in zip(table, winner_slot))
    main(["train", str(Path(__file__).parent.parent / "configs" / "tiny" / "dcpo.yaml"),
          f"model.pretrained={tiny / 'tiny-sd'}", f"data.path={tmp_path / 'captions'}",
          f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.report_to=none"])
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_plot_redraws_curves_and_explains_a_wrong_folder(tmp_path, capsys):
    # `$` in the run's folder and a tracked scorer's name is text, not matplotlib's mathtext (which fails on it)
    run = tmp_path / "cost_$10_vs_$20"
    run.mkdir()
    lines = [{"step": i, "loss": 0.69 - 0.01 * i, "implicit_acc": 0.5, "lr": 1e-5, "grad_norm": None,
              "tracked_a$b": 0.1 * i} for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')
    main(["plot", str(run)])
    assert "training_curves.png" in capsys.readouterr().out
    with Image.open(run / "training_curves.png") as png:
        assert png.size[0] > 500
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "nothing")])
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_train_generate_compare_loop(tiny, tmp_path, capsys):
    main(["train", str(Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"),
          f"model.pretrained={tiny / 'tiny-sd'}", f"data.path={tiny / 'tiny-pairs.parquet'}",
          f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.report_to=none"])
    (tmp_path / "prompts.txt").write_text("# two prompts\na red circle on a white background\na blue square\n")
    common = ["--model", str(tiny / "tiny-sd"), "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "0-1",
              "--steps", "2", "--height", "32", "--width", "32"]
    main(["generate", *common, "--out", str(tmp_path / "base")])
    main(["generate", *common, "--lora", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "tuned")])
    assert "generated 4 images" in capsys.readouterr().out
    main(["compare", str(tmp_path / "tuned"), str(tmp_path / "base"), "--out", str(tmp_path / "cmp"),
          "--scorer", f"pickscore={tiny / 'tiny-scorer-pickscore'}", "--workers", "0"])
    summary = json.loads((tmp_path / "cmp.json").read_text())
    assert summary["pairs"] == summary["pairs_by_seed"] == 4  # each tuned image meets the base image of its seed
    main(["grid", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(tmp_path / "grid.png"),
          "--html", str(tmp_path / "review.html"), "--scorer", f"pickscore={tiny / 'tiny-scorer-pickscore'}"])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 2 * 256  # the prompt column and two image columns
    assert "a blue square" in (tmp_path / "review.html").read_text()


def test_version_and_top_level_help(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"diffusion-align {version('diffusion-align')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Align text-to-image diffusion models with human preferences" in text and "thin wrappers" not in text


def test_the_tiny_pref_grpo_config_trains_on_what_make_tiny_writes(tiny, tmp_path):
    """configs/tiny/pref-grpo.yaml samples the prompts make-tiny writes (its pairs' captions), rewarded by its
    tiny PickScore."""
    captions = {row["caption"] for row in pq.read_table(tiny / "tiny-pairs.parquet").to_pylist()}
    assert sorted(captions) == (tiny / "prompts.txt").read_text().splitlines()
    config = Path(__file__).parent.parent / "configs" / "tiny" / "pref-grpo.yaml"
    main(["train", str(config), f"model.pretrained={tiny / 'tiny-sd'}", f"online.prompts={tiny / 'prompts.txt'}",
          f"online.reward=pickscore={tiny / 'tiny-scorer-pickscore'}", f"train.output_dir={tmp_path / 'run'}",
          "train.max_steps=2", "train.report_to=none", "train.checkpoint_every=0"])
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_no_progress_turns_every_bar_off(tiny, tmp_path, capsys, monkeypatch):
    """Training's bar shows even off a terminal (as diffusers' scripts do, for logs); --no-progress turns it off, and
    the libraries' bars (here diffusers' pipeline loading) with it."""
    import datasets
    import diffusers
    import huggingface_hub
    import transformers
    from diffusion_align.progress import SETTING
    monkeypatch.delenv(SETTING, raising=False)  # restored afterwards: the flag sets it for the process
    config = Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"
    args = [str(config), f"model.pretrained={tiny / 'tiny-sd'}", f"data.path={tiny / 'tiny-pairs.parquet'}",
            "train.max_steps=2", "train.report_to=none", "train.checkpoint_every=0"]
    main(["train", *args, f"train.output_dir={tmp_path / 'shown'}"])
    assert "train: 100%" in capsys.readouterr().err
    try:
        main(["--no-progress", "train", *args, f"train.output_dir={tmp_path / 'quiet'}"])
        main(["--no-progress", "export", str(tmp_path / "quiet" / "final"), "--format", "merged", "--out",
              str(tmp_path / "merged")])
        err = capsys.readouterr().err
        assert "train:" not in err and "%|" not in err, err
    finally:  # the libraries' switches are process-wide: on again for the other tests
        datasets.enable_progress_bars()
        diffusers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()


def test_an_interrupted_run_without_a_checkpoint_is_told_how_to_start_again(tmp_path):
    """'a new run starts from step 0' was refused when tried: the folder holds a run (metrics.jsonl)."""
    import argparse
    from diffusion_align.cli import _resume_hint
    args = argparse.Namespace(command="train", config=None, overrides=[f"train.output_dir={tmp_path}"])
    assert "rerun with train.resume=latest to start it again from step 0 (or train.overwrite=true)" in _resume_hint(args)


def test_a_failed_rename_leaves_no_temp_file(tmp_path):
    """Written beside, then renamed onto a folder (an --out that is one): the rename fails, and its temp file went
    unremoved although the message says nothing half-written is left."""
    from diffusion_align.files import written_beside
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        with written_beside(tmp_path / "out") as tmp:
            tmp.write_text("scores")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
