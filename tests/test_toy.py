"""The toy world: its grammar and splits, deterministic renders, the oracle on clean renders, the simulated raters,
the shipped assets through the real loaders, and a shortened demo end to end."""

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffusion_align.toy import judge, oracle_scores, parse_prompt, rate_pairs, render, sample_prompts
from diffusion_align.toy.assets import folder_records
from diffusion_align.toy.world import ALL_SCENES, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, render_flawed, scenes

ATTRIBUTES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "background": BACKGROUNDS}


def test_grammar_round_trips_and_rejects_other_prompts():
    assert len(ALL_SCENES) == 2 * 6 * 3 * 3 * 3
    for scene in ALL_SCENES:
        assert parse_prompt(scene.prompt) == scene
    assert ALL_SCENES[0].prompt == "a small red circle on the left, white background"
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="'pink' is not one of"):
        parse_prompt("a small pink circle on the left, white background")


def test_held_out_scenes_are_new_combinations_of_known_words():
    pretrain, heldout = scenes("pretrain"), scenes("heldout")
    assert not set(pretrain) & set(heldout) and len(pretrain) + len(heldout) == len(ALL_SCENES)
    assert 0.1 < len(heldout) / len(ALL_SCENES) < 0.3
    for field, values in ATTRIBUTES.items():  # every word is seen in training
        assert {getattr(s, field) for s in pretrain} == set(values) == {getattr(s, field) for s in heldout}
    held = set(sample_prompts(500, seed=3, split="heldout"))
    assert held == {s.prompt for s in heldout}
    assert not held & set(sample_prompts(1000, seed=3, split="pretrain"))


def test_the_validation_split_is_pretraining_scenes_that_get_no_pairs():
    train, val, heldout = (set(scenes(split)) for split in ("train", "val", "heldout"))
    assert train | val == set(scenes("pretrain")) and not train & val and not val & heldout
    assert (len(train), len(val)) == (212, 39)
    for field, values in ATTRIBUTES.items():  # tuned on scenes whose every word the pairs also show
        assert {getattr(s, field) for s in val} == set(values)
    assert set(sample_prompts(1000, seed=3, split="train")) == {s.prompt for s in train}
    assert set(sample_prompts(100, seed=3, split="val")) == {s.prompt for s in val}
    assert scenes("pretrain") == [s for s in ALL_SCENES if s not in heldout]  # pretraining data unchanged


def test_pretraining_data_never_names_a_held_out_scene():
    """Not even as a wrong caption: flawed captions describe a train scene one attribute away."""
    heldout = {s.prompt for s in scenes("heldout")}
    rng = np.random.default_rng(0)
    captions = [render_flawed(scene, rng)[1] for scene in scenes("pretrain") for _ in range(20)]
    wrong = [c for c, scene in zip(captions, [s for s in scenes("pretrain") for _ in range(20)]) if c != scene.prompt]
    assert len(wrong) > 500 and not set(captions) & heldout
    for caption, scene in zip(captions, [s for s in scenes("pretrain") for _ in range(20)]):
        changed = [f for f in ATTRIBUTES if getattr(parse_prompt(caption), f) != getattr(scene, f)]
        assert len(changed) in (0, 1)


def test_prompts_and_renders_are_deterministic_for_a_seed():
    assert sample_prompts(20, seed=1) == sample_prompts(20, seed=1) != sample_prompts(20, seed=2)
    first = [np.asarray(render_flawed(s, np.random.default_rng(7))[0]) for s in ALL_SCENES[:10]]
    again = [np.asarray(render_flawed(s, np.random.default_rng(7))[0]) for s in ALL_SCENES[:10]]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_the_oracle_ranks_the_true_render_above_one_attribute_off():
    """Judged against prompt P, a clean render of P beats a clean render of P with one attribute changed."""
    rng = np.random.default_rng(0)
    wins, trials = 0, 0
    for scene in [ALL_SCENES[i] for i in rng.permutation(len(ALL_SCENES))[:60]]:
        good = judge(render(scene, rng), scene.prompt)["oracle"]
        for field, values in ATTRIBUTES.items():
            for value in values:
                if value != getattr(scene, field):
                    trials += 1
                    wins += good > judge(render(replace(scene, **{field: value}), rng), scene.prompt)["oracle"]
    assert trials > 600 and wins / trials > 0.99


