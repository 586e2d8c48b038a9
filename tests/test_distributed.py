"""Two CPU processes (torchrun, gloo) train together: they end with identical weights, and each reads its own half
of every global batch (online: samples its own groups, from its own noise, and z-scores them with the std of
every process's rewards where online.advantage_std=global)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_align.config import load_config
from diffusion_align.training import trainer
from distributed_worker import record_batches

TINY_CONFIG = Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"


def test_two_processes_hold_identical_weights(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    common = [f"model.pretrained={tiny_models['sd']}", f"data.path={tiny_pairs}", "train.max_steps=4",
              "train.grad_accum=2", "train.report_to=none", "data.num_workers=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(Path(__file__).parent / "distributed_worker.py"), str(TINY_CONFIG), str(tmp_path), *common,
           f"train.output_dir={tmp_path / 'run'}", "train.batch_size=2", "train.checkpoint_every=2",
           "train.process_timeout=7.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "effective batch 8 = 2 processes x 2 pairs x 2 accumulation" in proc.stderr
    # the process group lets a collective wait train.process_timeout minutes (while rank 0 alone makes a cache)
    assert [(tmp_path / f"rank{r}-timeout.txt").read_text() for r in (0, 1)] == ["[450.0]", "[450.0]"]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k), "the adapters were trained"
    # DDP wrapped the UNet with its gradients as views of the all-reduce buckets (one copy of them, as planned)
    assert [json.loads((tmp_path / f"rank{r}-ddp.json").read_text()) for r in (0, 1)] == [[True], [True]]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once, by the main process
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()) == [
        "config.yaml", "kohya_lora.safetensors", "lr_scheduler.pt", "optimizer.pt", "process_0.pt", "process_1.pt",
        "pytorch_lora_weights.safetensors", "trainer_state.json"]

    # the ranks read disjoint halves of each global batch, and together the pairs one process reads with the same
    # global batch (2 processes x 2 pairs = 1 process x 4 pairs)
    single = []
    monkeypatch.setattr(trainer, "make_pair_loader", trainer.make_pair_loader)  # restored after the test
    record_batches(single)
    trainer.train(load_config(TINY_CONFIG, [*common, f"train.output_dir={tmp_path / 'single'}", "train.batch_size=4",
                                            "train.checkpoint_every=0"]))
    ranks = [json.loads((tmp_path / f"rank{r}-batches.json").read_text()) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 8  # 4 steps x 2 micro-batches
    for whole, half_0, half_1 in zip(single, *ranks):
        assert len(half_0) == len(half_1) == 2 and not set(half_0) & set(half_1)
        assert sorted(half_0 + half_1) == sorted(whole)


def test_two_processes_sample_their_own_groups_online(tmp_path, tiny_models):
    from diffusion_align.rewards.tiny import save_tiny_scorer
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {c} circle\n" for c in ("red", "green", "blue", "yellow", "purple", "orange")))
    scorer = save_tiny_scorer("pickscore", tmp_path / "pickscore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           str(Path(__file__).parent / "distributed_worker.py"), str(TINY_CONFIG), str(tmp_path),
           "method.name=pref_grpo", f"model.pretrained={tiny_models['sd']}", f"online.prompts={prompts}",
           f"online.reward=pickscore={scorer}", "online.group_size=4", "online.prompts_per_step=1",
           "online.sample_steps=3", "train.batch_size=2", "train.max_steps=2", "train.report_to=none",
           f"train.output_dir={tmp_path / 'run'}", "train.checkpoint_every=0", "train.warmup_steps=0",
           "train.grad_accum=1", "online.advantage_std=global"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k), "the adapters were trained"
    steps = [json.loads((tmp_path / f"rank{r}-batches.json").read_text()) for r in (0, 1)]
    assert len(steps[0]) == len(steps[1]) == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    for mine, theirs, record in zip(*steps, logged):  # the spread over both processes' samples, not a mean of two
        assert record["reward_std"] == pytest.approx(torch.tensor(mine["rewards"] + theirs["rewards"]).std().item(),
                                                     rel=1e-5)
    for mine, theirs in zip(*steps):
        assert len(mine["prompts"]) == 1 and mine["prompts"] != theirs["prompts"]  # whole groups, one rank each
        noise = [tuple(x) for x in mine["noise"] + theirs["noise"]]
        assert len(noise) == 8 and len(set(noise)) == 8  # every image of every group starts from its own noise
        # online.advantage_std=global: one std, the population std of both processes' rewards
        every = torch.tensor(mine["rewards"] + theirs["rewards"])
        assert mine["shared_std"] == theirs["shared_std"] == pytest.approx(every.std(correction=0).item(), rel=1e-6)
        assert mine["shared_std"] != pytest.approx(torch.tensor(mine["rewards"]).std(correction=0).item(), rel=1e-3)
