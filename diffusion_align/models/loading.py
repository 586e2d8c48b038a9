"""Load the pieces of a diffusers pipeline for training: SD1.x / SD2.x / SDXL (a UNet) or SD3 / SD3.5 / FLUX.1 (a
flow-matching transformer).

Works with a hub id or a local diffusers folder (anything with a `model_index.json`). Its family (families/,
detected from the folder) decides the denoiser, the training scheduler, the text encoders and the conditioning:
"sd" and "sd2" use one CLIP text encoder, "sdxl" two plus size/crop micro-conditioning, "sd3" two CLIPs and T5,
"flux" CLIP-L's pooled output and T5.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline, UNet2DConditionModel
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import safe_open

from ..config import ConfigError
from ..files import first_line, hub_load_error, looks_like_hub_id
from .families import Family, denoiser_component, detect_family

logger = logging.getLogger(__name__)


@dataclass
class DiffusionComponents:
    family: Family
    denoiser: torch.nn.Module | None  # the denoiser (UNet or transformer); None when loaded without it (a latent cache)
    vae: AutoencoderKL | None  # None, with no text encoders or tokenizers, when loaded for a latent cache
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: ConfigMixin  # the family's training scheduler (DDPMScheduler, FlowMatchEulerDiscreteScheduler)
    pipeline_class: str  # the `_class_name` of model_index.json, used when saving a full pipeline
    guidance: float | None = None  # the guidance scale a guidance-distilled denoiser (FLUX.1-dev) trains with
    frozen: list[torch.nn.Module] = field(init=False)

    def __post_init__(self):
        self.frozen = [m for m in (self.vae, *self.text_encoders) if m is not None]

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction (the UNets' schedulers say which); flow for the rectified-flow transformers."""
        return self.noise_scheduler.config.get("prediction_type", "flow")


def pipeline_index(pretrained: str, revision: str | None = None, what: str = "model.pretrained") -> dict:
    """The pipeline's model_index.json; a folder that is not a pipeline, a missing folder and a hub id that cannot
    be reached are each a one-line FileNotFoundError."""
    layout = ("the layout DiffusionPipeline.save_pretrained writes (model_index.json, unet/, vae/, text_encoder/, "
              "tokenizer/, scheduler/)")
    return _from_folder_or_hub(pretrained, what, "model_index.json", "pipeline",
                               partial(DiffusionPipeline.load_config, pretrained, revision=revision),
                               f" Expected a folder with {layout}, or a hub id such as "
                               "stable-diffusion-v1-5/stable-diffusion-v1-5")


def _from_folder_or_hub(name: str, what: str, marker: str, kind: str, load, expected: str = ""):
    """`load()` a diffusers folder (one holding `marker`) or a hub id. A folder without `marker`, a missing folder,
    and a hub id that cannot be reached (offline, a typo, a private repository) are each a one-line
    FileNotFoundError naming `what`."""
    local = Path(name).exists()
    if kind == "pipeline" and Path(name).is_file() and name.endswith((".safetensors", ".ckpt")):
        first = ("convert it to safetensors where you trust it (a .ckpt is a pickle, which is not read here: it can "
                 "run code), then " if name.endswith(".ckpt") else "")
        raise FileNotFoundError(f"{what}={name} is a single-file checkpoint; this reads diffusers pipeline folders: "
                                f"{first}convert it once (diffusion-align convert FILE --out FOLDER) and give the "
                                "folder")
    if local and not (Path(name) / marker).is_file():
        raise FileNotFoundError(f"{what}={name} is not a diffusers {kind} folder: it has no {marker}.{expected}")
    if not local and not looks_like_hub_id(name):
        raise FileNotFoundError(f"{what}={name}: no such folder, and not a hub id (owner/name).{expected}")
    try:
        return load()
    except (OSError, ValueError) as err:
        if local:
            raise
        raise hub_load_error(what, name, err) from None


def text_subfolders(pretrained: str, revision: str | None = None) -> list[str]:
    """The pipeline's text encoder folders: text_encoder, SDXL's and FLUX's text_encoder_2, SD3's text_encoder_3."""
    index = pipeline_index(pretrained, revision)
    return [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if (index.get(name) or [None])[0] is not None]


