"""The flow-matching families against the real pipelines: tiny SD3 and FLUX.1-dev folders (tiny_flow.py) load
with `DiffusionPipeline.from_pretrained`, each family recognises its own folder only, and its prompt encoding is
the pipeline's `encode_prompt`, bit for bit, in the shapes the transformer reads."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from transformers import T5Tokenizer

from diffusion_align.models.conditioning import CaptionTruncation
from diffusion_align.models.families import detect_family
from diffusion_align.models.families.flux import Flux
from diffusion_align.models.families.sd3 import SD3
from diffusion_align.models.tiny import save_tiny_pipeline
from diffusion_align.models.tiny_flow import save_tiny_flow_pipeline, t5_tokenizer

PROMPTS = [
    "a red circle on a white background",
    "",
    "Hello, World!! café 東京 -- 3.14",
    " ".join(["a very long prompt about a red circle"] * 20),  # past CLIP's 77 tokens and T5's 256 and 512
]
FAMILY = {"sd3": SD3(), "flux": Flux()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-models")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    paths = {family: save_tiny_flow_pipeline(root / family, family) for family in FAMILY}
    assert torch.equal(torch.rand(3), expected)  # built from a private RNG: the caller's stream is untouched
    return paths | {"sdxl": save_tiny_pipeline(root / "sdxl", "sdxl")}


@pytest.fixture(scope="module")
def pipelines(folders):
    return {family: DiffusionPipeline.from_pretrained(folders[family]) for family in FAMILY}


def folder_configs(folder: Path) -> tuple[dict, dict]:
    """model_index.json and the denoiser's config (transformer or UNet), what `Family.matches` reads."""
    denoiser = "transformer" if (folder / "transformer").is_dir() else "unet"
    return (json.loads((folder / "model_index.json").read_text()),
            json.loads((folder / denoiser / "config.json").read_text()))


def parts(pipe, family):
    """The pipeline's tokenizers and text encoders in the family's encoding order."""
    names = family.text_encoders
    return ([getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names], [getattr(pipe, n) for n in names])


def test_each_family_matches_its_folder_only(folders):
    for name, family in FAMILY.items():
        for folder_name, folder in folders.items():
            assert family.matches(*folder_configs(folder)) == (folder_name == name), (name, folder_name)


def test_pipelines_load_as_saved(pipelines):
    sd3, flux = pipelines["sd3"], pipelines["flux"]
    assert type(sd3) is StableDiffusion3Pipeline and type(flux) is FluxPipeline
    assert sd3.scheduler.config.shift == 3.0 and not sd3.scheduler.config.use_dynamic_shifting
    assert flux.scheduler.config.use_dynamic_shifting and flux.transformer.config.guidance_embeds
    assert (flux.scheduler.config.base_shift, flux.scheduler.config.max_shift) == (0.5, 1.15)
    assert (flux.scheduler.config.base_image_seq_len, flux.scheduler.config.max_image_seq_len) == (256, 4096)
    for pipe in (sd3, flux):
        assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor
    # distinct widths everywhere, so that a mixed-up encoder or state fails with a shape error
    sd3_widths = [sd3.text_encoder.config.hidden_size, sd3.text_encoder.config.projection_dim,
                  sd3.text_encoder_2.config.hidden_size, sd3.text_encoder_2.config.projection_dim,
                  sd3.text_encoder_3.config.d_model, sd3.transformer.inner_dim]
    flux_widths = [flux.text_encoder.config.hidden_size, flux.text_encoder_2.config.d_model, flux.transformer.inner_dim]
    assert len(set(sd3_widths)) == len(sd3_widths) and len(set(flux_widths)) == len(flux_widths)


def test_t5_tokenizer_round_trips_through_the_pipeline_folder(pipelines):
    built = t5_tokenizer()
    for loaded in (pipelines["sd3"].tokenizer_3, pipelines["flux"].tokenizer_2):
        assert isinstance(loaded, T5Tokenizer) and len(loaded) == len(built)
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)  # T5's ids
        for prompt in PROMPTS:
            plain = built(prompt).input_ids
            assert plain[-1] == 1  # "</s>" appended
            padded = loaded(prompt, padding="max_length", max_length=len(plain) + 3).input_ids
            assert padded == plain + [0] * 3  # padded with "<pad>"
        cut = loaded(PROMPTS[-1], padding="max_length", max_length=SD3.max_sequence_length, truncation=True)
        assert len(cut.input_ids) == SD3.max_sequence_length and cut.input_ids[-1] == 1  # "</s>" kept when cut
    assert len(built(PROMPTS[-1]).input_ids) > Flux.max_sequence_length > SD3.max_sequence_length  # both truncate


