"""Two CPU processes (torchrun, gloo) train together and end with identical weights."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY_CONFIG = Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"


def test_two_processes_hold_identical_weights(tmp_path, tiny_models, tiny_pairs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(Path(__file__).parent / "distributed_worker.py"), str(TINY_CONFIG), str(tmp_path),
           f"model.pretrained={tiny_models['sd']}", f"data.path={tiny_pairs}", f"train.output_dir={tmp_path / 'run'}",
           "train.max_steps=4", "train.batch_size=2", "train.grad_accum=2", "train.checkpoint_every=2",
           "train.report_to=none", "data.num_workers=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "effective batch 8 = 2 processes x 2 pairs x 2 accumulation" in proc.stderr
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k), "the adapters were trained"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once, by the main process
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()) == [
        "lr_scheduler.pt", "optimizer.pt", "process_0.pt", "process_1.pt", "pytorch_lora_weights.safetensors",
        "trainer_state.json"]
