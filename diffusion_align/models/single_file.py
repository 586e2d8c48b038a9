"""A pipeline as one `.safetensors` checkpoint in its model's original layout, as the model was released and the
community shares its fine-tunes: what ComfyUI, AUTOMATIC1111 and Forge load, and diffusers with
`<Pipeline>.from_single_file`. `single_file_state` writes one (`export --format single-file`); `convert` turns one
into a diffusers pipeline folder, by diffusers' own converter, for training on the checkpoints people share so.

SD1.x, SD2.x and SDXL: the whole pipeline in the LDM / SGM layout (ComfyUI's Load Checkpoint, AUTOMATIC1111's and
Forge's models/Stable-diffusion/):
- the UNet under `model.diffusion_model.`, each module at its place in the original UNet (`kohya.sgm_module_path`);
- the VAE under `first_stage_model.`, in LDM's names: encoder `down.<level>.block.<i>`, decoder `up.<level>` with the
  levels counted from the highest resolution (diffusers counts the decoder's from the lowest), `mid.block_1`,
  `mid.attn_1`, whose q, k, v and proj_out are 1x1 convolutions there (linear layers in diffusers);
- the text encoders by the family's `single_file_text_encoders`: CLIP-L (SD1.x, SDXL's first) in transformers' names
  under its prefix; OpenCLIP's (SD2.x's ViT-H, SDXL's bigG) in open_clip's: q, k and v in one `in_proj_weight`,
  `ln_1` / `ln_2` / `mlp.c_fc` / `mlp.c_proj`, and the projection as open_clip applies it, `x @ text_projection`
  (transformers' weight transposed). SD2.x's diffusers text encoder keeps 23 of ViT-H's 24 layers (the pipeline reads
  the penultimate); the file holds those 23 and, as the 24th, a layer that returns its input (its two residual
  branches end in zero weights): the programs build all 24 and read the penultimate, as the pipeline does; without
  it ComfyUI warns on every load, and its "CLIP Set Last Layer" at -1 ran a layer of uninitialised weights.

SD3 / SD3.5 and FLUX.1, as Stability AI and Black Forest Labs release them (`transformer_layouts.py`), without the
text encoders, which are shipped apart and never trained here: SD3's MMDiT under `model.diffusion_model.` with the
VAE as above (ComfyUI's Load Checkpoint, beside its text-encoder loader); FLUX's transformer alone, unprefixed
(ComfyUI's Load Diffusion Model).

Every tensor of the parts a family's file holds is written, once, under its original name.

Fine-tunes are often shared in float8 (FLUX's most of all), to halve the download: plain (`float8_e4m3fn` or
`float8_e5m2`) or scaled, in ComfyUI's formats (each linear weight divided by a scale kept beside it, to use float8's
range). `convert` reads both (`dequantized`), into fp16 or bf16, each of which holds every float8 value.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..files import check_free, first_line, folder_written_beside, hub_load_error
from .families import FAMILIES, Family
from .kohya import sgm_module_path
from .loading import SAFETENSORS_DTYPES, pipeline_family, pipeline_index, weight_variants
from .transformer_layouts import flux_to_original, sd3_to_original

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# the blocks that tell an SD3 and a FLUX transformer's weights, which come with the prefix or, as FLUX's are released,
# without it, and the weights of theirs that a model built on their blocks (such as Chroma, on FLUX's) may lack
_TRANSFORMER_BLOCKS = {"sd3": "joint_blocks.", "flux": "double_blocks."}
_TRANSFORMER_MARKS = {"sd3": ("x_embedder.proj.weight", "y_embedder.mlp.0.weight"),
                      "flux": ("img_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight")}
# a UNet shared alone may hold its weights without the prefix (ComfyUI's Load Diffusion Model reads such files): the
# weight that tells such a file, and the one that tells a ControlNet's (which is not converted here)
_LDM_UNET_MARK, _CONTROLNET_MARK = "input_blocks.0.0.weight", "input_hint_block."
# the top modules of diffusers' UNet and transformers, and what marks a LoRA's weights: told apart in an error
_DIFFUSERS_DENOISER_MODULES = ("down_blocks.", "up_blocks.", "transformer_blocks.", "single_transformer_blocks.")
_LORA_MARKS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_down.", ".lora_up.")  # peft, diffusers, kohya
# where the other parts lie in the files: VAE and text encoders (LDM / SGM, SD3's, and FLUX "all-in-one" files')
_OTHER_PARTS = (VAE_PREFIX, "vae.", "cond_stage_model.", "conditioner.", "text_encoders.")
# of those, what a file that is not whole is not read for (its text encoders, and an all-in-one file's `vae.`): the
# --config gives them
_UNREAD_PARTS = _OTHER_PARTS[1:]
# ComfyUI's float8 files. "Scaled fp8": a `scaled_fp8` marker; beside a float8 linear weight the scale it is multiplied
# by (`scale_weight`) and one its input is divided by for float8 matmuls (`scale_input`, which leaves the product
# alone). "Mixed precision", into which ComfyUI reads the former: the same scales as `weight_scale` and `input_scale`,
# each quantized layer's format in a `comfy_quant` tensor (JSON bytes) or in the header's `_quantization_metadata`;
# its float8 format is read here, not its block-scaled or integer ones (mxfp8, nvfp4, int8)
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
_QUANTIZATION = ("scaled_fp8", ".scale_input", ".input_scale", ".comfy_quant", *_WEIGHT_SCALES)
_FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
# bitsandbytes' 4-bit weights (NF4 / FP4, as FLUX is shared too): the packed weight's statistics beside it
_BITSANDBYTES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
FLUX_WIDTH = 3072  # the only width diffusers' FLUX converter reads (`convert_flux_transformer_checkpoint_to_diffusers`)
logger = logging.getLogger("diffusion_align")
# the model spec's (modelspec.*) names for diffusers' prediction types
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}

_VAE_RESNET = re.compile(r"(encoder|decoder)\.(?:(down|up)_blocks\.(\d+)|mid_block)\.resnets\.(\d+)\.(.+)")
_VAE_ATTENTION = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)")
_VAE_SAMPLER = re.compile(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(.+)")
_VAE_TOP = re.compile(r"(?:(?:encoder|decoder)\.(?:conv_in|conv_out|conv_norm_out)|quant_conv|post_quant_conv)\.\w+")
_LDM_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_OPEN_CLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}


def unet_to_ldm(state: dict[str, torch.Tensor], config, prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers UNet's state dict in the original UNet's names (`config`: the UNet's), under `prefix`."""
    out = {}
    for key, tensor in state.items():
        module, parameter = key.rsplit(".", 1)
        out[f"{prefix}{sgm_module_path(module, config)}.{parameter}"] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's state dict in LDM's names (`levels`: its number of down / up blocks)."""
    out = {}
    for key, tensor in state.items():
        if match := _VAE_RESNET.fullmatch(key):
            side, kind, level, index, rest = match.groups()
            place = "mid.block_" + str(int(index) + 1) if kind is None else (
                f"down.{level}.block.{index}" if kind == "down" else f"up.{levels - 1 - int(level)}.block.{index}")
            name = f"{side}.{place}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        elif match := _VAE_ATTENTION.fullmatch(key):
            side, layer, parameter = match.groups()
            name = f"{side}.mid.attn_1.{_LDM_ATTENTION[layer]}.{parameter}"
            if tensor.dim() == 2:  # a linear layer's weight; LDM's is a 1x1 convolution's
                tensor = tensor[:, :, None, None]
        elif match := _VAE_SAMPLER.fullmatch(key):
            side, level, kind, parameter = match.groups()
            place = level if kind == "down" else levels - 1 - int(level)
            name = f"{side}.{place}.{kind}sample.conv.{parameter}"
        elif _VAE_TOP.fullmatch(key):  # their names but conv_norm_out's, which is norm_out
            name = key.replace("conv_norm_out", "norm_out")
        else:
            raise ValueError(f"VAE weight {key!r} has no place in LDM's autoencoder")
        out[VAE_PREFIX + name] = tensor
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's state dict in transformers' names under `prefix`."""
    return {prefix + key: tensor for key, tensor in _text_model_names(state).items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str, added_layers: int = 0) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's state dict in open_clip's names under `prefix`, followed by `added_layers`
    layers that return their input (`_identity_block`)."""
    out, qkv = {}, {}
    for key, tensor in _text_model_names(state).items():
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.t().contiguous()
        elif match := _OPEN_CLIP_LAYER.fullmatch(key):
            layer, rest = match.groups()
            block = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, projection, parameter = rest.split(".")
                qkv.setdefault(f"{block}attn.in_proj_{parameter}", {})[projection] = tensor
            else:
                module, parameter = rest.rsplit(".", 1)
                out[f"{block}{_OPEN_CLIP_NAMES[module]}.{parameter}"] = tensor
        else:
            raise ValueError(f"text encoder weight {key!r} has no place in open_clip's text model")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    own = len({k for k in out if ".resblocks." in k and k.endswith(".ln_1.weight")})
    last = f"{prefix}transformer.resblocks.{own - 1}."
    for layer in range(own, own + added_layers):
        out |= _identity_block({k.removeprefix(last): t for k, t in out.items() if k.startswith(last)},
                               f"{prefix}transformer.resblocks.{layer}.")
    return out


def _identity_block(like: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An open_clip residual block shaped as `like` (a block's tensors by name within it) that returns its input:
    x += attn(ln_1(x)), then x += mlp(ln_2(x)), each term zero, as every weight and bias is zero but the layer norms'
    scales (one)."""
    return {prefix + name: torch.ones_like(t) if name in ("ln_1.weight", "ln_2.weight") else torch.zeros_like(t)
            for name, t in like.items()}


