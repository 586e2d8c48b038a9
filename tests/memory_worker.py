"""Run by test_memory.py under torchrun (2 processes, gloo): the CPU allocator's peak while the tiny UNet makes a
training forward and then its frozen reference copy one without gradients, as a full DPO fine-tune's step begins:
in fp32, or under bf16 autocast (and, sharded, with the weights gathered in bf16), as the trainer runs them.

    memory_worker.py PIPELINE ROWS LATENT no|bf16 forward|step|step-checkpointed OUT.json

forward: those forwards first whole, then both sharded by `sharding.shard` (fsdp2), the least sharded peak of five.
step: sharded only, the whole step, the trained model's backward included, with a reduce-scatter that allocates
what NCCL's does (gloo's keeps a copy of each input until the next one, which NCCL does not make), the least peak of
five steps; step-checkpointed: the same with the UNet's gradient checkpointing on.
"""

import copy
import json
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from test_memory import allocated_peak
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from diffusion_align.training.sharding import shard


class InPlaceReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter as an all-reduce in the input's own memory, this process's share then copied out: the
    input and output buffers FSDP2 allocates, and nothing else."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])


if __name__ == "__main__":
    path, rows, latent, precision, mode, out = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                                sys.argv[5], sys.argv[6])
    compute = {"no": None, "bf16": torch.bfloat16}[precision]
    autocast = (lambda: torch.autocast("cpu", dtype=compute)) if compute else nullcontext
    dist.init_process_group("gloo")
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
    if mode == "step":
        for module in sharded.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_reduce_scatter(InPlaceReduceScatter())
    # FSDP's lazy initialisation on a first step; its backward reshards the trained root, and the reference's root,
    # which no backward reshards, is resharded here, so the step measured starts with every weight sharded
    step(sharded, sharded_reference)()
    sharded_reference.reshard()
    # gloo's threads free a gathered buffer when its collective's work object goes, sometimes only after the next
    # allocations: a peak is then higher by a unit or two, never lower, so each keeps the least of five; a forward
    # without its backward leaves both roots gathered, which are resharded before the next
    def measured():
        peak = allocated_peak(step(sharded, sharded_reference, backward=mode == "step"), grad=True)
        sharded.reshard()
        sharded_reference.reshard()
        return peak
    peaks["sharded"] = min(measured() for _ in range(5))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(peaks, f)
    dist.destroy_process_group()
