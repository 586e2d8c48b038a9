"""The toy world's shipped assets, `assets/toy/`: the pretrained base model and the toy PickScore.

    base/          the toy SD pipeline (`pretrain.pretrain`), for StableDiffusionPipeline.from_pretrained, stored
                   compactly (`pretrain.store_compact`: float16 weight files that load as float32)
    flow-base/     the toy SD3 pipeline (`pretrain_flow.pretrain_flow`: the flow-matching base, with base/'s VAE),
                   for StableDiffusion3Pipeline.from_pretrained, stored compactly too; sampled with T5 at
                   `pretrain_flow.TEXT_TOKENS` tokens
    pickscore/     a small CLIPModel fitted with `fit_reward` on rater-labelled pairs of samples of the base model
                   at full precision (`.build/base-full`); scorer `toy-pickscore`
    train-prompts.txt  the world's train prompts (not the validation ones), one a line (for `online.prompts` in
                       configs/toy/)
    measured.json  what `build_assets` measured: the base model's oracle scores, the proxy's agreement with the
                   oracle on held-out pairs, the settings and the time; and under "flow", what `build_flow_base`
                   measured of the flow base

`build_assets` makes all but flow-base/ again, deterministically for a seed (`diffusion-align toy build-assets`);
`build_flow_base` makes flow-base/ from base/'s VAE (`diffusion-align toy build-assets --flow`).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..data.shards import write_parquet
from ..files import replace_dir, shipped_dir, write_text_atomic
from ..models.tiny import clip_tokenizer
from .oracle import judge, rate_pairs
from .pretrain import HALF_STORED, MAX_TOKENS, PretrainSettings, pretrain, store_compact, text_tower
from .world import SIZE, scenes

logger = logging.getLogger("diffusion_align")

SAMPLING = {"steps": 20, "guidance": 2.0}  # every toy image: DDIM, low guidance, where the base model's flaws show


def asset_dir() -> Path:
    return shipped_dir("toy_assets", "assets/toy")


BASES = {"unet": "base", "flow": "flow-base"}  # the toy bases by family: SD's UNet, SD3's flow transformer


def base_model(family: str = "unet") -> Path:
    return asset_dir() / BASES[family]


def toy_pickscore() -> Path:
    return asset_dir() / "pickscore"


def write_train_prompts(out_dir) -> Path:
    path = Path(out_dir) / "train-prompts.txt"
    write_text_atomic(path, "".join(s.prompt + "\n" for s in scenes("train")))
    return path


def generate(model, prompts: list[str], seeds: list[int], out_dir, lora=None,
             max_sequence_length: int | None = None) -> Path:
    """Images of `prompts` x `seeds` into `out_dir` with metadata.jsonl, through the `generate` command's code; the
    folder ends up holding exactly those images of those weights (images kept from an earlier run of the same
    weights and settings, the others removed: `generate_images(prune=True)`). `max_sequence_length`: T5's
    tokens, for the flow base (`pretrain_flow.TEXT_TOKENS`)."""
    from ..evaluation.generate import generate_images
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = out_dir.parent / f"{out_dir.name}-prompts.txt"
    prompts_file.write_text("".join(p + "\n" for p in prompts))
    generate_images(str(model), prompts_file, seeds, out_dir, lora=lora, steps=SAMPLING["steps"],
                    guidance=SAMPLING["guidance"], height=SIZE, width=SIZE, batch_size=64, device="cpu", prune=True,
                    max_sequence_length=max_sequence_length)
    return out_dir


def folder_records(image_dir) -> list[dict]:
    """metadata.jsonl of a generated folder: file_name, prompt, seed and the settings, per image."""
    from ..evaluation.generate import read_records
    return [record for _, record in read_records(Path(image_dir) / "metadata.jsonl")]


def oracle_pairs(image_dir, out_file, seed: int = 0, every_pair: bool = False) -> Path:
    """Pick-a-Pic parquet of the folder's images paired by prompt (consecutive images of one prompt; `every_pair`:
    all n(n-1)/2 pairs of them, as `label --from-images` pairs), labelled by the simulated raters: what people would
    have said, with their noise and ties."""
    by_prompt: dict[str, list[dict]] = {}
    for record in folder_records(image_dir):
        by_prompt.setdefault(record["prompt"], []).append(record)
    image_dir = Path(image_dir)
    pairs = [(prompt, image_dir / group[i]["file_name"], image_dir / group[j]["file_name"])
             for prompt, group in sorted(by_prompt.items())
             for i, j in (itertools.combinations(range(len(group)), 2) if every_pair
                          else ((i, i + 1) for i in range(0, len(group) - 1, 2)))]
    scores = np.array([[judge(Image.open(f), prompt)["oracle"] for f in (f0, f1)] for prompt, f0, f1 in pairs])
    label_0, label_1 = rate_pairs(scores[:, 0], scores[:, 1], np.random.default_rng(seed))
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.table({
        "caption": [prompt for prompt, _, _ in pairs],
        "jpg_0": [f0.read_bytes() for _, f0, _ in pairs], "jpg_1": [f1.read_bytes() for _, _, f1 in pairs],
        "label_0": label_0, "label_1": label_1, "oracle_0": scores[:, 0], "oracle_1": scores[:, 1],
    }), Path(out_file))
    return Path(out_file)


def build_toy_clip(out_dir, seed: int = 0) -> Path:
    """A small randomly initialised CLIPModel for 32 px images with the toy tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    tokenizer = clip_tokenizer(model_max_length=MAX_TOKENS)
    vision = dict(image_size=SIZE, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text_tower(tokenizer), vision_config=vision, projection_dim=64))
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def proxy_agreement(scorer, pairs_file) -> dict:
    """How often the scorer prefers the image the oracle prefers, over pairs whose oracle scores differ by more
    than the raters' tie margin (oracle_0 / oracle_1 columns)."""
    from .oracle import RATER_TIE_MARGIN
    table = pq.read_table(pairs_file).to_pylist()
    clear = [r for r in table if abs(r["oracle_0"] - r["oracle_1"]) > RATER_TIE_MARGIN]
    decode = [Image.open(io.BytesIO(r[c])).convert("RGB") for r in clear for c in ("jpg_0", "jpg_1")]
    scores = scorer.score(decode, [r["caption"] for r in clear for _ in (0, 1)]).view(-1, 2)
    agree = [(s0 > s1) == (r["oracle_0"] > r["oracle_1"]) for (s0, s1), r in zip(scores.tolist(), clear)]
    return {"pairs": len(clear), "agreement": float(np.mean(agree)) if agree else None}