def single_file_state(pipeline, family: Family) -> dict[str, torch.Tensor]:
    """`pipeline` (a `family` pipeline) as its family's original single file: the denoiser under the family's prefix,
    the VAE and the text encoders it holds, and the markers ComfyUI (and AUTOMATIC1111, for v_pred) read an SDXL
    checkpoint's prediction type and schedule from, empty tensors: `v_pred` for a v-prediction model, `ztsnr` for a
    zero-terminal-SNR schedule."""
    denoiser = getattr(pipeline, family.denoiser)
    state = _DENOISER_LAYOUTS[family.denoiser_class](denoiser, family.single_file_prefix)
    if family.single_file_vae:
        state |= vae_to_ldm(pipeline.vae.state_dict(), len(pipeline.vae.config.down_block_types))
    for component, (layout, prefix, dropped) in zip(family.text_encoders, family.single_file_text_encoders):
        encoder_state = getattr(pipeline, component).state_dict()
        state |= (clip_to_ldm(encoder_state, prefix) if layout == "clip"
                  else open_clip_to_ldm(encoder_state, prefix, dropped))
    scheduler = pipeline.scheduler.config
    if scheduler.get("prediction_type") == "v_prediction":
        state["v_pred"] = torch.tensor([])
    if scheduler.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.tensor([])
    return state


