"""The toy world: one coloured shape on a plain background, the prompts that describe it, and how it is drawn.

A scene is (size, colour, shape, position, background); its prompt reads
"a small red circle on the left, white background". The 324 scenes are split once, by a hash of the prompt, into
pretraining scenes and held-out scenes (the final evaluation only): every colour, shape, size, position and
background occurs in both, but no held-out combination is ever trained on. A second hash carves a validation split
out of the pretraining scenes, so the splits are:

    pretrain  every scene the base model was pretrained on (= train + val)
    train     the scenes preference pairs and online rollouts are made from
    val       pretraining scenes that get no preference pairs and no rollouts: what settings are tuned on (the
              shipped toy PickScore was fitted on pairs of every pretraining scene, these included)
    heldout   never trained on at all: what results are reported on, once the settings are chosen

Images are 32 x 32 RGB, drawn at 4x and downsampled so edges are smooth. `render` draws a scene as it should be;
`render_flawed` draws the kind of data a model is pretrained on in the wild: a background with noise or stains, or
a caption that gets one attribute wrong (see `FLAWS`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32  # pixels per side
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
           "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5.0, "large": 9.0}  # half-width in pixels
POSITIONS = {"left": 9.0, "middle": 16.0, "right": 23.0}  # x of the centre in pixels
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (125, 125, 125)}
HELD_OUT_EVERY = 6  # about one scene in six is held out
VAL_EVERY = 6  # and about one pretraining scene in six is kept for validation
FLAWS = {"noisy background": 0.25, "stained background": 0.15, "wrong caption": 0.2}  # pretraining data rates

_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_PROMPT = re.compile(r"a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?:on the|in the) (?P<position>\w+), "
                     r"(?P<background>\w+) background")


@dataclass(frozen=True)
class Scene:
    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        return (f"a {self.size} {self.colour} {self.shape} {_PHRASE[self.position]}, "
                f"{self.background} background")


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt of the world's grammar describes; ValueError naming the prompt otherwise."""
    match = _PROMPT.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a toy-world prompt: {prompt!r} (expected e.g. {ALL_SCENES[0].prompt!r})")
    scene = Scene(**match.groupdict())
    for field, allowed in _ATTRIBUTES.items():
        if (value := getattr(scene, field)) not in allowed:
            raise ValueError(f"not a toy-world prompt: {prompt!r} ({value!r} is not one of {sorted(allowed)})")
    return scene


_ATTRIBUTES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "background": BACKGROUNDS}
ALL_SCENES = [Scene(*values) for values in itertools.product(*_ATTRIBUTES.values())]


def _one_in(every: int, text: str) -> bool:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % every == 0


_PRETRAIN = [s for s in ALL_SCENES if not _one_in(HELD_OUT_EVERY, s.prompt)]
SPLITS = {"pretrain": _PRETRAIN,
          "train": [s for s in _PRETRAIN if not _one_in(VAL_EVERY, "val:" + s.prompt)],
          "val": [s for s in _PRETRAIN if _one_in(VAL_EVERY, "val:" + s.prompt)],
          "heldout": [s for s in ALL_SCENES if _one_in(HELD_OUT_EVERY, s.prompt)]}
_PRETRAINED = frozenset(_PRETRAIN)


def scenes(split: str) -> list[Scene]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def sample_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """`n` prompts of `split` (see the module docstring), drawn for `seed`: each prompt once per pass through a
    shuffled split."""
    pool = scenes(split)
    rng = np.random.default_rng([seed, len(pool)])
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])
    return [pool[i].prompt for i in order[:n]]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene as it should look, with a little jitter in place and size."""
    scale = 4  # draw large, then downsample: anti-aliased edges
    canvas = Image.new("RGB", (SIZE * scale, SIZE * scale), BACKGROUNDS[scene.background])
    r = (SIZES[scene.size] + rng.uniform(-0.75, 0.75)) * scale
    cx = (POSITIONS[scene.position] + rng.uniform(-1.5, 1.5)) * scale
    cy = (SIZE / 2 + rng.uniform(-3.0, 3.0)) * scale
    draw, fill = ImageDraw.Draw(canvas), COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _noisy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blotchy noise at a quarter of the resolution: coarse enough for the 8 x 8 latents to carry it."""
    coarse = rng.normal(0, rng.uniform(25, 50), (SIZE // 4, SIZE // 4, 3)).astype(np.float32)
    noise = np.stack([np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
                      for c in coarse.transpose(2, 0, 1)], axis=-1)
    return Image.fromarray((np.asarray(image, np.float32) + noise).clip(0, 255).astype(np.uint8))


def _stained(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    stains = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(stains)
    for _ in range(rng.integers(2, 5)):
        x, y, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(2, 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(90, 200)))
    tint = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(0, 256, 3)))
    return Image.composite(tint, image, stains.filter(ImageFilter.GaussianBlur(1.5)))


def _miscaptioned(scene: Scene, rng: np.random.Generator) -> Scene:
    """A pretraining scene that differs from `scene` in one attribute: what a wrong caption would describe. Only
    pretraining scenes, so no held-out prompt is ever seen in pretraining, not even as a wrong caption."""
    one_off = [replace(scene, **{field: value}) for field, values in _ATTRIBUTES.items() for value in values
               if value != getattr(scene, field)]
    neighbours = [s for s in one_off if s in _PRETRAINED]
    return neighbours[rng.integers(len(neighbours))]


def render_flawed(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """(image, caption) as pretraining data has them: clean and correct, or with one flaw of `FLAWS` at its rate."""
    image, caption = render(scene, rng), scene.prompt
    u = rng.uniform()
    noisy, stained = FLAWS["noisy background"], FLAWS["stained background"]
    if u < noisy:
        image = _noisy(image, rng)
    elif u < noisy + stained:
        image = _stained(image, rng)
    if rng.uniform() < FLAWS["wrong caption"]:
        caption = _miscaptioned(scene, rng).prompt
    return image, caption
