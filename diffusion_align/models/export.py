"""`diffusion-align export`: a run's weights in the file another program loads.

- `kohya`: a UNet LoRA in the kohya layout that ComfyUI, AUTOMATIC1111 and Forge load (`kohya.py`);
- `comfyui`: an SD3 or FLUX LoRA for ComfyUI: diffusers' `transformer.` keys, which ComfyUI maps onto its own
  modules, with each module's scale (alpha / rank) folded into its lora_B, because ComfyUI reads no alpha from such a
  file and applies scale 1 (the diffusers file of a LoRA trained at alpha = 2 x rank, as the SD3.5 recipes are, acts
  there at half its strength); diffusers loads it too, to the same model;
- `diffusers`: the LoRA as diffusers writes it, with its adapter settings (`pipe.load_lora_weights`);
- `merged`: the LoRA fused into the base denoiser (UNet or transformer), written with the rest of the base as a whole
  diffusers pipeline (`DiffusionPipeline.from_pretrained`); a full fine-tune is written the same way;
- `single-file`: the same model as one checkpoint in its original layout, which ComfyUI, AUTOMATIC1111 and Forge
  load (`single_file.py`): SD1.x, SD2.x and SDXL whole, SD3 without its text encoders, FLUX's transformer alone.

The source is a run folder (its `final/`, else its newest checkpoint), a `final/` or `checkpoint-<step>/` folder, or
any folder holding a diffusers LoRA file. Of a checkpoint that holds an EMA of the weights (`ema/`), the EMA is
exported, as the run's `final/` would hold it, unless the live weights are asked for. A sharded (fsdp2)
checkpoint's weights are first gathered from its shards in this one process (`checkpoints.gather_sharded`). The LoRA
is loaded onto the base denoiser by diffusers' own loader, so what is exported is what diffusers would apply, and a
LoRA that does not fit the base is an error here rather than a silent no-op there. The base comes from the run's
config, or `--base` for a folder without one.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from ..config import Config, load_config
from ..files import (EMA_FOLDER, SHARDED_STATE, check_free, folder_written_beside, list_checkpoints, read_back,
                     write_safetensors_atomic)
from .kohya import KOHYA_WEIGHTS, adapter_scales, kohya_labels, write_kohya_lora
from .families import Family
from .loading import base_pipeline, component_digest, pipeline_family, pipeline_index
from .policy import LORA_WEIGHTS, check_lora_naming, write_diffusers_lora
from .single_file import single_file_labels, single_file_state

FORMATS = ("kohya", "comfyui", "diffusers", "merged", "single-file")
COMFYUI_WEIGHTS = "comfyui_lora.safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ADAPTER = "trained"
logger = logging.getLogger("diffusion_align")


@dataclass
class Source:
    """Trained weights and what they were trained on."""
    folder: Path
    # "lora" (a LoRA file), "unet" or "transformer" (a full fine-tune's checkpoint), "pipeline" (its final/),
    # "sharded" (an fsdp2 checkpoint, whose weights are gathered before they export)
    kind: str
    base: str | None  # the base pipeline: a hub id or folder
    revision: str | None
    variant: str | None
    vae: str | None
    method: str
    title: str
    config: Config | None = None  # the run's training config, where one was found


def weights_folder(path: Path, live: bool = False) -> Path:
    """The folder of weights that `path` (a run folder, its final/, a checkpoint, or weights) stands for: a run's
    final/, or its newest checkpoint where it has none; a checkpoint's EMA (its `ema/`, what the run's final/ holds
    when it ends there) unless `live`, the weights training resumes from, which a run keeping an EMA has in its
    checkpoints only."""
    keeps_ema = _keeps_ema(path) or (path.name == "final" and _keeps_ema(path.parent))
    if live and keeps_ema and path.name == "final":
        raise ValueError(f"{path}: holds the EMA of the run's weights (train.ema_decay); the live weights are in its "
                         "checkpoints: give the run folder or a checkpoint-<step>/ folder")
    folder, has_final = path, (path / "final").is_dir()
    if has_final and not (live and keeps_ema):
        folder = path / "final"
    elif weights_kind(path) is None and list_checkpoints(path):
        folder = list_checkpoints(path)[-1][1]
    elif has_final:  # the live weights of a run whose final/ holds its EMA
        raise ValueError(f"{path}: its final/ holds the EMA of the run's weights (train.ema_decay), and it keeps no "
                         "checkpoint with the live weights")
    if (folder / EMA_FOLDER).is_dir() and not live:
        folder = folder / EMA_FOLDER
        logger.info("%s: the EMA of the run's weights (train.ema_decay), as its final/ would hold it; --live-weights "
                    "for the weights training resumes from", folder)
    return folder


def _keeps_ema(run: Path) -> bool:
    """Whether the run in folder `run` (its config.yaml) keeps an EMA of its weights."""
    config = run / "config.yaml"
    return config.is_file() and bool(load_config(config).train.ema_decay)


def find_source(path: str | Path, base: str | None = None, live: bool = False) -> Source:
    """The weights under `path` (see the module docstring) and, from the run's config unless `base` is given, the
    base pipeline they belong to. A checkpoint of a run that keeps an EMA of its weights gives the EMA (its `ema/`,
    what the run's `final/` holds when it ends there), or with `live` the weights training resumes from."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; expected a run folder (train.output_dir), its final/ or "
                                f"a checkpoint-<step>/ folder, or a folder holding {LORA_WEIGHTS}")
    folder = weights_folder(path, live)
    kind = weights_kind(folder)
    if kind is None:
        raise FileNotFoundError(f"{folder} holds no trained weights: expected {LORA_WEIGHTS} (a LoRA), unet/ or "
                                "transformer/ (a full fine-tune's checkpoint), sharded/ (an fsdp2 checkpoint's) or "
                                "model_index.json (a whole pipeline)")
    config_files = [folder / "training_config.yaml", folder / "config.yaml"]
    for inner in (folder, folder.parent):  # final/, checkpoint-<step>/ or its ema/: the config of the run above
        if inner.name in ("final", EMA_FOLDER) or inner.name.startswith("checkpoint-"):
            config_files.append(inner.parent / "config.yaml")
    config_file = next((f for f in config_files if f.is_file()), None)
    cfg = load_config(config_file) if config_file else None
    if base is None and cfg is None and kind != "pipeline":
        raise FileNotFoundError(f"{folder} has no training config (training_config.yaml or config.yaml) naming the "
                                "base model the weights were trained on: pass it with --base (a hub id or folder)")
    if kind == "sharded" and cfg is None:
        raise FileNotFoundError(f"{folder} is a sharded checkpoint without the run's config.yaml, which says how its "
                                "weights (a LoRA of which rank, on which modules) fit the base")
    if cfg is None:
        return Source(folder, kind, base, revision=None, variant=None, vae=None, method="unknown", title=folder.name)
    own_base = base is None  # the config's revision and weight variant name files of its base, not of --base
    return Source(folder, kind, base or cfg.model.pretrained,
                  revision=cfg.model.revision if own_base else None,
                  variant=cfg.model.variant if own_base else None, vae=cfg.model.vae, method=cfg.method.name,
                  title=Path(cfg.train.output_dir).name, config=cfg)


