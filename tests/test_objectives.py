"""Golden values for the objectives, computed by hand (see the comments)."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_align.config import MethodConfig
from diffusion_align.objectives import (bradley_terry_preferences, clipped_policy_loss, diffusion_dpo_loss,
                                        gaussian_policy_kl, group_advantages, mapo_loss, pairwise_win_rates, sft_loss,
                                        smpo_loss, smpo_pref_prob)
from diffusion_align.training.methods import METHODS, Errors


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


def test_conservative_dpo_golden_two_pairs():
    # the pairs of test_dpo_golden_two_pairs with eps = 0.1: loss = 0.9 * -logsigmoid(x) + 0.1 * -logsigmoid(-x)
    # pair 1: x = 0, log 2 whatever eps;  pair 2: x = 0.5, 0.9 * 0.474077 + 0.1 * log(1 + e^0.5) (0.974077) = 0.524077
    loss, _ = diffusion_dpo_loss(t(0.1, 0.2), t(0.3, 0.1), t(0.1, 0.25), t(0.3, 0.05), beta=10.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.6086120823700261, abs=1e-6)


def test_conservative_dpo_stops_pulling_where_the_winner_is_as_likely_as_its_label():
    # d loss / d inside = -(1 - eps) sigmoid(-x) + eps sigmoid(x): zero at sigmoid(x) = 1 - eps, x = log 9 for 0.1;
    # plain DPO still pulls there with (1 - 0.9) = 0.1 per pair
    m_w = torch.tensor([-math.log(9.0) / 5.0], requires_grad=True)  # inside = -5 * m_w = log 9 (beta 10, rest 0)
    for eps, pull in ((0.1, 0.0), (0.0, -0.1 * -5.0)):
        m_w.grad = None
        diffusion_dpo_loss(m_w, t(0.0), t(0.0), t(0.0), beta=10.0, label_smoothing=eps)[0].backward()
        assert m_w.grad.item() == pytest.approx(pull, abs=1e-6)


def test_sft_is_the_mean_winner_error():
    loss, metrics = sft_loss(t(0.1, 0.3, 0.5))
    assert loss.item() == pytest.approx(0.3)
    assert metrics == {"model_err_w": pytest.approx(torch.tensor(0.3))}


def test_methods_split_rows_into_winners_and_losers():
    model_err = t(0.1, 0.2, 0.3, 0.1)  # rows [w1, w2, l1, l2]
    ref_err = t(0.1, 0.25, 0.3, 0.05)
    loss, _ = METHODS["dpo"].objective(Errors(model_err, ref_err), MethodConfig(beta=10.0))
    expected, _ = diffusion_dpo_loss(t(0.1, 0.2), t(0.3, 0.1), t(0.1, 0.25), t(0.3, 0.05), beta=10.0)
    assert loss.item() == pytest.approx(expected.item())
    loss, _ = METHODS["dcpo"].objective(Errors(model_err, ref_err), MethodConfig(beta=10.0, label_smoothing=0.1))
    assert loss.item() == pytest.approx(0.6086120823700261, abs=1e-6)  # test_conservative_dpo_golden_two_pairs
    loss, _ = METHODS["mapo"].objective(Errors(model_err), MethodConfig(beta=0.1))
    assert loss.item() == pytest.approx(mapo_loss(t(0.1, 0.2), t(0.3, 0.1), beta=0.1)[0].item())
    loss, _ = METHODS["smpo"].objective(Errors(model_err, ref_err, pref_prob=t(0.5, 0.75)), MethodConfig(beta=10.0))
    assert loss.item() == pytest.approx(smpo_loss(t(0.1, 0.2), t(0.3, 0.1), t(0.1, 0.25), t(0.3, 0.05), t(0.5, 0.75),
                                                  beta=10.0)[0].item())
    assert not METHODS["sft"].needs_reference and METHODS["sft"].rows_per_pair == 1
    assert not METHODS["mapo"].needs_reference


def test_dcpo_conditions_each_row_on_its_own_caption():
    batch = {"prompts": ["p1", "p2"], "caption_w": ["w1", "w2"], "caption_l": ["l1", "l2"]}
    assert METHODS["dcpo"].row_prompts(batch, [True, False]) == ["w1", "", "l1", ""]
    assert METHODS["dpo"].row_prompts(batch, [True, False]) == ["p1", "", "p1", ""]
    assert METHODS["sft"].row_prompts(batch, [True, True]) == ["p1", "p2"]
    assert METHODS["dcpo"].extra_columns(MethodConfig()) == ("caption_0", "caption_1")
    assert METHODS["smpo"].extra_columns(MethodConfig()) == ("pickscore_cosine_0", "pickscore_cosine_1")


def test_mapo_golden():
    # f(x) = 0.5x / (exp(0.5x) - 1): f(0.2) - f(0.2002) = 4.8333e-5, f(0) - f(0.001) = 2.49979e-4;
    # times T = 1000 -> logsigmoid = -0.669273, -0.575949
    # loss = mean(m_w) - 0.1 * mean(logsigmoid) = 0.1 + 0.1 * 0.622611 = 0.162261
    loss, metrics = mapo_loss(t(0.2, 0.0), t(0.2002, 0.001), beta=0.1, snr_value=0.5, num_train_timesteps=1000)
    assert loss.item() == pytest.approx(0.16226105879204183, abs=1e-5)
    assert metrics["margin_term"].item() == pytest.approx(0.1 * (-0.6692726345857399 - 0.5759485412550968) / 2,
                                                          abs=1e-5)
    assert metrics["implicit_acc"].item() == 1.0  # both winners have the smaller error
    assert metrics["score_w"].item() == pytest.approx((0.1 / math.expm1(0.1) + 1.0) / 2, abs=1e-6)


def test_mapo_diffusion_term_in_its_own_units():
    # v-prediction: the margin reads epsilon-equivalent errors, the winner term the raw velocity errors d_w;
    # same margin as test_mapo_golden, loss = mean(d_w) - margin = 0.5 + 0.1 * 0.622611
    loss, _ = mapo_loss(t(0.2, 0.0), t(0.2002, 0.001), diffusion_err_w=t(0.4, 0.6))
    assert loss.item() == pytest.approx(0.5 + 0.1 * (0.6692726345857399 + 0.5759485412550968) / 2, abs=1e-5)


def test_mapo_is_finite_at_zero_error():
    # f(0) = 1 and f'(0) = -s/2 by continuity: no 0/0 in the loss or its gradient
    m_w, m_l = t(0.0, 1e-9).requires_grad_(), t(0.0, 0.0).requires_grad_()
    loss, metrics = mapo_loss(m_w, m_l)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(m_w.grad).all() and torch.isfinite(m_l.grad).all()
    assert metrics["score_w"].item() == pytest.approx(1.0)
    # equal errors: log_odds = 0, so the margin term is beta * log(1/2)
    assert metrics["margin_term"].item() == pytest.approx(0.1 * math.log(0.5), abs=1e-6)
    # d loss / d m_w[0] = 1/B - (beta/B) * sigmoid(0) * T * f'(0) = 0.5 + 0.05 * 0.5 * 1000 * 0.25 = 6.75
    assert m_w.grad[0].item() == pytest.approx(6.75, rel=1e-4)


def test_mapo_gradient_matches_its_derivation():
    """The gradient autograd takes through mapo_loss against the authors' formula differentiated by hand, at errors
    like the toy world's (about 0.2, a pair's errors a few hundredths apart, both orders):
        d loss / d m_w = 1/B - (beta/B) sigmoid(-T lo) T f'(m_w),   d loss / d m_l = (beta/B) sigmoid(-T lo) T f'(m_l)
        f'(x) = s / (e^{sx} - 1) - s^2 x e^{sx} / (e^{sx} - 1)^2"""
    s, beta, T = 0.5, 0.1, 1000
    w, l = [0.21, 0.18, 0.25], [0.23, 0.17, 0.25 + 1e-6]

    def f(x):
        return s * x / math.expm1(s * x)

    def df(x):
        return s / math.expm1(s * x) - s * s * x * math.exp(s * x) / math.expm1(s * x) ** 2

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))
    m_w = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    m_l = torch.tensor(l, dtype=torch.float64, requires_grad=True)
    loss, _ = mapo_loss(m_w, m_l, beta=beta, snr_value=s, num_train_timesteps=T)
    loss.backward()
    pull = [sigmoid(-T * (f(a) - f(b))) * T * beta / 3 for a, b in zip(w, l)]
    assert m_w.grad.tolist() == pytest.approx([1 / 3 - p * df(a) for p, a in zip(pull, w)], rel=1e-9)
    assert m_l.grad.tolist() == pytest.approx([p * df(b) for p, b in zip(pull, l)], rel=1e-9)
    # on the wrongly ordered pair the margin pushes the loser's error up (a negative gradient: descent raises it)
    # over 20x harder than the winner term pulls the winner's down (1/B): f'(0.17) ~ -0.24, T beta = 100
    assert m_l.grad[1].item() < -20 / 3


