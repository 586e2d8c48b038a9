"""Text (and SDXL size) conditioning for the UNet.

SD1.x / SD2.x: the last hidden state of the single CLIP text encoder.
SDXL: the penultimate hidden states of both encoders concatenated on the feature axis, the pooled (projected)
output of the second encoder, and per-sample `add_time_ids = [orig_h, orig_w, crop_top, crop_left, res, res]`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

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


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


@dataclass
class TextStates:
    """What the text encoders make of each prompt: the UNet's encoder_hidden_states and, for SDXL, the pooled
    embedding of the second encoder. A latent cache stores these per text."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.hidden, self.pooled))


@torch.no_grad()
def encode_texts(family: str, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
    """SD1.x / SD2.x: the single encoder's last hidden state. SDXL: both encoders' penultimate hidden states side by
    side, and the projected pooled output of the second. The encoders run in their own dtype, outside any autocast."""
    device = text_encoders[0].device
    with torch.autocast(device.type, enabled=False):
        if family != "sdxl":
            return TextStates(text_encoders[0](_tokenize(tokenizers[0], prompts, device))[0])
        states = []
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(_tokenize(tokenizer, prompts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
    return TextStates(torch.cat(states, dim=-1), out.text_embeds)


def conditioning(texts: TextStates, original_sizes: torch.Tensor | None = None,
                 crop_top_left: torch.Tensor | None = None, resolution: int | None = None) -> Conditioning:
    """The UNet's conditioning for one row per text. SDXL (texts with a pooled embedding) also needs each row's
    original size and crop (long tensors of shape (rows, 2)) and the training resolution."""
    if texts.pooled is None:
        return Conditioning(texts.hidden)
    target = torch.tensor([resolution, resolution]).expand(len(texts.hidden), 2)
    time_ids = torch.cat([original_sizes, crop_top_left, target], dim=1).to(texts.pooled.device, texts.pooled.dtype)
    return Conditioning(texts.hidden, {"text_embeds": texts.pooled, "time_ids": time_ids})


def encode_prompts(family: str, tokenizers: list, text_encoders: list, prompts: list[str],
                   original_sizes: torch.Tensor | None = None, crop_top_left: torch.Tensor | None = None,
                   resolution: int | None = None) -> Conditioning:
    """Conditioning for one UNet row per prompt: `encode_texts`, then `conditioning`."""
    return conditioning(encode_texts(family, tokenizers, text_encoders, prompts), original_sizes, crop_top_left,
                        resolution)
