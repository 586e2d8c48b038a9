"""Every method in the toy world at equal budgets, over several training seeds: the oracle win rate of the aligned
model over the base (mean over seeds, with a 95% interval over both prompts and seeds), the oracle and toy-reward
gains, the diversity of the aligned model's images, and time per training step.

    .venv/bin/python benchmarks/toy_methods.py                         # all seven methods, seeds 0 1 2, held out
    .venv/bin/python benchmarks/toy_methods.py --methods dpo mapo --seeds 0 --split val --out outputs/bench-val
    .venv/bin/python benchmarks/toy_methods.py --methods dpo --overrides data.cache=true \
        method.precomputed_reference=true --out outputs/bench-cached
    .venv/bin/python benchmarks/toy_methods.py --family flow --methods dpo   # the flow base, outputs/toy-methods-flow
    .venv/bin/python benchmarks/toy_methods.py --labels raters --methods dpo sft   # pairs labelled by simulated people

Each (method, seed) runs `diffusion-align demo` into <out>/<method>/seed-<seed>/. A training seed sets the pair
images (the base model's draws for the train prompts), the training draws and the LoRA initialisation; the
evaluation prompts (every prompt of --split) and evaluation seeds stay fixed, so seeds differ only in what was
trained. Offline methods at one seed share their pair images (made once, labelled alike: by default the toy
PickScore on the UNet base, the simulated raters on the flow base, SmPO's soft labels the toy PickScore's); the
online ones (pref_grpo, grpo) sample their own. Settings are tuned on --split val (train scenes that get no pairs and
no rollouts); --split heldout, the default, is for the final table only. The interval: a bootstrap of seeds and
prompts, both drawn with replacement, the prompts once for all the drawn seeds, which were judged on them alike
(`evaluation.compare.seeds_bootstrap_interval`; before 2026-12-06 each drawn seed drew its own prompts, which
narrowed the intervals: benchmarks/README.md says by how much). The
table is printed and written to <out>/table.md. Each run's record (its settings and recipe, each evaluated prompt's
oracle gains and the report's figures) is added to --results (benchmarks/results/toy-methods.jsonl, committed), which
every table can be computed again from; a run recorded there with the same settings, recipe (with the UNet recipe a
flow recipe names as its base) and shipped assets, or finished in <out> with the same settings and recipe, is read
back, not run again (the code is not in the key: after a change to the toy world or training, run again by hand).
Run it with nothing else on the machine: time per step is a wall-clock measure.

`--on-train-prompts` judges the finished runs again on the prompts they trained on (the base model's and each
run's images of its train prompts with the same evaluation seeds, into <out>/train-prompts-base-seed-<seed>/ and
<run>/train-prompts-aligned/; judged as the demo judges, into <run>/train-prompts-report.json and
-comparisons.jsonl) and writes that table to <out>/table-train-prompts.md: set beside the held-out one, it tells a
method that does not fit its own data from one that does not carry what it fitted to new compositions.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from diffusion_align.config import config_chain, load_config
from diffusion_align.evaluation.compare import pair_outcomes, seeds_bootstrap_interval
from diffusion_align.files import write_text_atomic
from diffusion_align.rewards import load_scorer
from diffusion_align.toy.assets import base_model, generate, toy_pickscore
from diffusion_align.toy.demo import DEFAULT_PAIRS, METHODS, ONLINE, DemoSettings, evaluate, recipe, run_demo
from diffusion_align.toy.oracle import RATER_TIE_MARGIN
from diffusion_align.toy.world import sample_prompts

TRAIN_PROMPTS = "train-prompts-"  # the prefix of a run's files judged on its train prompts
RESULTS = Path(__file__).parent / "results" / "toy-methods.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--split", default="heldout", choices=("val", "heldout"),
                        help="the prompts evaluated on: val while tuning, heldout for the final table")
    parser.add_argument("--family", default="unet", choices=("unet", "flow"), help="the toy base (demo --family)")
    parser.add_argument("--labels", default=None, choices=("proxy", "raters"),
                        help="who labels the offline pairs (demo --labels; default: the family's)")
    parser.add_argument("--label-margin", type=float, default=0.0,
                        help="the toy PickScore's tie margin (demo --label-margin)")
    parser.add_argument("--out", default=None, help="default: outputs/toy-methods, with -flow added for that base "
                                                    "and -<labels> for labels other than the base's default")
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's, per kind of method")
    parser.add_argument("--prompts", type=int, default=None, help="train prompts; default: the demo's (all)")
    parser.add_argument("--images-per-prompt", type=int, default=None, help="default: the family's (demo's)")
    parser.add_argument("--eval-seeds", type=int, default=DemoSettings.eval_seeds)
    parser.add_argument("--overrides", nargs="*", default=[], help="train config keys for every method, key=value "
                                                                   "(e.g. data.cache=true)")
    parser.add_argument("--on-train-prompts", action="store_true",
                        help="judge the runs again on the prompts they trained on (see above)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the runs' records, read back and added to")
    args = parser.parse_args()
    if args.eval_seeds < 2:
        parser.error("--eval-seeds must be at least 2: the diversity column compares a prompt's images across seeds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out or "outputs/toy-methods" + ("-flow" if args.family == "flow" else "")
               + (f"-{args.labels}" if args.labels not in (None, DEFAULT_PAIRS[args.family][0]) else ""))
    rows = []
    for method in args.methods:
        if args.on_train_prompts:  # judged anew from the runs' folders
            runs = [run_seed(out, method, seed, args) for seed in args.seeds]
            for run in runs:
                judge_on_train_prompts(run, out)
            records = [run_record(run, TRAIN_PROMPTS) for run in runs]
        else:
            records = [recorded_run(out, method, seed, args) for seed in args.seeds]
        rows.append((method, summarise(records, on_train_prompts=args.on_train_prompts)))
    table = format_table(rows, args)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table{'-train-prompts' if args.on_train_prompts else ''}.md").write_text(table)


def demo_settings(method: str, seed: int, args) -> DemoSettings:
    return DemoSettings(method=method, family=args.family, labels=args.labels, label_margin=args.label_margin,
                        steps=args.steps, prompts=args.prompts, images_per_prompt=args.images_per_prompt,
                        eval_seeds=args.eval_seeds, eval_split=args.split, seed=seed, overrides=tuple(args.overrides))


def run_seed(out: Path, method: str, seed: int, args) -> Path:
    """The demo of `method` at training seed `seed` in <out>/<method>/seed-<seed>/ (read back when it finished)."""
    return run_demo_once(out / method / f"seed-{seed}", out / f"shared-images-seed-{seed}",
                         demo_settings(method, seed, args))


def recipe_files(method: str, family: str) -> list[Path]:
    """The recipe and every file its `base:` chain names (a flow recipe is its UNet recipe with keys changed)."""
    return [path for path, _ in config_chain(recipe(method, family))]


def recipe_sha256(method: str, family: str) -> str:
    """A digest of the recipe as it loads: its file's bytes, then each base's (a file without one: its own digest)."""
    digest = hashlib.sha256()
    for path in recipe_files(method, family):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def assets_sha256(family: str) -> str:
    """A digest of the shipped assets a run depends on: the family's base model and the toy PickScore."""
    digest = hashlib.sha256()
    for folder in (base_model(family), toy_pickscore()):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder.parent)}:{_file_sha256(path, stat.st_size, stat.st_mtime_ns)};"
                          .encode())
    return digest.hexdigest()


