"""The benchmark scripts run: the GPU check on its CPU stand-in, the throughput table on a few tiny rows."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_gpu_check_runs_on_its_cpu_stand_in(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--steps", "2", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in (tmp_path / "gpu_check.md").read_text().splitlines() if line.startswith("| sd")]
    # per architecture: LoRA and full, each plain and with cache + precomputed reference (bf16: fp16 needs CUDA)
    assert len(rows) == 8 and all("| yes |" in row for row in rows)
    assert sum("cache + precomputed ref" in row for row in rows) == 4


def test_the_throughput_table(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--rows", "dpo lora",
                           "dpo lora, cache + precomputed ref", "--n1", "1", "--n2", "2", "--pairs", "16",
                           "--workers", "0", "--rounds", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "tiny" / "table.md").read_text()
    assert "| dpo lora | " in table and "| dpo lora, cache + precomputed ref | " in table
    assert "fastest of 2 rounds" in table and "slowest / fastest round" in table


def test_the_toy_methods_table_over_seeds(tmp_path):
    """Two training seeds of a few steps, judged on the validation split: one row with each seed's value and the
    two-level interval around their mean."""
    import json

    done = subprocess.run([sys.executable, "benchmarks/toy_methods.py", "--methods", "dpo", "--seeds", "0", "1",
                           "--split", "val", "--steps", "2", "--prompts", "4", "--images-per-prompt", "2",
                           "--eval-seeds", "2", "--overrides", "train.batch_size=4", "--out", str(tmp_path)],
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
