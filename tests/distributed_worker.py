"""Run by test_distributed.py under torchrun: train, then save this rank's trainable weights and the pair indices
of every batch it drew, for comparison."""

import json
import logging
import sys

from accelerate import PartialState
from safetensors.torch import save_file

from diffusion_align.config import load_config
from diffusion_align.training import trainer


def record_batches(into: list) -> None:
    """Make the trainer's loader append each batch's pair indices to `into`."""
    make_loader = trainer.make_pair_loader

    def loader(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            into.append(batch["indices"])
            yield batch
    trainer.make_pair_loader = loader


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    config, out_dir, *overrides = sys.argv[1:]
    batches = []
    record_batches(batches)
    result = trainer.train(load_config(config, overrides))
    rank = PartialState().process_index
    trainable = {name: p.detach().contiguous() for name, p in result.unet.named_parameters() if p.requires_grad}
    save_file(trainable, f"{out_dir}/rank{rank}.safetensors")
    with open(f"{out_dir}/rank{rank}-batches.json", "w") as f:
        json.dump(batches, f)
