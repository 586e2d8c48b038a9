"""The memory planner: its arithmetic by hand, its counts against the loaded models, its model states and
activations against what a real training step holds, its advice, and the command."""

import dataclasses
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from diffusion_align.config import load_config
from diffusion_align.training.memory import (GIB, RESERVE_GB, ModelCounts, _call_bytes, _frontier, _peak_bytes,
                                             count_models, memory_bytes, needed_bytes, plan)

HAND = ModelCounts("sd", denoiser=1000, lora=100, adafactor_state=30, adafactor_step=50, vae=200, text_encoders=300,
                   activation_bytes={"plain": 4000, "checkpointed": 1000},
                   sharded_activation_bytes={"plain": 3000, "checkpointed": 700}, cache_batch=16,
                   vae_encode_bytes=(400, 6400), text_encode_bytes=(40, 640))
PARTS = ("weights", "gradients", "optimizer", "reference", "encoders", "activations", "optimizer_step", "encode")


def cfg(*overrides):
    return load_config(None, ["model.lora_rank=null", *overrides])


def test_fp16_counts_the_text_encoder_layers_it_keeps_in_fp32():
    """100 of the 300 text encoder weights kept in fp32 in fp16 (T5's wo): 200 x 2 + 100 x 4 bytes, beside the VAE's
    200 x 2; in bf16, as every weight, 2 bytes each."""
    counts = dataclasses.replace(HAND, text_fp32=100)
    assert memory_bytes(cfg("train.mixed_precision=fp16"), counts)["encoders"] == 400 + 400 + 400
    assert memory_bytes(cfg("train.mixed_precision=bf16"), counts)["encoders"] == 400 + 600
    cache = ("data.cache=true", "data.cache_batch_size=16")
    assert (memory_bytes(cfg("data.cache_dtype=fp16", *cache), counts)["cache_build"]
            - memory_bytes(cfg("data.cache_dtype=fp16", *cache), HAND)["cache_build"]) == 100 * 2


@pytest.mark.parametrize("overrides, strategy, processes, expected, total", [
    # full fp32 DPO, AdamW: weights 4 x 1000, gradients 4 x 1000, moments 8 x 1000, fp32 reference 4 x 1000,
    # encoders 4 x (200 + 300), activations 4000, AdamW's step 4 x 1000, a pair's 2 images encoded 400 + 6000 / 15;
    # total: the states but the gradients (18,000) and the larger of the forward's 4,000 and the step's 4,000 + 4,000
    ((), "ddp", 1, (4000, 4000, 8000, 4000, 2000, 4000, 4000, 800), 26000),
    # fsdp2: UNet states halved, encoders whole, the forward's activations with its units' weights gathered 3,000
    ((), "fsdp2", 2, (2000, 2000, 4000, 2000, 2000, 3000, 2000, 800), 14000),
    # weights (and the reference) replicated; the optimizer's half of the moments and of DeepSpeed's fp32 master copy
    ((), "zero2", 2, (4000, 2000, 6000, 4000, 2000, 4000, 2000, 800), 20000),
    ((), "fsdp2-offload", 2, (0, 0, 0, 0, 2000, 3000, 0, 800), 5000),  # states, reference and the step on the CPU
    # LoRA in bf16: frozen base 2 x 1000 + adapters 4 x 100; no reference copy; encoders and their call in bf16
    (("model.lora_rank=8", "train.mixed_precision=bf16"), "ddp", 1, (2400, 400, 800, 0, 1000, 4000, 400, 400), 8200),
    (("method.precomputed_reference=true", "data.cache=true", "model.gradient_checkpointing=true"), "ddp", 1,
     (4000, 4000, 8000, 0, 0, 1000, 4000, 0), 20000),
    (("method.name=mapo", "train.optimizer=adamw8bit"), "ddp", 1, (4000, 4000, 2000, 0, 2000, 4000, 0, 800), 12000),
    # gradients kept between micro-steps: beside the next forward (8,000) and the next encoding (4,800); and so under
    # DDP on 2 processes, where they are views of its all-reduce buckets
    (("method.name=mapo", "train.optimizer=adamw8bit", "train.grad_accum=2"), "ddp", 1,
     (4000, 4000, 2000, 0, 2000, 4000, 0, 800), 16000),
    (("method.name=mapo", "train.optimizer=adamw8bit"), "ddp", 2, (4000, 4000, 2000, 0, 2000, 4000, 0, 800), 16000),
    # Adafactor: its factored moment 4 x 30 and its step's temporaries 50, beside the gradients (4,050 > 4,000)
    (("train.optimizer=adafactor", "model.ref_offload=true"), "ddp", 1, (4000, 4000, 120, 0, 2000, 4000, 50, 800),
     10170),
    # online: the encoders stay (the rewards decode), no pair is encoded; no KL: no reference
    (("method.name=grpo", "data.cache=true"), "ddp", 1, (4000, 4000, 8000, 0, 2000, 4000, 4000, 0), 22000),
    (("method.name=grpo", "online.kl_beta=0.01"), "ddp", 1, (4000, 4000, 8000, 4000, 2000, 4000, 4000, 0), 26000),
])
def test_bytes_by_hand(overrides, strategy, processes, expected, total):
    """HAND's counts in each setting, and then with 50 floating-point buffers in the denoiser (SD3's position table):
    in the weights' dtype beside them, and beside a reference copy in the frozen dtype, whole on every process
    (sharding and offloading move parameters only)."""
    usage = memory_bytes(cfg(*overrides), HAND, processes, strategy)
    assert tuple(usage[p] for p in PARTS) == expected and usage["total"] == total
    with_buffers = memory_bytes(cfg(*overrides), dataclasses.replace(HAND, denoiser_buffers=50), processes, strategy)
    full, bf16 = "model.lora_rank=8" not in overrides, "train.mixed_precision=bf16" in overrides
    frozen = 2 if bf16 else 4
    assert with_buffers["weights"] - usage["weights"] == 50 * (4 if full else frozen)
    assert with_buffers["reference"] - usage["reference"] == (50 * frozen if usage["reference"] else 0)


