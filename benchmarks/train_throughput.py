"""Training throughput and peak memory of our trainer in each mode, side by side with the diffusers research
LoRA-DPO script, at equal settings (pipeline, data, pairs per step, resolution, LoRA rank, no flips, centre crop,
fp32, DataLoader workers).

    .venv/bin/python benchmarks/train_throughput.py                             # the tiny pipeline, 32 px
    .venv/bin/python benchmarks/train_throughput.py --arch sd15                 # SD1.5's architecture, random, 256 px
    .venv/bin/python benchmarks/train_throughput.py --diffusers-script PATH/train_diffusion_dpo.py
    .venv/bin/python benchmarks/train_throughput.py --sweep                     # step cost by batch size, resolution

Every configuration runs as its own process twice, for n1 and n2 steps; its time per step is
(T(n2) - T(n1)) / (n2 - n1), so start-up (imports, loading, building the cache, precomputing reference errors)
cancels, and is reported apart as set-up seconds. The latent cache is built once before the timed runs; each run
precomputes its own reference errors. Peak memory is the training process's peak RSS (and peak CUDA allocation on a
GPU) over its n2 run. The table gives ratios, which compare within one run even on a noisy machine: run it with
nothing else on the machine. The diffusers script is read from the path given (it is not ours to ship); it imports
wandb at the top, so `pip install wandb` first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny" / "dpo.yaml"
MARK = "THROUGHPUT-PEAK "
# SD1.5's published VAE and text encoder configs (stable-diffusion-v1-5 vae/config.json, text_encoder/config.json);
# its UNet's is assets/unet-configs/sd15-unet.json.
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
                sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


@dataclass(frozen=True)
class Row:
    name: str
    method: str = "dpo"
    lora: bool = True
    cache: bool = False
    precomputed: bool = False


ROWS = [
    Row("dpo lora"), Row("dpo lora, cache", cache=True), Row("dpo lora, cache + precomputed ref", cache=True,
                                                             precomputed=True),
    Row("dpo full", lora=False), Row("dpo full, cache", lora=False, cache=True),
    Row("dpo full, precomputed ref", lora=False, precomputed=True),
    Row("dpo full, cache + precomputed ref", lora=False, cache=True, precomputed=True),
    Row("mapo lora", "mapo"), Row("mapo lora, cache", "mapo", cache=True),
    Row("sft full", "sft", lora=False), Row("sft full, cache", "sft", lora=False, cache=True),
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def measure(target: str, argv: list[str]) -> None:
    """Child process: run a script (path) or module in-process, then print its peak memory."""
    sys.argv = [target, *argv]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    peak = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(MARK + json.dumps(peak), flush=True)


def timed(target: str, argv: list[str], log: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, __file__, "measure", target, *argv], stdout=subprocess.PIPE,
                              stderr=out, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{target} {' '.join(argv[:3])} ... failed (exit {done.returncode}); see {log}")
    peak = next(json.loads(line[len(MARK):]) for line in done.stdout.splitlines() if line.startswith(MARK))
    return seconds, peak


def build_world(work: Path, arch: str, resolution: int, num_pairs: int) -> tuple[Path, Path]:
    """The pipeline (tiny, or SD1.5's architecture with random weights) and Pick-a-Pic-style pairs."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_align.models.tiny import save_tiny_pipeline, write_tiny_pairs
    pairs = write_tiny_pairs(work / "pairs" / "train.parquet", num_pairs=num_pairs, resolution=resolution * 5 // 4)
    model = save_tiny_pipeline(work / "tiny-sd", "sd")
    if arch == "sd15":
        pipe = DiffusionPipeline.from_pretrained(model)
        text = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), **SD15_TEXT})
        pipe.text_encoder = CLIPTextModel(text)
        pipe.vae = AutoencoderKL(**SD15_VAE)
        pipe.unet = UNet2DConditionModel.from_config(json.loads((ROOT / "assets/unet-configs/sd15-unet.json")
                                                                .read_text()))
        model = work / "sd15-random"
        pipe.save_pretrained(model, safe_serialization=True)
    return model, pairs


def ours(row: Row, model: Path, pairs: Path, work: Path, args, steps: int) -> list[str]:
    cache_dir = work / "cache"
    run_dir = work / "runs" / f"{slug(row.name)}-{steps}"  # each run its own folder: nothing carried between them
    overrides = [f"model.pretrained={model}", f"data.path={pairs}", f"train.output_dir={run_dir}",
                 f"method.name={row.method}", f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
                 "train.grad_accum=1", f"train.resolution={args.resolution}", "train.warmup_steps=0",
                 "train.checkpoint_every=0", "train.report_to=tensorboard", "data.random_flip=no",
                 f"data.num_workers={args.workers}", "train.mixed_precision=no",
                 f"model.lora_rank={args.rank if row.lora else 'null'}", f"data.cache={str(row.cache).lower()}",
                 f"data.cache_dir={cache_dir}", f"method.precomputed_reference={str(row.precomputed).lower()}"]
    return ["train", str(CONFIG), *overrides]


