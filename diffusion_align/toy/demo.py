"""`diffusion-align demo`: the whole loop in the toy world, from the shipped assets, with no network.

Offline methods (dpo, mapo, smpo, dcpo, sft):
1. pairs: the base model draws `images_per_prompt` images for each of `prompts` train prompts (`generate`; their
   seeds follow the run's seed, so each training seed trains on its own pair images; 4 on the UNet base, 8 on the
   flow base unless set: `DEFAULT_PAIRS`);
2. labels: the toy PickScore labels every pair of one prompt's images (`label --from-images`; with
   `label_margin`, a pair whose scores differ by no more is a tie, which training drops; SmPO reads its cosines,
   DCPO gets dual captions), or, with `labels="raters"` (the flow base's default), the simulated raters do, from
   the oracle's scores with their noise and ties, as people labelled Pick-a-Pic (`assets.oracle_pairs`);
3. training: the method on those pairs (`train`) with its recipe, `configs/toy/<method>.yaml`.
Online methods (pref_grpo, grpo) skip 1-2: they sample the `prompts` train prompts themselves and are rewarded by
the toy PickScore, with the oracle's score of their samples logged beside it (`online.track`), with their
recipes in `configs/toy/` too. `family="flow"` runs it all on the toy flow-matching base (SD3 at toy size) with the
recipes in `configs/toy-flow/`, every image drawn at the T5 length its recipe names (`model.max_sequence_length`).
Then, for every method:
4. evaluation: base and aligned images for every prompt of `eval_split` (held-out by default; "val" while tuning
   settings) and `eval_seeds` fixed seeds (`generate`), judged by the oracle, paired by prompt and seed: the
   aligned model's win rate with a 95% bootstrap interval over prompts (and again with differences under the
   raters' tie margin counted as ties), the toy PickScore of both, how many aligned images changed visibly, and
   their diversity across seeds beside the base's;
5. outputs: report.json, report.md, comparisons.jsonl (every comparison's oracle scores), a comparison grid and
   the review page (both opening on the largest oracle gains, then the largest losses, each with its verdict), and
   the training curves.
A rerun into the same folder judges exactly this run's images: every generated folder is pruned to this run's
prompts x seeds and weights (`assets.generate`), so images of an earlier model or other prompts never count.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..evaluation.compare import bootstrap_interval, pair_outcomes
from ..files import shipped_dir, write_text_atomic
from .assets import base_model, folder_records, generate, oracle_pairs, toy_pickscore
from .oracle import RATER_TIE_MARGIN, oracle_scores
from .world import sample_prompts, scenes

logger = logging.getLogger("diffusion_align")

METHODS = ("dpo", "mapo", "smpo", "dcpo", "sft", "pref_grpo", "grpo")
ONLINE = ("pref_grpo", "grpo")


FAMILIES = ("unet", "flow")  # the toy bases: SD's UNet (configs/toy/), SD3's flow transformer (configs/toy-flow/)
LABELLERS = ("proxy", "raters")  # the offline pairs' labels: the toy PickScore's (AI feedback), or simulated people's
# Each base's default pairs, (labels, images per prompt). The UNet base's: the toy PickScore's labels of 4 images.
# The flow base's: the raters' labels of 8 (SmPO's, the proxy's cosines of them), because the toy PickScore, fitted
# on the UNet base's images, sees little of what the flow base gets wrong: on the flow base's pairs it agrees with
# the oracle on 63%, the raters on 83%, and Flow-DPO learns the proxy from its labels (benchmarks/README.md).
DEFAULT_PAIRS = {"unet": ("proxy", 4), "flow": ("raters", 8)}


def recipe(method: str, family: str = "unet") -> Path:
    """The method's training recipe in the toy world, `configs/toy/<method>.yaml` (pref_grpo: pref-grpo.yaml) for
    the UNet base, `configs/toy-flow/` for the flow base: the settings the demo trains with, tuned on the validation
    split where the sweep ran (benchmarks/README.md)."""
    name = "configs/toy" if family == "unet" else "configs/toy-flow"
    folder = shipped_dir(name, name)  # the same path in the wheel's package data, where a `base:` resolves too
    path = folder / f"{method.replace('_', '-')}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem.replace("-", "_") for p in folder.glob("*.yaml")))
        raise ValueError(f"no toy recipe for {method} on the {family} base ({path}); it has recipes for {have}")
    return path


# An aligned image "changed visibly" from the base image of its prompt and seed when their pixels differ by more
# than this on average (0-255 scale; ours): well above the rounding noise between runs (about 1 level), at the
# level where a shape's colour, size or edges have moved.
VISIBLE_CHANGE = 4.0


# train config keys the demo sets itself, and what to use instead of overriding them
DEMO_KEYS = {"model.pretrained": "choose the base with --family", "train.output_dir": "choose the folder with --out",
             "train.max_steps": "use --steps", "train.seed": "use --seed",
             "train.overwrite": "a rerun always starts afresh"}


@dataclass
class DemoSettings:
    method: str = "dpo"
    family: str = "unet"      # the base: "unet" (SD) or "flow" (SD3)
    labels: str | None = None  # who labels the offline pairs: "proxy" (the toy PickScore) or "raters" (simulated
                               # people); None: the family's (DEFAULT_PAIRS)
    label_margin: float = 0.0  # a toy PickScore gap up to this is a tie, dropped from training (`label --tie-margin`)
    steps: int | None = None  # optimiser steps (offline) or rollouts (online); None: the recipe's
    prompts: int | None = None  # train prompts, each drawn once; None: all 212
    images_per_prompt: int | None = None  # None: the family's (DEFAULT_PAIRS): 4 (6 pairs a prompt) or 8 (28)
    eval_seeds: int = 3       # images per evaluated prompt and model: 73 held-out prompts x 3 = 219 comparisons
    eval_split: str = "heldout"  # "val" to tune settings, "heldout" to report them (toy.world)
    seed: int = 0             # the pair images, the training draws and the LoRA initialisation
    overrides: tuple[str, ...] = ()  # extra train config keys, key=value

    def resolved(self) -> DemoSettings:
        """These settings with the family's defaults (DEFAULT_PAIRS) for the labels and images left None; SmPO's
        soft labels, and the online methods' rewards, are always the toy PickScore's."""
        labels, images = DEFAULT_PAIRS[self.family]
        if self.method == "smpo" or self.method in ONLINE:
            labels = "proxy"
        return replace(self, labels=labels if self.labels is None else self.labels,
                       images_per_prompt=images if self.images_per_prompt is None else self.images_per_prompt)


def run_demo(out_dir, settings: DemoSettings = DemoSettings()) -> dict:
    """Run the demo into `out_dir`; returns the report (also written as report.json and report.md)."""
    from ..config import load_config
    from ..evaluation.grid import make_grid
    from ..evaluation.review import write_review_page
    from ..rewards import load_scorer
    from ..rewards.labeling import pairs_from_folder
    from ..training.trainer import train

    if settings.method not in METHODS or settings.family not in FAMILIES:
        raise ValueError(f"expected a method of {', '.join(METHODS)} and a family of {', '.join(FAMILIES)}, got "
                         f"{settings.method!r} and {settings.family!r}")
    settings = settings.resolved()
    prompts = len(scenes("train")) if settings.prompts is None else settings.prompts
    if not 0 < prompts <= len(scenes("train")) or settings.images_per_prompt < 2:
        raise ValueError(f"expected 1 to {len(scenes('train'))} prompts (each drawn once) and at least 2 images per "
                         f"prompt, got {prompts} and {settings.images_per_prompt}")
    if (settings.steps is not None and settings.steps < 1) or settings.eval_seeds < 1:
        raise ValueError(f"expected at least 1 training step and 1 evaluation seed, got steps={settings.steps} and "
                         f"eval_seeds={settings.eval_seeds}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file; expected a folder (new, or a demo's to rerun)")
    if settings.labels not in LABELLERS or (settings.labels == "raters" and settings.method in ("smpo", *ONLINE)):
        raise ValueError(f"labels must be one of {', '.join(LABELLERS)}, and raters label only the pairs of dpo, "
                         f"mapo, dcpo and sft (SmPO's soft labels are a scorer's cosines; the online methods have "
                         f"no pairs), got {settings.labels!r} for {settings.method}")
    if settings.label_margin < 0 or (settings.label_margin and (settings.labels != "proxy"
                                                                 or settings.method in ONLINE)):
        raise ValueError(f"label_margin is the toy PickScore's tie margin on the offline pairs: at least 0, with "
                         f"labels=proxy and an offline method; got {settings.label_margin} with "
                         f"labels={settings.labels} for {settings.method}")
    if settings.eval_split not in ("val", "heldout"):
        raise ValueError(f"eval_split must be val (to tune settings) or heldout (to report them), got "
                         f"{settings.eval_split!r}")
    for override in settings.overrides:  # the pairs, the evaluation and the report follow the demo's own values
        key = override.split("=", 1)[0].strip()
        if key in DEMO_KEYS:
            raise ValueError(f"override {override!r}: the demo sets {key} itself, for its pairs, training, evaluation "
                             f"and report alike; {DEMO_KEYS[key]}")
    recipe_file = recipe(settings.method, settings.family)
    recipe_cfg = load_config(recipe_file, list(settings.overrides))  # a mistyped override fails now
    text_tokens = recipe_cfg.model.max_sequence_length  # the flow base's T5 length, in training and sampling alike
    started = time.perf_counter()
    out = Path(out_dir)
    base, proxy_path = base_model(settings.family), toy_pickscore()
    proxy = load_scorer("toy-pickscore", proxy_path, device="cpu")
    online = settings.method in ONLINE
    steps = recipe_cfg.train.max_steps if settings.steps is None else settings.steps
    train_prompts = sample_prompts(prompts, settings.seed, "train")

    if online:
        logger.info("1-2/5 (online: the model samples %d train prompts itself, rewarded by the toy PickScore)",
                    prompts)
        prompts_file = out / "train-prompts.txt"
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(prompts_file, "".join(p + "\n" for p in train_prompts))
        data = f"online.prompts={prompts_file}"
    else:
        logger.info("1/5 pairs: %d train prompts x %d images from the base model", prompts,
                    settings.images_per_prompt)
        first = settings.seed * settings.images_per_prompt  # seed 0 draws 0..3, seed 1 draws 4..7, ...
        images = generate(base, train_prompts, list(range(first, first + settings.images_per_prompt)),
                          out / "pair-images", max_sequence_length=text_tokens)
        if settings.labels == "proxy":
            logger.info("2/5 labels: the toy PickScore picks the winner of each pair (a tie within %g)",
                        settings.label_margin)
            pairs = out / "pairs"
            pairs_from_folder(images, proxy, pairs, seed=settings.seed, tie_margin=settings.label_margin)
        else:
            logger.info("2/5 labels: the simulated raters pick the winner of each pair, or call a tie")
            pairs = oracle_pairs(images, out / "pairs-raters" / "pairs.parquet", settings.seed, every_pair=True)
        for derived in ("pairs-cosine", "pairs-captions"):  # made again from the pairs just made (their records
            shutil.rmtree(out / derived, ignore_errors=True)  # name the source's fingerprint, which a rewrite changes)
        if settings.method == "smpo":
            pairs = _with_cosines(pairs, proxy_path, out / "pairs-cosine")
        elif settings.method == "dcpo":
            pairs = _with_captions(pairs, out / "pairs-captions", settings.seed)
        data = f"data.path={pairs}"

    logger.info("3/5 training: %s, %d steps", settings.method, steps)
    cfg = load_config(recipe_file, [
        f"model.pretrained={base}", data, f"train.output_dir={out / 'model'}",
        "train.overwrite=true",  # a rerun redoes it all
        f"train.max_steps={steps}", f"train.seed={settings.seed}", *settings.overrides])
    train_started = time.perf_counter()
    result = train(cfg)
    seconds_per_step = (time.perf_counter() - train_started) / steps  # model loading included

    evaluated = [s.prompt for s in scenes(settings.eval_split)]
    logger.info("4/5 evaluation: %d %s prompts x %d seeds, base and aligned", len(evaluated), settings.eval_split,
                settings.eval_seeds)
    seeds = list(range(1000, 1000 + settings.eval_seeds))  # the same for every training seed
    base_dir = generate(base, evaluated, seeds, out / "base", max_sequence_length=text_tokens)
    if cfg.model.lora_rank is None:  # a full fine-tune's final folder is a whole pipeline
        aligned_dir = generate(result.final_dir, evaluated, seeds, out / "aligned", max_sequence_length=text_tokens)
    else:
        aligned_dir = generate(base, evaluated, seeds, out / "aligned", lora=str(result.final_dir),
                               max_sequence_length=text_tokens)
    summary, comparisons = evaluate(base_dir, aligned_dir, proxy, evaluated, seeds, settings.seed)
    report = {
        "method": settings.method,
        **summary,
        "train_seconds_per_step": round(seconds_per_step, 3),
        "settings": {"family": settings.family, "steps": steps, "prompts": prompts,
                     **({} if online else {"images_per_prompt": settings.images_per_prompt,
                                           "labels": settings.labels,
                                           **({"label_margin": settings.label_margin} if settings.labels == "proxy"
                                              else {})}),
                     "eval_split": settings.eval_split, "eval_seeds": settings.eval_seeds, "seed": settings.seed,
                     "recipe": recipe_file.name, "overrides": list(settings.overrides)},
    }

    logger.info("5/5 outputs: report, grid, review page")
    write_text_atomic(out / "comparisons.jsonl", "".join(json.dumps(c) + "\n" for c in comparisons))
    notes = verdicts(comparisons)
    grid = make_grid([base_dir, aligned_dir], out / "grid.png", rows_per_page=25, cell_size=96, notes=notes)
    write_review_page([base_dir, aligned_dir], out / "review.html",
                      title=f"toy demo ({settings.family} base): base vs {settings.method}",
                      notes=notes)
    report["seconds"] = round(time.perf_counter() - started)
    report["files"] = {"LoRA weights" if cfg.model.lora_rank else "model": str(result.final_dir),
                       "base images": str(base_dir),
                       "aligned images": str(aligned_dir), "comparisons": str(out / "comparisons.jsonl"),
                       "grid pages": [str(p) for p in grid.pages],
                       "review page": str(out / "review.html"),
                       "training curves": str(out / "model" / "training_curves.png")}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", format_report(report))
    return report


def evaluate(base_dir, aligned_dir, proxy, prompts: list[str], seeds: list[int],
             seed: int = 0) -> tuple[dict, list[dict]]:
    """The aligned folder judged against the base on exactly `prompts` x `seeds` (other images in the folders are
    not read; a missing one is an error): the oracle win rate of aligned over base, paired by prompt and seed, with
    a 95% bootstrap interval over prompts (`seed` draws the resamples), the mean oracle score and toy PickScore of
    each folder, how many aligned images changed visibly (VISIBLE_CHANGE), and each folder's `diversity`. Also
    returns every comparison: prompt, seed, both oracle scores and the mean absolute pixel difference."""
    keys = [(prompt, s) for prompt in prompts for s in seeds]
    images = []
    for folder in (base_dir, aligned_dir):
        files = {(r["prompt"], r["seed"]): r["file_name"] for r in folder_records(folder)}
        missing = [k for k in keys if k not in files]
        if missing:
            raise ValueError(f"{folder}: no image of {len(missing)} of the {len(keys)} prompts x seeds evaluated, "
                             f"e.g. prompt {missing[0][0]!r}, seed {missing[0][1]}")
        images.append([Image.open(Path(folder) / files[k]).convert("RGB") for k in keys])
    base_images, aligned_images = images
    texts = [prompt for prompt, _ in keys]
    oracle_base, oracle_aligned = oracle_scores(base_images, texts), oracle_scores(aligned_images, texts)
    aligned, base = oracle_aligned.numpy(), oracle_base.numpy()
    outcomes = pair_outcomes(aligned, base)
    low, high = bootstrap_interval(outcomes.reshape(len(prompts), len(seeds)).mean(axis=1), seed=seed)  # seed-fastest
    # the same, a difference under the raters' own tie margin counted as a tie: what a person would see
    tied = pair_outcomes(aligned, base, tie_margin=RATER_TIE_MARGIN)
    tied_low, tied_high = bootstrap_interval(tied.reshape(len(prompts), len(seeds)).mean(axis=1), seed=seed)
    change = [_pixel_distance(a, b) for a, b in zip(aligned_images, base_images)]
    visible = sum(c > VISIBLE_CHANGE for c in change)
    spread = None if len(seeds) < 2 else {"base": diversity(base_images, len(seeds)),
                                          "aligned": diversity(aligned_images, len(seeds))}
    summary = {
        "oracle_win_rate": {"value": float(outcomes.mean()), "low": low, "high": high, "comparisons": len(keys),
                            "prompts": len(prompts)},
        "oracle_win_rate_ties_counted": {"value": float(tied.mean()), "low": tied_low, "high": tied_high,
                                         "margin": RATER_TIE_MARGIN,
                                         "ties": float(np.mean(tied == 0.5))},
        "oracle_score": {"base": float(oracle_base.mean()), "aligned": float(oracle_aligned.mean())},
        "toy_reward": {"base": float(proxy.score(base_images, texts).mean()),
                       "aligned": float(proxy.score(aligned_images, texts).mean())},
        "changed_visibly": {"images": visible, "share": visible / len(keys), "threshold": VISIBLE_CHANGE},
        "diversity": None if spread is None else {**spread, "ratio": spread["aligned"] / spread["base"]},
    }
    comparisons = [{"prompt": p, "seed": s, "oracle_base": float(b), "oracle_aligned": float(a), "pixel_change": c}
                   for (p, s), b, a, c in zip(keys, oracle_base, oracle_aligned, change)]
    return summary, comparisons


def _pixel_distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def diversity(images: list[Image.Image], per_prompt: int) -> float:
    """How different one model's images of a prompt are across seeds: the mean absolute pixel difference (0-255)
    over every pair of a prompt's images, averaged over prompts (`images` run prompt by prompt, `per_prompt` each).
    Beside the base model's, it shows mode collapse: an aligned model that draws one image per prompt scores 0."""
    groups = [images[i:i + per_prompt] for i in range(0, len(images), per_prompt)]
    return float(np.mean([np.mean([_pixel_distance(a, b) for a, b in itertools.combinations(group, 2)])
                          for group in groups]))


