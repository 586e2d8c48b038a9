"""One config schema for every command: YAML files plus `section.key=value` overrides.

Every key lives in one of the dataclasses below with its default and its meaning; `diffusion-align train --help`
prints them all. Unknown keys and values of the wrong type are errors that name the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .files import expand_home

T5_MAX_TOKENS = 512  # what the SD3 and FLUX pipelines take (max_sequence_length)


def _key(default: Any, help: str, choices: tuple | None = None, within: str | None = None) -> Any:
    """A config field with its documentation, and its allowed values: `choices`, or a numeric interval `within`
    written like "[1, inf)" or "(0, 1]" (brackets include the bound, parentheses exclude it)."""
    meta = {"help": help, "choices": choices, "within": within}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MethodConfig:
    name: str = _key("dpo", "Training objective. Offline, on preference pairs (data.*): dpo (Diffusion-DPO), mapo "
                            "(MaPO, reference-free), smpo (SmPO: soft labels + ReNoise inversion), dcpo (DCPO: "
                            "per-image captions), sft (diffusion loss on the winners). Online, on the model's own "
                            "samples (online.*): pref_grpo (Pref-GRPO: win rates inside each group), grpo (GRPO on "
                            "the scorer's z-scored scores).",
                     choices=("dpo", "mapo", "smpo", "dcpo", "sft", "pref_grpo", "grpo"))
    beta: float | None = _key(None, "Preference strength. null = the method's published default: dpo 5000, smpo 5000 "
                                    "(2000 for SD1.5 in the paper), dcpo 500, mapo 0.1; a value far outside the "
                                    "method's published range is warned about. Our DPO convention is the authors' "
                                    "-(beta/2)*(...) form: beta=5000 here equals beta=2500 in the diffusers SD1.5 "
                                    "example script (its SDXL script uses 5000 with the 1/2, as here).",
                                    within="(0, inf)")
    v_prediction_errors: str = _key("epsilon", "v-prediction models (SD2.x 768) only: the units of the errors inside "
                                               "the preference terms. epsilon = velocity error x abar_t, the error of "
                                               "the noise the prediction implies, so betas tuned on epsilon models "
                                               "keep their meaning; velocity = raw velocity errors (on SD2.1 about 21x "
                                               "stronger on average, 200x at t = 999). The UNet is trained to predict "
                                               "the velocity either way, and plain diffusion losses (sft, mapo's "
                                               "winner term) are velocity errors.", choices=("epsilon", "velocity"))
    mapo_snr_value: float = _key(0.5, "mapo: s in f(x) = s*x / (exp(s*x) - 1).", within="(0, inf)")
    label_smoothing: float = _key(0.0, "dpo, dcpo: the chance that a pair's label is flipped (conservative DPO, "
                                       "as trl's label_smoothing): each pair's loss mixes its reversed loss in with "
                                       "this weight, so fitted pairs stop pulling; 0 = the published losses.",
                                  within="[0, 0.5)")
    inversion_steps: int | None = _key(None, "smpo: DDIM-inversion steps (each refined once, ReNoise-style) that "
                                             "noise each row's latents from clean to its t; null = 5 (SD1.x / "
                                             "SD2.x) or 10 (SDXL), the sizes of the authors' grid over the whole "
                                             "schedule (training/inversion.py); 0 = plain forward noise.",
                                       within="[0, inf)")
    pref_column: str = _key("pickscore_cosine", "smpo: the raw reward scores are the dataset columns "
                                                "<pref_column>_0 / _1 (`diffusion-align label --convention "
                                                "pickscore=cosine` writes them).")
    pref_scorer: str | None = _key("pickscore", "smpo: scorer NAME[=PATH] that computes those columns once before "
                                                "training (cached in <output_dir>/soft-labels) when the dataset lacks "
                                                "them; null = the columns must be there.")
    score_min: float = _key(0.11543526500463486, "smpo: soft label p = sigmoid(n_w - n_l) with n = (s - score_min) "
                                                 "/ (score_max - score_min); the authors' PickScore constants.")
    score_max: float = _key(0.28201571106910706, "smpo: see score_min.")
    precomputed_reference: bool = _key(False, "dpo, dcpo, smpo (with inversion_steps=0): compute the reference "
                                              "UNet's errors for every pair and epoch before training (each pair's "
                                              "noise and timestep are fixed by seed, epoch and pair), then train with "
                                              "no reference model in memory and no reference pass. Kept beside the "
                                              "latent cache (or in output_dir) and reused by runs with the same key. "
                                              "The pass runs the UNet as the on-the-fly reference would: its weights "
                                              "in the train.mixed_precision dtype, under the training autocast.")
    reference_batch_size: int | None = _key(None, "Pairs per batch of that pass; null = 4 x train.batch_size.",
                                            within="[1, inf)")


@dataclass
class ModelConfig:
    pretrained: str = _key("stable-diffusion-v1-5/stable-diffusion-v1-5",
                           "Hub id or local diffusers folder of an SD1.x, SD2.x, SDXL, SD3 / SD3.5 or FLUX.1 pipeline.")
    revision: str | None = _key(None, "Hub revision (branch, tag or commit) of `pretrained`.")
    variant: str | None = _key(None, "Weight variant to load, e.g. fp16 (files named *.fp16.safetensors).")
    vae: str | None = _key(None, "Hub id or folder of a replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix.")
    prediction_type: str | None = _key(None, "What the UNet predicts; null = what the checkpoint's scheduler says. "
                                             "Set it to assert it: a mismatch with the checkpoint is an error.",
                                       choices=("epsilon", "v_prediction"))
    max_sequence_length: int | None = _key(None, "T5 tokens the SD3 / FLUX text encoders read (prompt shorter: "
                                                 "padded; longer: cut); null = the pipeline's default (SD3 256, FLUX "
                                                 "512). Must match the length the model is sampled with (`generate "
                                                 "--max-sequence-length`; the pipelines take at most 512). An SD1.x / "
                                                 "SD2.x / SDXL model (no T5) with it set is an error.",
                                           within=f"[1, {T5_MAX_TOKENS}]")
    lora_rank: int | None = _key(8, "LoRA rank; null = full fine-tune of the UNet.", within="[1, inf)")
    lora_alpha: float | None = _key(None, "LoRA alpha; null = equal to the rank (scale 1).", within="(0, inf)")
    lora_target_modules: list[str] | None = _key(None, "Denoiser modules that get LoRA adapters; null = the family's "
                                                       "(UNets: to_q, to_k, to_v, to_out.0; SD3 and FLUX: those "
                                                       "of diffusers' LoRA scripts).")
    ref_offload: bool = _key(False, "Full fine-tune only: keep the frozen reference UNet on the CPU and stream its "
                                    "layers to the GPU when needed (saves memory, costs speed).")
    gradient_checkpointing: bool = _key(False, "Recompute UNet activations in the backward pass to save memory.")
    compile: bool = _key(False, "torch.compile the training UNet (inductor: a C++ compiler on CPU, triton on CUDA; "
                                "an error says which is missing). The first steps are slow while it compiles. "
                                "Offline methods only: online ones sample with the uncompiled UNet.")
    channels_last: bool = _key(False, "Keep the UNet's convolution weights channels-last (NHWC): faster convolutions "
                                      "on CUDA tensor cores in fp16/bf16; measure before using it elsewhere.")
    attention: str = _key("auto", "Attention kernel: auto (xformers if importable on CUDA, else PyTorch SDPA), "
                                  "sdpa, or xformers (error if it cannot run).", choices=("auto", "sdpa", "xformers"))
    cudnn_attention: bool = _key(False, "Let PyTorch's SDPA use its cuDNN backend (CUDA). Off by default: on an H200 "
                                        "with torch 2.11, FLUX.1-dev's LoRA backward failed inside it (an illegal "
                                        "memory access, or `mha_graph.execute(...).is_good()`: a known torch defect, "
                                        "pytorch/pytorch#134001), and ran with it off; SDPA then takes its flash or "
                                        "memory-efficient kernels (benchmarks/README.md, gpu_check.sh).")


@dataclass
class DataConfig:
    path: str = _key("yuvalkirstain/pickapic_v2", "Pick-a-Pic-style pairs: hub dataset name, parquet file/glob/folder, "
                                                  "or a save_to_disk folder.")
    split: str = _key("train", "Split to read from a hub dataset or DatasetDict.")
    streaming: bool = _key(False, "Stream the dataset instead of loading it (for very large sets).")
    keep_ties: bool = _key(False, "smpo: keep the pairs people tied, oriented by their reward scores; by default "
                                  "ties are dropped and counted (the other methods' only way: a tie has no winner).")
    max_pairs: int | None = _key(None, "Use a random sample of N pairs (after dropping ties), drawn with train.seed: "
                                       "the same pairs on every process and on resume; with data.streaming=true, "
                                       "the first N pairs.", within="[1, inf)")
    max_skipped_share: float = _key(0.5, "Stop the run when more than this share of the rows drawn could not be "
                                         "decoded, checked from one whole pass over the data on (the data is "
                                         "broken, not a few of its images); 1 = never. A stream (data.streaming) "
                                         "stops only where a whole pass has no usable pair.", within="[0, 1]")
    center_crop: bool = _key(True, "Centre crop after resizing; false = random crop.")
    random_flip: str = _key("no", "Random horizontal flips, each with probability 0.5: no; pair = one coin per pair, "
                                  "both images flipped together (diffusers' SDXL DPO script, MaPO); image = one coin "
                                  "per image (the Diffusion-DPO authors' code, diffusers' SD1.5 DPO script).",
                            choices=("no", "pair", "image"))
    latents: str = _key("sample", "The latent an image is trained as: sample = a draw from its VAE posterior (mean + "
                                  "std * noise), as the Diffusion-DPO authors' and diffusers' training scripts do; "
                                  "mean = the posterior mean, for a base model pretrained on means (the toy world's): "
                                  "draws would teach it a noise it never saw.", choices=("sample", "mean"))
    prompt_dropout: float = _key(0.0, "Probability of replacing a pair's prompt with the empty prompt "
                                      "(the Diffusion-DPO authors used 0.2).", within="[0, 1]")
    num_workers: int = _key(2, "DataLoader worker processes that decode and augment images (not used with data.cache: "
                               "cached items are read in the training process).", within="[0, inf)")
    cache: bool = _key(False, "Train from a latent and text-embedding cache (`diffusion-align cache`), made first if "
                              "need be: every image's VAE posterior and every caption's encoder states, so training "
                              "loads neither the VAE nor the text encoders. Needs data.streaming=false and "
                              "data.center_crop=true; with random flips it holds both mirror images.")
    cache_dir: str | None = _key(None, "The latent cache's folder; null = <output_dir>/latent-cache. A cache made "
                                       "from other data, models, resolution, flips or dtype is an error, never used.")
    cache_dtype: str = _key("fp16", "Storage dtype of the cached posteriors and text states (fp32: a cached run "
                                    "equals an uncached one exactly).", choices=("fp16", "bf16", "fp32"))
    cache_batch_size: int = _key(16, "Images per VAE batch while the cache is made.", within="[1, inf)")
    vae_encode_batch_size: int | None = _key(None, "Without data.cache: images per VAE call when a step encodes its "
                                                   "pairs (diffusers' --vae_encode_batch_size); null = all of the "
                                                   "step's images in one call, whose activations grow with them "
                                                   "(about 0.6 GB an image at 512 px in fp32).", within="[1, inf)")


@dataclass
class OnlineConfig:
    """pref_grpo / grpo: each step samples `group_size` images of `prompts_per_step` prompts per process, rewards
    them, and makes `updates_per_rollout` clipped policy updates on a random part of their denoising steps."""
    prompts: str | None = _key(None, "Prompt file (.txt one per line, .jsonl or .csv with a prompt column): the "
                                     "prompts to sample, in a seeded order that every process shares.")
    reward: str = _key("pickscore", "Scorer NAME[=PATH] (see `diffusion-align score --help`) whose scores reward the "
                                    "images (grpo) or give their pairwise preferences (pref_grpo).")
    judge: str | None = _key(None, "pref_grpo only: a transformers image-text-to-text model (hub id or folder) "
                                   "asked which of two images is better, instead of online.reward's preferences.")
    judge_order: str = _key("random", "pref_grpo with a judge: the order each pair is shown in. random (cancels "
                                      "position bias on average), both (each pair twice, the bias cancels exactly; "
                                      "2x the judge calls) or fixed (the authors' code: the lower index first).",
                            choices=("random", "both", "fixed"))
    judge_answers: list[str] = _key(["1", "2"], "pref_grpo with a judge: the two answers (first image, second "
                                                "image) whose next-token logits give P(first); each must be one token "
                                                "of the judge's tokenizer (e.g. A,B where 1 and 2 are not).")
    pref_temperature: float = _key(1.0, "pref_grpo with a scorer: P(i beats j) = sigmoid(scale * (s_i - s_j) / T), "
                                        "scale the scorer's own (PickScore's 2-way softmax at T = 1). Larger T turns "
                                        "near-ties into ~0.5.", within="(0, inf)")
    group_size: int = _key(8, "Images per prompt (G), compared within their group. Published: 8 (Pref-GRPO), 16 "
                              "(DanceGRPO SD1.4).", within="[2, inf)")
    prompts_per_step: int = _key(2, "Prompts (groups) per process per step.", within="[1, inf)")
    sample_steps: int = _key(20, "Sampling steps per image (DDIM for the UNet families, the flow SDE for SD3 and "
                                 "FLUX).", within="[1, inf)")
    eta: float = _key(1.0, "UNet families: DDIM eta (> 0: each step is a Gaussian with a log-probability).",
                      within="[0, inf)")
    noise_level: float = _key(0.7, "SD3 / FLUX: the noise level a of Flow-GRPO's SDE step (> 0: each step is a "
                                   "Gaussian with a log-probability). Published: 0.7 (Flow-GRPO on SD3.5, Pref-GRPO "
                                   "on FLUX), 0.9 (Flow-GRPO on FLUX).", within="[0, inf)")
    sde_type: str = _key("sde", "SD3 / FLUX: the stochastic step. sde: Flow-GRPO's SDE with the ODE's marginals; "
                                "cps: its coefficients-preserving step (std s' sin(a pi / 2), noise level a in "
                                "(0, 1]), with Flow-GRPO's surrogate log-probability -(x' - mean)^2, the step of its "
                                "Flow-GRPO-Fast recipes (noise level 0.8, clip range 1e-5).", choices=("sde", "cps"))
    sde_kl: str = _key("flow_grpo", "SD3 / FLUX: the KL to the reference (online.kl_beta) of an sde step. flow_grpo: "
                                    "its code's, the two steps' Gaussians' KL times the step's length s - s', which "
                                    "its published weights are for; gaussian: the Gaussians' KL, as a DDIM or CPS "
                                    "step's either way (and an sde step's before this key).",
                       choices=("flow_grpo", "gaussian"))
    guidance: float | None = _key(None, "Classifier-free guidance scale when sampling and when re-scoring the steps "
                                        "(null: 5, DanceGRPO's SD setting; <= 1: none, the conditional call alone, "
                                        "as the pipelines); FLUX: the guidance input of FLUX.1-dev, no "
                                        "CFG (null: 3.5, as FluxPipeline samples and the offline methods train).",
                                  within="[0, inf)")
    train_fraction: float = _key(0.6, "Fraction of the sampling steps trained per step, drawn at random, never the "
                                      "last: round(train_fraction x sample_steps) of them, at least one and at most "
                                      "sample_steps - 1 (the authors' codes count int(fraction x (steps - 1)) "
                                      "(DanceGRPO, Pref-GRPO) or int(fraction x steps) (Flow-GRPO); the recipes "
                                      "give their counts).", within="(0, 1]")
    sde_window: int = _key(0, "0: every sampling step draws from the policy's Gaussian and a random train_fraction "
                              "of them is trained. k > 0: Flow-GRPO-Fast's window: k consecutive steps, placed at "
                              "random in the first half of the steps (sde_window_per), are stochastic, the others "
                              "deterministic (the ODE; DDIM at eta 0), and only the window is trained "
                              "(train_fraction unused). Published: 1-3 (Flow-GRPO-Fast).", within="[0, inf)")
    sde_window_per: str = _key("call", "Where sde_window's place is drawn. call: for each sampling call "
                                       "(train.batch_size images), as Flow-GRPO-Fast's pipeline calls draw it; step: "
                                       "once a step, for all its calls (each update's gradient is then one window's). "
                                       "With same_noise_per_group, once a step either way: a group's images take "
                                       "the steps before it once.", choices=("call", "step"))
    deterministic_last_step: bool = _key(False, "true: the last sampling step (never trained) is the policy's "
                                                "deterministic step, so the images rewarded are the flow families' "
                                                "x0 estimate there, as DanceGRPO's and Pref-GRPO's code decode "
                                                "(DDIM at eta 0 on the UNets); false: it is drawn like the others "
                                                "and the final latents are decoded, as Flow-GRPO does.")
    per_sample_timesteps: bool = _key(False, "true: each image trains its own random train_fraction of the steps, "
                                             "as DanceGRPO's and Pref-GRPO's code do (a permutation per sample); "
                                             "false (ours, the default): one draw per update, shared by its images.")
    same_noise_per_group: bool = _key(False, "true: the images of a group start from one shared initial noise and "
                                             "differ only by the sampler's noise, as Pref-GRPO's recipes "
                                             "(--init_same_noise) and DanceGRPO's SD code do (with sde_window, "
                                             "the deterministic steps before the window are then taken once per "
                                             "group); false (ours, the default): independent initial noise per "
                                             "image.")
    updates_per_rollout: int = _key(2, "Optimiser updates per step's samples (the samples are split in that many "
                                       "parts); only the first sees ratio 1.", within="[1, inf)")
    clip_range: float = _key(1e-4, "PPO clip range eps of the ratio.", within="(0, inf)")
    advantage_std: str = _key("group", "The std that z-scores the rewards around their group's mean. group: each "
                                       "group's own (DanceGRPO's and Pref-GRPO's code); global: the population std "
                                       "of all the step's rewards, every process's (Flow-GRPO's global_std).",
                              choices=("group", "global"))
    adv_clip: float = _key(5.0, "Advantages are clamped to [-adv_clip, adv_clip].", within="(0, inf)")
    kl_beta: float = _key(0.0, "Weight of the per-step KL to the reference (LoRA: adapters off); 0 = none. On "
                               "SD3 / FLUX's sde steps, the KL of online.sde_kl.",
                          within="[0, inf)")
    reward_dtype: str = _key("fp32", "The dtype online.reward and online.track score in. fp32: as Flow-GRPO's code "
                                     "loads its PickScore, ImageReward and aesthetic scorers (rewards.py), and "
                                     "DDPO's its aesthetic scorer; frozen: train.mixed_precision's, which halves "
                                     "their memory (bf16 scores reorder a few groups). online.judge runs in the "
                                     "frozen dtype either way, as Flow-GRPO's VLM scorers run in bf16.",
                             choices=("fp32", "frozen"))
    track: list[str] = _key([], "Other scorers NAME[=PATH] whose mean score of each step's samples is logged as "
                                "tracked_<name>, never trained on: e.g. toy-oracle, to watch the proxy reward's gap "
                                "to the truth.")
    grid_every: int = _key(0, "Every N steps, sample the first 4 prompts with fixed seeds (eta 0) into "
                              "<output_dir>/grids/step-<N>.png; 0 = never.", within="[0, inf)")


@dataclass
class TrainConfig:
    output_dir: str = _key("outputs/run", "Where checkpoints, logs and the final model go.")
    max_steps: int = _key(2000, "Number of steps: optimiser steps (offline methods) or rollouts (online methods, "
                                "each with online.updates_per_rollout updates; the lr schedule counts rollouts).",
                                within="[1, inf)")
    batch_size: int = _key(1, "Pairs per process per micro-step (online methods: images per sampling and training "
                              "micro-batch, the same so the first ratio is exactly 1).", within="[1, inf)")
    grad_accum: int = _key(1, "Micro-steps accumulated per optimiser step (online methods: must be 1; an update "
                              "accumulates over its micro-batches and trained timesteps).", within="[1, inf)")
    lr: float = _key(1e-5, "Learning rate (per pair of the effective batch if scale_lr is true).", within="(0, inf)")
    scale_lr: bool = _key(False, "Multiply lr by the effective batch (processes x batch_size x grad_accum), "
                                 "as the Diffusion-DPO authors do with lr 1e-8.")
    lr_scheduler: str = _key("constant_with_warmup", "diffusers lr schedule name.",
                             choices=("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = _key(0, "Linear lr warm-up steps.", within="[0, inf)")
    optimizer: str = _key("adamw", "adamw, adafactor (transformers) or adamw8bit (needs bitsandbytes).",
                          choices=("adamw", "adafactor", "adamw8bit"))
    weight_decay: float = _key(1e-2, "Weight decay (AdamW variants).", within="[0, inf)")
    adam_beta1: float = _key(0.9, "AdamW beta1.", within="[0, 1)")
    adam_beta2: float = _key(0.999, "AdamW beta2.", within="[0, 1)")
    adam_eps: float = _key(1e-8, "AdamW epsilon.", within="(0, inf)")
    max_grad_norm: float | None = _key(1.0, "Clip the gradient norm to this value; null = no clipping.",
                                       within="(0, inf)")
    ema_decay: float = _key(0.0, "Keep an exponential moving average (EMA) of the trained weights, updated every "
                                 "ema_every weight updates with decay min((1 + n) / (10 + n), ema_decay) after "
                                 "update n, and save it as the final model (training/ema.py); 0 = none. Flow-GRPO "
                                 "keeps one with decay 0.9 every 8 updates.", within="[0, 1)")
    ema_every: int = _key(1, "Update the EMA (ema_decay) every N weight updates (Flow-GRPO: 8).", within="[1, inf)")
    ema_repeats: int = _key(1, "Apply the EMA's rule N times at each of its updates, to the same weights (a decay "
                               "of d^N): Flow-GRPO's online scripts step their EMA after every micro-batch, N = "
                               "their train.gradient_accumulation_steps (training/ema.py).", within="[1, inf)")
    mixed_precision: str = _key("no", "no, fp16 or bf16 (frozen models are stored in that dtype too).",
                                choices=("no", "fp16", "bf16"))
    sharding: str = _key("none", "Shard the UNet's weights, gradients and optimiser states over the processes "
                                 "(FSDP2; training/sharding.py): fsdp2, or fsdp2-offload (shards kept in CPU memory), "
                                 "or zero2 (DeepSpeed ZeRO-2: gradients and optimiser states only), or none "
                                 "(data-parallel: every process holds everything, unless the accelerate config "
                                 "launching the run shards: accelerate launch --config_file "
                                 "configs/accelerate/fsdp2.yaml).", choices=("none", "fsdp2", "fsdp2-offload", "zero2"))
    seed: int = _key(0, "Seed for data order, augmentation, noise and timesteps.",
                     within="[0, 4294967295]")  # what accelerate's set_seed takes (numpy's seed range)
    timestep_sampling: str | None = _key(None, "Offline methods on the flow families (SD3, FLUX): how each pair's "
                                               "sigma s is drawn, before the scheduler's shift: logit_normal (s = "
                                               "sigmoid(n), n ~ N(logit_mean, logit_std^2): how SD3 and FLUX train) "
                                               "or uniform (as Diffusion-DPO draws UNet timesteps; diffusers' "
                                               "weighting_scheme=none); null = logit_normal. The UNet families "
                                               "always draw t uniformly.", choices=("logit_normal", "uniform"))
    logit_mean: float = _key(0.0, "timestep_sampling=logit_normal: the mean of n (the SD3 paper's 0); a positive "
                                  "mean draws more noise. diffusers' --logit_mean M is -M here (its scripts look "
                                  "sigmoid(n) up in a table that runs from noise to data).")
    logit_std: float = _key(1.0, "timestep_sampling=logit_normal: the std of n (the SD3 paper's 1; diffusers' "
                                 "--logit_std).", within="(0, inf)")
    resolution: int = _key(512, "Training resolution in pixels (shortest side resized, then square crop).",
                           within="[8, inf)")
    checkpoint_every: int = _key(500, "Save a resumable checkpoint every N steps (0 = never).", within="[0, inf)")
    checkpoints_keep: int | None = _key(None, "Keep only the newest N checkpoints; null = keep all.", within="[1, inf)")
    resume: str | None = _key(None, "Resume from a checkpoint folder, or `latest` in output_dir. The run's config "
                                    "must match the checkpoint's, except for the keys that only say how long to "
                                    "run and what to record (max_steps, logging, checkpoints, workers, ...); "
                                    "max_steps only under a constant lr_scheduler.")
    overwrite: bool = _key(False, "Start afresh in an output_dir that holds a run: its final model, checkpoints, "
                                  "metrics, curves and tracker logs are deleted first (caches are kept). Without it "
                                  "(or train.resume) such an output_dir is an error, never silently replaced.")
    max_nonfinite_steps: int = _key(25, "Stop the run after this many optimiser steps in a row whose gradient was "
                                        "not finite (each is skipped; fp16's loss scaler skips a few while it "
                                        "calibrates).", within="[1, inf)")
    process_timeout: float = _key(120, "Minutes a process of a distributed run waits for the others in a collective "
                                       "before the run fails. The main process alone makes the latent cache, the "
                                       "reference errors (method.precomputed_reference) and SmPO's reward scores "
                                       "while the others wait: raise it for a large set, or make the cache first "
                                       "(`diffusion-align cache`). torch's own is 10 minutes with NCCL.",
                                  within="(0, inf)")
    log_every: int = _key(1, "Write metrics every N steps.", within="[1, inf)")
    report_to: str = _key("tensorboard", "Experiment tracker besides metrics.jsonl.",
                          choices=("tensorboard", "wandb", "none"))


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTION_CLASSES = {"method": MethodConfig, "model": ModelConfig, "data": DataConfig, "online": OnlineConfig,
                    "train": TrainConfig}


class ConfigError(ValueError):
    """A config key or value that is not valid; the message names the key and what was expected."""


def all_keys() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every valid dotted key with its section class and field."""
    return {f"{section}.{f.name}": (cls, f) for section, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)}


