"""Text (and SDXL size) conditioning for the UNet: the text encoders' states (each family encodes prompts its own
way: families/), and SDXL's per-sample `add_time_ids = [orig_h, orig_w, crop_top, crop_left, res, res]` beside the
pooled embedding of its second encoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .families import Family, TextStates, get_family

logger = logging.getLogger("diffusion_align")


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None  # SDXL only: {"text_embeds": pooled, "time_ids": add_time_ids}

    def select(self, index: torch.Tensor) -> Conditioning:
        """The rows `index` (e.g. each prompt's row repeated for its group of images)."""
        added = None if self.added_cond_kwargs is None else {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[index], added)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs


class CaptionTruncation:
    """Captions longer than the text encoder reads are cut at its `model_max_length` tokens, as in every SD training
    script; the first is warned about (once), every one is counted for the run's report."""

    def __init__(self):
        self.count = 0

    def check(self, tokenizer, prompts: list[str]) -> None:
        limit = tokenizer.model_max_length
        long = [p for p, ids in zip(prompts, tokenizer(list(prompts))["input_ids"]) if len(ids) > limit]
        if long and self.count == 0:
            logger.warning("captions longer than the text encoder's %d tokens are cut there, e.g. %r (%d words); "
                           "further ones are counted, not warned about", limit, long[0][:60] + "...",
                           len(long[0].split()))
        self.count += len(long)


def encode_texts(family: Family | str, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
    """The text encoders' states for each prompt, as `family` (or the family of that name) encodes them: SD1.x /
    SD2.x the single encoder's last hidden state; SDXL both encoders' penultimate hidden states side by side, and
    the projected pooled output of the second. The encoders run in their own dtype, outside any autocast."""
    return get_family(family).encode_texts(tokenizers, text_encoders, prompts)


def conditioning(texts: TextStates, original_sizes: torch.Tensor | None = None,
                 crop_top_left: torch.Tensor | None = None, resolution: int | None = None) -> Conditioning:
    """The UNet's conditioning for one row per text. SDXL (texts with a pooled embedding) also needs each row's
    original size and crop (long tensors of shape (rows, 2)) and the training resolution."""
    if texts.pooled is None:
        return Conditioning(texts.hidden)
    target = torch.tensor([resolution, resolution]).expand(len(texts.hidden), 2)
    time_ids = torch.cat([original_sizes, crop_top_left, target], dim=1).to(texts.pooled.device, texts.pooled.dtype)
    return Conditioning(texts.hidden, {"text_embeds": texts.pooled, "time_ids": time_ids})


def encode_prompts(family: Family | str, tokenizers: list, text_encoders: list, prompts: list[str],
                   original_sizes: torch.Tensor | None = None, crop_top_left: torch.Tensor | None = None,
                   resolution: int | None = None) -> Conditioning:
    """Conditioning for one UNet row per prompt: `encode_texts`, then `conditioning`."""
    return conditioning(encode_texts(family, tokenizers, text_encoders, prompts), original_sizes, crop_top_left,
                        resolution)
