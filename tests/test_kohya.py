"""The kohya-layout LoRA beside the diffusers one: names, alphas and metadata as ComfyUI, AUTOMATIC1111 and Forge
read them, and the same images whether diffusers loads the kohya file, the diffusers file, or uses the trained UNet."""

import re

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from diffusion_align.models.kohya import KOHYA_WEIGHTS
from diffusion_align.models.policy import LORA_WEIGHTS
from test_train import run

NAME = re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+_attn[12]_(to_q|to_k|to_v|to_out_0)"
                  r"\.(lora_down\.weight|lora_up\.weight|alpha)")


def images(pipe, family):
    size = 64 if family == "sdxl" else 32
    return pipe("a red circle on a white background", num_inference_steps=2, height=size, width=size,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family, version, architecture", [
    ("sd", "sd_v1", "stable-diffusion-v1/lora"),
    ("sd2", "sd_v2", "stable-diffusion-v2-768-v/lora"),  # the tiny SD2 predicts v, as SD2.1 768 does
    ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_kohya_file_names_alphas_metadata_and_images(tmp_path, tiny_models, tiny_pairs, family, version,
                                                      architecture):
    # alpha = 2 x rank: a file that wrote alpha = rank would halve the trained update
    resolution = "train.resolution=64" if family == "sdxl" else "train.resolution=32"
    result = run(tmp_path, tiny_models[family], tiny_pairs, "model.lora_rank=4", "model.lora_alpha=8",
                 "train.lr=1e-2", resolution, "train.checkpoint_every=3")
    final = result.final_dir
    assert (tmp_path / "run" / "checkpoint-3" / KOHYA_WEIGHTS).is_file(), "every checkpoint holds one too"
    with safe_open(final / KOHYA_WEIGHTS, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
        downs = {k: f.get_tensor(k) for k in keys if k.endswith(".lora_down.weight")}
    assert keys and all(NAME.fullmatch(k) for k in keys), [k for k in keys if not NAME.fullmatch(k)][:3]
    assert any("_to_out_0." in k for k in keys)
    assert len(alphas) == len(downs) == len(keys) // 3
    assert all(a.dtype == torch.float32 and a.ndim == 0 and a.item() == 8.0 for a in alphas.values())
    assert all(d.shape[0] == 4 for d in downs.values())
    assert {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8",
            "ss_base_model_version": version, "ss_v2": str(family == "sd2"), "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture, "modelspec.title": "run",
            "diffusion_align.method": "dpo"}.items() <= metadata.items()
    assert re.fullmatch(r"[0-9a-f]{20}", metadata["diffusion_align.base_unet_digest"])

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    base = images(pipe, family)
    pipe.unet = result.unet.eval()  # the trained UNet itself, adapters on
    trained = images(pipe, family)
    assert abs(trained - base).max() > 1e-3, "the LoRA changes the images"
    for weight_name in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
        pipe.load_lora_weights(final, weight_name=weight_name)
        assert abs(images(pipe, family) - trained).max() < 1e-4, weight_name
