"""How much of the oracle each online reward's advantages carry: GRPO's z-scored toy PickScore against Pref-GRPO's
z-scored win rates, on groups of the base model's own images.

    .venv/bin/diffusion-align generate --model assets/toy/base --prompts assets/toy/train-prompts.txt \
        --seeds 1000-1007 --steps 20 --guidance 2 --height 32 --width 32 --device cpu --out outputs/groups-base
    .venv/bin/python benchmarks/toy_rewards.py outputs/groups-base --group-size 8

FOLDER holds G or more images of each prompt (add `--lora RUN/model/final` to draw them by a tuned model); the first
G of each prompt make a group, as the online loop samples them. A policy-gradient step raises each image's
log-likelihood in proportion to its advantage A_i, so to first order it moves a score s by
(1/G) sum_i A_i (s_i - mean_g s): the table gives that for the oracle and for the proxy, the ratio of the two
(oracle bought per unit of proxy), the correlation of A with the oracle inside a group, and, in the groups with a
failed image (oracle under 0.5, e.g. the wrong colour), the advantage that image gets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from diffusion_align.objectives import bradley_terry_preferences, group_advantages, pairwise_win_rates
from diffusion_align.rewards import load_scorer
from diffusion_align.toy.assets import folder_records, toy_pickscore
from diffusion_align.toy.oracle import oracle_scores

FAILED = 0.5  # under this the object is missing or of the wrong colour, or its shape, place and size are all off


def groups(folder: Path, size: int) -> tuple[list[Image.Image], list[str]]:
    """The first `size` images (by seed) of every prompt with that many, prompt by prompt."""
    by_prompt: dict[str, list] = {}
    for record in folder_records(folder):
        by_prompt.setdefault(record["prompt"], []).append((record["seed"], record["file_name"]))
    images, prompts = [], []
    for prompt, found in by_prompt.items():
        if len(found) >= size:
            images += [Image.open(folder / name).convert("RGB") for _, name in sorted(found)[:size]]
            prompts += [prompt] * size
    return images, prompts


def signal(advantages: torch.Tensor, oracle: torch.Tensor, proxy: torch.Tensor) -> dict[str, float]:
    """First-order oracle and proxy gains of one step along `advantages` ([groups, G] each), and A's correlation
    with the oracle inside the groups."""
    centred_oracle = oracle - oracle.mean(dim=1, keepdim=True)
    centred_proxy = proxy - proxy.mean(dim=1, keepdim=True)
    oracle_gain = (advantages * centred_oracle).mean().item()
    proxy_gain = (advantages * centred_proxy).mean().item()
    corr = torch.corrcoef(torch.stack([advantages.flatten(), centred_oracle.flatten()]))[0, 1].item()
    failed = oracle < FAILED
    mixed = failed.any(dim=1) & ~failed.all(dim=1)
    return {"oracle": oracle_gain, "proxy": proxy_gain, "ratio": oracle_gain / proxy_gain, "corr": corr,
            "failed_advantage": advantages[mixed][failed[mixed]].mean().item(), "mixed_groups": int(mixed.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--group-size", type=int, default=8)
    args = parser.parse_args()
    images, prompts = groups(args.folder, args.group_size)
    scorer = load_scorer("toy-pickscore", toy_pickscore(), device="cpu")
    proxy = scorer.score(images, prompts).view(-1, args.group_size)
    oracle = oracle_scores(images, prompts).view(-1, args.group_size)
    rewards = {"grpo (z-scored toy PickScore)": proxy,
               "pref_grpo (z-scored win rates, Bradley-Terry at T = 1)": pairwise_win_rates(
                   bradley_terry_preferences(proxy * scorer.preference_scale))}
    print(f"{len(proxy)} groups of {args.group_size}\n\n| reward | oracle gain per step | proxy gain per step "
          "| oracle / proxy | corr(A, oracle) in a group | a failed image's advantage (groups) |\n"
          + "| --- " * 6 + "|")
    for name, reward in rewards.items():
        s = signal(group_advantages(reward.flatten(), args.group_size).view(-1, args.group_size), oracle, proxy)
        print(f"| {name} | {s['oracle']:.4f} | {s['proxy']:.3f} | {s['ratio']:.4f} | {s['corr']:.3f} "
              f"| {s['failed_advantage']:+.2f} ({s['mixed_groups']}) |")


if __name__ == "__main__":
    main()
