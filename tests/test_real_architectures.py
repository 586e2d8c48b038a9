"""Opt-in (slow): the real SD1.5 / SD2.1 / SDXL UNet architectures, built from their published configs with random
weights, take one LoRA Diffusion-DPO step through the normal loading and training code.

Run with `bash scripts/test.sh -m slow` (16 GB of RAM at the peak, SDXL's; minutes each on a CPU).
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffusion_align.config import load_config
from diffusion_align.models.tiny import save_tiny_pipeline
from diffusion_align.training.trainer import train

ASSETS = Path(__file__).parent.parent / "assets" / "unet-configs"
TINY_CONFIG = Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"
# published parameter counts of these UNets
PARAMETERS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}


def _wider_text_encoder(encoder, hidden_size, **extra):
    """The tiny text encoder, widened to what the real UNet attends to (one layer: only the width matters)."""
    config = encoder.config.to_dict() | {"hidden_size": hidden_size, "intermediate_size": hidden_size,
                                         "num_hidden_layers": 1, **extra}
    return type(encoder)(type(encoder.config)(**config))


def real_unet_pipeline(tmp_path: Path, name: str) -> Path:
    """A tiny pipeline (VAE, tokenizers, schedulers) around the real UNet architecture `name`."""
    family = {"sd15": "sd", "sd21": "sd2", "sdxl": "sdxl"}[name]
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "tiny", family))
    unet_config = json.loads((ASSETS / f"{name}-unet.json").read_text())
    unet = UNet2DConditionModel.from_config(unet_config)
    assert sum(p.numel() for p in unet.parameters()) == PARAMETERS[name]
    if family == "sdxl":  # 2048 = 768 + 1280; the pooled projection is 2816 - 6 * 256 = 1280
        pipe.text_encoder = _wider_text_encoder(pipe.text_encoder, 768)
        pipe.text_encoder_2 = _wider_text_encoder(pipe.text_encoder_2, 1280, projection_dim=1280)
    else:
        pipe.text_encoder = _wider_text_encoder(pipe.text_encoder, unet_config["cross_attention_dim"])
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert family != "sdxl" or isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    pipe.unet = unet
    pipe.save_pretrained(tmp_path / name, safe_serialization=True)
    return tmp_path / name


@pytest.fixture
def every_core():
    """Torch on every core for these steps (scripts/test.sh gives each of its workers one thread). They take minutes
    each, one after the other on one worker, and the slow run's other tests end on the other worker early on: with
    one thread, SD1.5's step took 821 s on 2 cores, with two 463 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("every_core")
@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_one_lora_dpo_step_on_the_real_unet(tmp_path, tiny_pairs, name):
    model = real_unet_pipeline(tmp_path, name)
    # 64 px through the factor-2 tiny VAE: 32x32 latents, enough for the UNet's three downsamplings
    cfg = load_config(TINY_CONFIG, [f"model.pretrained={model}", f"data.path={tiny_pairs}",
                                    f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                                    "train.batch_size=1", "train.grad_accum=1", "train.resolution=64",
                                    "train.warmup_steps=0", "train.checkpoint_every=0", "train.report_to=none",
                                    "train.mixed_precision=bf16", "model.lora_rank=8"])
    result = train(cfg)
    record = result.metrics
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert (result.final_dir / "pytorch_lora_weights.safetensors").is_file()