@functools.cache  # a sweep asks for each of its runs: a file is read again only once it changed
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded_run(out: Path, method: str, seed: int, args) -> dict:
    """The record of the demo of `method` at training seed `seed`: its line in --results when one has the same
    settings, recipe (with its bases) and assets, else the record of `run_seed`'s run, added there. (The code is
    not in the key: a change to the toy world or the training code needs its runs made again by hand.)"""
    settings = demo_settings(method, seed, args).resolved()
    key = {**json.loads(json.dumps(asdict(settings))),  # as a JSON line holds them: the overrides a list
           "recipe_sha256": recipe_sha256(method, settings.family), "assets_sha256": assets_sha256(settings.family)}
    found = args.results.read_text().splitlines() if args.results.is_file() else []
    for record in map(json.loads, found):
        if record["settings"] == key:
            return record
    record = {"settings": key, **run_record(run_seed(out, method, seed, args))}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.results, "".join(line + "\n" for line in [*found, json.dumps(record)]))
    return record


def run_demo_once(run_dir: Path, shared: Path, settings: DemoSettings) -> Path:
    """`run_demo` into `run_dir` unless it finished there with the same settings and recipe (a run of other settings
    or an edited recipe is done again); an offline method's pair images (which depend on the seed alone) are copied
    from `shared` when an earlier run left them there, and left there by the first."""
    # the values these settings had before they were added (the UNet family, the toy PickScore's labels, no margin)
    # left out, so that runs made before them are read back; the flow base's labeller is always written
    asked = {k: v for k, v in asdict(settings.resolved()).items()
             if (k, v) not in (("family", "unet"), ("labels", "proxy"), ("label_margin", 0.0))}
    files = recipe_files(settings.method, settings.family)
    asked = json.dumps({**asked, "recipe": "".join(path.read_text() for path in files)}, sort_keys=True) + "\n"
    done_with = run_dir / "benchmark-settings.json"
    if (run_dir / "report.json").is_file() and done_with.is_file() and done_with.read_text() == asked:
        return run_dir
    for stale in run_dir.glob(f"{TRAIN_PROMPTS}*"):  # the judgement of the run this one replaces
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    offline = settings.method not in ONLINE
    if offline and shared.is_dir() and not run_dir.exists():
        shutil.copytree(shared, run_dir)
    run_demo(run_dir, settings)
    done_with.write_text(asked)
    if offline and not shared.is_dir():
        shared.mkdir(parents=True)
        for name in ("pair-images", "pair-images-prompts.txt"):
            source = run_dir / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, shared / name)
    return run_dir


