"""The kohya-layout LoRA beside the diffusers one: names, alphas and metadata as ComfyUI, AUTOMATIC1111 and Forge
read them, and the same images whether diffusers loads the kohya file, the diffusers file, or uses the trained UNet,
and from the pipeline that `export --format merged` writes."""

import re
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_align.cli import main
from diffusion_align.models.kohya import KOHYA_WEIGHTS, adapter_scales, kohya_state_dict
from diffusion_align.models.policy import LORA_WEIGHTS
from test_train import run

UNET_CONFIGS = Path(__file__).parent.parent / "assets" / "unet-configs"
NAME = re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+_attn[12]_(to_q|to_k|to_v|to_out_0)"
                  r"\.(lora_down\.weight|lora_up\.weight|alpha)")


def apply_kohya_rule(unet, path):
    """What ComfyUI and AUTOMATIC1111 do with a kohya file: for the module whose path, dots as underscores, follows
    `lora_unet_`, W += alpha / rank x up @ down, the rank being lora_down's first dimension."""
    modules = {"lora_unet_" + name.replace(".", "_"): module for name, module in unet.named_modules()}
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
    assert keys and all(NAME.fullmatch(k) for k in keys), [k for k in keys if not NAME.fullmatch(k)][:3]
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
    pipe.unet = result.unet.eval()  # the trained UNet itself, adapters on
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
    (extensions-builtin/Lora: convert_diffusers_name_to_compvis), for the attention blocks."""
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", kohya_name):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := re.fullmatch(r"lora_unet_mid_block_attentions_0_(.+)", kohya_name):
        return f"diffusion_model_middle_block_1_{m[1]}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", kohya_name):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    return None


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
    names = {k.split(".")[0] for k in kohya_state_dict(get_peft_model_state_dict(unet), adapter_scales(unet))}
    ldm = {f"diffusion_model_{block}_transformer_blocks_{k}_{attn}_{proj}"
           for block, depth in LDM_TRANSFORMERS[layout].items() for k in range(depth)
           for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")}
    assert {a1111_module_name(name) for name in names} == ldm
    assert len(names) == len(ldm)
