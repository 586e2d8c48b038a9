"""Folder scoring throughput: `score_folder` (DataLoader workers decode, batches are scored) against scoring one
image at a time (open, preprocess, `score_batch` of one), on the same images and scorer in one run.

    python benchmarks/score_folder.py                                  # 256 JPEGs of 512x512, a tiny random PickScore
    python benchmarks/score_folder.py --scorer pickscore=/models/pickscore --images 64 --device cuda

The paths run in turn, `--rounds` times over, and each path's fastest round is reported (as timeit does: slower
rounds are other processes getting in the way). On a shared machine the load changes from second to second, so
absolute numbers are noise and only ratios within one run mean something.
score_folder is timed whole (worker start-up, CSV, summary and histogram included), with exact decoding and with
`fast_jpeg`; the largest score difference of each against the one-at-a-time scores is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion_align.evaluation.scoring import read_scores, score_folder
from diffusion_align.rewards import load_scorer, parse_scorer_spec
from diffusion_align.rewards.tiny import save_tiny_scorer

PROMPTS = ["a red circle on a white background", "a watercolour of a lighthouse at dusk",
           "a photo of a corgi wearing sunglasses", "an isometric city made of paper"]


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` JPEGs (gradients, shapes and grain, so they decode like photos, not flat colour) + metadata.jsonl."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size)
    lines = []
    for i in range(count):
        base = np.stack([np.add.outer(ramp * rng.random(), ramp * rng.random()) % 256 for _ in range(3)], axis=-1)
        image = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y, r = *rng.integers(0, size, 2), int(rng.integers(size // 16, size // 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        grain = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
        Image.fromarray(grain.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i:05d}.jpg", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def one_at_a_time(scorer, folder: Path) -> dict[str, float]:
    """The naive loop: every image opened, preprocessed and scored alone, in this process."""
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    scores = {}
    with torch.inference_mode():
        for record in meta:
            with Image.open(folder / record["file_name"]) as image:
                pixels = scorer.preprocess(image.convert("RGB"))
            scores[record["file_name"]] = scorer.score_batch(pixels[None], [record["prompt"]]).item()
    return scores


def timed_score_folder(scorer, folder: Path, out: Path, **options) -> tuple[float, dict[str, float]]:
    """Seconds for a fresh score_folder run (no CSV to resume from) and its scores by file."""
    for stale in out.parent.glob(f"{out.stem}.*"):
        stale.unlink()
    start = time.perf_counter()
    score_folder(folder, [scorer], out, **options)
    seconds = time.perf_counter() - start
    return seconds, {row["file"]: row[scorer.column] for row in read_scores(out)[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    parser.add_argument("--scorer", default=None, help="NAME[=PATH]; default: a tiny random pickscore")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the scorer's own")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--work-dir", default=None, help="where the images go (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        if args.scorer:
            name, path = parse_scorer_spec(args.scorer)
        else:
            name, path = "pickscore", save_tiny_scorer("pickscore", work / "tiny-pickscore", seed=0)
        scorer = load_scorer(name, path, device=args.device)
        folder = work / f"images-{args.images}-{args.size}"
        if not (folder / "metadata.jsonl").is_file():
            make_images(folder, args.images, args.size)
        print(f"{args.images} JPEGs of {args.size}x{args.size} px, scorer {name} ({path or 'default weights'}) on "
              f"{scorer.device}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; "
              f"score_folder: batch {args.batch_size or scorer.batch_size}, {args.workers} workers")

        one_at_a_time(scorer, folder)  # warm-up: first-call costs (allocator, kernels, file cache) count in neither
        options = dict(batch_size=args.batch_size, num_workers=args.workers)
        seconds: dict[str, list[float]] = {"one at a time": [], "score_folder": [], "score_folder fast_jpeg": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            naive = one_at_a_time(scorer, folder)
            seconds["one at a time"].append(time.perf_counter() - start)
            took, exact = timed_score_folder(scorer, folder, work / "scores.csv", **options)
            seconds["score_folder"].append(took)
            took, fast = timed_score_folder(scorer, folder, work / "fast.csv", fast_jpeg=True, **options)
            seconds["score_folder fast_jpeg"].append(took)

    base = min(seconds["one at a time"])
    for label, times in seconds.items():
        print(f"{label:24s} {args.images / min(times):8.1f} images/s  {base / min(times):5.2f}x  "
              f"(rounds: {', '.join(f'{t:.2f}' for t in times)} s)")
    spread = statistics.pstdev(naive.values())
    for label, scores in (("score_folder", exact), ("score_folder fast_jpeg", fast)):
        diff = max(abs(naive[f] - scores[f]) for f in naive)
        print(f"largest |score difference| from one at a time, {label}: {diff:.3g} ({scorer.column}; "
              f"std of the scores over the images {spread:.3g})")


if __name__ == "__main__":
    main()
