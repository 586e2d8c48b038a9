"""Sharded training, `train.sharding`: the UNet's weights, gradients and optimiser states split over the processes
by FSDP2 (`torch.distributed.fsdp.fully_shard`), so that a full fine-tune too large for one device in data-parallel
training fits on several.

- `fsdp2`: every block the wrap policy names (`BLOCK_CLASSES`: the UNet's down, mid and up blocks and its
  transformer blocks) is a unit whose weights are gathered for its forward and backward and freed after; what is
  left (embeddings, first and last convolutions) is the root unit. Each process keeps 1/N of every weight, of its
  gradient and of its Adam moments. With train.mixed_precision=bf16 the weights are gathered and computed in bf16
  and gradients are reduced in fp32.
- `fsdp2-offload`: the same, with the shards and the optimiser kept in CPU memory and moved in for each unit.
- A full fine-tune's frozen reference copy is sharded the same way (or not loaded: method.precomputed_reference);
  a LoRA's frozen base is sharded with its adapters, which alone train, and the adapter-off reference is the same
  sharded model. The VAE and text encoders (frozen, small) are replicated, or not loaded with data.cache.

Launch with `torchrun --nproc_per_node N -m diffusion_align train CONFIG train.sharding=fsdp2`, or with accelerate
(`accelerate launch --config_file configs/accelerate/fsdp2.yaml -m diffusion_align train CONFIG`), whose FSDP settings
select the strategy (`sharding_from_launcher`). The sharding itself is applied here, in the same way on CPUs and
GPUs, so the path the tests run is the one users run: accelerate's FSDP plugin, which falls back to data-parallel
on CPUs, is not engaged. Checkpoints are sharded too (torch.distributed.checkpoint: each process writes its own
shards, none gathers the optimiser), and the final model is gathered once into the usual diffusers files.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import Config, ConfigError

# the wrap policy: each module of these classes is sharded as one unit (as accelerate's
# fsdp_transformer_layer_cls_to_wrap names them in configs/accelerate/fsdp2.yaml)
BLOCK_CLASSES = ("BasicTransformerBlock", "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                 "UNetMidBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SHARDED_STATE = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint folder


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def sharding_from_launcher(env=os.environ) -> str | None:
    """The strategy `accelerate launch --config_file ...` asks for through its environment; None when it asks for
    none (a plain, data-parallel or torchrun launch)."""
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        raise ConfigError("this accelerate config uses DeepSpeed, which diffusion-align does not run yet; use "
                          "configs/accelerate/fsdp2.yaml (FSDP2 shards weights, gradients and optimiser states, "
                          "more than ZeRO-2 does)")
    if not _true(env.get("ACCELERATE_USE_FSDP")):
        return None
    if env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"this accelerate config asks for FSDP version {env.get('FSDP_VERSION', '1')}; "
                          "diffusion-align shards with FSDP2: set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    return "fsdp2-offload" if _true(env.get("FSDP_OFFLOAD_PARAMS")) else "fsdp2"


def resolve_sharding(cfg: Config, env=os.environ) -> str:
    """train.sharding, or the accelerate config's where the key says none; checked against what sharding cannot run
    with."""
    key, launcher = cfg.train.sharding, sharding_from_launcher(env)
    if key != "none" and launcher is not None and key != launcher:
        raise ConfigError(f"train.sharding={key}, but the accelerate config asks for {launcher}; set one of them")
    strategy = launcher if key == "none" and launcher is not None else key
    if strategy == "none":
        return strategy
    if "RANK" not in env and not dist.is_initialized():
        raise ConfigError(f"train.sharding={strategy} shards over the processes of a distributed launch: start the "
                          "run with torchrun --nproc_per_node N -m diffusion_align train ... (N = 1 too), or accelerate "
                          "launch --config_file configs/accelerate/fsdp2.yaml -m diffusion_align train ...")
    conflicts = {"train.mixed_precision=fp16": cfg.train.mixed_precision == "fp16",  # its scaler is not shard-aware
                 f"train.optimizer={cfg.train.optimizer}": cfg.train.optimizer != "adamw",
                 "model.compile=true": cfg.model.compile,
                 "model.ref_offload=true": cfg.model.ref_offload}
    for setting, conflict in conflicts.items():
        if conflict:
            raise ConfigError(f"train.sharding={strategy} runs with bf16 or no mixed precision, train.optimizer="
                              f"adamw, model.compile=false and model.ref_offload=false (the offload strategy is "
                              f"fsdp2-offload); this config has {setting}")
    return strategy


def shard(module: torch.nn.Module, strategy: str, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """Shard `module` in place, block by block (`BLOCK_CLASSES`, innermost first), then the rest as the root."""
    options = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
    if strategy == "fsdp2-offload":
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    blocks = [m for m in module.modules() if type(m).__name__ in BLOCK_CLASSES]
    for block in reversed(blocks):  # modules() lists a block before the blocks inside it
        fully_shard(block, **options)
    fully_shard(module, **options)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def gradient_sync(accelerator, module: torch.nn.Module, sync: bool):
    """A context for one micro-step: gradients are reduced over processes only where `sync` (the last micro-step
    of an update), and accumulate locally before it."""
    if sync:
        return nullcontext()
    if is_sharded(module):
        return _fsdp_no_sync(module)
    return accelerator.no_sync(module)


@contextmanager
def _fsdp_no_sync(module: FSDPModule):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip_gradients(accelerator, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip by the global gradient norm, over all processes' shards when sharded; the norm before clipping."""
    if not any(isinstance(p, DTensor) for p in parameters):
        return float(accelerator.clip_grad_norm_(parameters, max_norm))
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)  # a DTensor: each process's part, reduced over processes
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total.full_tensor())


