"""Files: written so that a crash never leaves a half-written one (write beside the target, then rename), and
JSON Lines read with errors that name the line."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


_PACKAGE = Path(__file__).resolve().parent  # .../diffusion_align
_UMASK = os.umask(0o022)  # read once, at import (reading it means setting it), and put back
os.umask(_UMASK)


def usual_permissions(path: Path) -> None:
    """Give `path` (a file, or every file under a folder) the permissions the user's umask gives a new file.
    Writers that go through a private temp file (safetensors' save_file, mkstemp) leave their files owner-only
    (0600), which a server running as another user (ComfyUI, a web UI) cannot read."""
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~_UMASK)


def shipped_dir(installed: str, checkout: str) -> Path:
    """A folder the project ships: `diffusion_align/<installed>` in a built wheel (package data), or
    `<checkout>` relative to the repository root in a source checkout (and an editable install, which runs
    from one)."""
    for candidate in (_PACKAGE / installed, _PACKAGE.parent / checkout):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{checkout} not found: looked for {_PACKAGE / installed} (installed package data) and "
                            f"{_PACKAGE.parent / checkout} (source checkout)")


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an older folder of that name is removed only after the move."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    usual_permissions(src)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


# What a failed write raises (a full disk, a quota, a read-only mount): an OSError, except from safetensors, whose
# writer raises its own SafetensorError (not an OSError); torch.save is given an open file (save_torch) for the same
# reason. Writers catch these to stop in one line; every temp file or folder is removed first (removed_on_error).
WRITE_ERRORS = (OSError, SafetensorError)


def remove(path: Path) -> None:
    """Remove a file or a folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def removed_on_error(*paths: Path):
    """Remove `paths` (the temp files or folders being written) when the block raises anything (a full disk,
    Ctrl-C), so that no partial output is left beside the finished ones."""
    try:
        yield
    except BaseException:
        for path in paths:
            remove(path)
        raise


@contextmanager
def written_beside(path: Path) -> Iterator[Path]:
    """A hidden temp path beside `path` (a name that score and imagefolder loaders skip) for the block to write;
    renamed onto `path` when the block ends, removed when it raises: `path` is replaced whole or left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    with removed_on_error(tmp):  # the rename too: onto a folder, say, it fails
        yield tmp
        usual_permissions(tmp)
        os.replace(tmp, path)


@contextmanager
def folder_written_beside(path: Path) -> Iterator[Path]:
    """The folder twin of `written_beside`: a fresh hidden temp folder beside `path` (what a crash left there
    removed) for the block to fill, put in place of `path` when the block ends (`replace_dir`), removed when it
    raises."""
    tmp = path.with_name(f".{path.name}.tmp")
    remove(tmp)
    with removed_on_error(tmp):
        tmp.mkdir(parents=True)
        yield tmp
    replace_dir(tmp, path)


def check_free(out: Path, overwrite: bool) -> None:
    """Refuse to write over an existing file or non-empty folder `out` unless `overwrite` (a command's --overwrite)."""
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")


def save_torch(obj, path: Path) -> None:
    """torch.save through an open file: given a path, its zip writer reports a full disk as a bare RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_text_atomic(path: Path, text: str) -> None:
    with written_beside(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    with written_beside(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def write_image_atomic(image, path: Path, format: str = "PNG") -> None:
    """Write a PIL image beside `path`, flushed to disk, then rename: on disk before anything records it as done."""
    with written_beside(path) as tmp, tmp.open("wb") as f:
        image.save(f, format=format)
        f.flush()
        os.fsync(f.fileno())


def report_dict(report, item: str = "item") -> dict:
    """A job report (a dataclass with `out_dir` and `skipped` = [(item, reason)]) as JSON-ready data."""
    data = dataclasses.asdict(report)
    data["out_dir"] = str(report.out_dir)
    data["skipped"] = [{item: i, "reason": r} for i, r in report.skipped]
    return data


def jsonl_records(text: str, path, error: type[Exception] = ValueError) -> Iterator[tuple[str, object]]:
    """("path:line", parsed value) for each non-blank line of a JSON Lines text; a line that is not JSON raises
    `error` naming it."""
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as err:
            raise error(f"{path}:{lineno}: not valid JSON ({err})") from None
        yield f"{path}:{lineno}", value


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def expand_home(path: str) -> str:
    """`~/x` -> the home folder's x, for paths the shell leaves as they are: inside YAML, after `key=` on the command
    line, and after a comma. Other `~` spellings (`~user/x`, `a~/b`) are left alone."""
    return os.path.expanduser(path) if path.startswith("~/") else path


def looks_like_hub_id(name: str) -> bool:
    """owner/name, and not a relative path (./a/b) or a file name (a/b.parquet)."""
    return bool(HUB_ID.fullmatch(name)) and not name.startswith(".") and not name.endswith((".parquet", ".arrow"))


def first_line(err: Exception) -> str:
    """An error's message in one line (its first), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def hub_load_error(what: str, name: str, err: Exception, repo_type: str = "model") -> FileNotFoundError:
    """A hub id that could not be loaded (offline, a typo, a private repository): what was asked, why it failed,
    and what to do, in one line."""
    reason = first_line(err)
    download = f"huggingface-cli download {'' if repo_type == 'model' else f'--repo-type {repo_type} '}{name}"
    return FileNotFoundError(f"{what} {name!r}: not a local path, and the hub could not provide it ({reason}). Check "
                             f"the name; without network, download it where there is one ({download}) and give the "
                             "local folder, or set HF_HUB_OFFLINE=1 to use the hub cache")


def local_or_hub(name: str) -> str:
    """A local path made absolute (so a record made here matches a rerun from anywhere), a hub id as given."""
    return os.path.abspath(name) if os.path.exists(name) else name


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# in a checkpoint of a run that keeps an EMA of its trained weights (training/ema.py): the EMA, written as the run
# writes its weights (a LoRA file, or the denoiser's folder), beside the live ones
EMA_FOLDER = "ema"
SHARDED_STATE = "sharded"  # a sharded (fsdp2) checkpoint's torch.distributed.checkpoint folder


# what reading back a damaged file raises: safetensors' header error, torch's zip reader (RuntimeError) and unpickler,
# a file cut short, JSON that does not parse, diffusers failing to load weights (OSError)
READ_ERRORS = (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError, json.JSONDecodeError, OSError)


@contextmanager
def read_back(what: Path):
    """Name `what` (a file or folder written before: a checkpoint's, a LoRA) when it cannot be read back; in a
    checkpoint, with the earlier ones to resume from. (Not a failed write, which the command line would call it.)"""
    try:
        yield
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:
        reason = first_line(err)
        checkpoint = next((p for p in [what, *what.parents] if _CHECKPOINT.match(p.name)), None)
        hint = ""
        if checkpoint is not None:
            step = int(_CHECKPOINT.match(checkpoint.name).group(1))
            earlier = [str(p) for at, p in list_checkpoints(checkpoint.parent) if at < step]
            hint = (f" If {checkpoint.name} is damaged (a copy cut short), " + (
                f"an earlier checkpoint may be whole: {', '.join(earlier[-3:])} (train.resume=PATH resumes from one)"
                if earlier else "there is no earlier checkpoint"))
        raise ValueError(f"{what}: cannot be read back ({reason}).{hint}") from err


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """A run folder's complete checkpoints (`checkpoint-<step>/`, training.checkpoints), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)
