"""What the trainer hands the UNet and the objective, recomputed independently of the package's own helpers:
which images become which rows, the timesteps and noise of each pair, the target, the conditioning (prompts,
SDXL sizes and crops), the precision of the frozen encoders, and the beta each method trains with."""

import dataclasses
import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion_align.config import ConfigError
from diffusion_align.training import inputs, likelihood, methods, trainer
from diffusion_align.training import run as run_module
from test_train import read_metrics, run


@pytest.fixture
def seen(monkeypatch):
    """Everything that reaches the UNet, the VAE and the objectives, and every batch the loader yields."""
    log = {"unet": [], "vae": [], "batches": [], "objective": []}
    forward = UNet2DConditionModel.forward

    def unet_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        out = forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)
        added = {k: v.detach().clone() for k, v in (kwargs.get("added_cond_kwargs") or {}).items()}
        log["unet"].append({"x_t": sample.detach().float().clone(), "t": timestep.clone(),
                            "hidden": encoder_hidden_states.detach().clone(), "added": added,
                            "out": out.sample.detach().float().clone()})
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", unet_forward)
    spy_on_inputs(monkeypatch, log)
    return log


def spy_on_inputs(monkeypatch, log: dict) -> None:
    """Log into `log` the pixels and posterior draws of each VAE encoding ("vae"; "pixels" alone when the mean is
    used), every batch the loader yields ("batches") and every objective call ("objective")."""
    encode, sample = inputs.encode_posteriors, likelihood.Posteriors.sample

    def encode_posteriors(vae, pixel_values, batch_size=None):
        log["pixels"] = pixel_values.clone()
        return encode(vae, pixel_values, batch_size)

    def sample_posteriors(self, noise):
        latents = sample(self, noise)
        log["vae"].append({"pixels": log.pop("pixels", None), "noise": noise.clone(), "latents": latents.clone()})
        return latents

    make_loader = trainer.make_pair_loader

    def loader(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            log["batches"].append(batch)
            yield batch

    def spy(name):
        objective = getattr(methods, name)

        def recorded(*args, **kwargs):
            log["objective"].append({"name": name, "args": [a.detach().clone() for a in args], "kwargs": kwargs})
            return objective(*args, **kwargs)
        monkeypatch.setattr(methods, name, recorded)

    for name in ("diffusion_dpo_loss", "smpo_loss", "mapo_loss", "sft_loss"):
        spy(name)
    monkeypatch.setattr(inputs, "encode_posteriors", encode_posteriors)
    monkeypatch.setattr(likelihood.Posteriors, "sample", sample_posteriors)
    monkeypatch.setattr(trainer, "make_pair_loader", loader)


def per_row_error(a, b):
    return (a - b).pow(2).mean(dim=(1, 2, 3))


def abar(model, timesteps):
    return DDPMScheduler.from_pretrained(model, subfolder="scheduler").alphas_cumprod[timesteps].view(-1, 1, 1, 1)


def pair_noise(call, x0, model):
    """The noise that forward-noised x0 into the UNet's input: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    a = abar(model, call["t"])
    return (call["x_t"] - a.sqrt() * x0) / (1 - a).sqrt(), a


def expected_pixels(jpeg: bytes, res: int) -> torch.Tensor:
    """Shortest side to `res` (bilinear), centre crop, [-1, 1]: written out here, not taken from data/pairs.py."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    new_w, new_h = round(w * res / min(w, h)), round(h * res / min(w, h))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = (new_h - res) // 2, (new_w - res) // 2
    pixels = np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def text_states(model, prompts):
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def test_epsilon_model_rows_noise_target_and_prompts(tmp_path, tiny_models, tiny_pairs, seen):
    model = tiny_models["sd"]
    run(tmp_path, model, tiny_pairs, "train.max_steps=1", "train.batch_size=3", "data.random_flip=no")
    rows = pq.read_table(tiny_pairs).to_pylist()
    batch = seen["batches"][0]
    picked = [rows[i] for i in batch["indices"]]
    winners = [r["jpg_0"] if r["label_0"] > r["label_1"] else r["jpg_1"] for r in picked]
    losers = [r["jpg_1"] if r["label_0"] > r["label_1"] else r["jpg_0"] for r in picked]
    # rows [w_1..w_3, l_1..l_3], each the image the labels say
    expected = torch.stack([expected_pixels(j, 32) for j in winners + losers])
    assert torch.allclose(seen["vae"][0]["pixels"], expected, atol=1e-5)

    policy, reference = seen["unet"]
    x0 = seen["vae"][0]["latents"]
    assert torch.equal(policy["t"][:3], policy["t"][3:]) and torch.equal(policy["t"], reference["t"])
    noise, _ = pair_noise(policy, x0, model)
    assert torch.allclose(noise[:3], noise[3:], atol=1e-4), "the two images of a pair share their noise"
    assert torch.equal(policy["x_t"], reference["x_t"])
    # an epsilon model is scored against the noise, in its own units
    call = seen["objective"][0]
    assert call["name"] == "diffusion_dpo_loss" and call["kwargs"]["beta"] == 5000
    model_w, model_l, ref_w, ref_l = call["args"]
    err, ref_err = per_row_error(policy["out"], noise), per_row_error(reference["out"], noise)
    assert torch.allclose(torch.cat([model_w, model_l]), err, rtol=1e-4, atol=1e-6)
    assert torch.allclose(torch.cat([ref_w, ref_l]), ref_err, rtol=1e-4, atol=1e-6)
    # both rows of a pair are conditioned on that pair's prompt
    prompts = [r["caption"] for r in picked]
    assert torch.allclose(policy["hidden"], text_states(model, prompts * 2), atol=1e-5)


@pytest.mark.parametrize("latents", ["sample", "mean"])
def test_data_latents_noises_a_posterior_draw_or_its_mean(tmp_path, tiny_models, tiny_pairs, seen, latents):
    """data.latents=mean: x_t noises the posterior mean itself, so the noise it implies from the mean is the pair's
    shared noise; sample: each row noises its own posterior draw, and the implied noises of a pair differ."""
    model = tiny_models["sd"]
    run(tmp_path, model, tiny_pairs, "train.max_steps=1", "data.random_flip=no", f"data.latents={latents}")
    pixels = seen["pixels"] if latents == "mean" else seen["vae"][0]["pixels"]  # a draw is logged with its pixels
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    noise, _ = pair_noise(seen["unet"][0], mean, model)
    pairs = len(noise) // 2
    assert torch.allclose(noise[:pairs], noise[pairs:], atol=1e-4) == (latents == "mean")
    assert (seen["vae"] == []) == (latents == "mean")


def test_vae_encode_batch_size_splits_a_steps_vae_calls(tmp_path, tiny_models, tiny_pairs, seen, monkeypatch):
    """data.vae_encode_batch_size=3 on a step of 4 rows: the VAE encodes 3 images and then 1, and x_t noises the
    posterior means of one call on all 4 (so the noise each pair's rows imply from them is shared)."""
    calls, encode = [], AutoencoderKL.encode

    def counted(self, pixels, *args, **kwargs):
        calls.append(len(pixels))
        return encode(self, pixels, *args, **kwargs)
    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    model = tiny_models["sd"]
    run(tmp_path, model, tiny_pairs, "train.max_steps=1", "data.random_flip=no", "data.latents=mean",
        "data.vae_encode_batch_size=3")
    assert calls == [3, 1]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        mean = encode(vae, seen["pixels"]).latent_dist.mean * vae.config.scaling_factor
    noise, _ = pair_noise(seen["unet"][0], mean, model)
    assert torch.allclose(noise[:2], noise[2:], atol=1e-4)


def test_prompt_dropout_conditions_both_rows_on_the_empty_prompt(tmp_path, tiny_models, tiny_pairs, seen):
    model = tiny_models["sd"]
    run(tmp_path, model, tiny_pairs, "train.max_steps=1", "data.prompt_dropout=1.0")
    assert torch.allclose(seen["unet"][0]["hidden"], text_states(model, [""] * 4), atol=1e-5)


@pytest.mark.parametrize("units", ["epsilon", "velocity"])
def test_v_prediction_trains_on_the_velocity(tmp_path, tiny_models, tiny_pairs, seen, units):
    model = tiny_models["sd2"]
    run(tmp_path, model, tiny_pairs, "train.max_steps=1", f"method.v_prediction_errors={units}")
    policy, reference = seen["unet"]
    x0 = seen["vae"][0]["latents"]
    noise, a = pair_noise(policy, x0, model)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
    model_w, model_l, ref_w, ref_l = seen["objective"][0]["args"]
    errors, ref_errors = torch.cat([model_w, model_l]), torch.cat([ref_w, ref_l])
    if units == "velocity":  # raw errors against the velocity
        assert torch.allclose(errors, per_row_error(policy["out"], velocity), rtol=1e-4, atol=1e-6)
        assert torch.allclose(ref_errors, per_row_error(reference["out"], velocity), rtol=1e-4, atol=1e-6)
    else:  # the error of the noise the velocity prediction implies: eps_hat = sqrt(abar) v_hat + sqrt(1-abar) x_t
        implied = a.sqrt() * policy["out"] + (1 - a).sqrt() * policy["x_t"]
        assert torch.allclose(errors, per_row_error(implied, noise), rtol=1e-3, atol=1e-6)
        assert torch.allclose(errors, per_row_error(policy["out"], velocity) * a.flatten(), rtol=1e-4, atol=1e-6)


def test_v_prediction_sft_and_mapo_diffusion_terms_stay_velocity_losses(tmp_path, tiny_models, tiny_pairs, seen):
    model = tiny_models["sd2"]
    run(tmp_path / "sft", model, tiny_pairs, "train.max_steps=1", "method.name=sft")
    policy, x0 = seen["unet"][0], seen["vae"][0]["latents"]
    noise, a = pair_noise(policy, x0, model)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
    (model_w,) = seen["objective"][0]["args"]
    assert torch.allclose(model_w, per_row_error(policy["out"], velocity), rtol=1e-4, atol=1e-6)

    run(tmp_path / "mapo", model, tiny_pairs, "train.max_steps=1", "method.name=mapo")
    policy, x0 = seen["unet"][1], seen["vae"][1]["latents"]
    noise, a = pair_noise(policy, x0, model)
    velocity_errors = per_row_error(policy["out"], a.sqrt() * noise - (1 - a).sqrt() * x0)
    call = seen["objective"][1]
    assert call["kwargs"]["beta"] == pytest.approx(0.1)
    assert torch.allclose(torch.cat(call["args"]), velocity_errors * a.flatten(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(call["kwargs"]["diffusion_err_w"], velocity_errors[:2], rtol=1e-4, atol=1e-6)


def _jpeg(width: int, height: int, colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="JPEG")
    return out.getvalue()


def test_sdxl_sizes_crops_and_bf16_vae(tmp_path, tiny_models, seen):
    """Non-square images: add_time_ids rows are [orig_h, orig_w, crop_top, crop_left, 32, 32], worked out by hand
    for a shortest-side resize to 32 and a centre crop. Under bf16 autocast the fp32 VAE still encodes in fp32."""
    pairs = tmp_path / "sizes.parquet"
    pq.write_table(pa.table({
        "caption": ["a red square", "a blue circle"],
        "jpg_0": [_jpeg(40, 64, "red"), _jpeg(48, 72, "blue")],
        "jpg_1": [_jpeg(72, 48, "green"), _jpeg(64, 40, "yellow")],
        "label_0": [1.0, 0.0], "label_1": [0.0, 1.0]}), pairs)
    model = tiny_models["sdxl"]
    run(tmp_path, model, pairs, "train.max_steps=1", "train.mixed_precision=bf16")
    # 40x64 -> 32x51, top (51-32)//2 = 9;   72x48 -> 48x32, left 8;   64x40 -> 51x32, left 9;   48x72 -> 32x48, top 8
    winner_ids = {0: [64, 40, 9, 0, 32, 32], 1: [40, 64, 0, 9, 32, 32]}
    loser_ids = {0: [48, 72, 0, 8, 32, 32], 1: [72, 48, 8, 0, 32, 32]}
    order = seen["batches"][0]["indices"]
    expected = torch.tensor([winner_ids[i] for i in order] + [loser_ids[i] for i in order], dtype=torch.float32)
    for call in seen["unet"]:
        assert torch.equal(call["added"]["time_ids"].float(), expected)

    vae_call = seen["vae"][0]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")  # fp32, no autocast
    with torch.no_grad():
        posterior = vae.encode(vae_call["pixels"]).latent_dist
        fp32 = (posterior.mean + posterior.std * vae_call["noise"]) * vae.config.scaling_factor
    assert torch.allclose(vae_call["latents"], fp32, atol=1e-6), "the VAE ran under the loop's bf16 autocast"


@pytest.fixture
def all_columns(tmp_path, tiny_pairs):
    """The tiny pairs with per-image captions (DCPO) and reward scores (SmPO) added."""
    rows = pq.read_table(tiny_pairs).to_pylist()
    for i, row in enumerate(rows):
        row["caption_0"], row["caption_1"] = f"{row['caption']} {i}#0", f"{row['caption']} {i}#1"
        row["pickscore_cosine_0"], row["pickscore_cosine_1"] = 0.2 + 0.01 * (i % 3), 0.18
    path = tmp_path / "all-columns.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("method, beta, objective", [
    ("dpo", 5000, "diffusion_dpo_loss"), ("mapo", 0.1, "mapo_loss"), ("smpo", 5000, "smpo_loss"),
    ("dcpo", 500, "diffusion_dpo_loss")])
def test_each_method_trains_with_its_published_beta(tmp_path, tiny_models, all_columns, seen, method, beta, objective):
    extra = ["method.pref_scorer=null", "method.inversion_steps=0"] if method == "smpo" else []
    run(tmp_path, tiny_models["sd"], all_columns, "train.max_steps=1", f"method.name={method}", *extra)
    (call,) = seen["objective"]
    assert call["name"] == objective and call["kwargs"]["beta"] == pytest.approx(beta)


def test_label_smoothing_reaches_the_dpo_loss(tmp_path, tiny_models, tiny_pairs, seen):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=1", "method.label_smoothing=0.2")
    (call,) = seen["objective"]
    assert call["name"] == "diffusion_dpo_loss" and call["kwargs"]["label_smoothing"] == 0.2


@pytest.mark.parametrize("method", ["dpo", "mapo", "sft"])
def test_kept_ties_are_refused_where_a_pair_needs_a_winner(tmp_path, tiny_models, tiny_pairs, method):
    """A kept tie went to the loss as a full preference for its first image (label_w 0.5 was read by nothing)."""
    with pytest.raises(ConfigError, match=f"data.keep_ties=true: {method} trains each pair as a preference for its "
                                          "winner, and a tie has none"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=1", f"method.name={method}",
            "data.keep_ties=true")


def test_a_latent_cache_of_a_stream_is_refused_naming_both_keys(tmp_path, tiny_models, tiny_pairs):
    with pytest.raises(ConfigError, match="data.cache=true stores each image's centre crop by source row: it needs "
                                          "data.streaming=false"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=1", "data.cache=true", "data.streaming=true")


def test_a_beta_far_from_the_methods_range_is_warned_about(tmp_path, tiny_models, tiny_pairs, caplog):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=1", "method.name=mapo", "method.beta=5000")
    assert "method.beta=5000 is far from mapo's published beta (0.1)" in caplog.text
    caplog.clear()
    run(tmp_path / "again", tiny_models["sd"], tiny_pairs, "train.max_steps=1", "method.name=mapo")
    assert "far from" not in caplog.text


def test_steps_the_grad_scaler_skips_are_counted(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    """fp16 runs go through accelerate's GradScaler, which skips an overflowing step itself; that step must be
    counted in nonfinite_steps. A CPU GradScaler stands in for the CUDA one."""
    make_accelerator = run_module.make_accelerator

    def with_scaler(cfg):
        accelerator = make_accelerator(cfg)
        accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    dpo, calls = methods.METHODS["dpo"], []

    def poisoned(errors, cfg):  # the DPO loss, but inf on the second batch
        calls.append(1)
        loss, metrics = dpo.objective(errors, cfg)
        return (loss * math.inf if len(calls) == 2 else loss), metrics

    monkeypatch.setattr(run_module, "make_accelerator", with_scaler)
    monkeypatch.setitem(methods.METHODS, "dpo", dataclasses.replace(dpo, objective=poisoned))
    result = run(tmp_path, tiny_models["sd"], tiny_pairs)
    assert [r["nonfinite_steps"] for r in read_metrics(tmp_path / "run")] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in result.denoiser.parameters())

