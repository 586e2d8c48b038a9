"""LoRA weights in the kohya (sd-scripts) layout, which ComfyUI, AUTOMATIC1111 and Forge load for SD1.x, SD2.x and
SDXL (diffusers loads it too: `pipe.load_lora_weights(folder, weight_name=KOHYA_WEIGHTS)`).

Names: `lora_unet_<UNet module path, dots as underscores>` (`...attn1.to_out.0` -> `..._attn1_to_out_0`), the path
being the one sd-scripts trains on: diffusers' for SD1.x / SD2.x, and for SDXL its own SGM UNet's
(`down_blocks.1.attentions.0` -> `input_blocks.4.1`, `sgm_module_path`): sd-scripts' SDXL tools skip any other name.
Each has `.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and `.alpha`, a float32 scalar such that
alpha / rank is the scale the adapter trained with (peft's `scaling`: lora_alpha / r, or lora_alpha / sqrt(r) with
rsLoRA, per-module rank and alpha patterns included). The safetensors metadata carries the `ss_*` and `modelspec.*`
fields those programs read to class the file (without the version fields A1111 takes an SDXL LoRA for SD1 and
hides it).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict

from ..files import write_safetensors_atomic
from .families import FAMILIES, Family, get_family

KOHYA_WEIGHTS = "kohya_lora.safetensors"


def adapter_scales(unet: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """The scale peft applies to each LoRA module's update, by module path."""
    return {name: module.scaling[adapter] for name, module in unet.named_modules()
            if isinstance(getattr(module, "scaling", None), dict) and adapter in module.scaling}


# diffusers -> SGM names: a resnet's layers, and the modules outside the down / mid / up blocks
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK_PATH = re.compile(r"(?:(down|up)_blocks\.(\d+)|mid_block)\.(resnets|attentions|downsamplers|upsamplers)"
                         r"\.(\d+)\.(.+)")


def sgm_module_path(path: str, config) -> str:
    """The SGM path (sd-scripts' SDXL UNet; the LDM layout ComfyUI and AUTOMATIC1111 name modules by) of diffusers
    UNet module `path`, for the UNet `config` describes. With n = layers_per_block, down block i's layer j is
    input_blocks[1 + i(n+1) + j] (.0 its resnet, .1 its transformer) and its downsampler input_blocks[(i+1)(n+1)].0.op;
    up block i's layer j is output_blocks[i(n+1) + j], the last one holding the upsampler after the resnet and
    transformer; the middle block is resnet, transformer, resnet."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    n = config["layers_per_block"]
    match = _BLOCK_PATH.fullmatch(path)
    if match is None:
        raise ValueError(f"UNet module {path!r} has no place in the original (LDM / SGM) UNet layout: expected a "
                         f"module of down_blocks / mid_block / up_blocks or one of {', '.join(_SGM_TOP)}")
    if not isinstance(n, int):
        raise ValueError(f"UNet module {path!r}: the original (LDM / SGM) UNet layout has one layers_per_block for "
                         f"every level; the config has {n!r}")
    side, level, kind, index, rest = match.groups()
    i, j = int(level or 0), int(index)
    if kind == "resnets" and rest not in _SGM_RESNET or kind.endswith("samplers") and rest != "conv":
        raise ValueError(f"UNet module {path!r}: a resnet's layers are {', '.join(_SGM_RESNET)}, a down- or "
                         "upsampler's its conv")
    part = 0 if kind == "resnets" else 1
    if side is None:
        block = f"middle_block.{2 * j if kind == 'resnets' else 1}"
    elif side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (n + 1)}.0.op"
        block = f"input_blocks.{1 + i * (n + 1) + j}.{part}"
    else:
        if kind == "upsamplers":
            return f"output_blocks.{i * (n + 1) + n}.{2 if 'CrossAttn' in config['up_block_types'][i] else 1}.conv"
        block = f"output_blocks.{i * (n + 1) + j}.{part}"
    return f"{block}.{_SGM_RESNET[rest] if kind == 'resnets' else rest}"


def kohya_state_dict(peft_state: dict[str, torch.Tensor], scales: dict[str, float],
                     dtype: torch.dtype | None = None, sgm_config=None) -> dict[str, torch.Tensor]:
    """peft's UNet adapter state (`get_peft_model_state_dict`: `<module>.lora_A.weight`, `<module>.lora_B.weight`)
    in kohya names, with alpha = scale x rank (float32 whatever `dtype` the weights are written in). With
    `sgm_config` (an SDXL UNet's config) the module paths are sd-scripts' SDXL ones (`sgm_module_path`)."""
    tensors = {}
    for key, value in peft_state.items():
        module, part = key.rsplit(".lora_", 1)  # part: "A.weight" or "B.weight"
        name = "lora_unet_" + (module if sgm_config is None else sgm_module_path(module, sgm_config)).replace(".", "_")
        tensors[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = (
            value.detach().to(dtype or value.dtype).contiguous())
        if part.startswith("A"):
            tensors[f"{name}.alpha"] = torch.tensor(scales[module] * value.shape[0], dtype=torch.float32)
    return tensors


def kohya_labels(family: Family | str, prediction_type: str, title: str, method: str,
                 base_unet: str) -> dict[str, str]:
    """The safetensors metadata (strings) that A1111, Forge and ComfyUI read to class a LoRA, plus what trained it
    and on which UNet (`base_unet`: a digest of its weight files)."""
    version, architecture = get_family(family).kohya_base(prediction_type)
    return {"ss_network_module": "networks.lora", "ss_base_model_version": version,
            "ss_v2": str(version == FAMILIES["sd2"].kohya_version),
            "ss_v_parameterization": str(prediction_type == "v_prediction"),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": "diffusers", "modelspec.title": title,
            "diffusion_align.method": method, "diffusion_align.base_unet_digest": base_unet}


def write_kohya_lora(unet: torch.nn.Module, path: Path, labels: dict[str, str], adapter: str = "default",
                     dtype: torch.dtype | None = None) -> None:
    """Write `unet`'s adapter as a kohya file. `ss_network_dim` / `ss_network_alpha` are the most common rank and
    alpha (the per-module `.alpha` tensors are what the loaders apply). An SDXL file (by `labels`) gets
    sd-scripts' SDXL module names: sd-scripts trains SD1/SD2 on a diffusers-named UNet, SDXL on its SGM one."""
    sdxl = labels["ss_base_model_version"] == FAMILIES["sdxl"].kohya_version
    tensors = kohya_state_dict(get_peft_model_state_dict(unet, adapter_name=adapter), adapter_scales(unet, adapter),
                               dtype, unet.config if sdxl else None)
    ranks = Counter(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(t.item() for k, t in tensors.items() if k.endswith(".alpha"))
    network = {"ss_network_dim": str(ranks.most_common(1)[0][0]),
               "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}"}
    write_safetensors_atomic(tensors, path, {**labels, **network})