def test_fsdp2s_backward_by_hand():
    """fsdp2's backward points (bytes beyond the states, sharded gradient entries made by then) against its forward's
    3,000: (2,500, 500) needs 2,500 + 500 x 4 / 2 = 3,500 on 2 processes, and 2,500 + 500 x 4 / 8 = 2,750 on 8, where
    the forward decides; with the gradients held across micro-steps (counted whole beside it) or offloaded to the CPU
    its entries add nothing more."""
    counts = dataclasses.replace(HAND, sharded_backward={"plain": [(2500, 500), (1000, 1000)], "checkpointed": []})
    assert memory_bytes(cfg(), counts, 2, "fsdp2")["activations"] == 3500
    assert memory_bytes(cfg(), counts, 8, "fsdp2")["activations"] == 3000
    assert memory_bytes(cfg("train.grad_accum=2"), counts, 2, "fsdp2")["activations"] == 3000
    assert memory_bytes(cfg(), counts, 2, "fsdp2-offload")["activations"] == 3000
    assert memory_bytes(cfg(), counts, 2, "ddp")["activations"] == 4000  # unsharded: the forward's
    assert memory_bytes(cfg("model.gradient_checkpointing=true"), counts, 2, "fsdp2")["activations"] == 700
    # of the points a backward makes, those that can decide for some number of processes
    assert _frontier([(5, 0), (3, 0), (4, 2), (2, 3), (4, 3)]) == [(4, 3), (5, 0)]


def test_a_checkpointed_backward_by_hand():
    """Unsharded, a checkpointed run's backward points are its blocks' recomputes (bytes alive, gradient entries made
    by then), against its forward's 1,000: (900, 100) needs 900 + 100 x 4 = 1,300 on one process; under ZeRO-2 on 2,
    900 + 100 x 4 / 2 = 1,100 (its gradients partitioned); with the gradients held whole beside it (DDP on 2
    processes, or across micro-steps) the entries add nothing more: 1,000, the forward's. Without checkpointing the
    forward's 4,000 decides."""
    counts = dataclasses.replace(HAND, backward={"plain": [], "checkpointed": [(900, 100), (500, 0)]})
    checkpointed = cfg("model.gradient_checkpointing=true")
    assert memory_bytes(checkpointed, counts)["activations"] == 1300
    assert memory_bytes(checkpointed, counts, 2, "zero2")["activations"] == 1100
    assert memory_bytes(checkpointed, counts, 2, "ddp")["activations"] == 1000
    assert memory_bytes(cfg("model.gradient_checkpointing=true", "train.grad_accum=2"), counts)["activations"] == 1000
    assert memory_bytes(cfg(), counts)["activations"] == 4000


