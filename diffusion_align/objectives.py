"""Preference objectives: pure functions of tensors.

Offline methods (DPO, SmPO, DCPO, MaPO, SFT) take the per-sample errors from `training.likelihood.denoising_errors`
(mean over C, H, W, fp32), one value per pair for the winner (`_w`) and the loser (`_l`), from the policy
(`model_`) and the frozen reference (`ref_`). A lower error means a higher ELBO, so `-(err - ref_err)` is the
implicit log-likelihood ratio of a sample. The GRPO family (Pref-GRPO, GRPO) takes rewards, pairwise preferences
and per-step log-probabilities (`sampling.ddim_step_with_logprob`).
Every loss returns `(loss, metrics)`; metrics are detached 0-dim tensors, ready to average across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float = 5000.0,
                       label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO (Wallace et al., 2023), in the authors' convention.

        inside = -(beta / 2) * ((m_w - r_w) - (m_l - r_l))
        loss   = mean over pairs of -(1 - eps) * logsigmoid(inside) - eps * logsigmoid(-inside)

    eps = `label_smoothing`, 0 for Diffusion-DPO; eps > 0 is conservative DPO (cDPO, Mitchell 2023; trl's
    `label_smoothing` of its sigmoid loss): each label is taken as flipped with probability eps, so a pair's pull
    stops where sigmoid(inside) = 1 - eps instead of growing its margin without end.
    beta = 5000 here is the same objective as `-logsigmoid(2500 * ((r_w - r_l) - (m_w - m_l)))` in the diffusers
    port. At initialisation (policy == reference) inside = 0 and the loss is log 2 = 0.6931 for any eps.
    Metrics: implicit_acc (fraction of pairs with inside > 0, ties count 0.5), reward_margin (mean inside: the
    implicit reward of the winner minus the loser), and the mean errors of policy and reference.
    """
    inside = -0.5 * beta * ((model_err_w - ref_err_w) - (model_err_l - ref_err_l))
    # per pair, then the mean: logsigmoid of a batch mean is a known bug
    loss = -((1 - label_smoothing) * F.logsigmoid(inside) + label_smoothing * F.logsigmoid(-inside)).mean()
    return loss, {**_preference_metrics(inside), **_error_metrics(model_err_w, model_err_l, ref_err_w, ref_err_l)}


def smpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
              pref_prob: torch.Tensor, beta: float = 5000.0) -> tuple[torch.Tensor, dict]:
    """SmPO-Diffusion (Lu et al., ICML 2025): Diffusion-DPO with a per-pair scale from a soft preference.

        scale  = 0.5 * beta * 10 * (2 * pref_prob - 1)
        inside = -scale * ((m_w - r_w) - (m_l - r_l))
        loss   = mean over pairs of -logsigmoid(inside)

    `pref_prob` = P(w preferred to l) per pair (`smpo_pref_prob`). A pair with pref_prob = 0.5 contributes a constant
    log 2 and no gradient; p = 1 gives 10x the DPO pull. Per pair for any batch size (the authors' code used the
    first pair's p for the whole batch, so it only worked at batch 1).
    Metrics: as diffusion_dpo_loss, plus the mean pref_prob and the mean effective scale.
    """
    scale = 0.5 * beta * 10.0 * (2.0 * pref_prob - 1.0)
    inside = -scale * ((model_err_w - ref_err_w) - (model_err_l - ref_err_l))
    loss = -F.logsigmoid(inside).mean()
    metrics = {**_preference_metrics(inside), "pref_prob": pref_prob.detach().mean(),
               "effective_scale": scale.detach().mean()}
    return loss, {**metrics, **_error_metrics(model_err_w, model_err_l, ref_err_w, ref_err_l)}


def smpo_pref_prob(score_w: torch.Tensor, score_l: torch.Tensor, score_min: float = 0.11543526500463486,
                   score_max: float = 0.28201571106910706) -> torch.Tensor:
    """SmPO's soft label from raw PickScore cosines (no logit scale), min-max normalised with the authors' constants:

        n = (s - score_min) / (score_max - score_min);   pref_prob = sigmoid(n_w - n_l)
    """
    span = score_max - score_min
    return torch.sigmoid((score_w - score_min) / span - (score_l - score_min) / span)


def mapo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, beta: float = 0.1, snr_value: float = 0.5,
              num_train_timesteps: int = 1000,
              diffusion_err_w: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """MaPO (Hong et al., 2024), reference-free:

        f(x)     = s*x / (exp(s*x) - 1),  s = snr_value   (f(0) = 1 by continuity; f falls as the error grows)
        log_odds = f(m_w) - f(m_l)
        loss     = mean(d_w) - beta * mean(logsigmoid(T * log_odds)),  T = num_train_timesteps

    The first term is the plain diffusion loss on the winners, d_w = `diffusion_err_w` where it is in other units
    than the margin's errors (a v-prediction model's raw velocity error), else m_w; the second term is the margin.
    No reference model.
    Metrics: score_w / score_l (mean f), margin_term (beta * mean logsigmoid(T * log_odds), the part subtracted),
    implicit_acc (fraction of pairs with log_odds > 0, ties 0.5) and the mean errors.
    """
    score_w, score_l = _mapo_score(model_err_w, snr_value), _mapo_score(model_err_l, snr_value)
    log_odds = score_w - score_l
    margin = beta * F.logsigmoid(num_train_timesteps * log_odds).mean()
    loss = (model_err_w if diffusion_err_w is None else diffusion_err_w).mean() - margin
    metrics = {"implicit_acc": _preference_metrics(log_odds)["implicit_acc"], "score_w": score_w.detach().mean(),
               "score_l": score_l.detach().mean(), "margin_term": margin.detach()}
    return loss, {**metrics, **_error_metrics(model_err_w, model_err_l)}


