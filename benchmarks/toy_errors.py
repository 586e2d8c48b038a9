"""Where a trained toy model's denoising error moved: per timestep, on its own training pairs and on images it
never saw, conditional, unconditional and guided, beside the base model's.

    .venv/bin/python benchmarks/toy_errors.py outputs/toy-sweep/mapo/lr=1e-05_beta=0.5/seed-0 \
        outputs/toy-sweep/dpo/lr=0.0003_beta=5000/seed-0 --out benchmarks/toy-errors.md

Each argument is a demo run folder (its `pairs/` and `model/final/` LoRA). Four image sets, each noised with the
same noise at the same timesteps for every model:
- `train w` / `train l`: the first --pairs winners and losers of the run's training pairs (the base model's images);
- `val renders`: the clean image of every validation scene (`toy.world.render`), what the oracle scores highest;
- `val base`: the base model's samples of the validation prompts (the run's `base/` folder, made with
  `--eval-split val`), the images the evaluation starts from.
The error is mean |eps_hat - eps|^2 per image (an epsilon model), averaged over the set, at each timestep of
--timesteps; `cond` conditions on the image's prompt, `uncond` on the empty prompt, `guided` is what the sampler
uses, eps_u + g (eps_c - eps_u) at the toy guidance. A model that fits its training images better while its error on
unseen images rises has memorised them; a guided error that rises faster than the conditional one is guidance
amplifying a drift of the unconditional branch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusion_align.data.pairs import decode_pair
from diffusion_align.toy.assets import SAMPLING, base_model, folder_records
from diffusion_align.toy.world import render, scenes


def image_sets(run: Path, pairs: int) -> dict[str, tuple[list, list[str]]]:
    rows = pq.read_table(sorted((run / "pairs").glob("*.parquet"))[0]).slice(0, pairs).to_pylist()
    winners, losers, captions = [], [], []
    for index, row in enumerate(rows):
        images = decode_pair(row, index)
        first_wins = row["label_0"] > row["label_1"]
        winners.append(images[0 if first_wins else 1])
        losers.append(images[1 if first_wins else 0])
        captions.append(row["caption"])
    val = scenes("val")
    rng = np.random.default_rng(0)
    renders = [render(scene, rng) for scene in val]
    base = [r for r in folder_records(run / "base") if r["seed"] == 1000]
    return {"train w": (winners, captions), "train l": (losers, captions),
            "val renders": (renders, [s.prompt for s in val]),
            "val base": ([Image.open(run / "base" / r["file_name"]).convert("RGB") for r in base],
                         [r["prompt"] for r in base])}


@torch.no_grad()
def errors(pipe: StableDiffusionPipeline, images: list, prompts: list[str], timesteps: list[int]) -> dict[str, list]:
    """Mean squared epsilon error per timestep: conditional, unconditional, guided."""
    pixels = torch.stack([torch.from_numpy(np.asarray(i, np.float32)).permute(2, 0, 1) for i in images]) / 127.5 - 1
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    cond = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    uncond = pipe.encode_prompt([""] * len(prompts), "cpu", 1, False)[0]
    out = {"cond": [], "uncond": [], "guided": []}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        steps = torch.full((len(images),), t)
        noisy = pipe.scheduler.add_noise(latents, noise, steps)
        eps_c = pipe.unet(noisy, steps, cond).sample
        eps_u = pipe.unet(noisy, steps, uncond).sample
        guided = eps_u + SAMPLING["guidance"] * (eps_c - eps_u)
        for name, eps in (("cond", eps_c), ("uncond", eps_u), ("guided", guided)):
            out[name].append(float(((eps - noise) ** 2).mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="demo run folders (with pairs/, base/ and model/final/)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 200, 400, 600, 800, 950])
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.manual_seed(0)
    sets = image_sets(Path(args.runs[0]), args.pairs)
    pipe = StableDiffusionPipeline.from_pretrained(str(base_model()), safety_checker=None)
    results = {"base": {name: errors(pipe, *s, args.timesteps) for name, s in sets.items()}}
    for run in args.runs:
        pipe.load_lora_weights(str(Path(run) / "model" / "final"), adapter_name="trained")
        results[run] = {name: errors(pipe, *s, args.timesteps) for name, s in sets.items()}
        pipe.delete_adapters("trained")
    lines = [f"Mean |eps_hat - eps|^2 at t = {' '.join(map(str, args.timesteps))} (guidance "
             f"{SAMPLING['guidance']}); {args.pairs} training pairs of {args.runs[0]}, {len(scenes('val'))} validation "
             "scenes.", "", "| model | images | branch | " + " | ".join(f"t={t}" for t in args.timesteps) + " | mean |",
             "| --- | --- | --- |" + " --- |" * (len(args.timesteps) + 1)]
    for model, by_set in results.items():
        for name, by_branch in by_set.items():
            for branch, values in by_branch.items():
                cells = [f"{v:.4f}" for v in values] + [f"{np.mean(values):.4f}"]
                lines.append(f"| {Path(model).parent.name + '/' + Path(model).name if model != 'base' else 'base'}"
                             f" | {name} | {branch} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
