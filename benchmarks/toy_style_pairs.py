"""MaPO where its authors aim it: pairs whose winner is in a style the model does not draw yet (Pick-Style). Does
it align the model there, where on pairs of the model's own images it breaks it? (benchmarks/README.md, 2026-12-05:
it does, at its published settings; SFT on the same winners did as well.)

    .venv/bin/python benchmarks/toy_style_pairs.py --methods mapo sft dpo --seeds 0 1 2     # each toy recipe
    .venv/bin/python benchmarks/toy_style_pairs.py --methods mapo --overrides train.lr=1e-5 method.beta=0.1 \
        --out outputs/toy-style/lr1e-5-beta0.1                                               # MaPO's published

Each train prompt's images from the base model (the demo's pair images of the seed) are each paired with the
world's own render of the prompt's scene (`toy.world.render`: the right shape, colour, place and background, clean,
with its small jitter; a fresh draw per pair), which wins: the preferred images differ from the model's in the
same way, as MaPO's Pick-Style pairs do (a style the base lacks, against the base's kind of image). Each (method,
seed) then runs `diffusion-align demo` with its recipe on these pairs in place of the labelled ones (the demo still
makes and labels its own, unused), judged on --split (val: a diagnostic, not a tuned row). At the end, each
method's runs in --out (every seed run so far) are summed up as `toy_methods.py` does: the mean over seeds with
its interval over prompts and seeds.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from toy_methods import summarise

from diffusion_align.config import load_config
from diffusion_align.data.shards import write_parquet
from diffusion_align.toy.assets import base_model, folder_records, generate
from diffusion_align.toy.demo import DEFAULT_PAIRS, DemoSettings, recipe, run_demo
from diffusion_align.toy.world import parse_prompt, render, sample_prompts, scenes


def style_pairs(images_dir: Path, out_file: Path, seed: int) -> Path:
    """Pick-a-Pic parquet: every image of `images_dir` against a render of its prompt's scene, the render preferred,
    on a side drawn per pair."""
    rng = np.random.default_rng([seed, 11])
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for record in folder_records(images_dir):
        buffer = io.BytesIO()
        render(parse_prompt(record["prompt"]), rng).save(buffer, format="PNG")
        model_image = (images_dir / record["file_name"]).read_bytes()
        render_first = bool(rng.integers(2))
        rows["caption"].append(record["prompt"])
        rows["jpg_0"].append(buffer.getvalue() if render_first else model_image)
        rows["jpg_1"].append(model_image if render_first else buffer.getvalue())
        rows["label_0"].append(float(render_first))
        rows["label_1"].append(float(not render_first))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.table(rows), out_file)
    return out_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["mapo", "sft", "dpo"], choices=("mapo", "sft", "dpo"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--split", default="val", choices=("val", "heldout"))
    parser.add_argument("--family", default="unet", choices=("unet", "flow"))
    parser.add_argument("--out", type=Path, default=Path("outputs/toy-style"))
    parser.add_argument("--overrides", nargs="*", default=[], help="train config keys, key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    images_per_prompt = DEFAULT_PAIRS[args.family][1]
    for seed in args.seeds:
        for method in args.methods:
            run = args.out / method / f"seed-{seed}"
            # the demo's own pair images of this seed, made here first so that the demo keeps them (`generate`)
            first = seed * images_per_prompt
            images = generate(base_model(args.family), sample_prompts(len(scenes("train")), seed, "train"),
                              list(range(first, first + images_per_prompt)), run / "pair-images",
                              max_sequence_length=load_config(recipe(method, args.family)).model.max_sequence_length)
            pairs = style_pairs(images, run / "pairs-style" / "pairs.parquet", seed)
            run_demo(run, DemoSettings(method=method, family=args.family, eval_split=args.split, seed=seed,
                                       overrides=(f"data.path={pairs}", *args.overrides)))
    for method in args.methods:  # every seed run so far into --out, with the interval over prompts and seeds
        runs = sorted((args.out / method).glob("seed-*/report.json"))
        row = summarise([run.parent for run in runs])
        seeds = " ".join(f"{value:.3f}" for value in row["per_seed"])
        print(f"{method}, seeds {' '.join(run.parent.name[5:] for run in runs)}: {row['win_rate']:.3f} "
              f"({row['low']:.3f}-{row['high']:.3f}; per seed {seeds}), ties counted {row['with_ties'][0]:.3f}, "
              f"oracle gain {row['oracle_gain']:+.3f}, toy-reward gain {row['proxy_gain']:+.2f}, "
              f"diversity {row['diversity']:.2f}")


if __name__ == "__main__":
    main()
