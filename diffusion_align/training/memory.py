"""`diffusion-align plan`: the memory a training config needs on each process, before any weight is loaded.

Every model is built from its config on the meta device (no weights, no memory), so the parameter counts are exact
for the checkpoint. Per process, in bytes:

    weights      the trainable denoiser (UNet or transformer) in fp32 (full fine-tune), or a LoRA's frozen base in
                 the frozen dtype (fp32, or bf16 / fp16 with train.mixed_precision) plus its adapters in fp32; and
                 the denoiser's floating-point buffers in the same dtype (SD3's position table)
    gradients    4 per trainable parameter (fp32)
    optimizer    AdamW 8 (two fp32 moments), 8-bit AdamW 2, Adafactor 4 per entry of its factored second moment (a
                 row and a column vector per matrix; no first moment, beta1 unset)
    reference    a full fine-tune's frozen copy in the frozen dtype (dpo, smpo, dcpo, and online methods with a KL
                 term); none for LoRA (adapters off), reference-free methods, precomputed reference errors, or
                 model.ref_offload (kept on the CPU)
    encoders     VAE and text encoders in the frozen dtype (none with data.cache for the offline methods)
    activations  what autograd saves in one UNet forward of a micro-batch (the rows of train.batch_size pairs, or
                 online images) at train.resolution: counted exactly on the meta device with saved-tensor hooks, in
                 the compute dtype, without or with gradient checkpointing

With data.cache (offline methods) the run first makes its latent cache (`data/cache.py`), before any denoiser is
loaded, so the plan also gives that phase's peak, and a run must fit the larger of the two:
    cache build  the VAE (fp32 where its config says force_upcast, else data.cache_dtype) and text encoders (in
                 data.cache_dtype) with what is alive at once while the VAE encodes data.cache_batch_size images at
                 train.resolution, or the encoders read 4 x data.cache_batch_size texts, whichever is more: counted
                 at 1 and at data.cache_batch_size images (4 and 4 x as many texts) on the meta device, following
                 each op's outputs until they are freed, a smaller batch on the chord between (the main process
                 only; a finished cache needs no build)

Sharding (`--strategy`, as train.sharding selects it, with AdamW, the one optimiser sharded training runs): fsdp2
divides the UNet's weights, gradients and optimizer states, and a full fine-tune's reference, by the number of
processes; fsdp2-offload keeps all three on the CPU; zero2 divides the gradients and optimizer states only, the
latter with DeepSpeed's fp32 master copy of the weights (4 bytes a trained weight). The encoders are replicated in
every case.
Not counted: the CUDA context and allocator slack (RESERVE_GB is kept free), a reward model or judge of the online
methods, and transient buffers (an FSDP all-gather of one block, the reference forward's outputs).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config import Config
from .methods import METHODS, ONLINE_METHODS

STRATEGIES = ("ddp", "fsdp2", "fsdp2-offload", "zero2")
RESERVE_GB = 1.5  # the CUDA context and allocator fragmentation, kept out of the budget
GIB = 1024 ** 3
_BYTES = {"no": 4, "bf16": 2, "fp16": 2}


@dataclasses.dataclass
class ModelCounts:
    """Parameter counts of a pipeline, from its configs alone."""
    family: str  # the family's name
    denoiser: int
    lora: int            # adapter parameters at the config's rank and target modules (0 for a full fine-tune)
    adafactor_state: int  # Adafactor's factored second moment for the trainable parameters
    vae: int
    text_encoders: int
    activation_bytes: dict  # {"plain": bytes, "checkpointed": bytes} of one micro-batch forward, in fp32
    denoiser_buffers: int = 0  # floating-point buffers held beside the weights (SD3's position table: 226M at 384)
    # making the latent cache (data.cache, offline methods): the peak bytes alive (fp32) in a VAE call of 1 and of
    # `cache_batch` (data.cache_batch_size) images at train.resolution, and in a text call of 4 and of 4 x as many
    cache_batch: int = 1
    vae_encode_bytes: tuple[int, int] = (0, 0)
    text_encode_bytes: tuple[int, int] = (0, 0)
    vae_upcast: bool = False   # the VAE's config says force_upcast: the cache is encoded in fp32


def count_models(cfg: Config) -> ModelCounts:
    """Build the config's UNet (with its LoRA), VAE and text encoders on the meta device and count them; run one
    meta forward of a micro-batch to count the activations autograd keeps."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from ..models.loading import load_tokenizer, pipeline_index
    from ..models.policy import lora_config
    from .run import model_family
    m = cfg.model
    index = pipeline_index(m.pretrained, m.revision)
    family, denoiser_config = model_family(cfg)  # T5's states at model.max_sequence_length tokens
    with init_empty_weights(include_buffers=True):  # SD3's position table is a buffer of up to 0.9 GB
        denoiser = family.denoiser_cls.from_config(denoiser_config)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(m.vae) if m.vae else AutoencoderKL.load_config(
            m.pretrained, subfolder="vae", revision=m.revision))
        encoders = []
        for name in family.text_encoders:
            config = transformers.AutoConfig.from_pretrained(m.pretrained, subfolder=name, revision=m.revision)
            encoders.append(getattr(transformers, index[name][1])(config))
    denoiser_params = _numel(denoiser)
    denoiser.requires_grad_(m.lora_rank is None)  # a LoRA's base is frozen, so only what the adapters need is saved
    if m.lora_rank is not None:
        denoiser.add_adapter(lora_config(m.lora_rank, m.lora_alpha, m.lora_target_modules or family.lora_targets))
    trainable = [p for n, p in denoiser.named_parameters() if m.lora_rank is None or "lora_" in n]
    rows = _rows(cfg)
    latent = cfg.train.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    activations = {"plain": _saved_bytes(denoiser, family, denoiser_config, rows, latent, False),
                   "checkpointed": _saved_bytes(denoiser, family, denoiser_config, rows, latent, True)}
    buffers = sum(b.numel() for b in denoiser.buffers() if b.is_floating_point())
    batch, vae_calls, text_calls = cfg.data.cache_batch_size, (0, 0), (0, 0)
    if cfg.method.name not in ONLINE_METHODS:  # with the cache, or to weigh making one (`_CHANGES`)
        tokenizers = [load_tokenizer(m.pretrained, index, name, m.revision) for name in family.text_encoders]
        for module in (vae, *encoders):  # frozen, as loaded for a run: no dropout masks
            module.eval()
        size = (vae.config.in_channels, cfg.train.resolution, cfg.train.resolution)
        # the pixels are made inside the call, so counted: the cache copies each batch to the device
        vae_calls = tuple(_peak_bytes(lambda: vae.encode(torch.zeros(n, *size, device="meta")).latent_dist)
                          for n in (1, batch))
        text_calls = tuple(_peak_bytes(lambda: family.encode_texts(tokenizers, encoders, [""] * 4 * n))
                           for n in (1, batch))
    return ModelCounts(family.name, denoiser_params, 0 if m.lora_rank is None else sum(p.numel() for p in trainable),
                       sum(_adafactor_state(p) for p in trainable), _numel(vae),
                       sum(_numel(e) for e in encoders), activations, buffers, batch, vae_calls, text_calls,
                       bool(vae.config.get("force_upcast", False)))


