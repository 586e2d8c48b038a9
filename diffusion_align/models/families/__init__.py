"""Model families: what differs between the pipelines diffusion-align trains, one small module each behind one
interface (`base.Family`): recognising a pipeline folder, its denoiser and training scheduler, its text encoders
and prompt encoding, the conditioning and call of its denoiser, its LoRA targets and files' writer and labels. The
UNet families (sd.py: SD1.x and SD2.x; sdxl.py) train on DDPM's forward process (training/likelihood.py) and
sample with DDIM (training/sampling.py); the flow-matching transformers (transformer.py; sd3.py: SD3 / SD3.5;
flux.py: FLUX.1) on rectified flow (training/flow.py). A new family is one module here, added to `FAMILIES`."""

from __future__ import annotations

from .base import Conditioning, Family, TextStates, tokenize
from .flux import Flux
from .sd import SD, SD2
from .sd3 import SD3
from .sdxl import SDXL

# in the order `detect_family` asks them: the transformers by their class; SDXL (by its second text encoder) before
# SD2 before SD1.x
FAMILIES = {family.name: family for family in (SD3(), Flux(), SDXL(), SD2(), SD())}

__all__ = ["FAMILIES", "Conditioning", "Family", "TextStates", "denoiser_component", "detect_family", "get_family",
           "tokenize"]


def get_family(family: Family | str) -> Family:
    """The family named `family` (or `family` itself)."""
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}") from None


def denoiser_component(index: dict) -> str:
    """The component of a pipeline (its model_index.json) that denoises: `transformer` or `unet`."""
    return "transformer" if index.get("transformer") and index["transformer"][0] is not None else "unet"


def detect_family(index: dict, denoiser_config: dict) -> Family:
    """The family of a pipeline, from its model_index.json and its denoiser's config (`denoiser_component`)."""
    denoiser = denoiser_component(index)
    for family in FAMILIES.values():
        if family.denoiser == denoiser and family.matches(index, denoiser_config):
            return family
    raise ValueError(f"a {index.get('_class_name', 'pipeline')} with a {denoiser} "
                     f"({(index.get(denoiser) or [None, '?'])[1]}) is of no model family diffusion-align knows "
                     f"({', '.join(FAMILIES)})")
