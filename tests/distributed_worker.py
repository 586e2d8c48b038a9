"""Run by test_distributed.py under torchrun: train, then save this rank's trainable weights for comparison."""

import logging
import sys

from accelerate import PartialState
from safetensors.torch import save_file

from diffusion_align.config import load_config
from diffusion_align.trainer import train

logging.basicConfig(level=logging.INFO)
config, out_dir, *overrides = sys.argv[1:]
result = train(load_config(config, overrides))
trainable = {name: p.detach().contiguous() for name, p in result.unet.named_parameters() if p.requires_grad}
save_file(trainable, f"{out_dir}/rank{PartialState().process_index}.safetensors")
