"""`diffusion-align plan`: the memory a training config needs on each process, before any weight is loaded.

Every model is built from its config on the meta device (no weights, no memory), so the parameter counts are exact
for the checkpoint. Per process, in bytes:

    weights      the trainable denoiser (UNet or transformer) in fp32 (full fine-tune), or a LoRA's frozen base in
                 the frozen dtype (fp32, or bf16 / fp16 with train.mixed_precision) plus its adapters in fp32; and
                 the denoiser's floating-point buffers in the same dtype (SD3's position table)
    gradients    4 per trainable parameter (fp32)
    optimizer    AdamW 8 (two fp32 moments), 8-bit AdamW 2, Adafactor 4 per entry of its factored second moment (a
                 row and a column vector per matrix; no first moment, beta1 unset)
    ema          with train.ema_decay, the EMA of the trained weights: 4 per trainable parameter (fp32)
    reference    a full fine-tune's frozen copy in the frozen dtype (dpo, smpo, dcpo, and online methods with a KL
                 term); none for LoRA (adapters off), reference-free methods, precomputed reference errors, or
                 model.ref_offload (kept on the CPU)
    encoders     VAE (fp32 where its config says force_upcast, as the run keeps it) and text encoders in the frozen
                 dtype (none with data.cache for the offline methods)
    rewards      the online methods' scorers (online.reward and online.track) in online.reward_dtype and judge
                 (online.judge) in the frozen dtype, built from their configs (`Scorer.models_on_meta`,
                 `VLMJudge.model_on_meta`)
    activations  the most alive at once while the denoiser makes one training forward of a micro-batch (the rows of
                 train.batch_size pairs, or online images, twice under classifier-free guidance) at train.resolution
                 and then, when the plan keeps a reference, the reference's forward without gradients: followed op by
                 op on fake CUDA tensors under CUDA autocast's rules in train.mixed_precision (norms and softmax in
                 fp32, a full fine-tune's fp32 weights cast and held for the backward), without or with gradient
                 checkpointing, and with it the larger of that and its backward's peak, where each checkpointed
                 block's forward runs again with gradients beside what the forward kept and the gradients made so
                 far (`_Recomputes`); under fsdp2, with each unit's weights gathered as FSDP2 gathers them
                 (`_FsdpGathers`), in the compute dtype, so that a full fine-tune casts none, and the larger of that
                 and its backward's peak: each unit gathered again with the next one prefetched, any checkpointed
                 block in it recomputed, its gradients whole beside their reduce-scatter input and the previous
                 unit's, the sharded gradients made so far
    optimizer_step  the temporaries of the optimiser's step: AdamW (foreach, as torch runs it on CUDA) one fp32 copy
                 of what it trains (sqrt(v) + eps); Adafactor (a loop over the matrices) the most alive at once of a
                 few temporaries of one matrix's size, followed through its real step on fake CUDA tensors; none for
                 8-bit AdamW or an offloaded optimiser
    encode       a run without the latent cache (offline methods): the most alive in a VAE call on the step's images
                 (data.vae_encode_batch_size of them, or all) or a text call on its texts, counted as for the
                 cache's build below

The total is what the busiest moment of a step needs: the states (weights, optimizer, ema, reference, encoders,
rewards) and the largest of the forward's activations, the optimiser's step (the gradients and its temporaries) and
the encoders' calls. Gradients are freed after each step (zero_grad), so they sit beside the forward and the encoders
only where a step sums several backward passes (train.grad_accum > 1; online, every update: its micro-batches times
its trained steps), or under DDP on several processes (views of its all-reduce buckets, which stay). The
backward frees each layer's saved tensors as it makes that layer's gradients, and is counted as no higher than the
forward's peak or the step's, except where it makes more than it frees: a checkpointed block's recompute, and under
fsdp2 the units gathered again (above). Against an H200's peaks (benchmarks/README.md) this is within 3% under,
which RESERVE_GB covers.

With data.cache (offline methods) the run first makes its latent cache (`data/cache.py`), before any denoiser is
loaded, so the plan also gives that phase's peak, and a run must fit the larger of the two:
    cache build  the VAE (fp32 where its config says force_upcast, else data.cache_dtype) and text encoders (in
                 data.cache_dtype) with what is alive at once while the VAE encodes data.cache_batch_size images at
                 train.resolution, or the encoders read 4 x data.cache_batch_size texts, whichever is more: counted
                 at 1 and at data.cache_batch_size images (4 and 4 x as many texts) on the meta device, following
                 each op's outputs until they are freed, a smaller batch on the chord between (the main process
                 only; a finished cache needs no build)

Sharding (`--strategy`, as train.sharding selects it, with AdamW, the one optimiser sharded training runs): fsdp2
divides the UNet's weights, gradients and optimizer states (and its step's temporaries, and the EMA), and a full
fine-tune's reference, by the number of processes (its gradients reduce-scattered every micro-step, so they stay
sharded while they add up); fsdp2-offload keeps all three (and the EMA, and the reference) on the CPU, where the
step runs; zero2 divides the gradients and optimizer states only, the latter with DeepSpeed's fp32 master copy of the
weights (4 bytes a trained weight). The encoders are replicated in every case.
Not counted: the CUDA context, kernels' workspaces and allocator slack (RESERVE_GB is kept free), the online rewards'
calls and the aesthetic scorer's head (under a million parameters), and the backward's gradients of the activations
(a layer's at a time).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import typing
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config import Config
from ..devices import MIXED_PRECISION_DTYPES, reward_dtype
from ..models.families import Family
from .methods import METHODS, ONLINE_METHODS
from .sharding import sharding_conflicts, wrap_units

STRATEGIES = ("ddp", "fsdp2", "fsdp2-offload", "zero2")
RESERVE_GB = 1.5  # the CUDA context and allocator fragmentation, kept out of the budget
GIB = 1024 ** 3


@dataclasses.dataclass
class ModelCounts:
    """Parameter counts of a pipeline, from its configs alone."""
    family: str  # the family's name
    denoiser: int
    lora: int            # adapter parameters at the config's rank and target modules (0 for a full fine-tune)
    adafactor_state: int  # Adafactor's factored second moment for the trainable parameters
    adafactor_step: int   # the most bytes alive at once in its step beyond the parameters, gradients and states
    vae: int
    text_encoders: int
    # {"plain": bytes, "checkpointed": bytes}: the most alive at once in a micro-batch's training forward and its
    # reference forward, in train.mixed_precision; and the same sharded by fsdp2, its units' weights gathered
    activation_bytes: dict
    sharded_activation_bytes: dict
    denoiser_buffers: int = 0  # floating-point buffers held beside the weights (SD3's position table: 226M at 384)
    # the encoders' calls (offline methods): the peak bytes alive (fp32) in a VAE call of 1 and of `cache_batch`
    # images at train.resolution (data.cache_batch_size, or a step's rows if more), and in a text call of 4 and of
    # 4 x as many texts; for making the latent cache, or for each step of a run without it
    cache_batch: int = 1
    vae_encode_bytes: tuple[int, int] = (0, 0)
    text_encode_bytes: tuple[int, int] = (0, 0)
    vae_upcast: bool = False   # the VAE's config says force_upcast: the cache is encoded in fp32
    rewards: int = 0           # the online methods' scorers (online.reward, online.track)
    judge: int = 0             # and judge (online.judge)
    text_fp32: int = 0         # of text_encoders, those kept in fp32 in fp16 (`loading.fp32_kept_modules`: T5's wo)
    # {"plain": [(bytes, entries), ...], "checkpointed": ...}: the moments of the backward of that forward that can
    # peak above it, the bytes alive beyond the states and the gradients, which have `entries` entries by then:
    # unsharded, each checkpointed block's recompute (`_Recomputes`); under fsdp2, its units gathered again, its
    # reduce-scatters, and the recomputes (`_FsdpGathers`)
    backward: dict = dataclasses.field(default_factory=dict)
    sharded_backward: dict = dataclasses.field(default_factory=dict)


class MetaPipeline(typing.NamedTuple):
    """A config's models built from their configs alone on the meta device: no weights, no memory."""
    family: Family
    denoiser_config: dict
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    index: dict  # the pipeline's model_index.json


