"""Reward scorers: PickScore, HPS v2.0 / v2.1, CLIPScore and the LAION aesthetic predictor, one interface.

    scorer = load_scorer("pickscore")                   # hub ids from reward_models/pickscore.yaml
    scorer = load_scorer("hpsv2", "/models/HPS_v2_compressed.pt", device="cuda", dtype=torch.float16)
    scores = scorer.score(images, prompts)              # float32 CPU (N,), in scorer.convention
    p = scorer.preference_prob(images_a, images_b, prompts)   # P(a preferred to b)

Every scorer also exposes `preprocess` (picklable, for DataLoader workers) and `score_batch` (on preprocessed,
stacked pixels). Where the weights come from, the score conventions and licences are in the registry,
`reward_models/<name>.yaml`.

Pairwise judges (Pref-GRPO: a model compares two images of one prompt) are in `judge.py`.
"""

from __future__ import annotations

import inspect
import os

from ..files import expand_home, shipped_dir
from .base import MissingWeightsError, Scorer
from .clip import AestheticScorer, ClipSimilarityScorer
from .hps import HPSScorer
from .judge import PairwiseJudge, VLMJudge, judge_preferences
from .registry import load_spec
from .toy_oracle import ToyOracleScorer

SCORERS: dict[str, type[Scorer]] = {
    "pickscore": ClipSimilarityScorer,
    "hpsv2": HPSScorer,
    "hpsv2.1": HPSScorer,
    "clip": ClipSimilarityScorer,
    "aesthetic": AestheticScorer,
    "toy-pickscore": ClipSimilarityScorer,
    "toy-oracle": ToyOracleScorer,
}

__all__ = ["SCORERS", "MissingWeightsError", "PairwiseJudge", "Scorer", "VLMJudge", "judge_preferences",
           "load_scorer", "parse_scorer_spec"]


def _known(name: str) -> None:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(SCORERS)}")


def parse_scorer_spec(spec: str) -> tuple[str, str | None]:
    """"name" -> (name, None); "name=path" -> (name, path). The path may itself contain "="."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    _known(name)
    if sep and not path:
        raise ValueError(f"scorer spec {spec!r}: empty path after '='; write {name!r} alone to use the default "
                         f"weights, or {name}=/path/to/weights")
    return name, expand_home(path) or None


def load_scorer(name: str, path: str | os.PathLike | None = None, device=None, dtype=None, **options) -> Scorer:
    """Build scorer `name` (a key of SCORERS), its model loaded once, in eval mode, without gradients.

    `path`: local weights (file or folder, as the scorer's registry entry says) or a hub id where the scorer takes
    one; None fetches the registry's defaults from the hub (or its cache). `device`: default CUDA when available.
    `dtype`: of the model (e.g. torch.float16 on a GPU); outputs are float32 CPU regardless. `options`:
    `batch_size`, `convention` (see the registry entry), and `processor` for pickscore / clip.
    A missing file raises MissingWeightsError (a FileNotFoundError) saying what to download and where to put it.
    Weights that ship with the package (the registry's `source.shipped`, e.g. toy-pickscore) are the default path.
    """
    _known(name)
    shipped = load_spec(name)["source"].get("shipped")
    if path is None and shipped:
        path = shipped_dir(**shipped)
    cls = SCORERS[name]
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("name", "path", "device", "dtype")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for scorer {name!r}; its options: {', '.join(allowed)}")
    return cls(name, None if path is None else os.fspath(path), device=device, dtype=dtype, **options)
