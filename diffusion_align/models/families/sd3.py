"""Stable Diffusion 3 and 3.5: an MMDiT transformer (`SD3Transformer2DModel`) on 16-channel latents, trained by
rectified flow, reading three text encoders: CLIP-L and OpenCLIP-G (penultimate states and projected pooled
outputs) and T5-XXL (last states)."""

from __future__ import annotations

import torch

from .base import Family, TextStates, tokenize


class SD3(Family):
    name = "sd3"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_pipeline = "StableDiffusion3Pipeline"
    max_sequence_length = 256  # T5 tokens: `StableDiffusion3Pipeline.__call__` and `encode_prompt`'s default

    def matches(self, index: dict, unet_config: dict) -> bool:
        # SD3, SD3.5 and their img2img / inpaint / ControlNet pipelines all denoise with this transformer
        return (index.get("transformer") or [None, None])[1] == "SD3Transformer2DModel"

    @torch.no_grad()
    def encode_texts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
        """`StableDiffusion3Pipeline.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)`:
        each CLIP's penultimate states (both CLIPs padded to the first tokenizer's `model_max_length`, 77), side by
        side, zero-padded to T5's width and followed on the sequence axis by T5's last states (`max_sequence_length`
        tokens, `</s>` appended, no attention mask); pooled = both CLIPs' projected pooled outputs side by side.
        As in the pipeline, both CLIPs' states are cast to the first CLIP's dtype."""
        clip_l, clip_g, t5 = text_encoders
        device = clip_l.device
        clip_length = tokenizers[0].model_max_length
        with torch.autocast(device.type, enabled=False):
            states, pooled = [], []
            for tokenizer, encoder in zip(tokenizers[:2], (clip_l, clip_g)):
                out = encoder(tokenize(tokenizer, prompts, encoder.device, clip_length), output_hidden_states=True)
                states.append(out.hidden_states[-2].to(dtype=clip_l.dtype, device=device))
                pooled.append(out.text_embeds.to(device))
            t5_states = t5(tokenize(tokenizers[2], prompts, t5.device, self.max_sequence_length))[0]
            t5_states = t5_states.to(device)
            clip_states = torch.cat(states, dim=-1)
            clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
            return TextStates(torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1))

    def kohya_base(self, prediction_type: str) -> tuple[str, str]:
        # sd-scripts labels SD3 LoRAs by variant ("stable-diffusion-3-" + its model type, library/sai_model_spec.py),
        # and its SD3 LoRAs name MMDiT modules, not diffusers' transformer ones
        raise NotImplementedError("kohya-format LoRA files are not written for SD3 yet; save the diffusers "
                                  "format (StableDiffusion3Pipeline.save_lora_weights) instead")

    @property
    def inversion_steps(self) -> int:
        raise NotImplementedError("SmPO's ReNoise inversion is a DDIM recipe for the UNet families; no "
                                  "flow-matching setting is published, so SD3 has no default inversion_steps")
