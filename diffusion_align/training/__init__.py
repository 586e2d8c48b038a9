"""Training: the one loop (trainer), methods, likelihood, inversion, checkpoints and outputs."""
