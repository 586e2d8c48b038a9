"""Progress bars: tqdm on stderr, by default on a terminal only, and none at all after `diffusion-align --no-progress`
(which sets DIFFUSION_ALIGN_PROGRESS=0 for the processes it starts too), the bars of diffusers, transformers, datasets
and the hub included."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

SETTING = "DIFFUSION_ALIGN_PROGRESS"


def progress(iterable=None, disable: bool | None = None, **options) -> tqdm:
    """A tqdm bar; `disable` as tqdm reads it (None: shown on a terminal only), and always off after no_progress."""
    return tqdm(iterable, disable=True if os.environ.get(SETTING) == "0" else disable, **options)


def no_progress() -> None:
    """No progress bar from here on, ours or the libraries'."""
    os.environ[SETTING] = "0"
    import datasets
    import diffusers
    import huggingface_hub
    import transformers
    datasets.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
