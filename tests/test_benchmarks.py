"""The benchmark scripts run: the GPU check on its CPU stand-in, the throughput table on a tiny row, the toy methods
table and its sweeps, the memory table."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def gpu_check(tmp_path, *archs) -> list[str]:
    """Run the GPU check's CPU stand-in (tiny pipelines, bf16, 2 steps) on `archs`, check what every case must
    hold, and return the table's rows."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--steps", "2", "--archs", *archs,
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(tmp_path.glob("runs/*")), "each case's run is deleted once measured"
    # beside each peak, what `diffusion-align plan` says the case needs (a sharded run's processes are its own)
    records = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(math.isfinite(r["planned_mb"]) == ("fsdp2" not in r["case"] and "zero2" not in r["case"])
               for r in records)
    assert all(math.isfinite(r["planned_cache_mb"]) == ("cache +" in r["case"]) for r in records)
    return [line for line in (tmp_path / "gpu_check.md").read_text().splitlines() if line.startswith("| ")]


def test_the_gpu_check_runs_on_its_cpu_stand_in(tmp_path):
    """SD3.5's cases, which run in the check's own process: the loop, the plan beside each peak, the fast path's
    cache made first, and the online loop (GRPO with the global std, whose device handling only a GPU tests). SDXL's
    cases (the sharded ones included) and FLUX's are the slow test below."""
    rows = gpu_check(tmp_path, "sd35")
    assert [row.split(" | ")[:3] for row in rows if row.startswith("| sd35 ")] == [
        ["| sd35", "lora bf16", "yes"], ["| sd35", "lora bf16, cache + precomputed ref", "yes"],
        ["| sd35", "full bf16", "yes"], ["| sd35", "lora bf16, grpo (global std)", "yes"]]
    # the fast case made its cache before the run (a run that found it made from other inputs would fail)
    assert any("peak CUDA MB making the cache (before the run)" in row for row in rows)


@pytest.mark.slow
def test_the_gpu_check_runs_every_unet_and_flux_case_on_its_cpu_stand_in(tmp_path):
    """SDXL's UNet through every UNet case, the sharded ones as torchrun launches (about 2 minutes), and FLUX's
    cases. SD1.5's UNet takes the same cases through the same code with less conditioning; its sharded training is
    tests/test_sharding.py's subject."""
    rows = gpu_check(tmp_path, "sdxl", "flux")
    unet = [row for row in rows if row.startswith("| sdxl ")]
    # LoRA and full, each plain and with cache + precomputed reference (bf16: fp16 needs CUDA), both sharded with
    # FSDP2 and the full fine-tune offloaded too, each writing checkpoints, and the full fine-tune with ZeRO-2
    # (torchrun, one process on the CPU), and GRPO's LoRA
    assert len(unet) == 9 and all("| yes |" in row for row in unet)
    assert sum("grpo" in row for row in unet) == 1
    assert sum("cache + precomputed ref" in row for row in unet) == 2
    assert sum("fsdp2, train.checkpoint_every=1" in row for row in unet) == 2
    assert sum("fsdp2-offload, train.checkpoint_every=1" in row for row in unet) == 1
    assert sum("zero2" in row for row in unet) == 1
    assert [row.split(" | ")[:3] for row in rows if row.startswith("| flux ")] == [
        ["| flux", "lora bf16", "yes"], ["| flux", "lora bf16, cache + precomputed ref", "yes"],
        ["| flux", "lora bf16, grpo (global std)", "yes"]]


def test_the_throughput_table(tmp_path):
    """One row, the fast path's (its cache made before the timed runs), timed in two rounds of two processes."""
    done = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--rows",
                           "dpo lora, cache + precomputed ref", "--n1", "1", "--n2", "2", "--pairs", "16",
                           "--workers", "0", "--rounds", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "tiny" / "table.md").read_text()
    assert "| dpo lora, cache + precomputed ref | " in table
    assert "failed (exit" not in table, table  # a crashed run; a round disturbed by the machine is not the code's
    assert "fastest of 2 rounds" in table and "slowest / fastest round" in table


