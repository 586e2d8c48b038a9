"""Pretrain the toy world's base text-to-image model: the Stable Diffusion architecture at toy size.

AutoencoderKL (32 px -> 8 x 8 x 4 latents), a CLIPTextModel with the real CLIP tokenizer (kept at its random
initialisation and frozen: its states differ for every word, which is all the UNet needs to read a prompt), a
UNet2DConditionModel with cross-attention, and a DDIM scheduler with SD's beta schedule. Saved as a diffusers
folder that `StableDiffusionPipeline.from_pretrained` loads; the shipped copy is stored compactly (`store_compact`,
about 7.8 MB).

Data: `world.render_flawed` over the train scenes, so the model learns the world with the flaws of its data
(noisy or stained backgrounds, wrong captions) at their rates: imperfect in ways a preference can fix.
Steps: the VAE first (reconstruction + a small KL), then the UNet on the VAE's latents (the epsilon objective,
10% empty prompts for classifier-free guidance). Deterministic for a seed on a given machine and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from ..files import write_safetensors_atomic, write_text_atomic
from ..models.tiny import clip_tokenizer
from ..progress import progress
from .world import SIZE, render_flawed, scenes

logger = logging.getLogger("diffusion_align")

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
MAX_TOKENS = 20  # the longest toy prompt is 15 tokens with its start and end tokens


@dataclass
class PretrainSettings:
    seed: int = 0
    images: int = 20_000        # rendered once, reused every epoch
    vae_steps: int = 4_000
    vae_batch: int = 32
    unet_steps: int = 6_000
    unet_batch: int = 128
    lr: float = 1e-3
    prompt_dropout: float = 0.1


def text_tower(tokenizer) -> dict:
    """The toy world's text transformer (the base model's text encoder, the toy PickScore's text side): 2 layers of
    width 32 over the real CLIP vocabulary (its 49408 x 32 token embeddings are most of both assets' size)."""
    return dict(vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_pipeline(seed: int) -> StableDiffusionPipeline:
    """The untrained toy pipeline, initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer(model_max_length=MAX_TOKENS)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_tower(tokenizer)))
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            sample_size=SIZE)
        unet = UNet2DConditionModel(
            sample_size=SIZE // 4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, cross_attention_dim=32)
        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _dataset(settings: PretrainSettings) -> tuple[torch.Tensor, list[str]]:
    """Rendered pretraining images in [-1, 1] (N, 3, 32, 32) and their captions."""
    rng = np.random.default_rng([settings.seed, 1])
    pool = scenes("pretrain")
    images, captions = [], []
    for i in rng.integers(len(pool), size=settings.images):
        image, caption = render_flawed(pool[i], rng)
        images.append(np.asarray(image))
        captions.append(caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def _train_vae(vae: AutoencoderKL, pixels: torch.Tensor, settings: PretrainSettings, gen: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.vae_steps)))
    vae.train()
    for step in progress(range(settings.vae_steps), desc="pretrain VAE"):
        batch = pixels[torch.randint(len(pixels), (settings.vae_batch,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0:
            logger.info("VAE step %d: loss %.4f", step, loss.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def _latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])


@torch.no_grad()
def _text_states(pipe: StableDiffusionPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One hidden-state tensor per distinct caption (the empty prompt at index 0) and each caption's index."""
    distinct = ["", *sorted(set(captions))]
    ids = pipe.tokenizer(distinct, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                         return_tensors="pt").input_ids
    index = {c: i for i, c in enumerate(distinct)}
    return pipe.text_encoder(ids)[0], torch.tensor([index[c] for c in captions])


def train_denoiser(model: torch.nn.Module, settings: PretrainSettings, batch_loss, desc: str) -> None:
    """`settings.unet_steps` steps of AdamW (weight decay 0.01) on `batch_loss()`, each a fresh batch's loss, with
    200 warm-up steps, then a cosine decay, and gradients clipped to norm 1: how both toy bases' denoisers learn."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-2)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / settings.unet_steps))))
    model.train()
    for step in progress(range(settings.unet_steps), desc=desc):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0:
            logger.info("%s step %d: loss %.4f", desc, step, loss.item())
    model.eval()


def _train_unet(unet: UNet2DConditionModel, latents: torch.Tensor, states: torch.Tensor, caption_index: torch.Tensor,
                settings: PretrainSettings, gen: torch.Generator) -> None:
    noise_scheduler = DDPMScheduler(**SCHEDULE)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(len(latents), (settings.unet_batch,), generator=gen)
        x0 = latents[rows]
        text = caption_index[rows].masked_fill(torch.rand(len(rows), generator=gen) < settings.prompt_dropout, 0)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=gen)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, states[text]).sample
        return F.mse_loss(pred, noise)
    train_denoiser(unet, settings, batch_loss, "pretrain UNet")


def pretrain(out_dir, settings: PretrainSettings = PretrainSettings()) -> Path:
    """Build, pretrain and save the toy base model into `out_dir` (a diffusers folder); returns its path."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pipe = build_pipeline(settings.seed)
    pipe.text_encoder.requires_grad_(False).eval()
    pixels, captions = _dataset(settings)
    _train_vae(pipe.vae, pixels, settings, gen)
    latents = _latents(pipe.vae, pixels)
    pipe.vae.register_to_config(scaling_factor=float(1 / latents.std()))  # unit-variance latents, as SD does
    latents = latents * pipe.vae.config.scaling_factor
    states, caption_index = _text_states(pipe, captions)
    _train_unet(pipe.unet, latents, states, caption_index, settings, gen)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    logger.info("toy base model saved to %s in %.0f s", out_dir, time.perf_counter() - started)
    return out_dir


HALF_STORED = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "text_encoder/model.safetensors")


def store_compact(folder, half_stored=()) -> None:
    """Shrink a saved model folder the way hub checkpoints are shipped, so the toy assets stay a few MB.

    The weight files in `half_stored` are rewritten in float16: their configs keep float32 (the text encoder's
    `dtype`), so diffusers and transformers load them back as float32 unless asked otherwise. Every
    BPE `tokenizer.json` is replaced by the `vocab.json` + `merges.txt` pair it was built from (SD1.5's own layout),
    which CLIPTokenizer reads to the same ids (other tokenizers' files are kept).
    """
    folder = Path(folder)
    for name in half_stored:
        weights = load_file(folder / name)
        write_safetensors_atomic({k: v.half().contiguous() for k, v in weights.items()}, folder / name,
                                 metadata={"format": "pt"})
    for tokenizer_file in folder.rglob("tokenizer.json"):
        model = json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]
        if model["type"] != "BPE":  # a T5 (Unigram) tokenizer has no such pair; the toy's is small as it is
            continue
        write_text_atomic(tokenizer_file.with_name("vocab.json"), json.dumps(model["vocab"], ensure_ascii=False))
        write_text_atomic(tokenizer_file.with_name("merges.txt"),
                          "#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in model["merges"]))
        tokenizer_file.unlink()
