"""Tune every method on the toy world's validation split: a small grid of the settings that matter, at one seed,
then the best two settings at three seeds; the recipe is the best of those by its mean validation win rate. Settings
are picked by the win rate with ties counted (an oracle difference under the raters' tie margin is half a win), so
that one that barely moves the model cannot win on differences no rater sees; the table shows both rates. Every
setting is an override of the method's toy recipe (configs/toy/<method>.yaml).

    .venv/bin/python benchmarks/toy_sweep.py --methods dpo mapo        # stage 1 (the grid), then stage 2
    .venv/bin/python benchmarks/toy_sweep.py --report                  # the tables and pictures from what ran

Every run is `diffusion-align demo --eval-split val` into <out>/<method>/<settings>/seed-<seed>/: judged on the
validation prompts (train scenes that get no pairs and no rollouts), never on the held-out ones, which only
`toy_methods.py` reads once the recipes are chosen. Each finished run appends one line to --results (JSON Lines,
committed with the benchmark), so a sweep stopped anywhere resumes where it was, in this session or a later one.
--report writes the table (benchmarks/<results name>.md: toy-sweep.md) and, per method, win rate against learning
rate with one line per value of the other setting (benchmarks/toy-sweep-<method>.png). Stage 1 also runs EXTRAS,
settings beyond the grid that a diagnosis asked for, AROUND_BEST, one knob at a time from the grid's best setting
(both in the table, not the picture), and CONTROLS, runs that check a method against another (in the table, never a
recipe). Each step waits for the runs it is chosen from, those of other processes too (extras after the whole grid,
stage 2 after the whole of stage 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from toy_methods import per_prompt_win_rates, recipe_sha256, run_demo_once, run_record

from diffusion_align.evaluation.compare import bootstrap_interval, pair_outcomes, seeds_bootstrap_interval
from diffusion_align.toy.demo import METHODS, DemoSettings
from diffusion_align.toy.oracle import RATER_TIE_MARGIN

HERE = Path(__file__).parent
LR = [3e-4, 1e-3, 3e-3]  # around the demo's 1e-3 (a LoRA of rank 8 on a 0.8M-parameter UNet)
# per method: the learning rate and the setting that matters most beside it (beta at a decade either side of the
# published value; the steps for SFT, which has no beta; the KL weight for the online methods)
GRIDS = {
    "dpo": {"train.lr": LR, "method.beta": [1000, 5000, 25000]},
    "smpo": {"train.lr": LR, "method.beta": [1000, 5000, 25000]},
    "dcpo": {"train.lr": LR, "method.beta": [100, 500, 2500]},
    # MaPO lower still: at 1e-4 it pushes the losers' error up until the images break, and the draws sweep
    # (toy-sweep-draws.md) lost less the lower the rate, so the grid reaches down to 3e-6
    "mapo": {"train.lr": [3e-6, 1e-5, 3e-5], "method.beta": [0.02, 0.1, 0.5]},
    "sft": {"train.lr": LR, "train.max_steps": [250, 500, 1000]},
    # the online methods a rate lower: at seed 0 Pref-GRPO did better the lower the rate and the higher the KL
    # weight (3e-4 beat 1e-3 at every weight, 0.1 the best), so the grid moved from 3e-3 to 1e-4 and gained 1.0
    **{method: {"train.lr": [1e-4, 3e-4, 1e-3], "online.kl_beta": [0.0, 0.01, 0.1, 1.0]}
       for method in ("pref_grpo", "grpo")},
}
# beyond the grid, at seed 0. MaPO: what its authors' recipe does differently (methods.md; their train script's
# 500 warm-up steps, a full fine-tune at lr 1e-5) and the SNR value s of its f(x) = s x / (e^{sx} - 1) that lost
# least on draws (2.0; 0.1 and the other extras of toy-sweep-draws.md lost more and are not rerun on the means)
EXTRAS = {
    "mapo": [{"train.lr": 1e-5, "method.beta": 0.1, "train.warmup_steps": 500},
             {"train.lr": 1e-5, "method.beta": 0.1, "model.lora_rank": "null"},
             {"train.lr": 1e-5, "method.beta": 0.1, "method.mapo_snr_value": 2.0}],
}
# beyond the grid, at seed 0, one knob at a time from the grid's best setting: for the online methods the clip range
# a decade either side of Pref-GRPO's 1e-4, and half or twice the prompts per step (as many steps, half or twice the
# images; half in micro-batches of half the size, so that each of the 2 updates still takes whole ones)
AROUND_BEST = {method: [{"online.clip_range": 1e-5}, {"online.clip_range": 1e-3},
                        {"online.prompts_per_step": 2, "train.batch_size": 8}, {"online.prompts_per_step": 8}]
               for method in ("pref_grpo", "grpo")}
# controls, in the table but never a recipe: MaPO at beta -> 0 is SFT on its winners (at SFT's lr), so it must
# score what SFT does, and whatever MaPO loses beyond it is the margin's doing
CONTROLS = {"mapo": [{"train.lr": 1e-3, "method.beta": 1e-6}]}
STAGE_2_SEEDS = [0, 1, 2]


def grid(method: str) -> list[dict]:
    keys = list(GRIDS[method])
    return [dict(zip(keys, values)) for values in itertools.product(*GRIDS[method].values())]


def extras(method: str, rows: list[dict]) -> list[dict]:
    """EXTRAS, and AROUND_BEST's knobs over the best grid setting that has run (none before the first)."""
    ran = [r for r in rows if r["method"] == method and r["seed"] == 0 and r["settings"] in grid(method)]
    best = [max(ran, key=with_ties)["settings"]] if ran else []
    return EXTRAS.get(method, []) + [{**b, **knob} for b in best for knob in AROUND_BEST.get(method, [])]


