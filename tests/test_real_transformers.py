"""The real SD3.5-medium and FLUX.1-dev transformers, built from their published configs
(assets/transformer-configs/, each value sourced in its README) on the meta device, so that none of their 2.5B and
12B weights is allocated: each config is recognised as its family through the family layer, each model has the
published parameter count and, block by block, the count worked out by hand from its config, the sharding wrap
policy (`BLOCK_CLASSES`) makes every transformer block a unit of its own, the family's LoRA adapts exactly the
modules diffusers' LoRA scripts adapt, and every adapted module has the key ComfyUI's loader maps a diffusers LoRA
onto, in a block that the checkpoint has; and every weight, in the names of the released single files, reads
back through diffusers' converter of those files."""

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft.utils import get_peft_model_state_dict

from diffusion_align.models.families import FAMILIES, detect_family
from diffusion_align.models.policy import lora_config
from diffusion_align.training.sharding import BLOCK_CLASSES

ASSETS = Path(__file__).parent.parent / "assets" / "transformer-configs"
FILES = {"sd3": "sd35-medium-transformer.json", "flux": "flux1-dev-transformer.json"}
MODEL_CLASS = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}

# the pipelines' model_index.json (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev): the
# pipeline and its components, which is what `detect_family` reads besides the transformer's config
INDEX = {
    "sd3": {"_class_name": "StableDiffusion3Pipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
    "flux": {"_class_name": "FluxPipeline",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
}

# Published sizes: the elements of the transformer's checkpoint tensors (README.md says where each was found).
# SD3.5-medium's include pos_embed.pos_embed, a persistent buffer of 384 * 384 positions x 1536 = 226,492,416
# that diffusers saves with the weights; FLUX has no buffers, so its count is its parameters'.
PUBLISHED = {"sd3": 2_469_663_936, "flux": 11_901_408_320}
# tensors in the checkpoint: SD3.5-medium's 909 published with its size; FLUX.1-dev's 1160 measured here (no
# published count found)
TENSORS = {"sd3": 909, "flux": 1160}

# Each sharding unit's parameters, by hand from the config; a Linear(i, o) has i*o + o.
# SD3.5-medium, H = 24 heads x 64 = 1536:
#   norm1 (adaLN-Zero) Linear(H, 6H) 14,164,992, or Linear(H, 9H) 21,247,488 in the 13 dual-attention blocks;
#   norm1_context Linear(H, 6H) 14,164,992, or Linear(H, 2H) 4,721,664 in the last block (context_pre_only);
#   attn q, k, v, add_q, add_k, add_v 6 x Linear(H, H) = 6 x 2,360,832 = 14,164,992; to_out.0 2,360,832;
#   to_add_out 2,360,832 (not in the last block); RMS q/k norms 4 x 64 = 256;
#   attn2 (dual blocks only) 4 x 2,360,832 + 2 x 64 = 9,443,456;
#   ff and ff_context (not in the last block) each Linear(H, 4H) + Linear(4H, H) = 9,443,328 + 9,438,720 = 18,882,048.
#   dual block 21,247,488 + 14,164,992 + 14,164,992 + 2 x 2,360,832 + 256 + 9,443,456 + 2 x 18,882,048 = 101,506,944
#   plain block 14,164,992 + 14,164,992 + 14,164,992 + 2 x 2,360,832 + 256 + 2 x 18,882,048 = 84,980,992
#   last block 14,164,992 + 4,721,664 + 14,164,992 + 2,360,832 + 256 + 18,882,048 = 54,294,784
#   root: patch conv 16*2*2*H + H 99,840; timestep MLP Linear(256, H) + Linear(H, H) 2,755,584; pooled MLP
#   Linear(2048, H) + Linear(H, H) 5,508,096; context_embedder Linear(4096, H) 6,292,992; norm_out Linear(H, 2H)
#   4,721,664; proj_out Linear(H, 2*2*16) 98,368 = 19,476,544
# FLUX.1-dev, H = 24 heads x 128 = 3072:
#   double block: norm1, norm1_context 2 x Linear(H, 6H) = 2 x 56,641,536; q, k, v, add_q, add_k, add_v, to_out.0,
#   to_add_out 8 x Linear(H, H) = 8 x 9,440,256; RMS q/k norms 4 x 128; ff, ff_context 2 x (Linear(H, 4H) +
#   Linear(4H, H)) = 2 x (37,761,024 + 37,751,808): 113,283,072 + 75,522,048 + 512 + 151,025,664 = 339,831,296
#   single block: norm Linear(H, 3H) 28,320,768; proj_mlp Linear(H, 4H) 37,761,024; q, k, v 3 x 9,440,256;
#   norms 2 x 128; proj_out Linear(5H, H) 47,188,992: 141,591,808
#   root: x_embedder Linear(64, H) 199,680; context_embedder Linear(4096, H) 12,585,984; timestep and guidance
#   MLPs 2 x (Linear(256, H) + Linear(H, H)) = 2 x 10,229,760; pooled MLP Linear(768, H) + Linear(H, H)
#   11,802,624; norm_out Linear(H, 2H) 18,880,512; proj_out Linear(H, 64) 196,672 = 64,124,992
SD35_DUAL, SD35_PLAIN, SD35_LAST, SD35_ROOT = 101_506_944, 84_980_992, 54_294_784, 19_476_544
FLUX_DOUBLE, FLUX_SINGLE, FLUX_ROOT = 339_831_296, 141_591_808, 64_124_992
SD35_POS_EMBED = 384 * 384 * 1536

# What diffusers' LoRA scripts adapt, block by block (the default targets of examples/dreambooth/
# train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py), written out here independently of the families'
# lists: both streams' attention projections in a joint / double block; FLUX also both streams' feed-forwards;
# FLUX's single blocks only have the attention's q, k, v (their output and MLP are proj_out / proj_mlp)
JOINT_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
DOUBLE_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")

# ComfyUI's names for these modules, from comfy/utils.py (Comfy-Org/ComfyUI a125cd84): `mmdit_to_diffusers` (SD3)
# and `flux_to_diffusers` (FLUX), which comfy/lora.py `model_lora_keys_unet` registers under
# "transformer.<diffusers name>", the key a diffusers LoRA file has (load_lora then reads "<key>.lora_A.weight"
# and "<key>.lora_B.weight"). diffusers' block prefix -> ComfyUI's, and module -> (ComfyUI module, slice): q, k
# and v are rows [0, w), [w, 2w), [2w, 3w) of one fused weight, w being ComfyUI's `hidden_size` (FLUX) or
# `depth` * 64 (SD3, depth = the hidden width // 64).
COMFY_QKV = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
COMFY = {
    "sd3": {"transformer_blocks": ("joint_blocks", {
        "attn.to_q": "x_block.attn.qkv", "attn.to_k": "x_block.attn.qkv", "attn.to_v": "x_block.attn.qkv",
        "attn.add_q_proj": "context_block.attn.qkv", "attn.add_k_proj": "context_block.attn.qkv",
        "attn.add_v_proj": "context_block.attn.qkv",
        "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
        # (attn2.to_q/k/v -> x_block.attn2.qkv and attn2.to_out.0 -> x_block.attn2.proj: not LoRA targets)
    })},
    "flux": {"transformer_blocks": ("double_blocks", {
        "attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
        "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv", "attn.add_v_proj": "txt_attn.qkv",
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    }), "single_transformer_blocks": ("single_blocks", {
        "attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1",
        # (proj_mlp -> rows [3w, 7w) of linear1 and proj_out -> linear2: not LoRA targets)
    })},
}
# how many blocks of each kind the checkpoint has (ComfyUI counts them in the checkpoint: model_detection.py)
BLOCKS = {"joint_blocks": ("sd3", "num_layers"), "double_blocks": ("flux", "num_layers"),
          "single_blocks": ("flux", "num_single_layers")}
RANK = 4


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    return {name: json.loads((ASSETS / file).read_text()) for name, file in FILES.items()}


def build(name: str, config: dict) -> torch.nn.Module:
    """The transformer of `config`, its parameters and buffers on the meta device (shapes, no storage)."""
    with init_empty_weights(include_buffers=True):
        return MODEL_CLASS[name].from_config(config)


@pytest.fixture(scope="module")
def models(configs) -> dict[str, torch.nn.Module]:
    return {name: build(name, config) for name, config in configs.items()}


@pytest.fixture(scope="module")
def adapted(configs) -> dict[str, torch.nn.Module]:
    """Each transformer with its family's LoRA, added as training adds it (`Policy`: add_adapter(lora_config))."""
    out = {}
    for name, config in configs.items():
        model = build(name, config)
        model.add_adapter(lora_config(RANK, None, FAMILIES[name].lora_targets))
        out[name] = model
    return out


def lora_modules(model: torch.nn.Module) -> set[str]:
    """The modules the LoRA file of `model` adapts: its state dict's keys without .lora_A/B.weight."""
    return {re.sub(r"\.lora_[AB]\.weight$", "", key) for key in get_peft_model_state_dict(model)}


def expected_lora_modules(name: str, config: dict) -> set[str]:
    if name == "sd3":
        last = config["num_layers"] - 1  # context_pre_only: its text stream only feeds attention, no to_add_out
        return {f"transformer_blocks.{i}.{m}" for i in range(config["num_layers"]) for m in JOINT_ATTENTION
                if not (i == last and m == "attn.to_add_out")}
    return ({f"transformer_blocks.{i}.{m}" for i in range(config["num_layers"])
             for m in JOINT_ATTENTION + DOUBLE_FEED_FORWARD}
            | {f"single_transformer_blocks.{i}.{m}" for i in range(config["num_single_layers"])
               for m in SINGLE_ATTENTION})


def comfy_key(family: str, lora_key: str) -> tuple[str, int, int | None] | None:
    """(ComfyUI module, its block index, q/k/v slice or None) of a diffusers LoRA file's module key
    ("transformer.<diffusers name>"), by the table above; None when ComfyUI maps no such key."""
    match = re.fullmatch(r"transformer\.(\w+)\.(\d+)\.(.+)", lora_key)
    if match is None or match[1] not in COMFY[family]:
        return None
    prefix, modules = COMFY[family][match[1]]
    if match[3] not in modules:
        return None
    block = int(match[2])
    return f"{prefix}.{block}.{modules[match[3]]}", block, COMFY_QKV.get(match[3].rsplit(".", 1)[-1])


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_each_published_config_is_detected_as_its_family(configs, name):
    family = detect_family(INDEX[name], configs[name])
    assert family is FAMILIES[name]
    assert family.denoiser_class == configs[name]["_class_name"] == INDEX[name]["transformer"][1]
    # the text encoders it names are the pipeline's, in the order the transformer reads their states
    assert [c for c in INDEX[name] if c.startswith("text_encoder")] == list(family.text_encoders)


def test_a_whole_model_is_labelled_with_kohyas_architecture_names(configs):
    """modelspec.architecture as kohya's sd-scripts write it (sai_model_spec.py; SD3's model type as sd3_utils.py
    tells it from the weights): SD3.5-medium's config; SD3.5-large's and SD3-medium's differ from it in the second
    attention's layers and QK norm; FLUX.1-schnell's in the guidance embedding."""
    sd3, flux = FAMILIES["sd3"], FAMILIES["flux"]
    assert sd3.model_spec(configs["sd3"], None)[0] == "stable-diffusion-3-3-5-medium"
    large = configs["sd3"] | {"dual_attention_layers": [], "num_layers": 38, "num_attention_heads": 38}
    assert sd3.model_spec(large, None)[0] == "stable-diffusion-3-3-5-large"
    assert sd3.model_spec(configs["sd3"] | {"dual_attention_layers": [], "qk_norm": None}, None)[0] == (
        "stable-diffusion-3-3-medium")
    assert flux.model_spec(configs["flux"], None)[0] == "flux-1-dev"
    assert flux.model_spec(configs["flux"] | {"guidance_embeds": False}, None)[0] == "flux-1-schnell"


def test_flux_dev_trains_with_its_distilled_guidance_and_schnell_without(configs):
    flux = FAMILIES["flux"]
    assert configs["flux"]["guidance_embeds"] is True
    assert flux.training_guidance(configs["flux"]) == 3.5
    # FLUX.1-schnell's transformer is FLUX.1-dev's without the guidance embedder (BFL's flux/util.py configs
    # differ in guidance_embed only)
    assert flux.training_guidance(configs["flux"] | {"guidance_embeds": False}) is None
    assert FAMILIES["sd3"].training_guidance(configs["sd3"]) is None


def test_the_published_configs_read_their_published_resolutions(configs):
    """SD3.5-medium's positions cover 384 patches of 2 latents a side: 6144 px through its VAE's 8 (SD3-medium's 192:
    3072 px); FLUX's rotary positions have no limit. Both read latents in multiples of 2 (16 px)."""
    sd3, flux = FAMILIES["sd3"], FAMILIES["flux"]
    assert sd3.max_latent_side(configs["sd3"]) == 768 and flux.max_latent_side(configs["flux"]) is None
    assert sd3.max_latent_side(configs["sd3"] | {"pos_embed_max_size": 192}) * 8 == 3072
    assert sd3.latent_multiple(configs["sd3"]) == flux.latent_multiple(configs["flux"]) == 2


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_each_transformer_has_its_published_size_on_the_meta_device(models, name):
    state = models[name].state_dict()
    assert all(tensor.is_meta for tensor in state.values())  # shapes only: nothing of the real size allocated
    assert sum(tensor.numel() for tensor in state.values()) == PUBLISHED[name]
    assert len(state) == TENSORS[name]


def test_the_hand_counted_blocks_add_up_to_the_published_sizes():
    # SD3.5-medium: blocks 0-12 dual, 13-22 plain, 23 last, the root, and the positional buffer
    assert 13 * SD35_DUAL + 10 * SD35_PLAIN + SD35_LAST + SD35_ROOT + SD35_POS_EMBED == PUBLISHED["sd3"]
    assert 19 * FLUX_DOUBLE + 38 * FLUX_SINGLE + FLUX_ROOT == PUBLISHED["flux"]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_every_transformer_block_is_a_sharding_unit_of_the_hand_counted_size(models, configs, name):
    model, config = models[name], configs[name]
    # the blocks `sharding.shard` wraps: every module whose class is in BLOCK_CLASSES
    units = {n: m for n, m in model.named_modules() if type(m).__name__ in BLOCK_CLASSES}
    size = {n: sum(p.numel() for p in m.parameters()) for n, m in units.items()}
    if name == "sd3":
        assert {n: type(m).__name__ for n, m in units.items()} == {
            f"transformer_blocks.{i}": "JointTransformerBlock" for i in range(24)}
        dual = set(config["dual_attention_layers"])
        assert size == {f"transformer_blocks.{i}": SD35_LAST if i == 23 else SD35_DUAL if i in dual else SD35_PLAIN
                        for i in range(24)}
        root = SD35_ROOT
    else:
        assert {n: type(m).__name__ for n, m in units.items()} == (
            {f"transformer_blocks.{i}": "FluxTransformerBlock" for i in range(19)}
            | {f"single_transformer_blocks.{i}": "FluxSingleTransformerBlock" for i in range(38)})
        assert size == ({f"transformer_blocks.{i}": FLUX_DOUBLE for i in range(19)}
                        | {f"single_transformer_blocks.{i}": FLUX_SINGLE for i in range(38)})
        root = FLUX_ROOT
    # no unit inside another, and what stays in the root unit is the embeddings and the output layer only
    assert not any(a != b and b.startswith(a + ".") for a in units for b in units)
    assert sum(p.numel() for p in model.parameters()) - sum(size.values()) == root


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_family_lora_adapts_exactly_what_diffusers_lora_scripts_adapt(models, adapted, configs, name):
    expected = expected_lora_modules(name, configs[name])
    # SD3.5-medium: 24 joint blocks x 8 projections - the last block's to_add_out = 191;
    # FLUX.1-dev: 19 double blocks x (8 projections + 4 feed-forward layers) + 38 single blocks x 3 = 228 + 114 = 342
    assert len(expected) == {"sd3": 191, "flux": 342}[name]
    assert lora_modules(adapted[name]) == expected
    # peft's rule (a module named as a target or ending in "." + target) over the plain model finds the same
    # modules: the targets match nothing beyond them
    targets = FAMILIES[name].lora_targets
    assert {n for n, _ in models[name].named_modules()
            if any(n == t or n.endswith("." + t) for t in targets)} == expected
    layers = {n: m for n, m in adapted[name].named_modules() if n in expected}
    assert all(type(m.base_layer) is torch.nn.Linear for m in layers.values())
    # rank 4 on Linear(i, o) is 4 * (i + o): SD3.5-medium 191 x 4 x (1536 + 1536) = 2,347,008; FLUX.1-dev 19 x
    # (8 x 4 x (3072 + 3072) + 4 x 4 x (3072 + 12288)) + 38 x 3 x 4 x (3072 + 3072) = 8,404,992 + 2,801,664
    lora = sum(t.numel() for t in get_peft_model_state_dict(adapted[name]).values())
    assert lora == {"sd3": 2_347_008, "flux": 11_206_656}[name]


def test_the_sd35_second_attention_is_not_adapted(adapted, configs):
    model = adapted["sd3"]
    second = {n for n, _ in model.named_modules() if re.fullmatch(r"transformer_blocks\.\d+\.attn2", n)}
    assert second == {f"transformer_blocks.{i}.attn2" for i in configs["sd3"]["dual_attention_layers"]}
    # the targets are "attn.<proj>": "attn2.to_q" does not end in ".attn.to_q", as diffusers' SD3 script intends
    assert not any(".attn2." in n for n in lora_modules(model))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_every_lora_module_maps_to_a_comfyui_key_in_an_existing_block(adapted, configs, name):
    model, config = adapted[name], configs[name]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if name == "sd3":  # ComfyUI's q/k/v slice width for SD3 is depth * 64, depth = the hidden width // 64
        width = width // 64 * 64
    modules = dict(model.named_modules())
    keys = {}
    for module in sorted(lora_modules(model)):
        key = comfy_key(name, f"transformer.{module}")  # the prefix save_lora_weights writes
        assert key is not None, f"ComfyUI maps no key for transformer.{module}"
        comfy, block, part = key
        family, field = BLOCKS[comfy.split(".")[0]]
        assert family == name and 0 <= block < config[field], comfy
        if part is not None:  # the slice ComfyUI adds this LoRA's product into has this module's rows
            assert modules[module].base_layer.out_features == width
        keys.setdefault((comfy, part), []).append(module)
    # one module per ComfyUI target, and q, k and v fill each fused qkv weight's three slices
    assert all(len(found) == 1 for found in keys.values())
    fused = {}
    for comfy, part in keys:
        if part is not None:
            fused.setdefault(comfy, set()).add(part)
    assert all(parts == {0, 1, 2} for parts in fused.values())
    if name == "sd3":
        # 24 blocks x (2 qkv + x_block proj) + 23 context_block projs (the last context block has none)
        assert (len(fused), len(keys)) == (48, 24 * 8 - 1)
        assert ("joint_blocks.23.context_block.attn.proj", None) not in keys
    else:
        # double: img and txt qkv, 2 projs, 4 mlp layers; single: linear1's q, k, v
        assert (len(fused), len(keys)) == (19 * 2 + 38, 19 * 12 + 38 * 3)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_original_layout_is_what_diffusers_single_file_converter_reads_back(models, name):
    """`export --format single-file` on the real transformers: every weight, renamed to Stability AI's MMDiT or Black
    Forest Labs' FLUX.1 names, is read back by diffusers' converter of the released files (its FLUX one assumes
    FLUX.1's 3072 width, so only the real size can be read back) to the name and shape it has; names and shapes as
    the released files hold them (flux1-dev.safetensors: 780 tensors; SD3.5-medium's MMDiT 665, as ComfyUI's model of
    its config)."""
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    from diffusion_align.models.transformer_layouts import flux_to_original, sd3_to_original
    state = models[name].state_dict()
    if name == "sd3":
        original = sd3_to_original(state, "model.diffusion_model.")
        back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
        released = {"pos_embed": (1, 384 * 384, 1536), "x_embedder.proj.weight": (1536, 16, 2, 2),
                    "context_embedder.weight": (1536, 4096), "y_embedder.mlp.0.weight": (1536, 2048),
                    "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
                    "joint_blocks.12.x_block.attn2.qkv.weight": (4608, 1536),  # dual attention in blocks 0-12
                    "joint_blocks.12.x_block.adaLN_modulation.1.weight": (9 * 1536, 1536),
                    "joint_blocks.13.x_block.adaLN_modulation.1.weight": (6 * 1536, 1536),
                    "joint_blocks.23.context_block.adaLN_modulation.1.weight": (2 * 1536, 1536),
                    "joint_blocks.0.context_block.attn.ln_k.weight": (64,),
                    "final_layer.adaLN_modulation.1.weight": (2 * 1536, 1536)}
        released = {f"model.diffusion_model.{key}": shape for key, shape in released.items()}
        assert len(original) == 665  # the state dict of ComfyUI's MMDiT built from this config (a125cd84)
        assert not any(".attn2." in k and "joint_blocks.13." in k for k in original)
        assert not any("joint_blocks.23.context_block.attn.proj" in k or "joint_blocks.23.context_block.mlp" in k
                       for k in original)
    else:
        original = flux_to_original(state)
        back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
        released = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "time_in.in_layer.weight": (3072, 256),
                    "vector_in.in_layer.weight": (3072, 768), "guidance_in.out_layer.weight": (3072, 3072),
                    "double_blocks.18.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.img_mod.lin.weight":
                    (6 * 3072, 3072), "double_blocks.0.txt_attn.norm.query_norm.scale": (128,),
                    "single_blocks.37.linear1.weight": (3 * 3072 + 4 * 3072, 3072),
                    "single_blocks.37.linear2.weight": (3072, 3072 + 4 * 3072),
                    "single_blocks.0.modulation.lin.weight": (3 * 3072, 3072),
                    "final_layer.adaLN_modulation.1.weight": (2 * 3072, 3072), "final_layer.linear.weight": (64, 3072)}
        assert len(original) == 780
    assert released.items() <= {k: tuple(t.shape) for k, t in original.items()}.items()
    assert {k: t.shape for k, t in back.items()} == {k: t.shape for k, t in state.items()}
