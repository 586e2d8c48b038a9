"""The kohya-layout LoRA beside the diffusers one: names, alphas and metadata as ComfyUI, AUTOMATIC1111 and Forge
read them, and the same images whether diffusers loads the kohya file, the diffusers file, or uses the trained UNet,
and from the pipeline that `export --format merged` writes."""

import itertools
import re
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_align.cli import main
from diffusion_align.models.kohya import KOHYA_WEIGHTS, adapter_scales, kohya_state_dict, sgm_module_path
from diffusion_align.models.policy import LORA_WEIGHTS
from test_train import run

UNET_CONFIGS = Path(__file__).parent.parent / "assets" / "unet-configs"
# sd-scripts' names: diffusers module paths for SD1/SD2, its SGM UNet's (the original SDXL code's) for SDXL
_ATTENTION = r"_attn[12]_(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)"
NAMES = {"sd": re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+" + _ATTENTION),
         "sdxl": re.compile(r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_transformer_blocks_\d+"
                            + _ATTENTION)}
NAMES["sd2"] = NAMES["sd"]


def sgm_layout(config):
    """{module path: diffusers module path} for the Linear and Conv2d modules of the original (LDM / SGM) UNet that
    the diffusers `config` describes, laid out by the original code's rules (sd-scripts' sdxl_original_unet.py,
    ComfyUI's unet_to_diffusers): input_blocks in order: conv_in, then per level each layer's resnet (.0) and, at
    attention levels, its transformer (.1), then the level's downsampler (.0.op) but at the last level;
    middle_block: resnet, transformer, resnet; output_blocks in order: per level layers + 1 layers, the last one
    followed in the same block by the upsampler (conv) but at the last level."""
    levels, n = len(config["block_out_channels"]), config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    layout = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
              "time_embed.2": "time_embedding.linear_2", "out.2": "conv_out"}
    if config.get("addition_embed_type") == "text_time":
        layout |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}

    def resnet(at, diffusers_at, shortcut):
        layers = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                  **({"skip_connection": "conv_shortcut"} if shortcut else {})}
        layout.update({f"{at}.{a}": f"{diffusers_at}.{b}" for a, b in layers.items()})

    def transformer(at, diffusers_at, blocks):
        inner = ["proj_in", "proj_out", *(f"transformer_blocks.{k}.{layer}" for k in range(blocks) for layer in (
            *(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")),
            "ff.net.0.proj", "ff.net.2"))]
        layout.update({f"{at}.{name}": f"{diffusers_at}.{name}" for name in inner})

    block = itertools.count(1)
    for level, kind in enumerate(config["down_block_types"]):
        for j in range(n):
            b = next(block)  # a resnet changes the width at a level's first layer, but at the first level
            resnet(f"input_blocks.{b}.0", f"down_blocks.{level}.resnets.{j}", level > 0 and j == 0)
            if kind.startswith("CrossAttn"):
                transformer(f"input_blocks.{b}.1", f"down_blocks.{level}.attentions.{j}", depth[level])
        if level < levels - 1:
            layout[f"input_blocks.{next(block)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    resnet("middle_block.0", "mid_block.resnets.0", False)
    transformer("middle_block.1", "mid_block.attentions.0", depth[-1])
    resnet("middle_block.2", "mid_block.resnets.1", False)
    block = itertools.count(0)
    for level, kind in enumerate(config["up_block_types"]):
        for j in range(n + 1):
            b, part = next(block), itertools.count(0)  # an output block's layers, in order
            resnet(f"output_blocks.{b}.{next(part)}", f"up_blocks.{level}.resnets.{j}", True)  # reads the skip too
            if kind.startswith("CrossAttn"):
                transformer(f"output_blocks.{b}.{next(part)}", f"up_blocks.{level}.attentions.{j}",
                            depth[levels - 1 - level])
            if j == n and level < levels - 1:
                layout[f"output_blocks.{b}.{next(part)}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    return layout


def apply_kohya_rule(unet, path):
    """What ComfyUI and AUTOMATIC1111 do with a kohya file: for the module whose path, dots as underscores, follows
    `lora_unet_` (a diffusers path, or the original UNet's, which ComfyUI maps to diffusers by the config's layout),
    W += alpha / rank x up @ down, the rank being lora_down's first dimension."""
    modules = {"lora_unet_" + name.replace(".", "_"): module for name, module in unet.named_modules()}
    modules |= {"lora_unet_" + original.replace(".", "_"): unet.get_submodule(diffusers)
                for original, diffusers in sgm_layout(unet.config).items()}
    tensors = load_file(path)
    names = [k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")]
    with torch.no_grad():
        for name in names:
            down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
            modules[name].weight += tensors[f"{name}.alpha"].item() / down.shape[0] * (up @ down)
    return len(names)


def images(pipe, family):
    size = 64 if family == "sdxl" else 32
    return pipe("a red circle on a white background", num_inference_steps=2, height=size, width=size,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family, version, architecture", [
    ("sd", "sd_v1", "stable-diffusion-v1/lora"),
    ("sd2", "sd_v2", "stable-diffusion-v2-768-v/lora"),  # the tiny SD2 predicts v, as SD2.1 768 does
    ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_kohya_file_names_alphas_metadata_images_and_merged(tmp_path, tiny_models, tiny_pairs, family, version,
                                                            architecture):
    # alpha = 2 x rank: a file that wrote alpha = rank would halve the trained update
    resolution = "train.resolution=64" if family == "sdxl" else "train.resolution=32"
    result = run(tmp_path, tiny_models[family], tiny_pairs, "model.lora_rank=4", "model.lora_alpha=8",
                 "train.lr=1e-2", resolution, "train.checkpoint_every=3")
    final = result.final_dir
    assert (tmp_path / "run" / "checkpoint-3" / KOHYA_WEIGHTS).is_file(), "every checkpoint holds one too"
    assert f"ComfyUI, AUTOMATIC1111 and Forge: `{KOHYA_WEIGHTS}`" in (final / "README.md").read_text()
    with safe_open(final / KOHYA_WEIGHTS, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
        downs = {k: f.get_tensor(k) for k in keys if k.endswith(".lora_down.weight")}
    assert keys and all(NAMES[family].fullmatch(k) for k in keys), [k for k in keys
                                                                    if not NAMES[family].fullmatch(k)][:3]
    assert any("_to_out_0." in k for k in keys)
    assert len(alphas) == len(downs) == len(keys) // 3
    assert all(a.dtype == torch.float32 and a.ndim == 0 and a.item() == 8.0 for a in alphas.values())
    assert all(d.shape[0] == 4 for d in downs.values())
    assert {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8",
            "ss_base_model_version": version, "ss_v2": str(family == "sd2"), "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture, "modelspec.title": "run",
            "diffusion_align.method": "dpo"}.items() <= metadata.items()
    assert re.fullmatch(r"[0-9a-f]{20}", metadata["diffusion_align.base_unet_digest"])

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    base = images(pipe, family)
    pipe.unet = result.denoiser.eval()  # the trained UNet itself, adapters on
    trained = images(pipe, family)
    assert abs(trained - base).max() > 1e-3, "the LoRA changes the images"
    for weight_name in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
        pipe.load_lora_weights(final, weight_name=weight_name)
        assert abs(images(pipe, family) - trained).max() < 1e-4, weight_name
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    assert apply_kohya_rule(pipe.unet, final / KOHYA_WEIGHTS) == len(downs)
    assert abs(images(pipe, family) - trained).max() < 1e-4, "as ComfyUI and AUTOMATIC1111 apply it"

    # export from the run folder: the same kohya file as training wrote, and a merged pipeline (LoRA fused into the
    # base UNet) that generates what base + LoRA does
    main(["export", str(tmp_path / "run"), "--format", "kohya", "--out", str(tmp_path / "exported.safetensors")])
    exported, written = load_file(tmp_path / "exported.safetensors"), load_file(final / KOHYA_WEIGHTS)
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in written)
    with safe_open(tmp_path / "exported.safetensors", "pt") as f:
        assert f.metadata() == metadata
    main(["export", str(tmp_path / "run"), "--format", "merged", "--out", str(tmp_path / "merged")])
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.unet.state_dict()), "a plain UNet, no adapter layers"
    assert abs(images(merged, family) - trained).max() < 1e-4


def a1111_module_name(kohya_name):
    """AUTOMATIC1111's conversion of a diffusers-style kohya UNet name to its LDM module name
    (extensions-builtin/Lora: convert_diffusers_name_to_compvis), for the attention blocks; a name it does not
    convert it takes as the LDM name with lora_unet for diffusion_model (networks.py: SDXL LoRAs' names)."""
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", kohya_name):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := re.fullmatch(r"lora_unet_mid_block_attentions_0_(.+)", kohya_name):
        return f"diffusion_model_middle_block_1_{m[1]}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", kohya_name):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    return kohya_name.replace("lora_unet", "diffusion_model")


# The original (LDM / SGM) UNets' spatial transformers, from their configs (v1-inference.yaml, v2-inference-v.yaml:
# attention at 3 of 4 levels, depth 1; sd_xl_base.yaml: attention at levels 1 and 2, depth 2 and 10, middle 10):
# block -> number of transformer blocks
LDM_TRANSFORMERS = {
    "sd": {**{f"input_blocks_{i}_1": 1 for i in (1, 2, 4, 5, 7, 8)}, "middle_block_1": 1,
           **{f"output_blocks_{i}_1": 1 for i in range(3, 12)}},
    "sdxl": {**{f"input_blocks_{i}_1": 2 for i in (4, 5)}, **{f"input_blocks_{i}_1": 10 for i in (7, 8)},
             "middle_block_1": 10, **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
             **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}},
}


@pytest.mark.parametrize("config, layout", [("sd15", "sd"), ("sd21", "sd"), ("sdxl", "sdxl")])
def test_kohya_names_map_to_every_attention_module_of_the_real_unets_in_automatic1111(config, layout):
    """The real SD1.5, SD2.1 and SDXL UNet architectures (built without weights): AUTOMATIC1111 turns each kohya name
    into the LDM module at that place, and every attention projection of the LDM UNet gets one."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            UNET_CONFIGS / f"{config}-unet.json"))
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    names = {k.split(".")[0] for k in kohya_state_dict(get_peft_model_state_dict(unet), adapter_scales(unet),
                                                       sgm_config=unet.config if layout == "sdxl" else None)}
    ldm = {f"diffusion_model_{block}_transformer_blocks_{k}_{attn}_{proj}"
           for block, depth in LDM_TRANSFORMERS[layout].items() for k in range(depth)
           for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")}
    assert {a1111_module_name(name) for name in names} == ldm
    assert len(names) == len(ldm)


def test_sdxl_kohya_names_are_sd_scripts_own_module_names_on_the_real_sdxl_unet():
    """sd-scripts' SDXL tools (sdxl_merge_lora.py, its SDXL LoRA loading) look modules up by its SGM UNet's names and
    skip any other: on the real SDXL architecture (built without weights), with a LoRA on every Linear and Conv2d,
    each name is that of the module at the same place in the original UNet's layout, and diffusers' kohya reader
    sends each one back to the module it was trained on."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(UNET_CONFIGS / "sdxl-unet.json"))
    layers = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=layers))
    peft_state = get_peft_model_state_dict(unet)
    tensors = kohya_state_dict(peft_state, adapter_scales(unet), sgm_config=unet.config)
    modules = [k.removesuffix(".lora_A.weight") for k in peft_state if k.endswith(".lora_A.weight")]
    names = [k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")]

    layout = sgm_layout(unet.config)
    at = {"lora_unet_" + original.replace(".", "_"): diffusers for original, diffusers in layout.items()}
    # hand-counted from sd_xl_base.yaml: 70 transformer blocks x (8 attention + 2 feed-forward) + 11 transformers x
    # (proj_in, proj_out) + 17 resnets x 3 + 11 skip connections + 2 downsamplers + 2 upsamplers = 788 (what
    # sd-scripts' LoRA with conv layers finds), and conv_in, conv_out, 2 time_embed, 2 label_emb outside the blocks
    assert len(layout) == len(at) == len(layers) == 794
    assert len(names) == len(set(names)) == len(modules) == 794, "one name per module, none shared"
    assert {name: at.get(name) for name in names} == dict(zip(names, modules)), "each at its module's place"
    trained_as = dict(zip(modules, names))
    assert {trained_as[m] for m in ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
                                    "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
                                    "up_blocks.0.attentions.2.proj_out", "down_blocks.0.downsamplers.0.conv",
                                    "up_blocks.1.upsamplers.0.conv", "up_blocks.2.resnets.2.conv_shortcut",
                                    "mid_block.resnets.1.time_emb_proj")} == {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", "lora_unet_output_blocks_2_1_proj_out",
        "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_5_2_conv",
        "lora_unet_output_blocks_8_0_skip_connection", "lora_unet_middle_block_2_emb_layers_1"}
    with pytest.raises(ValueError, match="down_blocks.0.resnets.0.norm3"):
        sgm_module_path("down_blocks.0.resnets.0.norm3", unet.config)

    # diffusers' SDXL kohya reader (SGM names -> diffusers) on this architecture: module i's weights carry i
    marked = {}
    for i, name in enumerate(names):
        marked |= {f"{name}.lora_down.weight": torch.full((1, 1), float(i)),
                   f"{name}.lora_up.weight": torch.zeros(1, 1), f"{name}.alpha": torch.tensor(1.0)}
    state, _ = StableDiffusionXLPipeline.lora_state_dict(marked, unet_config=unet.config)
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert {k.removesuffix(".lora_A.weight"): int(v.item()) for k, v in state.items() if k.endswith("lora_A.weight")} \
        == {module: i for i, module in enumerate(modules)}
