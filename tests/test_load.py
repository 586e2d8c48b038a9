"""Scoring a folder of 10,000 small images: killed with SIGKILL part-way, the rerun scores only what is left, and
its peak memory is that of scoring 1,000 images (nothing grows with the folder but the list of rows)."""

import signal
import subprocess
import sys
import time

from PIL import Image

from diffusion_align.evaluation.scoring import read_scores
from diffusion_align.rewards.tiny import save_tiny_scorer

IMAGES = 10_000
PEAK = "PEAK-RSS-KB "
# the command line in a child process that prints its own peak RSS when it ends
SCORE = ("import resource, sys\nfrom diffusion_align.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
         f"    print({PEAK!r} + str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), flush=True)\n")


def lines_in(path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def score(folder, out, scorer) -> list[str]:
    return [sys.executable, "-c", SCORE, "score", str(folder), "--scorer", f"aesthetic={scorer}", "--out", str(out),
            "--workers", "0", "--batch-size", "64"]


def peak_kb(stdout: str) -> int:
    return int(next(line for line in stdout.splitlines() if line.startswith(PEAK))[len(PEAK):])


def test_ten_thousand_images_in_bounded_memory_resumed_after_a_kill(tmp_path):
    scorer = save_tiny_scorer("aesthetic", tmp_path / "aesthetic")
    folder, small = tmp_path / "images", tmp_path / "small"
    for root, count in ((folder, IMAGES), (small, IMAGES // 10)):
        root.mkdir()
        for i in range(count):
            Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, 128)).save(root / f"{i:05d}.png")

    out = tmp_path / "scores" / "scores.csv"
    process = subprocess.Popen(score(folder, out, scorer), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while lines_in(out) < IMAGES // 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the scoring ended before it was killed"
    before = read_scores(out)[1]  # a row cut by the kill is not among them: the rerun scores it again
    assert IMAGES // 4 <= len(before) < IMAGES

    resumed = subprocess.run(score(folder, out, scorer), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"scored {IMAGES - len(before)} images, {len(before)} already in" in resumed.stdout
    after = read_scores(out)[1]
    assert sorted(r["file"] for r in after) == [f"{i:05d}.png" for i in range(IMAGES)], "each image once"
    assert after[:len(before)] == before, "what was written before the kill is kept as it was"

    reference = subprocess.run(score(small, tmp_path / "small-scores.csv", scorer), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]
    big, little = peak_kb(resumed.stdout), peak_kb(reference.stdout)
    print(f"peak RSS: {big / 1024:.0f} MB scoring {IMAGES - len(before)} images, {little / 1024:.0f} MB scoring "
          f"{IMAGES // 10}")
    assert big < 1.2 * little, (big, little)
