"""Precomputed reference errors: a run on them is the on-the-fly run (same draws), with no reference model and no
reference pass while training."""

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from diffusion_align.config import ConfigError
from diffusion_align.models import policy as policy_module
from diffusion_align.models.policy import LORA_WEIGHTS
from diffusion_align.training.reference import REFERENCE_FILE, ReferenceErrors
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
        held.append(self.ref_unet)
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
