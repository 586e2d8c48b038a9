"""diffusion-align: preference alignment (Diffusion-DPO and friends) for SD1.5, SD2.1 and SDXL UNets."""

__version__ = "0.1.0"
