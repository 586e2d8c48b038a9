"""Pick-a-Pic-style preference pairs -> batches of (winner, loser) images for Diffusion-DPO training.

Rows carry ``caption``, two encoded images ``jpg_0`` / ``jpg_1`` and their labels ``label_0`` / ``label_1``
(1/0, 0/1, or 0.5/0.5 for a tie). Batches put winners first: ``pixel_values`` is ``[w_1..w_B, l_1..l_B]``.
A row whose label is null, NaN or outside [0, 1] has no winner: it is dropped and counted, or skipped like an
undecodable row.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node

from ..files import expand_home, hub_load_error, looks_like_hub_id
from ..images import to_rgb
from .shards import unfinished_output

logger = logging.getLogger("diffusion_align")

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
# Rows held by the streaming shuffle buffer; Pick-a-Pic rows hold two encoded images (~0.5 MB per row).
STREAM_SHUFFLE_BUFFER = 1000


@dataclass
class PairStats:
    """What load_pairs kept; None where a stream cannot know it without reading everything."""

    rows: int | None
    ties_dropped: int | None
    pairs: int | None
    unlabelled: int | None = 0  # dropped: a null or NaN label, or one outside [0, 1]
    unscored: int | None = 0  # dropped: no reward score to orient the pair by (orient_by)
    out_of_range: int | None = 0  # of `unlabelled`: a label outside [0, 1]
    # each pair's row in the source, which messages name it by
    source_rows: np.ndarray | None = field(default=None, compare=False, repr=False)


def decode_image(value: Any, where: str) -> PIL.Image.Image:
    """Decode encoded bytes, a datasets Image dict ({"bytes", "path"}) or a PIL image; ValueError naming `where`."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not isinstance(value, (bytes, bytearray, memoryview, str)) or len(value) == 0:
        raise ValueError(f"{where}: expected encoded image bytes, got {type(value).__name__} {value!r:.40}")
    source = value if isinstance(value, str) else f"{len(value)} bytes"
    try:
        image = PIL.Image.open(value if isinstance(value, str) else io.BytesIO(value))
        image.load()  # decode now so truncated files fail here, not later inside the transform
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{where}: not a recognised image format ({source})") from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"{where}: cannot decode image ({source}; {type(err).__name__}: {err})") from err
    return image


NO_LABEL = -1


def outcomes(label_0, label_1, has_label=None) -> np.ndarray:
    """Per pair: 0 (image 0 preferred), 1 (image 1), 2 (tie), or NO_LABEL (null/NaN, or has_label false)."""
    l0 = np.asarray(label_0, dtype=np.float64)  # None -> NaN
    l1 = np.asarray(label_1, dtype=np.float64)
    out = np.select([l0 > l1, l0 < l1, l0 == l1], [0, 1, 2], default=NO_LABEL)
    if has_label is not None:
        out[~np.asarray(has_label, dtype=bool)] = NO_LABEL
    return out


def decode_pair(row: dict, index: int) -> list[PIL.Image.Image]:
    """Both images of a pair row as 8-bit RGB; ValueError or OSError naming the row and column."""
    return [to_rgb(decode_image(row[c], f"row {index}, column {c}")) for c in IMAGE_COLUMNS]


# the hub's parquet shards of a split, as a downloaded dataset repository holds them (Pick-a-Pic v2:
# data/train-00000-of-00645-b66ac786bf6fb553.parquet, data/validation_unique-00000-of-00001-....parquet)
HUB_SHARD_NAME = re.compile(r"(?P<split>.+?)-\d{5}-of-\d{5}(?:-[^/]*)?\.parquet")


def _parquet_files(path: str, split: str | None = None) -> list[str]:
    """Expand a parquet file, a folder (recursive), a glob, or a comma-separated list of those. A folder whose files
    are named as the hub names a split's shards (`HUB_SHARD_NAME`, as a downloaded Pick-a-Pic is) gives only those
    of `split` (None: all), as `datasets.load_dataset` reads such a folder; the others are read whole."""
    if len(parts := _source_parts(path)) > 1:
        files = [(f, k) for k, part in enumerate(parts) for f in _parquet_files(part, split)]
        named_by: dict[str, int] = {}
        for f, k in files:  # read twice, its rows would weigh double in training
            if (first := named_by.setdefault(os.path.realpath(f), k)) != k:
                raise ValueError(f"{path}: {f} is read by both {parts[first]!r} and {parts[k]!r}; name each file "
                                 "once")
        return [f for f, _ in files]
    if os.path.isfile(path):  # before the glob test: a file or folder may have [ ] in its name
        return [path]
    if os.path.isdir(path):
        files = _split_shards(path, sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.parquet"),
                                                     recursive=True)), split)
    elif glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    else:
        raise FileNotFoundError(f"pairs source not found: {path!r} (not a file, folder, glob match or hub id)")
    # a pairs job's output read whole or through a glob: refused while it holds part of its pairs
    given = os.path.normpath(path)
    folders = {os.path.normpath(os.path.dirname(f)) for f in files} | ({given} if os.path.isdir(path) else set())
    for folder in sorted(folders):
        if reason := unfinished_output(Path(folder)):
            where = "" if folder == given else f" {folder}"
            raise ValueError(f"{path}:{where} holds part of its pairs only: {reason}")
    if not files:
        raise FileNotFoundError(f"no parquet files found for {path!r}")
    return files