def single_file_labels(pipeline, family: Family) -> dict[str, str]:
    """The model spec's labels (modelspec.*) of `pipeline` as a single file: its version, architecture,
    implementation and (UNet families) prediction type."""
    prediction_type = pipeline.scheduler.config.get("prediction_type")
    architecture, implementation = family.model_spec(getattr(pipeline, family.denoiser).config, prediction_type)
    labels = {"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": implementation,
              "modelspec.architecture": architecture}
    if prediction_type in PREDICTION_TYPES:
        labels["modelspec.prediction_type"] = PREDICTION_TYPES[prediction_type]
    return labels


# each denoiser class's converter to its original names (the model and the prefix its weights are written under)
_DENOISER_LAYOUTS = {
    "UNet2DConditionModel": lambda unet, prefix: unet_to_ldm(unet.state_dict(), unet.config, prefix),
    "SD3Transformer2DModel": lambda transformer, prefix: sd3_to_original(transformer.state_dict(), prefix),
    "FluxTransformer2DModel": lambda transformer, prefix: flux_to_original(transformer.state_dict(), prefix),
}


def _text_model_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's state dict with its text model's weights under `text_model.`, the names the original
    checkpoints hold (transformers 5.6 dropped the prefix from CLIPTextModel's, not CLIPTextModelWithProjection's)."""
    return {key if key.startswith("text_model.") or key == "text_projection.weight" else f"text_model.{key}": tensor
            for key, tensor in state.items()}


def convert(checkpoint: Path, out: Path, config: str | None = None, overwrite: bool = False,
            variant: str | None = None) -> Path:
    """Write the single-file `checkpoint` (.safetensors) as a diffusers pipeline folder `out`, in the checkpoint's
    dtype. `config`: a diffusers pipeline of the same family (hub id or folder) whose configs, tokenizers and scheduler
    are taken, and the parts the file leaves out (the text encoders of a UNet alone and of every SD3 or FLUX file; the
    VAE), its denoiser checked against the file's weight by weight; for a whole SD1.x, SD2.x or SDXL checkpoint, None
    lets diffusers pick one on the hub by the weights' shapes (for SD2.x, the v-prediction SD2.1). `variant` (such as
    "fp16"): the weights of the --config's parts to load, as diffusers' `variant` (None: its unvaried ones). A UNet
    alone is read with or without the `model.diffusion_model.` prefix (`_file_keys`). The file's own markers set the
    scheduler: `v_pred` (an empty tensor, as v-prediction SDXL checkpoints and `export` carry) or
    `modelspec.prediction_type` the prediction type, `ztsnr` the zero-terminal-SNR schedule (`_marked_scheduler`).
    A file with float8 weights, plain or scaled in ComfyUI's formats (not a whole one scaled), comes out in fp16 where
    its other denoiser weights are fp16, else in bf16 (`dequantized`)."""
    if out.resolve() in (checkpoint.resolve(), *checkpoint.resolve().parents):
        raise ValueError(f"--out {out} is or holds {checkpoint}, which the pipeline written there would replace; "
                         "give another folder")
    check_free(out, overwrite)
    if checkpoint.suffix != ".safetensors":  # diffusers reads a file by its suffix: any other goes to torch.load
        raise ValueError(f"{checkpoint}: expected a .safetensors checkpoint (a .ckpt file is a pickle, which is not "
                         "read here: it can run code; convert it to safetensors where you trust it. A safetensors "
                         "file under another suffix, such as .sft, converts once renamed)")
    try:
        with safe_open(checkpoint, "pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{checkpoint}: not a readable safetensors file ({first_line(err)})") from None
    family, whole = _checkpoint_family(checkpoint, shapes)  # a UNet alone: None, its family is the --config's
    # what is read: a whole file's text encoders too
    read = {k: (shape, dtypes[k]) for k, shape in shapes.items() if whole or not k.startswith(_UNREAD_PARTS)}
    _check_quantization(checkpoint, read, whole, metadata)
    # from here on, each weight by the name it is read under (an unprefixed UNet's with the prefix)
    file_keys = _file_keys([k for k in shapes if not k.endswith(_QUANTIZATION)])
    shapes = {name: shapes[key] for name, key in file_keys.items()}
    dtypes = {name: dtypes[key] for name, key in file_keys.items()}
    keys = set(shapes)
    # the dtype of all: the denoiser's (not the VAE's, a text encoder's or an old file's float32 schedule buffers); of
    # a denoiser in float8, that of its other weights where they are fp16, else bf16
    denoiser = sorted(k for k in keys if k.startswith((UNET_PREFIX, *_TRANSFORMER_BLOCKS.values())))
    if any(dtypes[k].startswith("F8") for k in denoiser):
        dtype = "F16" if {dtypes[k] for k in denoiser if not dtypes[k].startswith("F8")} == {"F16"} else "BF16"
    else:
        dtype = dtypes[denoiser[0]]
    if config is None and not whole:
        raise ValueError(f"{checkpoint} holds {f'a {family} transformer' if family else 'a UNet'} without the text "
                         "encoders: give the pipeline they come from with --config (hub id or folder)")
    if config is not None:
        config_family, denoiser_config = pipeline_family(config, pipeline_index(config, what="--config"))
        if family is None and config_family.denoiser == "unet":
            family = config_family  # a UNet alone is of its --config's family, checked weight by weight below
        if config_family != family:
            raise ValueError(f"--config {config} is a {config_family} pipeline, but {checkpoint} holds "
                             f"{f'a {family} model' if family else 'a UNet'}; give a pipeline of its family")
    if not whole:
        _check_denoiser(checkpoint, shapes, family, config, denoiser_config)
    elif variant is not None:
        logger.warning("%s is a whole checkpoint, which takes no weights from the --config: --variant %s is not used",
                       checkpoint, variant)
    local = config is not None and Path(config).exists()
    options = {"local_files_only": local, "torch_dtype": SAFETENSORS_DTYPES.get(dtype, torch.float32)}
    if family.name in ("sd", "sd2"):  # a pipeline for training: no safety checker loaded, as the whole file has none
        options |= {"safety_checker": None, "requires_safety_checker": False}
    try:
        if whole:
            pipeline = family.lora_pipeline_cls.from_single_file(str(checkpoint), config=config, **options)
        else:
            pipeline = _completed_pipeline(checkpoint, file_keys, family, config, options | {"variant": variant})
    except (OSError, ValueError) as err:
        if local:
            hint = "" if whole else _variant_hint(Path(config), variant, _taken_from_config(family, keys))
            raise ValueError(f"{checkpoint}: diffusers could not convert it with --config {config} "
                             f"({first_line(err)}){hint}") from None
        if config is not None:
            raise hub_load_error("--config", config, err) from None
        raise FileNotFoundError(f"{checkpoint}: diffusers could not fetch the configs of its architecture from the hub "
                                f"({first_line(err)}); give a diffusers pipeline of the same family with --config (a "
                                "local folder works offline)") from None
    pipeline.scheduler = _marked_scheduler(checkpoint, keys, metadata, pipeline.scheduler)
    with folder_written_beside(out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return out


def _unprefixed_unet(keys) -> bool:
    """Whether the weights named `keys` are a UNet's in the original names, without the prefix."""
    return _LDM_UNET_MARK in keys and not any(k.startswith(UNET_PREFIX) for k in keys)


