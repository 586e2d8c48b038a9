"""Pretrain the toy world's flow-matching base: the Stable Diffusion 3 architecture at toy size, beside the UNet base.

The same world and the same data as `pretrain.py` (`render_flawed` over the pretraining scenes, the same images for
a seed), encoded by the UNet base's own VAE (copied in; SD3's pipeline also reads a `shift_factor`, 0 here since
the latents are already centred), so both bases see identical latents and differ only in their denoiser and its
training: an `SD3Transformer2DModel` (4 joint blocks, 64 wide, QK RMS-norm as SD3.5) trained by rectified flow on
SD3's logit-normal sigmas, reading SD3's three text encoders at toy size, all frozen at their random
initialisation as the UNet base's CLIP is: CLIP-L (32 wide) and CLIP-G (16 wide) over the real CLIP tokenizer,
and a T5 encoder (64 wide) whose vocabulary is the world's words. T5 reads `TEXT_TOKENS` tokens, which the toy
recipes (`configs/toy-flow/`) and every toy image (`model.max_sequence_length`, `generate --max-sequence-length`)
use too. Sampled, like every toy image, by the pipeline's own Euler sampler with classifier-free guidance.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ..models.tiny import clip_tokenizer
from ..models.tiny_flow import t5_encoder, t5_tokenizer
from ..training.flow import flow_noise, flow_timesteps, logit_normal_sigmas
from .pretrain import MAX_TOKENS, PretrainSettings, _dataset, _latents, text_tower, train_denoiser
from .world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE, SIZES

logger = logging.getLogger("diffusion_align")

STEPS = 3_000  # the transformer's pretraining steps (`PretrainSettings.unet_steps` for this base): see the README
TEXT_TOKENS = 16  # T5 tokens: the longest toy prompt is 11 with its "</s>" (SD3's pipeline default, 256, is for
                  # real captions; 256 padding tokens would make every toy step eight times slower)
WORDS = ("a", "on", "in", "the", "background", *SIZES, *COLOURS, *SHAPES, *POSITIONS, *BACKGROUNDS)
HALF_STORED = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
               "text_encoder_3/model.safetensors")


def _clip(tokenizer, width: int) -> CLIPTextModelWithProjection:
    tower = text_tower(tokenizer) | dict(hidden_size=width, intermediate_size=2 * width)
    return CLIPTextModelWithProjection(CLIPTextConfig(**tower, projection_dim=width))


def build_flow_pipeline(vae: AutoencoderKL, seed: int) -> StableDiffusion3Pipeline:
    """The untrained toy SD3 pipeline around `vae` (the UNet base's), initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = clip_tokenizer(model_max_length=MAX_TOKENS), clip_tokenizer(MAX_TOKENS, "!")
        tokenizer_3 = t5_tokenizer(WORDS)
        clip_l, clip_g, t5_width = 32, 16, 64  # CLIP-L and CLIP-G side by side (48) are padded to T5's width
        transformer = SD3Transformer2DModel(
            sample_size=SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=64,
            pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=SIZE // 4, qk_norm="rms_norm")
        text_encoders = _clip(tokenizer, clip_l), _clip(tokenizer_2, clip_g), t5_encoder(t5_width, tokenizer_3)
    for encoder in text_encoders:  # frozen at their initialisation; eval: T5's dropout off, as a loaded pipeline's
        encoder.requires_grad_(False).eval()
    vae.register_to_config(shift_factor=0.0)
    # shift 1 (none): the SD3 paper's resolution-dependent shift is 1 at its base resolution, 256 px (arXiv
    # 2403.03206, section 5.3.2), and the toy's latents are far smaller still (ours)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
        text_encoder_3=text_encoders[2])


@torch.no_grad()
def _text_states(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """The pipeline's own prompt encoding of every distinct caption (the empty prompt, which classifier-free
    guidance pairs with, at index 0): hidden states, pooled embeddings, and each caption's index."""
    distinct = ["", *sorted(set(captions))]
    hidden, _, pooled, _ = pipe.encode_prompt(distinct, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=TEXT_TOKENS)
    index = {c: i for i, c in enumerate(distinct)}
    return hidden, pooled, torch.tensor([index[c] for c in captions])


def _train_transformer(transformer: SD3Transformer2DModel, latents: torch.Tensor, hidden: torch.Tensor,
                       pooled: torch.Tensor, caption_index: torch.Tensor, settings: PretrainSettings,
                       gen: torch.Generator) -> None:
    """Rectified flow as SD3 trains: x_s = (1 - s) x_0 + s eps with logit-normal s, the velocity eps - x_0 as
    target; the optimiser, schedule and prompt dropout as the UNet base's (`train_denoiser`)."""
    def batch_loss() -> torch.Tensor:
        rows = torch.randint(len(latents), (settings.unet_batch,), generator=gen)
        text = caption_index[rows].masked_fill(torch.rand(len(rows), generator=gen) < settings.prompt_dropout, 0)
        sigmas = logit_normal_sigmas(len(rows), gen)
        noised, target = flow_noise(latents[rows], torch.randn(latents[rows].shape, generator=gen), sigmas)
        pred = transformer(hidden_states=noised, timestep=flow_timesteps(sigmas), encoder_hidden_states=hidden[text],
                           pooled_projections=pooled[text], return_dict=False)[0]
        return F.mse_loss(pred, target)
    train_denoiser(transformer, settings, batch_loss, "pretrain transformer")


def pretrain_flow(out_dir, unet_base, settings: PretrainSettings = PretrainSettings()) -> Path:
    """Build, pretrain and save the toy flow base into `out_dir` (a diffusers folder) with the VAE of `unet_base`
    (the UNet base's folder); returns its path. `settings.unet_steps` and `unet_batch` are the transformer's."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    vae = AutoencoderKL.from_pretrained(unet_base, subfolder="vae").requires_grad_(False).eval()
    pipe = build_flow_pipeline(vae, settings.seed)
    pixels, captions = _dataset(settings)
    latents = _latents(vae, pixels) * vae.config.scaling_factor  # x_0 = (latent - shift) * scale, shift 0
    hidden, pooled, caption_index = _text_states(pipe, captions)
    _train_transformer(pipe.transformer, latents, hidden, pooled, caption_index, settings, gen)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    logger.info("toy flow base saved to %s in %.0f s", out_dir, time.perf_counter() - started)
    return out_dir
