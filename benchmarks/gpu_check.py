"""The prepared GPU check: real SD1.5 and SDXL architectures (random weights) at 512 / 1024 px take LoRA and full
Diffusion-DPO steps in fp16 and bf16, with and without the latent cache and precomputed reference errors, plus
xformers and 8-bit Adam where they import, and sharded training (train.sharding=fsdp2, full and LoRA, and
fsdp2-offload, full, in bf16, torchrun over the GPUs, writing a checkpoint every step; and zero2, full, where DeepSpeed
imports); then the flow transformers at 512 px,
SD3.5-medium's (bf16 LoRA with and without the cache and precomputed reference, bf16 full, fp16 LoRA as flow_grpo
trains it) and FLUX.1-dev's (bf16 LoRA with and without them), with the real VAE layout and CLIPs and a T5 of
T5-XXL's width in 2 layers; and on every architecture the online loop (GRPO's LoRA with Flow-GRPO's global std:
rollout, reward and update on the GPU); every step must be finite. Writes s/step and peak CUDA memory (not of the
sharded runs, whose processes are their own) to <out>/gpu_check.md (and .json) after every case. Run it through
`benchmarks/gpu_check.sh`, which installs the wheels first.

    python benchmarks/gpu_check.py --out outputs/gpu-check          # on a CUDA GPU (an H200's: benchmarks/README.md)
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
from diffusion_align.models.tiny_flow import save_tiny_flow_pipeline  # noqa: E402
from diffusion_align.training.memory import count_models, memory_bytes  # noqa: E402
from diffusion_align.training.trainer import make_latent_cache, train  # noqa: E402

CONFIG = ROOT / "configs" / "tiny" / "dpo.yaml"
ONLINE_CONFIG = ROOT / "configs" / "tiny" / "pref-grpo.yaml"
# the online case: GRPO, rewarded by a tiny random PickScore, with Flow-GRPO's global std (the SD3.5 and FLUX GRPO
# recipes'), one group of 2 images of 4 sampling steps a step: rollout, scoring and update all on the GPU
ONLINE = ("method.name=grpo", "online.advantage_std=global", "online.group_size=2", "online.prompts_per_step=1",
          "online.sample_steps=4")
# fp16's loss scaler starts at 2^16 and halves on every step whose scaled gradient overflows, skipping it: a full
# fine-tune of SD1.5 at 512 px skipped its first 5 steps on an H200 (benchmarks/README.md), so fp16 cases run up to 8
# more steps, and a case passes when every step after the first skips is a finite update
FP16_CALIBRATION = 8
RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35": 512, "flux": 512}
FLOW_CONFIGS = {"sd35": "sd35-medium-transformer.json", "flux": "flux1-dev-transformer.json"}
# SD3's and FLUX's VAE: SD's layout with 16 latent channels, no quant convs, and their scaling and shift factors
FLOW_VAE = {arch: dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
                       scaling_factor=scale, shift_factor=shift)
            for arch, scale, shift in (("sd35", 1.5305, 0.0609), ("flux", 0.3611, 0.1159))}
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


def real_flow_pipeline(work: Path, arch: str) -> Path:
    """SD3.5-medium's or FLUX.1-dev's transformer (assets/transformer-configs), randomly initialised in bf16 (FLUX's
    fp32 copy would be 48 GB), with the 16-channel VAE of both at full size, the real CLIP-L (and SD3's CLIP-G), and a
    T5 encoder of T5-XXL's width (4096) in 2 layers over the tiny pipeline's T5 tokenizer."""
    from diffusers import AutoencoderKL, DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from diffusion_align.models.tiny_flow import t5_encoder
    sd3 = arch == "sd35"
    pipe = DiffusionPipeline.from_pretrained(save_tiny_flow_pipeline(work / f"tiny-{arch}", "sd3" if sd3 else "flux"))
    config = json.loads((ROOT / "assets" / "transformer-configs" / FLOW_CONFIGS[arch]).read_text())
    cls = SD3Transformer2DModel if sd3 else FluxTransformer2DModel
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # FLUX's 12B initialise in seconds there
        pipe.transformer = cls.from_config(config).to(torch.bfloat16)
    pipe.vae = AutoencoderKL(**{**SD15_VAE, **FLOW_VAE[arch]})
    clip_l = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), **SD15_TEXT})
    t5 = "text_encoder_3" if sd3 else "text_encoder_2"
    setattr(pipe, t5, t5_encoder(4096, getattr(pipe, t5.replace("text_encoder", "tokenizer"))))
    if sd3:
        pipe.text_encoder = CLIPTextModelWithProjection(clip_l)
        pipe.text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**{**pipe.text_encoder_2.config.to_dict(), **SDXL_TEXT_2}))
    else:
        pipe.text_encoder = CLIPTextModel(clip_l)
    out = work / arch
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def cases(arch: str, tiny: bool) -> list[dict]:
    if arch in FLOW_CONFIGS:  # bf16 LoRA with and without the fast path; SD3.5-M also full, and fp16 as flow_grpo
        found = [dict(precision="bf16", lora=True, fast=fast) for fast in (False, True)]
        if arch == "sd35":
            found.append(dict(precision="bf16", lora=False, fast=False))
            if not tiny:  # fp16 autocast needs CUDA
                found.append(dict(precision="fp16", lora=True, fast=False))
        return found + [dict(precision="bf16", lora=True, fast=False, online=True)]
    precisions = ["bf16"] if tiny else ["fp16", "bf16"]  # fp16 autocast needs CUDA
    found = [dict(precision=p, lora=lora, fast=fast) for p in precisions for lora in (True, False)
             for fast in (False, True)]
    if importlib.util.find_spec("xformers") is not None and not tiny:
        found.append(dict(precision="fp16", lora=True, fast=False, extra=("model.attention=xformers",)))
    if importlib.util.find_spec("bitsandbytes") is not None and not tiny:
        found.append(dict(precision="bf16", lora=False, fast=True, extra=("train.optimizer=adamw8bit",)))
    # FSDP2 (train.sharding) on every GPU there is, in bf16: a full fine-tune and a LoRA, and a full fine-tune
    # offloaded, under torchrun, each writing a checkpoint (its finite-weights check is a collective, which NCCL
    # runs on the GPU only); ZeRO-2 full
    found += [dict(precision="bf16", lora=lora, fast=False, sharded=sharded, extra=("train.checkpoint_every=1",))
              for lora, sharded in ((False, "fsdp2"), (True, "fsdp2"), (False, "fsdp2-offload"))]
    if importlib.util.find_spec("deepspeed") is not None:
        found.append(dict(precision="bf16", lora=False, fast=False, sharded="zero2"))
    return found + [dict(precision="bf16", lora=True, fast=False, online=True)]


def run_case(model: Path, pairs: Path, work: Path, resolution: int, steps: int, case: dict) -> dict:
    """`steps` updates of `case`; in fp16 up to FP16_CALIBRATION more steps first, which the loss scaler may skip."""
    sharded = f", {case['sharded']}" if case.get("sharded") else ""
    online = ", grpo (global std)" if case.get("online") else ""
    name = (f"{'lora' if case['lora'] else 'full'} {case['precision']}{sharded}{online}"
            f"{', cache + precomputed ref' if case['fast'] else ''}{', ' + ', '.join(case.get('extra', ())) if case.get('extra') else ''}")
    out = work / "runs" / "".join(c if c.isalnum() else "-" for c in f"{model.name}-{name}")
    overrides = [f"model.pretrained={model}", f"data.path={pairs}", f"train.output_dir={out}",
                 f"train.max_steps={steps + (FP16_CALIBRATION if case['precision'] == 'fp16' else 0)}",
                 "train.batch_size=1", "train.grad_accum=1",
                 f"train.resolution={resolution}", "train.warmup_steps=0", "train.checkpoint_every=0",
                 "train.report_to=none", "data.num_workers=2", "data.random_flip=no", "train.lr=1e-6",
                 f"train.mixed_precision={case['precision']}",
                 f"model.lora_rank={8 if case['lora'] else 'null'}", *case.get("extra", ())]
    if case.get("online"):
        overrides += [*ONLINE, *online_inputs(work)]
    if case["fast"]:
        overrides += ["data.cache=true", "method.precomputed_reference=true", f"data.cache_dir={out}-cache"]
    started = time.perf_counter()
    record = {"arch": model.name, "case": name, "skipped": float("nan"), "cache_peak_mb": float("nan"),
              "planned_mb": float("nan"), "planned_cache_mb": float("nan")}
    try:
        cfg = load_config(ONLINE_CONFIG if case.get("online") else CONFIG, overrides)
        if not case.get("sharded"):  # what `diffusion-align plan` says the run needs, beside what it took
            usage = memory_bytes(cfg, count_models(cfg))
            record.update(planned_mb=usage["total"] / 2**20,
                          planned_cache_mb=usage["cache_build"] / 2**20 if case["fast"] else float("nan"))
        if case["fast"]:  # the cache made first, as the run would make it, so that each phase has its own peak
            reset_peak_memory()
            make_latent_cache(cfg, Path(f"{out}-cache"), device=None)  # CUDA if any
            record["cache_peak_mb"] = peak_memory_mb()
        reset_peak_memory()
        if case.get("sharded"):  # sharding runs under a distributed launch: processes of their own
            processes = str(max(torch.cuda.device_count(), 1))
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", processes,
                                   "-m", "diffusion_align", "train", str(CONFIG), *overrides,
                                   f"train.sharding={case['sharded']}"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-200:])
        else:
            train(cfg)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        skipped = next((i for i, r in enumerate(lines) if r["grad_norm"] is not None), len(lines))
        updates = lines[skipped:]  # after the loss scaler's first skipped steps (none in bf16), every one finite
        loss = "policy_loss" if case.get("online") else "loss"
        finite = (all(math.isfinite(r[loss]) for r in lines) and len(updates) >= steps
                  and all(r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) for r in updates))
        # a step trains 1 pair (batch 1, no accumulation), or samples and trains on one group of images
        rate, items = (("images_per_s", cfg.online.group_size * cfg.online.prompts_per_step) if case.get("online")
                       else ("pairs_per_s", 1))
        per_step = statistics.median(items / r[rate] for r in lines[1:]) if len(lines) > 1 else float("nan")
        record.update(ok=finite, s_per_step=per_step, skipped=skipped,
                      why="" if finite else "non-finite loss or gradient after the loss scaler's first skips")
    except Exception as err:  # one failing case must not hide the others' numbers
        record.update(ok=False, s_per_step=float("nan"), why=f"{type(err).__name__}: {str(err)[:200]}")
    shutil.rmtree(out, ignore_errors=True)  # a full fine-tune's model is the UNet's or transformer's size: the disk
    shutil.rmtree(f"{out}-cache", ignore_errors=True)  # would not hold one per case
    record.update(seconds=time.perf_counter() - started,  # a sharded run's memory is its own processes', not ours
                  peak_mb=float("nan") if case.get("sharded") else peak_memory_mb())
    print(f"{record['arch']:10s} {name:50s} {'ok' if record['ok'] else 'FAILED ' + record['why']} "
          f"{record['s_per_step']:.3f} s/step, peak {record['peak_mb']:.0f} MB (making the cache "
          f"{record['cache_peak_mb']:.0f} MB), {record['seconds']:.0f} s", flush=True)
    return record


def online_inputs(work: Path) -> list[str]:
    """The online case's prompts and reward model (a tiny random PickScore), made once in `work`."""
    from diffusion_align.rewards.tiny import save_tiny_scorer
    prompts, scorer = work / "online-prompts.txt", work / "online-pickscore"
    if not prompts.is_file():
        prompts.write_text("a red circle on a white background\na photo of a cat\n")
        save_tiny_scorer("pickscore", scorer, seed=0)
    return [f"online.prompts={prompts}", f"online.reward=pickscore={scorer}"]


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """The CUDA allocator's peak since `reset_peak_memory`, in MiB (NaN without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


def write_report(work: Path, records: list[dict], steps: int, seconds: float) -> None:
    """The table so far: written after every case, so a check stopped at its time limit keeps what it measured."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [f"{device}, torch {torch.__version__}, {steps} steps of 1 pair each, {seconds:.0f} s in all", "",
             "| arch | case | finite | steps the loss scaler skipped first | s / step | peak CUDA MB | planned MB "
             "| peak CUDA MB making the cache (before the run) | planned MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | {r['case']} | {'yes' if r['ok'] else 'NO: ' + r['why']} | {r['skipped']} | "
              f"{r['s_per_step']:.3f} | {r['peak_mb']:.0f} | {r['planned_mb']:.0f} | {r['cache_peak_mb']:.0f} | "
              f"{r['planned_cache_mb']:.0f} |" for r in records]
    (work / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (work / "gpu_check.json").write_text(json.dumps(records, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/gpu-check")
    parser.add_argument("--tiny", action="store_true", help="tiny pipelines at 32 px: the CPU stand-in")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--archs", nargs="+", default=list(RESOLUTION), choices=tuple(RESOLUTION))
    args = parser.parse_args()
    work = Path(args.out)
    shutil.rmtree(work / "runs", ignore_errors=True)  # runs and caches of an earlier check (its pairs are rewritten)
    work.mkdir(parents=True, exist_ok=True)
    started, records = time.perf_counter(), []
    for arch in args.archs:
        resolution = 32 if args.tiny else RESOLUTION[arch]
        if args.tiny:
            model = (save_tiny_flow_pipeline(work / arch, "sd3" if arch == "sd35" else "flux")
                     if arch in FLOW_CONFIGS else save_tiny_pipeline(work / arch, "sdxl" if arch == "sdxl" else "sd"))
        else:
            model = real_flow_pipeline(work, arch) if arch in FLOW_CONFIGS else real_pipeline(work, arch)
        pairs = write_tiny_pairs(work / f"pairs-{arch}.parquet", num_pairs=8, resolution=resolution)
        for case in cases(arch, args.tiny):
            records.append(run_case(model, pairs, work, resolution, args.steps, case))
            write_report(work, records, args.steps, time.perf_counter() - started)
        shutil.rmtree(model)  # the full-size folders would not all fit on the disk (FLUX's alone is 24 GB)
    print((work / "gpu_check.md").read_text())
    sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
    main()
