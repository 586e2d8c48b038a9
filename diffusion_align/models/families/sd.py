"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, whose last hidden state the UNet attends to (SD2: OpenCLIP-H,
1024-d text features, with linear attention projections)."""

from __future__ import annotations

from torch import no_grad

from .base import TextStates, UNetFamily, outside_autocast, tokenize


class SD(UNetFamily):
    name = "sd"
    text_encoders = ("text_encoder",)
    lora_pipeline = "StableDiffusionPipeline"
    kohya_version, kohya_architecture = "sd_v1", "stable-diffusion-v1"
    single_file_text_encoders = (("clip", "cond_stage_model.transformer.", 0),)
    inversion_steps = 5  # SmPO's SD1.5 setting
    # StableDiffusionPipeline.__init__ turns x0 clipping off and the offset to 1 on scheduler configs that predate
    # them (DDIMScheduler's defaults would clip at +-1): SD1.x's own, which are PNDM configs without clip_sample
    pipeline_ddim_settings = {"clip_sample": False, "steps_offset": 1}

    def matches(self, index: dict, denoiser_config: dict) -> bool:
        return not _is_sd2(denoiser_config)

    @no_grad()
    def encode_texts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
        device = text_encoders[0].device
        with outside_autocast(device):
            return TextStates(text_encoders[0](tokenize(tokenizers[0], prompts, device))[0])


class SD2(SD):
    name = "sd2"
    kohya_version, kohya_architecture = "sd_v2", "stable-diffusion-v2-512"
    # OpenCLIP ViT-H has 24 layers; diffusers' SD2.x text encoder keeps the 23 up to the penultimate, which SD2 reads
    single_file_text_encoders = (("open_clip", "cond_stage_model.model.", 1),)

    def matches(self, index: dict, denoiser_config: dict) -> bool:
        return _is_sd2(denoiser_config)

    def kohya_base(self, prediction_type: str) -> tuple[str, str]:
        # the 768 px v-prediction models (SD 2.0-v, 2.1) are their own architecture to the loaders
        return self.kohya_version, ("stable-diffusion-v2-768-v" if prediction_type == "v_prediction"
                                    else self.kohya_architecture)


def _is_sd2(unet_config: dict) -> bool:
    """SD2's UNet has linear attention projections and attends to 1024-d text (OpenCLIP-H)."""
    return unet_config.get("use_linear_projection", False) or unet_config["cross_attention_dim"] == 1024