def diffusers_script(script: str, model: Path, pairs: Path, work: Path, args, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(pairs.parent),
            "--dataset_split_name", "train", "--resolution", str(args.resolution),
            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps), "--rank", str(args.rank),
            "--output_dir", str(work / "runs" / f"diffusers-{steps}"), "--no_hflip", "--checkpointing_steps", "1000000",
            "--lr_warmup_steps", "0", "--mixed_precision", "no", "--seed", "0", "--report_to", "tensorboard",
            "--dataloader_num_workers", str(args.workers)]


def time_row(name: str, target: str, make_argv, work: Path, args, before_each=None) -> dict:
    """One round of one configuration: runs of n1 and n2 steps, their difference per step."""
    times, peaks = [], []
    for steps in (args.n1, args.n2):
        shutil.rmtree(work / "runs", ignore_errors=True)  # every run starts afresh
        if before_each:
            before_each()
        seconds, peak = timed(target, make_argv(steps), work / "logs" / f"{slug(name)}-{steps}.log")
        times.append(seconds)
        peaks.append(peak)
    per_step = (times[1] - times[0]) / (args.n2 - args.n1)
    result = {"row": name, "s_per_step": per_step, "pairs_per_s": args.batch_size / per_step,
              "setup_s": times[0] - args.n1 * per_step, **{f"peak_{k}": v for k, v in peaks[1].items()}}
    print(f"{name:36s} {result['pairs_per_s']:8.2f} pairs/s  {per_step:7.3f} s/step  set-up "
          f"{result['setup_s']:6.1f} s  peak RSS {result['peak_rss_mb']:8.0f} MB", flush=True)
    return result


def run_rows(jobs: list[tuple], work: Path, args) -> list[dict]:
    """Each job (name, target, make_argv, before_each) timed `args.rounds` times, the jobs taking turns, so a slow
    spell of the machine falls on all of them; each keeps its fastest round (as timeit does) and the spread."""
    rounds, failed = {job[0]: [] for job in jobs}, {}
    for round_index in range(args.rounds):
        if args.rounds > 1:
            print(f"-- round {round_index + 1}/{args.rounds}", flush=True)
        for name, target, make_argv, before_each in jobs:
            if name in failed:
                continue
            try:
                rounds[name].append(time_row(name, target, make_argv, work, args, before_each))
            except RuntimeError as err:  # e.g. killed for memory: the other rows still count
                print(f"{name}: {err}", flush=True)
                failed[name] = str(err)
    best = []
    for name, results in rounds.items():
        if name in failed:
            best.append({"row": name, "failed": failed[name]})
            continue
        sound = [r for r in results if r["s_per_step"] > 0]  # T(n2) < T(n1): something else ran; no measurement
        if not sound:
            best.append({"row": name, "failed": "every round was disturbed (T(n2) < T(n1))"})
            continue
        fastest = min(sound, key=lambda r: r["s_per_step"])
        best.append({**fastest, "spread": max(r["s_per_step"] for r in results) / fastest["s_per_step"]})
    return best


def table(results: list[dict], args) -> str:
    by = {r["row"]: r for r in results if "failed" not in r}
    lines = [f"{args.arch} pipeline, {args.resolution} px, {args.batch_size} pairs per step, LoRA rank {args.rank}, "
             f"steps {args.n1} and {args.n2}, fastest of {args.rounds} rounds, {args.workers} DataLoader workers "
             f"(uncached), torch threads "
             f"{torch.get_num_threads()}, {'CUDA' if torch.cuda.is_available() else 'CPU'}", "",
             "| configuration | pairs / s | s / step | slowest / fastest round | set-up s | peak RSS MB |" +
             (" peak CUDA MB |" if torch.cuda.is_available() else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if torch.cuda.is_available() else "")]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['row']} | failed: {r['failed']} |")
            continue
        lines.append(f"| {r['row']} | {r['pairs_per_s']:.2f} | {r['s_per_step']:.3f} | {r['spread']:.2f} | "
                     f"{r['setup_s']:.1f} | {r['peak_rss_mb']:.0f} |" +
                     (f" {r['peak_cuda_mb']:.0f} |" if "peak_cuda_mb" in r else ""))
    memory = "peak_cuda_mb" if torch.cuda.is_available() else "peak_rss_mb"
    ratios = [("dpo lora, cache / dpo lora (pairs/s)", "dpo lora, cache", "dpo lora", "pairs_per_s"),
              ("dpo lora, cache + precomputed ref / diffusers script (pairs/s)", "dpo lora, cache + precomputed ref",
               "diffusers script (lora dpo)", "pairs_per_s"),
              ("dpo lora / diffusers script (pairs/s)", "dpo lora", "diffusers script (lora dpo)", "pairs_per_s"),
              ("mapo lora / dpo lora (pairs/s)", "mapo lora", "dpo lora", "pairs_per_s"),
              ("dpo full, precomputed ref / sft full (peak memory)", "dpo full, precomputed ref", "sft full", memory),
              ("dpo full / sft full (peak memory)", "dpo full", "sft full", memory)]
    lines += ["", "| ratio | value |", "| --- | --- |"]
    lines += [f"| {label} | {by[a][key] / by[b][key]:.2f}x |" for label, a, b, key in ratios if a in by and b in by]
    return "\n".join(lines) + "\n"


