"""What every scorer shares: batching, the pairwise preference probability, and the missing-weights errors.

A scorer turns (image, prompt) pairs into one number each. Preference is Bradley-Terry on that number:

    P(a preferred to b) = sigmoid(preference_scale * (s_a - s_b))

with `preference_scale` chosen per scorer and convention (e.g. 1 on PickScore's logit-scaled scores, which makes
it the 2-way softmax PickScore was trained with; exp(logit_scale) on raw cosines).
"""

from __future__ import annotations

import abc
import os
from typing import Callable, Sequence

import PIL.Image
import torch

from ..devices import default_device
from ..files import HUB_ID
from .registry import load_spec

DEFAULT_BATCH_SIZE = 32


class MissingWeightsError(FileNotFoundError):
    """A reward model's files are not where they were looked for; the message says what to get and where to put it."""


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`, to quote a library's error inside ours."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def hub_file(scorer: str, repo: str, filename: str, hint: str) -> str:
    """Local path of `filename` from hub repo `repo` (cached or downloaded); MissingWeightsError if unreachable."""
    import huggingface_hub

    try:
        return huggingface_hub.hf_hub_download(repo, filename)
    except OSError as err:  # offline, not cached, no such repo or file: all OSError subclasses in huggingface_hub
        raise MissingWeightsError(f"{scorer}: cannot get {filename} from the hub repo {repo} ({first_line(err)}). "
                                  f"{hint}") from err


def check_local(scorer: str, path: str, hint: str) -> None:
    """A path that is not a hub id must exist: fail here rather than as a confusing hub lookup."""
    if not os.path.exists(path) and not HUB_ID.fullmatch(path):
        raise MissingWeightsError(f"{scorer}: {path} does not exist. {hint}")


# scorers whose image preprocessing was made their reference's after scores were first cached (2026-12-06: HPS's
# float resize, the OpenAI CLIP crop of the aesthetic predictor and Hessel's CLIPScore), by (name, convention; None:
# any): cached scores record it, so that those made before (score and compare CSVs, label shards, SmPO's score
# caches) are not mixed with new ones
PREPROCESSING = {("hpsv2", None): "hps-float-resize", ("hpsv2.1", None): "hps-float-resize",
                 ("aesthetic", None): "openai-clip-crop", ("clip", "hessel"): "openai-clip-crop"}


def preprocessing_tag(name: str, convention: str | None) -> str | None:
    """`PREPROCESSING`'s tag of scorer `name` in `convention`, or None (preprocessed as ever)."""
    return PREPROCESSING.get((name, convention)) or PREPROCESSING.get((name, None))


class Scorer(abc.ABC):
    """A reward model scoring images against prompts; build one with `load_scorer`.

    Attributes: `name` (registry name), `path` (the weights given to load_scorer; None = the registry's),
    `column` (output column, convention included where selectable), `convention` (one line: what the number is), `batch_size` (chunk size of `score`), `device`, `dtype` (of the
    model), `preference_scale` (see the module docstring), and `preprocess`: image -> (3, H, W) float32 CPU
    tensor, a picklable object that never touches the model, so DataLoader workers can run it.
    Outputs are float32 CPU tensors; nothing keeps gradients.
    """

    needs_prompts = True
    preprocess: Callable[[PIL.Image.Image], torch.Tensor]
    preference_scale: float

    def __init__(self, name: str, path: str | None, convention: str | None, batch_size: int, device, dtype):
        self.name, self.path, self.spec = name, path, load_spec(name)
        self.convention_key = convention or self.spec["default_convention"]
        if self.convention_key not in self.spec["conventions"]:
            raise ValueError(f"unknown convention {self.convention_key!r} for scorer {name!r}; expected one of "
                             f"{list(self.spec['conventions'])}")
        entry = self.spec["conventions"][self.convention_key]
        self.column, self.convention = entry["column"], entry["description"]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = default_device(device)
        self.dtype = dtype or torch.float32
        self.preprocessing = preprocessing_tag(name, self.convention_key)

    @classmethod
    @abc.abstractmethod
    def models_on_meta(cls, name: str, path: str | None) -> list[torch.nn.Module]:
        """The models scorer `name` holds when loaded from `path`, built on the meta device from their configs alone
        (no weights read): what the memory planner counts."""

    def _prompts(self, n: int, prompts: Sequence[str] | None) -> list[str]:
        if prompts is None and not self.needs_prompts:
            return [""] * n
        if isinstance(prompts, str) or prompts is None or len(prompts) != n:
            got = "a single str" if isinstance(prompts, str) else "None" if prompts is None else f"{len(prompts)}"
            raise ValueError(f"{self.name}: expected a list of {n} prompts (one per image), got {got}")
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None and self.needs_prompts:  # a scorer that reads none may be given any
            raise ValueError(f"{self.name}: prompt {bad} is a {type(prompts[bad]).__name__}; expected a str (\"\" "
                             "for none)")
        return list(prompts)

    @abc.abstractmethod
    def score_batch(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores (N,) float32 CPU of a batch that `preprocess` made, stacked: (N, 3, H, W)."""

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str] | None) -> torch.Tensor:
        """Scores (N,) float32 CPU of images against their prompts, `batch_size` at a time."""
        prompts = self._prompts(len(images), prompts)
        bad = next((i for i, im in enumerate(images) if not isinstance(im, PIL.Image.Image)), None)
        if bad is not None:
            raise ValueError(f"{self.name}: image {bad} is a {type(images[bad]).__name__}; expected a PIL image "
                             "(PIL.Image.open, or Image.fromarray for an array)")
        chunks = [
            self.score_batch(torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]),
                             prompts[i:i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)

    def preference_prob(self, images_a: Sequence[PIL.Image.Image], images_b: Sequence[PIL.Image.Image],
                        prompts: Sequence[str] | None) -> torch.Tensor:
        """P(images_a[i] preferred to images_b[i] for prompts[i]), float32 CPU (N,)."""
        if len(images_a) != len(images_b):
            raise ValueError(f"{self.name}: {len(images_a)} images_a but {len(images_b)} images_b")
        return self.preference_prob_from_scores(self.score(images_a, prompts), self.score(images_b, prompts))

    def preference_prob_from_scores(self, scores_a, scores_b) -> torch.Tensor:
        """sigmoid(preference_scale * (s_a - s_b)) from scores this scorer made, float32 CPU."""
        a = torch.as_tensor(scores_a, dtype=torch.float32).cpu()
        b = torch.as_tensor(scores_b, dtype=torch.float32).cpu()
        if a.shape != b.shape:
            raise ValueError(f"{self.name}: scores_a has shape {tuple(a.shape)}, scores_b {tuple(b.shape)}")
        return torch.sigmoid(self.preference_scale * (a - b))
