"""`python -m diffusion_align ...`, e.g. under `accelerate launch -m diffusion_align train CONFIG`."""

from .cli import main

main()
