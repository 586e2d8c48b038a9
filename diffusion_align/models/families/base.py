"""What every model family provides (`Family`), what its text encoders make of a prompt (`TextStates`), and what
its denoiser is conditioned on (`Conditioning`, which calls the denoiser as its family does)."""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch


@dataclass
class TextStates:
    """What the text encoders make of each prompt: the denoiser's encoder_hidden_states and, where the family has
    one (SDXL, SD3, FLUX), the pooled embedding. A latent cache stores these per text."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.hidden, self.pooled))


@dataclass
class Conditioning:
    """One denoiser row's conditioning, every tensor one per row, and the family whose denoiser reads it
    (`denoise` calls it so). The UNet families read `encoder_hidden_states` and SDXL also `added_cond_kwargs`
    (pooled text embedding and size ids); SD3 and FLUX read `encoder_hidden_states` and `pooled_projections`, and
    FLUX.1-dev `guidance`, its distilled guidance scale."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None
    pooled_projections: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    family: Family | None = None  # None (a conditioning built by hand): a UNet's, which the UNet families all read

    def select(self, index: torch.Tensor) -> Conditioning:
        """The rows `index` (e.g. each prompt's row repeated for its group of images)."""
        return self._map(lambda x: x[index])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """The rows of `parts` (of one family) one after another."""
        return parts[0]._map(lambda *xs: torch.cat(xs), *parts[1:])

    def _map(self, fn, *others: Conditioning) -> Conditioning:
        values = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), [getattr(o, f.name) for o in others]
            if isinstance(mine, torch.Tensor):
                values[f.name] = fn(mine, *theirs)
            elif isinstance(mine, dict):
                values[f.name] = {k: fn(v, *[t[k] for t in theirs]) for k, v in mine.items()}
            else:
                values[f.name] = mine
        return Conditioning(**values)

    def denoise(self, model, sample: torch.Tensor, timesteps) -> torch.Tensor:
        """The denoiser's output for latents `sample` (N, C, H, W) at `timesteps` (the training scheduler's: one for
        all rows, or one per row), in the latents' layout."""
        if self.family is None:
            return unet_output(model, sample, timesteps, self)
        return self.family.denoise(model, sample, timesteps, self)


def unet_output(unet, sample: torch.Tensor, timesteps, cond: Conditioning) -> torch.Tensor:
    """A UNet2DConditionModel's prediction under `cond`."""
    kwargs = {} if cond.added_cond_kwargs is None else {"added_cond_kwargs": cond.added_cond_kwargs}
    return unet(sample, timesteps, encoder_hidden_states=cond.encoder_hidden_states, **kwargs).sample


def outside_autocast(device: torch.device):
    """A block in which the text encoders run in their own dtype, whatever autocast the caller runs under (the meta
    device, where the memory planner runs them, has no autocast)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def tokenize(tokenizer, prompts: list[str], device, max_length: int | None = None) -> torch.Tensor:
    """Token ids padded (and cut) to `max_length`, by default the tokenizer's `model_max_length`, as every SD
    training script and pipeline tokenizes (T5's length is the pipeline's `max_sequence_length`)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


# modelspec.implementation of Stability AI's models (SD1.x to SD3.5): their generative-models code
STABILITY_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