_WEIGHTS = (".safetensors", ".bin")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_BLOB_SHA256 = re.compile(r"[0-9a-f]{64}")


def component_digest(pretrained: str, subfolder: str | None, revision: str | None = None,
                     variant: str | None = None) -> str:
    """A digest of a pipeline component's files (configs, vocabularies, the weights of `variant`): what data derived
    from the component (a latent cache, reference errors) is keyed by. Hub weights are known by the sha256 the hub
    names their blob after, so only small files are read; local weights are hashed."""
    path = Path(pretrained)
    if not path.exists():  # a hub id: the files the loaders read, from the local hub cache (downloaded if need be)
        prefix = f"{subfolder}/" if subfolder else ""

        def download(kind: str, *patterns: str) -> Path:
            # a variant's weights whole (model.fp16.safetensors) or sharded (model.fp16-00001-of-00002.safetensors)
            weights = ([f"{prefix}*.{variant}{kind}", f"{prefix}*.{variant}-*{kind}"] if variant
                       else [f"{prefix}*{kind}"])
            return Path(snapshot_download(pretrained, revision=revision, allow_patterns=[*patterns, *weights],
                                          ignore_patterns=None if variant else [f"{prefix}*.*{kind}"]))  # no variant's
        path = download(".safetensors", f"{prefix}*.json", f"{prefix}*.txt", f"{prefix}*.model")
        if not _weights(path / prefix, variant):  # a component shipped as .bin only, which the loaders then read
            path = download(".bin")
    folder = path / subfolder if subfolder else path
    files = sorted(f for f in folder.iterdir() if f.is_file())
    weights = _weights(folder, variant) or _weights(folder, None)  # a part without the variant: its others
    digest = hashlib.sha256()
    for f in [f for f in files if not f.name.endswith(_WEIGHTS)] + weights:
        digest.update(f"{f.name}:{_file_sha256(f)};".encode())
    return digest.hexdigest()[:20]


def _weights(folder: Path, variant: str | None) -> list[Path]:
    """The weight files of `variant` in `folder` that the loaders read: the .safetensors ones where there are any."""
    weights = sorted(f for f in folder.glob("*") if f.is_file() and f.name.endswith(_WEIGHTS)
                     and _variant_of(f.name) == variant)
    safetensors = [f for f in weights if f.name.endswith(".safetensors")]
    return safetensors or weights


def weights_digest(pretrained: str, lora: str | None = None) -> str:
    """A digest of everything a pipeline's images depend on: every component of `pretrained` (`component_digest`)
    and, when given, the LoRA file (or the .safetensors files of a LoRA folder or hub repository). What generated
    image folders are keyed by, so that retrained weights at the same path are never taken for the old ones."""
    index = pipeline_index(pretrained, what="model")
    settings = {k: v for k, v in index.items() if not k.startswith("_")}  # also e.g. force_zeros_for_empty_prompt
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(k for k, v in index.items() if isinstance(v, (list, tuple)) and v[0] is not None):
        digest.update(f"{name}:{component_digest(pretrained, name)};".encode())
    if lora is not None:
        path = Path(lora)
        if not path.exists():  # a hub id: its weight files, from the local hub cache
            path = Path(snapshot_download(lora, allow_patterns=["*.safetensors"]))
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        digest.update("".join(f"lora/{f.name}:{_file_sha256(f)};" for f in files).encode())
    return digest.hexdigest()[:20]


def weight_variants(component: Path) -> set[str | None]:
    """The variants of the weight files in a pipeline component's folder (None: unvaried weights)."""
    return {_variant_of(f.name) for f in component.glob("*") if f.is_file() and f.name.endswith(_WEIGHTS)}


def _variant_of(name: str) -> str | None:
    """"fp16" for diffusion_pytorch_model.fp16.safetensors (or a shard of it), None for unvaried weights."""
    parts = name.split(".")
    return parts[1].split("-")[0] if len(parts) > 2 else None


