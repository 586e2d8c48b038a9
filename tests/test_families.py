"""The model-family layer: each tiny pipeline is recognised as its family from its folder alone and loads with its
denoiser and training scheduler, a family is selected by its name everywhere a name is given, and what cannot be
trained is refused with the reason."""

import json
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel

from diffusion_align.models.families import FAMILIES, detect_family, get_family


def folder_configs(folder: str) -> tuple[dict, dict]:
    return (json.loads((Path(folder) / "model_index.json").read_text()),
            UNet2DConditionModel.load_config(folder, subfolder="unet"))


@pytest.mark.parametrize("name", ["sd", "sd2", "sdxl"])  # the flow families: test_flow_families.py
def test_each_family_is_detected_from_its_pipeline_folder(tiny_models, name):
    index, unet_config = folder_configs(tiny_models[name])
    family = detect_family(index, unet_config)
    assert family is FAMILIES[name] and family == name and str(family) == name
    # the text encoders it names are the pipeline's, in the order the UNet reads their states
    assert [c for c in index if c.startswith("text_encoder")] == list(family.text_encoders)
    assert {get_family(name), get_family(family)} == {family}  # selected by its name or itself; hashed by name


def test_an_sdxl_refiner_and_an_unknown_name_are_refused(tiny_models):
    index, unet_config = folder_configs(tiny_models["sdxl"])
    with pytest.raises(ValueError, match="SDXL refiner checkpoints .* not supported; use the SDXL base"):
        detect_family({**index, "text_encoder": [None, None]}, unet_config)
    with pytest.raises(ValueError, match="unknown model family 'sd4'; expected one of sd3, flux, sdxl, sd2, sd"):
        get_family("sd4")
    pixart = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    with pytest.raises(ValueError, match=r"a PixArtAlphaPipeline with a transformer \(PixArtTransformer2DModel\) is "
                                         "of no model family diffusion-align knows"):
        detect_family(pixart, {})


@pytest.mark.parametrize("name, transformer", [("sd3", "SD3Transformer2DModel"), ("flux", "FluxTransformer2DModel")])
def test_a_flow_pipeline_loads_with_its_transformer_and_flow_scheduler(tiny_flow_models, name, transformer):
    from diffusion_align.models.loading import load_components
    parts = load_components(str(tiny_flow_models[name]))
    assert parts.family is FAMILIES[name] and type(parts.denoiser).__name__ == transformer
    assert type(parts.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and parts.prediction_type == "flow"
    assert len(parts.text_encoders) == len(parts.tokenizers) == len(FAMILIES[name].text_encoders)
    assert parts.guidance == (3.5 if name == "flux" else None)  # the tiny FLUX is FLUX.1-dev-like: guidance_embeds
    assert all(not p.requires_grad for m in parts.frozen for p in m.parameters())


def test_sd2_is_told_from_sd1_by_its_unet():
    """SD2's UNet attends to 1024-d text (OpenCLIP-H) or has linear projections; SD1.x's 768-d without."""
    index = {"text_encoder": ["transformers", "CLIPTextModel"]}
    assert detect_family(index, {"cross_attention_dim": 768}) == "sd"
    assert detect_family(index, {"cross_attention_dim": 1024}) == "sd2"
    assert detect_family(index, {"cross_attention_dim": 768, "use_linear_projection": True}) == "sd2"