def _adafactor_state(p: torch.Tensor) -> int:
    """transformers' Adafactor (beta1 unset): a matrix's second moment factored into a row and a column vector over
    its last two dimensions (p.shape[:-1] and p.shape[:-2] + p.shape[-1:]), a vector's kept whole."""
    return p.numel() // p.shape[-1] + p.numel() // p.shape[-2] if p.ndim >= 2 else p.numel()


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rows(cfg: Config) -> int:
    """UNet rows of one micro-batch: pairs x rows per pair offline, images online."""
    if cfg.method.name in ONLINE_METHODS:
        return cfg.train.batch_size
    return cfg.train.batch_size * METHODS[cfg.method.name].rows_per_pair


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, memory-efficient, CPU flash) keeps for its backward: q, k, v, the output
    and one fp32 log-sum-exp per query, never the tokens x tokens matrix the meta device's fallback would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("shapes only: the memory plan never runs a backward")


def _fused_attention(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


class _LiveBytes(TorchDispatchMode):
    """Follows the tensors ops make: `peak` is the most bytes alive at once, each storage counted from the op that
    made it until the last tensor on it is freed, as a CUDA allocator's allocated bytes rise and fall. Storages made
    outside (inputs, parameters, and views of them, such as a linear layer's transposed weight) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list[int]] = {}  # storage -> [tensors on it alive, its bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            if key not in self.storages:
                if key in inputs:  # a view of something made outside
                    continue
                self.storages[key] = [0, tensor.untyped_storage().nbytes()]
                self.live += self.storages[key][1]
                self.peak = max(self.peak, self.live)
            self.storages[key][0] += 1
            weakref.finalize(tensor, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        entry = self.storages[key]
        entry[0] -= 1
        if not entry[0]:
            self.live -= entry[1]
            del self.storages[key]


def _peak_bytes(forward) -> int:
    """The peak bytes alive while `forward()` runs without gradients (`_LiveBytes`), with a fused attention's
    output in place of the meta device's fallback, which would make the tokens x tokens matrix."""
    from unittest import mock
    with (torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention),
          _LiveBytes() as live):
        forward()
    return live.peak