def _file_sha256(path: Path) -> str:
    real = path.resolve()
    if _BLOB_SHA256.fullmatch(real.name):  # a hub cache blob is named after its sha256
        return real.name
    digest = hashlib.sha256()
    with real.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def pipeline_family(pretrained: str, index: dict, revision: str | None = None,
                    max_sequence_length: int | None = None) -> tuple[Family, dict]:
    """The family of pipeline `pretrained` (`index`: its model_index.json), reading `max_sequence_length` T5 tokens
    when given (`Family.with_max_sequence_length`), and its denoiser's config."""
    # any model class reads a config.json; the family is not known yet
    denoiser = denoiser_component(index)
    try:
        config = UNet2DConditionModel.load_config(pretrained, subfolder=denoiser, revision=revision)
    except OSError as err:  # a pipeline folder without it, a hub cache that lacks it: not a write error
        raise FileNotFoundError(f"{pretrained}: its model_index.json names a {denoiser}, but {denoiser}/config.json "
                                f"could not be read ({first_line(err)})") from None
    return detect_family(index, config).with_max_sequence_length(max_sequence_length), config


def load_vae(vae: str) -> AutoencoderKL:
    """model.vae: a replacement VAE (a folder with config.json and weights, or a hub id)."""
    return _from_folder_or_hub(vae, "model.vae", "config.json", "AutoencoderKL",
                               partial(AutoencoderKL.from_pretrained, vae))


def vae_config(pretrained: str, revision: str | None = None, vae: str | None = None) -> dict:
    """The config of the pipeline's VAE, or of `vae`, its replacement (model.vae; missing, a one-line
    FileNotFoundError as `load_vae` gives)."""
    if vae:
        return _from_folder_or_hub(vae, "model.vae", "config.json", "AutoencoderKL",
                                   partial(AutoencoderKL.load_config, vae))
    return AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision)


