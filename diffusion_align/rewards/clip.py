"""Scorers on transformers' `CLIPModel`: PickScore, CLIPScore and the LAION aesthetic predictor.

Text and image go through `get_text_features` / `get_image_features` (the projected embeddings), are
L2-normalised in fp32, and `cos = <text, image>`. PickScore and CLIPScore report `max(scale * cos, floor)`
in the convention asked for; the aesthetic predictor feeds the image embedding to a small linear MLP.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import center_crop

from ..images import to_rgb
from .base import DEFAULT_BATCH_SIZE, MissingWeightsError, Scorer, check_local, first_line, hub_file
from .registry import load_spec

logger = logging.getLogger(__name__)


def projected(out) -> torch.Tensor:
    """The projected embedding of `get_image_features` / `get_text_features`: transformers 5 returns an output
    object that holds it as `pooler_output`, earlier versions the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def ready(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Inference only: eval mode (dropout off), no gradients, on `device` in `dtype`."""
    return model.requires_grad_(False).eval().to(device=device, dtype=dtype)


def _pretrained(scorer: str, cls, source: str, expected: str, hint: str):
    """`cls.from_pretrained(source)`; MissingWeightsError saying what was expected where if it cannot load."""
    try:
        return cls.from_pretrained(source)
    except OSError as err:  # transformers reports offline / missing files / unknown repo ids as OSError
        raise MissingWeightsError(f"{scorer}: cannot load {cls.__name__} from {source} ({first_line(err)}); "
                                  f"expected {expected}. {hint}") from err


def _load_model(scorer: str, source: str, hint: str):
    import transformers
    return _pretrained(scorer, transformers.CLIPModel, source,
                       "a CLIPModel folder (config.json + model.safetensors) or hub id", hint)


def _clip_on_meta(scorer: str, source: str) -> nn.Module:
    """The CLIPModel of `source` (folder or hub id) from its config.json alone, on the meta device."""
    import transformers
    config = _pretrained(scorer, transformers.CLIPConfig, source, "a CLIPModel folder or hub id with config.json",
                         f"Give {scorer}=DIR (--scorer, online.reward or online.track), DIR holding its config.json.")
    with torch.device("meta"):
        return transformers.CLIPModel(config)


# The files that hold each processor part in the layouts transformers writes, any of which loads offline with
# from_pretrained: an image processor's own save_pretrained (and transformers 4's CLIPProcessor) writes
# preprocessor_config.json; transformers 5's CLIPProcessor nests its settings in processor_config.json instead.
PROCESSOR_FILES = {
    "tokenizer": "tokenizer.json, or vocab.json + merges.txt",
    "image processor": "preprocessor_config.json, or processor_config.json with an image_processor entry",
}


def missing_processor_parts(folder: str | None) -> list[str]:
    """The processor parts (keys of PROCESSOR_FILES) that `folder` does not hold locally: all of them for None or
    a hub id, none for a folder written by save_pretrained in any transformers version."""
    root = Path(folder) if folder is not None and os.path.isdir(folder) else None

    def has(*names: str) -> bool:
        return root is not None and all((root / name).is_file() for name in names)

    combined = json.loads((root / "processor_config.json").read_text()) if has("processor_config.json") else {}
    found = {"tokenizer": has("tokenizer.json") or has("vocab.json", "merges.txt"),
             "image processor": has("preprocessor_config.json") or "image_processor" in combined}
    return [part for part, ok in found.items() if not ok]


def _load_processor(scorer: str, source: str, hint: str):
    import transformers
    # transformers 5 moved the PIL implementation, the one the published scorers were run with, to
    # CLIPImageProcessorPil (its CLIPImageProcessor resizes with torchvision); in 4.x CLIPImageProcessor is it.
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return _pretrained(scorer, cls, source, PROCESSOR_FILES["image processor"], hint)


def _load_tokenizer(scorer: str, source: str, hint: str):
    import transformers
    return _pretrained(scorer, transformers.AutoTokenizer, source, PROCESSOR_FILES["tokenizer"], hint)


# The processor resizes the shortest side (to 224) and keeps the central square, so of an image thinner than 16:1 it
# first gets the central 16:1 part: resized whole, a 1 x 3000 image took 1.4 GB and 4.5 s, a 1 x 20000 one would end
# a scoring job's DataLoader worker. Other images go through untouched.
MAX_ASPECT = 16


@dataclass(frozen=True)
class ClipImageTransform:
    """Image -> (3, H, W) float32 through a CLIP image processor. Picklable and model-free (DataLoader workers).
    `torchvision_crop`: the central crop placed as torchvision's CenterCrop places it (offset round(margin / 2),
    where the processor takes margin // 2), as OpenAI's `clip.load` preprocessing does, which the LAION aesthetic
    predictor and Hessel et al.'s CLIPScore score through; the two differ by a pixel where the margin is 3 modulo 4
    (round takes halves to even), as SDXL's 1216 x 832 resized to 327 x 224."""

    processor: object
    torchvision_crop: bool = False

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        image = _central_part(to_rgb(image))
        if not self.torchvision_crop:
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0].float()
        crop = self.processor.crop_size
        resized = self.processor(images=image, do_center_crop=False, return_tensors="pt")["pixel_values"][0]
        return center_crop(resized, [crop["height"], crop["width"]]).float()


