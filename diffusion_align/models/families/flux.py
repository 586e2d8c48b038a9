"""FLUX.1: a rectified-flow transformer (`FluxTransformer2DModel`: double- then single-stream blocks with rotary
positions) on 16-channel latents packed 2x2 into 64-d tokens, reading T5-XXL's last states and CLIP-L's pooled
output only. FLUX.1-dev is guidance-distilled: the guidance scale is an input of the transformer, not CFG."""

from __future__ import annotations

import torch

from .base import Family, TextStates, tokenize


class Flux(Family):
    name = "flux"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
    lora_pipeline = "FluxPipeline"
    max_sequence_length = 512  # T5 tokens: `FluxPipeline.__call__` and `encode_prompt`'s default

    def matches(self, index: dict, unet_config: dict) -> bool:
        # FLUX.1 dev and schnell, and the pipelines built on the same transformer
        return (index.get("transformer") or [None, None])[1] == "FluxTransformer2DModel"

    @torch.no_grad()
    def encode_texts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
        """`FluxPipeline.encode_prompt(prompts)`'s prompt_embeds and pooled_prompt_embeds: T5's last states
        (`max_sequence_length` tokens, `</s>` appended, no attention mask) and CLIP-L's pooled output (not
        projected; the first tokenizer's `model_max_length`, 77, tokens), each in its encoder's dtype.

        Besides these the transformer takes what `FluxPipeline` builds around them: `txt_ids`, zeros of shape
        (text tokens, 3); `img_ids`, one (0, row, column) triple per 2x2-packed latent token
        (`FluxPipeline._prepare_latent_image_ids` on half the latent height and width); the timestep as s in
        [0, 1] (the scheduler's timestep / 1000); and, when `guidance_embeds` (FLUX.1-dev), `guidance`, the
        guidance scale per sample (3.5 by default)."""
        clip, t5 = text_encoders
        device = clip.device
        with torch.autocast(device.type, enabled=False):
            pooled = clip(tokenize(tokenizers[0], prompts, clip.device), output_hidden_states=False).pooler_output
            states = t5(tokenize(tokenizers[1], prompts, t5.device, self.max_sequence_length),
                        output_hidden_states=False)[0]
        return TextStates(states.to(device), pooled)

    def kohya_base(self, prediction_type: str) -> tuple[str, str]:
        raise NotImplementedError("kohya-format LoRA files are not written for FLUX yet: they need BFL module names "
                                  "(lora_unet_double_blocks_*, lora_unet_single_blocks_*); save the diffusers format "
                                  "(FluxPipeline.save_lora_weights) instead")

    @property
    def inversion_steps(self) -> int:
        raise NotImplementedError("SmPO's ReNoise inversion is a DDIM recipe for the UNet families; no "
                                  "flow-matching setting is published, so FLUX has no default inversion_steps")