# names users bring from the diffusers / trl training scripts, for the "did you mean" hint
_FAMILIAR_NAMES = {"learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "train_batch_size": "batch_size",
                   "per_device_train_batch_size": "batch_size", "rank": "lora_rank", "pretrained_model_name_or_path":
                   "pretrained", "dataset_name": "path", "resume_from_checkpoint": "resume", "checkpointing_steps":
                   "checkpoint_every", "lr_warmup_steps": "warmup_steps", "dpo_beta": "beta",
                   "weighting_scheme": "timestep_sampling"}


def _unknown_key_error(key: str, where: str) -> ConfigError:
    keys = list(all_keys())
    leaf = key.rsplit(".", 1)[-1]
    leaf = _FAMILIAR_NAMES.get(leaf, leaf)
    same_leaf = [k for k in keys if k.rsplit(".", 1)[1] == leaf]  # "lr" -> "train.lr"
    hint = (same_leaf or difflib.get_close_matches(key, keys, n=1, cutoff=0.0))[0]
    return ConfigError(f"unknown config key '{key}' ({where}); did you mean '{hint}'?")


def _field_types(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a field annotated like `int | None`."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(a for a in args if a is not type(None))
        return base, type(None) in args
    return hint, False


def _is_text(value: Any) -> bool:
    """Whether a text key takes `value` as its text: a string, or a number, which `_Loader` reads only from text that
    the number prints back as (a _Written is a string)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _coerce(key: str, cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    base, nullable = _field_types(cls, f)
    given = value  # as written, for the error
    if isinstance(value, _Written):  # a number, or a yes / no, in another form than Python prints it: see _Loader
        if base in (int, float) and ":" in value:
            raise ConfigError(f"config key '{key}' ({where}) expects {base.__name__}, got {str(value)!r}, which YAML "
                              f"1.1 reads as base 60 ({value.parsed}); write the number itself")
        if base in (int, float) and re.fullmatch(r"[+-]?0[0-9_]+", value):  # not YAML 1.1's octal: 0042 is 42
            value = base(int(value.replace("_", "")))
        else:
            value = value.parsed if base in (int, float, bool) else str(value)
    if isinstance(value, str) and value.lower() in ("null", "none", "~") and nullable:
        value = None
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"config key '{key}' ({where}) cannot be null; expected {base.__name__}")
    if base is str and isinstance(value, str) and not value.strip():  # `output_dir=$OUT`, OUT unset: the working folder
        raise ConfigError(f"config key '{key}' ({where}) is empty; expected a str{' or null' if nullable else ''} (an "
                          "unset shell variable?)")
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)  # also accepts "1e-5", which YAML 1.1 reads as a string
        elif typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(_is_text(v) for v in value):
                raise TypeError
            value = [str(v) for v in value]
        elif base is str:
            if value is False and "no" in (f.metadata.get("choices") or ()):
                value = "no"  # `false` for the choice no (mixed_precision, random_flip)
            if not _is_text(value):
                raise TypeError
            # a path under the home folder, in a file and on the command line (where bash leaves `key=~/x` as it is)
            value = expand_home(str(value))
    except (TypeError, ValueError):
        choices = f.metadata.get("choices")
        expected = ("list of strings" if typing.get_origin(base) is list else
                    f"one of {', '.join(choices)}" if choices else base.__name__)
        raise ConfigError(f"config key '{key}' ({where}) expects {expected}"
                          f"{' or null' if nullable else ''}, got {given!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}' ({where}) must be one of {', '.join(choices)}; got {value!r}")
    within = f.metadata.get("within")
    if within and not _inside(value, within):
        raise ConfigError(f"config key '{key}' ({where}) must be {_describe_interval(within)}"
                          f"{' (or null)' if nullable else ''}; got {value!r}")
    return value


def _interval(within: str) -> tuple[float, bool, float, bool]:
    """"[1, inf)" -> (1, True, inf, False): the bounds and whether each is included."""
    low, high = (float(part) for part in within[1:-1].split(","))
    return low, within[0] == "[", high, within[-1] == "]"


def _inside(value: float, within: str) -> bool:
    low, with_low, high, with_high = _interval(within)
    return (low <= value if with_low else low < value) and (value <= high if with_high else value < high)


def _describe_interval(within: str) -> str:
    low, with_low, high, _ = _interval(within)
    if high == float("inf"):
        return f"{'at least' if with_low else 'greater than'} {_bound(low)}"
    return f"between {_bound(low)} and {_bound(high)} ({within})"


def _bound(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"  # a seed's 4294967295 in full


def _flatten(tree: Any, where: str, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (method, model, data, online, train), "
                          f"got {tree!r}")
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if not prefix and value is None and name in _SECTION_CLASSES:
            continue  # a section with no keys (all commented out) sets nothing
        if not prefix and isinstance(value, dict):
            nested = _flatten(value, where, prefix=f"{key}.")
        else:
            nested = {key: value}
        for twice in nested.keys() & flat.keys():  # `train: {lr: ...}` and `train.lr: ...`: which would win is a guess
            raise ConfigError(f"{where}: config key '{twice}' is set twice")
        flat.update(nested)
    return flat


class _Written(str):
    """A plain scalar that YAML 1.1 reads as a number but that is not written as Python prints that number (0123456,
    an octal 42798; 1_000; 1.10; 1:30, a sexagesimal 90; 0x1F; +1; .inf), or as a bool but not written true or false
    (yes, no, on, off): the text as written, for a str key (a hub revision, a folder), and `parsed`, what YAML reads,
    for a numeric or boolean key."""

    parsed: int | float | bool


class _Loader(yaml.SafeLoader):
    """safe_load's YAML 1.1, except that the numbers and bools `_Written` describes keep their text, dates (no key
    takes one) stay text (`2024-05-01` names a folder or a tag), and a key written twice in one mapping is an error
    (YAML says keys are unique; PyYAML keeps the last)."""

    def construct_scalar_as_written(self, node: yaml.ScalarNode) -> int | float | bool | _Written:
        parse = {"int": self.construct_yaml_int, "float": self.construct_yaml_float,
                 "bool": self.construct_yaml_bool}[node.tag.rsplit(":", 1)[1]]
        parsed = parse(node)
        if str(parsed) == node.value or (isinstance(parsed, bool) and node.value.lower() in ("true", "false")):
            return parsed
        written = _Written(node.value)
        written.parsed = parsed
        return written

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key_node.value}' is set twice in one "
                                                        "mapping", key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


for _tag in ("int", "float", "bool"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _Loader.construct_scalar_as_written)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_str)


def _yaml(text: str, where: str) -> Any:
    """`text` parsed as YAML (`_Loader`); a syntax error names `where`, the line and column, and what was wrong."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """(key, value) of `section.key=value`: for a text key, the value's text as it stands (a path, a glob, a name:
    YAML would cut `a #b` at its comment, fail on `*.parquet` and read `a: b` as a mapping); YAML for the other keys
    (numbers, bools, lists), and for a quoted text or one YAML gives a meaning of its own to (true, false, null, ~:
    `_coerce` refuses a bool or a null where the key takes none, and reads false as the choice no)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. train.lr=1e-5)")
    key, raw = (part.strip() for part in text.split("=", 1))
    known = all_keys().get(key)
    if known is None:  # named before its value is read: a mistyped key with a value YAML cannot read (*.parquet)
        raise _unknown_key_error(key, "on the command line")
    if _field_types(*known)[0] is str and not (
            raw.lower() in ("true", "false", "null", "~") or raw.startswith(("'", '"'))):
        return key, raw
    return key, _yaml(raw, f"the value of override '{text}'") if raw else ""


