import os

# before anything imports huggingface_hub or datasets, which read these once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

# scripts/test.sh runs the suite on two workers (pytest-xdist, --dist loadscope: each module on one worker, so that its
# fixtures are made once). The modules that take minutes go first, the heaviest first (by --durations), so that
# neither worker is left with one of them at the end while the other waits
HEAVIEST_FIRST = ["test_sharding.py", "test_benchmarks.py", "test_memory.py", "test_export.py", "test_crash.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    # Keep the datasets cache inside pytest's temp dir instead of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))
    # Shuffled parquet streams sleep 5 s at the end of each pass (an arrow thread-shutdown workaround in
    # datasets); harmless for real epochs, but it would dominate these tiny ones.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random pipelines of every family, saved as diffusers folders: {"sd": path, "sd2": ..., "sdxl": ...}."""
    from diffusion_align.models.tiny import FAMILIES, save_tiny_pipeline
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_pipeline(root / family, family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    from diffusion_align.models.tiny import write_tiny_pairs
    return write_tiny_pairs(tmp_path_factory.mktemp("tiny-pairs") / "pairs.parquet", num_pairs=16, resolution=48)


@pytest.fixture(scope="session")
def tiny_flow_models(tmp_path_factory):
    """Tiny random SD3 (SD3.5-medium layout) and FLUX.1-dev pipelines, saved as diffusers folders."""
    from diffusion_align.models.tiny_flow import FLOW_FAMILIES, save_tiny_flow_pipeline
    root = tmp_path_factory.mktemp("tiny-flow-models")
    return {family: save_tiny_flow_pipeline(root / family, family) for family in FLOW_FAMILIES}
