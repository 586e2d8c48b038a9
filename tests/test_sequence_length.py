"""model.max_sequence_length: SD3 and FLUX read T5 at one configured length everywhere their text states are made
(the family's encoding and input shapes, training, the latent cache, online sampling, generation), equal to the
pipelines' own `max_sequence_length=`; the families without T5 refuse it."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffusion_align.cli import main as cli_main
from diffusion_align.config import ConfigError, load_config
from diffusion_align.data.cache import build_cache, cache_key
from diffusion_align.evaluation.generate import generate_images
from diffusion_align.models.families import FAMILIES
from diffusion_align.models.loading import load_components
from diffusion_align.training.trainer import train
from test_flow_families import PROMPTS
from test_flow_online import online_config, online_setup  # noqa: F401 (a fixture)
from test_flow_train import picked_rows, seen  # noqa: F401 (a fixture)
from test_generate import FAST, pixels, records
from test_train import run

TOKENS = 8
CLIP_TOKENS = 77  # the tiny CLIP tokenizers' model_max_length, which SD3's CLIP states keep whatever T5's length


def t5_tokens(family: str) -> int:
    """The text tokens the transformer reads at T5 length TOKENS: SD3 both CLIPs' then T5's, FLUX T5's alone."""
    return CLIP_TOKENS + TOKENS if family == "sd3" else TOKENS


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_configured_family_encodes_as_the_pipeline_at_that_length(tiny_flow_models, name):
    """load_components' family is a copy at the length, equal to the family by name, that encodes prompts as the
    pipeline's `encode_prompt(..., max_sequence_length=8)` does and gives the memory planner that many tokens; the
    shared family keeps the pipeline's default."""
    model = tiny_flow_models[name]
    parts = load_components(str(model), max_sequence_length=TOKENS)
    family, default = parts.family, FAMILIES[name]
    assert family == name and family == default and {family} == {default} and family is not default
    assert family.max_sequence_length == TOKENS and default.max_sequence_length == {"sd3": 256, "flux": 512}[name]
    assert load_components(str(model), encoders=False, denoiser=False).family is default  # no length: the family
    hidden, pooled = family.encode_texts(parts.tokenizers, parts.text_encoders, PROMPTS)
    pipe = DiffusionPipeline.from_pretrained(model)
    with torch.no_grad():
        if name == "sd3":
            expected_hidden, _, expected_pooled, _ = pipe.encode_prompt(
                PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=TOKENS)
        else:
            expected_hidden, expected_pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=TOKENS)
    config = pipe.transformer.config
    assert hidden.shape == (len(PROMPTS), t5_tokens(name), config.joint_attention_dim)
    assert torch.equal(hidden, expected_hidden) and torch.equal(pooled, expected_pooled)
    assert family.input_shapes(config)[1] == t5_tokens(name)
    assert default.input_shapes(config)[1] == {"sd3": CLIP_TOKENS + 256, "flux": 512}[name]


def test_families_without_t5_refuse_a_length():
    for name in ("sd", "sd2", "sdxl"):
        assert FAMILIES[name].with_max_sequence_length(None) is FAMILIES[name]
        with pytest.raises(ValueError, match=f"{name} has no T5 text encoder: max_sequence_length .* an SD3 and FLUX "
                                             "setting"):
            FAMILIES[name].with_max_sequence_length(TOKENS)
    with pytest.raises(ValueError, match="max_sequence_length=0: expected at least 1 T5 token"):
        FAMILIES["sd3"].with_max_sequence_length(0)


def test_the_config_key_is_checked_against_the_model(tmp_path, tiny_models, tiny_pairs):
    for tokens in (0, 513):  # the pipelines take 1 to 512
        with pytest.raises(ConfigError, match=rf"'model.max_sequence_length' .* must be between 1 and 512 .*got "
                                              rf"{tokens}"):
            load_config(None, [f"model.max_sequence_length={tokens}"])
    for name in ("sd", "sdxl"):
        with pytest.raises(ConfigError, match=rf"model.max_sequence_length=8 \(.*{name}\): {name} has no T5 text "
                                              "encoder.*; set it to null"):
            run(tmp_path / name, tiny_models[name], tiny_pairs, f"model.max_sequence_length={TOKENS}")


def test_training_conditions_on_t5_at_the_configured_length(tmp_path, tiny_flow_models, tiny_pairs, seen):
    """An SD3 DPO step at 8 T5 tokens: the transformer, policy and reference, reads the pipeline's states at that
    length; the model card says to sample at it."""
    model = tiny_flow_models["sd3"]
    result = run(tmp_path, model, tiny_pairs, "train.max_steps=1", "train.batch_size=2", "data.random_flip=no",
                 f"model.max_sequence_length={TOKENS}")
    picked, _ = picked_rows(tiny_pairs, seen["batches"][0])
    pipe = DiffusionPipeline.from_pretrained(model)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt([r["caption"] for r in picked] * 2, None, None,
                                                  do_classifier_free_guidance=False, max_sequence_length=TOKENS)
    assert hidden.shape[1] == t5_tokens("sd3") and len(seen["transformer"]) == 2
    for call in seen["transformer"]:
        assert torch.allclose(call["encoder_hidden_states"], hidden, atol=1e-5)
        assert torch.allclose(call["pooled_projections"], pooled, atol=1e-5)
    assert f"generate --max-sequence-length {TOKENS}" in (result.final_dir / "README.md").read_text()