def stage_1(method: str, rows: list[dict]) -> list[dict]:
    return grid(method) + extras(method, rows) + CONTROLS.get(method, [])


def slug(settings: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, (int, float)) else f"{k.split('.')[-1]}={v}"
                    for k, v in settings.items())


def read_results(path: Path) -> list[dict]:
    """The lines of the recipes as they are now: a line of a recipe since edited is left out (and so made again).
    Lines from before the recipe's digest was kept have none and are all read (benchmarks/README.md says which of
    them ran under an earlier recipe)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    now = {method: recipe_sha256(method, "unet") for method in {row["method"] for row in rows}}
    return [row for row in rows if row.get("recipe_sha256", now[row["method"]]) == now[row["method"]]]


def run(method: str, settings: dict, seed: int, args, done: list[dict]) -> dict | None:
    """One validation run, or its line from an earlier one, this process's or another's; None while another process
    runs it. Processes may share a sweep (e.g. one thread each, which runs these tiny models at almost the speed of
    two): each rereads the results before a run and claims the run with a lock file holding its pid."""
    done[:] = read_results(Path(args.results))
    for row in done:
        if (row["method"], row["settings"], row["seed"]) == (method, settings, seed):
            return row
    run_dir = Path(args.out) / method / slug(settings) / f"seed-{seed}"
    with claim(run_dir.with_name(run_dir.name + ".lock")) as claimed:
        if not claimed:
            logging.info("%s %s seed %d: another process is running it", method, slug(settings), seed)
            return None
        return _run(method, settings, seed, run_dir, args, done)


@contextmanager
def claim(lock: Path):
    """True when this process holds `lock` (made here, or left by a process that is gone), removed on exit."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists() and not _holder_alive(lock):
        lock.unlink(missing_ok=True)  # its process died: the claim is stale
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        yield False
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def _holder_alive(lock: Path) -> bool:
    try:
        os.kill(int(lock.read_text()), 0)
    except ProcessLookupError:
        return False
    except ValueError:  # the pid is being written
        return True
    return True


def _run(method: str, settings: dict, seed: int, run_dir: Path, args, done: list[dict]) -> dict:
    steps = settings.get("train.max_steps")
    overrides = tuple(f"{k}={v}" for k, v in settings.items() if k != "train.max_steps")
    run_demo_once(run_dir, Path(args.out) / f"shared-images-seed-{seed}",
                  DemoSettings(method=method, steps=steps, eval_split="val", seed=seed, overrides=overrides))
    record = run_record(run_dir)
    row = {"method": method, "settings": settings, "seed": seed, "recipe_sha256": recipe_sha256(method, "unet"),
           "steps": record["steps"],
           "val_win_rate": record["win_rate"], "per_prompt": per_prompt_win_rates(record["gains"]),
           "oracle_gains": record["gains"],
           **{key: record[key] for key in ("oracle_gain", "proxy_gain", "diversity")}}
    with Path(args.results).open("a") as f:
        f.write(json.dumps(row) + "\n")
    done.append(row)
    return row


def tie_counted(gains: np.ndarray) -> float:
    """The win rate of oracle differences `gains` with one under the raters' tie margin counted as a tie (half a
    win): what picks settings, so that one that barely moves the model cannot win on differences no rater sees."""
    return float(pair_outcomes(gains, np.zeros_like(gains), tie_margin=RATER_TIE_MARGIN).mean())


def with_ties(row: dict) -> float:
    return tie_counted(np.array([g for prompt in sorted(row["oracle_gains"]) for g in row["oracle_gains"][prompt]]))


def best_settings(rows: list[dict], method: str, n: int) -> list[dict]:
    """The `n` settings of `method`'s stage 1 with the highest validation win rate, ties counted, at seed 0, controls
    aside."""
    candidates = grid(method) + extras(method, rows)
    ran = [r for r in rows if r["method"] == method and r["seed"] == 0 and r["settings"] in candidates]
    return [r["settings"] for r in sorted(ran, key=lambda r: -with_ties(r))[:n]]


def run_all(method: str, settings: list[dict], seeds: list[int], args, done: list[dict]) -> None:
    """Every (setting, seed), waiting for those another process runs: what comes next is chosen from them all."""
    while None in [run(method, s, seed, args, done) for s in settings for seed in seeds]:
        time.sleep(30)


