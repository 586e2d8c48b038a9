"""Precomputed reference errors: a run on them is the on-the-fly run (same draws), with no reference model and no
reference pass while training."""

import logging
import math
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from diffusion_align.config import ConfigError
from diffusion_align.models import policy as policy_module
from diffusion_align.models.policy import LORA_WEIGHTS
from diffusion_align.models.tiny import save_tiny_pipeline
from diffusion_align.training.reference import REFERENCE_FILE, ReferenceErrors
from test_cache import _changed_copy
from test_train import read_metrics, run


def test_rows_come_in_pair_layout():
    errors = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)  # (epochs, pairs, [winner, loser])
    # pair 3 of epoch 1 and pair 0 of epoch 0 -> [w(1,3), w(0,0), l(1,3), l(0,0)]
    assert ReferenceErrors(errors).rows([(1, 3), (0, 0)]).tolist() == [16.0, 0.0, 17.0, 1.0]
    with pytest.raises(RuntimeError, match="precomputed for 2 epochs, but the run reached epoch 2"):
        ReferenceErrors(errors).rows([(2, 0)])


@pytest.fixture
def forwards(monkeypatch):
    """Whether each UNet forward ran with grad (the policy while training) or without (a reference pass)."""
    log, forward = [], UNet2DConditionModel.forward

    def recorded(self, *args, **kwargs):
        log.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(UNet2DConditionModel, "forward", recorded)
    return log


@pytest.fixture
def references(monkeypatch):
    """The reference UNet each Policy holds (None: LoRA's adapters-off base, or no reference at all)."""
    held, init = [], policy_module.Policy.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        held.append(self.ref_denoiser)
    monkeypatch.setattr(policy_module.Policy, "__init__", recorded)
    return held


def same_run(a, b):
    """The same errors to float rounding (batches of another size round differently); DPO's beta (5000) scales
    their differences into the loss."""
    first, second = read_metrics(a), read_metrics(b)
    assert len(first) == len(second)
    for x, y in zip(first, second):
        for name in ("model_err_w", "model_err_l", "ref_err_w", "ref_err_l"):
            assert x[name] == pytest.approx(y[name], rel=2e-6), name
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3)


@pytest.mark.parametrize("mode", ["lora", "full, cached"])
def test_a_run_on_precomputed_errors_is_the_on_the_fly_run(tmp_path, tiny_models, tiny_pairs, forwards, references,
                                                           caplog, mode):
    caplog.set_level(logging.INFO, logger="diffusion_align")
    common = ["train.max_steps=4", "data.random_flip=image", "data.prompt_dropout=0.3", "train.batch_size=4"]
    if mode != "lora":
        common += ["model.lora_rank=null", "train.lr=1e-4", "data.cache=true", "data.cache_dtype=fp32",
                   f"data.cache_dir={tmp_path / 'cache'}"]
    run(tmp_path / "fly", tiny_models["sd"], tiny_pairs, *common)
    assert forwards == [True, False] * 4  # the policy, then the reference, every step
    forwards.clear()
    run(tmp_path / "pre", tiny_models["sd"], tiny_pairs, *common, "method.precomputed_reference=true",
        "method.reference_batch_size=16")
    # 4 steps x 4 pairs from 16 pairs: one epoch, one batch of 16 without grad, then the policy alone
    assert forwards == [False, True, True, True, True]
    assert references[-1] is None and (mode == "lora" or references[0] is not None)
    same_run(tmp_path / "fly" / "run", tmp_path / "pre" / "run")
    stored = tmp_path / ("pre/run" if mode == "lora" else "cache") / REFERENCE_FILE
    assert load_file(stored)["errors"].shape == (1, 16, 2)

    # a second run with the same key reuses the file; another seed computes new draws
    forwards.clear()
    again = [*common, "method.precomputed_reference=true", "train.max_steps=1", "train.overwrite=true"]
    run(tmp_path / "pre", tiny_models["sd"], tiny_pairs, *again, "method.reference_batch_size=16")
    assert forwards == [True] and f"reference errors: {stored}" in caplog.text, "overwrite keeps the stored errors"
    run(tmp_path / "pre", tiny_models["sd"], tiny_pairs, *again, "train.seed=1")
    assert "made for another run; computing the reference errors again" in caplog.text