def test_the_latent_cache_is_keyed_by_the_length(tmp_path, tiny_flow_models, tiny_pairs, seen, capsys):
    """`cache --max-sequence-length` stores T5's states at that length and keys the cache by it; a cache at the
    pipeline's default keeps the key it had before the setting existed; a run at another length refuses the cache,
    one at its length trains from it."""
    model, pairs, folder = str(tiny_flow_models["sd3"]), str(tiny_pairs), tmp_path / "cache"
    cli_main(["cache", pairs, "--model", model, "--out", str(folder), "--resolution", "32", "--device", "cpu",
              "--workers", "0", "--max-sequence-length", str(TOKENS)])
    assert "16 rows" in capsys.readouterr().out
    key = json.loads((folder / "key.json").read_text())
    assert key["max_sequence_length"] == TOKENS
    assert key == cache_key(pairs, "train", model, resolution=32, max_sequence_length=TOKENS)
    assert "max_sequence_length" not in cache_key(pairs, "train", model, resolution=32)
    assert load_file(folder / "texts-00000.safetensors")["hidden"].shape[1] == t5_tokens("sd3")

    with pytest.raises(ValueError, match=f"made from other inputs \\(max_sequence_length={TOKENS} there, None now\\)"):
        build_cache(pairs, folder, model, resolution=32, device="cpu", num_workers=0)
    cached = ["train.max_steps=1", "data.random_flip=no", "data.cache=true", f"data.cache_dir={folder}"]
    with pytest.raises(ValueError, match="max_sequence_length=8 there, 16 now"):
        run(tmp_path / "other", model, pairs, *cached, "model.max_sequence_length=16")
    run(tmp_path / "same", model, pairs, *cached, f"model.max_sequence_length={TOKENS}")
    assert seen["transformer"] and all(call["encoder_hidden_states"].shape[1] == t5_tokens("sd3")
                                       for call in seen["transformer"])


def test_online_sampling_and_training_read_the_length(tiny_flow_models, online_setup, tmp_path, seen):
    """A FLUX grpo rollout and update at 8 T5 tokens: every transformer call, sampling and training, reads 8 text
    tokens and 8 text ids."""
    train(online_config(tiny_flow_models, online_setup, "flux", tmp_path, "online.updates_per_rollout=1",
                        f"model.max_sequence_length={TOKENS}", method="grpo"))
    assert len(seen["transformer"]) > 2  # 4 sampling steps of 2 micro-batches, then the trained steps
    for call in seen["transformer"]:
        assert call["encoder_hidden_states"].shape[1] == TOKENS and call["txt_ids"].shape == (TOKENS, 3)


def test_generation_at_the_length_is_the_pipelines_and_is_recorded(tmp_path, tiny_flow_models, tiny_models,
                                                                   capsys):
    """`generate --max-sequence-length 8` makes the pipeline's `max_sequence_length=8` images and records the length,
    so a rerun at the default is refused; without it nothing is recorded (older folders compare equal); a pipeline
    without T5 refuses it."""
    model, out, prompts_txt = tiny_flow_models["sd3"], tmp_path / "out", tmp_path / "prompts.txt"
    prompts_txt.write_text("a red circle\n")
    cli_main(["generate", "--model", str(model), "--prompts", str(prompts_txt), "--seeds", "3", "--out", str(out),
              "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
              "--max-sequence-length", str(TOKENS)])
    assert f"{TOKENS} T5 tokens" in capsys.readouterr().out
    assert [r["max_sequence_length"] for r in records(out)] == [TOKENS]
    pipe = DiffusionPipeline.from_pretrained(model)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=TOKENS,
                 generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(pixels(out / "p0000-s0003.png") - np.round(image * 255)).max() <= 1
    with pytest.raises(ValueError, match=f"other settings \\(max_sequence_length={TOKENS} there, None now\\)"):
        generate_images(model, prompts_txt, "3", out, **FAST)

    default = tmp_path / "default"
    generate_images(model, prompts_txt, "3", default, **FAST)
    assert not any("max_sequence_length" in r for r in records(default))
    assert (pixels(default / "p0000-s0003.png") != pixels(out / "p0000-s0003.png")).any()  # the length tells
    assert generate_images(model, prompts_txt, "3", default, **FAST).kept == 1
    with pytest.raises(ValueError, match="max_sequence_length=8: a StableDiffusionPipeline has no T5 text encoder"):
        generate_images(tiny_models["sd"], prompts_txt, "0", tmp_path / "sd", max_sequence_length=TOKENS, **FAST)