def _file_keys(keys: list[str]) -> dict[str, str]:
    """{the name each weight of a file is read under: its name in the file (`keys`)}. An unprefixed UNet's weights
    are read under the prefix, as diffusers' converter reads them; the other parts', and the file's markers (one
    word, such as `v_pred`), as they are named."""
    unprefixed = _unprefixed_unet(keys)
    return {(UNET_PREFIX + k if unprefixed and "." in k and not k.startswith(_OTHER_PARTS) else k): k for k in keys}


def _taken_from_config(family: Family, keys: set[str]) -> list[str]:
    """The components a file that is not whole takes from its --config (by weights, not configs alone): the text
    encoders, and the VAE where the file holds none."""
    return [*family.text_encoders, *([] if any(k.startswith(VAE_PREFIX) for k in keys) else ["vae"])]


def _variant_hint(config: Path, variant: str | None, components: list[str]) -> str:
    """What to add to a local --config's load error where one of `components` holds neither `variant`'s weights nor
    unvaried ones to fall back on (diffusers' fallback; None: unvaried ones only), as a folder downloaded with
    `variant="fp16"` holds only those."""
    for component in components:
        held = weight_variants(config / component)
        if held and variant not in held and not (variant is not None and None in held):
            named = sorted(v for v in held if v is not None)
            return f"; its {component} holds {' and '.join(named)} weights only: give --variant {named[0]}"
    return ""