def _source_parts(path: str) -> list[str]:
    """The parts of a comma-separated list of sources; a file or folder with a comma in its name is one."""
    if "," not in path or os.path.exists(path):
        return [path]
    return [expand_home(part.strip()) for part in path.split(",") if part.strip()]


def _split_shards(folder: str, files: list[str], split: str | None) -> list[str]:
    splits = {f: m["split"] for f in files if (m := HUB_SHARD_NAME.fullmatch(os.path.basename(f)))}
    if split is None or not splits:
        return files
    chosen = [f for f in files if splits.get(f) == split]
    if not chosen:
        raise ValueError(f"{folder}: its parquet files are the hub's shards of the splits "
                         f"{sorted(set(splits.values()))}, none of split {split!r} (data.split)")
    others = len(files) - len(splits)
    logger.info("%s: reading the %d shards of split %s%s", folder, len(chosen), split,
                f"; {others} parquet files not named by split left out" if others else "")
    return chosen


def check_pairs_source(path: str) -> None:
    """Fail at once, naming `path`, where `load_pairs` would find nothing to read: before a scorer loads for it."""
    if not (os.path.exists(path) or looks_like_hub_id(path)):  # a hub id is found by loading it
        _parquet_files(path)


def check_out_dir(source: str, out_dir) -> None:
    """Refuse an output folder of shards (`data.shards`) that holds a file of `source`, or lies in a source folder."""
    if not os.path.exists(source) and looks_like_hub_id(source):
        return
    out = Path(out_dir).resolve()
    held = [f for f in (f.resolve() for f in parquet_sources(source)) if out in f.parents]
    if held:
        raise ValueError(f"{out_dir}: the output folder holds source file {held[0]}, which its shards "
                         "(pairs-00000.parquet, ...) could overwrite (losing the rows skipped) and reading the output "
                         "would read again; write to another folder")
    parts = _source_parts(source)
    folders = [Path(p).resolve() for p in parts if os.path.isdir(p)]
    around = [d for d in folders if d == out or d in out.parents]
    if around:  # a folder is read with its subfolders
        raise ValueError(f"{out_dir}: the output folder lies in source folder {around[0]}, so a rerun would read "
                         "the output as source; write to another folder")


def parquet_sources(path: str) -> list[Path]:
    """The parquet files `path` reads (a file, folder, glob or comma-separated list); none for a hub id or a
    save_to_disk folder."""
    if (not os.path.exists(path) and looks_like_hub_id(path)) or _is_saved(path):
        return []
    return [Path(f) for f in _parquet_files(path)]


