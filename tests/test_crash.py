"""A real `diffusion-align train` process killed with SIGKILL at a random step (mid-step, mid-checkpoint, wherever
it is), then resumed with train.resume=latest, ends with the weights of a run that was never interrupted: LoRA and
full fine-tunes of an offline method, Pref-GRPO, and sharded full fine-tunes (FSDP2, ZeRO-2) on two processes (all
killed at once, as when a machine dies)."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from test_train import TINY_CONFIG

STEPS = 8
CASES = {
    "dpo-lora": ["method.name=dpo", "model.lora_rank=4"],
    "dpo-full": ["method.name=dpo", "model.lora_rank=null", "train.lr=1e-4"],
    "pref_grpo-lora": ["method.name=pref_grpo", "model.lora_rank=4", "online.group_size=4",
                       "online.prompts_per_step=2", "online.sample_steps=4", "train.lr=1e-2"],
    "dpo-full-fsdp2": ["method.name=dpo", "model.lora_rank=null", "train.lr=1e-4", "train.sharding=fsdp2"],
    "dpo-full-zero2": ["method.name=dpo", "model.lora_rank=null", "train.lr=1e-4", "train.sharding=zero2"],
}
PORTS = iter(range(29540, 29600))  # a fresh rendezvous port for every two-process launch


def command(case: str, out: Path, models: dict, pairs: Path, prompts: Path, scorer: Path, *extra) -> list[str]:
    data = ([f"online.prompts={prompts}", f"online.reward=pickscore={scorer}"] if case.startswith("pref_grpo")
            else [f"data.path={pairs}", "data.random_flip=image", "data.prompt_dropout=0.3"])
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(next(PORTS)), "-m"] if case.endswith(("fsdp2", "zero2")) else [sys.executable, "-m"])
    return [*launcher, "diffusion_align", "train", str(TINY_CONFIG), f"model.pretrained={models['sd']}",
            f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.checkpoint_every=1", "train.batch_size=2",
            "train.grad_accum=1", "train.warmup_steps=0", "train.report_to=none", "data.num_workers=0",
            "train.resolution=32", *CASES[case], *data, *extra]


def steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}"))


def final_weights(out: Path) -> dict:
    final = out / "final"
    path = final / "pytorch_lora_weights.safetensors"
    return load_file(path if path.is_file() else final / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def online_inputs(tmp_path_factory):
    from diffusion_align.rewards.tiny import save_tiny_scorer
    root = tmp_path_factory.mktemp("crash")
    (root / "prompts.txt").write_text("a red circle\na green square\na blue triangle\n")
    return root / "prompts.txt", save_tiny_scorer("pickscore", root / "pickscore")


# the default run kills a LoRA run and an FSDP2 run of two processes; the others write their checkpoints through
# the same temporary folder and rename, and are slow (pytest -m slow)
SLOW = {"dpo-full", "pref_grpo-lora", "dpo-full-zero2"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path, tiny_models, tiny_pairs, online_inputs,
                                                                    case):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    inputs = (tiny_models, tiny_pairs, *online_inputs)
    whole = subprocess.run(command(case, tmp_path / "whole", *inputs), env=env, check=True, capture_output=True,
                           text=True)
    if case.endswith(("fsdp2", "zero2")):  # the command line under torchrun: one run of two processes, not two of one
        assert f"{case.rsplit('-', 1)[1]} over 2 processes" in whole.stderr

    seed = random.randrange(10**6)
    kill_after = random.Random(seed).randint(1, STEPS - 3)  # the step whose log line is seen; it dies soon after
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(case, killed, *inputs), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while steps_logged(killed) < kill_after and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed + 1).uniform(0, 0.2))  # anywhere in the next step or its checkpoint
    # the launcher and every process it started: torchrun's workers sit in process groups of their own, and
    # outlive their launcher, training on, unless each is killed
    family = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(family, timeout=60)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed (seed {seed})"
    assert not (killed / "final").exists()

    resumed = subprocess.run(command(case, killed, *inputs, "train.resume=latest"), env=env, capture_output=True,
                             timeout=600,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_weights(tmp_path / "whole"), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed after step {kill_after} (seed {seed})"
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "each step logged once"