def _check_quantization(checkpoint: Path, read: dict[str, tuple[tuple, str]], whole: bool, metadata: dict[str, str]):
    """Refuse a file quantized in a way `dequantized` does not undo (`read`: the shape and dtype of each tensor read;
    `metadata`: the header's): bitsandbytes' 4-bit weights, a layer of another format than float8, a scale of more
    than one number (per block or channel) or beside a weight that is not a linear layer's of floats; and a whole SD
    checkpoint with scales, which diffusers' pipeline converter would read without them."""
    packed = sorted(k for k in read if k.endswith(_BITSANDBYTES) or ".quant_state." in k)
    if packed:
        raise ValueError(f"{checkpoint} holds weights quantized by bitsandbytes (such as {packed[0]}: NF4 or FP4), "
                         "which are not read here: convert a bf16, fp16 or float8 file of it")
    other = sorted((layer, form) for layer, form in _layer_formats(checkpoint, read, metadata).items()
                   if form not in _FLOAT8_FORMATS)
    if other:
        raise ValueError(f"{checkpoint}: layer {other[0][0]} is quantized as {other[0][1]!r}, which is not read here "
                         "(float8 only, one scale per weight at most): convert a bf16, fp16 or float8 file of it")
    scales = sorted(k for k in read if k.endswith(_WEIGHT_SCALES))
    for scale in scales:
        weight = f"{scale.rsplit('.', 1)[0]}.weight"
        shape, dtype = read.get(weight, ((), "missing"))
        if math.prod(read[scale][0]) != 1 or len(shape) != 2 or not dtype.startswith(("F", "BF")):
            raise ValueError(f"{checkpoint}: {scale} scales {weight} ({dtype}, shape {list(shape)}) by a tensor of "
                             f"shape {list(read[scale][0])}: only linear layers' float weights with one scale each "
                             "are read here (float8), not weights quantized per block or channel, or to integers; "
                             "convert a bf16, fp16 or float8 file of it")
    if whole and scales:
        raise ValueError(f"{checkpoint} is a whole checkpoint in scaled float8 ({scales[0]}), which diffusers' "
                         "converter would read without its scales: convert a bf16, fp16 or plain float8 file of it")


