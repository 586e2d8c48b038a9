"""Memory per process of a full DPO fine-tune on 2 CPU processes (torchrun, gloo), data-parallel against FSDP2.

    .venv/bin/python benchmarks/sharded_memory.py --arch tiny
    .venv/bin/python benchmarks/sharded_memory.py --arch sd15 --resolution 256 --precision bf16 --limit-gb 23

Each run is `diffusion-align train configs/tiny/dpo.yaml` (a full fine-tune, one pair per process) on the
architecture (tiny, or SD1.5's with random weights: benchmarks/train_throughput.py's build_world), with
train.sharding=none and then fsdp2. Reported per process: the model states the run logs (metrics.jsonl
model_states_gib: weights, gradients, Adam moments and the reference copy this process holds) and the peak resident
memory of each process (by rank), polled: to the end of the set-up (the models loaded and sharded), and in all.
Each process may allocate --limit-gb / 2 (RLIMIT_DATA, which its allocations count against as they are made), so a
run that would not fit fails with an allocation error, reported with the memory it had reached, instead of meeting
the kernel's OOM killer (polling alone is too slow: a step's allocations come within a second). Run it with nothing
else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
           "data.num_workers=0", f"train.sharding={strategy}", "data.random_flip=no",
           f"train.mixed_precision={args.precision}"]
    per_process = int(args.limit_gb * GIB / 2)
    log_path = work / f"{strategy}.log"
    # glibc raises its mmap threshold as large blocks are freed, after which FSDP2's gathered blocks come from the
    # heap and their memory stays with the process: a fixed threshold returns them (SD1.5: the first optimiser step
    # failed without it). The limit is inherited by the processes torchrun starts.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
    with log_path.open("w") as log:
        launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: (
            resource.setrlimit(resource.RLIMIT_DATA, (per_process, per_process))))
    peaks, set_up = {}, None
    while launcher.poll() is None:
        for rank, rss in launcher_children(launcher.pid).items():
            peaks[rank] = max(peaks.get(rank, 0), rss)
        if set_up is None and SET_UP_DONE in log_path.read_text():
            set_up = dict(peaks)
        time.sleep(0.1)
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    stopped_at = None
    if launcher.returncode:
        if "can't allocate memory" not in log_path.read_text():
            raise RuntimeError(f"{strategy}: exit {launcher.returncode}; see {log_path}")
        stopped_at = sum(peaks.values()) / GIB
    return {"strategy": strategy, "steps": len(records), "stopped_at_gb": stopped_at,
            "model_states_gib": records[-1]["model_states_gib"] if records else None,
            "peak_rss_gib": [peaks[rank] / GIB for rank in sorted(peaks)],
            "set_up_rss_gib": [set_up[rank] / GIB for rank in sorted(set_up)] if set_up else None}


SET_UP_DONE = "trainable parameters"  # the line run.set_up_models logs once the models are loaded (and sharded)


def launcher_children(pid: int) -> dict[int, int]:
    """The training processes torchrun started (its Python children), by rank, with their resident bytes now."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return {}
    rss = {}
    for child in children:
        try:
            rank = child.environ().get("RANK")
            if rank is not None:
                rss[int(rank)] = child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", choices=("no", "bf16"), default="no", help="train.mixed_precision (bf16: "
                        "the reference copy and encoders in bf16, the trained weights and Adam moments in fp32)")
    parser.add_argument("--limit-gb", type=float, default=21.0, help="what the two processes may allocate in all")
    parser.add_argument("--strategies", nargs="+", default=["none", "fsdp2"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, pairs = build_world(work, args.arch, args.resolution, num_pairs=4)
        rows = [run(strategy, model, pairs, work, args) for strategy in args.strategies]
    print("| arch | strategy | steps done | model states per process (GiB) | peak RSS at the end of set-up, rank 0 1 "
          "(GiB) | peak RSS in all, rank 0 1 (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        states = "" if r["model_states_gib"] is None else f"{r['model_states_gib']:.4g}"
        done = (f"{r['steps']} (allocation failed at {r['stopped_at_gb']:.1f} GiB in all)" if r['stopped_at_gb']
                else r['steps'])
        print(f"| {args.arch} {args.resolution} px {args.precision} | {r['strategy']} | {done} | {states} | "
              f"{' '.join(f'{v:.3g}' for v in r['set_up_rss_gib'] or [])} | "
              f"{' '.join(f'{v:.3g}' for v in r['peak_rss_gib'])} |")


if __name__ == "__main__":
    main()