def all_finite(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether every weight is finite; over all processes' shards when sharded (collective then)."""
    sharded = [p for p in parameters if isinstance(p, DTensor)]
    finite = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in parameters)
    if not sharded:
        return finite
    flag = torch.tensor(int(finite))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def model_state_bytes(modules: list[torch.nn.Module], optimizer) -> int:
    """What this process holds of the model states: the weights of `modules` (the policy and a reference copy),
    a gradient for each trainable weight, and the optimiser's states; of a sharded tensor, this process's shard."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    params = [p for module in modules for p in module.parameters()]
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    return sum(local(p) * (2 if p.requires_grad else 1) for p in params) + sum(local(v) for v in states)


def unsharded_class(module: torch.nn.Module) -> type:
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gathered_policy(policy):
    """Collective: the policy with its UNet gathered whole into an ordinary module, on the main process (None on the
    others), to save the final model with the code that saves an unsharded one."""
    state = get_model_state_dict(policy.unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:  # only the main process receives the full state
        return None
    with torch.device("meta"):  # no weights of its own: the gathered ones are assigned, not copied in
        unet = unsharded_class(policy.unet).from_config(policy.unet.config)
        if policy.is_lora:
            unet.add_adapter(policy.lora_config)
    unet.load_state_dict(state, assign=True)
    trainable = _trainable_names(policy.unet)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(name in trainable)
    whole = copy.copy(policy)
    whole.unet, whole.ref_unet = unet, None
    return whole


def _trainable_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _sharded_state(module: torch.nn.Module, optimizer) -> dict:
    """The trainable weights and the optimiser, as this process holds them (its shards)."""
    trainable = _trainable_names(module)
    weights = {k: v for k, v in get_model_state_dict(module).items() if k in trainable}
    return {"model": weights, "optimizer": get_optimizer_state_dict(module, optimizer)}


def save_sharded(folder: Path, module: torch.nn.Module, optimizer) -> None:
    """Collective: every process writes its shards of the trainable weights and optimiser states into `folder`."""
    dcp.save(_sharded_state(module, optimizer), checkpoint_id=folder)


def load_sharded(folder: Path, module: torch.nn.Module, optimizer) -> None:
    """Collective: restore what `save_sharded` wrote, each process its own shards."""
    state = _sharded_state(module, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