def weights_kind(folder: Path) -> str | None:
    """What trained weights `folder` holds: "lora" (a LoRA file), "pipeline" (a whole pipeline), "sharded" (an fsdp2
    checkpoint's shards), "unet" or "transformer" (a full fine-tune's checkpoint), or None."""
    if (folder / LORA_WEIGHTS).is_file():
        return "lora"
    if (folder / "model_index.json").is_file():
        return "pipeline"
    if (folder / SHARDED_STATE).is_dir():
        return "sharded"
    return next((name for name in ("unet", "transformer") if (folder / name / "config.json").is_file()), None)


def export(source: Source, format: str, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write `source` in `format` (one of FORMATS) at `out`: for the LoRA formats and `single-file` a `.safetensors`
    file, or a folder that gets the usual file name (`single-file`: the run's name); for `merged` a folder. `dtype` (a
    key of DTYPES) casts the weights written; None keeps them as they are. Returns what was written."""
    if format not in FORMATS:
        raise ValueError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    if source.kind == "sharded":
        raise ValueError(f"{source.folder} is a sharded checkpoint: gather its weights first "
                         "(training.checkpoints.gather_sharded, as `diffusion-align export` does)")
    torch_dtype = DTYPES[dtype] if dtype else None
    out = Path(out)
    if format == "merged":
        return _export_merged(source, out, torch_dtype, overwrite)
    if format == "single-file":
        return _export_single_file(source, out, torch_dtype, overwrite)
    if source.kind != "lora":
        raise ValueError(f"{source.folder} holds a full fine-tune, not a LoRA: --format {format} writes LoRA files "
                         "(runs with model.lora_rank set); a full fine-tune exports with --format merged")
    file_name = {"kohya": KOHYA_WEIGHTS, "comfyui": COMFYUI_WEIGHTS, "diffusers": LORA_WEIGHTS}[format]
    target = out if out.suffix == ".safetensors" else out / file_name
    check_free(target, overwrite)
    family = _check_base(source)
    if format == "kohya" and family.kohya_version is None:
        raise ValueError(f"--format kohya: no kohya-layout file is written for {family} LoRAs; for ComfyUI use "
                         "--format comfyui")
    if format == "comfyui" and family.kohya_version is not None:
        raise ValueError(f"--format comfyui writes SD3 and FLUX LoRAs; ComfyUI loads a {family} LoRA in the kohya "
                         "layout (--format kohya)")
    denoiser = family.denoiser_cls.from_pretrained(
        source.base, subfolder=family.denoiser, revision=source.revision, variant=source.variant)
    _load_lora(denoiser, source, family)
    target.parent.mkdir(parents=True, exist_ok=True)
    if format == "diffusers":
        write_diffusers_lora(denoiser, family, target, _ADAPTER, torch_dtype)
    elif format == "comfyui":
        _write_folded_lora(denoiser, family.denoiser, target, torch_dtype)
    else:
        # loaded, not read raw: SD1.5's scheduler config predates the key, and the loaded one has its default
        prediction_type = DDPMScheduler.from_pretrained(source.base, subfolder="scheduler",
                                                        revision=source.revision).config.prediction_type
        labels = kohya_labels(family, prediction_type, source.title, source.method,
                              component_digest(source.base, "unet", source.revision, source.variant))
        write_kohya_lora(denoiser, target, labels, _ADAPTER, torch_dtype)
    return target


def _write_folded_lora(denoiser: torch.nn.Module, prefix: str, path: Path, dtype: torch.dtype | None) -> None:
    """The adapter as `<prefix>.<module>.lora_A.weight` / `.lora_B.weight`, with the module's scale (peft's
    `scaling`: alpha / rank, or alpha / sqrt(rank) with rsLoRA) multiplied into lora_B, and no alpha or adapter
    settings: a loader that applies scale 1 to such a file (ComfyUI; diffusers, which then takes alpha = rank) applies
    the update that trained, W + scale x B A."""
    scales = adapter_scales(denoiser, _ADAPTER)
    tensors = {}
    for key, weight in get_peft_model_state_dict(denoiser, adapter_name=_ADAPTER).items():
        module, _, kind = key.rpartition(".lora_")
        folded = weight.float() * scales[module] if kind.startswith("B.") else weight
        tensors[f"{prefix}.{key}"] = folded.detach().to(dtype or weight.dtype).contiguous()
    write_safetensors_atomic(tensors, path)


def _load_lora(model: torch.nn.Module, source: Source, family: Family) -> None:
    """Load the LoRA as `trained` onto the base denoiser `model` with diffusers' loader (its settings restore the
    trained scale); every module of the file must land on it."""
    prefix, what = family.denoiser, "UNet" if family.denoiser == "unet" else family.denoiser
    keys = check_lora_naming(source.folder / LORA_WEIGHTS)
    in_file = sum(key.startswith(f"{prefix}.") and key.endswith((".lora.down.weight", ".lora_A.weight"))
                  for key in keys)
    if in_file == 0:
        raise ValueError(f"{source.folder / LORA_WEIGHTS} holds no {what} LoRA weights: expected keys "
                         f"{prefix}.<module>.lora.down.weight (or lora_A), as diffusers' save_lora_weights writes them "
                         f"for the {family} base {source.base}; pass the base it was trained on with --base")
    encoders = sorted({key.split(".")[0] for key in keys if key.startswith("text_encoder")})
    if encoders:  # as diffusers' DreamBooth scripts write them: no export here writes them, so they would be lost
        raise ValueError(f"{source.folder / LORA_WEIGHTS} holds LoRA weights of {', '.join(encoders)} too, which are "
                         f"not exported (only the {what}'s are): load that file with pipe.load_lora_weights instead")
    try:
        model.load_lora_adapter(source.folder, weight_name=LORA_WEIGHTS, prefix=prefix, adapter_name=_ADAPTER)
    except (RuntimeError, ValueError) as err:  # shapes that differ: a LoRA of another model family
        reason = str(err).strip().splitlines()[-1].strip()  # one line: the last of the shapes that differ
        raise ValueError(f"{source.folder / LORA_WEIGHTS} does not fit the {what} of {source.base} ({reason}); pass "
                         "the base it was trained on with --base") from None
    loaded = sum(1 for m in model.modules() if _ADAPTER in getattr(m, "lora_A", {}))
    if loaded != in_file:
        raise ValueError(f"{source.folder / LORA_WEIGHTS} has {in_file} {what} LoRA modules, but {loaded} of them "
                         f"loaded onto the {what} of {source.base}: pass the base it was trained on with --base")


def _check_base(source: Source) -> Family:
    """--base's family, checked before any weights load: a missing or unreachable base, or one of another family
    than the trained weights (a UNet's for a transformer's, or a UNet reading text features of another width: SD1.x
    768, SD2.x 1024, SDXL 2048), is a one-line error."""
    family, config = pipeline_family(source.base, pipeline_index(source.base, source.revision, what="--base"),
                                     source.revision)
    trained_denoiser = source.kind if source.kind in ("unet", "transformer") else _lora_denoiser(source)
    if trained_denoiser not in (None, family.denoiser):
        raise ValueError(f"{source.folder} holds a trained {trained_denoiser}, but --base {source.base} is a {family} "
                         f"pipeline, whose denoiser is a {family.denoiser}; pass the base it was trained on with "
                         "--base")
    if family.denoiser != "unet":
        return family
    width = config["cross_attention_dim"]
    widths = set(width) if isinstance(width, (list, tuple)) else {width}
    trained = _trained_width(source)
    if trained is not None and trained not in widths:
        raise ValueError(f"{source.folder} was trained on a UNet that reads {trained}-wide text features, but the "
                         f"UNet of --base {source.base} reads {width}: another model family (SD1.x 768, SD2.x 1024, "
                         "SDXL 2048); pass the base it was trained on with --base")
    return family


def _lora_denoiser(source: Source) -> str | None:
    """The denoiser a LoRA file's keys name (`unet.` or `transformer.`), if any."""
    if source.kind != "lora":
        return None
    with read_back(source.folder / LORA_WEIGHTS), safe_open(source.folder / LORA_WEIGHTS, "pt") as f:
        return next((prefix for prefix in ("unet", "transformer") if any(k.startswith(f"{prefix}.") for k in f.keys())),
                    None)