def _is_saved(path: str) -> bool:
    """A save_to_disk folder (Dataset or DatasetDict)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json"))


def raw_images(ds):
    """Keep datasets from decoding image columns itself, so a corrupt image reaches decode_image, not a crash."""
    for col in IMAGE_COLUMNS:
        if isinstance((ds.features or {}).get(col), datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _open(path: str, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """Every row and column of a hub dataset, parquet file(s)/folder/glob or save_to_disk folder."""
    if _is_saved(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r}; splits found: {sorted(ds)}")
            ds = ds[split]
        return ds
    if not os.path.exists(path) and looks_like_hub_id(path):
        try:
            return datasets.load_dataset(path, split=split, streaming=streaming)
        except (OSError, ValueError) as err:  # offline (ConnectionError), unknown or private dataset
            raise hub_load_error("data.path", path, err, repo_type="dataset") from None
    files = _parquet_files(path, split)
    footers = {f: parquet_footer(f) for f in files}  # the footers alone, each read once
    # datasets fails on a zero-row file with a traceback naming no file ("BatchSize must be greater than 0")
    empty = [f for f in files if footers[f].num_rows == 0]
    if len(empty) == len(files):
        raise ValueError(f"{path}: the parquet holds no rows" if len(files) == 1 else
                         f"{path}: none of its {len(files)} parquet files holds a row")
    for f in empty:
        logger.warning("%s: the parquet holds no rows; left out", f)
    files = [f for f in files if f not in empty]
    _check_same_columns(path, {f: set(footers[f].schema.to_arrow_schema().names) for f in files})
    files = [glob.escape(f) for f in files]  # datasets reads data_files as globs
    return datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming)


def parquet_footer(file: str) -> pq.FileMetaData:
    try:
        return pq.ParquetFile(file).metadata
    except (OSError, pa.ArrowException) as err:  # pyarrow's bare "magic bytes not found" names no file
        raise ValueError(f"{file}: not a readable parquet file ({err}); copy it again or leave it out") from None


def _check_same_columns(path: str, columns: dict[str, set[str]]) -> None:
    """datasets reads the files (`columns`: each one's column names) as one table and fails on one whose columns
    differ, naming no file (streamed, at the first batch of it); their order and number types may differ."""
    (first, names_first), *others = columns.items()
    for f, names in others:
        if names != names_first:
            more, fewer = sorted(names - names_first), sorted(names_first - names)
            raise ValueError(f"{path}: its parquet files hold different columns: {f} has "
                             + " and ".join(([f"{more} more"] if more else []) + ([f"{fewer} fewer"] if fewer else []))
                             + f" than {first}; they are read as one table, so they need the same columns "
                             "(give the files of one layout, as a glob or a comma-separated list)")


def _numbers(column: pa.ChunkedArray, name: str, path: str) -> np.ndarray:
    """A label or score column as float64 (null -> NaN); a column of another type is an error naming it."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_null(column.type)):
        example = next((v for v in column.to_pylist() if v is not None), None)
        raise ValueError(f"{path}: column {name} holds {column.type} values (e.g. {example!r}); expected numbers "
                         "(labels 1, 0 or 0.5; null where there is none)")
    return _floats(column.to_numpy(zero_copy_only=False))


def _floats(values) -> np.ndarray:
    """Labels or scores as float64 with null -> NaN: in an object array, None == None would read as a tie."""
    return np.asarray(values, dtype=np.float64)


def _labelled(label_0, label_1):
    """Where a pair has a preference: both labels finite and in [0, 1] (2 / 0 or -1 / 0 says nothing)."""
    return np.isfinite(label_0 + label_1) & (np.minimum(label_0, label_1) >= 0) & (np.maximum(label_0, label_1) <= 1)


def _reward_labels(label_0, label_1, score_0, score_1, score_columns) -> dict[str, list[float]]:
    """label_0/1 that orient each pair by the reward (1/0: image 0 scores higher, 0/1, 0.5/0.5 on equal scores);
    NaN, so no preference, where a label or a score is null or NaN, or a label outside [0, 1]. With the scores as
    Python floats under `score_columns`: SmPO reads them as a tensor, which collate_pairs makes of floats only (not
    of an int column's values, nor of the numpy scalars a stream yields for arrays)."""
    score_0, score_1 = _floats(score_0), _floats(score_1)
    label = np.where(_labelled(_floats(label_0), _floats(label_1)), (np.sign(score_0 - score_1) + 1) / 2,
                     np.nan)  # sign(NaN) = NaN
    return {score_columns[0]: score_0.tolist(), score_columns[1]: score_1.tolist(), "label_0": label.tolist(),
            "label_1": (1 - label).tolist()}


def preference_columns(found: Sequence[str], human_labels: bool) -> tuple[list[str], bool]:
    """The columns that hold each pair's preference, and whether `has_label` flags them. `human_labels`: the people's
    (`human_label_0/1` where `diffusion-align label` moved them aside), as SmPO decides its ties; else label_0/1,
    whoever made them (training, captions, fit-reward)."""
    human = "human_label" if human_labels and {"human_label_0", "human_label_1"} <= set(found) else "label"
    # Pick-a-Pic's has_label flags its people's labels: label_0/1, or human_label_0/1 once `label` made label_0/1
    # a scorer's
    flagged = "has_label" in found and (human == "human_label" or "human_label_0" not in found)
    return [f"{human}_0", f"{human}_1"], flagged


def _read_numbers(ds: datasets.Dataset, names: list[str], path: str) -> list[np.ndarray]:
    # only these columns, no image bytes: under a second for ~1M rows
    columns = ds.select_columns(names).with_format("arrow")[:]
    return [_numbers(columns[n], n, path) for n in names]


def _preferences(ds: datasets.Dataset, path: str, label_columns: list[str], flagged: bool, warn: bool = True):
    """label_0, label_1 as float64, NaN where a row holds no preference (a null or NaN label, or `has_label` false),
    and where a label lies outside [0, 1] (warned), which the third array marks."""
    l0, l1 = _read_numbers(ds, label_columns, path)
    if flagged:  # a row whose flag is false (or null) holds no one's preference, whatever its labels say
        unflagged = ~flag_values(ds.select_columns(["has_label"]).with_format("arrow")[:]["has_label"], path)
        l0, l1 = np.where(unflagged, np.nan, l0), np.where(unflagged, np.nan, l1)
    out_of_range = np.isfinite(l0 + l1) & ~_labelled(l0, l1)
    if warn and out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        logger.warning("%s: %d rows have a label outside [0, 1], e.g. row %d (%s %s / %s); they hold no preference "
                       "and are treated as unlabelled", path, out_of_range.sum(), first, label_columns[0],
                       l0[first], l1[first])
    return np.where(out_of_range, np.nan, l0), np.where(out_of_range, np.nan, l1), out_of_range


def _check_flags(dtype: str, path: str) -> None:
    """has_label is true/false, or 1/0 (a CSV's copy of it; pandas': 1.0/0.0/NaN); text such as "false" is neither
    (arrow's and datasets' names of the types)."""
    if dtype not in ("bool", "null", "float", "double", "halffloat") and not re.fullmatch(r"u?int\d+|float\d+", dtype):
        raise ValueError(f"{path}: column has_label holds {dtype} values; expected true/false (or 1/0): whether the "
                         "row's label_0/label_1 are people's")


def is_flagged(value) -> bool:
    """One row's has_label: true, or a number other than 0; null, NaN and 0 are false."""
    return value is not None and value == value and bool(value)


def flag_values(column: pa.ChunkedArray, path) -> np.ndarray:
    """A has_label column as booleans (`is_flagged` of each value); another type is an error naming `path`."""
    _check_flags(str(column.type), path)
    return np.array([is_flagged(v) for v in column.to_pylist()], dtype=bool)


def _sample(rows: np.ndarray, max_pairs: int | None, seed: int | None) -> np.ndarray:
    """`max_pairs` of `rows`: drawn with `seed`, in stored order; the first ones without a seed."""
    if max_pairs is not None and seed is not None and max_pairs < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_pairs, replace=False))
    return rows[:max_pairs]


