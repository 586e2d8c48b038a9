"""The prepared GPU check: real SD1.5 and SDXL architectures (random weights) at 512 / 1024 px take LoRA and full
Diffusion-DPO steps in fp16 and bf16, with and without the latent cache and precomputed reference errors, plus
xformers and 8-bit Adam where they import, and sharded training (train.sharding=fsdp2, full and LoRA, bf16,
torchrun over the GPUs; and zero2, full, where DeepSpeed imports); every step must be finite. Writes s/step and peak
CUDA memory (not of the sharded runs, whose processes are their own) to <out>/gpu_check.md (and .json). Run it
through `benchmarks/gpu_check.sh`, which installs the wheels first.

    python benchmarks/gpu_check.py --out outputs/gpu-check          # on a CUDA GPU, about 6 minutes on an H100
    python benchmarks/gpu_check.py --tiny --out /tmp/check          # the CPU stand-in (tiny pipelines, bf16 only)

Time per step is the median of the logged steps after the first (which pays for CUDA kernels' warm-up).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ROOT, SD15_TEXT, SD15_VAE  # noqa: E402

from diffusion_align.config import load_config  # noqa: E402
from diffusion_align.models.tiny import save_tiny_pipeline, write_tiny_pairs  # noqa: E402
from diffusion_align.training.trainer import train  # noqa: E402

CONFIG = ROOT / "configs" / "tiny" / "dpo.yaml"
# SDXL's published VAE (force_upcast: fp16 overflows it) and text encoders (CLIP ViT-L, OpenCLIP ViT-bigG), from
# stable-diffusion-xl-base-1.0's vae/, text_encoder/ and text_encoder_2/ config.json
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def real_pipeline(work: Path, arch: str) -> Path:
    """SD1.5's or SDXL's full architecture, randomly initialised, around the real CLIP tokenizer."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline(work / f"tiny-{arch}", "sdxl" if arch == "sdxl"
                                                                else "sd"))
    unet = json.loads((ROOT / "assets" / "unet-configs" / f"{arch}-unet.json").read_text())
    pipe.unet = UNet2DConditionModel.from_config(unet)
    pipe.vae = AutoencoderKL(**(SDXL_VAE if arch == "sdxl" else SD15_VAE))
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), **SD15_TEXT}))
    if arch == "sdxl":
        config = CLIPTextConfig(**{**pipe.text_encoder_2.config.to_dict(), **SDXL_TEXT_2})
        pipe.text_encoder_2 = CLIPTextModelWithProjection(config)
    out = work / arch
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def cases(tiny: bool) -> list[dict]:
    precisions = ["bf16"] if tiny else ["fp16", "bf16"]  # fp16 autocast needs CUDA
    found = [dict(precision=p, lora=lora, fast=fast) for p in precisions for lora in (True, False)
             for fast in (False, True)]
    if importlib.util.find_spec("xformers") is not None and not tiny:
        found.append(dict(precision="fp16", lora=True, fast=False, extra=("model.attention=xformers",)))
    if importlib.util.find_spec("bitsandbytes") is not None and not tiny:
        found.append(dict(precision="bf16", lora=False, fast=True, extra=("train.optimizer=adamw8bit",)))
    # FSDP2 (train.sharding) on every GPU there is, in bf16: a full fine-tune and a LoRA, under torchrun; ZeRO-2 full
    found += [dict(precision="bf16", lora=lora, fast=False, sharded="fsdp2") for lora in (False, True)]
    if importlib.util.find_spec("deepspeed") is not None:
        found.append(dict(precision="bf16", lora=False, fast=False, sharded="zero2"))
    return found


