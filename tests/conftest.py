import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random pipelines of every family, saved as diffusers folders: {"sd": path, "sd2": ..., "sdxl": ...}."""
    from diffusion_align.tiny import FAMILIES, save_tiny_pipeline
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_pipeline(root / family, family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    from diffusion_align.tiny import write_tiny_pairs
    return write_tiny_pairs(tmp_path_factory.mktemp("tiny-pairs") / "pairs.parquet", num_pairs=16, resolution=48)