def judge_on_train_prompts(run_dir: Path, out: Path) -> None:
    """The run's model against the base on the run's own train prompts, with the demo's evaluation seeds, judged as
    the demo judges: <run>/train-prompts-report.json (the summary the report keeps) and -comparisons.jsonl. The
    base's images of a seed's train prompts are made once, into <out>/train-prompts-base-seed-<seed>/."""
    report_file = run_dir / f"{TRAIN_PROMPTS}report.json"
    if report_file.is_file():
        return
    report = json.loads((run_dir / "report.json").read_text())
    settings = report["settings"]
    prompts = sample_prompts(settings["prompts"], settings["seed"], "train")
    seeds = list(range(1000, 1000 + settings["eval_seeds"]))  # the demo's evaluation seeds
    family = settings.get("family", "unet")
    text_tokens = load_config(recipe(report["method"], family), settings["overrides"]).model.max_sequence_length
    base = generate(base_model(family), prompts, seeds, out / f"{TRAIN_PROMPTS}base-seed-{settings['seed']}",
                    max_sequence_length=text_tokens)
    aligned = generate(base_model(family), prompts, seeds, run_dir / f"{TRAIN_PROMPTS}aligned",
                       lora=run_dir / "model" / "final", max_sequence_length=text_tokens)
    proxy = load_scorer("toy-pickscore", toy_pickscore(), device="cpu")
    summary, comparisons = evaluate(base, aligned, proxy, sorted(set(prompts)), seeds)
    write_text_atomic(run_dir / f"{TRAIN_PROMPTS}comparisons.jsonl", "".join(json.dumps(c) + "\n" for c in comparisons))
    write_text_atomic(report_file, json.dumps({**summary, "settings": settings,  # written last: the run is judged
                                               "train_seconds_per_step": report["train_seconds_per_step"]}, indent=1))


def run_record(run_dir: Path, prefix: str = "") -> dict:
    """What the table takes from a finished run: each evaluated prompt's oracle gains (`oracle_gains`) and its
    report's figures; `prefix` as there."""
    report = json.loads((run_dir / f"{prefix}report.json").read_text())
    return {"win_rate": report["oracle_win_rate"]["value"],
            **{f"{name}_gain": report[key]["aligned"] - report[key]["base"]
               for name, key in (("oracle", "oracle_score"), ("proxy", "toy_reward"))},
            "diversity": report["diversity"]["ratio"], "steps": report["settings"]["steps"],
            "seconds_per_step": report["train_seconds_per_step"], "gains": oracle_gains(run_dir, prefix)}


