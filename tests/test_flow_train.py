"""The offline methods on the flow-matching transformers (SD3, FLUX.1-dev), end to end on tiny pipelines loaded
through the real loading code: what the transformer received (the normalised VAE latents, the noised latents and
velocity target by hand, timesteps shared by a pair, the conditioning against the pipelines' own `encode_prompt`,
FLUX's packed latents, ids and guidance), the errors the objective saw, and the saved LoRA and full models loaded
back by the pipelines."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from diffusion_align.config import ConfigError, load_config
from diffusion_align.training import methods
from diffusion_align.training import run as run_module
from diffusion_align.training.run import model_family
from test_train import read_metrics, run
from test_train_inputs import all_columns, expected_pixels, per_row_error, spy_on_inputs  # noqa: F401 (a fixture)

TRANSFORMERS = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}


@pytest.fixture
def seen(monkeypatch):
    """Every transformer call (its keyword inputs, its output and the module called), VAE posterior draw, loader
    batch and objective call of a run."""
    log = {"transformer": [], "vae": [], "batches": [], "objective": []}
    for cls in TRANSFORMERS.values():
        def forward(self, *args, _forward=cls.forward, **kwargs):
            out = _forward(self, *args, **kwargs)
            log["transformer"].append({**{k: v.detach().clone() if torch.is_tensor(v) else v
                                          for k, v in kwargs.items()},
                                       "out": out[0].detach().float().clone(), "out_dtype": out[0].dtype,
                                       "module": self})
            return out
        monkeypatch.setattr(cls, "forward", forward)
    spy_on_inputs(monkeypatch, log)
    return log


def picked_rows(pairs, batch, column="jpg"):
    """The batch's source rows, and their `column`_0 / _1 values in the layout [winners, losers]."""
    rows = pq.read_table(pairs).to_pylist()
    picked = [rows[i] for i in batch["indices"]]
    winners = [r[f"{column}_0"] if r["label_0"] > r["label_1"] else r[f"{column}_1"] for r in picked]
    losers = [r[f"{column}_1"] if r["label_0"] > r["label_1"] else r[f"{column}_0"] for r in picked]
    return picked, winners + losers


def pipeline_states(model, family, prompts):
    """(encoder_hidden_states, pooled_projections) of `prompts` as the family's own pipeline encodes them."""
    pipe = DiffusionPipeline.from_pretrained(model)
    with torch.no_grad():
        if family == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        else:
            hidden, pooled, _ = pipe.encode_prompt(prompts, None)
    return hidden, pooled


def as_latents(tensor, family):
    """A transformer's input or output as 32 x 32 images' latents: FLUX's 2x2-packed tokens unpacked."""
    return tensor if family == "sd3" else FluxPipeline._unpack_latents(tensor, 32, 32, vae_scale_factor=2)


def noised_rows(call, family):
    """The noised latents a transformer call received and their timesteps on the 0-1000 scale (FluxPipeline passes
    the transformer s = t / 1000 itself)."""
    return as_latents(call["hidden_states"], family), call["timestep"] * (1 if family == "sd3" else 1000)


def call_inputs(call):
    return {k: v for k, v in call.items() if k not in ("out", "out_dtype", "module")}


def same_inputs(a, b):
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k], k


def normalised_latents(model, pixels, noise):
    """(mean + std * noise - shift_factor) * scaling_factor of an independently loaded VAE: the latents SD3's and
    FLUX's training scripts train on."""
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    assert vae.config.shift_factor and vae.config.scaling_factor != 1
    return (dist.mean + dist.std * noise - vae.config.shift_factor) * vae.config.scaling_factor


def check_rectified_flow_rows(x_t, t, x0, pairs):
    """x_t = (1 - s) x0 + s eps with s = t / 1000 per row, eps shared by a pair's rows (`pairs` pairs, winners
    first; 0: rows of no pair, as SFT's winners); returns the velocity target eps - x0."""
    assert t.dtype == torch.float32
    s = (t / 1000).view(-1, 1, 1, 1)
    assert ((s > 0) & (s < 1)).all()
    eps = (x_t - (1 - s) * x0) / s
    if pairs:
        assert len(x_t) == 2 * pairs and torch.equal(t[:pairs], t[pairs:])
        assert torch.allclose(eps[:pairs], eps[pairs:], atol=1e-4), "the two images of a pair share their noise"
    assert 0.5 < eps.std() < 1.5
    return eps - x0