def preference_rows(path: str, split: str = "train", keep_ties: bool = False, max_pairs: int | None = None,
                    seed: int | None = None, *, opened: datasets.Dataset | None = None) -> np.ndarray:
    """The source rows that `load_pairs(path, split, keep_ties, max_pairs=..., seed=..., keep_unlabelled=False,
    orient_by=...)` draws its pairs from: those with a human preference (ties dropped unless `keep_ties`) and,
    with `max_pairs`, the same sample. SmPO computes reward scores for these rows only. `opened`: every row of
    `path` in stored order, already opened (`load_pairs(path, keep_ties=True)`), read instead of opening it again."""
    ds = _open(path, split, streaming=False) if opened is None else opened
    label_columns, flagged = preference_columns(ds.column_names, human_labels=True)
    l0, l1, _ = _preferences(ds, path, label_columns, flagged, warn=False)  # load_pairs warns
    return _sample(np.flatnonzero(np.isfinite(l0 + l1) & ((l0 != l1) | keep_ties)), max_pairs, seed)


def load_pairs(
    path: str,
    split: str = "train",
    keep_ties: bool = False,
    streaming: bool = False,
    max_pairs: int | None = None,
    extra_columns: Sequence[str] | str = (),
    *,
    seed: int | None = None,
    keep_unlabelled: bool | None = None,
    orient_by: str | None = None,
    scores: dict[str, np.ndarray] | None = None,
    source_rows: bool = False,
    labels: bool = True,
) -> tuple[datasets.Dataset | datasets.IterableDataset, PairStats]:
    """Load preference pairs from the hub, parquet file(s)/folder/glob, or a save_to_disk folder.

    Only the Pick-a-Pic columns and `extra_columns` are kept (`extra_columns="all"` keeps every column).
    Local parquet read with `split` names that split; a save_to_disk DatasetDict must contain it.
    Ties (label_0 == label_1) are dropped unless `keep_ties`; rows with a null, NaN or out-of-[0, 1] label, or whose
    `has_label` (Pick-a-Pic's flag of its people's labels) is false, unless `keep_unlabelled` (None: as `keep_ties`,
    so `keep_ties=True` alone returns every row, as the tools that label or caption all rows need; training passes
    False). Both are counted in the stats. A stream cannot count: its ties and unflagged rows are filtered out, and
    its null, NaN or out-of-[0, 1] labels reach the loader, which skips and counts them.

    `orient_by="x"` (SmPO) orients the pairs by the reward columns x_0 / x_1: ties are decided on the human labels
    (`human_label_0/1` where `diffusion-align label` moved them aside, else `label_0/1`), then label_0/1 become
    the reward's: 1/0 where x_0 > x_1, 0/1 where x_0 < x_1, 0.5/0.5 where equal. Rows without both scores are
    dropped and counted, after the `max_pairs` draw (so the draw is `preference_rows`', the rows SmPO scores); the
    scores come back as floats. `scores` adds columns, one value per source row
    (`rewards.labeling.reward_scores`), first; `source_rows` adds `source_row`, each pair's row number in the source
    (where a latent cache stores it). `labels=False` also reads a source without label_0/label_1 (pairs for `label`
    to label; not streamed): every row is kept, as a row without a preference.

    `max_pairs` keeps N of the remaining pairs: a random sample drawn with `seed`, in stored order (the same on
    every process and on resume), or the first N when `seed` is None (a larger N then extends a smaller one, as
    the resumable shard writers need). A stream cannot be sampled without reading it through: it keeps its first
    N pairs whatever the seed.
    """
    ds = _open(path, split, streaming)
    is_stream = isinstance(ds, datasets.IterableDataset)
    if (scores is not None or source_rows) and is_stream:
        raise ValueError(f"{path}: scores and caches are joined by source row, which needs streaming=False")
    if source_rows:
        ds = ds.add_column("source_row", np.arange(len(ds)))
    if scores is not None:
        for name, values in scores.items():  # a new column over the memory-mapped table: no row is copied
            if len(values) != len(ds):
                raise ValueError(f"{path}: {len(ds)} rows, but {len(values)} values for column {name}")
            ds = ds.add_column(name, values)

    found = ds.column_names or list(next(iter(ds)).keys())  # a stream may not know its schema up front
    keep_all = extra_columns == "all"
    no_labels = not labels and not {"label_0", "label_1"} & set(found)
    required = [c for c in REQUIRED_COLUMNS if not (no_labels and c.startswith("label_"))]
    expected = list(dict.fromkeys([*required, *(() if keep_all else extra_columns)]))
    score_columns = [f"{orient_by}_0", f"{orient_by}_1"] if orient_by else []
    missing = [c for c in [*expected, *score_columns] if c not in found]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected columns {expected + score_columns}, "
                         f"found {found}")
    caption = (ds.features or {}).get("caption")
    if isinstance(caption, datasets.Value) and caption.dtype not in ("string", "large_string", "null"):
        raise ValueError(f"{path}: column caption holds {caption.dtype} values; expected text (each pair's prompt)")
    label_columns, flagged = preference_columns(found, human_labels=bool(orient_by))
    keep_unlabelled = keep_ties if keep_unlabelled is None else keep_unlabelled
    ds = raw_images(ds)

    if is_stream:
        if isinstance(flag := (ds.features or {}).get("has_label"), datasets.Value):
            _check_flags(flag.dtype, path)
        if flagged and not keep_unlabelled:
            ds = ds.filter(lambda flags: [is_flagged(f) for f in flags], input_columns=["has_label"], batched=True)
        if not keep_ties:
            ds = ds.filter(lambda l0, l1: (_floats(l0) != _floats(l1)).tolist(), input_columns=label_columns,
                           batched=True)
        if orient_by:
            ds = ds.map(_reward_labels, input_columns=label_columns + score_columns, batched=True,
                        fn_kwargs={"score_columns": score_columns})
        ds = ds if keep_all else ds.select_columns(expected)
        return (ds if max_pairs is None else ds.take(max_pairs)), PairStats(None, None, None, None, None)

    l0, l1, out_of_range = ((np.full(len(ds), np.nan),) * 2 + (np.zeros(len(ds), bool),) if no_labels else
                            _preferences(ds, path, label_columns, flagged))
    ties = (l0 == l1) & (not keep_ties)  # NaN never ties
    unlabelled = ~np.isfinite(l0 + l1) & (not keep_unlabelled)
    keep = _sample(np.flatnonzero(~(ties | unlabelled)), max_pairs, seed)
    unscored = 0
    if orient_by:  # after the draw: which rows were scored does not change the sample (SmPO scores only it)
        s0, s1 = _read_numbers(ds, score_columns, path)
        scored = np.isfinite(s0 + s1)[keep]
        unscored, keep = int((~scored).sum()), keep[scored]
        oriented = _reward_labels(l0, l1, s0, s1, score_columns)
        ds = ds.remove_columns(list(oriented))  # before the selection below, which add_column would copy
        for name, values in oriented.items():
            ds = ds.add_column(name, values)
    stats = PairStats(rows=len(ds), ties_dropped=int(ties.sum()), pairs=len(keep), unlabelled=int(unlabelled.sum()),
                      unscored=unscored, out_of_range=int((out_of_range & unlabelled).sum()), source_rows=keep)
    ds = ds if keep_all else ds.select_columns(expected + (["source_row"] if source_rows else []))
    ds = ds.select(keep, keep_in_memory=True)  # in-memory index map: no cache file in the source dir
    return (ds.to_iterable_dataset() if streaming else ds), stats