def _central_part(image: PIL.Image.Image) -> PIL.Image.Image:
    """The central part of `image` whose long side is at most MAX_ASPECT times its short side."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if long <= MAX_ASPECT * short:
        return image
    start = (long - MAX_ASPECT * short) // 2
    box = (start, 0, start + MAX_ASPECT * short, h) if w > h else (0, start, w, start + MAX_ASPECT * short)
    return image.crop(box)


@dataclass(frozen=True)
class Similarity:
    """score = max(scale * cos(text, image), floor), each prompt prefixed with `prefix`.
    `scale` None stands for the model's exp(logit_scale)."""

    scale: float | None = 1.0
    floor: float | None = None
    prefix: str = ""


class ClipSimilarityScorer(Scorer):
    """PickScore (and the toy world's) and CLIPScore: a scaled, possibly clipped cosine between CLIP text and image embeddings.

    P(a preferred to b) = sigmoid(exp(logit_scale) * (cos_a - cos_b)) in every convention, made from the scores as
    sigmoid((exp(logit_scale) / scale) * (s_a - s_b)): for PickScore's logit convention that is sigmoid(s_a - s_b),
    the 2-way softmax PickScore was trained with. Where a floor clipped both cosines the order is lost: P = 0.5.
    """

    SIMILARITIES = {
        ("pickscore", "logit"): Similarity(scale=None),
        ("pickscore", "cosine"): Similarity(),
        ("toy-pickscore", "logit"): Similarity(scale=None),
        ("toy-pickscore", "cosine"): Similarity(),
        ("clip", "hessel"): Similarity(2.5, 0.0, "A photo depicts "),  # Hessel et al.'s w = 2.5 and prefix
        ("clip", "torchmetrics"): Similarity(100.0, 0.0),
        ("clip", "raw"): Similarity(),
    }

    def __init__(self, name: str, path: str | None = None, device=None, dtype=None,
                 batch_size: int = DEFAULT_BATCH_SIZE, convention: str | None = None, processor: str | None = None):
        """`path`: a local folder (model + processor files, e.g. a fine-tune's save_pretrained) or a hub id;
        `processor`: where the tokenizer and image processor come from, if not from `path` or the registry."""
        super().__init__(name, path, convention, batch_size, device, dtype)
        source = self.spec["source"]
        hint = (f"Download {source['model']}" + (f" and the processor files of {source['processor']}"
                                                  if "processor" in source else "")
                + f" into one folder (e.g. `hf download REPO --local-dir DIR`) and pass --scorer {name}=DIR.")
        if path is not None:
            check_local(name, path, hint)
        sources, lacking = dict.fromkeys(PROCESSOR_FILES, processor), ""
        if processor is None:
            # Each part a local folder holds (e.g. a fine-tune's save_pretrained, any layout) loads from it, offline;
            # the rest from the registry's processor (PickScore_v1 is paired with the LAION ViT-H/14 one), else from
            # the model's repo: the registry's, or the hub id given.
            local = path is not None and os.path.isdir(path)
            fallback = source.get("processor", source["model"] if path is None or local else path)
            missing = missing_processor_parts(path)
            sources = {part: fallback if part in missing else path for part in PROCESSOR_FILES}
            if local and missing:
                lacking = (f"{path} lacks " + " and ".join(f"the {part} ({PROCESSOR_FILES[part]})" for part in missing)
                           + f", taken from {fallback} instead. ")
        model = _load_model(name, path or source["model"], hint)
        self.tokenizer = _load_tokenizer(name, sources["tokenizer"], lacking + hint)
        self.preprocess = ClipImageTransform(_load_processor(name, sources["image processor"], lacking + hint),
                                             torchvision_crop=(name, self.convention_key) == ("clip", "hessel"))
        self.logit_scale = model.logit_scale.float().exp().item()  # read before a cast to fp16 rounds it
        self.model = ready(model, self.device, self.dtype)
        self.context_length = model.config.text_config.max_position_embeddings
        self.similarity = self.SIMILARITIES[(name, self.convention_key)]
        self.score_scale = self.logit_scale if self.similarity.scale is None else self.similarity.scale
        self.preference_scale = self.logit_scale / self.score_scale
        logger.info("%s: model %s, tokenizer %s, image processor %s; %s", name, path or source["model"],
                    sources["tokenizer"], sources["image processor"], self.convention)

    @classmethod
    def models_on_meta(cls, name, path):
        return [_clip_on_meta(name, path or load_spec(name)["source"]["model"])]

    @torch.no_grad()
    def cosine(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(text, image) (N,) float32 on the model's device, prompts prefixed as the convention says."""
        if len(prompts) != len(pixel_values):
            raise ValueError(f"{self.name}: {len(pixel_values)} images but {len(prompts)} prompts")
        tokens = self.tokenizer([self.similarity.prefix + p for p in prompts], padding=True, truncation=True,
                                max_length=self.context_length, return_tensors="pt").to(self.device)
        text = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        return (F.normalize(projected(text).float(), dim=-1) * F.normalize(projected(image).float(), dim=-1)).sum(-1)

    def score_batch(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.score_scale * self.cosine(pixel_values, prompts)
        if self.similarity.floor is not None:
            scores = scores.clamp(min=self.similarity.floor)
        return scores.cpu()


def load_head(path: Path) -> nn.Sequential:
    """The aesthetic MLP from a state dict with keys layers.{0,2,4,6,7}.{weight,bias} (.pth or .safetensors).

    Layers 1, 3, 5 were dropouts in the original (identity at eval) and there are no activations: the head is
    linear, kept as five layers so the published state dict loads as is. fp32 whatever the CLIP dtype: it is tiny.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    linear = (0, 2, 4, 6, 7)
    expected = sorted(f"layers.{i}.{p}" for i in linear for p in ("weight", "bias"))
    if not isinstance(state, dict) or sorted(state) != expected:
        found = sorted(state)[:12] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected the aesthetic head's state dict with keys {expected}, found {found}")
    head = nn.Sequential(*[
        nn.Linear(state[f"layers.{i}.weight"].shape[1], state[f"layers.{i}.weight"].shape[0]) if i in linear
        else nn.Identity()
        for i in range(8)
    ])
    head.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})
    return head


class AestheticScorer(Scorer):
    """LAION improved aesthetic predictor: head(normalise(CLIP ViT-L/14 image embedding)), ~1-10; prompts ignored.

    P(a preferred to b) = sigmoid(s_a - s_b): temperature 1 on the rating scale.
    """

    needs_prompts = False
    preference_scale = 1.0

    def __init__(self, name: str, path: str | None = None, device=None, dtype=None,
                 batch_size: int = DEFAULT_BATCH_SIZE, convention: str | None = None):
        """`path`: a folder holding the head file (and optionally a clip/ subfolder with the CLIP model and
        processor), or the head file itself; without it both come from the hub."""
        super().__init__(name, path, convention, batch_size, device, dtype)
        source = self.spec["source"]
        head_path, clip_source = self._locate(path, source)
        clip_hint = (f"Put {source['clip']} (model and processor files, e.g. `hf download {source['clip']} "
                     f"--local-dir DIR/clip`) in a clip/ subfolder beside the head file.")
        model = _load_model(name, clip_source, clip_hint)
        self.preprocess = ClipImageTransform(_load_processor(name, clip_source, clip_hint), torchvision_crop=True)
        self.head = ready(load_head(head_path), self.device, torch.float32)
        width, dim = self.head[0].in_features, model.config.projection_dim
        if width != dim:
            raise ValueError(f"{name}: the head {head_path} takes {width}-d embeddings but the CLIP from "
                             f"{clip_source} gives {dim}-d ones; the head needs CLIP ViT-L/14 ({source['clip']})")
        self.model = ready(model, self.device, self.dtype)
        logger.info("%s: head %s, CLIP %s", name, head_path, clip_source)

    def _locate(self, path: str | None, source: dict) -> tuple[Path, str]:
        """(head file, CLIP folder or hub id) for `path`, or from the hub."""
        head = source["head"]
        hint = (f"Download {head['url']} (or {head['repo_file']} from the hub repo {head['repo']}) into a folder "
                f"and pass --scorer {self.name}=/path/to/folder (a clip/ subfolder there may hold {source['clip']}).")
        if path is None:
            return Path(hub_file(self.name, head["repo"], head["repo_file"], hint)), source["clip"]
        given = Path(path)
        if given.is_dir():
            folder, found = given, next((given / f for f in head["files"] if (given / f).is_file()), None)
            if found is None:
                raise MissingWeightsError(f"{self.name}: {given} holds no aesthetic head file (looked for "
                                          f"{', '.join(head['files'])}). {hint}")
        elif given.is_file():
            folder, found = given.parent, given
        else:
            raise MissingWeightsError(f"{self.name}: {path} does not exist. {hint}")
        return found, self._clip_source(folder, source)

    @staticmethod
    def _clip_source(folder: Path, source: dict) -> str:
        """The CLIP beside a head file in `folder`: its clip/ subfolder, else the registry's hub id."""
        clip = folder / "clip"
        return str(clip) if clip.is_dir() else source["clip"]

    @classmethod
    def models_on_meta(cls, name, path):
        """The CLIP alone: the head (under a million parameters) takes its shapes from its weights file."""
        source = load_spec(name)["source"]
        folder = None if path is None else Path(path) if Path(path).is_dir() else Path(path).parent
        return [_clip_on_meta(name, source["clip"] if folder is None else cls._clip_source(folder, source))]

    @torch.no_grad()
    def score_batch(self, pixel_values: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        image = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        return self.head(F.normalize(projected(image).float(), dim=-1)).squeeze(-1).cpu()