def verdicts(comparisons: list[dict]) -> dict[tuple[str, int], str]:
    """The oracle's verdict on each comparison, by (prompt, seed), ordered for a reader: the largest gains of the
    aligned model first, then its largest losses, then the ties."""
    def gain(c):
        return c["oracle_aligned"] - c["oracle_base"]
    ordered = (sorted((c for c in comparisons if gain(c) > 0), key=gain, reverse=True)
               + sorted((c for c in comparisons if gain(c) < 0), key=gain)
               + [c for c in comparisons if gain(c) == 0])
    word = {1: "aligned better", -1: "base better", 0: "tie"}
    return {(c["prompt"], c["seed"]): f"oracle: {word[int(np.sign(gain(c)))]}, {gain(c):+.3f} "
                                      f"({c['oracle_base']:.3f} -> {c['oracle_aligned']:.3f})" for c in ordered}


def format_report(report: dict) -> str:
    win, oracle, proxy = report["oracle_win_rate"], report["oracle_score"], report["toy_reward"]
    tied = report["oracle_win_rate_ties_counted"]
    changed, spread = report["changed_visibly"], report["diversity"]
    split = {"heldout": "held-out", "val": "validation"}[report["settings"]["eval_split"]]
    return "\n".join([
        f"# Toy demo: {report['method']}",
        "",
        f"Oracle win rate of the aligned model over the base: **{win['value']:.3f}** "
        f"(95% interval {win['low']:.3f} to {win['high']:.3f}; {win['comparisons']} comparisons on "
        f"{win['prompts']} {split} prompts, paired by prompt and seed; ties count half).",
        "",
        f"Counting an oracle difference under the raters' tie margin ({tied['margin']}) as a tie (half a win), as a "
        f"person comparing the two would: **{tied['value']:.3f}** ({tied['low']:.3f} to {tied['high']:.3f}); "
        f"{tied['ties']:.0%} of the comparisons are that close.",
        "",
        "| | base | aligned | gain |",
        "| --- | --- | --- | --- |",
        f"| mean oracle score | {oracle['base']:.4f} | {oracle['aligned']:.4f} | "
        f"{oracle['aligned'] - oracle['base']:+.4f} |",
        f"| mean toy PickScore (the proxy trained on) | {proxy['base']:.4f} | {proxy['aligned']:.4f} | "
        f"{proxy['aligned'] - proxy['base']:+.4f} |",
        *([] if spread is None else [
            f"| diversity across seeds (mean pixel difference of a prompt's images) | {spread['base']:.2f} | "
            f"{spread['aligned']:.2f} | x{spread['ratio']:.2f} |"]),
        "",
        "A proxy gain without an oracle gain is reward hacking; diversity falling well below the base's is mode "
        "collapse.",
        "",
        f"{changed['images']} of {win['comparisons']} aligned images ({changed['share']:.0%}) changed visibly from the "
        f"base image of the same prompt and seed (mean pixel difference over {changed['threshold']:g} levels of "
        "255). The grid and the review page open on the largest oracle gains, then the largest losses, each with "
        "the oracle's verdict.",
        "",
        f"Settings: {json.dumps(report['settings'])}. Time: {report['seconds']} s.",
        "",
        "Files:",
        *(f"- {name}: {', '.join(f'`{p}`' for p in ([path] if isinstance(path, str) else path))}"
          for name, path in report["files"].items()),
        "",
    ])


def _with_cosines(pairs: Path, proxy_path: Path, out: Path) -> Path:
    """The pairs with the proxy's raw cosines (SmPO's soft labels) added as toy_pickscore_cosine_0/1."""
    from ..rewards import load_scorer
    from ..rewards.labeling import label_pairs
    label_pairs(pairs, load_scorer("toy-pickscore", proxy_path, device="cpu", convention="cosine"), out)
    return out


def _with_captions(pairs: Path, out: Path, seed: int) -> Path:
    """The pairs with DCPO's dual captions: the winner keeps the prompt, the loser gets a perturbed one."""
    from ..data.captions import make_captions
    make_captions(str(pairs), out, strategy="perturbation", perturber="rules", strength="medium", seed=seed)
    return out
