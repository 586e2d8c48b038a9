"""Golden values for the objectives, computed by hand (see the comments)."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_align.methods import METHODS
from diffusion_align.objectives import diffusion_dpo_loss, sft_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_is_log2_when_policy_equals_reference():
    err_w, err_l = t(0.13, 0.52, 0.07), t(0.2, 0.11, 0.9)
    loss, metrics = diffusion_dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["implicit_acc"].item() == 0.5  # every pair is a tie: counts 0.5
    assert metrics["reward_margin"].item() == 0.0


def test_dpo_golden_two_pairs():
    # beta = 10, so inside = -5 * ((m_w - r_w) - (m_l - r_l))
    # pair 1: (0.1 - 0.1) - (0.3 - 0.3) = 0      -> inside 0,   -logsigmoid(0)   = log 2     = 0.693147...
    # pair 2: (0.2 - 0.25) - (0.1 - 0.05) = -0.1 -> inside 0.5, -logsigmoid(0.5) = log(1 + e^-0.5) = 0.474077...
    loss, metrics = diffusion_dpo_loss(t(0.1, 0.2), t(0.3, 0.1), t(0.1, 0.25), t(0.3, 0.05), beta=10.0)
    assert loss.item() == pytest.approx((0.6931471805599453 + 0.47407698418010663) / 2, abs=1e-6)
    # the historical bug (logsigmoid of the batch-mean inside) would give -logsigmoid(0.25) = 0.57594
    assert loss.item() != pytest.approx(0.5759394198788437, abs=1e-4)
    assert metrics["implicit_acc"].item() == pytest.approx(0.75)
    assert metrics["reward_margin"].item() == pytest.approx(0.25)
    assert metrics["model_err_w"].item() == pytest.approx(0.15)
    assert metrics["ref_err_l"].item() == pytest.approx(0.175)


def test_dpo_matches_the_diffusers_port_with_half_the_beta():
    g = torch.Generator().manual_seed(0)
    m_w, m_l, r_w, r_l = (torch.rand(8, generator=g) * 0.2 for _ in range(4))
    ours, _ = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=5000.0)
    port = -F.logsigmoid(2500.0 * ((r_w - r_l) - (m_w - m_l))).mean()
    assert ours.item() == pytest.approx(port.item(), rel=1e-6)


def test_dpo_gradient_at_initialisation():
    # d loss / d m_w = (1/B) * sigmoid(-inside) * beta/2 = (1/2) * 0.5 * 2500 = 625 per pair at inside = 0;
    # the loser gets the opposite sign
    m_w, m_l = t(0.1, 0.2).requires_grad_(), t(0.3, 0.4).requires_grad_()
    loss, _ = diffusion_dpo_loss(m_w, m_l, t(0.1, 0.2), t(0.3, 0.4), beta=5000.0)
    loss.backward()
    assert torch.allclose(m_w.grad, t(625.0, 625.0))
    assert torch.allclose(m_l.grad, t(-625.0, -625.0))


def test_sft_is_the_mean_winner_error():
    loss, metrics = sft_loss(t(0.1, 0.3, 0.5))
    assert loss.item() == pytest.approx(0.3)
    assert metrics == {"model_err_w": pytest.approx(torch.tensor(0.3))}


def test_methods_split_rows_into_winners_and_losers():
    model_err = t(0.1, 0.2, 0.3, 0.1)  # rows [w1, w2, l1, l2]
    ref_err = t(0.1, 0.25, 0.3, 0.05)
    loss, _ = METHODS["dpo"].loss(model_err, ref_err, beta=10.0)
    expected, _ = diffusion_dpo_loss(t(0.1, 0.2), t(0.3, 0.1), t(0.1, 0.25), t(0.3, 0.05), beta=10.0)
    assert loss.item() == pytest.approx(expected.item())
    # beta=None takes the published default 5000
    default, _ = METHODS["dpo"].loss(model_err, ref_err, beta=None)
    assert default.item() == pytest.approx(diffusion_dpo_loss(t(0.1, 0.2), t(0.3, 0.1), t(0.1, 0.25), t(0.3, 0.05),
                                                              beta=5000.0)[0].item())
    assert not METHODS["sft"].needs_reference and METHODS["sft"].rows_per_pair == 1
