"""What every model family provides (`Family`), and what its text encoders make of a prompt (`TextStates`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class TextStates:
    """What the text encoders make of each prompt: the denoiser's encoder_hidden_states and, where the family has
    one (SDXL), the pooled embedding. A latent cache stores these per text."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.hidden, self.pooled))


def tokenize(tokenizer, prompts: list[str], device, max_length: int | None = None) -> torch.Tensor:
    """Token ids padded (and cut) to `max_length`, by default the tokenizer's `model_max_length`, as every SD
    training script and pipeline tokenizes (T5's length is the pipeline's `max_sequence_length`)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


class Family(ABC):
    """One model family: how its pipeline folder is recognised, which text encoders it has and how they encode a
    prompt, and how its LoRA files are written and labelled. One instance per family (`families.FAMILIES`); a
    family compares equal to its name, so a name given in a config, on the command line or in a test selects it."""

    name: str
    denoiser: str                   # the pipeline component that denoises: "unet", or "transformer" (SD3, FLUX)
    text_encoders: tuple[str, ...]  # the pipeline's text-encoder components, in encoding order
    lora_pipeline: str              # the diffusers pipeline whose `save_lora_weights` writes its LoRA files
    kohya_version: str              # kohya's `ss_base_model_version`, which A1111, Forge and ComfyUI read
    kohya_architecture: str         # and its `modelspec.architecture`
    inversion_steps: int            # SmPO's ReNoise inversion steps at the family's resolution (its paper)

    @abstractmethod
    def matches(self, index: dict, unet_config: dict) -> bool:
        """Whether a pipeline (its model_index.json and its denoiser's config) is of this family; asked in
        `FAMILIES` order, of the families whose denoiser the pipeline has."""

    @abstractmethod
    def encode_texts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
        """The text encoders' states for each prompt, in the encoders' own dtype, outside any autocast."""

    def zeros_for_empty_prompt(self, index: dict) -> bool:
        """Whether the pipeline guides against zero text embeddings rather than the encoded "" (`index`: its
        model_index.json)."""
        return False

    def kohya_base(self, prediction_type: str) -> tuple[str, str]:
        """(ss_base_model_version, modelspec.architecture) of a LoRA trained on this family's base."""
        return self.kohya_version, self.kohya_architecture

    def __eq__(self, other) -> bool:
        return self.name == (other.name if isinstance(other, Family) else other)

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<family {self.name}>"
