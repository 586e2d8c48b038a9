"""The memory planner's table for the shipped SD1.5, SD2.1, SDXL, SD3.5-medium and FLUX.1-dev recipes on 24, 48 and
80 GB GPUs.

    .venv/bin/python benchmarks/memory_table.py [--out benchmarks/memory-table.md]
    .venv/bin/python benchmarks/memory_table.py --measure sd15     # the plan against a real step on the CPU

No hub access and no weights: each architecture is a config-only pipeline folder (a tiny pipeline of its family
whose unet/ or transformer/, vae/ and text_encoder*/ configs are replaced by the published ones; the planner reads
configs only). The flow models' text encoders are those of Stability-AI/sd3.5 `sd3_infer.py` (CLIPL_CONFIG,
CLIPG_CONFIG, T5_CONFIG: CLIP-L, OpenCLIP bigG, T5-v1.1-XXL), which FLUX.1 reads too (black-forest-labs/flux
`src/flux/util.py`: openai/clip-vit-large-patch14 and google/t5-v1_1-xxl); their VAE is SD's with 16 latent channels
and no quant convs (`sd3_impls.py` SDVAE, flux `AutoEncoderParams`: ch 128, ch_mult 1 2 4 4, 2 res blocks, z 16);
the transformers' configs are assets/transformer-configs/.
The SDXL recipes' replacement VAE (madebyollin/sdxl-vae-fp16-fix, a hub id) is its config: SDXL's VAE architecture with
force_upcast false (it runs in the frozen dtype, where SDXL's own VAE is kept in fp32). The online recipes' reward,
PickScore (yuvalkirstain/PickScore_v1, a fine-tune of laion/CLIP-ViT-H-14-laion2B-s32B-b79K), is a config-only
CLIPModel folder of that ViT-H/14.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gpu_check import SDXL_TEXT_2, SDXL_VAE
from train_throughput import ROOT, SD15_TEXT, SD15_VAE

from diffusion_align.config import load_config
from diffusion_align.models.tiny import save_tiny_pipeline
from diffusion_align.models.tiny_flow import save_tiny_flow_pipeline
from diffusion_align.training.memory import GIB, count_models, plan

# stable-diffusion-2-1's text encoder (OpenCLIP ViT-H/14, penultimate layer: 23 of its 24 layers ship)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128)
FLOW_VAE = {**SD15_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
ARCHITECTURES = {"sd15": ("sd", [SD15_TEXT], SD15_VAE), "sd21": ("sd2", [SD21_TEXT], {**SD15_VAE, "sample_size": 768}),
                 "sdxl": ("sdxl", [SD15_TEXT, SDXL_TEXT_2], SDXL_VAE),
                 "sd35": ("sd3", [SD15_TEXT, SDXL_TEXT_2, T5_XXL], FLOW_VAE),
                 "flux": ("flux", [{k: v for k, v in SD15_TEXT.items() if k != "projection_dim"}, T5_XXL], FLOW_VAE)}
DENOISERS = {"sd35": ("transformer", "transformer-configs/sd35-medium-transformer.json"),
             "flux": ("transformer", "transformer-configs/flux1-dev-transformer.json")}
GPUS = (24, 48, 80)
# the table's columns of `memory_bytes`' parts: (key, heading)
PARTS = (("weights", "weights"), ("gradients", "grads"), ("optimizer", "optimizer"), ("ema", "ema"),
         ("reference", "reference"), ("encoders", "encoders"), ("rewards", "rewards"), ("activations", "activations"),
         ("optimizer_step", "optimizer step"), ("encode", "encode"), ("total", "total"))
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json, which PickScore_v1 keeps
PICKSCORE = dict(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, max_position_embeddings=77, vocab_size=49408,
                                  hidden_act="gelu"),
                 vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu"),
                 projection_dim=1024)


def sdxl_fp16_fix_vae(work: Path) -> Path:
    """The SDXL recipes' VAE (madebyollin/sdxl-vae-fp16-fix) as a config-only folder: SDXL's, without force_upcast."""
    folder = work / "sdxl-vae-fp16-fix"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **SDXL_VAE, "force_upcast": False}))
    return folder


def pickscore_config(work: Path) -> Path:
    """PickScore as a config-only CLIPModel folder (the planner reads its config alone)."""
    import transformers
    folder = work / "pickscore"
    transformers.CLIPConfig(**PICKSCORE).save_pretrained(folder)
    return folder


def config_only_pipeline(work: Path, arch: str) -> Path:
    family, texts, vae = ARCHITECTURES[arch]
    flow = arch in DENOISERS
    folder = (save_tiny_flow_pipeline if flow else save_tiny_pipeline)(work / arch, family, seed=0)
    denoiser, config = DENOISERS.get(arch, ("unet", f"unet-configs/{arch}-unet.json"))
    (folder / denoiser / "config.json").write_text((ROOT / "assets" / config).read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**vae_config, **vae}))
    for name, text in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), texts):
        config = json.loads((folder / name / "config.json").read_text())
        (folder / name / "config.json").write_text(json.dumps({**config, **text}))
    return folder


def measure(arch: str) -> str:
    """One full-fine-tune AdamW step of the architecture's UNet (random weights, fp32, 64 px, 2 rows) on the CPU:
    the bytes its parameters, gradients and optimizer states hold, and the process's peak RSS growth, against the
    plan's model states."""
    import resource

    import torch
    from diffusers import UNet2DConditionModel

    from diffusion_align.training.run import make_optimizer
    with tempfile.TemporaryDirectory() as work:
        cfg = load_config(None, [f"model.pretrained={config_only_pipeline(Path(work), arch)}", "model.lora_rank=null",
                                 "train.resolution=64", "train.batch_size=1", "method.name=sft"])
        planned = plan(cfg).per_process_bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "assets" / "unet-configs" / f"{arch}-unet.json")
                                                       .read_text())).train()
    optimizer = make_optimizer(cfg, list(unet.parameters()), 1e-5)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim),
               added_cond_kwargs=added).sample
    out.square().mean().backward()
    optimizer.step()
    held = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *(p.grad for p in unet.parameters()),
                                                      *(v for s in optimizer.state.values() for v in s.values())])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    states = sum(planned[k] for k in ("weights", "gradients", "optimizer"))
    return (f"| {arch} | {states / GIB:.2f} | {held / GIB:.2f} ({held / states - 1:+.1%}) | "
            f"{grown / GIB:.2f} ({grown / states - 1:+.1%}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--measure", choices=[a for a in ARCHITECTURES if a not in DENOISERS],
                        help="instead: the plan's model states against a real step of this UNet on the CPU")
    args = parser.parse_args()
    if args.measure:
        print("| architecture | planned model states, GiB | tensors held after one step | peak RSS growth |\n"
              "| --- | --- | --- | --- |\n" + measure(args.measure))
        return
    lines = ["Per process, one process (ddp), at each recipe's resolution, batch and precision; then, per GPU size, "
             "whether it fits (1.5 GB kept for the CUDA context), the cheapest single change that does, and the "
             "fewest processes with fsdp2.", "",
             "| " + " | ".join(["recipe", "trained", *(heading for _, heading in PARTS), *(f"{gb} GB" for gb in GPUS)])
             + " |",
             "|" + " --- |" * (2 + len(PARTS) + len(GPUS))]
    with tempfile.TemporaryDirectory() as work:
        fp16_fix, pickscore = sdxl_fp16_fix_vae(Path(work)), pickscore_config(Path(work))
        for arch in ARCHITECTURES:
            model = config_only_pipeline(Path(work), arch)
            for recipe in sorted((ROOT / "configs" / arch).glob("*.yaml")):
                shipped = load_config(recipe)
                vae = fp16_fix if shipped.model.vae else "null"
                assert shipped.online.reward == "pickscore" and not shipped.online.track and not shipped.online.judge
                cfg = load_config(recipe, [f"model.pretrained={model}", f"model.vae={vae}",
                                           f"online.reward=pickscore={pickscore}"])
                counts = count_models(cfg)
                verdicts = []
                for gb in GPUS:
                    p = plan(cfg, gpu_memory_gb=gb, counts=counts)
                    verdicts.append("fits" if p.fits else f"{p.change or 'no single change'}; fsdp2 x "
                                                          f"{p.fsdp2_processes or '>64'}")
                usage = plan(cfg, counts=counts).per_process_bytes
                trained = f"LoRA {counts.lora / 1e6:.1f}M" if counts.lora else f"full {counts.denoiser / 1e9:.2f}B"
                lines.append(f"| {arch}/{recipe.name} | {trained} | "
                             + " | ".join(f"{usage.get(key, 0) / GIB:.1f}" for key, _ in PARTS)
                             + " | " + " | ".join(verdicts) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