def test_smpo_golden_and_per_pair_scale():
    # beta = 10: scale = 0.5 * 10 * 10 * (2p - 1) -> 0 for p = 0.5, 25 for p = 0.75
    # pair 1 (p = 0.5): inside 0 -> log 2; pair 2: diff = (0.2 - 0.25) - (0.1 - 0.05) = -0.1, inside = 2.5
    loss, metrics = smpo_loss(t(0.1, 0.2), t(0.3, 0.1), t(0.2, 0.25), t(0.3, 0.05), pref_prob=t(0.5, 0.75), beta=10.0)
    assert loss.item() == pytest.approx((math.log(2) + 0.07888973429254963) / 2, abs=1e-6)
    assert metrics["effective_scale"].item() == pytest.approx(12.5)
    assert metrics["pref_prob"].item() == pytest.approx(0.625)


def test_smpo_equal_preference_gives_no_gradient():
    m_w, m_l = t(0.1, 0.4).requires_grad_(), t(0.3, 0.2).requires_grad_()
    loss, _ = smpo_loss(m_w, m_l, t(0.2, 0.1), t(0.1, 0.3), pref_prob=t(0.5, 0.5))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.equal(m_w.grad, torch.zeros(2)) and torch.equal(m_l.grad, torch.zeros(2))