def test_the_oracle_judges_pixels_not_the_prompt_string():
    rng = np.random.default_rng(1)
    scene = parse_prompt("a large blue square on the right, white background")
    image = render(scene, rng)
    parts = judge(image, scene.prompt)
    assert parts["oracle"] > 0.9 and min(parts.values()) > 0.8
    blank = Image.new("RGB", (32, 32), BACKGROUNDS["white"])
    assert judge(blank, scene.prompt)["oracle"] == pytest.approx(0.25)  # only the clean background counts
    noisy = np.asarray(image, np.float32) + np.random.default_rng(2).normal(0, 40, (32, 32, 3))
    noisy = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    assert judge(noisy, scene.prompt)["clean background"] < parts["clean background"] - 0.3  # the stated taste
    # the same image as a float tensor in [0, 1], and at another size, gets the same judgement
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    scores = oracle_scores([image, tensor, image.resize((64, 64), Image.Resampling.NEAREST)], [scene.prompt] * 3)
    assert scores.dtype == torch.float32 and torch.allclose(scores, scores[0].expand(3), atol=0.02)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        oracle_scores([image, image], [scene.prompt])


def test_the_oracle_is_a_scorer_for_every_command():
    from diffusion_align.rewards import load_scorer
    scorer = load_scorer("toy-oracle", device="cpu", batch_size=2)
    rng = np.random.default_rng(0)
    chosen = ALL_SCENES[:5]
    images = [render(s, rng) for s in chosen]
    prompts = [s.prompt for s in chosen]
    torch.testing.assert_close(scorer.score(images, prompts), oracle_scores(images, prompts), atol=1e-6, rtol=0)
    wrong = [ALL_SCENES[-1].prompt] * 5  # another colour, size, position and background
    assert (scorer.score(images, wrong) < scorer.score(images, prompts) - 0.3).all()
    with pytest.raises(ValueError, match="takes no weights path"):
        load_scorer("toy-oracle", "/some/path")


def test_raters_tie_close_scores_and_follow_bradley_terry():
    rng = np.random.default_rng(0)
    label_0, label_1 = rate_pairs(np.full(20_000, 0.6), np.full(20_000, 0.55), rng, temperature=0.05, tie_margin=0.02)
    assert np.all(label_0 + label_1 == 1)
    assert label_0.mean() == pytest.approx(1 / (1 + np.exp(-1)), abs=0.01)  # gap 0.05 at temperature 0.05
    label_0, _ = rate_pairs([0.5, 0.5], [0.51, 0.3], rng, tie_margin=0.02)
    assert label_0[0] == 0.5 and label_0[1] in (0.0, 1.0)


# ---------------------------------------------------------------- the shipped assets and the demo