def pipeline_on_meta(cfg: Config) -> MetaPipeline:
    """The config's denoiser (no LoRA yet), VAE (model.vae, else the pipeline's) and text encoders on the meta
    device, their buffers too (SD3's position table is one of up to 0.9 GB)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from ..models.loading import pipeline_index, text_encoder_class
    from .run import model_family
    m = cfg.model
    index = pipeline_index(m.pretrained, m.revision)
    family, denoiser_config = model_family(cfg)  # T5's states at model.max_sequence_length tokens
    with init_empty_weights(include_buffers=True):
        denoiser = family.denoiser_cls.from_config(denoiser_config)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(m.vae) if m.vae else AutoencoderKL.load_config(
            m.pretrained, subfolder="vae", revision=m.revision))
        encoders = []
        for name in family.text_encoders:
            encoder_cls = text_encoder_class(m.pretrained, index, name, family)
            config = transformers.AutoConfig.from_pretrained(m.pretrained, subfolder=name, revision=m.revision)
            encoders.append(encoder_cls(config))
    return MetaPipeline(family, denoiser_config, denoiser, vae, encoders, index)


def count_models(cfg: Config) -> ModelCounts:
    """Build the config's models on the meta device (`pipeline_on_meta`), the denoiser with its LoRA, and count
    them; follow one training forward of a micro-batch on fake CUDA tensors to count its activations, and the
    encoders' calls."""
    from accelerate import init_empty_weights

    from ..models.loading import fp32_kept_modules, load_tokenizer, vae_downsampling
    from ..models.policy import lora_config
    from .online import rows_per_image
    m = cfg.model
    family, denoiser_config, denoiser, vae, encoders, index = pipeline_on_meta(cfg)
    denoiser_params = _numel(denoiser)
    denoiser.requires_grad_(m.lora_rank is None)  # a LoRA's base is frozen, so only what the adapters need is saved
    if m.lora_rank is not None:
        denoiser.add_adapter(lora_config(m.lora_rank, m.lora_alpha, m.lora_target_modules or family.lora_targets))
    trainable = [p for n, p in denoiser.named_parameters() if m.lora_rank is None or "lora_" in n]
    online = cfg.method.name in ONLINE_METHODS
    rows = _rows(cfg) * (rows_per_image(cfg.online, family) if online else 1)  # online CFG: both halves in one call
    latent = cfg.train.resolution // vae_downsampling(vae.config)
    mixed = cfg.train.mixed_precision
    compute = None if mixed == "no" else MIXED_PRECISION_DTYPES[mixed]  # autocast's
    reference, frozen_copy, fake = None, None, FakeTensorMode()
    if _needs_reference(cfg) and not (cfg.method.precomputed_reference and not online):
        if m.lora_rank is not None:
            reference = lambda: _adapters_off(denoiser)  # noqa: E731
        else:  # the frozen copy, in the frozen dtype
            with init_empty_weights(include_buffers=True):
                frozen_copy = family.denoiser_cls.from_config(denoiser_config).requires_grad_(False)
            _on_fake_cuda(frozen_copy, fake, compute)
            reference = lambda: contextlib.nullcontext(frozen_copy)  # noqa: E731
    _on_fake_cuda(denoiser, fake, compute, frozen_only=True)  # a LoRA's base in the frozen dtype

    def activations_of(trained, *gathering) -> dict:
        return {name: _forward_bytes(trained, reference, family, denoiser_config, rows, latent, checkpointed, compute,
                                     fake, *gathering)
                for name, checkpointed in (("plain", False), ("checkpointed", True))}
    unsharded_passes = activations_of(denoiser)
    # fsdp2 gathers each unit's weights in the compute dtype (`sharding.shard`), so a full fine-tune casts none
    sharded = denoiser
    if m.lora_rank is None and compute is not None:
        with init_empty_weights(include_buffers=True):
            sharded = _on_fake_cuda(family.denoiser_cls.from_config(denoiser_config), fake, compute)
    sharded_passes = activations_of(sharded, (sharded, *([frozen_copy] if frozen_copy is not None else [])),
                                    4 if compute is None else compute.itemsize)
    buffers = sum(b.numel() for b in denoiser.buffers() if b.is_floating_point())
    adafactor_step = (_adafactor_step_bytes(cfg, [p for p in denoiser.parameters() if p.requires_grad], fake)
                      if cfg.train.optimizer == "adafactor" else 0)
    # the encoders' calls: making the cache (data.cache_batch_size images a call), or in each step of a plain run
    batch, vae_calls, text_calls = max(cfg.data.cache_batch_size, rows), (0, 0), (0, 0)
    rewards, judge = _reward_params(cfg) if online else (0, 0)
    if not online:  # with the cache, or to weigh making one (`_CHANGES`)
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
                       sum(_adafactor_state(p) for p in trainable), adafactor_step, _numel(vae),
                       sum(_numel(e) for e in encoders),
                       {name: peak for name, (peak, _) in unsharded_passes.items()},
                       {name: peak for name, (peak, _) in sharded_passes.items()}, buffers, batch, vae_calls,
                       text_calls, bool(vae.config.get("force_upcast", False)), rewards, judge,
                       sum(_numel(m) for e in encoders for m in fp32_kept_modules(e)),
                       {name: _frontier(backward) for name, (_, backward) in unsharded_passes.items()},
                       {name: _frontier(backward) for name, (_, backward) in sharded_passes.items()})


