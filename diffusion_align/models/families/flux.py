"""FLUX.1: a rectified-flow transformer (`FluxTransformer2DModel`: double- then single-stream blocks with rotary
positions) on 16-channel latents packed 2x2 into 64-d tokens, reading T5-XXL's last states and CLIP-L's pooled
output only. FLUX.1-dev is guidance-distilled: the guidance scale is an input of the transformer, not CFG."""

from __future__ import annotations

import torch

from .base import Conditioning, TextStates, outside_autocast, tokenize
from .transformer import TransformerFamily


# the guidance scale FLUX.1-dev trains with: [D] diffusers' examples/dreambooth/train_dreambooth_lora_flux.py
# (--guidance_scale, default 3.5, passed when the transformer's config has guidance_embeds), also FluxPipeline's
# default
TRAINING_GUIDANCE = 3.5


class Flux(TransformerFamily):
    name = "flux"
    denoiser_class = "FluxTransformer2DModel"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
    lora_pipeline = "FluxPipeline"
    # attention and feed-forward of both streams: diffusers' examples/dreambooth/train_dreambooth_lora_flux.py
    # (default); the single-stream blocks' attention projections match "attn.to_q" etc. too
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    # T5 tokens: `FluxPipeline.__call__`'s and `encode_prompt`'s default; model.max_sequence_length
    # sets another (`with_max_sequence_length`)
    max_sequence_length = 512
    # FluxPipeline samples with one transformer call a step: FLUX.1-dev's guidance is the `guidance` input, not CFG
    # (its true_cfg_scale > 1 with a negative prompt, off by default, is not used here)
    classifier_free_guidance = False
    linspace_sigmas = True
    # Black Forest Labs' flux1-dev.safetensors: the transformer alone, its weights unprefixed
    single_file_prefix, single_file_vae = "", False
    single_file_loaders = ("ComfyUI (Load Diffusion Model; models/diffusion_models/, FLUX's VAE and text encoders "
                           "beside it), diffusers (FluxTransformer2DModel.from_single_file), or, as a whole pipeline, "
                           "`diffusion-align convert FILE --config BASE`")

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
        with outside_autocast(device):
            pooled = clip(tokenize(tokenizers[0], prompts, clip.device), output_hidden_states=False).pooler_output
            states = t5(tokenize(tokenizers[1], prompts, t5.device, self.max_sequence_length),
                        output_hidden_states=False)[0]
        return TextStates(states.to(device), pooled)

    def conditioning(self, texts: TextStates, original_sizes=None, crop_top_left=None, resolution=None,
                     guidance: float | None = None) -> Conditioning:
        rows = len(texts.hidden)
        scale = None if guidance is None else torch.full((rows,), float(guidance), device=texts.hidden.device)
        return Conditioning(texts.hidden, pooled_projections=texts.pooled, guidance=scale, family=self)

    def model_spec(self, denoiser_config: dict, prediction_type: str) -> tuple[str, str]:
        # the guidance embedding is FLUX.1-dev's; FLUX.1-schnell has none
        variant = "dev" if denoiser_config.get("guidance_embeds") else "schnell"
        return f"flux-1-{variant}", "https://github.com/black-forest-labs/flux"

    def input_shapes(self, denoiser_config: dict) -> tuple[int, int, int, int | None]:
        c = denoiser_config  # the transformer reads 2x2 patches of the latents: 4 channels of its input each
        return c["in_channels"] // 4, self.max_sequence_length, c["joint_attention_dim"], c["pooled_projection_dim"]

    def latent_multiple(self, denoiser_config: dict) -> int:
        return 2  # `pack_latents` makes each 2x2 latent patch a token (the transformer's own patch_size is 1)

    def training_guidance(self, denoiser_config: dict) -> float | None:
        return TRAINING_GUIDANCE if denoiser_config.get("guidance_embeds") else None

    def denoise(self, model, sample: torch.Tensor, timesteps, cond: Conditioning) -> torch.Tensor:
        """The transformer on `sample`'s 2x2 patches packed into tokens (`pack_latents`), with FluxPipeline's ids
        and timestep (the scheduler's / 1000, i.e. s), unpacked back into the latents' layout."""
        n, _, height, width = sample.shape
        timesteps = torch.as_tensor(timesteps, device=sample.device).expand(n) / 1000
        text_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype)
        out = model(hidden_states=pack_latents(sample), timestep=timesteps, guidance=cond.guidance,
                    pooled_projections=cond.pooled_projections, encoder_hidden_states=cond.encoder_hidden_states,
                    txt_ids=text_ids, img_ids=latent_image_ids(height, width, sample.device, sample.dtype),
                    return_dict=False)[0]
        return unpack_latents(out, height, width)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/2 * W/2, 4C): each 2x2 patch one token, its channels (c, dy, dx) in that order, tokens
    row by row (FluxPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents `height` x `width`."""
    n, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(n, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2 * W/2, 3): each packed token's (0, row, column), FLUX's rotary positions of the image tokens
    (FluxPipeline._prepare_latent_image_ids)."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device, dtype)