class Family(ABC):
    """One model family: how its pipeline folder is recognised, its denoiser and training scheduler, which text
    encoders it has and how they encode a prompt, how its denoiser is called, and how its LoRA files are written and
    labelled. One instance per family (`families.FAMILIES`), and copies of SD3's and FLUX's reading another T5 length
    (`with_max_sequence_length`); a family compares equal to its name, so a name given in a config, on the command
    line or in a test selects it."""

    name: str
    denoiser: str                   # the pipeline component that denoises: "unet", or "transformer" (SD3, FLUX)
    denoiser_class: str             # its diffusers class
    training_scheduler: str         # the diffusers scheduler whose forward process training noises with
    text_encoders: tuple[str, ...]  # the pipeline's text-encoder components, in encoding order
    lora_targets: tuple[str, ...]   # the denoiser modules a LoRA adapts unless model.lora_target_modules says
    lora_pipeline: str              # the diffusers pipeline whose `save_lora_weights` writes its LoRA files
    kohya_version: str | None       # kohya's `ss_base_model_version`, which A1111, Forge and ComfyUI read (None:
    kohya_architecture: str | None  # no kohya file is written); and its `modelspec.architecture`
    # the original single-file checkpoint (`single_file.py`): each text encoder's layout and prefix in it ("clip":
    # transformers' names, "open_clip": open_clip's) and how many last layers it has that diffusers' encoder dropped
    # (none: the text encoders are shipped apart); the prefix of the denoiser's weights, and whether it holds the VAE
    single_file_text_encoders: tuple[tuple[str, str, int], ...]
    single_file_prefix = "model.diffusion_model."
    single_file_vae = True
    single_file_loaders: str  # the programs that load that file, and where (`export --format single-file` says so)
    inversion_steps: int | None     # SmPO's ReNoise inversion steps at the family's resolution (its paper; None:
                                    # none published)
    classifier_free_guidance = True  # its pipeline guides by u + scale (c - u); FLUX's does not (see flux.py)
    max_sequence_length: int | None = None  # T5 tokens its encoding reads (SD3, FLUX); None: it has no T5

    # the diffusers classes those names name, looked up when used, so that detecting a family imports no model
    @property
    def denoiser_cls(self) -> type:
        return _diffusers_class(self.denoiser_class)

    @property
    def training_scheduler_cls(self) -> type:
        return _diffusers_class(self.training_scheduler)

    @property
    def lora_pipeline_cls(self) -> type:
        return _diffusers_class(self.lora_pipeline)

    @abstractmethod
    def matches(self, index: dict, denoiser_config: dict) -> bool:
        """Whether a pipeline (its model_index.json and its denoiser's config) is of this family; asked in
        `FAMILIES` order, of the families whose denoiser the pipeline has."""

    @abstractmethod
    def encode_texts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
        """The text encoders' states for each prompt, in the encoders' own dtype, outside any autocast."""

    def conditioning(self, texts: TextStates, original_sizes: torch.Tensor | None = None,
                     crop_top_left: torch.Tensor | None = None, resolution: int | None = None,
                     guidance: float | None = None) -> Conditioning:
        """The denoiser's conditioning for one row per text. SDXL also needs each row's original size and crop (long
        tensors of shape (rows, 2)) and the training resolution; FLUX.1-dev its guidance scale."""
        return Conditioning(texts.hidden, family=self)

    def denoise(self, model, sample: torch.Tensor, timesteps, cond: Conditioning) -> torch.Tensor:
        """`Conditioning.denoise` for this family's denoiser."""
        return unet_output(model, sample, timesteps, cond)

    def input_shapes(self, denoiser_config: dict) -> tuple[int, int, int, int | None]:
        """(latent channels, text tokens, text width, pooled width or None) of the denoiser's inputs: what the
        memory planner builds a forward from."""
        return denoiser_config["in_channels"], 77, denoiser_config["cross_attention_dim"], None

    def latent_multiple(self, denoiser_config: dict) -> int:
        """What the latents' height and width must be multiples of: the latent pixels per side of one token of the
        denoiser (1: a UNet reads latents of any size)."""
        return 1

    def max_latent_side(self, denoiser_config: dict) -> int | None:
        """The largest latent height and width the denoiser has positions for; None where any size is read (the
        UNets; FLUX's rotary positions)."""
        return None

    def training_guidance(self, denoiser_config: dict) -> float | None:
        """The guidance scale a guidance-distilled denoiser (FLUX.1-dev) is trained with; None for the others."""
        return None

    def zeros_for_empty_prompt(self, index: dict) -> bool:
        """Whether the pipeline guides against zero text embeddings rather than the encoded "" (`index`: its
        model_index.json)."""
        return False

    def with_max_sequence_length(self, tokens: int | None) -> Family:
        """This family reading `tokens` T5 tokens (None: its pipeline's default, the family itself), as a pipeline
        called with `max_sequence_length=tokens`: a shallow copy, equal to the family by name, whose `encode_texts`
        and `input_shapes` follow it, so that training, the latent cache and sampling all read one length."""
        if tokens is None:
            return self
        if self.max_sequence_length is None:
            raise ValueError(f"{self.name} has no T5 text encoder: max_sequence_length (T5's token count) is an SD3 "
                             "and FLUX setting")
        if tokens < 1:
            raise ValueError(f"max_sequence_length={tokens}: expected at least 1 T5 token")
        family = copy.copy(self)
        family.max_sequence_length = tokens
        return family

    def kohya_base(self, prediction_type: str) -> tuple[str, str]:
        """(ss_base_model_version, modelspec.architecture) of a LoRA trained on this family's base; a family without
        a kohya layout (kohya_version None) is refused."""
        if self.kohya_version is None:
            raise ValueError(f"kohya-format LoRA files are not written for {self.name}; diffusers' format "
                             f"({self.lora_pipeline}.save_lora_weights) is, and ComfyUI's is `export --format comfyui`")
        return self.kohya_version, self.kohya_architecture

    @abstractmethod
    def model_spec(self, denoiser_config: dict, prediction_type: str) -> tuple[str, str]:
        """(modelspec.architecture, modelspec.implementation) of a whole model of this family, in the names of kohya's
        sd-scripts (library/sai_model_spec.py)."""

    def __eq__(self, other) -> bool:
        return self.name == (other.name if isinstance(other, Family) else other)

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def _diffusers_class(name: str) -> type:
    import diffusers
    return getattr(diffusers, name)


class UNetFamily(Family):
    """SD1.x, SD2.x and SDXL: a UNet2DConditionModel trained on DDPM's forward process."""

    denoiser = "unet"
    denoiser_class = "UNet2DConditionModel"
    # whatever sampler the pipeline ships, training noise follows the DDPM forward process of its beta schedule
    training_scheduler = "DDPMScheduler"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts
    # what the family's pipeline sets on a DDIM scheduler config as it builds (the online sampler steps as it does)
    pipeline_ddim_settings: dict = {}

    def model_spec(self, denoiser_config: dict, prediction_type: str) -> tuple[str, str]:
        return self.kohya_base(prediction_type)[1], STABILITY_IMPLEMENTATION

    @property
    def single_file_loaders(self) -> str:
        return ("ComfyUI (Load Checkpoint; models/checkpoints/), AUTOMATIC1111 or Forge (models/Stable-diffusion/), "
                f"or diffusers ({self.lora_pipeline}.from_single_file)")
