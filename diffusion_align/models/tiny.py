"""Tiny random SD1.5 / SD2.1 / SDXL pipelines and a synthetic Pick-a-Pic-style pair set.

Everything here runs offline on CPU, yet goes through the same classes and loading code as the real
checkpoints: `save_tiny_pipeline` writes an ordinary diffusers folder (safetensors) and `write_tiny_pairs`
an ordinary Pick-a-Pic v2 parquet. The tokenizer is the real CLIP BPE, built from the vocabulary that ships
inside open_clip, so prompts tokenize exactly as they do for the released models.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pathlib
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw, ImageFilter
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..files import usual_permissions, written_beside

FAMILIES = ("sd", "sd2", "sdxl")

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_NUM_MERGES = 48_894  # 49,408 tokens = 2 * 256 byte symbols + merges + 2 specials

# The noise schedule every SD1.5 / SD2.1 / SDXL scheduler config ships with.
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols in vocabulary order: printable bytes stand for themselves, the
    others (space, control characters, ...) are moved to code points 256+ so no symbol is whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [chr(256 + i) for i in range(256 - len(printable))]
    return [chr(b) for b in printable] + shifted


def clip_tokenizer(model_max_length: int = 77, pad_token: str = _EOS) -> CLIPTokenizer:
    """The CLIP BPE tokenizer as SD1.5 ships it (padding with `<|endoftext|>`).

    SD2.1 and SDXL's `tokenizer_2` ship with `pad_token="!"` (id 0, OpenCLIP's padding); like those, such a
    tokenizer also reads every "!" in a prompt as the special pad token (diffusers#4153).
    """
    # find_spec locates the package without importing it (open_clip's import is slow and unneeded here).
    bpe_path = pathlib.Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]  # line 0 is a version header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [_BOS, _EOS]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def text_config(hidden: int, act: str, tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    # Vocabulary, positions and special ids follow the real tokenizer; the pooled output is read at the
    # first eos_token_id, which is right whether padding is "<|endoftext|>" or "!".
    return CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4, hidden_act=act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    # Two levels: a downsample factor of 2, so 32 px images give 16x16 latents.
    return AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=scaling_factor, force_upcast=True,
    )


def _unet(cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    # `attention_head_dim` is the number of heads in diffusers' SD configs (a historical misnomer).
    kwargs = dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=cross_attention_dim,
    )
    return UNet2DConditionModel(**(kwargs | extra))


def _build(family: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    if family == "sd":
        tokenizer = clip_tokenizer()
        return StableDiffusionPipeline(
            vae=_vae(0.18215), tokenizer=tokenizer,
            text_encoder=CLIPTextModel(text_config(32, "quick_gelu", tokenizer)), unet=_unet(32),
            scheduler=PNDMScheduler(**_BETAS, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if family == "sd2":
        # SD2.1 pads with "!" (OpenCLIP's padding id 0), and its text encoder is wider than SD1.5's:
        # code that hard-codes either breaks here.
        tokenizer = clip_tokenizer(pad_token="!")
        return StableDiffusionPipeline(
            vae=_vae(0.18215), tokenizer=tokenizer,
            text_encoder=CLIPTextModel(text_config(64, "gelu", tokenizer)),
            unet=_unet(64, use_linear_projection=True),
            scheduler=DDIMScheduler(
                **_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
            ),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if family == "sdxl":
        # Distinct widths (32, 64, projection 40) so mixing up the encoders or their outputs fails loudly:
        # cross-attention reads both penultimate states concatenated (32 + 64), the added embedding reads
        # six 8-dim size/crop embeddings plus encoder 2's projected pooled output (6 * 8 + 40).
        time_dim, proj_dim = 8, 40
        tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
        return StableDiffusionXLPipeline(
            vae=_vae(0.13025), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            text_encoder=CLIPTextModel(text_config(32, "quick_gelu", tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(
                text_config(64, "gelu", tokenizer_2, projection_dim=proj_dim)
            ),
            unet=_unet(
                32 + 64, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            ),
            scheduler=EulerDiscreteScheduler(
                **_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                use_karras_sigmas=False, prediction_type="epsilon",
            ),
            add_watermarker=False,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def save_tiny_pipeline(out_dir, family: str = "sd", seed: int = 0) -> pathlib.Path:
    """Save a tiny randomly initialised `family` pipeline as a diffusers folder; returns its path.

    Load it with `DiffusionPipeline.from_pretrained(path)`. It generates at 32x32 px by default; any multiple
    of 8 works (the pipelines' own rule), and the VAE's factor 2 makes latents half the pixel size.
    """
    # Seed a private copy of the RNG so callers' random streams are left as they were.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build(family)
    out_dir = pathlib.Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    usual_permissions(out_dir)  # save_pretrained leaves its weights owner-only
    return out_dir


_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30),
}
_SHAPES = ("circle", "square", "triangle")
_FLAWS = ("colour", "shape", "noise", "blur")  # what is wrong with the rejected image


def _draw(shape: str, colour: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One `colour` `shape` at a random place and scale on a white canvas of `size` (width, height)."""
    w, h = size
    r = rng.uniform(0.25, 0.4) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    img = Image.new("RGB", size, "white")
    draw, fill = ImageDraw.Draw(img), _COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _rejected(winner: Image.Image, shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """An image that fails the prompt: wrong colour or shape, or the winner drowned in noise or blur."""
    flaw = _FLAWS[rng.integers(len(_FLAWS))]
    if flaw == "colour":
        return _draw(shape, str(rng.choice([c for c in _COLOURS if c != colour])), winner.size, rng)
    if flaw == "shape":
        return _draw(str(rng.choice([s for s in _SHAPES if s != shape])), colour, winner.size, rng)
    if flaw == "noise":
        noisy = np.asarray(winner, dtype=np.float32) + rng.normal(0.0, 80.0, (winner.height, winner.width, 3))
        return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    return winner.filter(ImageFilter.GaussianBlur(radius=max(winner.size) / 12))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_tiny_pairs(path, num_pairs: int = 16, resolution: int = 64, seed: int = 0) -> pathlib.Path:
    """Write a Pick-a-Pic v2-style parquet of synthetic pairs with a learnable preference; returns its path.

    Captions read "a red circle on a white background"; the preferred image draws exactly that, the rejected
    one gets the colour or shape wrong or is noisy or blurred. The winner sits in slot 0 or 1 at random
    (labels 1/0 or 0/1, no ties); images are square, 4:3 or 3:4 with `resolution` as the longer side; prompts
    repeat about twice each, as in Pick-a-Pic. The file appears whole or not at all.
    """
    rng = np.random.default_rng(seed)
    prompts = [(c, s) for c in _COLOURS for s in _SHAPES]
    prompts = [prompts[i] for i in rng.permutation(len(prompts))[: max(1, (num_pairs + 1) // 2)]]
    sizes = [(resolution, resolution), (resolution, resolution * 3 // 4), (resolution * 3 // 4, resolution)]
    rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid")}
    for i in range(num_pairs):
        colour, shape = prompts[i % len(prompts)]
        winner = _draw(shape, colour, sizes[rng.integers(len(sizes))], rng)
        pair = [_jpeg(winner), _jpeg(_rejected(winner, shape, colour, rng))]
        labels = [1.0, 0.0]
        if rng.random() < 0.5:  # winner in slot 1, so readers must orient pairs by label
            pair.reverse()
            labels.reverse()
        rows["caption"].append(f"a {colour} {shape} on a white background")
        for slot in (0, 1):
            rows[f"jpg_{slot}"].append(pair[slot])
            rows[f"label_{slot}"].append(labels[slot])
            rows[f"image_{slot}_uid"].append(str(uuid.UUID(bytes=rng.bytes(16), version=4)))
    counts = {c: rows["caption"].count(c) for c in rows["caption"]}
    rows["num_example_per_prompt"] = [counts[c] for c in rows["caption"]]
    schema = pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()),
        ("image_0_uid", pa.string()), ("image_1_uid", pa.string()), ("num_example_per_prompt", pa.int64()),
    ])
    table = pa.Table.from_pydict(rows, schema=schema)

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_beside(path) as tmp:  # readers never see a half-written parquet
        pq.write_table(table, tmp)
    return path


TINY_IMAGE = 32  # pixels of the tiny image models (CLIPs, captioners); the 8-px patches give a 4x4 grid


# ---------------------------------------------------------------------------------------------------------------
# Tiny caption and text models for the DCPO caption tools (data/captions.py): real transformers classes saved the way
# the released models are, loadable by path with the Auto classes, with word-level vocabularies built here (no
# download). Random weights: what they write is arbitrary but deterministic.

CAPTIONER_KINDS = ("blip", "llava", "vit-gpt2")
_TINY_WORDS = sorted({
    *"a an the of on in with and at photo picture image painting drawing background white shape small large".split(),
    *_COLOURS, *_SHAPES, *"cat dog tree house sky sun night day wooden glass metal two three four".split(),
})
_WORD_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "user", "assistant", ":", ",", ".", '"')
# A LLaVA-1.5-style template, "USER: <image> ... ASSISTANT:" (the word tokenizer lowercases it)
_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }} "
                  "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} "
                  "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _word_tokenizer():
    """A lowercasing word-level tokenizer over `_TINY_WORDS` (what it does not know becomes <unk>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*_WORD_SPECIALS, *_TINY_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def _tiny_gpt2_config(vocab_size: int, **extra):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                      bos_token_id=_WORD_SPECIALS.index("<s>"), eos_token_id=_WORD_SPECIALS.index("</s>"),
                      pad_token_id=0, **extra)


def _tiny_blip():
    """BLIP as Salesforce/blip-image-captioning-* ships it: BERT word-piece tokenizer with [DEC] as bos."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", ",", ".", *_TINY_WORDS]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, bos_token="[DEC]")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, bos_token_id=vocab.index("[DEC]"),
                sep_token_id=vocab.index("[SEP]"), eos_token_id=vocab.index("[SEP]"), pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE, patch_size=8)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}),
                              tokenizer=tokenizer)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model, processor


