"""The toy world's oracle: a judge of any image's pixels against its prompt, and simulated raters built on it.

Rules (each part in [0, 1]; the image is first resized to 32 x 32):
- object pixels: those nearer the prompt's colour than any other colour of the world (objects and backgrounds),
  and within 80 of it (RGB distance). presence = min(1, object area / half the area the prompt's size asks for).
- size: exp(-(dr / 1.5)^2 / 2), dr the difference in pixels between the half-width of the object's bounding box
  (trimmed 2% each side) and the asked half-width (5 small, 9 large).
- position: exp(-(dx / 4)^2 / 2), dx the distance in pixels between the box's centre and the asked x.
- shape: each shape is drawn to fill the object's box and overlaid on it (intersection over union);
  shape = exp(-(gap / 0.05)^2 / 2), gap = best overlap of any shape minus the asked shape's.
- taste, clean background: the fraction of background pixels (not the object, nor a pixel next to it) within 25 of
  the background colour, minus the fraction of object-coloured pixels more than 3 px from the object's bounding
  box (stray blobs), at least 0.

    oracle = presence * (0.25 + 0.2 shape + 0.15 position + 0.15 size) + 0.25 clean background

So a perfect render of the prompt scores about 1, an image of the wrong colour at most 0.25 (its background), and
the taste alone separates two adherent images. Higher is better.

Simulated raters compare two images of one prompt: a tie when the oracle scores are within `tie_margin`, else
image 0 wins with the Bradley-Terry probability sigmoid((s0 - s1) / temperature).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import to_rgb
from .world import BACKGROUNDS, COLOURS, POSITIONS, SIZE, SIZES, parse_prompt

RATER_TEMPERATURE = 0.05  # oracle-score units: a 0.05 gap wins 73% of the time, 0.15 wins 95%
RATER_TIE_MARGIN = 0.02

_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], np.float32)
_SHAPES = ("circle", "square", "triangle")
_AREA_FACTOR = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # area / half-width^2


def to_pixels(image) -> np.ndarray:
    """(32, 32, 3) float RGB in 0..255 from a PIL image, a uint8 HWC array, or a CHW float tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray((image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = to_rgb(image)
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32)


def judge(image, prompt: str) -> dict[str, float]:
    """Every part of the oracle's judgement of one image (see the module docstring), and `oracle`, their total."""
    scene = parse_prompt(prompt)
    pixels = to_pixels(image)
    colour, background = np.array(COLOURS[scene.colour]), np.array(BACKGROUNDS[scene.background])
    d_colour = np.linalg.norm(pixels - colour, axis=-1)
    d_background = np.linalg.norm(pixels - background, axis=-1)
    nearest = np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1).argmin(axis=-1)  # of all the world's colours
    mask = (nearest == list(COLOURS).index(scene.colour)) & (d_colour < 80)
    area = float(mask.sum())
    asked_area = _AREA_FACTOR[scene.shape] * SIZES[scene.size] ** 2
    parts = {"presence": min(1.0, area / (0.5 * asked_area)), "size": 0.0, "position": 0.0, "shape": 0.0}
    strays = 0.0
    if area > 0:
        ys, xs = np.nonzero(mask)
        top, bottom = np.percentile(ys, [2, 98])
        left, right = np.percentile(xs, [2, 98])
        half = (bottom - top + right - left + 2) / 4  # half-width of the bounding box
        parts["size"] = math.exp(-((half - SIZES[scene.size]) / 1.5) ** 2 / 2)
        parts["position"] = math.exp(-(((left + right) / 2 - POSITIONS[scene.position]) / 4) ** 2 / 2)
        fits = {shape: _overlap(mask, shape, (left + right) / 2, (top + bottom) / 2, half) for shape in _SHAPES}
        parts["shape"] = math.exp(-((max(fits.values()) - fits[scene.shape]) / 0.05) ** 2 / 2)
        outside = (ys < top - 3) | (ys > bottom + 3) | (xs < left - 3) | (xs > right + 3)
        strays = outside.sum() / mask.size
    rest = ~_grow(mask)  # the object's anti-aliased edge is neither object nor background
    clean = float((d_background[rest] < 25).mean()) if rest.any() else 0.0
    parts["clean background"] = max(0.0, clean - strays)
    parts["oracle"] = (parts["presence"] * (0.25 + 0.2 * parts["shape"] + 0.15 * parts["position"]
                                            + 0.15 * parts["size"]) + 0.25 * parts["clean background"])
    return parts


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours."""
    padded = np.pad(mask, 1)
    return np.logical_or.reduce([padded[1 + dy:1 + dy + SIZE, 1 + dx:1 + dx + SIZE]
                                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def _overlap(mask: np.ndarray, shape: str, cx: float, cy: float, half: float) -> float:
    """Intersection over union of the object mask and `shape` drawn to fill the same box."""
    template = Image.new("L", (SIZE, SIZE), 0)
    corners = (cx - half + 0.5, cy - half + 0.5, cx + half - 0.5, cy + half - 0.5)
    draw = ImageDraw.Draw(template)
    if shape == "circle":
        draw.ellipse(corners, fill=1)
    elif shape == "square":
        draw.rectangle(corners, fill=1)
    else:
        draw.polygon([(cx, corners[1]), (corners[0], corners[3]), (corners[2], corners[3])], fill=1)
    drawn = np.asarray(template, bool)
    return float((mask & drawn).sum() / max(1, (mask | drawn).sum()))


def oracle_scores(images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
    """One float32 per image, higher is better: how well its pixels show its prompt, plus the stated taste."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return torch.tensor([judge(image, prompt)["oracle"] for image, prompt in zip(images, prompts)],
                        dtype=torch.float32)


def rate_pairs(scores_0, scores_1, rng: np.random.Generator, temperature: float = RATER_TEMPERATURE,
               tie_margin: float = RATER_TIE_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Simulated raters' (label_0, label_1) per pair: 0.5/0.5 within `tie_margin`, else a Bradley-Terry draw."""
    diff = np.asarray(scores_0, np.float64) - np.asarray(scores_1, np.float64)
    first_wins = rng.uniform(size=diff.shape) < 1 / (1 + np.exp(-diff / temperature))
    label_0 = np.where(np.abs(diff) <= tie_margin, 0.5, first_wins.astype(np.float64))
    return label_0, 1 - label_0

