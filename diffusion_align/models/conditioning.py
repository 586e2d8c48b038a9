"""What the denoiser is conditioned on: the text encoders' states (each family encodes prompts its own way:
families/), made into each family's `Conditioning` (SDXL's size ids, SD3's and FLUX's pooled projections, FLUX.1-dev's
guidance scale), which calls the denoiser as its family does.
"""

from __future__ import annotations

import logging

import torch

from .families import Conditioning, Family, TextStates, get_family

logger = logging.getLogger("diffusion_align")

__all__ = ["CaptionTruncation", "Conditioning", "TextStates", "conditioning", "encode_prompts", "encode_texts"]


class CaptionTruncation:
    """Captions longer than the family's longest text encoder reads are cut there, as in every training script: the
    CLIP encoder's `model_max_length` tokens (SD1.x / SD2.x, SDXL), T5's `max_sequence_length` where the family has
    T5 (SD3, FLUX: their CLIP encoders read the first 77 tokens of a caption T5 reads whole). The first is warned
    about (once), every one is counted for the run's report."""

    def __init__(self):
        self.count = 0

    def check(self, family: Family | str, tokenizers: list, prompts: list[str]) -> None:
        t5_tokens = get_family(family).max_sequence_length
        tokenizer, limit, reader = ((tokenizers[0], tokenizers[0].model_max_length, "the text encoder's")
                                    if t5_tokens is None else (tokenizers[-1], t5_tokens, "T5's"))
        long = [p for p, ids in zip(prompts, tokenizer(list(prompts))["input_ids"]) if len(ids) > limit]
        if long and self.count == 0:
            logger.warning("captions longer than %s %d tokens are cut there, e.g. %r (%d words); further ones are "
                           "counted, not warned about", reader, limit, long[0][:60] + "...", len(long[0].split()))
        self.count += len(long)


def encode_texts(family: Family | str, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
    """The text encoders' states for each prompt, as `family` (or the family of that name) encodes them: SD1.x /
    SD2.x the single encoder's last hidden state; SDXL both encoders' penultimate hidden states side by side, and
    the projected pooled output of the second; SD3 and FLUX as their pipelines' `encode_prompt`. The encoders run in
    their own dtype, outside any autocast."""
    return get_family(family).encode_texts(tokenizers, text_encoders, prompts)


def conditioning(family: Family | str, texts: TextStates, original_sizes: torch.Tensor | None = None,
                 crop_top_left: torch.Tensor | None = None, resolution: int | None = None,
                 guidance: float | None = None) -> Conditioning:
    """`family`'s conditioning for one denoiser row per text (`Family.conditioning`)."""
    return get_family(family).conditioning(texts, original_sizes, crop_top_left, resolution, guidance)


def encode_prompts(family: Family | str, tokenizers: list, text_encoders: list, prompts: list[str],
                   original_sizes: torch.Tensor | None = None, crop_top_left: torch.Tensor | None = None,
                   resolution: int | None = None, guidance: float | None = None) -> Conditioning:
    """Conditioning for one denoiser row per prompt: `encode_texts`, then `conditioning`."""
    return conditioning(family, encode_texts(family, tokenizers, text_encoders, prompts), original_sizes,
                        crop_top_left, resolution, guidance)