def _layer_formats(checkpoint: Path, read: dict, metadata: dict[str, str]) -> dict[str, str]:
    """The format of each quantized layer read, as ComfyUI's mixed-precision files give it: in the header's
    `_quantization_metadata` ({"layers": {layer: {"format": ...}}}) and in a `comfy_quant` tensor beside the layer's
    weight (the same JSON, as bytes)."""
    try:
        layers = json.loads(metadata.get("_quantization_metadata", "{}")).get("layers", {})
        with safe_open(checkpoint, "pt") as f:
            layers |= {k.removesuffix(".comfy_quant"): json.loads(f.get_tensor(k).numpy().tobytes())
                       for k in read if k.endswith(".comfy_quant")}
        return {layer: settings.get("format") for layer, settings in layers.items() if f"{layer}.weight" in read}
    except (ValueError, AttributeError, TypeError) as err:  # (json's errors are ValueErrors)
        raise ValueError(f"{checkpoint}: its quantization settings are unreadable ({first_line(err)})") from None


def dequantized(weight: torch.Tensor, scale: torch.Tensor | None = None,
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`weight` as a single file's float8 weights are read: in `dtype` (fp16 and bf16 hold every float8 value
    exactly), times its `scale` where ComfyUI's files give one (`scale_weight`, `weight_scale`: w = w8 * scale, in
    float32, rounded once to `dtype`). Any other tensor without a scale as it is."""
    if scale is not None:
        return (weight.float() * scale.float()).to(dtype)
    return weight.to(dtype) if weight.is_floating_point() and weight.dtype.itemsize == 1 else weight


def _read_weights(checkpoint: Path, file_keys: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of `checkpoint` under the names `file_keys` maps to their keys in the file (no scale among them),
    float8 ones `dequantized` into `dtype` with the scales beside them."""
    with safe_open(checkpoint, "pt") as f:
        stored = set(f.keys())

        def scale(key: str) -> torch.Tensor | None:
            scales = [f"{key.removesuffix('.weight')}{kind}" for kind in _WEIGHT_SCALES if key.endswith(".weight")]
            return next((f.get_tensor(name) for name in scales if name in stored), None)

        return {name: dequantized(f.get_tensor(key), scale(key), dtype) for name, key in file_keys.items()}


