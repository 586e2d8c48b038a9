"""Memory per process of a full DPO fine-tune on 2 CPU processes (torchrun, gloo), data-parallel against FSDP2.

    .venv/bin/python benchmarks/sharded_memory.py --arch tiny
    .venv/bin/python benchmarks/sharded_memory.py --arch sd15 --resolution 256 --limit-gb 21

Each run is `diffusion-align train configs/tiny/dpo.yaml` (a full fine-tune, one pair per process, fp32) on the
architecture (tiny, or SD1.5's with random weights: benchmarks/train_throughput.py's build_world), with
train.sharding=none and then fsdp2. Reported per process: the model states the run logs (metrics.jsonl
model_states_gib: weights, gradients, Adam moments and the reference copy this process holds) and the peak resident
memory of each process, polled. A run whose processes together pass --limit-gb is stopped there (the machine has
24 GB; a run that would not fit is reported as stopped, with the memory it had reached, instead of being left to
the kernel's OOM killer). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from train_throughput import CONFIG, build_world

GIB = 2 ** 30


def run(strategy: str, model: Path, pairs: Path, work: Path, args) -> dict:
    out = work / f"run-{strategy}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + len(strategy)), "-m", "diffusion_align", "train", str(CONFIG), f"model.pretrained={model}",
           f"data.path={pairs}", f"train.output_dir={out}", "model.lora_rank=null", "train.lr=1e-5",
           f"train.resolution={args.resolution}", "train.batch_size=1", "train.grad_accum=1",
           f"train.max_steps={args.steps}", "train.checkpoint_every=0", "train.report_to=none", "train.log_every=1",
           "data.num_workers=0", f"train.sharding={strategy}", "data.random_flip=no"]
    with (work / f"{strategy}.log").open("w") as log:
        launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peaks, stopped_at = {}, None
    while launcher.poll() is None:
        workers = launcher_children(launcher.pid)
        for pid, rss in workers.items():
            peaks[pid] = max(peaks.get(pid, 0), rss)
        if sum(workers.values()) > args.limit_gb * GIB:
            stopped_at = sum(workers.values()) / GIB
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
            break
        time.sleep(0.2)
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if stopped_at is None and launcher.returncode:
        raise RuntimeError(f"{strategy}: exit {launcher.returncode}; see {work / f'{strategy}.log'}")
    return {"strategy": strategy, "steps": len(records), "stopped_at_gb": stopped_at,
            "model_states_gib": records[-1]["model_states_gib"] if records else None,
            "peak_rss_gib": sorted(v / GIB for v in peaks.values())}


def launcher_children(pid: int) -> dict[int, int]:
    """The training processes torchrun started (its Python children), with their resident bytes now."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    rss = {}
    for child in children:
        try:
            rss[child.pid] = child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--limit-gb", type=float, default=21.0, help="stop a run whose processes pass this in all")
    parser.add_argument("--strategies", nargs="+", default=["none", "fsdp2"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, pairs = build_world(work, args.arch, args.resolution, num_pairs=4)
        rows = [run(strategy, model, pairs, work, args) for strategy in args.strategies]
    print(f"| arch | strategy | steps done | model states per process (GiB) | peak RSS per process (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        states = "" if r["model_states_gib"] is None else f"{r['model_states_gib']:.4g}"
        done = f"{r['steps']} (stopped at {r['stopped_at_gb']:.1f} GB in all)" if r["stopped_at_gb"] else r["steps"]
        print(f"| {args.arch} {args.resolution} px | {r['strategy']} | {done} | {states} | "
              f"{' '.join(f'{v:.3g}' for v in r['peak_rss_gib'])} |")


if __name__ == "__main__":
    main()