def _saved_bytes(denoiser, family, denoiser_config: dict, rows: int, latent: int, checkpointed: bool) -> int:
    """Bytes of the tensors autograd saves for the backward of one forward of the denoiser as its family calls it
    (parameters excluded, each storage once), on meta tensors."""
    from ..models.families import TextStates
    from unittest import mock
    params = {p.untyped_storage()._cdata for p in denoiser.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage._cdata not in params and storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
        return tensor

    denoiser.train()
    if checkpointed:
        denoiser.enable_gradient_checkpointing()
    channels, tokens, width, pooled = family.input_shapes(denoiser_config)
    sample = torch.zeros(rows, channels, latent, latent, device="meta")
    texts = TextStates(torch.zeros(rows, tokens, width, device="meta"),
                       None if pooled is None else torch.zeros(rows, pooled, device="meta"))
    sizes = torch.zeros(rows, 2, dtype=torch.long)  # SDXL's size ids: their values do not change the shapes
    cond = family.conditioning(texts, sizes, sizes, latent, family.training_guidance(denoiser_config))
    timesteps = torch.zeros(rows, device="meta", dtype=torch.long if family.denoiser == "unet" else torch.float32)
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention)):
        cond.denoise(denoiser, sample, timesteps)
    if checkpointed:
        denoiser.disable_gradient_checkpointing()
    return total


@dataclasses.dataclass
class MemoryPlan:
    strategy: str
    processes: int
    gpu_memory_gb: float | None
    per_process_bytes: dict      # weights, gradients, optimizer, reference, encoders, activations, total
    fits: bool | None            # None without --gpu-memory
    change: str | None           # the cheapest single change that fits, when it does not
    fsdp2_processes: int | None  # when it does not fit: the fewest processes that fit with fsdp2 (None: none <= 64)
    counts: ModelCounts
    gradient_checkpointing: bool

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "processes": self.processes, "gpu_memory_gb": self.gpu_memory_gb,
                "per_process_bytes": self.per_process_bytes, "fits": self.fits, "change": self.change,
                "fsdp2_processes": self.fsdp2_processes,
                "gradient_checkpointing": self.gradient_checkpointing, "counts": dataclasses.asdict(self.counts)}