def test_sd3_dpo_rows_noise_target_and_conditioning(tmp_path, tiny_flow_models, tiny_pairs, seen):
    model = tiny_flow_models["sd3"]
    run(tmp_path, model, tiny_pairs, "train.max_steps=1", "train.batch_size=3", "data.random_flip=no")
    picked, images = picked_rows(tiny_pairs, seen["batches"][0])
    draw = seen["vae"][0]
    assert torch.allclose(draw["pixels"], torch.stack([expected_pixels(j, 32) for j in images]), atol=1e-5)
    x0 = normalised_latents(model, draw["pixels"], draw["noise"])
    assert torch.allclose(draw["latents"], x0, atol=1e-5)

    policy, reference = seen["transformer"]  # LoRA: the reference is the same transformer with adapters off
    assert torch.equal(policy["hidden_states"], reference["hidden_states"])
    assert torch.equal(policy["timestep"], reference["timestep"])
    target = check_rectified_flow_rows(policy["hidden_states"], policy["timestep"], x0, 3)
    call = seen["objective"][0]
    assert call["name"] == "diffusion_dpo_loss" and call["kwargs"]["beta"] == 100  # Flow-DPO's published beta
    model_w, model_l, ref_w, ref_l = call["args"]
    assert torch.allclose(torch.cat([model_w, model_l]), per_row_error(policy["out"], target), rtol=1e-4)
    assert torch.allclose(torch.cat([ref_w, ref_l]), per_row_error(reference["out"], target), rtol=1e-4)
    # both rows of a pair conditioned on its prompt, as StableDiffusion3Pipeline encodes it (up to rounding: the
    # trainer encodes each distinct prompt once, in a batch of another size)
    hidden, pooled = pipeline_states(model, "sd3", [r["caption"] for r in picked] * 2)
    assert torch.allclose(policy["encoder_hidden_states"], hidden, atol=1e-5)
    assert torch.allclose(policy["pooled_projections"], pooled, atol=1e-5)


