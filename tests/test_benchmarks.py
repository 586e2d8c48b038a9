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