def _tiny_llava():
    """A chat VLM (LLaVA-1.5 layout): CLIP vision tower, Llama text model, "<image>" expanded to 16 patch tokens."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _word_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                         crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TINY_IMAGE, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config), processor


def _tiny_vit_gpt2():
    """A VisionEncoderDecoder captioner (the nlpconnect/vit-gpt2 layout): image processor and tokenizer, no
    joint processor, so it captions the image alone."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

    tokenizer = _word_tokenizer()
    encoder = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=TINY_IMAGE, patch_size=8)
    decoder = _tiny_gpt2_config(len(tokenizer), add_cross_attention=True, is_decoder=True)
    config = VisionEncoderDecoderConfig(encoder=encoder.to_dict(), decoder=decoder.to_dict(),
                                        decoder_start_token_id=tokenizer.bos_token_id,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    parts = (tokenizer, ViTImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}))
    return VisionEncoderDecoderModel(config), parts


def save_tiny_captioner(out_dir, kind: str = "blip", seed: int = 0) -> pathlib.Path:
    """Save a tiny randomly initialised image-to-text model of `kind` (see CAPTIONER_KINDS); returns its path.

    blip: BlipForConditionalGeneration + BlipProcessor (the prompt can be a text prefix); llava: a chat VLM
    (processor with a chat template); vit-gpt2: VisionEncoderDecoderModel with a separate image processor and
    tokenizer. All load with AutoProcessor / AutoModelForImageTextToText.
    """
    builders = {"blip": _tiny_blip, "llava": _tiny_llava, "vit-gpt2": _tiny_vit_gpt2}
    if kind not in builders:
        raise ValueError(f"unknown captioner kind {kind!r}; expected one of {CAPTIONER_KINDS}")
    out_dir = pathlib.Path(out_dir)
    # Seed a private copy of the RNG so callers' random streams are left as they were.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builders[kind]()
    model.save_pretrained(out_dir, safe_serialization=True)
    for part in processor if isinstance(processor, tuple) else (processor,):
        part.save_pretrained(out_dir)
    usual_permissions(out_dir)  # save_pretrained leaves its weights owner-only
    return out_dir


def save_tiny_causal_lm(out_dir, seed: int = 0, chat: bool = False) -> pathlib.Path:
    """Save a tiny randomly initialised GPT2LMHeadModel with a word-level tokenizer (with a chat template when
    `chat`); loads with AutoModelForCausalLM / AutoTokenizer. Returns its path."""
    from transformers import GPT2LMHeadModel

    tokenizer = _word_tokenizer()
    if chat:
        tokenizer.chat_template = _CHAT_TEMPLATE
    out_dir = pathlib.Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(_tiny_gpt2_config(len(tokenizer)))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    usual_permissions(out_dir)  # save_pretrained leaves its weights owner-only
    return out_dir
