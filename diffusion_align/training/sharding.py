"""Sharded training, `train.sharding`: the denoiser's weights, gradients and optimiser states split over the processes
by FSDP2 (`torch.distributed.fsdp.fully_shard`), so that a full fine-tune too large for one device in data-parallel
training fits on several.

- `fsdp2`: every block the wrap policy names (`BLOCK_CLASSES`: the UNet's down, mid and up blocks and its
  transformer blocks; SD3's joint and FLUX's double- and single-stream transformer blocks) is a unit whose weights
  are gathered for its forward and backward and freed after; what is left (embeddings, first and last layers) is the
  root unit. Each process keeps 1/N of every weight, of its gradient and of its Adam moments; only the main process
  reads the weights, and sends each of the others its shards (`shard`). With train.mixed_precision=bf16 the weights
  are gathered and computed in bf16 and gradients are reduced in fp32.
- `fsdp2-offload`: the same, with the shards and the optimiser kept in CPU memory and moved in for each unit.
- A full fine-tune's frozen reference copy is sharded the same way (or not loaded: method.precomputed_reference);
  a LoRA's frozen base is sharded with its adapters, which alone train, and the adapter-off reference is the same
  sharded model. The VAE and text encoders (frozen, small) are replicated, or not loaded with data.cache.

Launch with `torchrun --nproc_per_node N -m diffusion_align train CONFIG train.sharding=fsdp2`, or with accelerate
(`accelerate launch --config_file configs/accelerate/fsdp2.yaml -m diffusion_align train CONFIG`), whose FSDP settings
select the strategy (`sharding_from_launcher`). The sharding itself is applied here, in the same way on CPUs and
GPUs, so the path the tests run is the one users run: accelerate's FSDP plugin, which falls back to data-parallel
on CPUs, is not engaged. Checkpoints are sharded too (torch.distributed.checkpoint: each process writes its own
shards, none gathers the optimiser), and the final model is gathered once into the usual diffusers files. A
checkpoint's weights can also be gathered in one process, without a process group (`load_sharded_weights`), for
`export`. Such a checkpoint is read without unpickling anything but its own layout (`_SafeReader`, `_SafePlanner`):
torch.distributed.checkpoint's reader would unpickle its index and non-tensor entries whole.

- `zero2`: DeepSpeed's ZeRO stage 2, through accelerate's DeepSpeed plugin (`accelerate launch --config_file
  configs/accelerate/deepspeed-zero2.yaml ...`, or the key under torchrun): every process keeps the whole UNet, and
  1/N of the gradients, of the Adam moments and of DeepSpeed's fp32 master copy of the weights. Its settings come
  from the training config (`deepspeed_config`): weights stay fp32 and the loops' autocast does the mixed precision,
  as in the other strategies (DeepSpeed's own bf16 mode would hold bf16 weights); DeepSpeed clips by the global norm
  and steps on each update's last backward (`gradient_sync` marks it). Checkpoints hold the weights once and, per
  process, its part of the optimiser (`save_partition`).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import pickle
import warnings
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import Config, ConfigError
from ..devices import MIXED_PRECISION_DTYPES
from ..files import save_torch

# the wrap policy: each module of these classes is sharded as one unit (as accelerate's
# fsdp_transformer_layer_cls_to_wrap names them in configs/accelerate/fsdp2.yaml)
BLOCK_CLASSES = ("BasicTransformerBlock", "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                 "UNetMidBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "JointTransformerBlock", "FluxTransformerBlock",
                 "FluxSingleTransformerBlock")


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def sharding_from_launcher(env=os.environ) -> str | None:
    """The strategy `accelerate launch --config_file ...` asks for through its environment; None when it asks for
    none (a plain, data-parallel or torchrun launch)."""
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        return _deepspeed_from_launcher(env)
    if not _true(env.get("ACCELERATE_USE_FSDP")):
        return None
    if env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"this accelerate config asks for FSDP version {env.get('FSDP_VERSION', '1')}; "
                          "diffusion-align shards with FSDP2: set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    return "fsdp2-offload" if _true(env.get("FSDP_OFFLOAD_PARAMS")) else "fsdp2"


def _deepspeed_from_launcher(env) -> str:
    """zero2, from an accelerate config's DeepSpeed settings; those that would differ from what runs are errors."""
    asked = {"zero_stage": (env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"), "2"),
             "offload_optimizer_device": (env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"), "none"),
             "offload_param_device": (env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"), "none"),
             "deepspeed_config_file": (env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none"), "none"),
             "gradient_accumulation_steps": (env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1"), "1"),
             "gradient_clipping": (env.get("ACCELERATE_GRADIENT_CLIPPING", "none"), "none")}
    wrong = [f"{key}: {value}" for key, (value, runs) in asked.items() if value.lower() != runs]
    if wrong:
        raise ConfigError(f"this accelerate config's DeepSpeed settings ask for {', '.join(wrong)}; diffusion-align "
                          "runs ZeRO stage 2 without offload (fsdp2 shards the weights too, fsdp2-offload offloads: "
                          "configs/accelerate/), with DeepSpeed's settings taken from the training config "
                          "(train.grad_accum, train.max_grad_norm, train.mixed_precision): remove those lines, as in "
                          "configs/accelerate/deepspeed-zero2.yaml")
    return "zero2"


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
    if strategy == "zero2" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.sharding=zero2 runs DeepSpeed, which is not installed: pip install "
                          "--no-build-isolation deepspeed (its build reads the installed torch), or shard with "
                          "train.sharding=fsdp2")
    for setting in sharding_conflicts(cfg):
        raise ConfigError(f"train.sharding={strategy} runs with bf16 or no mixed precision, train.optimizer="
                          f"adamw, model.compile=false, model.channels_last=false and model.ref_offload=false (the "
                          f"offload strategy is fsdp2-offload); this config has {setting}")
    return strategy


def sharding_conflicts(cfg: Config) -> dict[str, str]:
    """The settings of `cfg` that sharded training cannot run with, each with the one it runs with instead."""
    conflicts = {"train.mixed_precision=fp16": ("train.mixed_precision=bf16",  # its scaler is not shard-aware
                                                cfg.train.mixed_precision == "fp16"),
                 f"train.optimizer={cfg.train.optimizer}": ("train.optimizer=adamw", cfg.train.optimizer != "adamw"),
                 "model.compile=true": ("model.compile=false", cfg.model.compile),
                 # FSDP2 shards, and DeepSpeed broadcasts, contiguous weights only
                 "model.channels_last=true": ("model.channels_last=false", cfg.model.channels_last),
                 "model.ref_offload=true": ("model.ref_offload=false", cfg.model.ref_offload)}
    return {setting: fix for setting, (fix, conflict) in conflicts.items() if conflict}


def shard(module: torch.nn.Module, strategy: str, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """Shard `module` in place, block by block (`BLOCK_CLASSES`, innermost first), then the rest as the root. The
    weights are gathered in `compute_dtype`; the inputs are left as they come, to the loops' autocast, as in a
    data-parallel run (cast to bf16, SD3's and FLUX's float timesteps would move by up to 4 of 1000, SDXL's size
    ids by up to 4 pixels).

    On several processes, every process is given the main process's weights, shard by shard (`_send_shards`), so
    only the main process need read them: the others may build `module` on the meta device
    (`load_components(denoiser_weights=False)`), and N processes hold the whole model once, not N times."""
    options = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                 cast_forward_inputs=False)}
    if strategy == "fsdp2-offload":
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    several = dist.is_initialized() and dist.get_world_size() > 1
    # the main process's whole weights, kept from fully_shard (which frees them) to be sent
    weights = {name: p.detach() for name, p in module.named_parameters()} if several and dist.get_rank() == 0 else None
    for block in reversed(wrap_units(module)):  # modules() lists a block before the blocks inside it
        fully_shard(block, **options)
    fully_shard(module, **options)
    if several:
        _send_shards(module, weights, strategy)
    return module


def _send_shards(module: FSDPModule, weights: dict[str, torch.Tensor] | None, strategy: str) -> None:
    """Scatter the main process's `weights` (whole, by name; None in the other processes) into every process's shards
    of `module`, and broadcast its buffers, one tensor at a time, on the device of FSDP2's mesh. A module built on the
    meta device is given storage first: its shards on that device (the CPU under fsdp2-offload), its buffers on the
    device, as FSDP2 keeps them."""
    mesh = next(module.parameters()).device_mesh
    device = torch.device(mesh.device_type)  # NCCL, a GPU run's backend, takes CUDA tensors only
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        module.to_empty(device="cpu" if strategy == "fsdp2-offload" else device)
        for buffer in module.buffers():
            buffer.data = buffer.data.to(device)
    layout = [(name, tuple(t.shape), t.dtype) for name, t in
              itertools.chain(module.named_parameters(), module.named_buffers())]
    main_layout = [layout]
    dist.broadcast_object_list(main_layout, src=0)
    # the same model and dtypes, or the scatter below would mix them up; agreed, so that every process stops
    differs = next(((ours, main) for ours, main in itertools.zip_longest(layout, main_layout[0]) if ours != main), None)
    if _over_processes(mesh, torch.tensor(int(differs is not None)), dist.ReduceOp.MAX):
        whose = f"process {dist.get_rank()}'s" if differs else "another process's"
        raise RuntimeError(f"{whose} {unsharded_class(module).__name__} differs from the main process's"
                           + (f" (here {differs[0]}, there {differs[1]})" if differs else "")
                           + "; every process must build the same model")
    with torch.no_grad():
        for name, param in module.named_parameters():
            whole = (torch.empty(param.shape, dtype=param.dtype, device=device) if weights is None
                     else weights[name].to(device))
            part = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=0)  # scattered
            if weights is None:
                param.to_local().copy_(part.to_local())
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def wrap_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks the wrap policy shards as units of their own (`BLOCK_CLASSES`), outermost first; the rest of
    `module` is the root unit."""
    return [m for m in module.modules() if type(m).__name__ in BLOCK_CLASSES]


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed's settings for train.sharding=zero2, from the training config."""
    t = cfg.train
    return {"train_micro_batch_size_per_gpu": t.batch_size,
            # the loops mark each update's last backward themselves (gradient_sync) and scale their losses for it
            "gradient_accumulation_steps": 1,
            "gradient_clipping": t.max_grad_norm or 0.0,  # by the global norm; 0 = none
            "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
            # fp32 weights and gradients, the compute under the loops' autocast, as with the other strategies
            "bf16": {"enabled": False}, "fp16": {"enabled": False},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, as the other strategies train with
            "steps_per_print": 2 ** 31 - 1}


def deepspeed_accelerator(cfg: Config, **options):
    """An Accelerator whose prepare() gives the UNet and its optimiser to DeepSpeed's ZeRO-2 engine (`options`: the
    Accelerator's others)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, over gloo
    # accelerate starts DeepSpeed's communication when its process state is made with this set (a torchrun launch
    # selecting zero2 by the key alone has not); on CPUs it must be made with gloo named and without cpu=True, or
    # every process reads as process 0 of 1. Set for these calls only (accelerate sets it too): a later run in this
    # process must not read it as its launcher's choice. The accelerate config's DeepSpeed fields, checked already
    # (sharding_from_launcher), are not to be checked again against a DeepSpeed config of our own
    with _environ_set(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_CONFIG_DS_FIELDS=""):
        PartialState._reset_state()
        PartialState(backend="gloo" if cpu else None, timeout=timedelta(minutes=cfg.train.process_timeout))
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                  deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg)), **options)
    # accelerate leaves mixed precision to DeepSpeed's config, whose bf16 mode is off, so the loops' autocast does it;
    # but accelerate's autocast() names no dtype for a DeepSpeed run, and CUDA's default is fp16 (unscaled: fp16 is
    # refused under zero2). This one names the configured dtype
    if cfg.train.mixed_precision != "no":
        accelerator.autocast = partial(torch.autocast, accelerator.device.type,
                                       dtype=MIXED_PRECISION_DTYPES[cfg.train.mixed_precision])
    return accelerator


@contextmanager
def _environ_set(**values: str):
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def is_deepspeed(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "DeepSpeedEngine"


def gradient_sync(accelerator, module: torch.nn.Module, sync: bool):
    """A context for one micro-step: data-parallel gradients are reduced over processes only where `sync` (the last
    micro-step of an update), and accumulate locally before it. FSDP2 reduce-scatters every micro-step's gradients
    into the shards, where they accumulate: skipping it would keep every process's whole fp32 gradient until the
    last, which a model sharded to fit cannot hold. ZeRO-2 reduces each micro-step's gradients into their
    partitions as they come; the engine steps on the last (its clipping, and skipping a non-finite update)."""
    if is_deepspeed(module):
        return _deepspeed_boundary(accelerator, sync)
    if sync or is_sharded(module):
        return nullcontext()
    return accelerator.no_sync(module)


@contextmanager
def _deepspeed_boundary(accelerator, sync: bool):
    # accelerate's backward steps the engine where its sync flag is set, as its accumulate() sets it
    accelerator.gradient_state._set_sync_gradients(sync)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def clip_gradients(accelerator, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip by the global gradient norm, over all processes' shards when sharded; the norm before clipping."""
    if not any(isinstance(p, DTensor) for p in parameters):
        return float(accelerator.clip_grad_norm_(parameters, max_norm))
    grads = [p.grad for p in parameters if p.grad is not None]
    # the sum of squares of each process's shards (Shard(0): no entry on two processes), added over the processes
    squares = sum((g.to_local().float() ** 2).sum() for g in grads)
    total = float(_over_processes(grads[0].device_mesh, squares, dist.ReduceOp.SUM).sqrt())
    scale = max_norm / (total + 1e-6)  # as torch's clip_grads_with_norm_ (a non-finite norm: the step is skipped)
    if scale < 1:
        for grad in grads:
            grad.mul_(scale)  # each process's shard: no communication
    return total


def all_finite(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether every weight is finite; over all processes' shards when sharded (collective then)."""
    sharded = [p for p in parameters if isinstance(p, DTensor)]
    finite = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in parameters)
    if not sharded:
        return finite
    return bool(_over_processes(sharded[0].device_mesh, torch.tensor(int(finite)), dist.ReduceOp.MIN))


def _over_processes(mesh, value: torch.Tensor, op) -> torch.Tensor:
    """`value` reduced over the processes of `mesh`, on the mesh's device: NCCL, a GPU run's backend, takes no CPU
    tensor (fsdp2-offload's gradients are on the CPU, as is a flag made there)."""
    value = value.to(mesh.device_type)
    dist.all_reduce(value, op=op, group=mesh.get_group())
    return value


def model_state_bytes(modules: list[torch.nn.Module], optimizer, extra: list[torch.Tensor] = ()) -> int:
    """What this process holds of the model states: the weights of `modules` (the policy and a reference copy),
    a gradient for each trainable weight, the optimiser's states and `extra` (the EMA); of a sharded tensor, this
    process's shard.
    Under ZeRO-2, the gradients are its partition's, beside DeepSpeed's fp32 master copy of that partition."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    params = [p for module in modules for p in module.parameters()]
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    states += extra
    partitioned = zero_optimizer(optimizer)
    if partitioned is None:
        return sum(local(p) * (2 if p.requires_grad else 1) for p in params) + sum(local(v) for v in states)
    master = sum(local(m) for m in partitioned.single_partition_of_fp32_groups)
    return sum(local(p) for p in params) + 2 * master + sum(local(v) for v in states)


def zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimiser inside accelerate's wrapper; None for any other."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if hasattr(inner, "single_partition_of_fp32_groups") else None


def save_partition(path: Path, optimizer) -> None:
    """This process's part of a ZeRO-2 optimiser: its Adam moments and fp32 master weights, as plain tensors (not
    DeepSpeed's own checkpoint, which is pickled)."""
    partitioned = zero_optimizer(optimizer)
    save_torch({"adam": partitioned.optimizer.state_dict(),
                "master": list(partitioned.single_partition_of_fp32_groups)}, path)


def load_partition(path: Path, optimizer) -> None:
    partitioned = zero_optimizer(optimizer)
    saved = torch.load(path, weights_only=True)
    partitioned.optimizer.load_state_dict(saved["adam"])
    with torch.no_grad():
        for mine, master in zip(partitioned.single_partition_of_fp32_groups, saved["master"], strict=True):
            mine.copy_(master)


def unsharded_class(module: torch.nn.Module) -> type:
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gathered_policy(policy):
    """Collective: the policy with its UNet gathered whole into an ordinary module, on the main process (None on the
    others), to save the final model with the code that saves an unsharded one."""
    state = get_model_state_dict(policy.denoiser, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:  # only the main process receives the full state
        return None
    with torch.device("meta"):  # no weights of its own: the gathered ones are assigned, not copied in
        denoiser = unsharded_class(policy.denoiser).from_config(policy.denoiser.config)
        if policy.is_lora:
            denoiser.add_adapter(policy.lora_config)
    denoiser.load_state_dict(state, assign=True)
    trainable = _trainable_names(policy.denoiser)
    for name, parameter in denoiser.named_parameters():
        parameter.requires_grad_(name in trainable)
    whole = copy.copy(policy)
    whole.denoiser, whole.ref_denoiser = denoiser, None
    return whole


def _trainable_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _sharded_state(module: torch.nn.Module, optimizer, ema) -> dict:
    """The trainable weights, the optimiser and the EMA (if kept), as this process holds them (its shards)."""
    trainable = _trainable_names(module)
    weights = {k: v for k, v in get_model_state_dict(module).items() if k in trainable}
    state = {"model": weights, "optimizer": get_optimizer_state_dict(module, optimizer)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_sharded(folder: Path, module: torch.nn.Module, optimizer, ema=None) -> None:
    """Collective: every process writes its shards of the trainable weights, optimiser states and EMA into
    `folder`."""
    dcp.save(_sharded_state(module, optimizer, ema), checkpoint_id=folder)


def load_sharded(folder: Path, module: torch.nn.Module, optimizer, ema=None) -> None:
    """Collective: restore what `save_sharded` wrote, each process its own shards."""
    state = _sharded_state(module, optimizer, ema)
    _SafeReader(folder).read_metadata()  # an index refused fails here, on every process, by name
    dcp.load(state, storage_reader=_SafeReader(folder), planner=_SafePlanner())
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])


def load_sharded_weights(folder: Path, weights: dict[str, torch.Tensor], ema: bool = False) -> None:
    """In this one process, without a process group: fill `weights` (whole tensors, by name) with the trainable
    weights `save_sharded` wrote into `folder`, or with `ema` their EMA, each gathered from every process's shards."""
    part = "ema" if ema else "model"
    saved = {key.split(".", 1)[1] for key in _SafeReader(folder).read_metadata().state_dict_metadata
             if key.startswith(f"{part}.")}
    if saved - {"updates"} != set(weights):
        missing, unexpected = sorted(set(weights) - saved), sorted(saved - set(weights) - {"updates"})
        raise ValueError(f"{folder}: its {part} weights do not match this model and LoRA setup (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); export it with the base it was trained on")
    with warnings.catch_warnings():  # torch's warning that it assumes one process: it is told so
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({part: weights}, storage_reader=_SafeReader(folder), planner=_SafePlanner(), no_dist=True)


class _SafeReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader, whose index (`.metadata`, a pickle) may name only the classes of the
    checkpoint's own layout, torch's sizes, dtypes and layouts, and paths: anything else is refused, not run."""

    class _Unpickler(pickle.Unpickler):
        LAYOUT_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
        NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                 ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}

        def find_class(self, module: str, name: str):
            found = super().find_class(module, name) if module in ("torch", "pathlib", "torch.serialization",
                                                                   *self.LAYOUT_MODULES) else None
            layout = (module in self.LAYOUT_MODULES and isinstance(found, type) and found.__module__ == module)
            if layout or (module, name) in self.NAMES or isinstance(found, torch.dtype):
                return found
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's index")

    def read_metadata(self, *args, **kwargs):
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = self._Unpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise ValueError(f"{path}: not the index of a checkpoint written by diffusion-align ({err}); it is not "
                             "read further") from None
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """Reads an entry that is not a tensor (the optimiser's settings, numbers and names) as
    `torch.load(..., weights_only=True)` does, where torch.distributed.checkpoint's own planner unpickles anything."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