def toy_methods_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("toy_methods", ROOT / "benchmarks" / "toy_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_toy_runs_record_key_follows_its_recipes_base_and_the_assets(tmp_path, monkeypatch):
    """A flow recipe is its UNet recipe (base:) with keys changed: its key hashed the flow file alone, so an edited
    UNet recipe read the flow runs back as current. The shipped assets were not in the key either."""
    import hashlib
    import shutil

    toy_methods = toy_methods_module()
    unet = ROOT / "configs" / "toy" / "dpo.yaml"
    # a recipe without a base keeps the digest its committed records were made under
    assert toy_methods.recipe_sha256("dpo", "unet") == hashlib.sha256(unet.read_bytes()).hexdigest()
    for folder in ("toy", "toy-flow"):
        shutil.copytree(ROOT / "configs" / folder, tmp_path / folder)
    monkeypatch.setattr(toy_methods, "recipe", lambda method, family: tmp_path / (
        "toy" if family == "unet" else "toy-flow") / f"{method}.yaml")
    before = toy_methods.recipe_sha256("dpo", "flow")
    (tmp_path / "toy" / "dpo.yaml").write_text(unet.read_text().replace("lr: 3.0e-4", "lr: 3.0e-3"))
    assert toy_methods.recipe_sha256("dpo", "flow") != before
    assert [p.name for p in toy_methods.recipe_files("dpo", "flow")] == ["dpo.yaml", "dpo.yaml"]

    assets = toy_methods.assets_sha256("unet")
    assert assets != toy_methods.assets_sha256("flow")
    copy = tmp_path / "assets"
    shutil.copytree(toy_methods.base_model("unet").parent, copy)
    monkeypatch.setattr(toy_methods, "base_model", lambda family: copy / "base")
    monkeypatch.setattr(toy_methods, "toy_pickscore", lambda: copy / "pickscore")
    assert toy_methods.assets_sha256("unet") == assets
    (copy / "pickscore" / "fit_report.json").write_text("{}")
    assert toy_methods.assets_sha256("unet") != assets


def test_a_run_made_again_drops_its_earlier_judgement_on_its_train_prompts(tmp_path, monkeypatch):
    """--on-train-prompts kept a run's train-prompts report when the run itself was made again (other settings or
    recipe), and tabled the earlier model's figures as the new run's."""
    toy_methods = toy_methods_module()
    made = []

    def run_demo(run_dir, settings):
        made.append(settings.steps)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "report.json").write_text("{}")
    monkeypatch.setattr(toy_methods, "run_demo", run_demo)
    run_dir, shared = tmp_path / "dpo" / "seed-0", tmp_path / "shared"
    settings = toy_methods.DemoSettings(method="grpo", steps=4)
    toy_methods.run_demo_once(run_dir, shared, settings)
    (run_dir / "train-prompts-report.json").write_text("{}")
    (run_dir / "train-prompts-aligned").mkdir()
    toy_methods.run_demo_once(run_dir, shared, settings)  # finished with these settings: read back
    assert made == [4] and (run_dir / "train-prompts-report.json").is_file()
    toy_methods.run_demo_once(run_dir, shared, toy_methods.DemoSettings(method="grpo", steps=8))
    assert made == [4, 8] and not list(run_dir.glob("train-prompts-*"))