def build_assets(out_dir=None, seed: int = 0, settings: PretrainSettings | None = None, images_per_prompt: int = 8,
                 reward_steps: int = 1500, keep_base: bool = False) -> dict:
    """Pretrain the base model (unless `keep_base` and an earlier build left its full-precision weights), ship its
    compact copy (`store_compact`), fit the toy PickScore on rater-labelled samples of the full-precision model, and
    measure the shipped base and the proxy."""
    from ..rewards import load_scorer
    from ..rewards.fit_reward import fit_reward
    started = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else asset_dir()
    work = out_dir / ".build"
    settings = settings or PretrainSettings(seed=seed)
    base, full = out_dir / "base", work / "base-full"  # base/ ships the compact copy of the pretrained weights
    if not (keep_base and (full / "model_index.json").is_file()):
        if keep_base:
            raise FileNotFoundError(f"keep_base refits the reward on samples of the full-precision base in {full}, "
                                    f"which only a full build leaves; build without keep_base")
        pretrain(full, settings)
    for stale in ("train-images", "heldout-images"):  # made by another base, they must not be resumed
        shutil.rmtree(work / stale, ignore_errors=True)
    shutil.rmtree(work / "base-compact", ignore_errors=True)
    shutil.copytree(full, work / "base-compact")
    store_compact(work / "base-compact", HALF_STORED)
    replace_dir(work / "base-compact", base)
    write_train_prompts(out_dir)

    # preference data: `images_per_prompt` samples of every pretraining prompt (train and val), paired, labelled by
    # the simulated raters
    seeds = list(range(images_per_prompt))
    train_images = generate(full, [s.prompt for s in scenes("pretrain")], seeds, work / "train-images")
    train_pairs = oracle_pairs(train_images, work / "train-pairs.parquet", seed)
    clip = build_toy_clip(work / "clip-init", seed)
    fit = fit_reward(str(train_pairs), str(clip), out_dir / "pickscore", steps=reward_steps, lr=1e-3,
                     weight_decay=0.1, batch_size=64, warmup_steps=100, seed=seed, device="cpu")
    store_compact(out_dir / "pickscore")  # the tokenizer as vocab + merges; the weights stay float32

    # measured on held-out prompts, never trained on
    eval_images = generate(base, [s.prompt for s in scenes("heldout")], seeds, work / "heldout-images")
    eval_pairs = oracle_pairs(eval_images, work / "heldout-pairs.parquet", seed + 1)
    parts = [judge(Image.open(eval_images / r["file_name"]), r["prompt"]) for r in folder_records(eval_images)]
    oracle = torch.tensor([p["oracle"] for p in parts])
    proxy = load_scorer("toy-pickscore", out_dir / "pickscore", device="cpu")
    measured = {
        "base_oracle_heldout": {"mean": float(oracle.mean()), "std": float(oracle.std()), "images": len(parts),
                                "parts": {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}},
        "toy_pickscore": {"validation_accuracy": fit.to_dict().get("val_accuracy"),
                          "oracle_agreement_heldout": proxy_agreement(proxy, eval_pairs)},
        "settings": {"pretrain": asdict(settings), "images_per_prompt": images_per_prompt,
                     "reward_steps": reward_steps, "sampling": SAMPLING},
        "seconds": round(time.perf_counter() - started),
    }
    write_text_atomic(out_dir / "measured.json", json.dumps(measured, indent=2) + "\n")
    return measured