def _check_denoiser(checkpoint: Path, shapes: dict[str, tuple], family: Family, config: str, denoiser_config: dict):
    """Refuse a file (a denoiser without the text encoders) whose denoiser is not the one the --config's describes
    (`denoiser_config`: its config), naming what differs (diffusers would drop weights the config has no place for, or
    fail on one it lacks), and a FLUX transformer diffusers' converter cannot read."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = family.denoiser_cls.from_config(denoiser_config)
    expected = {k: tuple(t.shape) for k, t in _DENOISER_LAYOUTS[family.denoiser_class](model, "").items()}
    # the transformers' weights come with the prefix or without it
    prefix = "" if family.denoiser != "unet" and not any(k.startswith(UNET_PREFIX) for k in shapes) else UNET_PREFIX
    found = {k.removeprefix(prefix): shape for k, shape in shapes.items()
             if k.startswith(prefix) and not k.startswith(_OTHER_PARTS)}
    missing, extra = expected.keys() - found.keys(), found.keys() - expected.keys()
    reshaped = [k for k in sorted(expected.keys() & found.keys()) if found[k] != expected[k]]
    differences = ([f"the file lacks {_some(missing)}"] if missing else []) + (
        [f"it has {_some(extra)}, which the config's lacks"] if extra else []) + (
        [f"{reshaped[0]} is {found[reshaped[0]]} there, {expected[reshaped[0]]} in the config"] if reshaped else [])
    if differences:
        raise ValueError(f"the {family.denoiser} in {checkpoint} is not the {family} {family.denoiser} --config "
                         f"{config} describes: {'; '.join(differences)} (another variant or size: give the --config "
                         "of its model)")
    if family.name == "flux" and found["img_in.weight"][0] != FLUX_WIDTH:
        raise ValueError(f"{checkpoint}'s FLUX transformer is {found['img_in.weight'][0]} wide: diffusers' converter "
                         f"reads FLUX.1's width, {FLUX_WIDTH}, only")
    if any(k.startswith(_UNREAD_PARTS) for k in shapes):
        logger.warning("%s holds text encoders (or a VAE under vae.) too; they are not read: the pipeline takes the "
                       "--config's", checkpoint)


def _some(names: set[str], shown: int = 3) -> str:
    """A few of `names`, and how many there are."""
    first = ", ".join(sorted(names)[:shown])
    return first if len(names) <= shown else f"{first} and {len(names) - shown} more"


def _completed_pipeline(checkpoint: Path, file_keys: dict[str, str], family: Family, config: str, options: dict):
    """The `config` pipeline with the denoiser of `checkpoint` (a UNet alone, SD3, FLUX), and its VAE if it holds
    one, each converted by diffusers from the weights read (`file_keys`: `_file_keys`'; not the text encoders, float8
    dequantized); `options`: from_pretrained's (the dtype of all, the pipeline's settings, the --config's variant)."""
    from diffusers import AutoencoderKL

    dtype = options["torch_dtype"]
    weights = _read_weights(checkpoint, {k: v for k, v in file_keys.items() if not k.startswith(_UNREAD_PARTS)},
                            dtype)
    model_options = {"config": config, "local_files_only": options["local_files_only"], "torch_dtype": dtype}
    # (each converter is given a copy: diffusers' pop the weights they convert)
    parts = {family.denoiser: family.denoiser_cls.from_single_file(dict(weights), subfolder=family.denoiser,
                                                                   **model_options)}
    if any(k.startswith(VAE_PREFIX) for k in weights):
        parts["vae"] = AutoencoderKL.from_single_file(dict(weights), subfolder="vae", **model_options)
    del weights  # (the fused layers the converters split, which the loading of the rest need not hold)
    return family.lora_pipeline_cls.from_pretrained(config, **options, **parts)


