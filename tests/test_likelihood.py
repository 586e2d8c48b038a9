"""Noising, targets and per-sample errors, checked against the DDPM formulas computed independently."""

import math
from types import SimpleNamespace

import pytest
import torch

from sd_schedule import alpha_bar, sd_scheduler

from diffusion_align.models.conditioning import Conditioning
from diffusion_align.training.likelihood import (DDPMNoising, PairDraws, denoising_errors, epsilon_units,
                                                  noise_rows, prediction_target)


def test_v_prediction_target_is_the_velocity():
    x0, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([500, 999])
    target = prediction_target(sd_scheduler("v_prediction"), x0, eps, t)
    for row, step in enumerate(t.tolist()):
        a = alpha_bar(step)
        expected = math.sqrt(a) * eps[row] - math.sqrt(1 - a) * x0[row]
        assert torch.allclose(target[row], expected, atol=1e-5)


def test_epsilon_target_is_the_noise_and_other_kinds_are_refused():
    x0, eps, t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([10])
    assert torch.equal(prediction_target(sd_scheduler(), x0, eps, t), eps)
    with pytest.raises(ValueError, match="'sample' is not supported"):
        prediction_target(sd_scheduler("sample"), x0, eps, t)


def draws(keys, rows_per_pair=2, dropout=0.0, seed=0):
    return PairDraws.draw(seed, keys, (4, 4, 4), rows_per_pair, dropout, DDPMNoising(sd_scheduler()))


def test_pairs_share_noise_and_timestep():
    latents = torch.randn(6, 4, 4, 4)  # 3 pairs: rows [w1 w2 w3 l1 l2 l3]
    rows = noise_rows(DDPMNoising(sd_scheduler()), latents, draws([(0, 5), (0, 2), (0, 9)]))
    assert torch.equal(rows.timesteps[:3], rows.timesteps[3:])
    assert torch.equal(rows.target[:3], rows.target[3:])  # epsilon target = the shared noise
    assert not torch.equal(rows.target[0], rows.target[1])
    for row in range(6):
        a = alpha_bar(int(rows.timesteps[row]))
        expected = math.sqrt(a) * latents[row] + math.sqrt(1 - a) * rows.target[row]
        assert torch.allclose(rows.noisy[row], expected, atol=1e-5)


def test_winner_only_rows_get_their_own_noise():
    rows = noise_rows(DDPMNoising(sd_scheduler()), torch.randn(3, 4, 4, 4),
                      draws([(0, 0), (0, 1), (0, 2)], rows_per_pair=1))
    assert len(set(rows.timesteps.tolist())) == 3


def test_each_pairs_draws_depend_on_its_seed_epoch_and_index_alone():
    """Whatever batch a pair lands in (another process count, a resumed run, a reference pass), it gets the same
    dropout coin, timestep, noise and posterior draws; another epoch or seed redraws them."""
    batch = draws([(0, 7), (0, 3)])
    alone = draws([(0, 3)])
    assert batch.timesteps[1] == alone.timesteps[0] and torch.equal(batch.noise[1], alone.noise[0])
    assert torch.equal(batch.posterior[[1, 3]], alone.posterior)  # rows [w7 w3 l7 l3]: pair 3's winner and loser
    assert not torch.equal(batch.posterior[1], batch.posterior[3])  # winner and loser: their own posterior draws
    for other in (draws([(1, 3)]), draws([(0, 3)], seed=1)):
        assert not torch.equal(other.noise[0], alone.noise[0])
    assert draws([(0, 3)], rows_per_pair=1).posterior.shape == (1, 4, 4, 4)
    kept = draws([(0, i) for i in range(2000)], dropout=0.2).keep
    assert 0.17 < 1 - sum(kept) / len(kept) < 0.23
    assert not any(draws([(0, i) for i in range(50)], dropout=1.0).keep)


def test_denoising_error_is_a_per_sample_mean_over_c_h_w():
    # a stand-in UNet that predicts 1 everywhere in the first row and the target 3 in the second
    target = torch.full((2, 4, 2, 2), 3.0, dtype=torch.float16)
    pred = torch.stack([torch.ones(4, 2, 2), torch.full((4, 2, 2), 3.0)]).half()
    unet = lambda noisy, t, encoder_hidden_states: SimpleNamespace(sample=pred)  # noqa: E731
    rows = SimpleNamespace(noisy=torch.zeros(2, 4, 2, 2), timesteps=torch.zeros(2), target=target)
    err = denoising_errors(unet, rows, Conditioning(torch.zeros(2, 77, 8)))
    assert err.dtype == torch.float32
    assert err.tolist() == [4.0, 0.0]  # (1 - 3)^2 averaged over the 16 elements; exact match


def test_epsilon_units_turn_a_velocity_error_into_the_implied_noise_error():
    x0, eps, v_hat = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    t = torch.tensor([0, 500, 999])
    scheduler = sd_scheduler("v_prediction")
    units = epsilon_units(scheduler, t)
    velocity_error = (v_hat - prediction_target(scheduler, x0, eps, t)).pow(2).mean(dim=(1, 2, 3))
    for row, step in enumerate(t.tolist()):
        a = alpha_bar(step)
        assert units[row].item() == pytest.approx(a, rel=1e-5)
        x_t = math.sqrt(a) * x0[row] + math.sqrt(1 - a) * eps[row]
        eps_hat = math.sqrt(a) * v_hat[row] + math.sqrt(1 - a) * x_t  # the noise the velocity prediction implies
        assert (velocity_error[row] * units[row]).item() == pytest.approx((eps_hat - eps[row]).pow(2).mean().item(),
                                                                            rel=1e-4)
    # the published numbers: 1 / abar_t averages 21.3 over t and is 214.6 at t = 999 on SD's schedule
    every = epsilon_units(scheduler, torch.arange(1000))
    assert (1 / every).mean().item() == pytest.approx(21.31, abs=0.01)
    assert 1 / every[999].item() == pytest.approx(214.59, abs=0.01)
    assert torch.equal(epsilon_units(sd_scheduler(), t), torch.ones(3))  # epsilon models: unchanged
