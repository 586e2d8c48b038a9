"""The trainable denoiser, UNet or transformer (LoRA adapters or all weights), and its frozen reference.

LoRA: the reference is the same UNet with its adapters switched off, so no second copy is held.
Full fine-tune: the reference is a frozen copy made before training, optionally kept on the CPU and streamed
layer by layer to the training device.
Weights are read and written in the formats diffusers loads: `pytorch_lora_weights.safetensors` for LoRA
(`pipeline.load_lora_weights(folder)`), the denoiser's folder (`unet/`, `transformer/`) for full fine-tunes. A UNet
LoRA is also written in the kohya layout that ComfyUI, AUTOMATIC1111 and Forge load (`kohya.py`) when given
`kohya_labels` to label it with; an SD3 or FLUX LoRA's file for ComfyUI is `diffusion-align export --format comfyui`'s.
"""

from __future__ import annotations

import copy
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from ..files import read_back, usual_permissions
from .families import Family, get_family
from .kohya import KOHYA_WEIGHTS, write_kohya_lora
from .loading import place

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def write_diffusers_lora(denoiser: torch.nn.Module, family: Family | str, path: Path, adapter: str = "default",
                         dtype: torch.dtype | None = None) -> None:
    """Write `denoiser`'s adapter as the file `pipeline.load_lora_weights` reads (keys prefixed `unet.` or
    `transformer.`), with its settings (lora_alpha, rank and alpha patterns, rsLoRA, target modules) so that the
    trained scale is restored. Written beside `path`, then renamed into place."""
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter)
    state = {k: v.detach().to(dtype or v.dtype) for k, v in state.items()}
    family = get_family(family)
    pipeline_cls = family.lora_pipeline_cls
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # the keys each family's diffusers LoRA script writes: the UNets' in diffusers' naming (`to_q.lora.down`),
        # the transformers' as peft names them (`to_q.lora_A`), which is what their loaders expect. That naming has
        # the attention projections alone: a UNet LoRA on other modules too keeps peft's names throughout, as
        # diffusers' loader reads a file in the naming of its first key (a mixed one loses the rest, in silence)
        converted = convert_state_dict_to_diffusers(state) if family.denoiser == "unet" else state
        if not any(".lora_A." in k or ".lora_B." in k for k in converted):
            state = converted
        pipeline_cls.save_lora_weights(tmp, weight_name=path.name, **{
            f"{family.denoiser}_lora_layers": state,
            f"{family.denoiser}_lora_adapter_metadata": denoiser.peft_config[adapter].to_dict()})
        usual_permissions(tmp / path.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_lora_naming(path: Path) -> list[str]:
    """The keys of LoRA file `path`, refusing a file whose UNet keys mix diffusers' attention names (`to_q.lora.down`)
    with peft's (`lora_A`), as `write_diffusers_lora` wrote a UNet LoRA on other modules too before it kept peft's
    names throughout: diffusers' loader reads a file in the naming of its first key and would leave out the other
    modules, in silence."""
    with read_back(path), safe_open(path, "pt") as f:
        keys = list(f.keys())
    unet = [k for k in keys if k.startswith("unet.")]  # a text encoder's keys are read on their own
    if any(".lora.down." in k for k in unet) and any(".lora_A." in k for k in unet):
        raise ValueError(f"{path}: its keys mix diffusers' attention names (.lora.down / .lora.up) with peft's "
                         "(.lora_A / .lora_B), so diffusers would load only part of it. An earlier diffusion-align "
                         "wrote a UNet LoRA on modules beside the attention so; this one writes one naming")
    return keys


def lora_config(rank: int, alpha: float | None, target_modules) -> LoraConfig:
    """The adapters a LoRA run trains: alpha = rank (scale 1) unless given; lora_B starts at zero."""
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


# the layers autocast runs in half precision whatever their weights' dtype: nearly all of a denoiser's weights
AUTOCAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)