def _marked_scheduler(checkpoint: Path, keys: set[str], metadata: dict[str, str], scheduler):
    """`scheduler` with the prediction type and schedule the file marks (`convert`). The model spec's "v" and
    "epsilon" are read, and diffusers' own names; another value (such as "sample") leaves the config's, saying so."""
    settings = {}
    marked = "v" if "v_pred" in keys else metadata.get("modelspec.prediction_type")
    names = {**{spec: ours for ours, spec in PREDICTION_TYPES.items()}, **{ours: ours for ours in PREDICTION_TYPES}}
    if marked in names:
        settings["prediction_type"] = names[marked]
    elif marked is not None:
        logger.warning("%s: modelspec.prediction_type %r is not one this reads (%s); the scheduler keeps the "
                       "--config's %r", checkpoint, marked, ", ".join(names), scheduler.config.prediction_type)
    if "ztsnr" in keys:
        if "rescale_betas_zero_snr" not in inspect.signature(type(scheduler).__init__).parameters:
            raise ValueError(f"{checkpoint} marks a zero-terminal-SNR schedule (ztsnr), which the --config's "
                             f"{type(scheduler).__name__} cannot run: give a --config whose scheduler can (DDIM, "
                             "Euler, DDPM)")
        settings |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return type(scheduler).from_config(scheduler.config, **settings)


def _checkpoint_family(checkpoint: Path, shapes: dict[str, tuple]) -> tuple[Family | None, bool]:
    """The family whose denoiser the single file holds, and whether the file is whole: an SD1.x, SD2.x or SDXL
    checkpoint with its VAE and text encoders. A UNet alone (with or without the VAE or the prefix; family None), and
    every SD3 or FLUX file, which hold no text encoders, take the rest of the pipeline from the --config."""
    def holds(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    flow = next((name for name, block in _TRANSFORMER_BLOCKS.items() if holds(block) or holds(UNET_PREFIX + block)),
                None)
    if flow is not None:
        lacking = [k for k in _TRANSFORMER_MARKS[flow] if k not in shapes and UNET_PREFIX + k not in shapes]
        if lacking:
            raise ValueError(f"{checkpoint} has {_TRANSFORMER_BLOCKS[flow]}* weights but not {', '.join(lacking)}: not "
                             f"the {flow} transformer as released (a model built on its blocks is not converted here)")
        return FAMILIES[flow], False
    if any(k.startswith(_CONTROLNET_MARK) or f".{_CONTROLNET_MARK}" in k for k in shapes):  # under any prefix
        raise ValueError(f"{checkpoint} holds a ControlNet ({_CONTROLNET_MARK}*), which is not converted here")
    if _unprefixed_unet(shapes):
        return None, False  # a UNet alone without the prefix
    if not holds(UNET_PREFIX):
        lora = next((k for k in sorted(shapes) if any(mark in k for mark in _LORA_MARKS)), None)
        diffusers = next((k for k in sorted(shapes) if k.startswith(_DIFFUSERS_DENOISER_MODULES)), None)
        what = (f"; it holds a LoRA's weights (such as {lora}): load them onto their base with load_lora_weights"
                if lora else f"; its names are a diffusers model's (such as {diffusers}), whose weights go in a "
                "pipeline folder's unet/ or transformer/, not through convert" if diffusers else "")
        raise ValueError(f"{checkpoint} holds no {UNET_PREFIX}* weights (nor an original UNet's without that prefix), "
                         "nor SD3's joint_blocks.* or FLUX's double_blocks.*: not a checkpoint in an original "
                         f"single-file layout{what}")
    # the family whose every text encoder's prefix is there (SDXL's first encoder is SD1.x's under another prefix)
    family = next((FAMILIES[name] for name in ("sdxl", "sd2", "sd")
                   if all(holds(prefix) for _, prefix, _ in FAMILIES[name].single_file_text_encoders)), None)
    if family is None:
        return None, False  # a UNet alone
    if not holds(VAE_PREFIX):
        raise ValueError(f"{checkpoint} holds a UNet and its text encoders without the VAE ({VAE_PREFIX}*): only a "
                         "whole checkpoint, or a UNet without the text encoders, converts")
    return family, True
