"""The flow transformers in the names of the code they were released with: SD3 / SD3.5's MMDiT as Stability AI's
checkpoints hold it (`joint_blocks.<i>.x_block` / `.context_block`), FLUX.1's as Black Forest Labs' do
(`double_blocks`, `single_blocks`). ComfyUI, Forge and diffusers' `from_single_file` read these names, and the
community shares fine-tunes of both models so.

The two layouts differ from diffusers' in three ways besides the names:
- q, k and v are one linear layer (`qkv`); a FLUX single-stream block's q, k, v and MLP input are one (`linear1`);
- the final AdaLayerNormContinuous, and SD3's last block's context norm, split their projection's output as
  (shift, scale), where diffusers splits it as (scale, shift): its two halves are swapped;
- FLUX's QK RMS-norms keep their weight as `scale`.
"""

from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")

# diffusers' module -> the original module, or (the fused original module, the part's place in it)
_SD3_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_SD3_JOINT = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
              "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
              "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
              "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.norm_q": "x_block.attn2.ln_q",
              "attn2.norm_k": "x_block.attn2.ln_k", "attn2.to_out.0": "x_block.attn2.proj",
              "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
              "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}

_FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "context_embedder": "txt_in", "x_embedder": "img_in",
             "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                "attn.add_v_proj": ("txt_attn.qkv", 2),
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
                "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
                "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3), "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm", "proj_out": "linear2"}


def sd3_to_original(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """An `SD3Transformer2DModel`'s state dict in the names of Stability AI's MMDiT, under `prefix`. The last joint
    block's context stream ends in a norm (no attention output or MLP), whose halves are swapped like the final
    layer's."""
    last = max(int(m.group(2)) for key in state if (m := _BLOCK.match(key)))
    swapped = {"final_layer.adaLN_modulation.1", f"joint_blocks.{last}.context_block.adaLN_modulation.1"}
    out = _renamed({k: t for k, t in state.items() if k != "pos_embed.pos_embed"}, _SD3_TOP,
                   {"transformer_blocks": ("joint_blocks", _SD3_JOINT)}, swapped, prefix, "SD3's MMDiT")
    if "pos_embed.pos_embed" in state:  # the position table, a buffer of diffusers' patch embedding
        out[prefix + "pos_embed"] = state["pos_embed.pos_embed"]
    return out


def flux_to_original(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A `FluxTransformer2DModel`'s state dict in the names of Black Forest Labs' FLUX.1, under `prefix`."""
    out = _renamed(state, _FLUX_TOP, {"transformer_blocks": ("double_blocks", _FLUX_DOUBLE),
                                      "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE)},
                   {"final_layer.adaLN_modulation.1"}, prefix, "FLUX.1's transformer")
    # the QK norms are RMSNorms with a `scale`, not a `weight`
    return {re.sub(r"_norm\.weight$", "_norm.scale", key): tensor for key, tensor in out.items()}


def _renamed(state: dict[str, torch.Tensor], top: dict, blocks: dict[str, tuple[str, dict]], swapped: set[str],
             prefix: str, model: str) -> dict[str, torch.Tensor]:
    """`state` in the original names: each module renamed by `top` or, within a block, by its blocks' map; parts of a
    fused module concatenated in their order; the modules in `swapped` with their output's halves swapped."""
    out, fused = {}, {}
    for key, tensor in state.items():
        module, parameter = key.rsplit(".", 1)
        if match := _BLOCK.fullmatch(module):
            kind, index, inner = match.groups()
            original_kind, names = blocks.get(kind, (None, {}))
            original = names.get(inner)
            block = f"{original_kind}.{index}."
        else:
            original, names, block = top.get(module), top, ""
        if original is None:
            raise ValueError(f"weight {key!r} has no place in {model}'s original layout")
        if isinstance(original, tuple):
            name, place = original
            parts = sum(isinstance(other, tuple) and other[0] == name for other in names.values())
            fused.setdefault(f"{block}{name}.{parameter}", ({}, parts))[0][place] = tensor
            continue
        name = f"{block}{original}"
        out[f"{name}.{parameter}"] = _swap_halves(tensor) if name in swapped else tensor
    for name, (parts, count) in fused.items():
        if len(parts) != count:
            raise ValueError(f"{model}'s {name} fuses {count} weights, but {len(parts)} of them are in the state dict")
        out[name] = torch.cat([parts[place] for place in range(count)])
    return {prefix + name: tensor for name, tensor in out.items()}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) output rows as the original's (shift, scale)."""
    scale, shift = tensor.chunk(2, dim=0)
    return torch.cat([shift, scale])
