"""SDXL: two CLIP text encoders, whose penultimate hidden states the UNet attends to side by side, plus the second
encoder's projected pooled output and size/crop micro-conditioning (`SDXL.conditioning`)."""

from __future__ import annotations

import torch

from .base import Conditioning, TextStates, UNetFamily, outside_autocast, tokenize


class SDXL(UNetFamily):
    name = "sdxl"
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_pipeline = "StableDiffusionXLPipeline"
    kohya_version, kohya_architecture = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    single_file_text_encoders = (("clip", "conditioner.embedders.0.transformer.", 0),
                                 ("open_clip", "conditioner.embedders.1.model.", 0))
    inversion_steps = 10  # SmPO's SDXL setting

    def matches(self, index: dict, denoiser_config: dict) -> bool:
        if not (index.get("text_encoder_2") and index["text_encoder_2"][0] is not None):
            return False
        if not index.get("text_encoder") or index["text_encoder"][0] is None:
            raise ValueError("SDXL refiner checkpoints (no first text encoder) are not supported; use the SDXL base")
        return True

    @torch.no_grad()
    def encode_texts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
        device = text_encoders[0].device
        with outside_autocast(device):
            states = []
            for tokenizer, encoder in zip(tokenizers, text_encoders):
                out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
                states.append(out.hidden_states[-2])
        return TextStates(torch.cat(states, dim=-1), out.text_embeds)

    def conditioning(self, texts: TextStates, original_sizes: torch.Tensor | None = None,
                     crop_top_left: torch.Tensor | None = None, resolution: int | None = None,
                     guidance: float | None = None) -> Conditioning:
        # add_time_ids = [orig_h, orig_w, crop_top, crop_left, res, res] per row, beside the pooled embedding
        target = torch.tensor([resolution, resolution]).expand(len(texts.hidden), 2)
        time_ids = torch.cat([original_sizes, crop_top_left, target], dim=1).to(texts.pooled.device,
                                                                                 texts.pooled.dtype)
        return Conditioning(texts.hidden, {"text_embeds": texts.pooled, "time_ids": time_ids}, family=self)

    def input_shapes(self, denoiser_config: dict) -> tuple[int, int, int, int | None]:
        c = denoiser_config  # the pooled width is what the add embedding reads besides 6 size ids
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        return c["in_channels"], 77, c["cross_attention_dim"], pooled

    def zeros_for_empty_prompt(self, index: dict) -> bool:
        # SDXL pipelines do when their `force_zeros_for_empty_prompt` is set (true in SDXL base 1.0, and the
        # pipeline's default when the key is absent) and no negative prompt is given
        return bool(index.get("force_zeros_for_empty_prompt", True))
