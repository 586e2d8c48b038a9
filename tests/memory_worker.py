"""Run by test_memory.py under torchrun (2 processes, gloo): the CPU allocator's peak while the tiny UNet makes a
training forward and then its frozen reference copy one without gradients, first whole, then both sharded by
`sharding.shard` (fsdp2), as a full DPO fine-tune's step begins: in fp32, or under bf16 autocast (and, sharded,
with the weights gathered in bf16), as the trainer runs them.

    memory_worker.py PIPELINE ROWS LATENT no|bf16 OUT.json
"""

import copy
import json
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from test_memory import allocated_peak

from diffusion_align.training.sharding import shard

if __name__ == "__main__":
    path, rows, latent, precision, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    compute = {"no": None, "bf16": torch.bfloat16}[precision]
    autocast = (lambda: torch.autocast("cpu", dtype=compute)) if compute else nullcontext
    dist.init_process_group("gloo")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").train()
    reference = copy.deepcopy(unet).requires_grad_(False).to(compute)  # in the frozen dtype, as the trainer loads it
    inputs = (torch.randn(rows, 4, latent, latent), torch.zeros(rows, dtype=torch.long),
              torch.randn(rows, 77, unet.config.cross_attention_dim))

    def forward(model, frozen):
        def run():
            with autocast():
                kept = [model(*inputs).sample]  # its graph stays alive, as for a backward
                with torch.no_grad():
                    frozen(*inputs)
            kept.clear()
        return run
    peaks = {"whole": allocated_peak(forward(unet, reference), grad=True)}
    sharded, sharded_reference = shard(unet, "fsdp2", compute), shard(reference, "fsdp2", compute)
    # FSDP's lazy initialisation on a first step; its backward reshards the trained root, and the reference's root,
    # which no backward reshards, is resharded here, so the step measured starts with every weight sharded
    with autocast():
        kept = sharded(*inputs).sample
        with torch.no_grad():
            sharded_reference(*inputs)
    kept.float().square().mean().backward()
    sharded_reference.reshard()
    peaks["sharded"] = allocated_peak(forward(sharded, sharded_reference), grad=True)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(peaks, f)
    dist.destroy_process_group()
