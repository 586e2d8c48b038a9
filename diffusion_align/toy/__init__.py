"""A toy text-to-image world where alignment is measurable on a laptop: scenes of one coloured shape, a base model
with the Stable Diffusion architecture pretrained on them, an oracle that judges pixels against prompts, simulated
raters, and a toy PickScore (scorer `toy-pickscore`).

    from diffusion_align.toy import oracle_scores, sample_prompts
    prompts = sample_prompts(8, seed=0, split="heldout")
    scores = oracle_scores(images, prompts)          # one float per image, higher is better
"""

from .oracle import judge, oracle_scores, rate_pairs
from .world import parse_prompt, render, sample_prompts

__all__ = ["judge", "oracle_scores", "parse_prompt", "rate_pairs", "render", "sample_prompts"]