def test_a_step_that_peaks_while_it_encodes_by_hand():
    """A checkpointed bf16 LoRA of 4 pairs a step with a VAE that says force_upcast: the VAE is kept in fp32 (4 x 200
    beside the text encoders' 2 x 300), and encoding the step's 8 images in fp32 (400 + 7 x 6,000 / 15 = 3,200)
    outweighs the forward's 1,000: the step needs its states (2,400 + 800 + 1,400) and 3,200, unless the VAE takes
    fewer images a call."""
    overrides = ("model.lora_rank=8", "train.mixed_precision=bf16", "model.gradient_checkpointing=true",
                 "train.batch_size=4")
    config, upcast = cfg(*overrides), dataclasses.replace(HAND, vae_upcast=True)
    usage = memory_bytes(config, upcast)
    assert (usage["encoders"], usage["encode"], usage["activations"]) == (1400, 3200, 1000)
    assert usage["total"] == 2400 + 800 + 1400 + 3200
    # 2 images a VAE call (data.vae_encode_batch_size): 800, under the forward's 1,000 and the step's 400 + 400
    split = memory_bytes(cfg(*overrides, "data.vae_encode_batch_size=2"), upcast)
    assert (split["encode"], split["total"]) == (800, 2400 + 800 + 1400 + 1000)
    # a GPU that holds 2,000 beside the states: the advice is the largest VAE batch that fits, 5 images (2,000)
    advice = plan(config, gpu_memory_gb=RESERVE_GB + (4600 + 2000) / GIB, counts=upcast)
    assert (advice.fits, advice.change) == (False, "data.vae_encode_batch_size=5")
    # eight texts are two calls' worth: a text call of 8 counted at 40 + 600 / 15, in bf16
    texts_first = dataclasses.replace(HAND, vae_encode_bytes=(0, 0), text_encode_bytes=(40, 30040))
    assert memory_bytes(config, texts_first)["encode"] == (40 + 30000 // 15) * 2 // 4


def test_the_online_rewards_are_states_in_their_dtypes_by_hand():
    """HAND with 500 parameters of scorers and 300 of a judge: bf16 GRPO holds the scorers in 4 bytes each
    (online.reward_dtype fp32) or 2 (frozen), the judge in 2, beside its other states."""
    config = cfg("method.name=grpo", "train.mixed_precision=bf16")
    rewarded = dataclasses.replace(HAND, rewards=500, judge=300)
    without, usage = memory_bytes(config, HAND), memory_bytes(config, rewarded)
    assert (without["rewards"], usage["rewards"], usage["total"] - without["total"]) == (0, 2600, 2600)
    config.online.reward_dtype = "frozen"
    assert memory_bytes(config, rewarded)["rewards"] == 1600


def test_an_online_run_that_does_not_fit_is_told_to_score_in_the_frozen_dtype():
    """The scorers in fp32 are what does not fit: online.reward_dtype=frozen is the change offered, before the CPU
    offload of fsdp2-offload (which would fit too, but slows every step)."""
    config = cfg("method.name=grpo", "train.mixed_precision=bf16", "train.optimizer=adamw")
    counts = dataclasses.replace(HAND, rewards=10_000)
    config.online.reward_dtype = "frozen"
    frozen_need = needed_bytes(memory_bytes(config, counts))
    config.online.reward_dtype = "fp32"
    assert needed_bytes(memory_bytes(config, counts)) == frozen_need + 20_000
    advice = plan(config, gpu_memory_gb=RESERVE_GB + (frozen_need + 10_000) / GIB, counts=counts)
    assert (advice.fits, advice.change) == (False, "online.reward_dtype=frozen")


def test_an_online_runs_rewards_are_the_loaded_scorers_and_judge(tiny_models, tmp_path):
    """online.reward, online.track (the toy oracle, a rule, holds none) and online.judge counted as the online loop
    loads them; an offline method loads none."""
    from diffusion_align.models.tiny import save_tiny_captioner
    from diffusion_align.rewards import VLMJudge, load_scorer
    from diffusion_align.rewards.tiny import save_tiny_scorer
    pickscore, hps = save_tiny_scorer("pickscore", tmp_path / "pickscore"), save_tiny_scorer("hpsv2", tmp_path / "hps")
    judge = save_tiny_captioner(tmp_path / "llava", "llava")
    model = [f"model.pretrained={tiny_models['sd']}", "train.resolution=32"]
    counts = count_models(load_config(None, [*model, "method.name=pref_grpo", f"online.reward=pickscore={pickscore}",
                                             f"online.track=[toy-oracle,hpsv2={hps}]", f"online.judge={judge}"]))
    loaded = [load_scorer("pickscore", pickscore).model, load_scorer("hpsv2", hps).model,
              VLMJudge(str(judge), answers=("sun", "sky")).model]
    assert counts.rewards == sum(p.numel() for m in loaded[:2] for p in m.parameters()) > 0
    assert counts.judge == sum(p.numel() for p in loaded[2].parameters()) > 0
    assert count_models(load_config(None, [*model, f"online.reward=pickscore={pickscore}"])).rewards == 0


def test_online_activations_count_both_halves_of_classifier_free_guidance(tiny_flow_models, tmp_path):
    """The online loop re-scores a micro-batch of B images in one call of 2B rows under CFG (`guided_output`), of B
    without it (guidance <= 1, or FLUX's guidance input): SD3 at B = 2 and guidance 4.5 is counted as B = 4 without."""
    from diffusion_align.rewards.tiny import save_tiny_scorer
    pickscore = save_tiny_scorer("pickscore", tmp_path / "pickscore")

    def activations(family, batch, guidance):
        return count_models(load_config(None, [f"model.pretrained={tiny_flow_models[family]}", "method.name=grpo",
                                               f"online.reward=pickscore={pickscore}", f"online.guidance={guidance}",
                                               "train.resolution=32", f"train.batch_size={batch}",
                                               "online.group_size=4"])).activation_bytes["plain"]
    assert activations("sd3", 2, 4.5) == activations("sd3", 4, 1.0) > activations("sd3", 2, 1.0)
    assert activations("flux", 2, 3.5) == activations("flux", 2, 1.0) < activations("flux", 4, 3.5)


def test_counts_are_the_loaded_models(tiny_models):
    from diffusion_align.models.policy import Policy
    for family, path in tiny_models.items():
        counts = count_models(load_config(None, [f"model.pretrained={path}", "model.lora_rank=4"]))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        total = sum(p.numel() for p in unet.parameters())
        assert (counts.family, counts.denoiser) == (family, total)
        assert counts.vae == sum(p.numel() for p in AutoencoderKL.from_pretrained(path, subfolder="vae").parameters())
        if family != "sdxl":
            encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
            assert counts.text_encoders == sum(p.numel() for p in encoder.parameters())
        policy = Policy(unet, 4, family=family)
        assert counts.lora == sum(p.numel() for p in policy.denoiser.parameters() if p.requires_grad)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("lora_rank", [4, None])
def test_model_states_are_what_a_training_step_holds(tiny_models, lora_rank):
    """One real AdamW step on the tiny UNet: the bytes of its parameters, gradients and optimizer states against
    the plan's weights, gradients and optimizer (within 1%: AdamW's step counters are the difference)."""
    from diffusion_align.models.policy import Policy
    from diffusion_align.training.run import make_optimizer
    path = tiny_models["sd"]
    config = load_config(None, [f"model.pretrained={path}", f"model.lora_rank={'null' if lora_rank is None else 4}",
                                "train.resolution=32", "train.batch_size=2"])
    planned = memory_bytes(config, count_models(config))
    policy = Policy(UNet2DConditionModel.from_pretrained(path, subfolder="unet"), lora_rank, needs_reference=False)
    unet = policy.denoiser
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, trainable, 1e-4)
    out = unet(torch.randn(4, 4, 4, 4), torch.tensor([1, 2, 3, 4]), torch.randn(4, 77, unet.config.cross_attention_dim))
    out.sample.square().mean().backward()
    optimizer.step()
    held = {"weights": _tensor_bytes(unet.parameters()), "gradients": _tensor_bytes(p.grad for p in trainable),
            "optimizer": _tensor_bytes(v for state in optimizer.state.values() for v in state.values())}
    for part, value in held.items():
        assert value == pytest.approx(planned[part], rel=0.01), part


