"""What a toy run's preference pairs can teach: how much better, by the oracle, are the images a method is pushed
toward than the base's own images?

    .venv/bin/python benchmarks/toy_pairs.py outputs/toy-methods/sft/seed-0 [RUN ...]

Each RUN is a `diffusion-align demo` output folder of an offline method (pairs/ and pair-images/: the base model's
images of the train prompts, paired and labelled by the toy PickScore). Per run: how often the label agrees with
the oracle, and the mean oracle score of every pair image (the base on the train prompts), of the winners (each
counted once per pair it wins, as SFT trains on them), of the losers, and of the winners had the oracle labelled
the pairs. "winners - all" is the most an SFT that fitted its data exactly could gain on the train prompts.
Where the run has SmPO's pairs (pairs-cosine/), a second table asks whether its soft labels know which pairs are
right: the label's agreement with the oracle by third of SmPO's per-pair weight 2p - 1 (p from the toy PickScore's
cosines, `objectives.smpo_pref_prob`), and the winner's mean oracle lead weighted by 2p - 1 against unweighted
(as DPO weighs every pair).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from diffusion_align.objectives import smpo_pref_prob
from diffusion_align.toy.assets import folder_records
from diffusion_align.toy.oracle import RATER_TIE_MARGIN, oracle_scores


def oracle_by_image(run: Path) -> dict[str, float]:
    """The oracle score of every pair image of a run, by file name."""
    images = run / "pair-images"
    prompt_of = {r["file_name"]: r["prompt"] for r in folder_records(images)}
    names = sorted(prompt_of)
    scores = oracle_scores([Image.open(images / n).convert("RGB") for n in names], [prompt_of[n] for n in names])
    return dict(zip(names, scores.tolist()))


def labelled_pairs(folder: Path, oracle: dict[str, float], columns=()) -> dict[str, np.ndarray]:
    """The decided pairs of a pairs folder: the winner's and loser's oracle scores, and `columns` oriented the same
    way (`<column>_w`, `<column>_l`)."""
    table = pq.read_table(sorted(folder.glob("*.parquet")),
                          columns=["image_0_path", "image_1_path", "label_0", *(f"{c}_{i}" for c in columns
                                                                               for i in (0, 1))]).to_pydict()
    first_wins = np.array(table["label_0"]) == 1.0
    decided = np.array(table["label_0"]) != 0.5
    out = {}
    for name, key in [("oracle", None), *((c, c) for c in columns)]:
        first = np.array([oracle[f] for f in table["image_0_path"]] if key is None else table[f"{key}_0"])
        second = np.array([oracle[f] for f in table["image_1_path"]] if key is None else table[f"{key}_1"])
        out[f"{name}_w"] = np.where(first_wins, first, second)[decided]
        out[f"{name}_l"] = np.where(first_wins, second, first)[decided]
    return out


def pair_oracle(run: Path, oracle: dict[str, float]) -> dict[str, float]:
    """The oracle's view of one run's pairs (see the module docstring)."""
    pairs = labelled_pairs(run / "pairs", oracle)
    winner, loser = pairs["oracle_w"], pairs["oracle_l"]
    gap = winner - loser
    return {"pairs": len(winner), "agree": float(np.mean(gap > 0)),
            "within_tie_margin": float(np.mean(np.abs(gap) <= RATER_TIE_MARGIN)),
            "all": float(np.mean(list(oracle.values()))), "winners": float(winner.mean()),
            "losers": float(loser.mean()), "oracle_winners": float(np.maximum(winner, loser).mean())}


def soft_labels(run: Path, oracle: dict[str, float]) -> dict[str, float]:
    """SmPO's per-pair weights against the oracle (see the module docstring)."""
    pairs = labelled_pairs(run / "pairs-cosine", oracle, ["toy_pickscore_cosine"])
    weight = (2 * smpo_pref_prob(torch.tensor(pairs["toy_pickscore_cosine_w"]),
                                 torch.tensor(pairs["toy_pickscore_cosine_l"])) - 1).numpy()
    gap = pairs["oracle_w"] - pairs["oracle_l"]
    thirds = np.array_split(np.argsort(weight), 3)
    return {**{f"agree_{name}": float(np.mean(gap[rows] > 0)) for name, rows in zip(("low", "mid", "high"), thirds)},
            **{f"weight_{name}": float(weight[rows].mean()) for name, rows in zip(("low", "mid", "high"), thirds)},
            "lead": float(gap.mean()), "weighted_lead": float((weight * gap).sum() / weight.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | pairs | label agrees with the oracle | oracle gap under the tie margin | all pair images "
          "| winners | losers | winners - all | winners by the oracle - all |\n" + "| --- " * 9 + "|")
    oracles = {run: oracle_by_image(run) for run in args.runs}
    for run in args.runs:
        s = pair_oracle(run, oracles[run])
        print(f"| {run} | {s['pairs']} | {s['agree']:.3f} | {s['within_tie_margin']:.3f} | {s['all']:.4f} "
              f"| {s['winners']:.4f} | {s['losers']:.4f} | {s['winners'] - s['all']:+.4f} "
              f"| {s['oracle_winners'] - s['all']:+.4f} |")
    smpo_runs = [run for run in args.runs if (run / "pairs-cosine").is_dir()]
    if smpo_runs:
        print("\n| run | agrees with the oracle, lowest third of 2p - 1 (mean weight) | middle third | highest third "
              "| winner's oracle lead | the same weighted by 2p - 1 |\n" + "| --- " * 6 + "|")
    for run in smpo_runs:
        s = soft_labels(run, oracles[run])
        thirds = " | ".join(f"{s['agree_' + t]:.3f} ({s['weight_' + t]:.2f})" for t in ("low", "mid", "high"))
        print(f"| {run} | {thirds} | {s['lead']:+.4f} | {s['weighted_lead']:+.4f} |")


if __name__ == "__main__":
    main()