def memory_bytes(cfg: Config, counts: ModelCounts, processes: int = 1, strategy: str = "ddp") -> dict:
    """Bytes per process of each part of a run of `cfg` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    frozen = _BYTES[cfg.train.mixed_precision]
    full = cfg.model.lora_rank is None
    trainable = counts.denoiser if full else counts.lora
    weights = counts.denoiser * 4 if full else counts.denoiser * frozen + counts.lora * 4
    optimizer_name = "adamw" if strategy != "ddp" else cfg.train.optimizer  # sharding trains AdamW only
    optimizer = {"adamw": 8 * trainable, "adamw8bit": 2 * trainable,
                 "adafactor": 4 * counts.adafactor_state}[optimizer_name]
    if strategy == "zero2":  # DeepSpeed's fp32 master copy of the trained weights, partitioned with the moments
        optimizer += 4 * trainable
    online = cfg.method.name in ONLINE_METHODS
    needs_reference = cfg.online.kl_beta > 0 if online else METHODS[cfg.method.name].needs_reference
    reference = counts.denoiser * frozen if (full and needs_reference and not cfg.method.precomputed_reference
                                         and not cfg.model.ref_offload) else 0
    encoders = 0 if (cfg.data.cache and not online) else (counts.vae + counts.text_encoders) * frozen
    saved = counts.activation_bytes["checkpointed" if cfg.model.gradient_checkpointing else "plain"]
    activations = saved * frozen // 4  # counted in fp32; autocast keeps them in the compute dtype
    sharded = {"ddp": 1, "fsdp2": processes, "fsdp2-offload": None, "zero2": 1}[strategy]
    if sharded is None:  # offloaded to the CPU: only the reference and what is replicated stay
        weights = gradients = optimizer = 0
        reference //= processes
    else:
        gradients = trainable * 4 // (processes if strategy in ("fsdp2", "zero2") else 1)
        optimizer //= processes if strategy in ("fsdp2", "zero2") else 1
        weights //= sharded
        reference //= sharded
    # the denoiser's buffers sit beside its weights (and the reference copy's) on every process, whole: sharding
    # and offloading move parameters only
    weights += counts.denoiser_buffers * (4 if full else frozen)
    reference += counts.denoiser_buffers * frozen if reference else 0
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "reference": reference,
             "encoders": encoders, "activations": activations}
    return {**parts, "total": sum(parts.values()), "cache_build": cache_build_bytes(cfg, counts)}


def cache_build_bytes(cfg: Config, counts: ModelCounts) -> int:
    """The peak of making the latent cache (module docstring); 0 when the run makes none."""
    from ..data.cache import CACHE_DTYPES
    if not cfg.data.cache or cfg.method.name in ONLINE_METHODS:
        return 0
    texts = CACHE_DTYPES[cfg.data.cache_dtype].itemsize  # what the cache's encoders run in on a GPU
    images = 4 if counts.vae_upcast else texts
    batch = cfg.data.cache_batch_size  # images a VAE call; the text encoders read 4 x as many texts a call
    working = max(_call_bytes(counts.vae_encode_bytes, batch, counts.cache_batch) * images,
                  _call_bytes(counts.text_encode_bytes, batch, counts.cache_batch) * texts) // 4
    return counts.vae * images + counts.text_encoders * texts + working


def _call_bytes(ends: tuple[int, int], batch: int, counted: int) -> int:
    """A call's peak at `batch` from those counted at 1 and at `counted`: exact at both, the chord between. A peak
    grows convexly with the batch (the largest of sums that each grow linearly), so the chord is never under it."""
    if not 1 <= batch <= counted:
        raise ValueError(f"data.cache_batch_size={batch}: the cache's memory was counted for 1 to {counted}")
    first, last = ends
    return first if counted == 1 else first - (-(batch - 1) * (last - first) // (counted - 1))


def needed_bytes(usage: dict) -> int:
    """What the run needs on its busiest process: the larger of training and making the cache."""
    return max(usage["total"], usage["cache_build"])


# single changes, cheapest first: those that leave the trained model as it is, then those that change the math.
# (what to tell the user, the override or strategy, when it applies)
_CHANGES = [
    ("model.gradient_checkpointing=true", "model.gradient_checkpointing=true",
     lambda c: not c.model.gradient_checkpointing),
    ("method.precomputed_reference=true", "method.precomputed_reference=true",
     lambda c: c.model.lora_rank is None and c.method.name in ("dpo", "dcpo") and not c.method.precomputed_reference),
    ("data.cache=true", "data.cache=true", lambda c: not c.data.cache and c.method.name not in ONLINE_METHODS),
    ("model.ref_offload=true", "model.ref_offload=true",
     lambda c: c.model.lora_rank is None and not c.model.ref_offload),
    ("train.sharding=fsdp2", "fsdp2", lambda c: True),  # over the processes planned for, when there are several
    ("train.sharding=fsdp2-offload", "fsdp2-offload", lambda c: True),
    ("train.optimizer=adamw8bit", "train.optimizer=adamw8bit", lambda c: c.train.optimizer == "adamw"),
    ("model.lora_rank=8 (a LoRA instead of a full fine-tune)", "model.lora_rank=8",
     lambda c: c.model.lora_rank is None),
]


def _cache_batch_change(cfg: Config, counts: ModelCounts, usage: dict, budget: float) -> list:
    """When training fits and making the cache does not: the largest data.cache_batch_size that fits, as a change
    (it leaves the cache and the trained model as they are), or none."""
    if usage["total"] > budget or usage["cache_build"] <= budget:
        return []
    for batch in range(cfg.data.cache_batch_size - 1, 0, -1):
        if cache_build_bytes(_changed(cfg, f"data.cache_batch_size={batch}"), counts) <= budget:
            override = f"data.cache_batch_size={batch}"
            return [(override, override, lambda c: True)]
    return []


def _changed(cfg: Config, override: str) -> Config:
    from ..config import parse_override
    key, value = parse_override(override)
    section, name = key.split(".")
    changed = copy.deepcopy(cfg)
    setattr(getattr(changed, section), name, value)
    return changed


def plan(cfg: Config, processes: int = 1, gpu_memory_gb: float | None = None, strategy: str = "ddp",
         counts: ModelCounts | None = None) -> MemoryPlan:
    """The per-process memory of `cfg` on `processes` processes with `strategy`; with `gpu_memory_gb`, whether it
    fits (RESERVE_GB kept free) and, if not, the first of `_CHANGES` that makes it fit on its own and the fewest
    processes it fits on with fsdp2."""
    counts = counts or count_models(cfg)
    usage = memory_bytes(cfg, counts, processes, strategy)
    fits = change = fsdp2_processes = None
    if gpu_memory_gb is not None:
        budget = (gpu_memory_gb - RESERVE_GB) * GIB
        fits = needed_bytes(usage) <= budget
        for label, how, applies in [] if fits else [*_cache_batch_change(cfg, counts, usage, budget), *_CHANGES]:
            if not applies(cfg) or how == strategy or (how == "fsdp2" and processes == 1):
                continue
            if how in STRATEGIES:
                total = needed_bytes(memory_bytes(cfg, counts, processes, how))
            else:
                changed = _changed(cfg, how)
                changed_counts = count_models(changed) if how.startswith("model.lora_rank") else counts
                total = needed_bytes(memory_bytes(changed, changed_counts, processes, strategy))
            if total <= budget:
                change = label if how not in STRATEGIES or cfg.train.optimizer == "adamw" else (
                    f"{label} train.optimizer=adamw (sharding trains AdamW only)")
                break
        fsdp2_processes = None if fits else next(
            (n for n in range(1, 65) if needed_bytes(memory_bytes(cfg, counts, n, "fsdp2")) <= budget), None)
    return MemoryPlan(strategy, processes, gpu_memory_gb, usage, fits, change, fsdp2_processes, counts,
                      cfg.model.gradient_checkpointing)


def format_plan(p: MemoryPlan) -> str:
    """The plan as a reader wants it: one line per part in GiB, then the verdict."""
    from ..models.families import get_family
    c = p.counts
    denoiser = get_family(c.family).denoiser  # unet or transformer
    trainable = f"LoRA {c.lora / 1e6:.2f}M of {c.denoiser / 1e6:.0f}M" if c.lora else f"all {c.denoiser / 1e6:.0f}M"
    lines = [f"{c.family} {denoiser}, {trainable} {denoiser} parameters trained; {p.strategy} on {p.processes} "
             f"process(es); gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}. Per process:"]
    for part, value in p.per_process_bytes.items():
        if part != "cache_build":
            lines.append(f"  {part:<12} {_size(value):>10}")
    if p.per_process_bytes["cache_build"]:
        lines.append(f"  {'cache build':<12} {_size(p.per_process_bytes['cache_build']):>10}  (before training, on the "
                     "main process, while data.cache is made; a finished cache needs none)")
    if p.fits is not None:
        verdict = "fits" if p.fits else "does not fit"
        lines.append(f"{verdict} in {p.gpu_memory_gb:g} GB ({RESERVE_GB} GB kept for the CUDA context)")
        if not p.fits:
            lines.append(f"cheapest single change that fits: {p.change}" if p.change else
                         "no single change fits: combine them")
            lines.append(f"with train.sharding=fsdp2 it fits on {p.fsdp2_processes} processes" if p.fsdp2_processes
                         else "fsdp2 alone does not make it fit: the activations, the encoders and the cache's build "
                         "are not sharded")
    if p.strategy != "ddp":
        accelerate_config = "deepspeed-zero2" if p.strategy == "zero2" else p.strategy
        lines.append(f"train with train.sharding={p.strategy} (AdamW only, as planned): torchrun --nproc_per_node "
                     f"{p.processes} -m diffusion_align train CONFIG train.sharding={p.strategy}, or accelerate "
                     f"launch --config_file configs/accelerate/{accelerate_config}.yaml -m diffusion_align train "
                     "CONFIG")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024 ** 2:.2f} MiB"


def plan_json(p: MemoryPlan) -> str:
    return json.dumps(p.as_dict(), indent=2)