def test_smpo_at_certain_preference_is_dpo_with_ten_times_beta():
    args = t(0.1, 0.2), t(0.3, 0.1), t(0.12, 0.25), t(0.3, 0.05)
    smpo, _ = smpo_loss(*args, pref_prob=t(1.0, 1.0), beta=5.0)
    dpo, _ = diffusion_dpo_loss(*args, beta=50.0)
    assert smpo.item() == pytest.approx(dpo.item(), rel=1e-6)


def test_smpo_pref_prob_uses_the_published_normalisation():
    # n = (s - 0.11543526500463486) / (0.28201571106910706 - 0.11543526500463486); p = sigmoid(n_w - n_l)
    p = smpo_pref_prob(t(0.25), t(0.2))
    assert p.item() == pytest.approx(0.5744804752269456, abs=1e-6)
    assert smpo_pref_prob(t(0.2), t(0.2)).item() == 0.5


# ---------------------------------------------------------------- the GRPO family

def test_pairwise_win_rates_golden():
    # w_0 = (0.8 + 0.6) / 2, w_1 = (0.2 + 0.9) / 2, w_2 = (0.4 + 0.1) / 2; the diagonal is ignored
    pref = torch.tensor([[0.5, 0.8, 0.6], [0.2, 0.5, 0.9], [0.4, 0.1, 0.5]])
    assert pairwise_win_rates(pref).tolist() == pytest.approx([0.7, 0.55, 0.25])
    assert pairwise_win_rates(pref).mean().item() == pytest.approx(0.5)  # a consistent judge: always 0.5
    pref[0, 0] = 99.0
    assert pairwise_win_rates(torch.stack([pref, 1 - pref.T])).shape == (2, 3)


def test_group_advantages_golden():
    # the unbiased std, as DanceGRPO and Pref-GRPO: group 1: mean 2, std sqrt((1 + 0 + 1) / 2) = 1 -> -1, 0, 1
    # (the population std sqrt(2/3) would give -+1.2247); group 2 ties: exactly 0
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 0.1, 0.1, 0.1]), group_size=3)
    assert adv.tolist()[:3] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert adv.tolist()[3:] == [0.0, 0.0, 0.0]  # 0.1 * 3 / 3 != 0.1 in floats: no rounding noise / eps
    # win rates 1, 0.5, 0: mean 0.5, std sqrt((0.25 + 0 + 0.25) / 2) = 0.5 -> 1, 0, -1
    assert group_advantages(torch.tensor([1.0, 0.5, 0.0]), 3).tolist() == pytest.approx([1.0, 0.0, -1.0], abs=1e-6)
    # G = 8, rewards 0..7: mean 3.5, std sqrt(42 / 7) = sqrt(6) -> A_7 = 3.5 / sqrt(6) = 1.428869
    # (population: 3.5 / sqrt(42 / 8) = 1.527525, x1.069)
    assert group_advantages(torch.arange(8.0), 8)[7].item() == pytest.approx(1.4288690, abs=1e-6)
    # one winner among 50: mean 0.02, std sqrt((0.98^2 + 49 * 0.02^2) / 49) = sqrt(0.02): 0.98 / sqrt(0.02) = 6.9296
    # -> clamped to 5
    rewards = torch.zeros(50)
    rewards[7] = 1.0
    assert group_advantages(rewards, 50)[7].item() == pytest.approx(5.0)
    assert group_advantages(rewards, 50, clip=10.0)[7].item() == pytest.approx(6.9296465, rel=1e-6)


