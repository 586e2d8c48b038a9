"""How varied a toy run's images of one prompt are across seeds, against how varied the world's own correct images
of that prompt are: is a lower diversity mode collapse, or flaws removed?

    .venv/bin/python benchmarks/toy_diversity.py outputs/toy-sweep/dcpo/lr=0.0003_beta=2500/seed-0 [RUN ...]

Each RUN is a `diffusion-align demo` output folder (base/ and aligned/ images of the same prompts x seeds). The
diversity is the demo's (`toy.demo.diversity`: mean absolute pixel difference between a prompt's images across
seeds, 0-255). "truth" renders each prompt's scene as the world draws it (`toy.world.render`: the right shape,
colour, place and background, with its small jitter of place and size; no flaw) once per seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_align.toy.assets import folder_records
from diffusion_align.toy.demo import diversity
from diffusion_align.toy.world import parse_prompt, render


def images_by_prompt(folder: Path) -> dict[str, list[Image.Image]]:
    """A generated folder's images, per prompt in seed order."""
    found: dict[str, list] = {}
    for record in folder_records(folder):
        found.setdefault(record["prompt"], []).append((record["seed"], folder / record["file_name"]))
    return {prompt: [Image.open(path).convert("RGB") for _, path in sorted(images)]
            for prompt, images in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    base = images_by_prompt(args.runs[0] / "base")
    prompts, seeds = sorted(base), len(next(iter(base.values())))
    size = base[prompts[0]][0].size
    truth = [render(parse_prompt(p), np.random.default_rng([seed, 7])).convert("RGB").resize(size)
             for p in prompts for seed in range(seeds)]
    base_spread = diversity([im for p in prompts for im in base[p]], seeds)
    print(f"| images | diversity | relative to the base |\n| --- | --- | --- |\n| base | {base_spread:.2f} | 1.00 |")
    print(f"| truth (the world's renders) | {diversity(truth, seeds):.2f} | {diversity(truth, seeds) / base_spread:.2f} |")
    for run in args.runs:
        aligned = images_by_prompt(run / "aligned")
        spread = diversity([im for p in prompts for im in aligned[p]], seeds)
        print(f"| {run} | {spread:.2f} | {spread / base_spread:.2f} |")


if __name__ == "__main__":
    main()
