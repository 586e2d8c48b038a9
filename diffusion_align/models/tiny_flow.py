"""Tiny random SD3 (SD3.5-medium layout) and FLUX.1-dev pipelines, built offline from small configs.

Like tiny.py's UNet pipelines, these go through the real diffusers and transformers classes and are saved as
ordinary diffusers folders, so loading, prompt encoding and sampling run the same code as the released
checkpoints. The CLIP tokenizers are the real CLIP BPE (tiny.py); the T5 tokenizer is a real `T5Tokenizer`
(transformers 5's `T5TokenizerFast`) over a small Unigram vocabulary laid out as T5's: `<pad>` = 0, `</s>` = 1
(appended to every prompt), `<unk>` = 2, then "▁"-prefixed words and single characters, so any ASCII prompt
tokenizes (letter by letter where a word is not in the vocabulary) and anything else becomes `<unk>`.

Every width differs (the CLIPs, their projections, T5, the transformer), so feeding one encoder's states where
another's belong fails with a shape error instead of running.
"""

from __future__ import annotations

import pathlib
import string

import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from ..files import usual_permissions
from .tiny import clip_tokenizer, text_config

FLOW_FAMILIES = ("sd3", "flux")

_T5_WORDS = (
    "a an the of on in at with and or to by is it this that two three four "
    "photo picture image painting drawing portrait landscape render art style detailed close up view "
    "red green blue yellow purple orange black white grey pink brown "
    "circle square triangle shape small large tall background foreground "
    "cat dog bird horse tree house city street sky sun moon night day water sea mountain forest "
    "man woman person child face hands wooden glass metal light dark bright"
).split()


def t5_tokenizer(words=_T5_WORDS) -> T5Tokenizer:
    """A T5 tokenizer over `words` plus single characters, with T5's special tokens and their ids.

    Unigram scores make a known word one token and an unknown one its characters; like the released T5
    tokenizers it appends `</s>` and pads with `<pad>`, and it saves and loads with `from_pretrained`
    (tokenizer.json). No sentinel (`<extra_id_*>`) tokens: the pipelines only encode.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -5.0) for word in words]
    vocab += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def t5_encoder(d_model: int, tokenizer: T5Tokenizer) -> T5EncoderModel:
    # T5 v1.1's layout (gated GELU, untied embeddings), two layers
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def _vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    # 16 latent channels and no quant convs, as the SD3 and FLUX VAEs; two levels, so 32 px give 16x16 latents.
    return AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def _sd3() -> StableDiffusion3Pipeline:
    # CLIP-L (32, projection 24) and CLIP-G (48, projection 40): their penultimate states side by side are 80 wide,
    # zero-padded to T5's 96 (joint_attention_dim); their projections side by side are the 64-d pooled input.
    # The transformer is 2 heads x 28 = 56 wide, with SD3.5-medium's QK RMS-norm and a dual-attention first block.
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    clip_l, clip_g, pooled, t5_width, heads, head_dim = (32, 24), (48, 40), 24 + 40, 96, 2, 28
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_width,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled, pos_embed_max_size=32,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        ),
        # SD3's scheduler config: a constant shift of 3.0
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE constants
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
        text_encoder=CLIPTextModelWithProjection(
            text_config(clip_l[0], "quick_gelu", tokenizer, projection_dim=clip_l[1])),
        text_encoder_2=CLIPTextModelWithProjection(
            text_config(clip_g[0], "gelu", tokenizer_2, projection_dim=clip_g[1])),
        text_encoder_3=t5_encoder(t5_width, tokenizer_3),
    )


def _flux() -> FluxPipeline:
    # CLIP-L (40 wide) gives only its pooled output (pooled_projection_dim), T5 (72 wide) the attended states
    # (joint_attention_dim); the transformer is 2 heads x 16 = 32 wide, its rotary axes (4, 6, 6) summing to the
    # head width as FLUX's (16, 56, 56) do to 128. Latents are packed 2x2, so the transformer reads 64 channels.
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    clip_width, t5_width = 40, 72
    return FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        ),
        # FLUX.1-dev's scheduler config: the shift grows with the image token count (mu from the sequence length)
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
        vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX's VAE constants
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        text_encoder=CLIPTextModel(text_config(clip_width, "quick_gelu", tokenizer)),
        text_encoder_2=t5_encoder(t5_width, tokenizer_2),
    )


def save_tiny_flow_pipeline(out_dir, family: str, seed: int = 0) -> pathlib.Path:
    """Save a tiny randomly initialised `family` ("sd3" or "flux") pipeline as a diffusers folder; returns its path.

    Load it with `DiffusionPipeline.from_pretrained(path)`. SD3 generates at 32x32 px by default; FLUX's pipeline
    has a fixed default size, so pass `height=32, width=32`. Sizes must be multiples of 4 (the VAE's factor 2 times
    the transformers' 2x2 patches).
    """
    builders = {"sd3": _sd3, "flux": _flux}
    if family not in builders:
        raise ValueError(f"unknown flow-matching family {family!r}; expected one of {FLOW_FAMILIES}")
    # Seed a private copy of the RNG so callers' random streams are left as they were.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[family]()
    out_dir = pathlib.Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    usual_permissions(out_dir)  # save_pretrained leaves its weights owner-only
    return out_dir