@pytest.mark.parametrize("lora_rank", [4, None])
def test_adafactors_step_is_what_a_real_one_allocates(tiny_models, lora_rank):
    """The planned temporaries of an Adafactor step against the CPU allocator's peak while the run's Adafactor really
    steps the tiny UNet a second time (its states made by the first), within 1%."""
    from diffusion_align.models.policy import Policy
    from diffusion_align.training.run import make_optimizer
    path = tiny_models["sd"]
    config = load_config(None, [f"model.pretrained={path}", f"model.lora_rank={'null' if lora_rank is None else 4}",
                                "train.resolution=32", "train.optimizer=adafactor", "train.weight_decay=0.01"])
    planned = memory_bytes(config, count_models(config))["optimizer_step"]
    unet = Policy(UNet2DConditionModel.from_pretrained(path, subfolder="unet"), lora_rank,
                  needs_reference=False).denoiser
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.randn_like(p)
    optimizer = make_optimizer(config, trainable, 1e-4)
    optimizer.step()
    largest = max(p.numel() for p in trainable) * 4
    assert 2 * largest <= planned == pytest.approx(allocated_peak(optimizer.step), rel=0.01)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_activations_are_what_a_real_forward_holds(tiny_models, checkpointed):
    """The forward's count on fake CUDA tensors against the CPU allocator's peak while the tiny UNet really makes a
    training forward of 8 rows at 32 px (full fine-tune, fp32) and then its frozen reference copy one without
    gradients; checkpointed, the plan's activations are its backward's (the test below)."""
    path = tiny_models["sd"]
    config = load_config(None, [f"model.pretrained={path}", "model.lora_rank=null", "train.resolution=32",
                                "train.batch_size=4", f"model.gradient_checkpointing={str(checkpointed).lower()}"])
    counts = count_models(config)
    planned, planned_forward = memory_bytes(config, counts)["activations"], counts.activation_bytes[
        "checkpointed" if checkpointed else "plain"]
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").train()
    reference = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False)
    if checkpointed:
        unet.enable_gradient_checkpointing()
    latent = 32 // 2 ** (len(AutoencoderKL.load_config(path, subfolder="vae")["block_out_channels"]) - 1)
    inputs = (torch.randn(8, 4, latent, latent), torch.zeros(8, dtype=torch.long),
              torch.randn(8, 77, unet.config.cross_attention_dim))

    def forward():
        kept = [unet(*inputs).sample]  # its graph stays alive, as for a backward
        with torch.no_grad():
            reference(*inputs)
        kept.clear()
    assert planned_forward == pytest.approx(allocated_peak(forward, grad=True), rel=0.05)
    assert (planned > planned_forward) == checkpointed  # the checkpointed backward's recompute: the test below


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_a_checkpointed_steps_backward_recomputes_each_block_as_planned(tiny_models, tiny_flow_models, family):
    """With gradient checkpointing, the backward runs each block's forward again, with gradients, beside what the
    forward kept: a step's peak is in its backward. The plan (`_Recomputes`) against the CPU allocator's peak of a
    real step of the tiny UNet or transformer (a full fine-tune's training forward of 8 rows at 32 px, its reference
    copy's without gradients, and the backward of a loss on the first): never under it, and at most 10% above it
    (measured: 7-8% for the UNet and SD3, 2% for FLUX; not torch's early stop of a recompute at the last tensor the
    backward needs: with `torch.utils.checkpoint.set_checkpoint_early_stop(False)` the peaks are the same to the
    byte; where the plan's surplus lies is not known). The forward's own peak is 2% under the UNet's
    step, half of SD3's and 0.7 of FLUX's."""
    from diffusion_align.models.conditioning import encode_prompts
    from diffusion_align.models.loading import load_components
    path = {**tiny_models, **tiny_flow_models}[family]
    config = load_config(None, [f"model.pretrained={path}", "model.lora_rank=null", "train.resolution=32",
                                "train.batch_size=4", "model.gradient_checkpointing=true"])
    counts = count_models(config)
    usage = memory_bytes(config, counts)
    parts, reference = load_components(str(path)), load_components(str(path)).denoiser.requires_grad_(False)
    denoiser = parts.denoiser.train()
    denoiser.enable_gradient_checkpointing()
    latent = 32 // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if family == "sd":
        inputs = (torch.randn(8, 4, latent, latent), torch.zeros(8, dtype=torch.long),
                  torch.randn(8, 77, denoiser.config.cross_attention_dim))
        call = lambda model: model(*inputs).sample  # noqa: E731
    else:
        cond = encode_prompts(family, parts.tokenizers, parts.text_encoders, ["a red circle"] * 8,
                              guidance=parts.guidance)
        sample, timesteps = torch.randn(8, parts.vae.config.latent_channels, latent, latent), torch.full((8,), 500.0)
        call = lambda model: cond.denoise(model, sample, timesteps)  # noqa: E731

    def step():
        output = call(denoiser)
        with torch.no_grad():
            call(reference)
        output.float().square().mean().backward()
    measured = allocated_peak(step, grad=True)
    planned = max(usage["activations"], usage["gradients"])  # the last of the backward holds every gradient
    assert measured <= planned <= 1.1 * measured
    # the UNet checkpoints each resnet and attention, whose recomputes add little; a transformer checkpoints its
    # blocks, and the forward's own peak would be far under
    assert (counts.activation_bytes["checkpointed"] < 0.75 * measured) == (family != "sd")