def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    from diffusion_align.toy.pretrain import PretrainSettings, pretrain
    settings = PretrainSettings(images=32, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4)
    first, again = pretrain(tmp_path / "a", settings), pretrain(tmp_path / "b", settings)
    for part in ("unet", "vae"):
        a = load_file(first / part / "diffusion_pytorch_model.safetensors")
        b = load_file(again / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_the_shipped_text_encoder_is_the_seeded_initialisation():
    """Pretraining keeps the text encoder frozen at build_pipeline(seed=0)'s random weights: rebuilding them gives
    the shipped tensors exactly (stored in float16)."""
    from safetensors.torch import load_file

    from diffusion_align.toy.assets import base_model
    from diffusion_align.toy.pretrain import build_pipeline
    shipped = load_file(base_model() / "text_encoder" / "model.safetensors")
    rebuilt = build_pipeline(seed=0).text_encoder.state_dict()
    assert shipped.keys() <= rebuilt.keys() and all(torch.equal(shipped[k], rebuilt[k].half()) for k in shipped)


def test_the_shipped_base_model_loads_through_the_real_loaders():
    from diffusers import StableDiffusionPipeline

    from diffusion_align.models.loading import load_components
    from diffusion_align.toy.assets import base_model
    folder = base_model()
    assert not list(folder.rglob("*.bin")) and sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 8e6
    parts = load_components(str(folder))
    assert (parts.family, parts.prediction_type) == ("sd", "epsilon")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    # stored in float16, loaded in float32 by every loader unless asked (the text encoder's config pins it)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, parts.denoiser, parts.vae,
                              *parts.text_encoders)} == {torch.float32}
    assert StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16).text_encoder.dtype == torch.float16
    prompts = sample_prompts(4, seed=0, split="heldout")
    images = pipe(prompts, num_inference_steps=10, guidance_scale=3.0, height=32, width=32,
                  generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    assert [im.size for im in images] == [(32, 32)] * 4
    assert oracle_scores(images, prompts).mean() > 0.3  # it draws the world, if imperfectly (see measured.json)


def test_toy_pickscore_loads_by_name_and_has_learned_the_taste():
    from diffusion_align.rewards import load_scorer
    from diffusion_align.toy.world import _noisy
    scorer = load_scorer("toy-pickscore", device="cpu")
    assert scorer.column == "toy_pickscore"
    rng = np.random.default_rng(0)
    prompts = [ALL_SCENES[i].prompt for i in rng.permutation(len(ALL_SCENES))[:32]]
    clean = [render(parse_prompt(p), rng) for p in prompts]
    blotchy = [_noisy(image, rng) for image in clean]
    assert (scorer.preference_prob(clean, blotchy, prompts) > 0.5).float().mean() > 0.9


def test_demo_end_to_end(tmp_path):
    """A shortened demo: every stage runs on the shipped assets and the outputs are what the report says."""
    from diffusers import StableDiffusionPipeline

    from diffusion_align.models.loading import weights_digest
    from diffusion_align.toy.assets import base_model
    from diffusion_align.toy.demo import DemoSettings, run_demo
    out = tmp_path / "demo"
    report = run_demo(out, DemoSettings(steps=2, prompts=8, images_per_prompt=2, eval_seeds=1,
                                        overrides=("train.batch_size=4",)))
    assert json.loads((out / "report.json").read_text()) == report
    win = report["oracle_win_rate"]
    assert win["comparisons"] == win["prompts"] == 73 and 0 <= win["low"] <= win["value"] <= win["high"] <= 1
    assert set(report["toy_reward"]) == {"base", "aligned"} and report["method"] == "dpo"
    assert "Oracle win rate of the aligned model over the base" in (out / "report.md").read_text()
    assert len(pq.read_table(out / "pairs" / "pairs-00000.parquet")) == 8  # one pair per train prompt
    for name in ("base", "aligned"):
        assert len((out / name / "metadata.jsonl").read_text().splitlines()) == 73
    for path in (report["files"]["review page"], report["files"]["training curves"], *report["files"]["grid pages"]):
        assert Path(path).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(base_model())
    pipe.load_lora_weights(report["files"]["LoRA weights"])
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    # the report opens on the largest oracle gain, with its verdict
    comparisons = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    top = max(comparisons, key=lambda c: c["oracle_aligned"] - c["oracle_base"])
    page = (out / "review.html").read_text()
    rows = json.loads(page.split('id="review-data">')[1].split("</script>")[0])["rows"]
    assert (rows[0]["prompt"], rows[0]["seed"]) == (top["prompt"], top["seed"])
    assert rows[0]["note"].startswith("oracle: aligned better, +") and all(r["note"] for r in rows)
    assert f"{report['changed_visibly']['images']} of 73 aligned images" in (out / "report.md").read_text()

    # a rerun of another method, at another seed, on fewer prompts, judged on the validation split, into the same
    # folder: it judges exactly its own images; the seed moves the pair images, not the evaluation seeds. A full
    # fine-tune this time: the aligned images come from its own pipeline folder
    rerun = run_demo(out, DemoSettings(method="sft", steps=2, prompts=4, images_per_prompt=2, eval_seeds=1, seed=1,
                                       eval_split="val", overrides=("train.batch_size=4", "model.lora_rank=null")))
    assert rerun["method"] == "sft" and rerun["oracle_win_rate"]["comparisons"] == 39
    final = rerun["files"]["model"]
    aligned = [json.loads(line) for line in (out / "aligned" / "metadata.jsonl").read_text().splitlines()]
    assert len(aligned) == 39 and {r["weights"] for r in aligned} == {weights_digest(final)}
    assert {(r["model"], r["lora"]) for r in aligned} == {(final, None)}
    assert {r["prompt"] for r in aligned} == {s.prompt for s in scenes("val")}
    assert {r["seed"] for r in aligned} == {1000}
    pair_images = [json.loads(line) for line in (out / "pair-images" / "metadata.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in pair_images} == set(sample_prompts(4, 1, "train"))
    assert {r["seed"] for r in pair_images} == {2, 3}  # seed 0 drew 0 and 1
    assert len(pair_images) == 8 and len(pq.read_table(out / "pairs" / "pairs-00000.parquet")) == 4
    assert "validation prompts" in (out / "report.md").read_text()


def _judged_folder(folder, images: dict) -> None:
    """A folder as `generate` writes it: the images and their metadata lines (the settings do not matter here)."""
    folder.mkdir()
    lines = []
    for number, ((prompt, seed), image) in enumerate(images.items()):
        image.save(folder / f"{number}.png")
        lines.append(json.dumps({"file_name": f"{number}.png", "prompt": prompt, "seed": seed, "prompt_index": number}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_demo_evaluation_compares_the_right_images_by_prompt(tmp_path, monkeypatch):
    """Two folders of known quality: clean renders beat blotchy ones, identical images tie, and the interval is
    bootstrapped over per-prompt win rates."""
    from diffusion_align.rewards import load_scorer
    from diffusion_align.toy import demo
    from diffusion_align.toy.assets import toy_pickscore
    from diffusion_align.toy.world import _noisy
    rng = np.random.default_rng(0)
    prompts, seeds = sample_prompts(3, seed=5, split="heldout"), [7, 8]
    clean = {(p, s): render(parse_prompt(p), rng) for p in prompts for s in seeds}
    blotchy = {k: _noisy(image, rng) for k, image in clean.items()}
    (p0, p1, p2), (s0, s1) = prompts, seeds
    aligned = {(p0, s0): clean, (p0, s1): clean, (p1, s0): clean, (p1, s1): clean, (p2, s0): blotchy,
               (p2, s1): blotchy}
    base = {(p0, s0): blotchy, (p0, s1): blotchy, (p1, s0): blotchy, (p1, s1): clean, (p2, s0): clean,
            (p2, s1): clean}
    _judged_folder(tmp_path / "aligned", {k: which[k] for k, which in aligned.items()})
    _judged_folder(tmp_path / "base", {**{k: which[k] for k, which in base.items()},
                                       (p0, 99): blotchy[p0, s0]})  # another run's seed: never read
    received = []

    def recording(values, **kwargs):
        received.append(list(values))
        return demo_interval(values, **kwargs)

    demo_interval = demo.bootstrap_interval
    monkeypatch.setattr(demo, "bootstrap_interval", recording)
    proxy = load_scorer("toy-pickscore", toy_pickscore(), device="cpu")
    summary, comparisons = demo.evaluate(tmp_path / "base", tmp_path / "aligned", proxy, prompts, seeds)
    swapped, _ = demo.evaluate(tmp_path / "aligned", tmp_path / "base", proxy, prompts, seeds)
    win = summary["oracle_win_rate"]
    assert win["value"] == pytest.approx((1 + 1 + 1 + 0.5 + 0 + 0) / 6) and win["comparisons"] == 6
    assert received[0] == [1.0, 0.75, 0.0], "one value per prompt: its win rate over the seeds"
    assert swapped["oracle_win_rate"]["value"] == pytest.approx(1 - win["value"])
    assert swapped["oracle_win_rate"]["low"] == pytest.approx(1 - win["high"])
    assert summary["oracle_score"]["aligned"] == swapped["oracle_score"]["base"]
    assert summary["changed_visibly"]["images"] == 5  # all but the identical pair

    def spread(images):  # mean over prompts of the mean absolute pixel difference between the two seeds' images
        return np.mean([np.abs(np.asarray(images[p, s0], float) - np.asarray(images[p, s1], float)).mean()
                        for p in prompts])
    aligned_images = {k: which[k] for k, which in aligned.items()}
    assert summary["diversity"]["aligned"] == pytest.approx(spread(aligned_images))
    assert summary["diversity"]["ratio"] == pytest.approx(spread(aligned_images) / summary["diversity"]["base"])
    assert swapped["diversity"]["base"] == summary["diversity"]["aligned"]
    assert [(c["prompt"], c["seed"]) for c in comparisons] == [(p, s) for p in prompts for s in seeds]
    # counted with the raters' tie margin: a gain under 0.02 either way is half a win
    gains = np.array([c["oracle_aligned"] - c["oracle_base"] for c in comparisons])
    tied = summary["oracle_win_rate_ties_counted"]
    assert tied["value"] == pytest.approx(np.mean(np.where(np.abs(gains) < 0.02, 0.5, gains > 0)))
    assert tied["ties"] == pytest.approx(np.mean(np.abs(gains) < 0.02)) and tied["margin"] == 0.02
    assert received[1] == list(np.where(np.abs(gains) < 0.02, 0.5, gains > 0).reshape(3, 2).mean(axis=1))

    notes = demo.verdicts(comparisons)
    gains = [c["oracle_aligned"] - c["oracle_base"] for c in comparisons]
    order = [(c["prompt"], c["seed"]) for c in comparisons]
    expected = (sorted([k for k, g in zip(order, gains) if g > 0], key=lambda k: -gains[order.index(k)])
                + sorted([k for k, g in zip(order, gains) if g < 0], key=lambda k: gains[order.index(k)])
                + [(p1, s1)])
    assert list(notes) == expected and notes[p1, s1].startswith("oracle: tie, +0.000")
    assert notes[expected[0]].startswith("oracle: aligned better, +") and "base better, -" in notes[expected[-2]]
    with pytest.raises(ValueError, match=r"aligned: no image of 1 of the 2 prompts x seeds evaluated, .*seed 99"):
        demo.evaluate(tmp_path / "base", tmp_path / "aligned", proxy, [p0], [s0, 99])


def test_demo_checks_its_overrides_before_making_pairs(tmp_path, capsys, monkeypatch):
    from diffusion_align.cli import main
    monkeypatch.chdir(tmp_path)  # where the default --out, outputs/demo, would go
    with pytest.raises(SystemExit):  # the output folder given as a positional argument is taken for an override
        main(["demo", str(tmp_path / "demo")])
    assert "is not of the form section.key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "demo"), "train.lrr=1e-4"])
    assert "train.lrr" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "outputs").exists()
    # settings that used to fail after pairs and training, or to run the recipe's 1000 steps for --steps 0
    for flags, expected in ((["--steps", "0"], "at least 1 training step"), (["--steps", "-3"], "steps=-3"),
                            (["--eval-seeds", "0"], "eval_seeds=0"),
                            (["--family", "flow", "--method", "smpo", "--labels", "raters"],
                             "raters label only the pairs of dpo")):
        with pytest.raises(SystemExit):
            main(["demo", "--out", str(tmp_path / "demo"), *flags])
        assert expected in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "a-file")])
    assert "a-file is a file; expected a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "demo"), "train.resolution=33"])
    assert "train.resolution=33 must be a multiple of 8 (the VAE downsamples by 8), e.g. 32" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "outputs").exists()


