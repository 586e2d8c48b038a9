"""`diffusion-align` command line: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pathlib import Path

from .config import ConfigError, describe_keys, load_config

# rewards.tiny.TINY_SCORERS, here so that the parser checks the names before anything heavy is imported (a test
# keeps the two equal)
TINY_SCORERS = ("pickscore", "clip", "toy-pickscore", "hpsv2", "hpsv2.1", "aesthetic")


def _setup_logging(process_timeout: float | None = None) -> None:
    from .devices import process_state
    state = process_state(process_timeout)  # under a distributed launch, the first call makes the process group
    prefix = f"[rank {state.process_index}] " if state.num_processes > 1 else ""
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args) -> None:
    from .training.trainer import train
    cfg = load_config(args.config, args.overrides)
    _setup_logging(cfg.train.process_timeout)
    final = train(cfg).final_dir
    print(f"final model: {final.resolve()}")
    print(f"metrics:     {(final.parent / 'metrics.jsonl').resolve()}")


def cmd_plan(args) -> None:
    from .training.memory import RESERVE_GB, format_plan, plan, plan_json
    cfg = load_config(args.config, args.overrides)
    if args.processes < 1 or (args.gpu_memory is not None and args.gpu_memory <= RESERVE_GB):
        raise ConfigError(f"--processes must be >= 1 and --gpu-memory more than the {RESERVE_GB} GB kept for the CUDA "
                          f"context, got {args.processes} and {args.gpu_memory}")
    strategy = args.strategy or {"none": "ddp"}.get(cfg.train.sharding, cfg.train.sharding)
    result = plan(cfg, args.processes, args.gpu_memory, strategy)
    print(plan_json(result) if args.json else format_plan(result))


def cmd_demo(args) -> None:
    from .toy.demo import DemoSettings, run_demo
    _setup_logging()
    report = run_demo(args.out, DemoSettings(method=args.method, family=args.family, labels=args.labels,
                                             label_margin=args.label_margin,
                                             steps=args.steps, prompts=args.prompts,
                                             images_per_prompt=args.images_per_prompt, eval_seeds=args.eval_seeds,
                                             eval_split=args.eval_split, seed=args.seed,
                                             overrides=tuple(args.overrides)))
    win, split = report["oracle_win_rate"], {"heldout": "held-out", "val": "validation"}[args.eval_split]
    print(f"{report['method']} ({args.family} base): oracle win rate of the aligned model over the base "
          f"{win['value']:.3f} "
          f"(95% interval {win['low']:.3f}-{win['high']:.3f}, {win['comparisons']} {split} comparisons); "
          f"toy PickScore {report['toy_reward']['base']:.3f} -> {report['toy_reward']['aligned']:.3f}")
    tied = report["oracle_win_rate_ties_counted"]
    print(f"counting oracle differences under the raters' {tied['margin']} margin as ties ({tied['ties']:.0%} of "
          f"them): {tied['value']:.3f} ({tied['low']:.3f}-{tied['high']:.3f})")
    print(f"report: {(Path(args.out) / 'report.md').resolve()}")


def cmd_toy_build_assets(args) -> None:
    from .toy.assets import build_assets, build_flow_base
    from .toy.pretrain import PretrainSettings
    from .toy.pretrain_flow import STEPS as FLOW_STEPS
    _setup_logging()
    steps = args.unet_steps or (FLOW_STEPS if args.flow else PretrainSettings.unet_steps)
    settings = PretrainSettings(seed=args.seed, unet_steps=steps, vae_steps=args.vae_steps)
    if args.flow:
        print(json.dumps(build_flow_base(args.out, args.seed, settings), indent=2))
    else:
        print(json.dumps(build_assets(args.out, args.seed, settings, keep_base=args.keep_base), indent=2))


def cmd_make_tiny(args) -> None:
    from .models.tiny import save_tiny_pipeline, write_tiny_pairs
    from .models.tiny_flow import FLOW_FAMILIES, save_tiny_flow_pipeline
    from .rewards.tiny import save_tiny_scorer
    out = Path(args.out_dir)
    for family in args.family:
        save = save_tiny_flow_pipeline if family in FLOW_FAMILIES else save_tiny_pipeline
        print(f"pipeline ({family}): {save(out / f'tiny-{family}', family, seed=args.seed)}")
    for name in args.scorers:
        print(f"scorer ({name}): {save_tiny_scorer(name, out / f'tiny-scorer-{name}', seed=args.seed)}")
    pairs = write_tiny_pairs(out / "tiny-pairs.parquet", num_pairs=args.pairs, seed=args.seed)
    print(f"pairs:          {pairs}")
    # the pairs' captions, one a line: the prompts an online method (configs/tiny/pref-grpo.yaml) samples
    import pyarrow.parquet as pq

    from .files import write_text_atomic
    prompts = sorted(set(pq.read_table(pairs, columns=["caption"]).column("caption").to_pylist()))
    write_text_atomic(out / "prompts.txt", "".join(p + "\n" for p in prompts))
    print(f"prompts:        {out / 'prompts.txt'}")


def _scorers(args, single: bool = False, folders=(), pairs: str | None = None, pairs_out=None) -> list:
    """The --scorer NAME[=PATH] list, loaded once each, with --convention NAME=CONVENTION, --device, --dtype; the
    image `folders` and the `pairs` source they are for (and the folder `pairs_out` their labels go to) are checked
    first, as loading PickScore takes a minute."""
    import torch

    from .data.pairs import check_out_dir, check_pairs_source
    from .evaluation.scoring import image_folder
    from .rewards import load_scorer, parse_scorer_spec
    for folder in folders:
        image_folder(folder)
    if pairs is not None:
        check_pairs_source(pairs)
    if pairs_out is not None:
        check_out_dir(pairs, pairs_out)
    if single and len(args.scorer) != 1:
        raise ValueError(f"diffusion-align {args.command} takes one --scorer, got {len(args.scorer)}")
    conventions = dict(_pair(c, "--convention", "NAME=CONVENTION") for c in args.convention)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    scorers = []
    for spec in args.scorer:
        name, path = parse_scorer_spec(spec)
        options = {"convention": conventions.pop(name)} if name in conventions else {}
        if args.batch_size:
            options["batch_size"] = args.batch_size
        scorers.append(load_scorer(name, path, device=args.device, dtype=dtype, **options))
    if conventions:
        raise ValueError(f"--convention names scorer(s) {sorted(conventions)} that no --scorer loads")
    return scorers


def _pair(text: str, flag: str, form: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"{flag} {text!r}: expected {form}")
    return key, value


def cmd_score(args) -> None:
    from .evaluation.scoring import score_folder
    scorers = _scorers(args, folders=[args.dir])
    print(score_folder(args.dir, scorers, args.out, prompt=args.prompt, batch_size=args.batch_size,
                       num_workers=args.workers, fast_jpeg=args.fast_jpeg))


def cmd_compare(args) -> None:
    from .evaluation.compare import compare_folders
    scorer, = _scorers(args, single=True, folders=[args.dir_a, args.dir_b])
    print(compare_folders(args.dir_a, args.dir_b, scorer, out_prefix=args.out, prompt=args.prompt,
                          batch_size=args.batch_size, num_workers=args.workers, fast_jpeg=args.fast_jpeg,
                          n_resamples=args.resamples, confidence=args.confidence, seed=args.seed,
                          tie_margin=args.tie_margin))


def cmd_label(args) -> None:
    from .rewards.labeling import check_captions_kept, label_pairs, pairs_from_folder
    if args.from_images:
        scorer, = _scorers(args, single=True, folders=[args.source])
        report = pairs_from_folder(args.source, scorer, args.out, max_pairs_per_prompt=args.max_pairs_per_prompt,
                                   seed=args.seed, tie_margin=args.tie_margin, batch_size=args.batch_size,
                                   num_workers=args.workers, shard_size=args.shard_size)
    else:
        check_captions_kept(args.source)  # before the scorer loads
        scorer, = _scorers(args, single=True, pairs=args.source, pairs_out=args.out)
        report = label_pairs(args.source, scorer, args.out, tie_margin=args.tie_margin, batch_size=args.batch_size,
                             shard_size=args.shard_size, num_workers=args.workers, split=args.split,
                             max_pairs=args.max_pairs)
    print(report)


def cmd_cache(args) -> None:
    from .data.cache import build_cache
    _setup_logging()
    print(build_cache(args.dataset, args.out, args.model, args.split, args.revision, args.variant, args.vae,
                      args.resolution, args.flips, args.dtype, args.batch_size, args.device, args.workers,
                      max_sequence_length=args.max_sequence_length))


def cmd_fit_reward(args) -> None:
    from .rewards.fit_reward import fit_reward
    print(fit_reward(args.dataset, args.base, args.out, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                     batch_size=args.batch_size, val_fraction=args.val_fraction, seed=args.seed,
                     warmup_steps=args.warmup_steps, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
                     processor=args.processor, split=args.split, max_pairs=args.max_pairs,
                     eval_pairs=args.eval_pairs, num_workers=args.workers, device=args.device))


def cmd_captions(args) -> None:
    import torch

    from .data.captions import make_captions
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(make_captions(args.source, args.out, args.strategy, captioner=args.captioner, perturber=args.perturber,
                        strength=args.strength, seed=args.seed, batch_size=args.batch_size, device=args.device,
                        dtype=dtype, max_new_tokens=args.max_new_tokens, use_prompt=not args.no_prompt,
                        split=args.split, max_pairs=args.max_pairs, shard_size=args.shard_size,
                        num_workers=args.workers))


def cmd_generate(args) -> None:
    import torch

    from .evaluation.generate import generate_images
    dtype = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(generate_images(args.model, args.prompts, args.seeds, args.out, lora=args.lora, steps=args.steps,
                          guidance=args.guidance, height=args.height, width=args.width, batch_size=args.batch_size,
                          scheduler=args.scheduler, device=args.device, dtype=dtype,
                          negative_prompt=args.negative_prompt, max_sequence_length=args.max_sequence_length))


def cmd_grid(args) -> None:
    if not (args.out or args.html):
        raise ValueError("grid writes --out PNG pages, an --html review page, or both: give at least one")
    if not args.html and (args.ab or args.title):
        raise ValueError("--ab and --title are the review page's: give --html too")
    if args.ab:  # before any scorer is loaded or page drawn
        from .evaluation.grid import folder_labels
        from .evaluation.review import blind_pair
        blind_pair(args.ab, folder_labels(args.dirs))
    scorer = _scorers(args, single=True, folders=args.dirs)[0] if args.scorer else None
    scores = None
    if args.out:
        from .evaluation.grid import make_grid
        report = make_grid(args.dirs, args.out, scorer=scorer, rows_per_page=args.rows_per_page,
                           cell_size=args.cell_size, prompt=args.prompt)
        print(report)
        scores = report.scores if scorer is not None else None  # the page shows them without scoring again
    if args.html:
        from .evaluation.review import write_review_page
        page = write_review_page(args.dirs, args.html, prompt=args.prompt, ab=args.ab, seed=args.seed,
                                 title=args.title, scorer=scorer, scores=scores)
        print(f"review page: {page.resolve()}")


def cmd_import_review(args) -> None:
    from .evaluation.review import import_review
    print(import_review(args.choices, args.images, args.out, shard_size=args.shard_size))


def cmd_plot(args) -> None:
    from .evaluation.plots import plot_run
    print(f"curves: {plot_run(args.run_dir)}")


def cmd_export(args) -> None:
    import tempfile

    from .models.export import export, find_source, source_family
    from .training.checkpoints import gather_sharded
    source = find_source(args.source, args.base, args.live_weights)
    beside_out = Path(args.out).resolve().parent  # where there is room for what is exported
    beside_out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gathered-", dir=beside_out) as scratch:
        weights = gather_sharded(source, Path(scratch), args.live_weights) if source.kind == "sharded" else source
        written = export(weights, args.format, args.out, args.dtype, args.overwrite).resolve()
    print(f"{args.format}: {written} (from {source.folder})")
    if args.format == "single-file":
        print(f"load it in {source_family(source).single_file_loaders}")
        return
    in_diffusers = f'pipe = DiffusionPipeline.from_pretrained("{source.base}"); pipe.load_lora_weights("{written}")'
    print({"kohya": f"load it in ComfyUI (LoraLoader), AUTOMATIC1111 or Forge (models/Lora/), or in diffusers: "
                    f"{in_diffusers}",
           "comfyui": f"load it in ComfyUI (LoraLoader, strength 1), or in diffusers: {in_diffusers}",
           "diffusers": f"load it in diffusers: {in_diffusers}",
           "merged": f'load it in diffusers: DiffusionPipeline.from_pretrained("{written}")'}[args.format])


def cmd_convert(args) -> None:
    from .models.single_file import convert
    written = convert(Path(args.checkpoint), Path(args.out), args.config, args.overwrite, args.variant).resolve()
    print(f"pipeline: {written} (from {args.checkpoint}); train on it with model.pretrained={written}")


def _scorer_flags(parser: argparse.ArgumentParser, many: bool, required: bool = True) -> None:
    parser.add_argument("--scorer", required=required, action="append", metavar="NAME[=PATH]",
                        help="pickscore, hpsv2, hpsv2.1, clip, aesthetic, or the toy world's toy-pickscore and "
                             "toy-oracle; =PATH for local weights (see "
                             "reward_models/)" + (" (repeat for several)" if many else ""))
    parser.add_argument("--convention", action="append", default=[], metavar="NAME=CONVENTION",
                        help="score convention of a scorer, e.g. clip=raw, clip=torchmetrics, pickscore=cosine")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="dtype of the models")
    parser.add_argument("--batch-size", type=int, default=None, help="images per scorer call (default 32)")


def _workers_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes that decode images")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version
    try:
        installed = version("diffusion-align")
    except PackageNotFoundError:  # run from a checkout that was never installed
        installed = "unknown (not installed)"
    parser = argparse.ArgumentParser(
        prog="diffusion-align", description="Align text-to-image diffusion models with human preferences: train "
        "(Diffusion-DPO, MaPO, SmPO, DCPO, SFT, Pref-GRPO, GRPO), score, compare and review. `diffusion-align demo` "
        "runs the whole loop offline in a toy world; `diffusion-align COMMAND --help` says more.")
    parser.add_argument("--version", action="version", version=f"diffusion-align {installed}")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they show on a terminal only, on stderr; training's always)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train with a preference method (DPO, MaPO, SmPO, DCPO, SFT; Pref-GRPO and "
                                         "GRPO online).",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train a UNet or a flow transformer (LoRA or full) with a preference "
                                       "objective.\n\nA YAML file may build on another: a top-level `base: "
                                       "other.yaml` (relative to the file) is read first, then the file's own keys.\n\n"
                                       "Config keys (set them in the YAML file or as key=value):\n" + describe_keys())
    train.add_argument("config", nargs="?", help="YAML config file (see configs/); omit to use only the defaults "
                                                 "and overrides")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-5 model.lora_rank=null")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="Memory per process of a training config (weights, gradients, optimizer, "
                                       "reference, encoders, activations), whether it fits, and the cheapest change "
                                       "that would; no weights are loaded.")
    plan.add_argument("config", nargs="?", help="YAML config file, as for train")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.lora_rank=null")
    plan.add_argument("--processes", type=int, default=1, help="processes (GPUs) the run is spread over")
    plan.add_argument("--gpu-memory", type=float, default=None, help="GiB of memory per GPU, as cards are sold "
                                                                     "(24, 48, 80); with it, say whether it fits")
    plan.add_argument("--strategy", default=None, choices=("ddp", "fsdp2", "fsdp2-offload", "zero2"),
                      help="ddp replicates everything; fsdp2 shards weights, gradients and optimizer states; "
                           "fsdp2-offload keeps them on the CPU; zero2 shards gradients and optimizer states "
                           "(default: the config's train.sharding, none being ddp)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    score = sub.add_parser("score", help="Score every image under a folder with one or more reward models.")
    score.add_argument("dir", help="image folder (recursive); prompts from metadata.jsonl, a .txt beside each "
                                   "image, or --prompt")
    score.add_argument("--out", required=True, help="CSV of scores; a summary JSON and histograms go beside it, "
                                                    "and a rerun skips the images already in it")
    score.add_argument("--prompt", help="prompt for images that have none recorded")
    score.add_argument("--fast-jpeg", action="store_true", help="let the JPEG decoder downscale (faster; scores "
                                                                "move by ~1%% of their spread, see benchmarks/)")
    _scorer_flags(score, many=True)
    _workers_flag(score)
    score.set_defaults(func=cmd_score)

    compare = sub.add_parser("compare", help="Win rate of folder A over folder B, matched by prompt (and seed).")
    compare.add_argument("dir_a")
    compare.add_argument("dir_b")
    compare.add_argument("--out", help="output prefix for PREFIX.csv (per prompt) and PREFIX.json "
                                       "(default compare-A-vs-B)")
    compare.add_argument("--prompt", help="prompt for images that have none recorded")
    compare.add_argument("--fast-jpeg", action="store_true", help="see `score --help`")
    compare.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (of prompts)")
    compare.add_argument("--confidence", type=float, default=0.95)
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--tie-margin", type=float, default=0.0, help="a score gap up to this is a tie (in the "
                                                                       "scorer's units), as in `label`")
    _scorer_flags(compare, many=False)
    _workers_flag(compare)
    compare.set_defaults(func=cmd_compare)

    label = sub.add_parser("label", help="Label preference pairs with a reward model (AI feedback).")
    label.add_argument("source", help="Pick-a-Pic-style pairs (hub name, parquet, folder, save_to_disk), or with "
                                      "--from-images a folder of generated images")
    label.add_argument("--out", required=True, help="output folder of Pick-a-Pic-style parquet shards")
    label.add_argument("--from-images", action="store_true", help="build pairs from images of the same prompt")
    label.add_argument("--tie-margin", type=float, default=0.0, help="a score gap up to this is a tie "
                                                                     "(in the scorer's units)")
    label.add_argument("--shard-size", type=int, default=1000, help="pairs per output parquet file")
    label.add_argument("--split", default="train")
    label.add_argument("--max-pairs", type=int, help="label only the first N pairs")
    label.add_argument("--max-pairs-per-prompt", type=int, help="--from-images: best-vs-worst plus random pairs, "
                                                                "at most N per prompt (default: all pairs)")
    label.add_argument("--seed", type=int, default=0)
    _scorer_flags(label, many=False)
    _workers_flag(label)
    label.set_defaults(func=cmd_label)

    cache = sub.add_parser("cache", help="Encode preference pairs once for training (data.cache=true): every "
                                         "image's VAE posterior and every caption's text-encoder states.")
    cache.add_argument("dataset", help="Pick-a-Pic-style pairs (hub name, parquet, folder, save_to_disk)")
    cache.add_argument("--model", required=True, help="the pipeline trained on (hub id or diffusers folder)")
    cache.add_argument("--out", required=True, help="the cache folder (data.cache_dir); an unfinished one resumes")
    cache.add_argument("--split", default="train")
    cache.add_argument("--revision")
    cache.add_argument("--variant", help="weight variant, e.g. fp16")
    cache.add_argument("--vae", help="a replacement VAE (model.vae)")
    cache.add_argument("--resolution", type=int, default=512, help="train.resolution")
    cache.add_argument("--flips", action="store_true", help="also cache the mirror images (data.random_flip)")
    cache.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="data.cache_dtype")
    cache.add_argument("--batch-size", type=int, default=16, help="images per VAE batch")
    cache.add_argument("--device", help="default: cuda if available, else cpu")
    cache.add_argument("--max-sequence-length", type=int, help="SD3 / FLUX: T5 tokens per caption "
                                                               "(model.max_sequence_length; default: the pipeline's)")
    _workers_flag(cache)
    cache.set_defaults(func=cmd_cache)

    fit = sub.add_parser("fit-reward", help="Train a CLIP model with the PickScore objective on preference pairs.")
    fit.add_argument("dataset", help="Pick-a-Pic-style pairs; ties are kept (0.5/0.5 targets)")
    fit.add_argument("--base", required=True, help="CLIPModel folder or hub id to start from")
    fit.add_argument("--processor", help="where the tokenizer / image processor come from, if not from --base")
    fit.add_argument("--out", required=True, help="output folder; load it with load_scorer('pickscore', OUT)")
    fit.add_argument("--steps", type=int, default=4000)
    fit.add_argument("--lr", type=float, default=3e-6)
    fit.add_argument("--weight-decay", type=float, default=0.3)
    fit.add_argument("--batch-size", type=int, default=128, help="pairs per step")
    fit.add_argument("--val-fraction", type=float, default=0.05, help="share of prompts held out")
    fit.add_argument("--warmup-steps", type=int, default=500)
    fit.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    fit.add_argument("--max-grad-norm", type=float, default=1.0)
    fit.add_argument("--eval-pairs", type=int, default=1000, help="training pairs whose loss is reported")
    fit.add_argument("--split", default="train")
    fit.add_argument("--max-pairs", type=int)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--workers", type=int, default=2)
    fit.add_argument("--device", default=None)
    fit.set_defaults(func=cmd_fit_reward)

    generate = sub.add_parser("generate", help="Generate an image per prompt and seed (resumable), with a "
                                               "metadata.jsonl that score, compare and grid read.")
    generate.add_argument("--model", required=True, help="SD1.x / SD2.x / SDXL / SD3 / FLUX diffusers folder or hub id")
    generate.add_argument("--lora", help="LoRA folder or .safetensors file (e.g. a training run's final/; of "
                          "a checkpoint-<step>/ that holds an EMA, its ema/: the file inside the checkpoint is the "
                          "live weights)")
    generate.add_argument("--prompts", required=True, help=".txt (one a line, # comments), .jsonl (prompt / text / "
                                                           "caption) or .csv (a prompt / text / caption column)")
    generate.add_argument("--seeds", default="0", help="e.g. 0-3, 0,2,5 or 0-3,10 (default 0)")
    generate.add_argument("--out", required=True, help="image folder; a rerun makes only what is missing")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's, 50)")
    generate.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the "
                                                         "pipeline's, 7.5 for SD, 5.0 for SDXL)")
    generate.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    generate.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    generate.add_argument("--scheduler", help="a diffusers scheduler class, e.g. DDIMScheduler, "
                                              "EulerDiscreteScheduler, DPMSolverMultistepScheduler")
    generate.add_argument("--negative-prompt")
    generate.add_argument("--max-sequence-length", type=int, help="SD3 / FLUX: T5 tokens per prompt (default: the "
                                                                  "pipeline's, 256 / 512); a model trained with "
                                                                  "model.max_sequence_length needs the same")
    generate.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    generate.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    generate.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                          help="auto: fp16 on cuda, fp32 elsewhere")
    generate.set_defaults(func=cmd_generate)

    grid = sub.add_parser("grid", help="Comparison grid of image folders (PNG pages) and a review page for people "
                                       "(HTML: side by side, blind A/B with keyboard shortcuts, JSONL export).")
    grid.add_argument("dirs", nargs="+", help="image folders (e.g. from generate), one column each")
    grid.add_argument("--out", help="grid PNG: the first page, always; more go to NAME-002.png, NAME-003.png, ...")
    grid.add_argument("--html", help="self-contained HTML review page")
    grid.add_argument("--rows-per-page", type=int, default=10, help="prompt x seed rows per PNG page")
    grid.add_argument("--cell-size", type=int, default=256, help="pixels per image cell")
    grid.add_argument("--prompt", help="prompt for images that have none recorded")
    grid.add_argument("--ab", nargs=2, metavar=("FOLDER_A", "FOLDER_B"),
                      help="the two folders (by their column label or index) of the blind A/B mode (default: the first "
                           "two)")
    grid.add_argument("--seed", type=int, default=0, help="seed of the A/B page's left/right randomisation")
    grid.add_argument("--title", help="title of the review page")
    _scorer_flags(grid, many=False, required=False)
    grid.set_defaults(func=cmd_grid)

    review = sub.add_parser("import-review", help="Turn review-page exports into Pick-a-Pic-style pairs for train.")
    review.add_argument("choices", nargs="+", help="choices.jsonl file(s) exported from the review page")
    review.add_argument("--images", action="append", required=True,
                        help="an image folder the page was made from (repeat for each)")
    review.add_argument("--out", required=True, help="output folder of parquet shards")
    review.add_argument("--shard-size", type=int, default=1000)
    review.set_defaults(func=cmd_import_review)

    plot = sub.add_parser("plot", help="Draw a run's training curves (metrics.jsonl) as training_curves.png.")
    plot.add_argument("run_dir", help="the train.output_dir of a run")
    plot.set_defaults(func=cmd_plot)

    captions = sub.add_parser("captions", help="Add DCPO's dual captions (caption_0 / caption_1) to preference pairs.")
    captions.add_argument("source", help="Pick-a-Pic-style pairs (hub name, parquet, folder, save_to_disk)")
    captions.add_argument("--out", required=True, help="output folder of parquet shards with caption_0 / caption_1")
    captions.add_argument("--strategy", required=True, choices=("captioning", "perturbation", "hybrid", "c", "p", "h"),
                          help="captioning: a model describes each image; perturbation: the winner keeps the prompt, "
                               "the loser gets a perturbed prompt; hybrid: caption both, perturb the loser's caption")
    captions.add_argument("--captioner", help="image-to-text model id or folder (captioning, hybrid)")
    captions.add_argument("--perturber", default="rules", help="rules (built in, no model) or a text-generation "
                                                               "model id or folder")
    captions.add_argument("--strength", default="medium", choices=("weak", "medium", "strong"),
                          help="rule-based perturbation: 1, 2 or 4 edits")
    captions.add_argument("--no-prompt", action="store_true", help="caption the image alone, without the prompt")
    captions.add_argument("--max-new-tokens", type=int, default=77)
    captions.add_argument("--batch-size", type=int, default=8)
    captions.add_argument("--shard-size", type=int, default=1000)
    captions.add_argument("--split", default="train")
    captions.add_argument("--max-pairs", type=int)
    captions.add_argument("--seed", type=int, default=0)
    captions.add_argument("--device", default=None)
    captions.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    captions.add_argument("--workers", type=int, default=2)
    captions.set_defaults(func=cmd_captions)

    demo = sub.add_parser("demo", help="The whole loop in the toy world, offline, in minutes: make pairs with the "
                                       "base model, label them, train, and judge base and aligned with the oracle.")
    demo.add_argument("--method", default="dpo", choices=("dpo", "mapo", "smpo", "dcpo", "sft", "pref_grpo", "grpo"))
    demo.add_argument("--family", default="unet", choices=("unet", "flow"),
                      help="the toy base: unet (SD's architecture; recipes in configs/toy/) or flow (SD3's "
                           "flow-matching transformer; recipes in configs/toy-flow/)")
    demo.add_argument("--labels", default=None, choices=("proxy", "raters"),
                      help="who labels the offline pairs: proxy (the toy PickScore, AI feedback) or raters (simulated "
                           "people judging by the oracle, with their noise and ties, as Pick-a-Pic's labels are); "
                           "default: proxy on the unet base, raters on the flow base (SmPO: proxy on both)")
    demo.add_argument("--label-margin", type=float, default=0.0,
                      help="with --labels proxy: a toy PickScore gap up to this is a tie, dropped from training")
    demo.add_argument("--out", default="outputs/demo", help="output folder (report.md, report.json, images, model)")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps (default: the method's recipe in configs/toy/, or configs/toy-flow/ for "
                           "the flow base: optimiser steps offline, rollouts online)")
    demo.add_argument("--prompts", type=int, default=None, help="train prompts (at most 212, the default: all)")
    demo.add_argument("--images-per-prompt", type=int, default=None, help="base-model images per train prompt, "
                                                                           "all pairs of them labelled (default: 4 on "
                                                                           "the unet base, 8 on the flow base)")
    demo.add_argument("--eval-seeds", type=int, default=3, help="images per evaluated prompt and model")
    demo.add_argument("--eval-split", default="heldout", choices=("heldout", "val"),
                      help="the prompts judged: heldout (never trained on; report results on these) or val (train "
                           "scenes that get no pairs: tune settings on these)")
    demo.add_argument("--seed", type=int, default=0, help="the pair images, training draws and LoRA initialisation")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="train config keys, e.g. train.lr=1e-4")
    demo.set_defaults(func=cmd_demo)

    toy = sub.add_parser("toy", help="The toy world's assets.").add_subparsers(dest="toy_command", required=True)
    build = toy.add_parser("build-assets", help="Pretrain the toy base model and fit the toy PickScore again "
                                                "(deterministic for a seed; tens of minutes on 2 CPU cores).")
    build.add_argument("--out", default=None, help="default: the shipped assets/toy folder")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--unet-steps", type=int, default=None,
                       help="the denoiser's steps (UNet or transformer); default: the shipped base's, 6000 or 3000")
    build.add_argument("--vae-steps", type=int, default=4000)
    build.add_argument("--keep-base", action="store_true", help="keep an existing base model, refit the reward only")
    build.add_argument("--flow", action="store_true", help="pretrain the flow base (flow-base/) on base/'s VAE "
                                                           "instead; the UNet base and the reward are kept")
    build.set_defaults(func=cmd_toy_build_assets)

    export = sub.add_parser("export", help="Write a run's LoRA or model in the file another program loads: kohya "
                                           "(ComfyUI, AUTOMATIC1111, Forge), comfyui (SD3, FLUX), diffusers, a "
                                           "merged pipeline, or a single-file checkpoint.")
    export.add_argument("source", metavar="RUN_OR_FOLDER", help="a run folder (its final/, else its newest "
                        "checkpoint), a final/ or checkpoint-<step>/ folder (of a sharded run too: its shards are "
                        "gathered), or a folder holding a diffusers LoRA")
    export.add_argument("--format", required=True, choices=("kohya", "comfyui", "diffusers", "merged", "single-file"),
                        help="kohya: one .safetensors UNet LoRA for ComfyUI, AUTOMATIC1111 and Forge; comfyui: an SD3 "
                             "or FLUX LoRA for ComfyUI, its scale folded in; diffusers: the LoRA for "
                             "pipe.load_lora_weights; merged: the LoRA fused into the base, written as a whole "
                             "pipeline for DiffusionPipeline.from_pretrained; single-file: the same model as one "
                             ".safetensors checkpoint in the model's original layout (ComfyUI, AUTOMATIC1111, "
                             "Forge; SD3 without its text encoders, FLUX its transformer alone)")
    export.add_argument("--out", required=True,
                        help="a .safetensors file or a folder (LoRA formats, single-file), a folder (merged)")
    export.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="cast the written weights (default: as trained; LoRA alphas stay fp32)")
    export.add_argument("--base", default=None, help="the base model (hub id or folder) the weights were trained on; "
                                                     "default: model.pretrained of the run's config (whose "
                                                     "model.revision and model.variant apply to that one only)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--live-weights", action="store_true",
                        help="of a checkpoint of a run that keeps an EMA (train.ema_decay): its live weights, which "
                             "training resumes from (default: the EMA, which the run's final/ would hold)")
    export.set_defaults(func=cmd_export)

    convert = sub.add_parser("convert", help="Turn a single-file checkpoint (.safetensors, as ComfyUI and "
                                             "AUTOMATIC1111 load; SD1.x, SD2.x, SDXL, SD3, FLUX.1) into a diffusers "
                                             "pipeline folder to train on (model.pretrained).")
    convert.add_argument("checkpoint", help="the .safetensors checkpoint")
    convert.add_argument("--out", required=True, help="the pipeline folder to write")
    convert.add_argument("--config", default=None,
                         help="a diffusers pipeline of the same architecture (hub id or folder) whose configs, "
                              "tokenizers and scheduler to use, and the parts the file leaves out (the text encoders "
                              "of a UNet alone and of SD3 and FLUX files; the VAE); default, for a whole SD1.x, SD2.x "
                              "or SDXL checkpoint only: diffusers picks one on the hub by the weights' shapes; give a "
                              "local folder to convert offline)")
    convert.add_argument("--variant", default=None,
                         help="the weight variant (e.g. fp16) of the parts taken from --config for a UNet alone "
                              "or an SD3 / FLUX file (the text encoders; the VAE), as a folder downloaded with only "
                              "that variant holds; a whole checkpoint takes no weights from --config")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    convert.set_defaults(func=cmd_convert)

    tiny = sub.add_parser("make-tiny", help="Build tiny random SD/SD2/SDXL/SD3/FLUX.1-dev pipelines, reward models and "
                                            "a synthetic pair set for trying the toolkit without a GPU or the hub.")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", nargs="+", default=["sd"], choices=("sd", "sd2", "sdxl", "sd3", "flux"),
                      help="one pipeline each, in out_dir/tiny-FAMILY (default: sd)")
    tiny.add_argument("--scorers", nargs="*", default=[], choices=TINY_SCORERS, metavar="NAME",
                      help=f"tiny random reward models to build too, any of: {', '.join(TINY_SCORERS)}. Their scores "
                           "are arbitrary and outside the real models' ranges (a tiny PickScore is not near 20)")
    tiny.add_argument("--pairs", type=int, default=64, help="number of synthetic preference pairs")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides += extra  # key=value after a flag: argparse takes positionals only where they stand together
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # only overrides were given (a config file's path may hold a "=": lr=1e-5/config.yaml)
    if getattr(args, "config", None) and "=" in args.config and not os.path.isfile(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None
    from .files import WRITE_ERRORS
    from .training.safety import RunStopped
    if args.no_progress:
        from .progress import no_progress
        no_progress()
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # bad input: the message says what and where
        print(f"diffusion-align {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:  # a run that cannot go on: the message says what is intact
        print(f"diffusion-align {args.command}: stopped: {err}", file=sys.stderr)
        sys.exit(1)
    except WRITE_ERRORS as err:  # a full disk, a read-only folder: each writer removed what it had half written
        print(f"diffusion-align {args.command}: stopped: could not write ({err}); what was finished before is intact "
              "and nothing half-written is left", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: what was written is intact (every writer writes beside and renames)
        print(f"diffusion-align {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        sys.exit(130)


def _resume_hint(args) -> str:
    """For an interrupted `train`: where it can continue from."""
    if args.command != "train":
        return ""
    from .files import list_checkpoints
    output_dir = Path(load_config(args.config, args.overrides).train.output_dir)
    found = list_checkpoints(output_dir)
    if not found:
        return (f"; {output_dir} holds no checkpoint yet: rerun with train.resume=latest to start it again from step "
                "0 (or train.overwrite=true)")
    return f"; the newest checkpoint is {found[-1][1]}: continue with train.resume=latest"


if __name__ == "__main__":
    main()