@pytest.mark.parametrize("name", list(FAMILY))
def test_captions_count_as_cut_only_past_t5s_length(pipelines, name, caplog):
    """SD3's and FLUX's CLIP encoders read a caption's first 77 tokens and T5 reads it whole up to its
    max_sequence_length: only a caption past T5's length is cut (the count in the run's report)."""
    pipe, family = pipelines[name], FAMILY[name]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] + ([pipe.tokenizer_3] if name == "sd3" else [])
    past_clip = " ".join(["a red circle"] * 30)  # about 90 tokens: past CLIP's 77, within T5's 256 and 512
    assert len(pipe.tokenizer(past_clip).input_ids) > 77
    truncation = CaptionTruncation()
    truncation.check(family, tokenizers, [past_clip, PROMPTS[0]])
    assert truncation.count == 0 and "cut there" not in caplog.text
    truncation.check(family, tokenizers, PROMPTS)  # the last is past T5's length too
    assert truncation.count == 1 and f"longer than T5's {family.max_sequence_length} tokens" in caplog.text
    shorter = family.with_max_sequence_length(16)  # model.max_sequence_length
    truncation.check(shorter, tokenizers, [past_clip, PROMPTS[0]])
    assert truncation.count == 2


@pytest.mark.parametrize("name", list(FAMILY))
def test_encode_texts_is_the_pipelines_encode_prompt(pipelines, name):
    """Against `encode_prompt` under no_grad, as the pipelines' `__call__` runs it: with grad enabled the same T5
    (SDPA attention, on CPU) gives states that differ in the last bits (about 4e-6)."""
    pipe, family = pipelines[name], FAMILY[name]
    tokenizers, encoders = parts(pipe, family)
    # the family's encoding runs outside any autocast: an enclosing bf16 autocast changes nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, pooled = family.encode_texts(tokenizers, encoders, PROMPTS)
    if name == "sd3":
        with torch.no_grad():
            expected_hidden, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS, None, None,
                                                                        do_classifier_free_guidance=False)
        config = pipe.transformer.config
        assert hidden.shape == (len(PROMPTS), 77 + family.max_sequence_length, config.joint_attention_dim)
        clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert clip_width < config.joint_attention_dim and not hidden[:, :77, clip_width:].any()  # zero padding
    else:
        with torch.no_grad():
            expected_hidden, expected_pooled, text_ids = pipe.encode_prompt(PROMPTS, None)
        config = pipe.transformer.config
        assert hidden.shape == (len(PROMPTS), family.max_sequence_length, config.joint_attention_dim)
        assert text_ids.shape == (family.max_sequence_length, 3) and not text_ids.any()
    assert pooled.shape == (len(PROMPTS), config.pooled_projection_dim)
    assert hidden.dtype == pooled.dtype == torch.float32 and not hidden.requires_grad
    assert torch.equal(hidden, expected_hidden) and torch.equal(pooled, expected_pooled)


@pytest.mark.parametrize("name", list(FAMILY))
def test_generation_from_the_familys_states(pipelines, name):
    """A 2-step 32 px generation runs and gives finite images; fed the family's states instead of the prompts
    (without CFG: SD3 at guidance 1; FLUX-dev's guidance is an input, not CFG) it gives the same images."""
    pipe, family = pipelines[name], FAMILY[name]
    prompts = PROMPTS[:2]
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np",
                  **({"guidance_scale": 1.0} if name == "sd3" else {}))
    images = pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0
    hidden, pooled = family.encode_texts(*parts(pipe, family), prompts)
    again = pipe(prompt_embeds=hidden, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(0),
                 **kwargs).images
    assert np.array_equal(images, again)
    if name == "sd3":  # and with CFG, the pipeline's default
        cfg = pipe(prompts, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
        assert cfg.images.shape == (2, 32, 32, 3) and np.isfinite(cfg.images).all()


@pytest.mark.parametrize("name", list(FAMILY))
def test_kohya_files_are_refused_with_the_reason_and_no_inversion_setting_is_made_up(name):
    family = FAMILY[name]
    with pytest.raises(ValueError, match="kohya-format LoRA files are not written"):
        family.kohya_base("flow")
    assert family.inversion_steps is None  # SmPO publishes none: a run names its own (test_flow_train.py)
    assert family.lora_pipeline == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[name]


def test_unknown_flow_family(tmp_path):
    with pytest.raises(ValueError, match="unknown flow-matching family 'sdxl'"):
        save_tiny_flow_pipeline(tmp_path, "sdxl")


def test_latents_are_cut_into_tokens_of_2x2(folders):
    """SD3's patch embedding makes each patch_size x patch_size (2x2) latent patch a token, FLUX's packing each 2x2
    (its transformer's patch_size is 1); a UNet takes latents of any size."""
    for name, family in FAMILY.items():
        config = folder_configs(folders[name])[1]
        assert family.latent_multiple(config) == 2 and config["patch_size"] == {"sd3": 2, "flux": 1}[name]
    assert SD3().latent_multiple({"patch_size": 4}) == 4  # read from the config
    sdxl = detect_family(*folder_configs(folders["sdxl"]))
    assert sdxl == "sdxl" and sdxl.latent_multiple(folder_configs(folders["sdxl"])[1]) == 1


def test_flux_packing_and_ids_are_the_pipelines():
    from diffusion_align.models.families.flux import latent_image_ids, pack_latents, unpack_latents
    latents = torch.randn(3, 16, 12, 8)
    tokens = pack_latents(latents)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 3, 16, 12, 8))
    assert torch.equal(unpack_latents(tokens, 12, 8), latents)
    assert torch.equal(latent_image_ids(12, 8, "cpu", torch.bfloat16),
                       FluxPipeline._prepare_latent_image_ids(3, 6, 4, "cpu", torch.bfloat16))


