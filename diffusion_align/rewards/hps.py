"""HPS v2.0 / v2.1: an open_clip ViT-H-14 with a fine-tuned checkpoint; score = raw cos(text, image).

The checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) are `{"state_dict": fp16 tensors}`, read with
`torch.load(weights_only=True)`: plain tensors only, never arbitrary pickled objects. Images are letterboxed, not
centre-cropped, as HPS was trained and evaluated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from ..images import to_rgb
from .base import DEFAULT_BATCH_SIZE, MissingWeightsError, Scorer, first_line, hub_file
from .clip import ready
from .registry import load_spec

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD), which HPS keeps.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Letterbox:
    """HPS preprocessing, in HPSv2's order (`hpsv2/img_score.py`: its transform with resize_longest_max): scale to
    [0, 1]; resize the float image so its longest side is `size` (torchvision's bicubic, antialiased, not rounded
    to 8 bits; new side = round(side * size / longest)); centre it on a black `size` x `size` square; normalise with
    `mean` / `std`. Nothing is cropped. Unlike HPS, an image whose longest side is already `size` is padded too, so
    every output is square. Picklable and model-free (DataLoader workers).
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32) / 255.0).permute(2, 0, 1)
        h, w = pixels.shape[1:]
        scale = self.size / max(w, h)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        if (new_h, new_w) != (h, w):
            pixels = resize(pixels, [new_h, new_w], InterpolationMode.BICUBIC, antialias=True)
        canvas = torch.zeros(3, self.size, self.size)  # black
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        canvas[:, top:top + new_h, left:left + new_w] = pixels
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return (canvas - mean) / std


def open_clip_config(checkpoint: Path | None, architecture: str) -> dict:
    """The model config: `open_clip_config.json` beside the checkpoint if there is one (open_clip's own format,
    {"model_cfg": ...}; the tiny test models use it), else open_clip's built-in `architecture`."""
    local = None if checkpoint is None else checkpoint.parent / "open_clip_config.json"
    if local is not None and local.is_file():
        config = json.loads(local.read_text())
        if "model_cfg" not in config:
            raise ValueError(f"{local}: expected open_clip's format {{'model_cfg': {{...}}}}, got keys {list(config)}")
        logger.info("architecture from %s", local)
        return config["model_cfg"]
    import open_clip
    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ValueError(f"open_clip has no built-in architecture {architecture!r}")
    return config


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of an HPS checkpoint file, tensors only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything beyond plain tensors and containers, or a bad file
        raise ValueError(f"{path}: not a loadable tensor checkpoint ({first_line(err)}); HPS checkpoints are "
                         "a dict {'state_dict': tensors}, read with weights_only=True") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        found = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: expected a dict with key 'state_dict' (HPS's format), found {found}")
    return checkpoint["state_dict"]


class HPSScorer(Scorer):
    """HPS v2.0 / v2.1: cos(text, image) of the HPS-tuned open_clip model.

    P(a preferred to b) = sigmoid(exp(logit_scale) * (s_a - s_b)): Bradley-Terry with the model's own logit scale,
    as in HPS's contrastive training.
    """

    def __init__(self, name: str, path: str | None = None, device=None, dtype=None,
                 batch_size: int = DEFAULT_BATCH_SIZE, convention: str | None = None):
        """`path`: the checkpoint file or a folder holding it; without it, it comes from the hub."""
        super().__init__(name, path, convention, batch_size, device, dtype)
        import open_clip

        source = self.spec["source"]
        checkpoint = self._locate(path, source)
        with self.device:  # built where it will run: initialising ViT-H-14's ~1B random weights is slow on a CPU
            model = open_clip.CLIP(**open_clip_config(checkpoint, source["architecture"]))
        try:
            model.load_state_dict(load_checkpoint(checkpoint))  # fp16 tensors, cast into the fp32 model
        except RuntimeError as err:
            raise ValueError(f"{checkpoint} does not fit the open_clip {source['architecture']} model: {err}") from err
        self.logit_scale = model.logit_scale.float().exp().item()  # read before a cast to fp16 rounds it
        self.preference_scale = self.logit_scale
        self.model = ready(model, self.device, self.dtype)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)  # truncates
        size = model.visual.image_size
        self.preprocess = Letterbox(size if isinstance(size, int) else size[0])
        logger.info("%s: %s", name, checkpoint)

    @classmethod
    def models_on_meta(cls, name, path):
        import open_clip
        source = load_spec(name)["source"]
        checkpoint = None if path is None else Path(path) / source["file"] if Path(path).is_dir() else Path(path)
        with torch.device("meta"):
            return [open_clip.CLIP(**open_clip_config(checkpoint, source["architecture"]))]

    def _locate(self, path: str | None, source: dict) -> Path:
        filename = source["file"]
        hint = (f"Download https://huggingface.co/{source['repo']}/resolve/main/{filename} and pass "
                f"--scorer {self.name}=/path/to/{filename} (the file or the folder holding it).")
        if path is None:
            return Path(hub_file(self.name, source["repo"], filename, hint))
        checkpoint = Path(path)
        if checkpoint.is_dir():
            checkpoint = checkpoint / filename
        if not checkpoint.is_file():
            raise MissingWeightsError(f"{self.name}: {checkpoint} does not exist; {self.name} needs {filename}. "
                                      f"{hint}")
        return checkpoint

    @torch.no_grad()
    def score_batch(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != len(pixel_values):
            raise ValueError(f"{self.name}: {len(pixel_values)} images but {len(prompts)} prompts")
        image = self.model.encode_image(pixel_values.to(self.device, self.dtype))
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1).cpu()