def oracle_gains(run_dir: Path, prefix: str = "") -> dict[str, list[float]]:
    """Each evaluated prompt's oracle gains of aligned over base (aligned - base), one per evaluation seed: what
    any other count of wins (e.g. with a tie margin) can be recomputed from. `prefix`: TRAIN_PROMPTS for the
    run's judgement on its train prompts."""
    gains: dict[str, list[float]] = {}
    for line in (run_dir / f"{prefix}comparisons.jsonl").read_text().splitlines():
        c = json.loads(line)
        gains.setdefault(c["prompt"], []).append(c["oracle_aligned"] - c["oracle_base"])
    return gains


def per_prompt_win_rates(gains: dict[str, list[float]], tie_margin: float = 0.0) -> dict[str, float]:
    """Each evaluated prompt's oracle win rate of aligned over base, over the evaluation seeds, from its `gains` (a
    gain's sign is the comparison's: two different floats never subtract to zero); with `tie_margin`, a gain under it
    counts half."""
    return {prompt: float(np.mean(pair_outcomes(g, np.zeros(len(g)), tie_margin))) for prompt, g in gains.items()}


def summarise(records: list[dict], on_train_prompts: bool = False) -> dict:
    """From the seeds' `run_record`s: the mean over seeds of the win rate, with its interval over seeds and prompts,
    each seed's value, the same with ties counted (a gain under the raters' tie margin is half a win), and the mean
    gains."""
    rates = [per_prompt_win_rates(r["gains"]) for r in records]
    # judged on their train prompts, seeds that trained on fewer than all differ in them: the bootstrap then draws
    # each seed's prompts on their own, so only their number must agree
    same_prompts = all(sorted(r) == sorted(rates[0]) for r in rates)
    if not on_train_prompts and not same_prompts:
        raise ValueError("the seeds' runs were evaluated on different prompts")
    values = np.array([[r[p] for p in sorted(r)] for r in rates])
    low, high = seeds_bootstrap_interval(values, same_prompts=same_prompts)
    with_ties = np.array([[r[p] for p in sorted(r)] for r in (per_prompt_win_rates(record["gains"], RATER_TIE_MARGIN)
                                                              for record in records)])

    def mean(key):
        return float(np.mean([r[key] for r in records]))
    return {"win_rate": float(values.mean()), "low": low, "high": high, "per_seed": [r["win_rate"] for r in records],
            "with_ties": (float(with_ties.mean()), *seeds_bootstrap_interval(with_ties, same_prompts=same_prompts)),
            **{key: mean(key) for key in ("oracle_gain", "proxy_gain", "diversity", "seconds_per_step")},
            "steps": records[0]["steps"]}


def format_table(rows, args) -> str:
    split = ("train: the prompts each run trained on" if args.on_train_prompts else
             {"val": "val: validation prompts (for tuning)", "heldout": "heldout: held-out prompts (never tuned on)"}[
                 args.split])
    base = ", flow base" if args.family == "flow" else ""
    pairs = DemoSettings(family=args.family, labels=args.labels, images_per_prompt=args.images_per_prompt).resolved()
    labellers = {"raters": "simulated raters (SmPO: the toy PickScore's cosines)", "proxy": "toy PickScore"}
    lines = [f"Toy world{base}, {split} x {args.eval_seeds} evaluation seeds; training seeds "
             f"{' '.join(map(str, args.seeds))}; offline pairs from {pairs.images_per_prompt} images of "
             f"{args.prompts or 'every'} train prompt(s), labelled by the "
             f"{labellers[pairs.labels]} ({time.strftime('%Y-%m-%d')})"
             f"{'; overrides ' + ' '.join(args.overrides) if args.overrides else ''}.",
             "",
             "| method | steps | oracle win rate over base, mean over seeds (95% interval, prompts and seeds) | "
             f"per seed | the same, a difference under the raters' tie margin ({RATER_TIE_MARGIN}) half a win | "
             "oracle gain | toy-reward gain | diversity (aligned / base) | s / step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in rows:
        ties, ties_low, ties_high = s["with_ties"]
        lines.append(f"| {method} | {s['steps']} | {s['win_rate']:.3f} ({s['low']:.3f}-{s['high']:.3f}) | "
                     f"{' '.join(f'{v:.3f}' for v in s['per_seed'])} | {ties:.3f} ({ties_low:.3f}-{ties_high:.3f}) | "
                     f"{s['oracle_gain']:+.3f} | {s['proxy_gain']:+.3f} | {s['diversity']:.2f} | "
                     f"{s['seconds_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