def test_conditioning_rows_select_and_concatenate_with_their_family():
    from diffusion_align.models.families import Conditioning, TextStates
    flux = Flux()
    texts = (torch.randn(2, 5, 8), torch.randn(2, 4))
    cond = flux.conditioning(TextStates(*texts), guidance=3.5)
    assert cond.family is flux and cond.guidance.tolist() == [3.5, 3.5]
    picked = cond.select(torch.tensor([1, 1, 0]))
    assert torch.equal(picked.encoder_hidden_states, texts[0][[1, 1, 0]])
    assert torch.equal(picked.pooled_projections, texts[1][[1, 1, 0]]) and picked.guidance.shape == (3,)
    both = Conditioning.cat([cond, picked])
    assert both.family is flux and torch.equal(both.pooled_projections, torch.cat([texts[1], texts[1][[1, 1, 0]]]))
    sdxl = Conditioning(texts[0], {"text_embeds": texts[1], "time_ids": torch.arange(12.).view(2, 6)})
    assert torch.equal(Conditioning.cat([sdxl, sdxl.select(torch.tensor([1]))]).added_cond_kwargs["time_ids"][2],
                       torch.arange(6., 12.))


@pytest.mark.parametrize("name", list(FAMILY))
def test_decode_images_is_the_pipelines_decode(pipelines, name):
    """`decode_images` of a 2-step generation's final latents (FLUX's unpacked) gives the images the pipeline itself
    decodes at the end of `__call__`: latents / scaling_factor + shift_factor, then the VAE and its postprocessing.
    Both VAEs carry their family's shift (nonzero) and scale (not 1), and the same decode without the shift gives
    other images, so a decode that left the shift out would fail."""
    from diffusion_align.training.sampling import decode_images
    pipe = pipelines[name]
    scaling, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    assert shift > 0.05 and abs(scaling - 1) > 0.5
    final = []

    def keep_latents(pipe, step, timestep, tensors):
        final[:] = [tensors["latents"]]
        return {}

    expected = pipe(PROMPTS[:2], num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=keep_latents).images
    latents = final[0] if name == "sd3" else pipe._unpack_latents(final[0], 32, 32, pipe.vae_scale_factor)
    assert latents.shape == (2, 16, 16, 16)
    expected = np.stack([np.asarray(image) for image in expected])
    assert expected.shape == (2, 32, 32, 3) and expected.std() > 20  # not flat, nor clipped all over
    assert np.array_equal(np.stack([np.asarray(image) for image in decode_images(pipe.vae, latents)]), expected)
    with torch.no_grad():
        unshifted = pipe.image_processor.postprocess(pipe.vae.decode(latents / scaling).sample, output_type="np")
    assert all(np.abs(np.round(u * 255) - e).max() >= 3 for u, e in zip(unshifted, expected))  # each image changes


@pytest.mark.parametrize("name", list(FAMILY))
def test_fp16_keeps_t5s_fp32_layers_as_the_pipelines_load_them(folders, name):
    """The pipelines load T5 in fp16 with its feed-forward output layers (`wo`) in fp32, whose activations overflow
    fp16 in T5-XXL; a run's encoders, loaded in fp32 and cast (`place`), keep the same layers in fp32."""
    from transformers import T5EncoderModel

    from diffusion_align.models.loading import load_components, place
    t5 = place(load_components(str(folders[name]), denoiser=False).text_encoders[-1], "cpu", torch.float16)
    loaded = T5EncoderModel.from_pretrained(folders[name], subfolder="text_encoder_3" if name == "sd3" else
                                            "text_encoder_2", dtype=torch.float16)
    dtypes = {n: p.dtype for n, p in t5.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in loaded.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.float32} == {n for n in dtypes if ".wo." in n} != set()
    assert all(p.dtype == torch.bfloat16 for p in place(t5, "cpu", torch.bfloat16).parameters())  # fp16's alone


def test_an_sd3_pipeline_saved_without_t5_is_named(folders, tmp_path):
    import shutil

    from diffusion_align.config import ConfigError
    from diffusion_align.models.loading import load_components
    folder = shutil.copytree(folders["sd3"], tmp_path / "sd3-no-t5")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]  # StableDiffusion3Pipeline(text_encoder_3=None)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="model_index.json has no text_encoder_3, which sd3 encodes prompts with"):
        load_components(str(folder))
    from diffusion_align.config import load_config
    from diffusion_align.training.memory import pipeline_on_meta
    with pytest.raises(ConfigError, match="model_index.json has no text_encoder_3"):  # the planner's reading too
        pipeline_on_meta(load_config(None, [f"model.pretrained={folder}", "train.resolution=64"]))
    assert load_components(str(folder), encoders=False).family.name == "sd3"  # a latent cache's run needs none
