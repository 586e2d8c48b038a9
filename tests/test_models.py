"""Loading real diffusers folders, family detection and conditioning, on the tiny pipelines."""

import pytest
import torch

from diffusion_align.models.conditioning import encode_prompts
from diffusion_align.models.loading import load_components, set_attention


@pytest.mark.parametrize("family, prediction", [("sd", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_family_and_prediction_type_are_detected(tiny_models, family, prediction):
    parts = load_components(str(tiny_models[family]))
    assert parts.family == family
    assert parts.prediction_type == prediction
    assert len(parts.text_encoders) == (2 if family == "sdxl" else 1)
    assert all(not p.requires_grad for m in parts.frozen for p in m.parameters())


def test_sd_conditioning_is_the_last_hidden_state(tiny_models):
    parts = load_components(str(tiny_models["sd"]))
    cond = encode_prompts("sd", parts.tokenizers, parts.text_encoders, ["a red circle", ""])
    ids = parts.tokenizers[0](["a red circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(cond.encoder_hidden_states, parts.text_encoders[0](ids).last_hidden_state)
    assert cond.added_cond_kwargs is None


def test_sdxl_conditioning_concatenates_penultimate_states_and_tracks_sizes(tiny_models):
    parts = load_components(str(tiny_models["sdxl"]))
    prompts = ["a blue square", "a red circle"]
    sizes = torch.tensor([[480, 640], [1024, 768]])
    crops = torch.tensor([[0, 80], [128, 0]])
    cond = encode_prompts("sdxl", parts.tokenizers, parts.text_encoders, prompts, sizes, crops, resolution=512)
    # time ids per row: [orig_h, orig_w, crop_top, crop_left, res, res]
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[480, 640, 0, 80, 512, 512], [1024, 768, 128, 0, 512, 512]]
    outs = []
    for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        outs.append(encoder(ids, output_hidden_states=True))
    expected = torch.cat([outs[0].hidden_states[-2], outs[1].hidden_states[-2]], dim=-1)
    assert torch.equal(cond.encoder_hidden_states, expected)
    assert torch.equal(cond.added_cond_kwargs["text_embeds"], outs[1].text_embeds)
    assert cond.encoder_hidden_states.shape[-1] == parts.denoiser.config.cross_attention_dim


def test_xformers_is_used_only_where_it_can_run(tiny_models):
    parts = load_components(str(tiny_models["sd"]))
    assert set_attention(parts.denoiser, "auto", torch.device("cpu")) == "sdpa"
    assert set_attention(parts.denoiser, "sdpa", torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="model.attention=xformers was asked for, but"):
        set_attention(parts.denoiser, "xformers", torch.device("cpu"))


def test_cudnn_attention_is_off_unless_asked_for(tmp_path, tiny_models, tiny_pairs):
    """model.cudnn_attention reaches torch's process-wide SDPA switch: off by default (FLUX's LoRA backward failed in
    torch 2.11's cuDNN attention on an H200), on when asked for."""
    from test_train import run
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        run(tmp_path / "default", tiny_models["sd"], tiny_pairs, "train.max_steps=1")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        run(tmp_path / "on", tiny_models["sd"], tiny_pairs, "train.max_steps=1", "model.cudnn_attention=true")
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_a_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_components(str(tmp_path))
