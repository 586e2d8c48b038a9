"""Run by test_sharding.py under torchrun: several training runs one after another in the same processes. For each,
per rank, what every denoiser call (UNet, SD3 or FLUX transformer) received (its noised latents, timesteps and
conditioning, summed per row), for the test to compare a sharded run with a data-parallel one (and their final
models), and which denoisers the process read weights into.

    sharding_worker.py SPEC.json OUT_DIR     SPEC: [{"name": ..., "config": path, "overrides": [...]}, ...]
"""

import inspect
import json
import logging
import sys
from contextlib import contextmanager

import torch
from accelerate import PartialState
from diffusers import FluxTransformer2DModel, ModelMixin, SD3Transformer2DModel, UNet2DConditionModel

from diffusion_align.config import load_config
from diffusion_align.training import trainer


@contextmanager
def recording_unet_inputs(into: list):
    """Append, per denoiser call, its inputs reduced to per-row sums (float64): enough to tell rows, timesteps and
    conditioning apart, small enough to compare whole runs. The classes' forwards are wrapped, so the call is seen
    however the denoiser is wrapped or sharded."""
    originals = {cls: cls.forward for cls in (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)}

    def recording(forward):
        names = list(inspect.signature(forward).parameters)[1:]

        def recorded(self, *args, **kwargs):
            given = {**dict(zip(names, args)), **kwargs}
            sample = given.get("sample", given.get("hidden_states"))
            timestep, cond = given.get("timestep"), given["encoder_hidden_states"]
            into.append({"sample": sample.detach().double().flatten(1).sum(1).tolist(),
                         "timesteps": torch.as_tensor(timestep).expand(sample.shape[0]).tolist(),
                         "cond": cond.detach().double().flatten(1).sum(1).tolist()})
            return forward(self, *args, **kwargs)
        return recorded
    for cls, forward in originals.items():
        cls.forward = recording(forward)
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


@contextmanager
def counting_denoiser_loads(into: list):
    """Append the class name of every denoiser read with from_pretrained."""
    original = ModelMixin.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        if cls in (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel):
            into.append(cls.__name__)
        return original(cls, *args, **kwargs)
    ModelMixin.from_pretrained = classmethod(counted)
    try:
        yield
    finally:
        ModelMixin.from_pretrained = classmethod(original)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    spec, out_dir = sys.argv[1:]
    # every run ends with accelerator.end_training(), which destroys the process group: keep it for the next run
    destroy, PartialState.destroy_process_group = PartialState.destroy_process_group, lambda self, group=None: None
    for run in json.load(open(spec)):
        calls, loads = [], []
        with recording_unet_inputs(calls), counting_denoiser_loads(loads):
            trainer.train(load_config(run["config"], run["overrides"]))
        with open(f"{out_dir}/{run['name']}-rank{PartialState().process_index}.json", "w") as f:
            json.dump({"calls": calls, "denoiser_loads": loads}, f)
    destroy(PartialState())