def test_sd3_uniform_timestep_sampling_reaches_the_transformer(tmp_path, tiny_flow_models, tiny_pairs, seen):
    """train.timestep_sampling=uniform: each pair's s is a uniform u from the pair's generator (seeded by (train
    seed, epoch, pair index, 1), after its prompt-dropout draw), shifted by SD3's 3.0: t = 1000 * 3u / (1 + 2u), for
    the policy and the reference alike."""
    run(tmp_path, tiny_flow_models["sd3"], tiny_pairs, "train.max_steps=1", "train.batch_size=3",
        "train.timestep_sampling=uniform")
    expected = []
    for epoch, index in seen["batches"][0]["keys"]:
        state = np.random.SeedSequence([0, epoch, index, 1]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        torch.rand((), generator=generator)  # prompt dropout's draw
        u = torch.rand((), generator=generator).item()
        expected.append(1000 * 3 * u / (1 + 2 * u))
    policy, reference = seen["transformer"]
    assert policy["timestep"].tolist() == pytest.approx(expected * 2, rel=1e-6)
    assert torch.equal(reference["timestep"], policy["timestep"])


def test_flux_dpo_packed_latents_ids_guidance_and_conditioning(tmp_path, tiny_flow_models, tiny_pairs, seen):
    model = tiny_flow_models["flux"]
    run(tmp_path, model, tiny_pairs, "train.max_steps=1", "train.batch_size=3", "data.random_flip=no")
    picked, _ = picked_rows(tiny_pairs, seen["batches"][0])
    draw = seen["vae"][0]
    x0 = normalised_latents(model, draw["pixels"], draw["noise"])
    policy, reference = seen["transformer"]
    # the latents packed 2x2 into tokens, with their ids and FLUX.1-dev's guidance, as FluxPipeline makes them
    tokens = policy["hidden_states"]
    x_t = FluxPipeline._unpack_latents(tokens, 32, 32, vae_scale_factor=2)
    assert x_t.shape == x0.shape == (6, 16, 16, 16) and tokens.shape == (6, 64, 64)
    assert torch.equal(FluxPipeline._pack_latents(x_t, 6, 16, 16, 16), tokens)
    assert torch.equal(policy["img_ids"], FluxPipeline._prepare_latent_image_ids(6, 8, 8, "cpu", torch.float32))
    assert policy["txt_ids"].shape == (512, 3) and not policy["txt_ids"].any()
    assert torch.equal(policy["guidance"], torch.full((6,), 3.5))
    # FluxPipeline passes the transformer the scheduler's timestep / 1000: s itself
    target = check_rectified_flow_rows(x_t, policy["timestep"] * 1000, x0, 3)
    model_w, model_l, ref_w, ref_l = seen["objective"][0]["args"]
    out = FluxPipeline._unpack_latents(policy["out"], 32, 32, vae_scale_factor=2)
    assert torch.allclose(torch.cat([model_w, model_l]), per_row_error(out, target), rtol=1e-4)
    ref_out = FluxPipeline._unpack_latents(reference["out"], 32, 32, vae_scale_factor=2)
    assert torch.allclose(torch.cat([ref_w, ref_l]), per_row_error(ref_out, target), rtol=1e-4)
    hidden, pooled = pipeline_states(model, "flux", [r["caption"] for r in picked] * 2)
    assert torch.allclose(policy["encoder_hidden_states"], hidden, atol=1e-5)
    assert torch.allclose(policy["pooled_projections"], pooled, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dcpo_conditions_each_image_on_its_own_caption(tmp_path, tiny_flow_models, all_columns, seen, family):
    """DCPO: the winner images' rows get the states of the winner's caption and the losers' rows the loser's, as
    the family's pipeline encodes them, in the policy's and the reference's call alike."""
    model = tiny_flow_models[family]
    run(tmp_path, model, all_columns, "method.name=dcpo", "train.max_steps=1", "train.batch_size=4",
        "data.random_flip=no")
    picked, images = picked_rows(all_columns, seen["batches"][0])
    _, captions = picked_rows(all_columns, seen["batches"][0], "caption")
    # the batch has pairs of both orientations: taking caption_0 for image 0's row would fail
    assert {r["label_0"] > r["label_1"] for r in picked} == {True, False}
    assert torch.allclose(seen["vae"][0]["pixels"], torch.stack([expected_pixels(j, 32) for j in images]), atol=1e-5)
    policy, reference = seen["transformer"]
    assert policy["module"] is reference["module"]  # LoRA: the reference is the transformer with adapters off
    same_inputs(call_inputs(policy), call_inputs(reference))
    hidden, pooled = pipeline_states(model, family, captions)
    assert torch.allclose(policy["encoder_hidden_states"], hidden, atol=1e-5)
    assert torch.allclose(policy["pooled_projections"], pooled, atol=1e-5)
    assert seen["objective"][0]["name"] == "diffusion_dpo_loss"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_fine_tune_reference_is_the_frozen_base_on_the_policys_inputs(tmp_path, tiny_flow_models, tiny_pairs,
                                                                           seen, family):
    """model.lora_rank=null: the frozen copy is called on the very inputs the trained transformer gets (the latents
    noised by hand, the pair's timesteps, the prompt's states, FLUX's ids and guidance), its errors are the
    reference's, and it stays the base model: in step 2 it gives the base's outputs where the trained policy no
    longer does, and its weights are the base's after training."""
    model = tiny_flow_models[family]
    result = run(tmp_path, model, tiny_pairs, "model.lora_rank=null", "train.lr=1e-3", "train.max_steps=2",
                 "train.batch_size=3", "data.random_flip=no")
    calls = seen["transformer"]
    assert len(calls) == 4  # the policy and the reference per step
    policy, reference = sorted(calls[:2], key=lambda c: c["module"] is not result.denoiser)
    assert policy["module"] is result.denoiser and reference["module"] is not result.denoiser
    assert all(c["module"] is reference["module"] for c in calls if c["module"] is not result.denoiser)
    same_inputs(call_inputs(policy), call_inputs(reference))
    picked, _ = picked_rows(tiny_pairs, seen["batches"][0])
    draw = seen["vae"][0]
    x0 = normalised_latents(model, draw["pixels"], draw["noise"])
    target = check_rectified_flow_rows(*noised_rows(policy, family), x0, 3)
    model_w, model_l, ref_w, ref_l = seen["objective"][0]["args"]
    assert torch.allclose(torch.cat([model_w, model_l]), per_row_error(as_latents(policy["out"], family), target),
                          rtol=1e-4)
    assert torch.allclose(torch.cat([ref_w, ref_l]), per_row_error(as_latents(reference["out"], family), target),
                          rtol=1e-4)
    hidden, pooled = pipeline_states(model, family, [r["caption"] for r in picked] * 2)
    assert torch.allclose(reference["encoder_hidden_states"], hidden, atol=1e-5)
    assert torch.allclose(reference["pooled_projections"], pooled, atol=1e-5)

    base = TRANSFORMERS[family].from_pretrained(model, subfolder="transformer")
    step_2 = {c["module"] is result.denoiser: c for c in calls[2:]}
    same_inputs(call_inputs(step_2[True]), call_inputs(step_2[False]))
    with torch.no_grad():
        base_out = base(**call_inputs(step_2[False]))[0]
    assert torch.allclose(step_2[False]["out"], base_out, atol=1e-5)
    assert not torch.allclose(step_2[True]["out"], base_out, atol=1e-4), "the policy trained in step 1"
    frozen, base_weights = reference["module"].state_dict(), base.state_dict()
    assert frozen.keys() == base_weights.keys() and all(torch.equal(frozen[k], base_weights[k]) for k in frozen)
    trained = result.denoiser.state_dict()
    assert any(not torch.equal(trained[k], base_weights[k]) for k in trained)


def probe(transformer, family):
    """The transformer's output on fixed random inputs shaped for `family`."""
    g = torch.Generator().manual_seed(0)
    config = transformer.config
    if family == "sd3":
        kwargs = dict(hidden_states=torch.randn(2, 16, 16, 16, generator=g), timestep=torch.tensor([300.0, 800.0]),
                      encoder_hidden_states=torch.randn(2, 10, config.joint_attention_dim, generator=g),
                      pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g))
    else:
        kwargs = dict(hidden_states=torch.randn(2, 64, 64, generator=g), timestep=torch.tensor([0.3, 0.8]),
                      encoder_hidden_states=torch.randn(2, 10, config.joint_attention_dim, generator=g),
                      pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                      guidance=torch.full((2,), 3.5), txt_ids=torch.zeros(10, 3),
                      img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))
    with torch.no_grad():
        return transformer(**kwargs, return_dict=False)[0]


