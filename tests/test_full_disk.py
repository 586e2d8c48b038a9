"""Every writer on a really full disk (a small tmpfs, filled up): one line and exit 1, nothing half-written left
beside the outputs, what was finished before intact (issue 24, docs/robustness.md). Mounting needs root (or
CAP_SYS_ADMIN); where that is not allowed these tests are skipped, and test_safety.py's simulated failures remain."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from diffusion_align.cli import main as cli_main
from diffusion_align.rewards.tiny import save_tiny_scorer
from test_safety import snapshot
from test_train import TINY_CONFIG


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs, unmounted afterwards (no writer may keep a file open there after it failed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    yield mount
    targets = [os.readlink(link) for link in Path("/proc/self/fd").iterdir() if link.exists()]
    open_files = [target for target in targets if target.startswith(str(mount))]
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # detached even if a file is left open there
    assert not open_files, f"a failed write left its file open: {open_files}"


def fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the disk's free space (with written bytes: a sparse file takes none)."""
    stats = os.statvfs(disk)
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


def fails_in_one_line(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "No space left on device" in err[-1] or "os error 28" in err[-1]
    return err[-1]


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def test_training_checkpoints_on_a_full_disk(small_disk, tiny_models, tiny_pairs, capsys):
    """The LoRA file of a checkpoint is written by safetensors, which raised SafetensorError (not an OSError): a
    traceback, and checkpoint-N.tmp left behind."""
    args = ["train", str(TINY_CONFIG), f"model.pretrained={tiny_models['sd']}", f"data.path={tiny_pairs}",
            f"train.output_dir={small_disk / 'run'}", "train.batch_size=2", "train.grad_accum=1",
            "train.warmup_steps=0", "train.report_to=none", "train.checkpoint_every=1"]
    cli_main(args + ["train.max_steps=1"])
    args.append("train.resume=latest")
    first = snapshot(small_disk / "run" / "checkpoint-1")
    filler = fill(small_disk, leave=16 * 1024)  # room for a metrics line, not for a checkpoint
    line = fails_in_one_line(args + ["train.max_steps=3"], capsys)
    assert line.startswith("diffusion-align train: stopped: step 2: could not write") and "checkpoint-1 is intact" in line
    assert hidden_leftovers(small_disk / "run") == [] and not (small_disk / "run" / "checkpoint-2").exists()
    assert snapshot(small_disk / "run" / "checkpoint-1") == first
    filler.unlink()  # space again: the run resumes from the intact checkpoint
    cli_main(args + ["train.max_steps=3"])
    assert (small_disk / "run" / "final").is_dir()


def test_export_generate_grid_and_label_on_a_full_disk(small_disk, tmp_path, tiny_models, tiny_pairs, capsys):
    images = tmp_path / "images"
    cli_main(["generate", "--model", str(tiny_models["sd"]), "--prompts", str(write_prompts(tmp_path)), "--seeds", "0-1",
              "--out", str(images), "--steps", "2", "--height", "32", "--width", "32"])
    fill(small_disk, leave=12 * 1024)

    # a merged export (the whole pipeline, megabytes): its hidden temp folder is removed
    line = fails_in_one_line(["export", str(tiny_models["sd"]), "--format", "merged", "--out", str(small_disk / "merged")],
                             capsys)
    assert line.startswith("diffusion-align export: stopped: could not write")
    assert not (small_disk / "merged").exists() and hidden_leftovers(small_disk) == []

    # generate: the images finished before the disk filled are whole, none is half-written
    fails_in_one_line(["generate", "--model", str(tiny_models["sd"]), "--prompts", str(write_prompts(tmp_path)),
                       "--seeds", "0-7", "--out", str(small_disk / "gen"), "--steps", "2", "--height", "32",
                       "--width", "32"], capsys)
    assert hidden_leftovers(small_disk) == []
    finished = list((small_disk / "gen").glob("*.png"))
    assert finished, "the disk filled before the first image: give generate more room"
    for png in finished:
        Image.open(png).load()

    # grid: two folders, one page; the page is written whole or not at all
    shutil.rmtree(small_disk / "gen")
    copy = shutil.copytree(images, tmp_path / "images-b")
    fill(small_disk, leave=2 * 1024)
    fails_in_one_line(["grid", str(images), str(copy), "--out", str(small_disk / "grid.png")], capsys)
    assert not (small_disk / "grid.png").exists() and hidden_leftovers(small_disk) == []

    # label: no half-written shard, and no empty records folder
    scorer = save_tiny_scorer("pickscore", tmp_path / "pickscore")
    fails_in_one_line(["label", str(tiny_pairs), "--out", str(small_disk / "labels"), "--scorer",
                       f"pickscore={scorer}", "--shard-size", "8"], capsys)
    assert hidden_leftovers(small_disk) == [] and not (small_disk / "labels" / ".shards").exists()


def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path