def build_flow_base(out_dir=None, seed: int = 0, settings: PretrainSettings | None = None,
                    images_per_prompt: int = 8) -> dict:
    """Pretrain the toy flow base on the UNet base's VAE and renders (`pretrain_flow`), ship its compact copy as
    flow-base/, and measure it on the held-out prompts as `build_assets` measures the UNet base; the result is
    measured.json's "flow" entry (the rest of the file is kept)."""
    from .pretrain_flow import HALF_STORED as FLOW_HALF_STORED
    from .pretrain_flow import STEPS, TEXT_TOKENS, pretrain_flow
    started = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else asset_dir()
    work = out_dir / ".build"
    settings = settings or PretrainSettings(seed=seed, unet_steps=STEPS)
    full, compact = work / "flow-base-full", work / "flow-base-compact"
    pretrain_flow(full, out_dir / BASES["unet"], settings)
    shutil.rmtree(work / "flow-heldout-images", ignore_errors=True)  # made by another base, never resumed
    shutil.rmtree(compact, ignore_errors=True)
    shutil.copytree(full, compact)
    store_compact(compact, FLOW_HALF_STORED)
    replace_dir(compact, out_dir / BASES["flow"])
    images = generate(out_dir / BASES["flow"], [s.prompt for s in scenes("heldout")], list(range(images_per_prompt)),
                      work / "flow-heldout-images", max_sequence_length=TEXT_TOKENS)
    parts = [judge(Image.open(images / r["file_name"]), r["prompt"]) for r in folder_records(images)]
    oracle = torch.tensor([p["oracle"] for p in parts])
    measured_file = out_dir / "measured.json"
    measured = json.loads(measured_file.read_text(encoding="utf-8")) if measured_file.is_file() else {}
    measured["flow"] = {
        "base_oracle_heldout": {"mean": float(oracle.mean()), "std": float(oracle.std()), "images": len(parts),
                                "parts": {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}},
        "settings": {"pretrain": asdict(settings), "images_per_prompt": images_per_prompt,
                     "sampling": {**SAMPLING, "max_sequence_length": TEXT_TOKENS}},
        "seconds": round(time.perf_counter() - started),
    }
    write_text_atomic(measured_file, json.dumps(measured, indent=2) + "\n")
    return measured["flow"]