def config_trained(monkeypatch, out, settings):
    """The config `run_demo(out, settings)` hands the trainer, the training call intercepted once the demo has made
    its pairs."""
    import diffusion_align.training.trainer as trainer
    from diffusion_align.toy.demo import run_demo

    class Trained(Exception):
        pass

    def intercept(cfg):
        trained.append(cfg)
        raise Trained

    trained = []
    monkeypatch.setattr(trainer, "train", intercept)
    with pytest.raises(Trained):
        run_demo(out, settings)
    return trained[0]


@pytest.mark.parametrize("family", ["unet", "flow"])
@pytest.mark.parametrize("method", ["dpo", "mapo", "smpo", "dcpo", "sft", "pref_grpo", "grpo"])
def test_the_toy_configs_train_as_the_demo_does(tmp_path, monkeypatch, method, family):
    """`demo --method M` trains configs/toy/<M>.yaml as shipped (`--family flow`: configs/toy-flow/): only where the
    files are and go, and the run's seed, differ (the training call is intercepted once the demo has made its
    pairs)."""
    from dataclasses import asdict

    from diffusion_align.config import load_config
    from diffusion_align.toy.assets import SAMPLING
    from diffusion_align.toy.demo import DemoSettings, recipe

    settings = DemoSettings(method=method, family=family, prompts=3, images_per_prompt=2, seed=4)
    trained = config_trained(monkeypatch, tmp_path / "demo", settings)
    if method in ("smpo", "dcpo"):  # a rerun rewrites the pairs, and their scored or captioned copy is made again
        assert config_trained(monkeypatch, tmp_path / "demo", settings).data.path == trained.data.path
    name = method.replace("_", "-")  # the file names follow the other recipes: pref-grpo.yaml
    folder = {"unet": "toy", "flow": "toy-flow"}[family]
    assert recipe(method, family) == Path(__file__).parent.parent / "configs" / folder / f"{name}.yaml"
    shipped, demo = asdict(load_config(recipe(method, family))), asdict(trained)
    where = ("online", "prompts") if method in ("pref_grpo", "grpo") else ("data", "path")
    assert Path(demo[where[0]][where[1]]).is_relative_to(tmp_path / "demo")
    assert (demo["train"]["seed"], demo["train"]["overwrite"]) == (4, True)
    if method not in ("pref_grpo", "grpo"):  # its pairs load as training loads them: none dropped as unlabelled
        from diffusion_align.data.pairs import load_pairs
        _, stats = load_pairs(trained.data.path, keep_unlabelled=False,
                              orient_by=trained.method.pref_column if method == "smpo" else None)
        assert stats.pairs > 0 and stats.unlabelled == 0, stats
    if method in ("pref_grpo", "grpo"):  # the online methods sample as every toy image is sampled
        assert (shipped["online"]["sample_steps"], shipped["online"]["guidance"]) == (SAMPLING["steps"],
                                                                                      SAMPLING["guidance"])
    for config in (shipped, demo):
        for section, key in (("model", "pretrained"), where, ("train", "output_dir"), ("train", "seed"),
                             ("train", "overwrite")):
            del config[section][key]
    assert shipped == demo