def first_rows(path: str, split: str = "train", max_pairs: int | None = None,
               labels: bool = True) -> tuple[datasets.Dataset, str]:
    """Every row and column of `path` (ties and unlabelled rows too), or its first `max_pairs`, as the tools that
    label or caption a source in resumable shards read it; and the fingerprint of all its rows, which their records
    keep, so that a larger max_pairs extends a smaller one's shards. `labels=False`: the source may have no
    label_0/label_1 (`label` makes them)."""
    pairs, _ = load_pairs(path, split=split, keep_ties=True, extra_columns="all", labels=labels)
    fingerprint = pairs._fingerprint
    first = pairs if max_pairs is None else pairs.select(range(min(max_pairs, len(pairs))), keep_in_memory=True)
    return first, fingerprint


FLIPS = ("no", "pair", "image")
# An image is resized whole up to this many times resolution^2 (a 16:1 one). A thinner one has only its crop resized:
# whole, a 1 x 2000 one would be 512 x 1,024,000 pixels at resolution 512 (1.5 GB). Not every image, as a box resize
# rounds some pixels one level off the whole resize's.
MAX_RESIZED_AREA = 16


@dataclass
class PairTransform:
    """Resize shortest side to `resolution`, flip (before the crop), crop a square, scale to [-1, 1].

    `random_flip`: "no"; "pair", one coin flips both images together (diffusers' SDXL DPO script, MaPO); "image",
    a coin per image (the Diffusion-DPO authors' code, diffusers' SD1.5 DPO script)."""

    resolution: int
    center_crop: bool = True
    random_flip: str = "no"

    def __post_init__(self):
        if self.random_flip not in FLIPS:
            raise ValueError(f"random_flip must be one of {FLIPS}, got {self.random_flip!r}")

    def flips(self, generator: torch.Generator) -> tuple[bool, bool]:
        """Whether the winner and the loser are mirrored: the first draws of each item's generator."""
        if self.random_flip == "pair":
            return (_coin(generator),) * 2
        if self.random_flip == "image":
            return _coin(generator), _coin(generator)
        return False, False

    def __call__(self, image_w: PIL.Image.Image, image_l: PIL.Image.Image, generator: torch.Generator) -> dict:
        out = {}
        for suffix, image, flip in zip("wl", (image_w, image_l), self.flips(generator)):
            pixels, size, crop = self.apply(image, flip, generator)
            out[f"pixel_values_{suffix}"], out[f"original_size_{suffix}"], out[f"crop_top_left_{suffix}"] = (
                pixels, size, crop)
        return out

    def apply(self, image: PIL.Image.Image, flip: bool, generator: torch.Generator):
        """One image -> (pixels, (orig_h, orig_w), (crop_top, crop_left) in the resized image)."""
        res = self.resolution
        image = to_rgb(image)
        w, h = image.size
        # Integer rounding (half up) so the shortest side is exactly `res` whatever the float error.
        new_w, new_h = (res, (h * res + w // 2) // w) if w <= h else ((w * res + h // 2) // h, res)
        if self.center_crop:
            top, left = (new_h - res) // 2, (new_w - res) // 2
        else:
            top = int(torch.randint(new_h - res + 1, (), generator=generator))
            left = int(torch.randint(new_w - res + 1, (), generator=generator))
        if new_w * new_h <= MAX_RESIZED_AREA * res * res:
            image = image.resize((new_w, new_h), PIL.Image.Resampling.BILINEAR)  # Pillow antialiases when shrinking
            if flip:  # before the crop: a random crop's offset is drawn in the flipped image
                image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
            image = image.crop((left, top, left + res, top + res))
        else:  # only the crop, from the source box it covers
            x = new_w - left - res if flip else left  # where the crop lies before the flip
            box = (x * w / new_w, top * h / new_h, (x + res) * w / new_w, (top + res) * h / new_h)
            image = image.resize((res, res), PIL.Image.Resampling.BILINEAR, box=box)
            if flip:
                image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return pixels, (h, w), (top, left)


def _coin(generator: torch.Generator) -> bool:
    return torch.rand((), generator=generator).item() < 0.5


def split_extras(extra_columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Per-image extras (`x_0` with an `x_1` twin) by base name, and the rest."""
    paired = [c[:-2] for c in extra_columns if c.endswith("_0") and c[:-2] + "_1" in extra_columns]
    per_image = {f"{b}_{i}" for b in paired for i in (0, 1)}
    return paired, [c for c in extra_columns if c not in per_image]


def pair_name(row: dict, index: int) -> str:
    """How a message names pair `index`: by its row in the source where the pairs carry it (`load_pairs(...,
    source_rows=True)`, or PairDataset's `source_rows`), else by its place among the pairs (after ties and the
    max_pairs draw; a stream's, as read)."""
    return f"row {row['source_row']}" if "source_row" in row else f"pair {index}"


def pair_item(row: dict, epoch: int, index: int, seed: int, paired: list[str], plain: list[str],
              images: Callable[[tuple[int, int], torch.Generator], dict]) -> dict:
    """One row as a training item, winner first: `images(order, generator)` gives its image entries (pixels, or
    cached latents) for the source images `order` = (winner, loser). A null, NaN or out-of-[0, 1] label, a null in
    an extra column (a DCPO caption: the tokenizer takes none), or an image that cannot be had, gives an error item
    instead."""
    labels = _floats([row["label_0"], row["label_1"]]).tolist()
    if not _labelled(*labels):
        return {"index": index, "error": f"{pair_name(row, index)}: no preference to orient the pair by: label_0="
                                         f"{row['label_0']!r}, label_1={row['label_1']!r} (a null, NaN or outside "
                                         f"[0, 1] label, or reward score where pairs are oriented by one)"}
    null = [c for c in [*(f"{b}_{i}" for b in paired for i in (0, 1)), *plain] if row[c] is None]
    if null:
        return {"index": index, "error": f"{pair_name(row, index)}: column {null[0]} is null; expected a value"}
    order = (1, 0) if labels[0] < labels[1] else (0, 1)  # a kept tie keeps its order
    # Seed from (seed, epoch, index) only: independent of worker process and of where a run resumed.
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    try:
        item = images(order, torch.Generator().manual_seed(int(state)))
    except ValueError as err:
        return {"index": index, "error": str(err)}
    item.update(prompt=row["caption"] or "", index=index, epoch=epoch, label_w=labels[order[0]])
    for base in paired:
        item[f"{base}_w"], item[f"{base}_l"] = row[f"{base}_{order[0]}"], row[f"{base}_{order[1]}"]
    item.update({c: row[c] for c in plain})
    return item


def _pair_item(row: dict, epoch: int, index: int, transform: PairTransform, seed: int,
               paired: list[str], plain: list[str]) -> dict:
    """Decode and transform one row's images (`pair_item`)."""
    def images(order, generator):
        decoded = [decode_image(row[IMAGE_COLUMNS[i]], f"{pair_name(row, index)}, column {IMAGE_COLUMNS[i]}")
                   for i in order]
        return transform(*decoded, generator)
    return pair_item(row, epoch, index, seed, paired, plain, images)


class PairDataset(torch.utils.data.Dataset):
    """Map-style pairs indexed by (epoch, index) keys, so augmentation is a function of the key alone."""

    def __init__(self, pairs: datasets.Dataset, transform: PairTransform, seed: int, extra_columns: Sequence[str] = (),
                 source_rows: Sequence[int] | None = None):
        """`source_rows`: each pair's row in the source (`PairStats.source_rows`), which messages name it by."""
        self.pairs = raw_images(pairs)
        self.transform, self.seed, self.source_rows = transform, seed, source_rows
        self.paired, self.plain = split_extras(extra_columns)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        row = self.pairs[index]
        if self.source_rows is not None:
            row["source_row"] = int(self.source_rows[index])
        return self.item(row, epoch, index)

    def item(self, row: dict, epoch: int, index: int) -> dict:
        """The training item of a row: its images decoded and transformed (`pair_item`)."""
        return _pair_item(row, epoch, index, self.transform, self.seed, self.paired, self.plain)


_IMAGE_KEYS = ("pixel_values", "mean", "std")  # pixels, or a latent cache's posterior (`cache.CachedPairDataset`)
_ITEM_KEYS = {f"{k}_{s}" for k in (*_IMAGE_KEYS, "original_size", "crop_top_left") for s in "wl"} | {
    "prompt", "index", "epoch", "label_w"}


def collate_pairs(items: list[dict]) -> dict:
    """Stack winners then losers; error items are dropped (both images) and reported in "skipped". `keys` are the
    pairs' (epoch, index), which seed their draws (`likelihood.PairDraws`)."""
    good = [it for it in items if "error" not in it]
    batch = {"skipped": [(it["index"], it["error"]) for it in items if "error" in it]}
    if not good:
        return batch | {"pixel_values": torch.empty(0, 3, 0, 0), "prompts": [], "indices": [], "keys": [],
                        "original_sizes": torch.empty(0, 2, dtype=torch.long),
                        "crop_top_left": torch.empty(0, 2, dtype=torch.long), "label_w": torch.empty(0)}

    def both(key: str) -> list:
        return [it[f"{key}_w"] for it in good] + [it[f"{key}_l"] for it in good]

    batch.update({key: torch.stack(both(key)) for key in _IMAGE_KEYS if f"{key}_w" in good[0]})
    batch.update(
        prompts=[it["prompt"] for it in good],
        original_sizes=torch.tensor(both("original_size"), dtype=torch.long),
        crop_top_left=torch.tensor(both("crop_top_left"), dtype=torch.long),
        label_w=torch.tensor([it["label_w"] for it in good], dtype=torch.float32),
        indices=[it["index"] for it in good],
        keys=[(it["epoch"], it["index"]) for it in good],
    )
    for key in good[0].keys() - _ITEM_KEYS:
        values = [it[key] for it in good]
        batch[key] = torch.tensor(values, dtype=torch.float32) if all(type(v) is float for v in values) else values
    return batch


class PairBatchSampler(torch.utils.data.Sampler):
    """Endless, resumable batches of (epoch, index) keys; ranks take disjoint slices of each global batch."""

    def __init__(self, num_pairs: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        global_batch = batch_size * world_size
        if num_pairs < global_batch:
            raise ValueError(f"{num_pairs} pairs cannot fill one global batch of batch_size {batch_size} x "
                             f"world_size {world_size} = {global_batch}; lower the batch size or add data")
        self.num_pairs, self.batch_size, self.seed = num_pairs, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.batches_per_epoch = num_pairs // global_batch  # the incomplete last global batch is dropped

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            perm = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed + epoch))
            for k in range(batch, self.batches_per_epoch):
                start = (k * self.world_size + self.rank) * self.batch_size
                yield [(epoch, i) for i in perm[start:start + self.batch_size].tolist()]
            epoch, batch = epoch + 1, 0


def make_pair_loader(pairs, transform: PairTransform, batch_size: int, seed: int, rank: int = 0,
                     world_size: int = 1, start_batch: int = 0, num_workers: int = 0,
                     extra_columns: Sequence[str] = (), read_whole: bool = False) -> Iterable[dict]:
    """Endless iterable of collated batches for this rank, resuming after `start_batch` batches. `pairs` holds rows
    (a datasets Dataset or stream), or is an item dataset keyed like PairDataset (`cache.CachedPairDataset`).
    A stream is split between the processes by file where it can (datasets' `split_dataset_by_node`); with
    `read_whole`, every process reads it all and keeps every world_size-th pair, from its rank on: a stream cut to
    its first N pairs (`load_pairs(max_pairs=N)`) would otherwise give each process the first N / world_size pairs
    of its own files."""
    if not isinstance(pairs, datasets.IterableDataset):
        sampler = PairBatchSampler(len(pairs), batch_size, seed, rank, world_size, start_batch)
        items = pairs if isinstance(pairs, torch.utils.data.Dataset) else PairDataset(pairs, transform, seed,
                                                                                       extra_columns)
        return torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=collate_pairs,
                                           num_workers=num_workers, persistent_workers=num_workers > 0)
    if num_workers:
        warnings.warn("make_pair_loader: streaming pairs are decoded in the main process; num_workers ignored")
    stream = raw_images(pairs) if read_whole else split_dataset_by_node(raw_images(pairs), rank=rank,
                                                                        world_size=world_size)
    stream = stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)  # the same order in every process
    return _stream_batches(stream, transform, batch_size, seed, rank, world_size, start_batch, extra_columns,
                           read_whole)


def _stream_batches(stream, transform, batch_size, seed, rank, world_size, start_batch, extra_columns,
                    read_whole=False):
    """Endless collated batches from this rank's shuffled stream (`read_whole`: its every world_size-th pair of the
    whole), after skipping `start_batch` batches."""
    # Batches never span epochs (the tail is dropped, as in PairBatchSampler), so skipping whole
    # batches across epoch boundaries reproduces an uninterrupted run; skipped rows are never decoded.
    paired, plain = split_extras(extra_columns)
    epoch, to_skip = 0, start_batch
    while True:
        stream.set_epoch(epoch)  # reshuffles shards and buffer with seed + epoch
        rows, full_batches, used, last_error, whole = [], 0, 0, None, not to_skip
        for position, row in enumerate(stream):
            if read_whole and position % world_size != rank:
                continue
            # a global running position: unique across ranks
            rows.append((position if read_whole else position * world_size + rank, row))
            if len(rows) < batch_size:
                continue
            full_batches += 1
            if to_skip:
                to_skip -= 1
            else:
                batch = collate_pairs([_pair_item(r, epoch, i, transform, seed, paired, plain) for i, r in rows])
                used += len(batch["prompts"])
                last_error = batch["skipped"][-1][1] if batch["skipped"] else last_error
                yield batch
            rows = []
        if full_batches == 0:
            raise ValueError(f"rank {rank}: the pair stream has fewer than batch_size={batch_size} pairs per epoch")
        if whole and used == 0 and last_error is not None:  # a whole pass drawn, not one pair usable: none will be
            raise ValueError(f"rank {rank}: no pair of a whole pass over the pair stream ({full_batches} batches) "
                             f"could be used; the last: {last_error}. Check the image columns (jpg_0, jpg_1)")
        epoch += 1