def run_case(model: Path, pairs: Path, work: Path, resolution: int, steps: int, case: dict) -> dict:
    sharded = f", {case['sharded']}" if case.get("sharded") else ""
    name = (f"{'lora' if case['lora'] else 'full'} {case['precision']}{sharded}"
            f"{', cache + precomputed ref' if case['fast'] else ''}{', ' + ', '.join(case.get('extra', ())) if case.get('extra') else ''}")
    out = work / "runs" / "".join(c if c.isalnum() else "-" for c in f"{model.name}-{name}")
    overrides = [f"model.pretrained={model}", f"data.path={pairs}", f"train.output_dir={out}",
                 f"train.max_steps={steps}", "train.batch_size=1", "train.grad_accum=1",
                 f"train.resolution={resolution}", "train.warmup_steps=0", "train.checkpoint_every=0",
                 "train.report_to=none", "data.num_workers=2", "data.random_flip=no", "train.lr=1e-6",
                 f"train.mixed_precision={case['precision']}",
                 f"model.lora_rank={8 if case['lora'] else 'null'}", *case.get("extra", ())]
    if case["fast"]:
        overrides += ["data.cache=true", "method.precomputed_reference=true", f"data.cache_dir={out}-cache"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    record = {"arch": model.name, "case": name}
    try:
        if case.get("sharded"):  # sharding runs under a distributed launch: processes of their own
            processes = str(max(torch.cuda.device_count(), 1))
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", processes,
                                   "-m", "diffusion_align", "train", str(CONFIG), *overrides,
                                   f"train.sharding={case['sharded']}"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-200:])
        else:
            train(load_config(CONFIG, overrides))
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        finite = all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in lines)
        per_step = statistics.median(1 / r["pairs_per_s"] for r in lines[1:]) if len(lines) > 1 else float("nan")
        record.update(ok=finite, s_per_step=per_step, why="" if finite else "non-finite loss or gradient")
    except Exception as err:  # one failing case must not hide the others' numbers
        record.update(ok=False, s_per_step=float("nan"), why=f"{type(err).__name__}: {str(err)[:200]}")
    record.update(seconds=time.perf_counter() - started,  # a sharded run's memory is its own processes', not ours
                  peak_mb=torch.cuda.max_memory_allocated() / 2**20
                  if torch.cuda.is_available() and not case.get("sharded") else float("nan"))
    print(f"{record['arch']:10s} {name:50s} {'ok' if record['ok'] else 'FAILED ' + record['why']} "
          f"{record['s_per_step']:.3f} s/step, peak {record['peak_mb']:.0f} MB, {record['seconds']:.0f} s", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/gpu-check")
    parser.add_argument("--tiny", action="store_true", help="tiny pipelines at 32 px: the CPU stand-in")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--archs", nargs="+", default=["sd15", "sdxl"], choices=("sd15", "sdxl"))
    args = parser.parse_args()
    work = Path(args.out)
    shutil.rmtree(work / "runs", ignore_errors=True)  # runs and caches of an earlier check (its pairs are rewritten)
    work.mkdir(parents=True, exist_ok=True)
    started, records = time.perf_counter(), []
    for arch in args.archs:
        resolution = 32 if args.tiny else {"sd15": 512, "sdxl": 1024}[arch]
        model = (save_tiny_pipeline(work / arch, "sdxl" if arch == "sdxl" else "sd") if args.tiny
                 else real_pipeline(work, arch))
        pairs = write_tiny_pairs(work / f"pairs-{arch}.parquet", num_pairs=8, resolution=resolution)
        records += [run_case(model, pairs, work, resolution, args.steps, case) for case in cases(args.tiny)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [f"{device}, torch {torch.__version__}, {args.steps} steps of 1 pair each, "
             f"{time.perf_counter() - started:.0f} s in all", "",
             "| arch | case | finite | s / step | peak CUDA MB |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | {r['case']} | {'yes' if r['ok'] else 'NO: ' + r['why']} | {r['s_per_step']:.3f} | "
              f"{r['peak_mb']:.0f} |" for r in records]
    (work / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (work / "gpu_check.json").write_text(json.dumps(records, indent=2) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
    main()
