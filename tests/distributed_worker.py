"""Run by test_distributed.py under torchrun: train, then save this rank's trainable weights and what it drew (the
pair indices of every batch; online: each step's prompts, starting noise and rewards), for comparison."""

import json
import logging
import sys

import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import save_file

from diffusion_align.config import load_config
from diffusion_align.training import online, trainer


def record_batches(into: list) -> None:
    """Make the trainer's loader append each batch's pair indices to `into`."""
    make_loader = trainer.make_pair_loader

    def loader(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            into.append(batch["indices"])
            yield batch
    trainer.make_pair_loader = loader


def record_rollouts(into: list) -> None:
    """Make the online loop append each step's prompts, each micro-batch's starting noise x_T, and the rewards and
    shared std its advantages were computed from to `into`."""
    step_prompts, sample, group_advantages = online.step_prompts, online.sample_with_logprob, online.group_advantages

    def prompts(*args, **kwargs):
        chosen = step_prompts(*args, **kwargs)
        into.append({"prompts": chosen, "noise": []})
        return chosen

    def sampler(unet, policy, cond, uncond, latents, *args, **kwargs):
        into[-1]["noise"] += latents.flatten(1).tolist()
        return sample(unet, policy, cond, uncond, latents, *args, **kwargs)

    def advantages(rewards, *args, shared_std=None, **kwargs):
        into[-1]["rewards"] = rewards.tolist()
        into[-1]["shared_std"] = None if shared_std is None else float(shared_std)
        return group_advantages(rewards, *args, shared_std=shared_std, **kwargs)
    online.step_prompts, online.sample_with_logprob, online.group_advantages = prompts, sampler, advantages


def record_ddp(into: list) -> None:
    """Append to `into` how DDP itself says it runs each model accelerate wraps in it (its logging data)."""
    prepare_model = Accelerator.prepare_model

    def prepare(self, model, *args, **kwargs):
        prepared = prepare_model(self, model, *args, **kwargs)
        if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
            into.append(bool(prepared._get_ddp_logging_data()["gradient_as_bucket_view"]))
        return prepared
    Accelerator.prepare_model = prepare


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    config, out_dir, *overrides = sys.argv[1:]
    batches = []
    record_batches(batches)
    record_rollouts(batches)
    ddp = []
    record_ddp(ddp)
    timeouts, init_process_group = [], torch.distributed.init_process_group

    def init_recorded(*args, **kwargs):  # how long the group's collectives may wait
        init_process_group(*args, **kwargs)
        group = torch.distributed.distributed_c10d._get_default_group()
        timeouts.append(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    torch.distributed.init_process_group = init_recorded
    result = trainer.train(load_config(config, overrides))
    rank = PartialState().process_index
    trainable = {name: p.detach().contiguous() for name, p in result.denoiser.named_parameters() if p.requires_grad}
    save_file(trainable, f"{out_dir}/rank{rank}.safetensors")
    with open(f"{out_dir}/rank{rank}-batches.json", "w") as f:
        json.dump(batches, f)
    with open(f"{out_dir}/rank{rank}-ddp.json", "w") as f:
        json.dump(ddp, f)
    with open(f"{out_dir}/rank{rank}-timeout.txt", "w") as f:
        f.write(str(timeouts))