def _mapo_score(err: torch.Tensor, snr_value: float) -> torch.Tensor:
    """z / (exp(z) - 1) with z = snr_value * err, finite with finite gradients at z -> 0 (series 1 - z/2 + z^2/12)."""
    z = snr_value * err
    small = z.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(z), z)  # keeps 0/0 out of the unused branch's gradient
    return torch.where(small, 1 - z / 2 + z * z / 12, safe / torch.expm1(safe))


def sft_loss(model_err_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning baseline: the plain diffusion loss on the preferred images, mean(m_w)."""
    loss = model_err_w.mean()
    return loss, _error_metrics(model_err_w)


def pairwise_win_rates(pref: torch.Tensor) -> torch.Tensor:
    """Pref-GRPO's reward: each image's mean probability of beating the other images of its group.

        w_i = (1 / (G - 1)) * sum_{j != i} pref[i, j]

    `pref` is [G, G] (or [..., G, G] for several groups) with pref[i, j] = P(i beats j): 1 for a win, 0.5 for a tie;
    the diagonal is ignored. With a consistent judge (pref[i, j] + pref[j, i] = 1) the group mean is 0.5.
    """
    size = pref.shape[-1]
    others = 1 - torch.eye(size, dtype=pref.dtype, device=pref.device)
    return (pref * others).sum(dim=-1) / (size - 1)


def bradley_terry_preferences(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Pairwise preferences from pointwise scores of one group ([..., G] -> [..., G, G]):

        pref[i, j] = P(i beats j) = sigmoid((s_i - s_j) / temperature)

    PickScore's own 2-way softmax is temperature 1 on its logit-scaled scores. A small temperature approaches
    rank-based GRPO; a larger one turns near-ties into ~0.5, removing the "illusory advantage" that lets pointwise
    GRPO hack the reward. The diagonal is 0.5 (an image ties with itself).
    """
    return torch.sigmoid((scores.unsqueeze(-1) - scores.unsqueeze(-2)) / temperature)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8, clip: float = 5.0,
                     shared_std: torch.Tensor | float | None = None) -> torch.Tensor:
    """GRPO's advantages: rewards z-scored within each group of `group_size` consecutive rows, then clamped.

        A_i = clamp((r_i - mean_g) / (std_g + eps), -clip, clip),   std_g the group's unbiased std (divides by G - 1)

    The unbiased std follows the authors' code: DanceGRPO (train_grpo_sd.py) and Pref-GRPO (rewards/dispatcher.py,
    compute_weighted_advantages) both take torch's default `group_rewards.std()`; the population std gives
    advantages sqrt(G / (G - 1)) larger (x1.069 at G = 8). `shared_std` given, it replaces every std_g: Flow-GRPO's
    `global_std` passes the population std of all the step's rewards (its per-prompt tracker, numpy's std). A group
    whose rewards are all equal carries no signal: its advantages are exactly 0 (not rounding noise divided by
    eps), and the trainer leaves it out of the update.
    """
    grouped = rewards.float().reshape(-1, group_size)
    # a shared std gathered on the accelerator comes to the rewards' device (the scorers' rewards are on the CPU)
    std = (grouped.std(dim=1, keepdim=True) if shared_std is None
           else torch.as_tensor(shared_std, dtype=torch.float32, device=grouped.device))
    z = (grouped - grouped.mean(dim=1, keepdim=True)) / (std + eps)
    tied = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(tied, torch.zeros_like(z), z.clamp(-clip, clip)).flatten()


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate on per-step log-probabilities, as the GRPO family uses it on diffusion steps:

        r    = exp(log_prob - old_log_prob)
        loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))),   eps = clip_range

    Metrics: clip_fraction (rows with |r - 1| > eps), approx_kl (mean of (log_prob - old_log_prob)^2 / 2),
    ratio_mean.
    """
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    metrics = {"clip_fraction": ((ratio - 1).abs() > clip_range).float().mean(),
               "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(), "ratio_mean": ratio.detach().mean()}
    return loss, metrics


def gaussian_policy_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) of one denoising step per row, both Gaussians with the step's std sigma:

        KL = mean over latent elements of (mu - mu_ref)^2 / (2 sigma^2)

    (the per-element KL of two equal-variance Gaussians, averaged as the step's log-probability is).
    """
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def _preference_metrics(inside: torch.Tensor) -> dict:
    inside = inside.detach()
    acc = (inside > 0).float() + 0.5 * (inside == 0).float()
    return {"implicit_acc": acc.mean(), "reward_margin": inside.mean()}


def _error_metrics(model_err_w, model_err_l=None, ref_err_w=None, ref_err_l=None) -> dict:
    named = {"model_err_w": model_err_w, "model_err_l": model_err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l}
    return {name: err.detach().mean() for name, err in named.items() if err is not None}
