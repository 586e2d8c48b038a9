"""What Flow-GRPO-Fast's SDE window saves: one online step on a tiny SD3 pipeline with every step stochastic and 9 of
10 trained (configs/sd35/grpo.yaml's schedule), against `online.sde_window` 1, 2 and 3, with independent initial
noise per image and with one per group (`online.same_noise_per_group`, where a group takes the steps before its
window once).

    .venv/bin/python benchmarks/online_window.py             # 3 rounds of 2 + 8 online steps per setting

Per setting: the transformer's forward and backward passes and the rows (image-steps) the rollout denoises, per
online step, counted over a run of 20 steps (the window's place is drawn per sampling call, or per step with one
noise per group; the counts are the same either way), and the seconds per online
step as (T(n2) - T(n1)) / (n2 - n1) over runs of n1 = 2 and n2 = 8 steps in this process (loading cancels), the
fastest of the rounds, as a ratio to the full SDE's. The window cuts the training passes; with one noise per group
it cuts the rollout's rows too. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from diffusion_align.config import load_config
from diffusion_align.models.tiny_flow import save_tiny_flow_pipeline
from diffusion_align.rewards.tiny import save_tiny_scorer
from diffusion_align.training.trainer import train

SETTINGS = {"every step (9 of 10 trained)": ["online.train_fraction=0.9"],
            **{f"sde_window {k}": [f"online.sde_window={k}"] for k in (1, 2, 3)},
            **{f"sde_window {k}, one noise per group": [f"online.sde_window={k}", "online.same_noise_per_group=true"]
               for k in (1, 2, 3)}}
COUNTED_STEPS = 20


def passes(run) -> tuple[int, int, int]:
    """(forward passes, backward passes, rows of the rollout's passes) of the transformer in `run()`, counted on the
    module's forward (a rollout's pass: one without grad, CFG's two halves in one) and its grad."""
    counts = [0, 0, 0]
    real = SD3Transformer2DModel.forward

    def forward(self, hidden_states, *args, **kwargs):
        counts[0] += 1
        out = real(self, hidden_states, *args, **kwargs)
        if torch.is_grad_enabled():
            out[0].register_hook(lambda grad: counts.__setitem__(1, counts[1] + 1))
        else:
            counts[2] += len(hidden_states) // 2
        return out
    SD3Transformer2DModel.forward = forward
    try:
        run()
    finally:
        SD3Transformer2DModel.forward = real
    return counts[0], counts[1], counts[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="online-window-") as tmp:
        table = measure(Path(tmp), args.rounds)
    print(table)


def measure(root: Path, rounds: int) -> str:
    """The table (markdown) of the settings, measured in `root`."""
    model = save_tiny_flow_pipeline(root / "sd3", "sd3")
    scorer = save_tiny_scorer("pickscore", root / "scorer")
    (root / "prompts.txt").write_text("a red circle\na blue square\n")

    def run(overrides: list[str], steps: int, out: Path) -> float:
        cfg = load_config(None, ["method.name=grpo", f"model.pretrained={model}", f"online.prompts={root}/prompts.txt",
                                 f"online.reward=pickscore={scorer}", f"train.output_dir={out}",
                                 "online.group_size=4", "online.prompts_per_step=2", "online.sample_steps=10",
                                 "train.batch_size=4", "train.resolution=32", "train.report_to=none",
                                 f"train.max_steps={steps}", "train.checkpoint_every=0", "train.overwrite=true",
                                 *overrides])
        started = time.perf_counter()
        train(cfg)
        return time.perf_counter() - started

    rows = {}
    for name, overrides in SETTINGS.items():
        counts = passes(lambda: run(overrides, COUNTED_STEPS, root / "count"))
        best = min((run(overrides, 8, root / f"r{r}-8") - run(overrides, 2, root / f"r{r}-2")) / 6
                   for r in range(rounds))
        rows[name] = (*(count / COUNTED_STEPS for count in counts), best)
    full = rows["every step (9 of 10 trained)"][3]
    lines = ["| SDE steps | transformer forward passes per online step | backward passes | rows the rollout denoises "
             "| time per step, ratio |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {forward:g} | {backward:g} | {rollout:g} | {seconds / full:.2f} |"
              for name, (forward, backward, rollout, seconds) in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