@pytest.mark.parametrize("method", ["pref_grpo", "grpo"])
def test_online_demo_end_to_end(tmp_path, method):
    from diffusion_align.evaluation.plots import read_metrics
    from diffusion_align.toy.demo import DemoSettings, run_demo
    out = tmp_path / "demo"
    report = run_demo(out, DemoSettings(method=method, steps=2, prompts=8, eval_seeds=1, overrides=(
        "online.prompts_per_step=2", "online.group_size=4", "train.batch_size=4", "online.sample_steps=4",
        "train.log_every=1")))
    assert report["method"] == method and report["oracle_win_rate"]["comparisons"] == 73
    assert (out / "train-prompts.txt").read_text().splitlines() == sample_prompts(8, 0, "train")
    records = read_metrics(out / "model" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(0 < r["tracked_toy-oracle"] <= 1.5 for r in records)
    assert Path(report["files"]["LoRA weights"], "pytorch_lora_weights.safetensors").is_file()


def test_compact_storage_halves_the_weight_files_and_loads_back_as_float32(tmp_path, tiny_models):
    import shutil

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from diffusion_align.toy.pretrain import HALF_STORED, store_compact
    folder = tmp_path / "compact"
    shutil.copytree(tiny_models["sd"], folder)
    before = {name: load_file(folder / name) for name in HALF_STORED}
    store_compact(folder, HALF_STORED)
    for name, tensors in before.items():
        stored = load_file(folder / name)
        assert all(stored[k].dtype == torch.float16 and torch.equal(stored[k], v.half()) for k, v in tensors.items())
    assert not (folder / "tokenizer" / "tokenizer.json").exists()
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    original, compact = (StableDiffusionPipeline.from_pretrained(f) for f in (tiny_models["sd"], folder))
    assert {m.dtype for m in (compact.unet, compact.vae, compact.text_encoder)} == {torch.float32}
    prompts = sample_prompts(20, seed=3) + ["Hello, café ünïcode 123!"]
    assert original.tokenizer(prompts).input_ids == compact.tokenizer(prompts).input_ids


def test_rater_labels_are_the_simulated_raters_on_every_pair(tmp_path, monkeypatch):
    """`demo --labels raters`: every pair of a prompt's images, labelled as `rate_pairs` labels the oracle's scores
    (ties and Bradley-Terry noise drawn from the run's seed), is what the method trains on (DCPO: with its captions);
    SmPO, whose soft labels are a scorer's, refuses them; a toy PickScore margin goes with its own labels only."""
    from diffusion_align.data.pairs import load_pairs
    from diffusion_align.toy.demo import DemoSettings, run_demo

    trained = config_trained(monkeypatch, tmp_path / "demo", DemoSettings(method="dcpo", labels="raters", prompts=3,
                                                                            images_per_prompt=3, seed=5))
    table = pq.read_table(tmp_path / "demo" / "pairs-raters" / "pairs.parquet").to_pandas()
    assert len(table) == 3 * 3 and table.groupby("caption").size().tolist() == [3, 3, 3]
    images = {(r["prompt"], r["file_name"]) for r in folder_records(tmp_path / "demo" / "pair-images")}
    assert len(images) == 9
    label_0, _ = rate_pairs(table["oracle_0"], table["oracle_1"], np.random.default_rng(5))
    assert np.array_equal(table["label_0"], label_0) and np.array_equal(table["label_1"], 1 - label_0)
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in table["jpg_0"]]
    assert np.allclose(oracle_scores(decoded, list(table["caption"])), table["oracle_0"], atol=1e-6)
    pairs, _ = load_pairs(trained.data.path, keep_ties=True)
    assert Path(trained.data.path).name == "pairs-captions" and len(pairs) == 9
    assert [r["label_0"] for r in pairs] == table["label_0"].tolist()
    with pytest.raises(ValueError, match="raters label only the pairs of dpo, mapo, dcpo and sft"):
        run_demo(tmp_path / "smpo", DemoSettings(method="smpo", labels="raters", prompts=3))
    with pytest.raises(ValueError, match="label_margin is the toy PickScore's tie margin"):
        run_demo(tmp_path / "margin", DemoSettings(labels="raters", label_margin=1.0, prompts=3))
    with pytest.raises(ValueError, match="label_margin is the toy PickScore's tie margin"):
        run_demo(tmp_path / "margin", DemoSettings(method="grpo", label_margin=1.0, prompts=3))
    # a key the demo sets itself: the report said --steps' 100 while the override trained 50
    with pytest.raises(ValueError, match="'train.max_steps=50': the demo sets train.max_steps itself.*use --steps"):
        run_demo(tmp_path / "steps", DemoSettings(steps=100, prompts=3, overrides=("train.max_steps=50",)))
    assert not (tmp_path / "steps").exists()