def _adafactor_state(p: torch.Tensor) -> int:
    """transformers' Adafactor (beta1 unset): a matrix's second moment factored into a row and a column vector over
    its last two dimensions (p.shape[:-1] and p.shape[:-2] + p.shape[-1:]), a vector's kept whole."""
    return p.numel() // p.shape[-1] + p.numel() // p.shape[-2] if p.ndim >= 2 else p.numel()


def _reward_params(cfg: Config) -> tuple[int, int]:
    """Parameters of what an online run loads to reward and watch its samples, from their configs alone: of its
    scorers (online.reward, online.track), and of its judge (online.judge)."""
    from ..rewards import SCORERS, VLMJudge, parse_scorer_spec
    o = cfg.online
    scorers = [model for name, path in map(parse_scorer_spec, (o.reward, *o.track))
               for model in SCORERS[name].models_on_meta(name, path)]
    judge = _numel(VLMJudge.model_on_meta(o.judge)) if o.judge is not None else 0
    return sum(_numel(model) for model in scorers), judge


def _adafactor_step_bytes(cfg: Config, trainable: list[torch.nn.Parameter], mode: FakeTensorMode) -> int:
    """The most bytes alive at once while the run's Adafactor (`make_optimizer`) steps the fake CUDA `trainable`
    with their states made: its loop over them makes temporaries of each one's size (grad ** 2, the factored
    estimate, -update), and the last one's live on into the next one's."""
    from .run import make_optimizer
    optimizer = make_optimizer(cfg, trainable, cfg.train.lr)
    try:
        with mode:
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()  # makes the states, which `optimizer` counts
            with _LiveBytes() as live:
                optimizer.step()
    finally:
        for p in trainable:
            p.grad = None
    return live.peak


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _frontier(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The points (bytes, gradient entries) that can be the most for some number of processes the gradients are
    divided over: those no other point matches in both."""
    points = sorted(set(points), key=lambda p: (-p[1], -p[0]))
    kept = []
    for nbytes, entries in points:  # from the most entries down, each with more bytes than every one kept
        if not kept or nbytes > kept[-1][0]:
            kept.append((nbytes, entries))
    return kept


def _needs_reference(cfg: Config) -> bool:
    """Whether the method compares with a reference denoiser: offline by its objective, online by its KL term."""
    if cfg.method.name in ONLINE_METHODS:
        return cfg.online.kl_beta > 0
    return METHODS[cfg.method.name].needs_reference


def _vae_call_images(cfg: Config) -> int:
    """Images a step's VAE call encodes: data.vae_encode_batch_size of the step's rows, or all of them."""
    return min(_rows(cfg), cfg.data.vae_encode_batch_size or _rows(cfg))


def _backwards_per_update(cfg: Config) -> int:
    """Backward passes whose gradients add up before an optimiser step: train.grad_accum offline; online, each
    micro-batch's trained steps (`online.backwards_per_update`)."""
    if cfg.method.name not in ONLINE_METHODS:
        return cfg.train.grad_accum
    from .online import backwards_per_update
    return backwards_per_update(cfg.online, cfg.train.batch_size)[1]


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

    def add(self, nbytes: int) -> None:
        """Bytes made (or freed, negative) outside the ops: FSDP's gathered weights (`_FsdpGathers`)."""
        self.live += nbytes
        self.peak = max(self.peak, self.live)

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


@contextlib.contextmanager
def _cuda_autocast(dtype: torch.dtype | None):
    """CUDA autocast's rules (matmuls and convolutions in `dtype`, norms and softmax in fp32, fp32 weights cast and
    cached) for fake CUDA tensors on a machine without a GPU, where `torch.autocast` refuses to start; None: off."""
    if dtype is None:
        yield
        return
    before = torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda")
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_enabled("cuda", True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", before[1])
        torch.set_autocast_dtype("cuda", before[0])


def _on_fake_cuda(module: torch.nn.Module, mode: FakeTensorMode, dtype: torch.dtype | None = None,
                  frozen_only: bool = False) -> torch.nn.Module:
    """Replace a meta module's parameters and buffers by fake CUDA tensors (shapes and dtypes, no memory), the
    floating-point ones (only the frozen ones with `frozen_only`: a LoRA's base) cast to `dtype`."""
    def fake(tensor: torch.Tensor, frozen: bool) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point() and (frozen or not frozen_only):
            tensor = tensor.to(dtype)
        return FakeTensor(mode, tensor, torch.device("cuda"))
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(fake(param, not param.requires_grad),
                                                           requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = fake(buffer, True)
    return module


@contextlib.contextmanager
def _adapters_off(denoiser):
    """A LoRA's reference: its base, the adapters off (`Policy.reference`)."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def _forward_bytes(denoiser, reference, family, denoiser_config: dict, rows: int, latent: int, checkpointed: bool,
                   compute: torch.dtype | None, mode: FakeTensorMode, gathered: tuple = (), gathered_bytes: int = 0
                   ) -> tuple[int, list[tuple[int, int]]]:
    """The most bytes alive at once while the denoiser (fake CUDA tensors) makes one training forward as its family
    calls it, under CUDA autocast in `compute`, and then, with that forward's graph kept for its backward,
    `reference()` (a context giving the reference denoiser, or None) makes its forward without gradients; with the
    `gathered` models' weights gathered by fsdp2 in `gathered_bytes` a weight (`_FsdpGathers`). Returns that peak and
    the (bytes alive, gradient entries made) points of the backward that can peak above it: the first gathered
    model's (`_FsdpGathers.backward_points`), or, when none is gathered, each checkpointed block's recompute
    (`_Recomputes`; none without checkpointing)."""
    from torch.utils import checkpoint
    from unittest import mock
    from ..models.families import TextStates
    channels, tokens, width, pooled = family.input_shapes(denoiser_config)
    with mode:
        cuda = torch.device("cuda")
        sample = torch.zeros(rows, channels, latent, latent, device=cuda)
        texts = TextStates(torch.zeros(rows, tokens, width, device=cuda),
                           None if pooled is None else torch.zeros(rows, pooled, device=cuda))
        sizes = torch.zeros(rows, 2, dtype=torch.long)  # SDXL's size ids: their values do not change the shapes
        cond = family.conditioning(texts, sizes, sizes, latent, family.training_guidance(denoiser_config))
        timesteps = torch.zeros(rows, device=cuda, dtype=torch.long if family.denoiser == "unet" else torch.float32)
    denoiser.train()
    live = _LiveBytes()
    # a checkpoint keeps the CUDA generator's state for its recompute; a machine without a GPU has none
    with (mode, mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention),
          mock.patch.object(checkpoint, "get_device_states", lambda *args: ([], [])),
          live, _FsdpGathers(gathered, gathered_bytes, live) as gathers,
          _Recomputes(denoiser, checkpointed, live, gathers) as recomputes, _cuda_autocast(compute)):
        kept = [cond.denoise(denoiser, sample, timesteps)]  # its graph stays alive for the backward
        if reference is not None:
            with torch.no_grad(), reference() as denoiser_off:
                cond.denoise(denoiser_off, sample, timesteps)
        kept.clear()
    return live.peak, gathers.backward_points() if gathered else recomputes.points


class _Recomputes:
    """The denoiser's checkpointing function, with gradient checkpointing on while it is entered when `checkpointed`
    (`enable_gradient_checkpointing(recomputes)`; off again on exit): it checkpoints each block as diffusers' own
    does (torch.utils.checkpoint, not reentrant), then measures what the backward's recompute of the block will add:
    the block's forward run again with gradients, its saved tensors kept until it ends, as the backward runs it just
    before the block's own backward. `points` holds, per block, the bytes alive then (those alive as the block's
    forward ended, its output standing for the gradient that arrives in its place, plus the recompute's peak less its
    own output, which torch's recompute does not keep) and the trained entries whose gradients the backward has made
    by then (those of the layers whose forward ended after the block's). The gathered weights are `_FsdpGathers`',
    which is told where each recompute falls among its events."""

    def __init__(self, denoiser: torch.nn.Module, checkpointed: bool, live: _LiveBytes, gathers: "_FsdpGathers"):
        self.denoiser = denoiser if checkpointed else None  # without checkpointing nothing is recomputed or counted
        self.live, self.gathers, self.points = live, gathers, []
        self.measuring = False  # a recompute runs: its layers are not counted again
        self.trained = self.ended = 0  # trained entries in all, and in the layers whose forward has ended
        self.handles = []
        for layer in self.denoiser.modules() if checkpointed else ():
            entries = sum(p.numel() for p in layer.parameters(recurse=False) if p.requires_grad)
            self.trained += entries
            if entries:
                self.handles.append(layer.register_forward_hook(functools.partial(self._ended, entries)))

    def _ended(self, entries, module, args, output):
        if not self.measuring:
            self.ended += entries

    def __call__(self, block, *args):
        from torch.utils import checkpoint
        if self.measuring:  # a block inside the one being recomputed: the recompute keeps all it saves
            return block(*args)
        mark = len(self.gathers.events)
        output = checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        alive, peak = self.live.live, self.live.peak
        self.live.peak, self.measuring = alive, True
        with self.gathers.paused():
            again = block(*args)
        outputs = sum(t.untyped_storage().nbytes() for t in tree_leaves(again) if isinstance(t, torch.Tensor))
        recompute = self.live.peak - alive - outputs
        at_recompute = alive - self.gathers.gathered + recompute  # beside the gathered bytes
        del again
        self.live.peak, self.measuring = peak, False
        self.points.append((at_recompute, self.trained - self.ended))
        self.gathers.recompute(mark, at_recompute)
        return output

    def __enter__(self):
        if self.denoiser is not None:
            self.denoiser.enable_gradient_checkpointing(self)
        return self

    def __exit__(self, *exc):
        if self.denoiser is not None:
            self.denoiser.disable_gradient_checkpointing()
        for handle in self.handles:
            handle.remove()


class _FsdpGathers:
    """What fsdp2 gathers while `models` make their forwards, added to `live` as torch's FSDP2 allocates it
    (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, `unshard`, `wait_for_unshard`, `post_backward`): each
    unit's pre-forward (the root first, then each block of `sharding.wrap_units`) all-gathers the weights it owns (its
    blocks' not included) into a flat buffer, frees the previous unit's flat buffer and copies its weights out into
    unsharded ones, both whole on every process in `weight_bytes` a weight; its post-forward frees the copies, except
    the root's, which stay for the backward; the root's frees the last flat buffer. A unit already gathered (a root,
    in a LoRA's second forward with the adapters off) is not gathered again. (A reference's root, which no backward
    reshards, stays gathered from the first step on: counted as that step gathers it.)

    `backward_points()` then follows the trained model's (the first of `models`) backward through the same units,
    from the events of its forward: each unit's start and end, and each layer with trained weights."""

    def __init__(self, models: tuple, weight_bytes: int, live: _LiveBytes):
        self.live, self.weight_bytes, self.models = live, weight_bytes, models
        self.flat = 0      # the flat buffer kept until the next unit's copy-out
        self.gathered = 0  # every byte the hooks hold now
        self.units: dict[int, tuple[int, int, bool]] = {}  # id -> (bytes of the weights it owns, trained ones, root)
        # the trained model's forward, in order: (pre, post or layer, unit id, trained weights of the layer, the
        # bytes alive less the gathered ones)
        self.events: list[tuple[str, int, int, int]] = []
        self.forward_done = False  # its forward has ended: a second one is the reference's (a LoRA's, adapters off)
        self.unsharded: set[int] = set()  # the units whose copies are held
        self.off = False  # `paused`
        self.handles = []
        for model in models:
            units = wrap_units(model)
            for unit in (model, *units):
                inside = {id(m) for m in unit.modules()}
                owned_by_blocks = {id(p) for block in units if block is not unit and id(block) in inside
                                   for p in block.parameters()}
                owned = [p for p in unit.parameters() if id(p) not in owned_by_blocks]
                self.units[id(unit)] = (weight_bytes * sum(p.numel() for p in owned),
                                        sum(p.numel() for p in owned if p.requires_grad), unit is model)
                self.handles += [unit.register_forward_pre_hook(functools.partial(self._pre, model, unit)),
                                 unit.register_forward_hook(functools.partial(self._post, model, unit))]
                if model is models[0]:  # the layers whose gradients its backward makes
                    for layer in unit.modules():
                        trained = sum(p.numel() for p in layer.parameters(recurse=False)
                                      if p.requires_grad and id(p) not in owned_by_blocks)
                        if trained:
                            self.handles.append(layer.register_forward_hook(
                                functools.partial(self._layer, unit, trained)))

    def _add(self, nbytes: int) -> None:
        self.gathered += nbytes
        self.live.add(nbytes)

    def _record(self, kind: str, unit, trained: int = 0) -> None:
        if not self.forward_done:
            self.events.append((kind, id(unit), trained, self.live.live - self.gathered))
            self.forward_done = kind == "post" and unit is self.models[0]

    @contextlib.contextmanager
    def paused(self):
        """No hook gathers or records inside: `_Recomputes` runs a block again to measure it."""
        self.off = True
        try:
            yield
        finally:
            self.off = False

    def recompute(self, mark: int, alive: int) -> None:
        """A checkpointed block's forward has ended (the events from `mark` on are its own): its recompute, with
        `alive` bytes alive beside the gathered ones, falls in the backward after the pre-backward of each unit whose
        forward ended inside it, before its layers' gradients."""
        if not self.models or self.forward_done:
            return
        at = len(self.events)
        while at > mark and self.events[at - 1][0] == "post":
            at -= 1
        self.events.insert(at, ("recompute", 0, 0, alive))

    def _layer(self, unit, trained, module, args, output):
        if not self.off:
            self._record("layer", unit, trained)

    def _pre(self, model, unit, module, args):
        if self.off:
            return
        if model is self.models[0]:
            self._record("pre", unit)
        if id(unit) in self.unsharded:
            return
        unit_bytes = self.units[id(unit)][0]
        self._add(unit_bytes - self.flat)  # gathered flat; the previous flat buffer freed
        self.flat = unit_bytes
        self._add(unit_bytes)  # copied out
        self.unsharded.add(id(unit))

    def _post(self, model, unit, module, args, output):
        if self.off:
            return
        if unit is model:  # the root's copies stay for the backward; the last flat buffer goes
            self._add(-self.flat)
            self.flat = 0
        else:
            self._add(-self.units[id(unit)][0])
            self.unsharded.discard(id(unit))
        if model is self.models[0]:
            self._record("post", unit)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def backward_points(self) -> list[tuple[int, int]]:
        """The trained model's backward as FSDP2 runs it: its forward's events in reverse, each with the bytes alive
        there, from what stays gathered after the forwards (the roots' copies). Where a unit's forward ended, its
        pre-backward gathers it again as its pre-forward did (unless prefetched) and prefetches the next unit's flat
        buffer; where a layer's forward ended, the layer's gradients are made whole (in the weights' dtype); where a
        unit's forward began, its post-backward frees its copies and the previous unit's reduce-scatter input, copies
        its gradients into a reduce-scatter input of its own (fp32, kept until the next post-backward) and frees
        them, and the reduce-scatter's output is the unit's share of the sharded fp32 gradients. Returns (bytes
        alive, sharded gradient entries made so far) at each of those moments: the bytes beyond the states and the
        sharded gradients, which take 4 / processes bytes an entry."""
        flip = {"pre": "post", "post": "pre", "layer": "layer", "recompute": "recompute"}
        backward = [(flip[kind], key, trained, alive) for kind, key, trained, alive in reversed(self.events)]
        pres = [key for kind, key, _, _ in backward if kind == "pre"]
        following = dict(zip(pres, pres[1:]))  # the unit whose pre-backward comes next
        gathered, reduce_input, reduced, prefetched, points = self.gathered, 0, 0, set(), []
        gradients: dict[int, int] = {}  # each unit's whole gradients made so far

        def point(alive: int) -> None:
            points.append((alive + gathered + reduce_input + sum(gradients.values()), reduced))
        for kind, key, trained, alive in backward:
            if kind == "recompute":
                point(alive)
                continue
            unit_bytes, unit_trained, root = self.units[key]
            if kind == "pre":
                if not root:  # the root's copies are still there
                    gathered += (0 if key in prefetched else unit_bytes) + unit_bytes  # gathered, copied out
                    point(alive)
                    gathered -= unit_bytes  # in the backward the flat buffer goes at once
                if key in following:  # the next unit's all-gather, ahead of its pre-backward
                    gathered += self.units[following[key]][0]
                    prefetched.add(following[key])
            elif kind == "layer":
                gradients[key] = gradients.get(key, 0) + trained * self.weight_bytes
            else:
                point(alive)
                gathered -= unit_bytes  # resharded
                reduce_input = 4 * unit_trained  # the previous one freed, then this unit's gradients copied in
                point(alive)
                gradients.pop(key, None)
                reduced += unit_trained
            point(alive)
        return points


@dataclasses.dataclass
class MemoryPlan:
    strategy: str
    processes: int
    gpu_memory_gb: float | None
    per_process_bytes: dict      # each part of memory_bytes, the total and the cache's build
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
    frozen = MIXED_PRECISION_DTYPES[cfg.train.mixed_precision].itemsize  # the frozen weights' dtype
    full = cfg.model.lora_rank is None
    trainable = counts.denoiser if full else counts.lora
    weights = counts.denoiser * 4 if full else counts.denoiser * frozen + counts.lora * 4
    optimizer_name = "adamw" if strategy != "ddp" else cfg.train.optimizer  # sharding trains AdamW only
    optimizer = {"adamw": 8 * trainable, "adamw8bit": 2 * trainable,
                 "adafactor": 4 * counts.adafactor_state}[optimizer_name]
    if strategy == "zero2":  # DeepSpeed's fp32 master copy of the trained weights, partitioned with the moments
        optimizer += 4 * trainable
    online = cfg.method.name in ONLINE_METHODS
    # offloaded by model.ref_offload in data-parallel runs; sharding refuses that key and shards the reference
    offloaded = cfg.model.ref_offload and strategy == "ddp"
    reference = counts.denoiser * frozen if (full and _needs_reference(cfg) and not cfg.method.precomputed_reference
                                         and not offloaded) else 0
    # the VAE is kept in fp32 where its config says force_upcast (fp16 overflows it), as the run places it
    vae_bytes = 4 if counts.vae_upcast else frozen
    plain = not (cfg.data.cache and not online)  # the encoders are loaded for training
    text = _text_encoder_bytes(counts, MIXED_PRECISION_DTYPES[cfg.train.mixed_precision])
    encoders = counts.vae * vae_bytes + text if plain else 0
    # loaded as the online loop loads them: the scorers in online.reward_dtype, the judge in the frozen dtype
    rewards = counts.rewards * reward_dtype(cfg).itemsize + counts.judge * frozen
    sharded = {"ddp": 1, "fsdp2": processes, "fsdp2-offload": None, "zero2": 1}[strategy]
    partitioned = processes if strategy in ("fsdp2", "zero2") else 1  # gradients and optimizer states
    ema = 4 * trainable if cfg.train.ema_decay else 0  # kept where the trained weights are, as they are sharded
    if sharded is None:  # offloaded to the CPU, the reference too (sharded alike): only what is replicated stays
        weights = gradients = optimizer = ema = reference = 0
    else:
        gradients = trainable * 4 // partitioned
        optimizer //= partitioned
        weights //= sharded
        reference //= sharded
        ema //= sharded
    # AdamW's step on CUDA (foreach) makes a temporary of the trained weights' size (each sqrt(v) + eps), where its
    # weights are; Adafactor's loop, temporaries of one matrix's size; 8-bit AdamW's kernels, none
    optimizer_step = 0 if sharded is None else {"adamw": 4 * trainable // partitioned, "adamw8bit": 0,
                                                "adafactor": counts.adafactor_step}[optimizer_name]
    # the denoiser's buffers sit beside its weights (and the reference copy's) on every process, whole: sharding
    # and offloading move parameters only
    weights += counts.denoiser_buffers * (4 if full else frozen)
    reference += counts.denoiser_buffers * frozen if reference else 0
    texts = -(-_rows(cfg) // 4)  # a step encodes at most a text a row; text calls were counted by 4
    encode = _encode_bytes(counts, _vae_call_images(cfg), texts, vae_bytes, frozen) if plain and not online else 0
    # gradients live from the backward to the step, and across micro-steps (train.grad_accum); zero_grad frees them
    # before the next step's forward, except under DDP on several processes, where they are views of its all-reduce
    # buckets (gradient_as_bucket_view), which stay. The backward frees each layer's saved tensors as it makes its
    # gradients, so the forward's peak and the step's are the two to fit, and the backward's where it makes more
    # than it frees (a checkpointed block's recompute; under fsdp2, the units gathered again); the encoders run
    # first in each micro-step
    held = gradients if _backwards_per_update(cfg) > 1 or (strategy == "ddp" and processes > 1) else 0
    mode = "checkpointed" if cfg.model.gradient_checkpointing else "plain"
    # the forward, and the moments of the backward that can peak above it with the gradients made so far (unless
    # held already or offloaded); under fsdp2 with the units gathered (`_FsdpGathers`)
    gathering = strategy in ("fsdp2", "fsdp2-offload")
    forward = (counts.sharded_activation_bytes if gathering else counts.activation_bytes)[mode]
    backward = (counts.sharded_backward if gathering else counts.backward).get(mode, [])
    per_entry = 0 if held or sharded is None else 4 / partitioned
    activations = max([forward, *(nbytes + int(entries * per_entry) for nbytes, entries in backward)])
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, **({"ema": ema} if ema else {}),
             "reference": reference, "encoders": encoders, "rewards": rewards, "activations": activations,
             "optimizer_step": optimizer_step, "encode": encode}
    states = weights + optimizer + ema + reference + encoders + rewards
    total = states + max(activations + held, gradients + optimizer_step, encode + held)
    return {**parts, "total": total, "cache_build": cache_build_bytes(cfg, counts)}


def _encode_bytes(counts: ModelCounts, images: int, texts: int, vae_bytes: int, text_bytes: int) -> int:
    """The larger peak of a VAE call on `images` images (in `vae_bytes` a value) and a text call on 4 x `texts`
    texts (in `text_bytes`), from the calls counted in fp32 (`_call_bytes`)."""
    return max(_call_bytes(counts.vae_encode_bytes, images, counts.cache_batch) * vae_bytes,
               _call_bytes(counts.text_encode_bytes, texts, counts.cache_batch) * text_bytes) // 4


def cache_build_bytes(cfg: Config, counts: ModelCounts) -> int:
    """The peak of making the latent cache (module docstring); 0 when the run makes none."""
    from ..data.cache import CACHE_DTYPES
    if not cfg.data.cache or cfg.method.name in ONLINE_METHODS:
        return 0
    text_bytes = CACHE_DTYPES[cfg.data.cache_dtype].itemsize  # what the cache's encoders run in on a GPU
    vae_bytes = 4 if counts.vae_upcast else text_bytes
    batch = cfg.data.cache_batch_size  # images a VAE call; the text encoders read 4 x as many texts a call
    return (counts.vae * vae_bytes + _text_encoder_bytes(counts, CACHE_DTYPES[cfg.data.cache_dtype])
            + _encode_bytes(counts, batch, batch, vae_bytes, text_bytes))


def _text_encoder_bytes(counts: ModelCounts, dtype: torch.dtype) -> int:
    """The text encoders' weights in `dtype`, those that fp16 keeps in fp32 (`place`) at 4 bytes."""
    kept = counts.text_fp32 if dtype == torch.float16 else 0
    return (counts.text_encoders - kept) * dtype.itemsize + kept * 4


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
    # the scorers in half precision, as Flow-Factory's reward guide loads PickScore: a few groups reorder, no step slows
    ("online.reward_dtype=frozen", "online.reward_dtype=frozen",
     lambda c: c.method.name in ONLINE_METHODS and c.online.reward_dtype == "fp32" and c.train.mixed_precision != "no"),
    ("train.sharding=fsdp2", "fsdp2", lambda c: True),  # over the processes planned for, when there are several
    ("train.sharding=fsdp2-offload", "fsdp2-offload", lambda c: True),
    ("train.optimizer=adamw8bit", "train.optimizer=adamw8bit", lambda c: c.train.optimizer == "adamw"),
    ("model.lora_rank=8 (a LoRA instead of a full fine-tune)", "model.lora_rank=8",
     lambda c: c.model.lora_rank is None),
]


def _sharding_fixes(cfg: Config) -> list[str]:
    """What a config must change to run sharded (`sharding.sharding_conflicts`), as the plan counts it: AdamW, and
    the reference sharded, not offloaded."""
    fixes = list(sharding_conflicts(cfg).values())
    return [*fixes, "(what sharding runs with)"] if fixes else []


def _batch_changes(cfg: Config, counts: ModelCounts, usage: dict, budget: float, processes: int,
                   strategy: str) -> list:
    """Changes that only split the encoders' calls, leaving the cache and the trained model as they are: when making
    the cache is all that does not fit, the largest data.cache_batch_size that does; when a step's VAE call is what
    does not fit, the largest data.vae_encode_batch_size that does."""
    if usage["total"] <= budget < usage["cache_build"]:
        key, start, need = "data.cache_batch_size", cfg.data.cache_batch_size, lambda c: cache_build_bytes(c, counts)
    elif usage["cache_build"] <= budget < usage["total"] and usage["encode"]:
        key, start = "data.vae_encode_batch_size", _vae_call_images(cfg)
        need = lambda c: memory_bytes(c, counts, processes, strategy)["total"]  # noqa: E731
    else:
        return []
    for batch in range(start - 1, 0, -1):
        override = f"{key}={batch}"
        if need(_changed(cfg, override)) <= budget:
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
        changes = [] if fits else [*_batch_changes(cfg, counts, usage, budget, processes, strategy), *_CHANGES]
        for label, how, applies in changes:
            if not applies(cfg) or how == strategy or (how == "fsdp2" and processes == 1) or (
                    strategy != "ddp" and how not in STRATEGIES
                    and set(sharding_conflicts(_changed(cfg, how))) - set(sharding_conflicts(cfg))):
                continue  # a change sharding refuses (model.ref_offload, 8-bit AdamW) is not offered to a sharded run
            if how in STRATEGIES:
                total = needed_bytes(memory_bytes(cfg, counts, processes, how))
            else:
                changed = _changed(cfg, how)
                changed_counts = count_models(changed) if how.startswith("model.lora_rank") else counts
                total = needed_bytes(memory_bytes(changed, changed_counts, processes, strategy))
            if total <= budget:
                change = label if how not in STRATEGIES else " ".join([label, *_sharding_fixes(cfg)])
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
            lines.append(f"  {part.replace('_', ' '):<14} {_size(value):>10}" + {
                "activations": "  (the most alive in the forward, or in the backward with the gradients made by then)",
                "total": "  (states and the largest of activations, gradients + optimizer step, encode)"}.get(part, ""))
    if p.per_process_bytes["cache_build"]:
        lines.append(f"  {'cache build':<14} {_size(p.per_process_bytes['cache_build']):>10}  (before training, on the "
                     "main process, while data.cache is made; a finished cache needs none)")
    if p.fits is not None:
        verdict = "fits" if p.fits else "does not fit"
        lines.append(f"{verdict} in {p.gpu_memory_gb:g} GB ({RESERVE_GB} GB kept for the CUDA context)")
        if not p.fits:
            lines.append(f"cheapest single change that fits: {p.change}" if p.change else
                         "no single change fits: combine them")
            lines.append(f"with train.sharding=fsdp2 it fits on {p.fsdp2_processes} processes" if p.fsdp2_processes
                         else "fsdp2 alone does not make it fit: the activations, the encoders, the rewards and the "
                         "cache's build are not sharded")
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