def summary(rows: list[dict], method: str, settings: dict) -> dict | None:
    """Mean validation win rate over the seeds run with `settings`, its interval (over prompts and seeds)."""
    runs = sorted((r for r in rows if r["method"] == method and r["settings"] == settings), key=lambda r: r["seed"])
    if not runs:
        return None
    prompts = sorted(runs[0]["per_prompt"])
    values = np.array([[r["per_prompt"][p] for p in prompts] for r in runs])
    low, high = seeds_bootstrap_interval(values) if len(runs) > 1 else bootstrap_interval(values[0])
    gains = np.array([g for r in runs for p in prompts for g in r["oracle_gains"][p]])
    return {"settings": settings, "seeds": [r["seed"] for r in runs], "win_rate": float(values.mean()),
            "low": low, "high": high, "ties": float(np.mean(np.abs(gains) < RATER_TIE_MARGIN)),
            "with_ties": tie_counted(gains),
            **{k: float(np.mean([r[k] for r in runs])) for k in ("oracle_gain", "proxy_gain", "diversity")}}


def report(rows: list[dict], methods: list[str], name: str = "toy-sweep") -> str:
    lines = ["Toy sweep on the validation split (39 prompts x 3 evaluation seeds), each setting over its method's "
             "recipe in configs/toy/; stage 1 at seed 0, stage 2: the best two at seeds 0 1 2. Settings are "
             "picked by the win rate with ties counted (the last column), and the recipe is the stage-2 setting with "
             "the best mean of it.", "",
             f"The last two columns count an oracle difference under the raters' tie margin ({RATER_TIE_MARGIN}) as "
             "a tie (half a win): how many comparisons are that close, and the win rate so counted.", "",
             "| method | settings | seeds | val win rate (95% interval) | oracle gain | toy-reward gain | diversity | "
             "ties | win rate, ties counted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        runs = [s for s in (summary(rows, method, settings) for settings in stage_1(method, rows)) if s is not None]
        for s in sorted(runs, key=lambda s: (-len(s["seeds"]), -s["with_ties"])):
            control = " (control)" if s["settings"] in CONTROLS.get(method, []) else ""
            lines.append(f"| {method} | {slug(s['settings'])}{control} | {' '.join(map(str, s['seeds']))} | "
                         f"{s['win_rate']:.3f} ({s['low']:.3f}-{s['high']:.3f}) | {s['oracle_gain']:+.3f} | "
                         f"{s['proxy_gain']:+.3f} | {s['diversity']:.2f} | {s['ties']:.2f} | {s['with_ties']:.3f} |")
        if runs:
            plot(method, name, [r for r in rows
                          if r["method"] == method and r["seed"] == 0 and r["settings"] in grid(method)])
    online = [m for m in ("pref_grpo", "grpo") if m in methods]
    if any(r["method"] in online for r in rows):
        plot_hacking(online, name, [r for r in rows if r["method"] in online and r["seed"] == 0])
    return "\n".join(lines) + "\n"


def plot(method: str, name: str, rows: list[dict]) -> Path:
    """The stage-1 (seed 0) win rate against the learning rate, one line per value of the other setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    other = [k for k in GRIDS[method] if k != "train.lr"][0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for value in GRIDS[method][other]:
        points = sorted((r["settings"]["train.lr"], r["val_win_rate"]) for r in rows if r["settings"][other] == value)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{other.split('.')[-1]} {value:g}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="learning rate", ylabel="validation win rate over base", title=f"toy sweep: {method}")
    ax.legend(fontsize=8)
    return _save(fig, HERE / f"{name}-{method}.png")


def plot_hacking(methods: list[str], name: str, rows: list[dict]) -> Path:
    """Reward hacking, per online method: each stage-1 run's (seed 0) oracle gain against its toy-reward gain. A
    method whose reward hacks less keeps its oracle gain up where its proxy gain is as large."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, marker in zip(methods, "os"):
        points = [(r["proxy_gain"], r["oracle_gain"]) for r in rows if r["method"] == method]
        ax.scatter(*zip(*points), marker=marker, label=method, alpha=0.8)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="toy-reward gain (the proxy trained on)", ylabel="oracle gain (the truth)",
           title="toy sweep: online settings (seed 0)")
    ax.legend(fontsize=8)
    return _save(fig, HERE / f"{name}-online-hacking.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default="outputs/toy-sweep")
    parser.add_argument("--results", default=str(HERE / "results" / "toy-sweep.jsonl"))
    parser.add_argument("--stage", choices=("1", "2", "both"), default="both")
    parser.add_argument("--report", action="store_true", help="only write the table and pictures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    done = read_results(Path(args.results))
    if not args.report:
        for method in args.methods:
            if args.stage in ("1", "both"):
                run_all(method, grid(method), [0], args, done)
                run_all(method, extras(method, done) + CONTROLS.get(method, []), [0], args, done)
            if args.stage in ("2", "both"):
                run_all(method, best_settings(done, method, 2), STAGE_2_SEEDS, args, done)
    name = Path(args.results).stem
    table = report(done, args.methods, name)
    print(table)
    (HERE / f"{name}.md").write_text(table)


if __name__ == "__main__":
    main()