def test_group_advantages_with_a_shared_std():
    """Flow-GRPO's global_std: each group's mean, one std for all. Rewards 1 2 3 | 5 5 9 | 4 4 4 with the population
    std of all nine (mean 37 / 9, squares about it 193 - 37^2 / 9 = 40.8889, std sqrt(40.8889 / 9) = 2.13148):
    group 1 (mean 2) -1, 0, 1 over it; group 2 (mean 19 / 3) -4/3, -4/3, 8/3 over it; group 3 ties: 0."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 9.0, 4.0, 4.0, 4.0])
    std = rewards.std(correction=0)
    assert std.item() == pytest.approx(2.1314807, abs=1e-6)
    adv = group_advantages(rewards, 3, shared_std=std)
    expected = [v / 2.1314807 for v in (-1, 0, 1, -4 / 3, -4 / 3, 8 / 3)] + [0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # the std as a number, or in another dtype, gives the same advantages, in the rewards' dtype and device
    for given in (std.item(), std.double()):
        same = group_advantages(rewards, 3, shared_std=given)
        assert torch.equal(same, adv) and (same.dtype, same.device) == (adv.dtype, rewards.device)
    # each group's own std would give group 1 -1, 0, 1 and group 2 -0.57735, -0.57735, 1.1547
    assert group_advantages(rewards, 3)[3:6].tolist() == pytest.approx([-0.5773503, -0.5773503, 1.1547005], abs=1e-6)
    # the clamp still applies
    assert group_advantages(rewards, 3, clip=0.5, shared_std=std).abs().max().item() == pytest.approx(0.5)


def test_clipped_policy_loss_golden_and_gradient():
    # r = 1, e^0.2, e^-0.2 with A = 1, 1, -1 and eps 0.1: max(-1, -1) = -1; max(-1.2214, -1.1) = -1.1;
    # max(0.8187, 0.9) = 0.9 -> loss = (-1 - 1.1 + 0.9) / 3 = -0.4
    log_prob = torch.tensor([0.0, 0.2, -0.2], requires_grad=True)
    loss, metrics = clipped_policy_loss(log_prob, torch.zeros(3), torch.tensor([1.0, 1.0, -1.0]), clip_range=0.1)
    assert loss.item() == pytest.approx(-0.4, abs=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["approx_kl"].item() == pytest.approx((0.04 + 0.04) / 2 / 3)
    loss.backward()
    # only the unclipped row moves, and a positive advantage pushes its log-probability up: d loss / d logp = -A r / 3
    assert log_prob.grad.tolist() == pytest.approx([-1 / 3, 0.0, 0.0])
    # at the first update r = 1 exactly: the loss is -mean(A), no clipping
    loss, metrics = clipped_policy_loss(torch.zeros(4), torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, 0.0]))
    assert loss.item() == pytest.approx(-0.5) and metrics["clip_fraction"].item() == 0.0


def test_bradley_terry_preferences_golden():
    # scores 1, 0, 0.01 at temperature 1: P(0 beats 1) = sigmoid(1) = 0.731059; near-tie 1 vs 2 -> ~0.5
    pref = bradley_terry_preferences(torch.tensor([1.0, 0.0, 0.01]))
    assert pref[0, 1].item() == pytest.approx(0.7310585786, abs=1e-6)
    assert pref[1, 0].item() == pytest.approx(1 - 0.7310585786, abs=1e-6)
    assert pref[2, 1].item() == pytest.approx(0.5025, abs=1e-4) and torch.all(pref.diagonal() == 0.5)
    # a small temperature approaches ranks: the near-tie becomes a clear win
    assert bradley_terry_preferences(torch.tensor([0.0, 0.01]), temperature=1e-3)[1, 0].item() > 0.99
    # win rates from these preferences always average 0.5 in a group
    assert pairwise_win_rates(pref).mean().item() == pytest.approx(0.5)


def test_gaussian_policy_kl_golden():
    """Row 0: elements (1 - 0)^2 / (2 * 2^2) = 0.125 and (2 - 0)^2 / 8 = 0.5, mean 0.3125; row 1 equals its
    reference; row 2: (3 - 1)^2 / (2 * 0.5^2) = 8 in both elements."""
    mean = torch.tensor([[1.0, 2.0], [0.5, -0.5], [3.0, 3.0]])
    ref = torch.tensor([[0.0, 0.0], [0.5, -0.5], [1.0, 1.0]])
    std = torch.tensor([[2.0], [1.0], [0.5]])
    torch.testing.assert_close(gaussian_policy_kl(mean, ref, std), torch.tensor([0.3125, 0.0, 8.0]))
