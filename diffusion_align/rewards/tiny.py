"""Tiny reward scorers for tests and offline trials: the same classes and on-disk layouts as the released ones
(`diffusion-align make-tiny --scorers`), randomly initialised, so their scores are meaningless."""

from __future__ import annotations

import json
import pathlib

import torch

from ..files import usual_permissions
from ..models.tiny import TINY_IMAGE, clip_tokenizer, text_config
from .registry import load_spec

_TINY_PROJECTION = 16  # embedding width of the tiny CLIPs, and so the input width of the tiny aesthetic head


def _tiny_clip() -> tuple:
    """(CLIPModel, tokenizer, image processor), the tokenizer the real CLIP BPE."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=text_config(32, "quick_gelu", tokenizer).to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TINY_IMAGE, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=_TINY_PROJECTION,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                   crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    return CLIPModel(config), tokenizer, processor


def _save_clip(out_dir: pathlib.Path) -> None:
    model, tokenizer, processor = _tiny_clip()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# open_clip's format for a model config (what its local-dir / hf-hub loaders read), ViT-H-14's keys, tiny widths.
_TINY_OPEN_CLIP = {
    "embed_dim": _TINY_PROJECTION,
    "vision_cfg": {"image_size": TINY_IMAGE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


TINY_SCORERS = ("pickscore", "clip", "toy-pickscore", "hpsv2", "hpsv2.1", "aesthetic")  # toy-oracle needs no model


def save_tiny_scorer(name: str, out_dir, seed: int = 0) -> pathlib.Path:
    """Save a tiny randomly initialised reward model `name` (a key of diffusion_align.rewards.SCORERS) in the
    layout `load_scorer(name, path)` reads; returns that path.

    pickscore / clip / toy-pickscore: a CLIPModel folder with tokenizer and image processor (save_pretrained).
    hpsv2 / hpsv2.1: the registry's checkpoint file, {"state_dict": fp16 tensors} of an open_clip CLIP, plus the
    `open_clip_config.json` that tells the loader to build this tiny architecture instead of ViT-H-14.
    aesthetic: the head file (real key layout, input width = the tiny CLIP's projection) and a clip/ subfolder.
    """
    if name not in TINY_SCORERS:
        raise ValueError(f"no tiny version of scorer {name!r}; expected one of {', '.join(TINY_SCORERS)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = load_spec(name)["source"]
    # Seed a private copy of the RNG so callers' random streams are left as they were.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in ("pickscore", "clip", "toy-pickscore"):
            _save_clip(out_dir)
        elif name in ("hpsv2", "hpsv2.1"):
            import open_clip
            model = open_clip.CLIP(**_TINY_OPEN_CLIP)
            state = {k: v.half() for k, v in model.state_dict().items()}
            torch.save({"state_dict": state}, out_dir / source["file"])
            (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": _TINY_OPEN_CLIP}, indent=2))
        else:
            _save_clip(out_dir / "clip")
            widths = [_TINY_PROJECTION, 1024, 128, 64, 16, 1]  # the real head's hidden widths
            head = {}
            for i, layer in enumerate((0, 2, 4, 6, 7)):
                linear = torch.nn.Linear(widths[i], widths[i + 1])
                head[f"layers.{layer}.weight"], head[f"layers.{layer}.bias"] = linear.weight.data, linear.bias.data
            torch.save(head, out_dir / source["head"]["files"][0])
    usual_permissions(out_dir)  # save_pretrained leaves its weights owner-only
    return out_dir