def config_chain(path: Path) -> list[tuple[Path, Any]]:
    """A config file and its YAML tree (without `base:`), then those of the file its top-level `base:` names (a
    path relative to the naming file's folder, itself free to name a base), and so on: a recipe can be another
    recipe with a few keys changed."""
    chain = []
    while True:
        if not path.is_file():
            raise ConfigError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}; expected a YAML config file "
                              "(e.g. configs/sd15/dpo.yaml)")
        if path.resolve() in (p.resolve() for p, _ in chain):
            raise ConfigError(f"{path}: its chain of `base:` files comes back to it "
                              f"({' -> '.join(str(p.resolve()) for p in (*(p for p, _ in chain), path))})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file; expected a YAML config file (e.g. configs/sd15/dpo.yaml)") \
                from None
        tree = _yaml(text, str(path)) or {}
        base = tree.pop("base", None) if isinstance(tree, dict) else None
        chain.append((path, tree))
        if base is None:
            return chain
        if not isinstance(base, str) or not (path.parent / base).is_file():
            raise ConfigError(f"{path}: base: expects the path of a config file relative to {path.parent}, got "
                              f"{base!r}")
        path = path.parent / base


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (after the file its `base:` names, if any), then `key=value` overrides (later
    wins)."""
    cfg = Config()
    valid = all_keys()
    chain = config_chain(Path(path))[::-1] if path is not None else []  # the deepest base first
    layers = [(_flatten(tree, f"in {file}"), f"in {file}") for file, tree in chain]
    layers.append((dict(parse_override(o) for o in overrides), "on the command line"))
    for values, where in layers:
        for key, value in values.items():
            if key not in valid:
                raise _unknown_key_error(key, where)
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, _coerce(key, *valid[key], value, where))
    if not cfg.method.score_max > cfg.method.score_min:  # else SmPO's soft labels turn over, or divide by zero
        raise ConfigError(f"method.score_max={cfg.method.score_max} must be above method.score_min="
                          f"{cfg.method.score_min}: they map the reward scores onto [0, 1]")
    if cfg.train.resolution % 8:  # every supported VAE downsamples by 8: the latents need whole pixels
        raise ConfigError(f"train.resolution={cfg.train.resolution} must be a multiple of 8 (the VAE downsamples "
                          f"by 8), e.g. {cfg.train.resolution // 8 * 8 or 8}")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def describe_keys() -> str:
    """Help text: every key, its default and meaning."""
    lines = []
    for section, cls in _SECTION_CLASSES.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
            lines.append(f"  {section}.{f.name} = {shown}")
            choices, within = f.metadata.get("choices"), f.metadata.get("within")
            allowed = f" [{' | '.join(choices)}]" if choices else f" [{_describe_interval(within)}]" if within else ""
            lines.append(f"      {f.metadata['help']}{allowed}")
    return "\n".join(lines)
