"""Run by test_memory.py in a process of its own: the CPU allocator's peak while the tiny UNet makes a training forward
and then its frozen reference copy one without gradients, as a full DPO fine-tune's step begins: in fp32, or under
bf16 autocast (and, sharded, with the weights gathered in bf16), as the trainer runs them.

    memory_worker.py PIPELINE ROWS LATENT no|bf16 forward|step|step-checkpointed OUT.json

forward: those forwards first whole, then both sharded by `sharding.shard` (fsdp2). step: sharded only, the whole
step, the trained model's backward included; step-checkpointed: the same with the UNet's gradient checkpointing on.

Sharded, this process is rank 0 of a fake process group of 2 (torch's own, which moves no data): FSDP2 shards,
gathers and reduce-scatters with the buffers it allocates on a GPU, and nothing else runs. A real backend adds
timing: gloo's threads free a collective's buffers when they drop its work object, sometimes after the next
allocations (a CI failure, its step's peak 8% over), and gloo's reduce-scatter keeps a copy of each input, which
NCCL does not. So each peak here is exact and the same on every run.
"""

import copy
import json
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from test_memory import allocated_peak
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

from diffusion_align.training.sharding import shard


if __name__ == "__main__":
    path, rows, latent, precision, mode, out = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                                sys.argv[5], sys.argv[6])
    compute = {"no": None, "bf16": torch.bfloat16}[precision]
    autocast = (lambda: torch.autocast("cpu", dtype=compute)) if compute else nullcontext
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").train()
    reference = copy.deepcopy(unet).requires_grad_(False).to(compute)  # in the frozen dtype, as the trainer loads it
    if mode == "step-checkpointed":
        unet.enable_gradient_checkpointing()
        mode = "step"
    inputs = (torch.randn(rows, 4, latent, latent), torch.zeros(rows, dtype=torch.long),
              torch.randn(rows, 77, unet.config.cross_attention_dim))

    def step(model, frozen, backward=True):
        def run():
            with autocast():
                kept = [model(*inputs).sample]  # its graph stays alive, for the backward
                with torch.no_grad():
                    frozen(*inputs)
            if backward:
                kept[0].float().square().mean().backward()
                for p in model.parameters():
                    p.grad = None
            kept.clear()
        return run
    peaks = {} if mode == "step" else {"whole": allocated_peak(step(unet, reference, backward=False), grad=True)}
    sharded, sharded_reference = shard(unet, "fsdp2", compute), shard(reference, "fsdp2", compute)
    # FSDP's lazy initialisation on a first step; its backward reshards the trained root, and the reference's root,
    # which no backward reshards, is resharded here, so the step measured starts with every weight sharded
    step(sharded, sharded_reference)()
    sharded_reference.reshard()
    peaks["sharded"] = allocated_peak(step(sharded, sharded_reference, backward=mode == "step"), grad=True)
    with open(out, "w") as f:
        json.dump(peaks, f)
    dist.destroy_process_group()