def test_the_plan_names_the_cheapest_change_that_fits(tiny_models):
    config = load_config(None, [f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null",
                                "train.resolution=32", "train.batch_size=4"])
    counts = count_models(config)
    plain = memory_bytes(config, counts)["total"]
    checkpointed = memory_bytes(load_config(None, [f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null",
                                                   "train.resolution=32", "train.batch_size=4",
                                                   "model.gradient_checkpointing=true"]), counts)["total"]
    assert checkpointed < plain
    between = RESERVE_GB + (plain + checkpointed) / 2 / GIB
    result = plan(config, gpu_memory_gb=between, counts=counts)
    assert (result.fits, result.change) == (False, "model.gradient_checkpointing=true")
    assert plan(config, gpu_memory_gb=RESERVE_GB + plain / GIB, counts=counts).fits
    # with the activations already small and no reference or encoders: sharded states, or offloaded ones
    lean = load_config(None, [f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null", "train.resolution=32",
                              "train.batch_size=4", "model.gradient_checkpointing=true", "data.cache=true",
                              "method.precomputed_reference=true"])
    states = 16 * counts.denoiser  # fp32 weights and gradients, two AdamW moments
    fixed = memory_bytes(lean, counts)["total"] - states
    three_quarters = RESERVE_GB + (fixed + states * 3 / 4) / GIB  # fits on 2 processes (half the states), not 1
    result = plan(lean, gpu_memory_gb=three_quarters, counts=counts)
    assert (result.fits, result.change, result.fsdp2_processes) == (False, "train.sharding=fsdp2-offload", 2)
    on_two = plan(lean, processes=2, gpu_memory_gb=three_quarters, counts=counts)
    assert (on_two.fits, on_two.change) == (False, "train.sharding=fsdp2")