def _trained_width(source: Source) -> int | None:
    """The width of the text features the trained weights read (a cross-attention key's input), if they say."""
    if source.kind == "unet":
        return UNet2DConditionModel.load_config(source.folder / "unet")["cross_attention_dim"]
    if source.kind != "lora":
        return None
    with read_back(source.folder / LORA_WEIGHTS), safe_open(source.folder / LORA_WEIGHTS, "pt") as f:
        key = next((k for k in f.keys() if k.startswith("unet.") and ".attn2.to_k." in k
                    and k.endswith((".lora.down.weight", ".lora_A.weight"))), None)
        return None if key is None else f.get_slice(key).get_shape()[1]


def _export_merged(source: Source, out: Path, dtype: torch.dtype | None, overwrite: bool) -> Path:
    if out.suffix == ".safetensors":
        raise ValueError(f"--out {out}: --format merged writes a whole diffusers pipeline, a folder; give a folder "
                         "(--format single-file writes one .safetensors checkpoint)")
    if out.resolve() in (source.folder.resolve(), *source.folder.resolve().parents):
        raise ValueError(f"--out {out} holds the weights exported ({source.folder}), which the pipeline written "
                         "there would replace, with the run's checkpoints; give another folder")
    check_free(out, overwrite)
    pipeline = _merged_pipeline(source, source_family(source), dtype)
    with folder_written_beside(out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if (source.folder / "training_config.yaml").is_file():
            shutil.copyfile(source.folder / "training_config.yaml", tmp / "training_config.yaml")
    return out


def _export_single_file(source: Source, out: Path, dtype: torch.dtype | None, overwrite: bool) -> Path:
    target = out if out.suffix == ".safetensors" else out / f"{source.title}.safetensors"
    check_free(target, overwrite)
    family = source_family(source)
    # the parts its file does not hold (SD3's text encoders; FLUX's VAE too) are not loaded
    left_out = family.text_encoders[len(family.single_file_text_encoders):] + (() if family.single_file_vae
                                                                               else ("vae",))
    pipeline = _merged_pipeline(source, family, dtype, left_out)
    tensors = {name: tensor.contiguous() for name, tensor in single_file_state(pipeline, family).items()}
    labels = single_file_labels(pipeline, family) | {"modelspec.title": source.title,
                                                     "diffusion_align.method": source.method}
    target.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(tensors, target, labels)
    return target


def source_family(source: Source) -> Family:
    """The family of the model `source` holds (its base's, for trained weights)."""
    if source.kind != "pipeline":
        return _check_base(source)
    folder = str(source.folder)
    return pipeline_family(folder, pipeline_index(folder, what=folder))[0]


def _merged_pipeline(source: Source, family: Family, dtype: torch.dtype | None,
                     leave_out: tuple[str, ...] = ()) -> DiffusionPipeline:
    """The base pipeline with the trained weights in place (a LoRA fused into its denoiser), cast to `dtype` if
    given; the components in `leave_out` are not loaded (None)."""
    components = dict.fromkeys(leave_out)
    if source.kind == "pipeline":
        pipeline = base_pipeline(str(source.folder), **components)
    else:
        if source.kind == family.denoiser:
            components[family.denoiser] = family.denoiser_cls.from_pretrained(source.folder / family.denoiser)
        pipeline = base_pipeline(source.base, source.revision, source.variant, source.vae, **components)
    if dtype == torch.float32:  # before a LoRA is fused: fused in a half base's dtype, its small updates round away
        pipeline.to(dtype)
    if source.kind == "lora":
        denoiser = getattr(pipeline, family.denoiser)
        _load_lora(denoiser, source, family)
        denoiser.fuse_lora(safe_fusing=True)  # W + scale * B A, refused if it is not finite
        denoiser.unload_lora()
    if dtype is not None:
        pipeline.to(dtype)
    return pipeline