def test_epochs_cover_the_whole_run(tmp_path, tiny_models, tiny_pairs):
    # 10 steps x 2 accumulated batches of 3 pairs from 16 pairs: 5 batches an epoch, so 4 epochs
    run(tmp_path, tiny_models["sd"], tiny_pairs, "method.precomputed_reference=true", "train.max_steps=10",
        "train.batch_size=3", "train.grad_accum=2")
    errors = load_file(tmp_path / "run" / REFERENCE_FILE)["errors"]
    assert errors.shape == (4, 16, 2) and torch.isfinite(errors).all()
    assert not torch.equal(errors[0], errors[1])  # each epoch its own draws
    weights = load_file(tmp_path / "run" / "final" / LORA_WEIGHTS)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_what_cannot_be_precomputed_is_refused(tmp_path, tiny_models, tiny_pairs):
    with pytest.raises(ConfigError, match="mapo has no reference model"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "method.name=mapo", "method.precomputed_reference=true")
    with pytest.raises(ConfigError, match="ReNoise inversion runs the policy"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "method.name=smpo", "method.pref_scorer=null",
            "method.precomputed_reference=true")


def test_errors_made_with_other_components_are_computed_again(tmp_path, tiny_models, tiny_pairs, caplog):
    """The key holds every component the errors depend on, not the UNet alone: stale errors would make the first
    LoRA step's loss something other than log 2 (policy == reference there)."""
    caplog.set_level(logging.INFO, logger="diffusion_align")
    model, precomputed = tiny_models["sd"], ["method.precomputed_reference=true", "train.max_steps=1"]
    run(tmp_path, model, tiny_pairs, *precomputed)
    other_vae = f"model.vae={save_tiny_pipeline(tmp_path / 'other', 'sd', seed=1) / 'vae'}"
    edited_scheduler = _changed_copy(model, tmp_path, "scheduler")  # the same UNet, other betas
    for changed in ([model, other_vae], [edited_scheduler, other_vae]):
        caplog.clear()
        run(tmp_path, changed[0], tiny_pairs, *precomputed, *changed[1:], "train.overwrite=true")
        # 1e-3: the errors were precomputed in batches of another size, whose float rounding (on one CPU thread,
        # about 1e-8) beta 5000 lifts to about 1e-4 in the loss; errors of the old VAE and scheduler give 0.713
        assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3), changed
        assert "made for another run; computing the reference errors again" in caplog.text, changed


@pytest.fixture(scope="module")
def trained_norms(tiny_models, tmp_path_factory):
    """The tiny pipeline with its UNet's norm weights moved off 1, as trained ones are: then they are not exact in
    bf16, and a UNet kept in fp32 computes other errors under bf16 autocast than one placed in bf16."""
    folder = tmp_path_factory.mktemp("trained-norms") / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    unet, generator = UNet2DConditionModel.from_pretrained(folder / "unet"), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "norm" in name:
                param.mul_(1 + 0.01 * torch.randn(param.shape, generator=generator))
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_errors_are_precomputed_in_the_training_precision(tmp_path, trained_norms, tiny_pairs, mode):
    """Under train.mixed_precision=bf16 the reference runs with its weights in bf16 (a LoRA's base; a full
    fine-tune's copy, its autocast layers'): precomputed errors must be those, while the policy's own fp32 weights
    stay unrounded. At step 0 the policy is the reference: the copy cast whole computed other errors with its rounded
    norm weights, and the loss was not log 2."""
    common = ["train.mixed_precision=bf16", "train.max_steps=1", "train.batch_size=4"]
    if mode == "full":
        common += ["model.lora_rank=null"]
    run(tmp_path / "fly", trained_norms, tiny_pairs, *common)
    run(tmp_path / "pre", trained_norms, tiny_pairs, *common, "method.precomputed_reference=true")
    (fly,), (pre,) = read_metrics(tmp_path / "fly" / "run"), read_metrics(tmp_path / "pre" / "run")
    # policy == reference at step 0, with or without precomputed errors
    assert fly["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert pre["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("model_err_w", "model_err_l", "ref_err_w", "ref_err_l"):
        assert pre[name] == pytest.approx(fly[name], rel=2e-6), name
