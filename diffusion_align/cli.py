"""`diffusion-align` command line: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, describe_keys, load_config


def _setup_logging() -> None:
    from accelerate import PartialState
    state = PartialState()
    prefix = f"[rank {state.process_index}] " if state.num_processes > 1 else ""
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args) -> None:
    from .trainer import train
    cfg = load_config(args.config, args.overrides)
    _setup_logging()
    final = train(cfg).final_dir
    print(f"final model: {final.resolve()}")
    print(f"metrics:     {(final.parent / 'metrics.jsonl').resolve()}")


def cmd_make_tiny(args) -> None:
    from .tiny import save_tiny_pipeline, write_tiny_pairs
    from pathlib import Path
    out = Path(args.out_dir)
    for family in args.family:
        print(f"pipeline ({family}): {save_tiny_pipeline(out / f'tiny-{family}', family, seed=args.seed)}")
    print(f"pairs:          {write_tiny_pairs(out / 'tiny-pairs.parquet', num_pairs=args.pairs, seed=args.seed)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-align", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train with a preference method (DPO, SFT).",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train a UNet (LoRA or full) with a preference objective.\n\n"
                                       "Config keys (set them in the YAML file or as key=value):\n" + describe_keys())
    train.add_argument("config", nargs="?", help="YAML config file (see configs/); omit to use only the defaults "
                                                 "and overrides")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-5 model.lora_rank=null")
    train.set_defaults(func=cmd_train)

    tiny = sub.add_parser("make-tiny", help="Build tiny random SD/SD2/SDXL pipelines and a synthetic pair set "
                                            "for trying the toolkit without a GPU or the hub.")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", nargs="+", default=["sd"], choices=("sd", "sd2", "sdxl"))
    tiny.add_argument("--pairs", type=int, default=64, help="number of synthetic preference pairs")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:  # only overrides were given
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"diffusion-align {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