def sweep(model: Path, pairs: Path, work: Path, args) -> None:
    """Step time and memory by batch size and resolution, uncached, cached, cached + precomputed: the differences
    are what the encoders and the reference pass cost at each size."""
    rows = [Row("dpo lora"), Row("dpo lora, cache", cache=True),
            Row("dpo lora, cache + precomputed ref", cache=True, precomputed=True)]
    lines = ["| batch | px | uncached s/step | cached | cached + precomputed | encoders share | reference share | "
             "peak RSS MB (uncached) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for batch, resolution in args.sweep_sizes:
        sized = argparse.Namespace(**{**vars(args), "batch_size": batch, "resolution": resolution})
        shutil.rmtree(work / "cache", ignore_errors=True)
        build_cache_once(model, pairs, work, sized)
        out = run_rows([(f"{r.name} b{batch} r{resolution}", "diffusion_align.cli",
                         lambda steps, r=r: ours(r, model, pairs, work, sized, steps), forget_reference(work))
                        for r in rows], work, sized)
        if broken := [o for o in out if "failed" in o]:
            lines.append(f"| {batch} | {resolution} | {broken[0]['row']} failed: {broken[0]['failed']} |")
            continue
        plain, cached, pre = (o["s_per_step"] for o in out)
        lines.append(f"| {batch} | {resolution} | {plain:.3f} | {cached:.3f} | {pre:.3f} | "
                     f"{(plain - cached) / plain:.0%} | {(cached - pre) / plain:.0%} | {out[0]['peak_rss_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    (work / "sweep.md").write_text(text)
    print(text)


def forget_reference(work: Path):
    """Before each run: every run precomputes its own reference errors (their cost is part of its set-up)."""
    return lambda: (work / "cache" / "reference-errors.safetensors").unlink(missing_ok=True)


def build_cache_once(model: Path, pairs: Path, work: Path, args) -> None:
    from diffusion_align.data.cache import build_cache
    build_cache(str(pairs), work / "cache", str(model), resolution=args.resolution, dtype="fp16",
                num_workers=args.workers)  # data.cache_dtype's default


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "measure":
        return measure(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, help="default: 32 (tiny), 256 (sd15)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=384)
    parser.add_argument("--n1", type=int, default=5)
    parser.add_argument("--n2", type=int, default=85, help="n2 x batch size <= pairs: both runs precompute the same "
                                                           "single epoch of reference errors")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers where images are decoded")
    parser.add_argument("--rounds", type=int, default=1, help="time every configuration this many times, taking "
                                                               "turns, and keep each one's fastest")
    parser.add_argument("--rows", nargs="+", help="only these configurations (names as in the table)")
    parser.add_argument("--diffusers-script", help="path to diffusers' examples/research_projects/diffusion_dpo/"
                                                   "train_diffusion_dpo.py")
    parser.add_argument("--sweep", action="store_true", help="the cost growth table instead")
    parser.add_argument("--sweep-sizes", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                        default=[(1, 32), (4, 32), (16, 32), (4, 64), (4, 128)], help="BATCHxPIXELS ...")
    parser.add_argument("--out", default="outputs/throughput")
    args = parser.parse_args()
    args.resolution = args.resolution or (256 if args.arch == "sd15" else 32)
    work = Path(args.out) / args.arch
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    model, pairs = build_world(work, args.arch, args.resolution, args.pairs)
    if args.sweep:
        return sweep(model, pairs, work, args)
    build_cache_once(model, pairs, work, args)
    jobs = [(row.name, "diffusion_align.cli", lambda steps, r=row: ours(r, model, pairs, work, args, steps),
             forget_reference(work)) for row in ROWS if not args.rows or row.name in args.rows]
    if args.diffusers_script:
        if importlib.util.find_spec("wandb") is None:
            print("the diffusers script imports wandb at its top: pip install wandb to time it; skipped")
        else:
            jobs.append(("diffusers script (lora dpo)", args.diffusers_script,
                         lambda steps: diffusers_script(args.diffusers_script, model, pairs, work, args, steps), None))
    results = run_rows(jobs, work, args)
    text = table(results, args)
    (work / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