def frozen_reference(denoiser: torch.nn.Module, dtype: torch.dtype, fsdp2: bool) -> torch.nn.Module:
    """A full fine-tune's reference: a frozen copy of the fp32 `denoiser`, in the half precision `dtype` as far as
    it then computes what the policy computes at step 0. Sharded by fsdp2, whose mixed precision computes with every
    weight of the policy in `dtype`: all of it. Else the policy keeps fp32 weights under autocast, which casts those
    of `AUTOCAST_LAYERS` alone: only they are cast, and the rest (norms, embeddings, buffers) stays fp32. A copy cast
    whole computed with rounded norm weights: other errors than the policy's, and DPO's loss off log 2 at step 0."""
    reference = copy.deepcopy(denoiser).requires_grad_(False).eval()
    if fsdp2:
        return place(reference, reference.device, dtype)
    for layer in reference.modules():
        if isinstance(layer, AUTOCAST_LAYERS):
            layer.to(dtype)
    return reference


class Policy:
    def __init__(self, denoiser: torch.nn.Module, lora_rank: int | None, lora_alpha: float | None = None,
                 lora_target_modules: list[str] = ("to_q", "to_k", "to_v", "to_out.0"), family: Family | str = "sd",
                 needs_reference: bool = True, ref_offload: bool = False, device: torch.device | str = "cpu",
                 frozen_dtype: torch.dtype = torch.float32, kohya_labels: dict[str, str] | None = None,
                 fsdp2: bool = False):
        self.denoiser = denoiser
        self.family = family
        self.kohya_labels = kohya_labels  # kohya.kohya_labels: with them, save() writes the kohya file too
        self.lora_config = None
        self.ref_denoiser = None
        if lora_rank is not None:
            # the base weights are frozen and may sit in the half-precision dtype; adapters train in fp32
            place(denoiser.requires_grad_(False), device, frozen_dtype)
            self.lora_config = lora_config(lora_rank, lora_alpha, lora_target_modules)
            denoiser.add_adapter(self.lora_config)  # lora_B starts at zero: policy == reference at step 0
            cast_training_params(denoiser, dtype=torch.float32)
        else:
            if needs_reference:  # copied and cast where the UNet was loaded (the CPU; unloaded, the meta device)
                self.ref_denoiser = frozen_reference(denoiser, frozen_dtype, fsdp2)
                if ref_offload:
                    from accelerate import cpu_offload
                    cpu_offload(self.ref_denoiser, execution_device=torch.device(device))
                else:
                    self.ref_denoiser.to(device)
            place(denoiser.requires_grad_(True), device, torch.float32)
        self.denoiser.train()

    @property
    def is_lora(self) -> bool:
        return self.lora_config is not None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @contextmanager
    def reference(self):
        """The reference UNet to call under no_grad: the base weights (adapters off) or the frozen copy."""
        if not self.is_lora:
            yield self.ref_denoiser
            return
        self.denoiser.disable_adapters()
        try:
            yield self.denoiser
        finally:
            self.denoiser.enable_adapters()

    def save(self, folder: Path) -> None:
        """Write the trained weights in the layout diffusers loads (safetensors)."""
        if self.is_lora:
            write_diffusers_lora(self.denoiser, self.family, folder / LORA_WEIGHTS)
            if self.kohya_labels is not None:
                write_kohya_lora(self.denoiser, folder / KOHYA_WEIGHTS, self.kohya_labels)
        else:
            self.denoiser.save_pretrained(folder / get_family(self.family).denoiser, safe_serialization=True)

    def load(self, folder: Path) -> None:
        """Load weights written by `save` (a checkpoint being resumed)."""
        family = get_family(self.family)
        if self.is_lora:
            state = load_file(folder / LORA_WEIGHTS)
            state = convert_unet_state_dict_to_peft({k.removeprefix(f"{family.denoiser}."): v
                                                     for k, v in state.items()})
            result = set_peft_model_state_dict(self.denoiser, state, adapter_name="default")
            if result.unexpected_keys:
                raise ValueError(f"{folder / LORA_WEIGHTS} does not match this LoRA setup: unexpected keys "
                                 f"{result.unexpected_keys[:3]}...")
        else:
            trained = family.denoiser_cls.from_pretrained(folder / family.denoiser)
            self.denoiser.load_state_dict(trained.state_dict())