def test_the_toy_methods_table_over_seeds(tmp_path):
    """Two training seeds of a few steps, judged on the validation split: one row with each seed's value and the
    two-level interval around their mean. Then toy_errors.py on one of the runs."""
    import json

    done = subprocess.run([sys.executable, "benchmarks/toy_methods.py", "--methods", "dpo", "--seeds", "0", "1",
                           "--split", "val", "--steps", "2", "--prompts", "4", "--images-per-prompt", "2",
                           "--eval-seeds", "2", "--overrides", "train.batch_size=4", "--out", str(tmp_path),
                           "--results", str(tmp_path / "results.jsonl")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert "Toy world, val: validation prompts (for tuning) x 2 evaluation seeds; training seeds 0 1" in table
    seeds = [json.loads((tmp_path / "dpo" / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)]
    assert [r["settings"]["seed"] for r in seeds] == [0, 1] and all(r["oracle_win_rate"]["comparisons"] == 78
                                                                   for r in seeds)
    row = next(line for line in table.splitlines() if line.startswith("| dpo |")).split(" | ")
    mean = (seeds[0]["oracle_win_rate"]["value"] + seeds[1]["oracle_win_rate"]["value"]) / 2
    low, high = (float(v) for v in row[2].split("(")[1].rstrip(")").split("-"))
    assert row[2].startswith(f"{mean:.3f} (") and low <= mean <= high
    assert row[3] == " ".join(f"{r['oracle_win_rate']['value']:.3f}" for r in seeds)
    ties = (seeds[0]["oracle_win_rate_ties_counted"]["value"] + seeds[1]["oracle_win_rate_ties_counted"]["value"]) / 2
    assert row[4].startswith(f"{ties:.3f} (")  # with ties counted, as each run's report counts them
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["settings"]["seed"], r["settings"]["method"], r["win_rate"]) for r in records] == [
        (s, "dpo", r["oracle_win_rate"]["value"]) for s, r in zip((0, 1), seeds)]
    assert sum(len(g) for g in records[0]["gains"].values()) == 78  # every comparison's gain, to recompute from

    # the same runs judged again on the prompts they trained on: the base's and each run's images of them
    again = subprocess.run([sys.executable, "benchmarks/toy_methods.py", "--methods", "dpo", "--seeds", "0", "1",
                            "--split", "val", "--steps", "2", "--prompts", "4", "--images-per-prompt", "2",
                            "--eval-seeds", "2", "--overrides", "train.batch_size=4", "--out", str(tmp_path),
                            "--results", str(tmp_path / "results.jsonl"), "--on-train-prompts"], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (tmp_path / "table.md").read_text() == table  # the held-out (here validation) table is left as it was
    on_train = [json.loads((tmp_path / "dpo" / f"seed-{s}" / "train-prompts-report.json").read_text()) for s in (0, 1)]
    trained_on = [(tmp_path / "dpo" / f"seed-{s}" / "pair-images-prompts.txt").read_text().split("\n")[:-1]
                  for s in (0, 1)]
    assert [r["oracle_win_rate"]["prompts"] for r in on_train] == [len(set(p)) for p in trained_on] == [4, 4]
    for s, prompts in zip((0, 1), trained_on):
        judged = {json.loads(line)["prompt"] for line in
                  (tmp_path / "dpo" / f"seed-{s}" / "train-prompts-comparisons.jsonl").read_text().splitlines()}
        assert judged == set(prompts)
    row = next(line for line in (tmp_path / "table-train-prompts.md").read_text().splitlines()
               if line.startswith("| dpo |")).split(" | ")
    assert row[3] == " ".join(f"{r['oracle_win_rate']['value']:.3f}" for r in on_train)

    # the table again from the records alone, the runs' folders gone: nothing runs
    (tmp_path / "dpo").rename(tmp_path / "gone")
    (tmp_path / "table.md").unlink()
    from_records = subprocess.run(done.args, cwd=ROOT, capture_output=True, text=True)
    assert from_records.returncode == 0, from_records.stderr[-2000:]
    assert (tmp_path / "table.md").read_text() == table and not (tmp_path / "dpo").exists()
    (tmp_path / "gone").rename(tmp_path / "dpo")

    # the oracle's view of a run's pairs: one pair of each prompt's two images
    pairs = subprocess.run([sys.executable, "benchmarks/toy_pairs.py", str(tmp_path / "dpo" / "seed-0")], cwd=ROOT,
                           capture_output=True, text=True)
    assert pairs.returncode == 0, pairs.stdout[-2000:] + pairs.stderr[-2000:]
    assert f"| {tmp_path / 'dpo' / 'seed-0'} | 4 | " in pairs.stdout

    # where the trained model's errors moved: the base's and the run's, per image set and branch, at two timesteps
    errors = subprocess.run([sys.executable, "benchmarks/toy_errors.py", str(tmp_path / "dpo" / "seed-0"), "--pairs",
                             "3", "--timesteps", "100", "600", "--out", str(tmp_path / "errors.md")],
                            cwd=ROOT, capture_output=True, text=True)
    assert errors.returncode == 0, errors.stdout[-2000:] + errors.stderr[-2000:]
    by_model = json.loads((tmp_path / "errors.json").read_text())
    base, trained = by_model["base"], by_model[str(tmp_path / "dpo" / "seed-0")]
    assert set(base) == {"train w", "train l", "val renders", "val base"}
    assert all(set(branches) == {"cond", "uncond", "guided"} and all(len(v) == 2 and 0 < min(v) for v in
                                                                     branches.values()) for branches in base.values())
    assert base["train w"]["cond"] != trained["train w"]["cond"]  # the run's LoRA was applied
    assert len([line for line in (tmp_path / "errors.md").read_text().splitlines() if line.startswith("| ")]) == 26


def test_the_sweep_summary_counts_ties_and_never_picks_a_control(monkeypatch):
    """Hand-made rows: two seeds of one setting, 2 prompts x 2 evaluation seeds each, and a control that scores best."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import toy_sweep

    def row(settings, seed, gains):
        per_prompt = {p: sum((g > 0) + 0.5 * (g == 0) for g in v) / len(v) for p, v in gains.items()}
        return {"method": "mapo", "settings": settings, "seed": seed, "per_prompt": per_prompt, "oracle_gains": gains,
                "val_win_rate": sum(per_prompt.values()) / len(per_prompt), "oracle_gain": 0.0, "proxy_gain": 0.0,
                "diversity": 1.0}
    setting = {"train.lr": 1e-5, "method.beta": 0.5}
    rows = [row(setting, 0, {"a": [0.05, -0.01], "b": [0.001, -0.3]}),
            row(setting, 1, {"a": [0.0, 0.03], "b": [-0.05, 0.019]}),
            row(toy_sweep.CONTROLS["mapo"][0], 0, {"a": [0.1, 0.1], "b": [0.1, 0.1]})]
    s = toy_sweep.summary(rows, "mapo", setting)
    # raw: wins 0.05, 0.001, 0.03, 0.019 and the exact tie 0.0 as half: (4 + 0.5) / 8
    assert s["seeds"] == [0, 1] and s["win_rate"] == pytest.approx(4.5 / 8)
    # under the 0.02 margin: -0.01, 0.001, 0.0, 0.019 are ties; wins 0.05, 0.03; losses -0.3, -0.05
    assert s["ties"] == pytest.approx(4 / 8) and s["with_ties"] == pytest.approx((2 + 4 * 0.5) / 8)
    assert toy_sweep.best_settings(rows, "mapo", 1) == [setting]  # the control scored 1.0 and is not a recipe


def test_the_online_extras_turn_one_knob_from_the_best_grid_setting(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import toy_sweep
    assert toy_sweep.extras("pref_grpo", []) == []  # no grid run yet: nothing to start from
    best = {"train.lr": 1e-4, "online.kl_beta": 0.0}
    # picked by the win rate with ties counted: `barely` wins every comparison by less than the raters' margin
    barely = {"train.lr": 1e-4, "online.kl_beta": 1.0}

    def row(settings, gains, raw):
        return {"method": "pref_grpo", "settings": settings, "seed": 0, "val_win_rate": raw,
                "oracle_gains": {"a": gains}}
    rows = [row(s, [0.05, 0.05, -0.05] if s == best else [0.01] * 3 if s == barely else [0.05, -0.05], 0.6
                if s == best else 1.0 if s == barely else 0.5) for s in toy_sweep.grid("pref_grpo")]
    rows.append(row({"online.clip_range": 1.0}, [0.1] * 3, 0.9))
    extras = toy_sweep.extras("pref_grpo", rows)  # the last row is not a grid setting: not a starting point
    assert extras[0] == {**best, "online.clip_range": 1e-5} and len(extras) == 4
    assert all({k: e[k] for k in best} == best for e in extras)
    assert toy_sweep.best_settings(rows, "pref_grpo", 1) == [best]


def test_a_sweep_line_of_an_edited_recipe_is_not_read_back(tmp_path, monkeypatch):
    """Sweep lines were read back by method, settings and seed alone: a recipe edited since (the overrides' base)
    still counted its old lines as its own. A line now keeps its recipe's digest; lines from before it have none."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import toy_sweep
    now = toy_sweep.recipe_sha256("pref_grpo", "unet")
    lines = [{"method": "pref_grpo", "settings": {}, "seed": 0, **extra}
             for extra in ({"recipe_sha256": now}, {"recipe_sha256": "an earlier recipe"}, {})]
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert toy_sweep.read_results(path) == [lines[0], lines[2]]


def test_a_sweep_run_is_claimed_by_one_process(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from toy_sweep import claim
    lock = tmp_path / "run" / "seed-0.lock"
    with claim(lock) as first:
        assert first and lock.read_text() == str(os.getpid())
        with claim(lock) as second:  # held by a live process: this one
            assert not second
    assert not lock.exists()
    lock.write_text("999999999")  # a pid no process has: a claim left by a process that died
    with claim(lock) as taken_over:
        assert taken_over


def test_the_memory_table_counts_the_published_architectures(tmp_path, monkeypatch):
    """The config-only pipelines of memory_table.py give the parameter counts the published checkpoints have
    (SD1.5 UNet 859,520,964; SD2.1 865,910,724; SDXL 2,567,463,684; their VAE 83,653,863; CLIP ViT-L 123,060,480,
    OpenCLIP ViT-H (23 layers) 340,387,840, ViT-bigG with projection 694,659,840; SD3.5-medium's transformer
    2,469,663,936 less its 226,492,416-element position buffer, FLUX.1-dev's 11,901,408,320, the 16-channel VAE
    without quant convs 83,819,683, T5-v1.1-XXL's encoder 4,762,310,656, CLIP ViT-L with projection 123,650,304;
    the online recipes' PickScore, CLIP ViT-H/14, 986,109,441 as open_clip's ViT-H-14 that HPS loads), and SDXL's
    DPO recipe, counted as the planner counts it, needs three fsdp2 processes on a 24 GB card. The planner's fake
    forwards through a full-size model take most of a minute on these CPUs, so they run for that recipe only; the
    other architectures are counted as the planner builds them (`pipeline_on_meta`)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from memory_table import config_only_pipeline, pickscore_config, sdxl_fp16_fix_vae

    from diffusion_align.rewards import SCORERS

    from diffusion_align.config import load_config
    from diffusion_align.training.memory import count_models, pipeline_on_meta, plan
    t5_xxl = 4_762_310_656
    expected = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd21": (865_910_724, 83_653_863, 340_387_840),
                "sdxl": (2_567_463_684, 83_653_863, 123_060_480 + 694_659_840),
                "sd35": (2_469_663_936 - 226_492_416, 83_819_683, 123_650_304 + 694_659_840 + t5_xxl),
                "flux": (11_901_408_320, 83_819_683, 123_060_480 + t5_xxl)}

    def numel(*modules):
        return sum(p.numel() for module in modules for p in module.parameters())
    folders = {arch: config_only_pipeline(tmp_path, arch) for arch in expected}
    for arch, (denoiser, vae, text) in expected.items():
        meta = pipeline_on_meta(load_config(None, [f"model.pretrained={folders[arch]}"]))
        assert (numel(meta.denoiser), numel(meta.vae), numel(*meta.text_encoders)) == (denoiser, vae, text), arch
    (pickscore,) = SCORERS["pickscore"].models_on_meta("pickscore", str(pickscore_config(tmp_path)))
    (hps,) = SCORERS["hpsv2"].models_on_meta("hpsv2", None)
    assert numel(pickscore) == numel(hps) == 986_109_441
    sdxl_dpo = load_config(ROOT / "configs" / "sdxl" / "dpo.yaml", [f"model.pretrained={folders['sdxl']}",
                                                                    f"model.vae={sdxl_fp16_fix_vae(tmp_path)}"])
    counts = count_models(sdxl_dpo)
    assert (counts.denoiser, counts.vae, counts.text_encoders) == expected["sdxl"]
    result = plan(sdxl_dpo, gpu_memory_gb=24, counts=counts)
    # sharded, it trains with AdamW (8 bytes a parameter, not the recipe's Adafactor): 3 processes of 24 GB
    assert (result.fits, result.fsdp2_processes) == (False, 3)


def test_every_online_extra_is_a_config_the_online_loop_accepts(monkeypatch):
    """Half the prompts per step left 16 images for 2 updates of 16-image micro-batches: the sweep stopped there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import toy_sweep
    from diffusion_align.config import load_config
    from diffusion_align.training.online import check_online_config
    for method, recipe in (("pref_grpo", "pref-grpo"), ("grpo", "grpo")):
        for settings in toy_sweep.grid(method)[:1]:
            for knob in toy_sweep.AROUND_BEST[method]:
                overrides = [f"{k}={v}" for k, v in {**settings, **knob}.items()]
                check_online_config(load_config(ROOT / "configs" / "toy" / f"{recipe}.yaml", overrides))


def test_the_reward_signal_of_a_hand_made_group(monkeypatch):
    """One group of two: advantages +1 / -1, oracle 0.9 / 0.3 (the second image failed), proxy 2 / 0. A step moves
    the oracle by mean(A * (o - mean o)) = (0.3 + 0.3) / 2 and the proxy by (1 + 1) / 2."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import torch
    from toy_rewards import signal

    s = signal(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.9, 0.3]]), torch.tensor([[2.0, 0.0]]))
    assert s["oracle"] == pytest.approx(0.3) and s["proxy"] == pytest.approx(1.0)
    assert s["ratio"] == pytest.approx(0.3) and s["corr"] == pytest.approx(1.0)
    assert s["failed_advantage"] == -1.0 and s["mixed_groups"] == 1


def test_style_pairs_prefer_the_worlds_render_of_each_model_image(tmp_path, monkeypatch):
    """Each image of a generated folder is paired with a render of its prompt's scene, which wins on its drawn side:
    the model's image kept byte for byte, the render one the oracle scores as correct."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image
    from toy_style_pairs import style_pairs

    from diffusion_align.toy.oracle import judge

    prompts = ["a small red circle on the left, white background", "a large blue square on the right, gray background"]
    records = []
    for i, prompt in enumerate(prompts * 3):
        name = f"p{i % 2:04d}-s{i // 2:04d}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / name)
        records.append({"file_name": name, "prompt": prompt, "seed": i // 2, "prompt_index": i % 2})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = pq.read_table(style_pairs(tmp_path, tmp_path / "out" / "pairs.parquet", seed=0)).to_pylist()
    assert [row["caption"] for row in table] == [r["prompt"] for r in records]
    sides = [row["label_0"] for row in table]
    assert 0.0 in sides and 1.0 in sides  # the render is not always on one side
    for row, record in zip(table, records):
        assert row["label_0"] + row["label_1"] == 1.0
        render, model_image = (row["jpg_0"], row["jpg_1"]) if row["label_0"] else (row["jpg_1"], row["jpg_0"])
        assert model_image == (tmp_path / record["file_name"]).read_bytes()
        assert judge(Image.open(io.BytesIO(render)), row["caption"])["oracle"] > 0.9
