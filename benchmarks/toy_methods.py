"""Every method in the toy world at equal budgets and seeds: oracle win rate over the base model (95% bootstrap
interval over held-out prompts), toy-reward change, and time per training step.

    .venv/bin/python benchmarks/toy_methods.py                         # all seven methods, the demo's defaults
    .venv/bin/python benchmarks/toy_methods.py --methods dpo mapo --steps 100 --out outputs/bench
    .venv/bin/python benchmarks/toy_methods.py --methods dpo dcpo --overrides data.cache=true \
        method.precomputed_reference=true --out outputs/bench-cached

Each method runs `diffusion-align demo` into <out>/<method>/: the offline ones on the same base-model images for
their pairs (made once and reused, labelled by the same toy PickScore), the online ones (pref_grpo, grpo) on their
own samples rewarded by the same toy PickScore; the same seed, and the demo's steps per kind unless --steps says.
The table is printed and written to <out>/table.md. Run it with nothing else on the machine: time per step is a
wall-clock measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from diffusion_align.toy.demo import METHODS, ONLINE, DemoSettings, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default="outputs/toy-methods")
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's, per kind of method")
    parser.add_argument("--prompts", type=int, default=DemoSettings.prompts)
    parser.add_argument("--images-per-prompt", type=int, default=DemoSettings.images_per_prompt)
    parser.add_argument("--eval-seeds", type=int, default=DemoSettings.eval_seeds)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", nargs="*", default=[], help="train config keys for every method, key=value "
                                                                   "(e.g. data.cache=true)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    rows = []
    for method in args.methods:
        run_dir = out / method
        if not (run_dir / "report.json").is_file():
            shared = out / "shared-images"  # the base model's images for the pairs, made by the first method
            if shared.is_dir() and not run_dir.exists() and method not in ONLINE:
                shutil.copytree(shared, run_dir)
            run_demo(run_dir, DemoSettings(method=method, steps=args.steps, prompts=args.prompts,
                                           images_per_prompt=args.images_per_prompt, eval_seeds=args.eval_seeds,
                                           seed=args.seed, overrides=tuple(args.overrides)))
            if not shared.is_dir() and method not in ONLINE:
                shared.mkdir(parents=True)
                for name in ("pair-images", "pair-images-prompts.txt"):
                    source = run_dir / name
                    (shutil.copytree if source.is_dir() else shutil.copy)(source, shared / name)
        rows.append((method, json.loads((run_dir / "report.json").read_text())))
    table = _table(rows, args)
    print(table)
    (out / "table.md").write_text(table)


def _table(rows, args) -> str:
    lines = [f"Toy world, {args.prompts} train prompts (offline: x {args.images_per_prompt} images), held-out "
             f"prompts x {args.eval_seeds} seeds, seed {args.seed} ({time.strftime('%Y-%m-%d')})"
             f"{'; overrides ' + ' '.join(args.overrides) if args.overrides else ''}.", "",
             "| method | steps | oracle win rate over base (95% interval) | toy reward base -> aligned | "
             "s / step (incl. loading) |",
             "| --- | --- | --- | --- | --- |"]
    for method, report in rows:
        win, proxy = report["oracle_win_rate"], report["toy_reward"]
        lines.append(f"| {method} | {report['settings']['steps']} | {win['value']:.3f} ({win['low']:.3f}-"
                     f"{win['high']:.3f}) | {proxy['base']:.3f} -> {proxy['aligned']:.3f} | "
                     f"{report['train_seconds_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
