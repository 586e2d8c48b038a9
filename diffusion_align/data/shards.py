"""Resumable outputs of Pick-a-Pic-style parquet shards (`rewards.labeling`, `data.captions`).

A job over N source rows writes `pairs-00000.parquet`, ... (one per `shard_size` rows, each written whole or not at
all; other jobs name their own stem and format, as the latent cache's `latents-00000.safetensors`) and
`.shards/pairs-00000.json`, the record of what each shard holds: the job's settings, its source rows and
its counts. A rerun keeps the shards whose record matches and makes only the others; the record is written last,
so it is what marks a shard finished. Records are hidden from `*.parquet` globs and imagefolder loaders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import removed_on_error, write_text_atomic, written_beside

SHARD_STEM = "pairs-{:05d}"
SHARD_RECORDS = ".shards"
# the report a pairs job writes once all its shards are made (a pairs source with shards and without it is
# refused): the command it is the output of, and its count of the pairs written
LABEL_REPORT, CAPTIONS_REPORT = "labels.json", "captions.json"
FINISHED_REPORTS = {LABEL_REPORT: ("label", "pairs_scored"), CAPTIONS_REPORT: ("captions", "pairs_written")}
# settings recorded since a later version: a record made before them is not compared on them
RECORDED_LATER = ("fingerprint", "dtype")


def preprocessing_entry(tag: str | None) -> dict:
    """A score record's entry for a scorer's preprocessing tag (`rewards.base.PREPROCESSING`): none where it
    preprocesses as ever, so that the records made before the tags still match."""
    return {"preprocessing": tag} if tag else {}


def write_parquet(table: pa.Table, path: Path) -> None:
    # hidden and not *.parquet: no loader picks it up; an open file, as pyarrow keeps its own open when a write fails
    with written_beside(path) as tmp, tmp.open("wb") as f:
        pq.write_table(table, f)


def replace_shards(out_dir: Path, tables: Iterable[pa.Table], tmp_name: str) -> list[Path]:
    """Write `tables` as `out_dir`'s shards (pairs-00000.parquet, ...) in place of those there: all into the folder
    `tmp_name` first, then the earlier shards moved aside and the new ones in; a failure at any point (Ctrl-C in
    the swap too) leaves the earlier shards as they were."""
    tmp, aside = out_dir / tmp_name, out_dir / f"{tmp_name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_error(tmp):
        tmp.mkdir(parents=True)
        for k, table in enumerate(tables):
            write_parquet(table, tmp / f"{SHARD_STEM.format(k)}.parquet")
        aside.mkdir(exist_ok=True)
        try:
            for old in out_dir.glob("pairs-*.parquet"):
                os.replace(old, aside / old.name)
            for path in sorted(tmp.glob("pairs-*.parquet")):
                os.replace(path, out_dir / path.name)
        except BaseException:
            for path in out_dir.glob("pairs-*.parquet"):  # the new shards moved in so far, then the earlier ones back
                os.replace(path, tmp / path.name)
            for old in aside.glob("pairs-*.parquet"):
                os.replace(old, out_dir / old.name)
            aside.rmdir()
            raise
    shutil.rmtree(aside)
    tmp.rmdir()
    return sorted(out_dir.glob("pairs-*.parquet"))


def write_shard_table(table: pa.Table, path: Path) -> int:
    """A parquet shard, or none for no rows (datasets cannot read an empty parquet); the rows written."""
    if table.num_rows:
        write_parquet(table, path)
    else:
        path.unlink(missing_ok=True)
    return table.num_rows


def write_json(path: Path, record: dict) -> None:
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def differences(old: dict, new: dict) -> str:
    return "; ".join(f"{k}={old.get(k)!r} there, {v!r} now" for k, v in new.items() if old.get(k) != v)


def run_shards(out_dir: Path, num_rows: int, shard_size: int, settings: dict,
               make_shard: Callable[[int, int, str], tuple[Any, dict]], stem: str = "pairs",
               suffix: str = ".parquet", write: Callable[[Any, Path], int] = write_shard_table
               ) -> list[tuple[dict, bool]]:
    """For each shard of rows [start, stop): its record, and whether it was kept from an earlier run.

    `make_shard(start, stop, description)` returns the shard's content and the counts to record (including
    "skipped"); `write(content, path)` writes it whole and returns the rows written. "settings", "rows" and
    "written" are added here. Other settings than an earlier run's are an error.
    """
    shards = [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]
    _check_no_extra_shards(out_dir, len(shards), stem, suffix)
    records = out_dir / SHARD_RECORDS
    records.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for k, (start, stop) in enumerate(shards):
            name = f"{stem}-{k:05d}"
            path, record_path = out_dir / f"{name}{suffix}", records / f"{name}.json"
            record = _finished(record_path, path, settings, start, stop)
            if record is not None:
                results.append((record, True))
                continue
            content, counts = make_shard(start, stop, f"shard {k + 1}/{len(shards)}")
            record = {"settings": settings, "rows": [start, stop], "written": write(content, path), **counts}
            write_json(record_path, record)  # last: the record is what marks the shard finished
            results.append((record, False))
    except BaseException:
        if not any(records.iterdir()):  # stopped before any shard was finished: no empty records folder is left
            records.rmdir()
        raise
    return results


def finished_run(out_dir: Path, num_rows: int, shard_size: int, settings: dict, stem: str = "pairs",
                 suffix: str = ".parquet") -> bool:
    """Whether every shard of an earlier `run_shards` over these rows with these settings is finished (False where
    one is missing or was made otherwise)."""
    for k, start in enumerate(range(0, num_rows, shard_size)):
        name = f"{stem}-{k:05d}"
        try:
            record = _finished(out_dir / SHARD_RECORDS / f"{name}.json", out_dir / f"{name}{suffix}", settings, start,
                               min(start + shard_size, num_rows))
        except ValueError:  # other settings, or an unreadable record
            return False
        if record is None:
            return False
    return True


def unfinished_output(folder: Path) -> str | None:
    """Why `folder`, a pairs job's output, holds only part of its pairs, or None: shard records with no finished
    report (the job stopped part-way), or shards holding other pairs, or other source rows, than its report counts
    (a rerun over more rows stopped)."""
    records = list((folder / SHARD_RECORDS).glob("pairs-*.json"))
    if not records:
        return None
    try:
        records = [json.loads(p.read_text(encoding="utf-8")) for p in records]
        written, last_row = sum(r["written"] for r in records), max(r["rows"][1] for r in records)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"a record in {SHARD_RECORDS}/ cannot be read ({err!r}); rerun the command that wrote the folder"
    for name, (command, counted) in FINISHED_REPORTS.items():
        if (folder / name).is_file():
            try:
                report = json.loads((folder / name).read_text(encoding="utf-8"))
                reported, rows = report[counted], report.get("inputs", {}).get("rows")  # rows: recorded since
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                return f"its {name} cannot be read ({err!r}); rerun the `diffusion-align {command}` that wrote it"
            if written != reported or rows not in (None, last_row):
                return (f"its shards hold {written} pairs of source rows 0-{last_row - 1} but its {name} counts "
                        f"{reported}{'' if rows is None else f' of {rows} rows'}: a rerun over more rows stopped "
                        f"part-way; rerun that `diffusion-align {command}` to finish it")
            return None
    return (f"shards in {SHARD_RECORDS}/ but no {' or '.join(FINISHED_REPORTS)}: the `diffusion-align label` or "
            "`captions` that writes it stopped part-way; rerun it to finish (the finished shards are kept)")


def _check_no_extra_shards(out_dir: Path, num_shards: int, stem: str, suffix: str) -> None:
    """Shards past this run's end came from a run over more rows; loading the folder would mix them in. So did
    their records, also those of shards that held no rows (no file), which would count those rows as the output's."""
    def past_the_end(folder: Path, ending: str) -> list[str]:
        pattern = re.compile(rf"{re.escape(stem)}-(\d+){re.escape(ending)}")
        return [p.name for p in folder.glob(f"{stem}-*{ending}")
                if (m := pattern.fullmatch(p.name)) and int(m[1]) >= num_shards]

    extra = sorted(past_the_end(out_dir, suffix))
    extra += sorted(f"{SHARD_RECORDS}/{name}" for name in past_the_end(out_dir / SHARD_RECORDS, ".json")
                    if name.removesuffix(".json") + suffix not in extra)
    if extra:
        raise ValueError(f"{out_dir}: holds shards past the {num_shards} this run writes ({', '.join(extra[:3])}"
                         f"{', ...' if len(extra) > 3 else ''}), from a run over more pairs; process as many pairs "
                         f"(max_pairs) to resume it, or write to a new folder")


def _finished(record_path: Path, path: Path, settings: dict, start: int, stop: int) -> dict | None:
    """The record of a finished shard of these rows and settings; None if the shard is still to do."""
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        old, rows, written = record["settings"], record["rows"], record["written"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{record_path}: unreadable shard record ({type(err).__name__}: {err}); delete it and "
                         f"{path.name} to make that shard again") from None
    changed = differences({**{k: settings[k] for k in RECORDED_LATER if k in settings}, **old}, settings)
    if changed:
        raise ValueError(f"{record_path}: {path.name} was made with other settings ({changed}); "
                         f"rerun with the same settings to resume, or write to a new folder")
    if rows != [start, stop] or (written > 0) != path.is_file():
        return None  # the last shard of a run over fewer pairs, or a shard whose parquet is gone: redo it
    if written and _parquet_rows(path) not in (None, written):
        return None  # a shard file replaced since (another tool writing into the folder): redo it
    return record


def _parquet_rows(path: Path) -> int | None:
    """The rows of a parquet shard, from its footer (-1 where it cannot be read); None for other kinds of shard."""
    if path.suffix != ".parquet":
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowInvalid):
        return -1
