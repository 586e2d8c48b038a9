"""Model families: what differs between the pipelines diffusion-align trains, one small module each behind one
interface (`base.Family`): recognising a pipeline folder, its text encoders and prompt encoding, its LoRA files'
writer and labels. The UNet families (sd.py: SD1.x and SD2.x; sdxl.py) share DDPM noising and the DDIM sampler
(training/likelihood.py, training/sampling.py). A new family is one module here, added to `FAMILIES`."""

from __future__ import annotations

from .base import Family, TextStates, tokenize
from .sd import SD, SD2
from .sdxl import SDXL

# in the order `detect_family` asks them: SDXL (by its second text encoder) before SD2 before SD1.x
FAMILIES = {family.name: family for family in (SDXL(), SD2(), SD())}

__all__ = ["FAMILIES", "Family", "TextStates", "detect_family", "get_family", "tokenize"]


def get_family(family: Family | str) -> Family:
    """The family named `family` (or `family` itself)."""
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}") from None


def detect_family(index: dict, unet_config: dict) -> Family:
    """The family of a pipeline, from its model_index.json and its denoiser's config."""
    return next(family for family in FAMILIES.values() if family.matches(index, unet_config))