def test_plan_command_prints_json(tiny_models, capsys, tmp_path):
    from diffusion_align.cli import main
    main(["plan", "--json", "--processes", "2", "--strategy", "fsdp2", "--gpu-memory", "24",
          f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null", "train.resolution=32"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["per_process_bytes"]) == {*PARTS, "rewards", "total", "cache_build"}
    assert out["fits"] is True and out["processes"] == 2 and out["strategy"] == "fsdp2"
    main(["plan", "--json", "--processes", "2", f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null",
          "train.resolution=32", "train.sharding=zero2"])  # without --strategy: the config's sharding
    assert json.loads(capsys.readouterr().out)["strategy"] == "zero2"
    main(["plan", "--json", f"model.pretrained={tiny_models['sd']}", "train.resolution=32"])
    assert json.loads(capsys.readouterr().out)["strategy"] == "ddp"  # train.sharding=none
    with pytest.raises(SystemExit):
        main(["plan", "--processes", "0"])
    assert "--processes must be >= 1" in capsys.readouterr().err
    # overrides after a flag are overrides too (argparse alone stops taking positionals at the first flag)
    main(["plan", f"model.pretrained={tiny_models['sd']}", "--json", "train.resolution=32", "--processes", "2",
          "train.sharding=zero2"])
    assert json.loads(capsys.readouterr().out)["strategy"] == "zero2"
    with pytest.raises(SystemExit):
        main(["plan", f"model.pretrained={tiny_models['sd']}", "--json", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    # a config file in a folder named as a sweep names its runs: a file, not an override
    config = tmp_path / "lr=1e-5" / "config.yaml"
    config.parent.mkdir()
    config.write_text(f"model:\n  pretrained: {tiny_models['sd']}\ntrain:\n  resolution: 32\n  sharding: zero2\n")
    main(["plan", str(config), "--json"])
    assert json.loads(capsys.readouterr().out)["strategy"] == "zero2"


def test_a_sharded_plan_offers_only_what_sharding_runs(tiny_models):
    """fsdp2 refuses model.ref_offload and 8-bit AdamW (sharding.resolve_sharding): the plan offered them; and
    fsdp2-offload keeps a full fine-tune's reference on the CPU with the rest."""
    settings = [f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null", "train.resolution=32",
                "train.batch_size=4", "method.name=smpo", "method.inversion_steps=0", "data.cache=true",
                "model.gradient_checkpointing=true"]  # the cheaper changes made already
    config = load_config(None, settings)
    counts = count_models(config)
    on_two = memory_bytes(config, counts, 2, "fsdp2")
    offloaded = memory_bytes(load_config(None, [*settings, "model.ref_offload=true"]), counts, 2, "fsdp2")
    assert on_two["reference"] > 0 and offloaded["reference"] == on_two["reference"]  # sharded, never offloaded
    assert memory_bytes(config, counts, 2, "fsdp2-offload")["reference"] == 0
    for strategy, offered in (("fsdp2", False), ("ddp", True)):
        usage = memory_bytes(config, counts, 2, strategy)
        budget = RESERVE_GB + (needed_bytes(usage) - usage["reference"] / 2) / GIB
        result = plan(config, processes=2, gpu_memory_gb=budget, strategy=strategy, counts=counts)
        assert not result.fits and (result.change == "model.ref_offload=true") == offered, strategy
    # a config sharding refuses as it stands: the change offered says what else to set
    fp16 = load_config(None, [*settings, "train.mixed_precision=fp16", "model.ref_offload=true"])
    usage = memory_bytes(fp16, counts, 2, "fsdp2")
    result = plan(fp16, processes=2, gpu_memory_gb=RESERVE_GB + needed_bytes(usage) / GIB * 1.01, counts=counts)
    assert result.change == ("train.sharding=fsdp2 train.mixed_precision=bf16 model.ref_offload=false (what sharding "
                             "runs with)")


def test_an_online_update_holds_its_gradients_over_its_backward_passes(tiny_models, tmp_path):
    """Each micro-batch of an update backpropagates once per trained step, and the gradients add up until the
    update: they sit beside the activations from the second backward on, as with train.grad_accum > 1."""
    from diffusion_align.rewards.tiny import save_tiny_scorer
    scorer = save_tiny_scorer("pickscore", tmp_path / "pickscore")
    base = [f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null", "train.resolution=32",
            f"online.reward=pickscore={scorer}",
            "method.name=grpo", "online.prompts_per_step=1", "online.group_size=2", "train.batch_size=2",
            "online.sample_steps=4", "online.kl_beta=0", "online.updates_per_rollout=1"]
    one = load_config(None, [*base, "online.train_fraction=0.25"])  # 1 micro-batch x 1 trained step
    many = load_config(None, [*base, "online.train_fraction=0.5"])  # 1 micro-batch x 2 trained steps
    counts = count_models(one)
    single, several = memory_bytes(one, counts), memory_bytes(many, counts)
    assert {k: v for k, v in single.items() if k != "total"} == {k: v for k, v in several.items() if k != "total"}
    a, g, o, e = (single[k] for k in ("activations", "gradients", "optimizer_step", "encode"))
    assert several["total"] - single["total"] == max(a + g, g + o, e + g) - max(a, g + o, e) > 0


@pytest.mark.parametrize("precision, rel", [("no", 0), ("bf16", 0.15)])
def test_fsdp2s_gathered_weights_are_what_a_sharded_forward_allocates(tiny_models, tmp_path, precision, rel):
    """Sharded by fsdp2 over 2 processes (rank 0 of a fake process group, memory_worker.py), the tiny UNet's training
    forward and its frozen reference copy's (full DPO, 4 rows at 32 px) hold what they hold whole, less a full
    fine-tune's casts of its weights under bf16 autocast, and with the units' gathered weights: the CPU allocator's
    peak moves from the whole forward's to the sharded one's as the plan's does. In fp32, to the byte: the
    allocations are the ones FSDP2 makes on a GPU (the same code and order; its streams only overlap them in time). In
    bf16, down rather than up (the casts outweigh the gathering), and by as much within 15% (-1.23 MB planned, -1.39
    measured): the CPU's autocast runs other ops in bf16 than CUDA's, which the plan follows."""
    path = tiny_models["sd"]
    config = load_config(None, [f"model.pretrained={path}", "model.lora_rank=null", "train.resolution=32",
                                "train.batch_size=2", f"train.mixed_precision={precision}"])
    counts = count_models(config)
    whole, sharded = counts.activation_bytes["plain"], counts.sharded_activation_bytes["plain"]
    latent = 32 // 2 ** (len(AutoencoderKL.load_config(path, subfolder="vae")["block_out_channels"]) - 1)
    peaks = _sharded_peaks(path, 4, latent, precision, "forward", tmp_path)
    measured = peaks["sharded"] - peaks["whole"]
    assert sharded - whole == pytest.approx(measured, rel=rel) and (measured > 0) == (precision == "no")


@pytest.mark.parametrize("precision, rel, checkpointed", [("no", 0.03, False), ("bf16", 0.05, False),
                                                           ("no", 0.03, True)])
def test_fsdp2s_backward_gathers_again_and_reduce_scatters_as_planned(tiny_models, tmp_path, precision, rel,
                                                                      checkpointed):
    """Where the weights outweigh the activations (full DPO, 1 pair at 8 px), the peak of a step sharded by fsdp2
    over 2 processes (rank 0 of a fake process group, memory_worker.py) is in its backward: each unit gathered again
    while the next one is prefetched, its gradients whole beside its reduce-scatter input and the previous unit's,
    the sharded gradients growing. The plan's (`_FsdpGathers.backward_points`) is 29% above its forward's peak, and
    the CPU allocator's real peak of the whole step is the plan's within 3% in fp32 and 5% in bf16 (measured: 4.27
    MB against 4.25 planned, and 3.09 against 3.15; the CPU's autocast is not CUDA's). A plan without the backward
    (its forward's peak) would be 23% under in fp32. With gradient checkpointing, each resnet and attention
    recomputed inside its gathered unit (`_Recomputes`): 4.11 MB against 4.06 planned."""
    path = tiny_models["sd"]
    config = load_config(None, [f"model.pretrained={path}", "model.lora_rank=null", "train.resolution=8",
                                "train.batch_size=1", f"train.mixed_precision={precision}",
                                f"model.gradient_checkpointing={str(checkpointed).lower()}"])
    counts = count_models(config)
    forward = counts.sharded_activation_bytes["checkpointed" if checkpointed else "plain"]
    planned = memory_bytes(config, counts, 2, "fsdp2")["activations"]
    assert planned > 1.2 * forward  # the backward decides
    latent = 8 // 2 ** (len(AutoencoderKL.load_config(path, subfolder="vae")["block_out_channels"]) - 1)
    measured = _sharded_peaks(path, 2, latent, precision, "step-checkpointed" if checkpointed else "step",
                              tmp_path)["sharded"]
    assert planned == pytest.approx(measured, rel=rel) and measured > 1.15 * forward


def _sharded_peaks(path, rows: int, latent: int, precision: str, mode: str, tmp_path) -> dict:
    """memory_worker.py's peaks, from a process of its own (rank 0 of a fake process group of 2)."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / f"peaks-{mode}.json"
    subprocess.run([sys.executable, str(Path(__file__).parent / "memory_worker.py"), str(path), str(rows), str(latent),
                    precision, mode, str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_flow_transformers_are_counted_and_their_activations_are_what_a_real_forward_holds(tiny_flow_models,
                                                                                               family):
    """The plan of an SD3 or FLUX pipeline: its transformer, VAE, three or two text encoders and LoRA counted as
    loaded, and the activations of a training forward as the family calls the transformer (FLUX: packed latents, 512
    T5 tokens) and its reference copy's forward against the CPU allocator's peak of the real ones (4 rows at 32 px,
    full fine-tune, fp32). FLUX's plan is 6% under the CPU's: its RMSNorms run CUDA's fused kernel on fake CUDA
    tensors, as on a GPU, where the CPU's decomposition keeps its squares and means for the backward."""
    from diffusion_align.models.conditioning import encode_prompts
    from diffusion_align.models.loading import load_components
    from diffusion_align.models.policy import Policy
    path = tiny_flow_models[family]
    overrides = [f"model.pretrained={path}", "train.resolution=32", "train.batch_size=2"]
    counts = count_models(load_config(None, [*overrides, "model.lora_rank=4"]))
    parts = load_components(str(path))
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (counts.family, counts.denoiser, counts.vae) == (family, numel(parts.denoiser), numel(parts.vae))
    buffers = sum(b.numel() for b in parts.denoiser.buffers() if b.is_floating_point())
    assert counts.denoiser_buffers == buffers and (buffers > 0) == (family == "sd3")  # SD3's position table
    assert counts.text_encoders == sum(numel(e) for e in parts.text_encoders)
    wo = [m for e in parts.text_encoders for n, m in e.named_modules() if n.endswith(".wo")]  # T5's, kept in fp32
    assert counts.text_fp32 == sum(numel(m) for m in wo) > 0
    policy = Policy(load_components(str(path)).denoiser, 4, None, parts.family.lora_targets, family=family)
    assert counts.lora == sum(p.numel() for p in policy.trainable_parameters())

    full = load_config(None, [*overrides, "model.lora_rank=null"])
    planned = memory_bytes(full, count_models(full))["activations"]
    transformer = parts.denoiser.train()
    cond = encode_prompts(family, parts.tokenizers, parts.text_encoders, ["a red circle"] * 4, guidance=parts.guidance)
    reference = load_components(str(path)).denoiser.requires_grad_(False)
    sample, timesteps = torch.randn(4, 16, 16, 16), torch.full((4,), 500.0)

    def forward():
        kept = [cond.denoise(transformer, sample, timesteps)]  # its graph stays alive, as for a backward
        with torch.no_grad():
            cond.denoise(reference, sample, timesteps)
        kept.clear()
    assert planned == pytest.approx(allocated_peak(forward, grad=True), rel=0.1)


# ---------------------------------------------------------------- making the latent cache

def test_live_bytes_follow_what_ops_make_by_hand():
    """The peak of what ops make and is alive at once: a view keeps its storage alive without adding to it, and
    what was made outside (an input, a weight, a view of them) does not count."""
    x, weight = torch.zeros(100), torch.zeros(10, 20)

    def forward():
        a = x * 2                     # 400 bytes
        b = torch.cat([a, a])         # 800: 1,200 alive
        head = a[:10]                 # a view of a: nothing new
        del a                         # a's storage lives on in head
        total = b.sum()               # 4: 1,204 alive, the peak
        del b                         # 404
        product = weight.t() @ torch.ones(10)  # the transposed weight is the input's; ones 40 and the product 80
        return head, total, product
    assert _peak_bytes(forward) == 400 + 800 + 4


def test_cuda_autocasts_rules_on_fake_tensors_by_hand():
    """What a bf16 forward holds under CUDA's autocast, on a machine without a GPU: a (4, 16) fp32 input through a
    16 -> 32 fp32 linear layer that trains, then softmax. The matmul runs in bf16 on bf16 copies of the input (128
    bytes) and the weight (1,024, kept for the backward), making a bf16 output (256); softmax runs in fp32 (CUDA's
    rule: CPU's autocast would keep bf16) on an fp32 copy (512) and makes 512. Without autocast: 512 + 512."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from diffusion_align.training.memory import _LiveBytes, _cuda_autocast, _on_fake_cuda
    mode = FakeTensorMode()
    with torch.device("meta"):
        layer = torch.nn.Linear(16, 32, bias=False)
    _on_fake_cuda(layer, mode)
    with mode:
        x = torch.zeros(4, 16, device="cuda")
    for dtype, expected in ((torch.bfloat16, 128 + 1024 + 256 + 512 + 512), (None, 512 + 512)):
        with mode, _LiveBytes() as live, _cuda_autocast(dtype):
            out = layer(x)
            probabilities = torch.softmax(out, -1)
        assert (out.dtype, probabilities.dtype) == (dtype or torch.float32, torch.float32)
        assert live.peak == expected
    assert not torch.is_autocast_enabled("cuda")


def test_the_cache_build_by_hand():
    """VAE (fp32 when it says force_upcast, else data.cache_dtype) and text encoders (data.cache_dtype) beside the
    larger of a VAE call of data.cache_batch_size images and a text call of 4 x as many texts: counted at 1 and at
    the config's batch, and along the chord between for a smaller batch; none without data.cache or online."""
    counts = dataclasses.replace(HAND, cache_batch=4, vae_encode_bytes=(100, 280), text_encode_bytes=(40, 85),
                                 vae_upcast=True)
    cached = ["model.lora_rank=8", "data.cache=true", "data.cache_batch_size=4", "data.cache_dtype=fp16"]
    # VAE 4 x 200 + texts 2 x 300; 4 images 280 in fp32 against 16 texts 85 in fp16
    assert memory_bytes(cfg(*cached), counts)["cache_build"] == 800 + 600 + 280
    plain_vae = dataclasses.replace(counts, vae_upcast=False)  # the VAE in fp16 too: 280 x 2 / 4
    assert memory_bytes(cfg(*cached), plain_vae)["cache_build"] == 400 + 600 + 140
    texts_first = dataclasses.replace(counts, text_encode_bytes=(40, 1600))  # 1,600 x 2 / 4
    assert memory_bytes(cfg(*cached), texts_first)["cache_build"] == 800 + 600 + 800
    # 2 images: 100 + (280 - 100) / 3, against 8 texts: 40 + 45 / 3
    assert memory_bytes(cfg(*cached, "data.cache_batch_size=2"), counts)["cache_build"] == 800 + 600 + 160
    assert memory_bytes(cfg(*cached[:-3]), counts)["cache_build"] == 0
    assert memory_bytes(cfg(*cached, "method.name=grpo"), counts)["cache_build"] == 0
    with pytest.raises(ValueError, match="counted for 1 to 4"):
        memory_bytes(cfg(*cached, "data.cache_batch_size=5"), counts)


def test_a_cache_build_that_does_not_fit_gets_a_smaller_batch():
    """Training fits and making the cache (1 GiB an image, 16 a call) does not: the advice is the largest
    data.cache_batch_size that fits, or, when none does, no single change (fsdp2 does not shard the build)."""
    counts = dataclasses.replace(HAND, cache_batch=16, vae_encode_bytes=(GIB, 16 * GIB), vae_upcast=True)
    config = cfg("model.lora_rank=8", "data.cache=true", "data.cache_batch_size=16")
    usage = memory_bytes(config, counts)
    assert usage["total"] < GIB < 16 * GIB < usage["cache_build"] < 16 * GIB + 4 * (200 + 300) + 1
    result = plan(config, gpu_memory_gb=RESERVE_GB + 10.5, counts=counts)
    assert (result.fits, result.change) == (False, "data.cache_batch_size=10")
    assert plan(cfg("model.lora_rank=8", "data.cache=true", "data.cache_batch_size=10"),
                gpu_memory_gb=RESERVE_GB + 10.5, counts=counts).fits
    small = plan(config, gpu_memory_gb=RESERVE_GB + 0.5, counts=counts)
    assert (small.fits, small.change, small.fsdp2_processes) == (False, None, None)


def allocated_peak(forward, grad: bool = False) -> int:
    """The CPU allocator's peak while `forward()` runs, from the profiler's record of each allocation and free in the
    order they happened, less what an op allocates and frees inside itself (a kernel's workspace, such as oneDNN's
    copy of a convolution's input or the CPU flash attention's buffers, which the plan leaves to RESERVE_GB): each
    outermost op's net change, its inner ops' included, lands when it ends (ops and changes matched by thread)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        forward()
    events = profiled.profiler.kineto_results.events()
    ops = [e for e in events if "::" in e.name()]  # the dispatcher's ops, not a record_function around many
    # (time, 0 for an op's start / 1 for a change / 2 for an op's end, op or (thread, bytes)), swept with the ops
    # open on each thread: a change lands in the outermost op open on its own thread (a backend's threads run ops)
    timeline = sorted([(e.start_ns(), 1, (e.start_thread_id(), e.nbytes())) for e in events if e.name() == "[memory]"]
                      + [(op.start_ns(), 0, i) for i, op in enumerate(ops)]
                      + [(op.end_ns(), 2, i) for i, op in enumerate(ops)])
    open_ops, net, live, peak = {}, {}, 0, 0
    for _, kind, value in timeline:
        if kind == 0:
            open_ops.setdefault(ops[value].start_thread_id(), []).append(value)
            continue
        if kind == 1:
            thread, nbytes = value
            if open_ops.get(thread):
                net[open_ops[thread][0]] = net.get(open_ops[thread][0], 0) + nbytes
                continue
            live += nbytes
        else:
            open_ops[ops[value].start_thread_id()].remove(value)
            live += net.pop(value, 0)
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_the_cache_builds_calls_are_what_real_ones_allocate(tiny_models, tiny_flow_models, family):
    """The planned peaks of the cache's VAE and text calls (counted on the meta device at 1 and 3 images, 4 and 12
    texts) against what the CPU allocator held at most while the tiny pipeline's VAE and text encoders really ran
    them, in fp32 at 32 px (CLIP's attention on the CPU's fused kernel, T5's too): equal at 3 and 12, and the
    chord's 2 and 8 not under the real calls."""
    from diffusion_align.models.loading import load_components
    path = {**tiny_models, **tiny_flow_models}[family]
    counts = count_models(load_config(None, [f"model.pretrained={path}", "train.resolution=32", "data.cache=true",
                                             "data.cache_batch_size=3"]))
    parts = load_components(str(path), denoiser=False)
    for batch in (3, 2):
        images, prompts = torch.randn(batch, 3, 32, 32), [f"a red circle number {i}" for i in range(4 * batch)]
        # the pixels are copied to the device for each call, as the cache does
        real = (allocated_peak(lambda: parts.vae.encode(images.clone()).latent_dist),
                allocated_peak(lambda: parts.family.encode_texts(parts.tokenizers, parts.text_encoders, prompts)))
        planned = tuple(_call_bytes(ends, batch, 3) for ends in (counts.vae_encode_bytes, counts.text_encode_bytes))
        for plan_bytes, real_bytes in zip(planned, real):
            assert plan_bytes == pytest.approx(real_bytes, rel=0.01 if batch == 3 else 0.25)
            assert plan_bytes >= real_bytes * 0.99
