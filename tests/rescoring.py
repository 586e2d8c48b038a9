"""The check that a stored sampling step, scored again by the same model, has the log-probability it was sampled
with (the PPO ratio one at the first update), for any policy: DDIM's, or the flow SDE's or CPS step's."""

import torch

from diffusion_align.training.sampling import sample_with_logprob, step_distribution


def assert_rescoring_gives_ratio_one(denoiser, policy, cond, uncond, channels: int, guidance: float, cases):
    """Sample 6 images (2 prompts x 3) in 4 steps, then score each (step, rows) of `cases` again: `step` an index,
    or one per row; `rows` None (the whole batch) or a training micro-batch of it."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, channels, 16, 16, generator=generator)
    trajectory = sample_with_logprob(denoiser, policy, cond, uncond, latents, steps=4, guidance=guidance,
                                     generator=generator)
    assert trajectory.log_probs.shape == (4, 6) and torch.isfinite(trajectory.log_probs).all()
    assert not torch.equal(trajectory.latents[-1][0], trajectory.latents[-1][1])  # a group's images differ
    for step, rows in cases:
        mean, std = step_distribution(denoiser, policy, trajectory, step, cond, uncond, guidance, rows)
        sampled = trajectory.log_probs[step] if rows is None else trajectory.log_probs[step, rows]
        rescored = policy.log_prob(trajectory.latents_at(step + 1, rows), mean, std)
        assert (rescored - sampled).abs().max() < 1e-5