def vae_downsampling(config) -> int:
    """How many image pixels a latent pixel spans per side: the VAE's encoder halves the image at each level but the
    last (SD's, SDXL's, SD3's and FLUX's: 4 levels, 8x)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_resolution(resolution: int, family: Family, denoiser_config: dict, pretrained: str,
                     revision: str | None = None, vae: str | None = None, name: str = "resolution") -> None:
    """Refuse square images of `resolution` pixels (the setting `name`) whose latents the denoiser cannot cut into
    whole tokens (SD3's 2x2 patches, FLUX's 2x2 packing) or has no positions for (SD3's position table), before any
    model is loaded or image encoded: the latent side is the resolution over the VAE's downsampling."""
    patch, largest = family.latent_multiple(denoiser_config), family.max_latent_side(denoiser_config)
    if patch == 1 and largest is None:  # the UNets read any latent size
        return
    factor = vae_downsampling(vae_config(pretrained, revision, vae))
    multiple = factor * patch
    if resolution % multiple:
        below = resolution // multiple * multiple
        raise ConfigError(f"{name}={resolution} must be a multiple of {multiple} for {pretrained} ({family}): its VAE "
                          f"downsamples by {factor} and its transformer reads the latents in {patch}x{patch} patches; "
                          f"e.g. {f'{below} or ' if below else ''}{below + multiple}")
    if largest is not None and resolution > largest * factor:
        raise ConfigError(f"{name}={resolution} is larger than {pretrained} ({family}) has positions for: at most "
                          f"{largest * factor} px (its transformer's pos_embed_max_size, in latents {largest}, times "
                          f"its VAE's downsampling by {factor})")


def base_pipeline(pretrained: str, revision: str | None = None, variant: str | None = None,
                  replacement_vae: str | None = None, **components) -> DiffusionPipeline:
    """The whole pipeline `pretrained`, with model.vae's replacement VAE and any `components` (a trained UNet; None
    leaves a part out) in place of its own; the other parts keep the precision they were saved in."""
    # diffusers loads its own models in fp32 whatever they were saved in (a bf16 FLUX transformer: 48 GB, and written
    # back twice its size); transformers keeps the text encoders' saved dtype ("default": None leaves them to it)
    if replacement_vae is not None and "vae" not in components:
        components["vae"] = load_vae(replacement_vae)
        vae_folder = (Path(replacement_vae) if Path(replacement_vae).exists()
                      else Path(hf_hub_download(replacement_vae, "config.json")).parent)
        if (dtype := _stored_dtype(vae_folder, None)) is not None:
            components["vae"].to(dtype)
    folder = Path(pretrained if Path(pretrained).exists() else  # without the parts replaced
                  DiffusionPipeline.download(pretrained, revision=revision, variant=variant, **components))
    dtypes = {name: dtype for name, entry in pipeline_index(str(folder)).items()
              if isinstance(entry, list) and entry[0] == "diffusers" and name not in components
              and (folder / name).is_dir() and (dtype := _stored_dtype(folder / name, variant)) is not None}
    return DiffusionPipeline.from_pretrained(folder, variant=variant, dtype={**dtypes, "default": None}, **components)


def _stored_dtype(folder: Path, variant: str | None) -> torch.dtype | None:
    """The floating dtype of a component's safetensors weights, read from a file header (None: .bin weights); a
    component without `variant`'s files is loaded from its others, as diffusers does."""
    files = [f for f in _weights(folder, variant) or _weights(folder, None) if f.name.endswith(".safetensors")]
    if not files:
        return None
    with safe_open(files[0], "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    floating = [SAFETENSORS_DTYPES[d] for d in ("F32", "BF16", "F16") if d in dtypes]
    return floating[0] if floating else None


def load_components(pretrained: str, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None, encoders: bool = True, denoiser: bool = True,
                    max_sequence_length: int | None = None, denoiser_dtype: torch.dtype | None = None,
                    denoiser_weights: bool = True) -> DiffusionComponents:
    """The denoiser (UNet or transformer), VAE, text encoder(s), tokenizer(s) and the family's training scheduler
    with the checkpoint's config.

    `encoders=False` skips the VAE, text encoders and tokenizers (training from a latent cache); `denoiser=False` loads
    no denoiser weights (building one): its config alone says the family. `max_sequence_length`: the T5 tokens
    (SD3, FLUX) `parts.family` encodes prompts to; None: the pipeline's default. `denoiser_dtype`: the dtype the
    denoiser loads in (None: fp32, diffusers' default, whatever it was saved in); a LoRA run's frozen base loads
    straight into its frozen dtype, not through fp32 (FLUX.1's transformer: 24 GB of host memory, not 48).
    `denoiser_weights=False` builds the denoiser from its config on the meta device, holding no memory: a sharded run's
    other processes, which the main process sends their shards (`sharding.shard`)."""
    index = pipeline_index(pretrained, revision)
    kw = dict(revision=revision)
    family, denoiser_config = pipeline_family(pretrained, index, revision, max_sequence_length)
    denoiser_model = None
    if denoiser and denoiser_weights:
        denoiser_model = family.denoiser_cls.from_pretrained(
            pretrained, subfolder=family.denoiser, variant=_part_variant(pretrained, family.denoiser, variant),
            dtype=denoiser_dtype, **kw)
    elif denoiser:
        with torch.device("meta"):
            denoiser_model = family.denoiser_cls.from_config(denoiser_config)
        if denoiser_dtype is not None:
            denoiser_model.to(denoiser_dtype)
    text_encoders, tokenizers, vae_model = [], [], None
    for name in family.text_encoders if encoders else []:
        encoder_cls = text_encoder_class(pretrained, index, name, family)
        text_encoders.append(encoder_cls.from_pretrained(pretrained, subfolder=name,
                                                         variant=_part_variant(pretrained, name, variant), **kw))
        tokenizers.append(load_tokenizer(pretrained, index, name, revision))
    if encoders:
        vae_model = (AutoencoderKL.from_pretrained(pretrained, subfolder="vae",
                                                   variant=_part_variant(pretrained, "vae", variant), **kw)
                     if vae is None else load_vae(vae))
    noise_scheduler = family.training_scheduler_cls.from_pretrained(pretrained, subfolder="scheduler",
                                                                                    **kw)
    parts = DiffusionComponents(family, denoiser_model, vae_model, text_encoders, tokenizers, noise_scheduler,
                                index["_class_name"], family.training_guidance(denoiser_config))
    for module in parts.frozen:
        module.requires_grad_(False).eval()
    logger.info("loaded %s (%s, %s prediction)", pretrained, family, parts.prediction_type)
    return parts


def _part_variant(pretrained: str, name: str, variant: str | None) -> str | None:
    """`variant`, where a local pipeline's part `name` holds its weights; else None, its unvaried weights, as
    diffusers' pipelines load a part without the variant (a hub id's parts are asked for the variant)."""
    folder = Path(pretrained) / name
    return None if variant is not None and folder.is_dir() and variant not in weight_variants(folder) else variant


def text_encoder_class(pretrained: str, index: dict, name: str, family: Family) -> type:
    """The transformers class of the pipeline's text encoder `name` (e.g. CLIPTextModel); a pipeline saved without
    it (SD3 without T5: text_encoder_3=None) is named."""
    if (index.get(name) or [None])[0] is None:
        raise ConfigError(f"{pretrained}: model_index.json has no {name}, which {family} encodes prompts with; "
                          f"load the pipeline that has it (a {family} pipeline without its T5 is not supported)")
    return getattr(transformers, index[name][1])


def load_tokenizer(pretrained: str, index: dict, text_encoder: str, revision: str | None = None):
    """The tokenizer of the pipeline's text encoder `text_encoder` (tokenizer_2 for text_encoder_2, ...)."""
    name = text_encoder.replace("text_encoder", "tokenizer")
    return getattr(transformers, index[name][1]).from_pretrained(pretrained, subfolder=name, revision=revision)


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Move a model, casting only when its dtype differs (diffusers warns on every cast). In fp16, the modules the
    model keeps in fp32 (`fp32_kept_modules`) stay there, as a pipeline loaded in fp16 keeps them."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype=dtype)
    for kept in fp32_kept_modules(module) if dtype == torch.float16 else []:
        kept.float()
    return module


def fp32_kept_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules that transformers and diffusers keep in fp32 when they load `model` in fp16: those its class
    names in `_keep_in_fp32_modules` (T5's feed-forward output layers `wo`, whose activations overflow fp16)."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return [m for name, m in model.named_modules() if names & set(name.split("."))] if names else []


def set_attention(denoiser: torch.nn.Module, attention: str, device: torch.device, cudnn: bool = False) -> str:
    """Pick the attention kernel: xformers only where it can run (importable, CUDA), PyTorch SDPA otherwise, with its
    cuDNN backend allowed or not (`cudnn`: model.cudnn_attention; a process-wide torch setting)."""
    try:
        import xformers  # noqa: F401
        have_xformers = True
    except ImportError:
        have_xformers = False
    usable = have_xformers and device.type == "cuda"
    if attention == "xformers" and not usable:
        why = "it is not installed (pip install diffusion-align[xformers])" if not have_xformers else \
            f"it needs a CUDA device and this run is on {device.type}"
        raise RuntimeError(f"model.attention=xformers was asked for, but {why}; use model.attention=sdpa or auto")
    if attention in ("xformers", "auto") and usable:
        denoiser.enable_xformers_memory_efficient_attention()
        return "xformers"
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    return "sdpa"  # diffusers' default processors call torch's scaled_dot_product_attention


def compile_denoiser(denoiser: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile (inductor) where it can run: it writes C++ kernels on a CPU and triton kernels on CUDA."""
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        raise RuntimeError("model.compile=true: torch.compile's inductor backend builds C++ kernels on a CPU, and no "
                           "C++ compiler was found (install g++), or set model.compile=false")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise RuntimeError("model.compile=true: torch.compile's inductor backend needs triton on CUDA (pip install "
                           "triton), or set model.compile=false")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"model.compile=true is not supported on {device.type}; set model.compile=false")
    return torch.compile(denoiser)