@pytest.mark.parametrize("alpha", [None, 8], ids=["alpha=rank", "alpha=2rank"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_loads_into_the_pipeline_as_trained(tmp_path, tiny_flow_models, tiny_pairs, family, alpha):
    """The final LoRA file, loaded by the family's pipeline with `load_lora_weights`, gives the trained
    transformer's outputs, which differ from the base's; its keys are diffusers' `transformer.` ones. With alpha =
    2 x rank (the shipped configs/sd35 LoRAs' rank 32, alpha 64), the pipeline restores the scale 2: the same weights
    at scale 1 (a loader that ignored alpha) give other outputs."""
    model = tiny_flow_models[family]
    result = run(tmp_path, model, tiny_pairs, "train.lr=3e-2", "model.lora_rank=4",
                 f"model.lora_alpha={alpha or 'null'}")
    scales = {m.scaling["default"] for m in result.denoiser.modules() if hasattr(m, "scaling")}
    assert scales == {1 if alpha is None else 2}
    trained = probe(result.denoiser, family)
    pipe = DiffusionPipeline.from_pretrained(model)
    base = probe(pipe.transformer, family)
    pipe.load_lora_weights(result.final_dir, adapter_name="trained")
    assert torch.allclose(probe(pipe.transformer, family), trained, atol=1e-5)
    assert not torch.allclose(base, trained, atol=1e-3)
    if alpha is not None:
        pipe.set_adapters("trained", adapter_weights=4 / alpha)
        assert not torch.allclose(probe(pipe.transformer, family), trained, atol=1e-3)
    from safetensors.torch import load_file
    keys = load_file(result.final_dir / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert not (result.final_dir / "kohya_lora.safetensors").exists()  # no kohya layout for these families


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_fine_tune_saves_a_pipeline_with_the_trained_transformer(tmp_path, tiny_flow_models, tiny_pairs, family):
    result = run(tmp_path, tiny_flow_models[family], tiny_pairs, "model.lora_rank=null", "train.lr=1e-3")
    pipe = DiffusionPipeline.from_pretrained(result.final_dir)
    assert type(pipe.transformer) is TRANSFORMERS[family]
    saved, trained = pipe.transformer.state_dict(), result.denoiser.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    base = DiffusionPipeline.from_pretrained(tiny_flow_models[family]).transformer.state_dict()
    assert any(not torch.equal(base[k], saved[k]) for k in saved)
    assert "full transformer fine-tune" in (result.final_dir / "README.md").read_text()


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method, objective", [("mapo", "mapo_loss"), ("sft", "sft_loss"),
                                               ("dcpo", "diffusion_dpo_loss"), ("smpo", "smpo_loss")])
def test_every_offline_method_trains_the_transformer(tmp_path, tiny_flow_models, all_columns, seen, family, method,
                                                     objective):
    """Each method's objective on the transformer's errors; SFT's and MaPO's one call (no reference) gets the
    winners' latents (SFT) or both images' (MaPO) noised by hand, and the objective their errors."""
    model = tiny_flow_models[family]
    extra = ["method.pref_scorer=null", "method.inversion_steps=0"] if method == "smpo" else []
    run(tmp_path, model, all_columns, f"method.name={method}", "train.max_steps=1", "data.random_flip=no", *extra)
    assert [c["name"] for c in seen["objective"]] == [objective]
    assert all(torch.isfinite(a).all() for a in seen["objective"][0]["args"])
    rows = 2 if method == "sft" else 4  # winners only for sft
    assert all(len(call["hidden_states"]) == rows for call in seen["transformer"])
    assert len(seen["transformer"]) == (1 if method in ("sft", "mapo") else 2)  # a reference pass where it has one
    if method in ("sft", "mapo"):
        _, images = picked_rows(all_columns, seen["batches"][0])
        draw = seen["vae"][0]
        assert torch.allclose(draw["pixels"], torch.stack([expected_pixels(j, 32) for j in images[:rows]]),
                              atol=1e-5)
        (call,) = seen["transformer"]
        x0 = normalised_latents(model, draw["pixels"], draw["noise"])
        target = check_rectified_flow_rows(*noised_rows(call, family), x0, 0 if method == "sft" else 2)
        errors = per_row_error(as_latents(call["out"], family), target)
        assert torch.allclose(torch.cat(seen["objective"][0]["args"]), errors, rtol=1e-4)


def test_smpo_inverts_with_the_euler_ode_and_needs_its_steps_named(tmp_path, tiny_flow_models, all_columns, seen):
    """SmPO on a flow model noises by inverting the Euler ODE (2 ReNoise-refined steps here, 2 calls each) from the
    clean latent at timestep 0, and trains on the velocity the inverted latent implies, (z - x0) / s. SmPO publishes
    no flow setting, so the steps must be named."""
    from diffusion_align.config import ConfigError
    model, smpo = tiny_flow_models["sd3"], ["method.name=smpo", "method.pref_scorer=null", "train.max_steps=1"]
    with pytest.raises(ConfigError, match="SmPO publishes no inversion setting for flow-matching models"):
        run(tmp_path / "unnamed", model, all_columns, *smpo)
    run(tmp_path, model, all_columns, *smpo, "method.inversion_steps=2", "data.random_flip=no")
    x0 = seen["vae"][-1]["latents"]
    step_1, renoise_1, step_2, renoise_2, policy, reference = seen["transformer"]
    assert torch.equal(step_1["hidden_states"], x0) and not step_1["timestep"].any()
    t = policy["timestep"]
    assert torch.equal(t[:2], t[2:]) and torch.equal(reference["timestep"], t)
    s = (t / 1000).view(-1, 1, 1, 1)
    ds = s / 2
    assert torch.allclose(renoise_1["hidden_states"], x0 + ds * step_1["out"], atol=1e-5)
    assert torch.allclose(step_2["timestep"], t / 2) and torch.allclose(renoise_2["timestep"], t)
    z_1 = x0 + ds * (step_1["out"] + renoise_1["out"]) / 2
    assert torch.allclose(step_2["hidden_states"], z_1, atol=1e-5)
    z = z_1 + ds * (step_2["out"] + renoise_2["out"]) / 2
    assert torch.allclose(policy["hidden_states"], z, atol=1e-5)
    model_w, model_l, *_ = seen["objective"][0]["args"]
    assert torch.allclose(torch.cat([model_w, model_l]), per_row_error(policy["out"], (z - x0) / s), rtol=1e-3)


def test_betas_on_flow_models_are_the_published_ones_or_warned_about():
    dpo, mapo = methods.METHODS["dpo"], methods.METHODS["mapo"]
    assert dpo.resolve_beta(None, flow=True) == (100, None) and dpo.resolve_beta(None, flow=False) == (5000, None)
    beta, warning = mapo.resolve_beta(None, flow=True)
    assert beta == 0.1 and "mapo publishes no beta for flow-matching models" in warning
    assert dpo.resolve_beta(5000, flow=True)[1].startswith(
        "method.beta=5000 is far from dpo's published beta (100) on flow-matching models")
    assert dpo.resolve_beta(500, flow=True)[1] is None and dpo.resolve_beta(500, flow=False)[1] is None
    # no flow beta published: a named one is taken as it is (configs/sd35/smpo.yaml's 100), a UNet one is judged
    smpo = methods.METHODS["smpo"]
    assert smpo.resolve_beta(100, flow=True) == (100, None) and smpo.resolve_beta(100, flow=False)[1] is not None


def test_precomputed_reference_errors_and_the_latent_cache_on_flux_are_the_live_run(tmp_path, tiny_flow_models,
                                                                                    tiny_pairs):
    """A FLUX full fine-tune from a latent cache on reference errors computed before training (one batch of 16 pairs,
    no reference copy) gives the errors and losses of the run that computes them live."""
    from test_reference import same_run
    common = ["train.max_steps=4", "data.prompt_dropout=0.3", "train.batch_size=4", "model.lora_rank=null",
              "train.lr=1e-4", "data.cache=true", "data.cache_dtype=fp32", f"data.cache_dir={tmp_path / 'cache'}"]
    run(tmp_path / "live", tiny_flow_models["flux"], tiny_pairs, *common)
    run(tmp_path / "pre", tiny_flow_models["flux"], tiny_pairs, *common, "method.precomputed_reference=true",
        "method.reference_batch_size=16")
    same_run(tmp_path / "live" / "run", tmp_path / "pre" / "run")


def test_precomputed_reference_errors_are_made_again_for_other_timesteps(tmp_path, tiny_flow_models, tiny_pairs,
                                                                         caplog):
    """The timestep sampling is in the reference errors' key: errors of logit-normal draws would make the first
    LoRA step's loss something other than log 2 under uniform ones."""
    caplog.set_level(logging.INFO, logger="diffusion_align")
    precomputed = ["method.precomputed_reference=true", "train.max_steps=1"]
    run(tmp_path, tiny_flow_models["sd3"], tiny_pairs, *precomputed)
    caplog.clear()
    run(tmp_path, tiny_flow_models["sd3"], tiny_pairs, *precomputed, "train.timestep_sampling=uniform",
        "train.overwrite=true")
    assert "made for another run; computing the reference errors again" in caplog.text
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_bf16_runs_the_frozen_parts_and_the_transformer_in_bf16_and_the_errors_in_fp32(tmp_path, tiny_flow_models,
                                                                                      tiny_pairs, seen):
    """train.mixed_precision=bf16 on FLUX.1-dev, LoRA: T5 and CLIP encode in bf16 (their states reach the
    transformer so), the frozen base is held in bf16 and the adapters in fp32, the transformer's forward runs under
    the loop's bf16 autocast on fp32 noised latents, and the errors the objective sees are fp32."""
    result = run(tmp_path, tiny_flow_models["flux"], tiny_pairs, "train.max_steps=1", "train.mixed_precision=bf16")
    call = seen["transformer"][0]
    assert call["encoder_hidden_states"].dtype == call["pooled_projections"].dtype == torch.bfloat16
    assert call["hidden_states"].dtype == torch.float32 and call["guidance"].dtype == torch.float32
    assert call["out_dtype"] == torch.bfloat16  # computed under the autocast
    dtypes = {name: p.dtype for name, p in result.denoiser.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(a.dtype == torch.float32 for a in seen["objective"][0]["args"])
    assert seen["vae"][0]["latents"].dtype == torch.float32


def vae_by_8(folder, model) -> str:
    """A model.vae folder in `folder`: the config of `model`'s tiny VAE with four levels, downsampling by 8 as SD3's
    and FLUX's do (the tiny one has two: by 2). A config alone: the resolution check loads no weights."""
    config = json.loads((Path(model) / "vae" / "config.json").read_text())
    levels = 4
    config.update(block_out_channels=[config["block_out_channels"][-1]] * levels,
                  down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_a_resolution_whose_latents_are_not_whole_tokens_is_refused_before_loading(tmp_path, tiny_flow_models,
                                                                                   tiny_pairs, monkeypatch, family,
                                                                                   method):
    """SD3 cuts its latents into 2x2 patches, FLUX packs 2x2 latents into a token: 40 px through a VAE downsampling
    by 8 are 5x5 latents, which failed in the first step's reshape, after the models (and any latent cache or
    reference errors) were made. The run refuses them first, with the multiple this VAE and transformer need; the
    tiny VAE downsamples by 2, so there 40 px are 20x20 latents, whole tokens."""
    model, vae = tiny_flow_models[family], vae_by_8(tmp_path / "vae", tiny_flow_models[family])

    def load_components(*args, **kwargs):
        raise AssertionError("a model was loaded before the resolution was checked")
    monkeypatch.setattr(run_module, "load_components", load_components)
    online = ["online.prompts=prompts.txt"] if method == "grpo" else []
    with pytest.raises(ConfigError, match=rf"train.resolution=40 must be a multiple of 16 for .*{family} \({family}\): "
                                          r"its VAE downsamples by 8 and its transformer reads the latents in 2x2 "
                                          r"patches; e.g. 32 or 48"):
        run(tmp_path, model, tiny_pairs, f"method.name={method}", *online, "train.resolution=40", f"model.vae={vae}")
    for resolution, vae_key in ((48, [f"model.vae={vae}"]), (40, [])):
        cfg = load_config(None, [f"model.pretrained={model}", f"train.resolution={resolution}", *vae_key])
        assert model_family(cfg)[0] == family


def test_an_sd3_resolution_past_its_position_table_is_refused_before_loading(tmp_path, tiny_flow_models, tiny_pairs,
                                                                             monkeypatch):
    """SD3's learned positions cover pos_embed_max_size patches a side (the tiny one: 32 patches of 2 latents, 64
    latents, 128 px through its VAE downsampling by 2); a larger image failed in the first step's forward, after the
    models were made. The check's boundary is the transformer's own: 64 latents go through it, 68 do not."""
    model = tiny_flow_models["sd3"]
    transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    cond = dict(encoder_hidden_states=torch.zeros(1, 3, transformer.config.joint_attention_dim),
                pooled_projections=torch.zeros(1, transformer.config.pooled_projection_dim), timestep=torch.tensor([1]))
    transformer(hidden_states=torch.zeros(1, 16, 64, 64), **cond)
    with pytest.raises(ValueError, match="cannot be greater than `pos_embed_max_size`"):
        transformer(hidden_states=torch.zeros(1, 16, 68, 68), **cond)

    def load_components(*args, **kwargs):
        raise AssertionError("a model was loaded before the resolution was checked")
    monkeypatch.setattr(run_module, "load_components", load_components)
    with pytest.raises(ConfigError, match=r"train.resolution=136 is larger than .* \(sd3\) has positions for: at most "
                                          r"128 px \(its transformer's pos_embed_max_size, in latents 64, times its "
                                          r"VAE's downsampling by 2\)"):
        run(tmp_path, model, tiny_pairs, "train.resolution=136")
    with pytest.raises(AssertionError, match="a model was loaded"):  # 128 px passes the check
        run(tmp_path / "at-most", model, tiny_pairs, "train.resolution=128")
