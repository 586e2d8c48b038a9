"""Load the pieces of an SD1.x / SD2.x / SDXL diffusers pipeline for training.

Works with a hub id or a local diffusers folder (anything with a `model_index.json`). The family decides the
conditioning: "sd" and "sd2" use one CLIP text encoder, "sdxl" two plus size/crop micro-conditioning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

logger = logging.getLogger(__name__)

FAMILIES = ("sd", "sd2", "sdxl")


@dataclass
class DiffusionComponents:
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: DDPMScheduler
    pipeline_class: str  # the `_class_name` of model_index.json, used when saving a full pipeline
    frozen: list[torch.nn.Module] = field(init=False)

    def __post_init__(self):
        self.frozen = [self.vae, *self.text_encoders]

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def _pipeline_index(pretrained: str, revision: str | None) -> dict:
    path = Path(pretrained)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{pretrained} is not a diffusers pipeline folder: it has no model_index.json. "
                                "Expected the layout DiffusionPipeline.save_pretrained writes (unet/, vae/, "
                                "text_encoder/, tokenizer/, scheduler/, model_index.json).")
    return DiffusionPipeline.load_config(pretrained, revision=revision)


def detect_family(index: dict, unet_config: dict) -> str:
    """sdxl if the pipeline has a second text encoder; sd2 if the UNet has SD2's linear attention projections or
    attends to 1024-d text (OpenCLIP-H); sd (1.x) otherwise."""
    if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None:
        if not index.get("text_encoder") or index["text_encoder"][0] is None:
            raise ValueError("SDXL refiner checkpoints (no first text encoder) are not supported; use the SDXL base")
        return "sdxl"
    sd2 = unet_config.get("use_linear_projection", False) or unet_config["cross_attention_dim"] == 1024
    return "sd2" if sd2 else "sd"


def load_components(pretrained: str, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None) -> DiffusionComponents:
    """UNet, VAE, text encoder(s), tokenizer(s) and a DDPM training scheduler with the checkpoint's config."""
    index = _pipeline_index(pretrained, revision)
    kw = dict(revision=revision)
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **kw)
    family = detect_family(index, unet.config)
    names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    text_encoders, tokenizers = [], []
    for name in names:
        encoder_cls = getattr(transformers, index[name][1])  # e.g. CLIPTextModel, CLIPTextModelWithProjection
        text_encoders.append(encoder_cls.from_pretrained(pretrained, subfolder=name, variant=variant, **kw))
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        tokenizer_cls = getattr(transformers, index[tokenizer_name][1])
        tokenizers.append(tokenizer_cls.from_pretrained(pretrained, subfolder=tokenizer_name, **kw))
    if vae is None:
        vae_model = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kw)
    else:
        vae_model = AutoencoderKL.from_pretrained(vae)
    # whatever sampler the pipeline ships, training noise follows the DDPM forward process of its beta schedule
    noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
    for module in (vae_model, *text_encoders):
        module.requires_grad_(False).eval()
    logger.info("loaded %s (%s, %s prediction)", pretrained, family, noise_scheduler.config.prediction_type)
    return DiffusionComponents(family, unet, vae_model, text_encoders, tokenizers, noise_scheduler, index["_class_name"])


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Move a model, casting only when its dtype differs (diffusers warns on every cast)."""
    module.to(device)
    return module.to(dtype=dtype) if module.dtype != dtype else module


def set_attention(unet: UNet2DConditionModel, attention: str, device: torch.device) -> str:
    """Pick the attention kernel: xformers only where it can run (importable, CUDA), PyTorch SDPA otherwise."""
    try:
        import xformers  # noqa: F401
        have_xformers = True
    except ImportError:
        have_xformers = False
    usable = have_xformers and device.type == "cuda"
    if attention == "xformers" and not usable:
        why = "it is not installed (pip install diffusion-align[xformers])" if not have_xformers else \
            f"it needs a CUDA device and this run is on {device.type}"
        raise RuntimeError(f"model.attention=xformers was asked for, but {why}; use model.attention=sdpa or auto")
    if attention in ("xformers", "auto") and usable:
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa"  # diffusers' default processors call torch's scaled_dot_product_attention
