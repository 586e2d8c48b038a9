"""Training curves from a run's `metrics.jsonl`, drawn into the run folder as `training_curves.png`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import written_beside

# each panel: title and the metrics drawn in it, if the run logged them (methods log different ones)
PANELS = [
    ("loss", ["loss"]),
    ("implicit accuracy", ["implicit_acc"]),
    ("margin", ["reward_margin", "margin_term"]),
    ("MaPO scores", ["score_w", "score_l"]),
    ("soft labels", ["pref_prob"]),
    ("denoising error", ["model_err_w", "model_err_l", "ref_err_w", "ref_err_l"]),
    ("reward (online)", ["score_mean", "score_min", "score_max"]),
    ("win rate spread (pref_grpo)", ["reward_std"]),
    ("policy ratio (online)", ["clip_fraction", "approx_kl", "kl"]),
    ("tied groups (online)", ["zero_std_groups"]),
    ("learning rate", ["lr"]),
    ("gradient norm", ["grad_norm"]),
]


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by a crash is left out, any other bad line is an error."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
    return records


def as_text(label: str) -> str:
    """`label` drawn as written: matplotlib reads what lies between two `$` as mathtext, which fails on a name like
    cost_$10_vs_$20 (`parse_math=False` would do, but wrapped text ignores it)."""
    return label.replace("$", r"\$")


def plot_run(run_dir) -> Path:
    """Draw the curves of `run_dir/metrics.jsonl` (loss, preference accuracy, margins, errors, lr, grad norm)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (expected the output_dir of a training run)")
    records = read_metrics(path)
    panels = [(title, [k for k in keys if any(_finite(r.get(k)) for r in records)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    # online.track's scorers (e.g. the toy oracle beside the proxy reward): one panel each, own scale
    tracked = sorted({k for r in records for k in r if k.startswith("tracked_")})
    panels += [(f"tracked: {key.removeprefix('tracked_')}", [key]) for key in tracked]
    if not panels:
        raise ValueError(f"{path}: no metrics to plot")
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
            ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_title(as_text(title))  # a tracked scorer's name
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(as_text(str(run_dir)))
    fig.tight_layout()
    out = run_dir / "training_curves.png"
    with written_beside(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
