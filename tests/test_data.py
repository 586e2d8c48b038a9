import io
import itertools
import os
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffusion_align.data.pairs import (
    MAX_RESIZED_AREA, REQUIRED_COLUMNS, PairBatchSampler, PairDataset, PairStats, PairTransform, check_out_dir,
    collate_pairs, decode_image, load_pairs, make_pair_loader,
)

RED, DARK_RED, BLUE, DARK_BLUE = (255, 0, 0), (128, 0, 0), (0, 0, 255), (0, 0, 128)
N_ROWS, TIE_ROW, SWAP_ROW, CORRUPT_ROW = 12, 2, 1, 3


def two_tone(left, right, size=(40, 30), fmt="PNG"):
    """An image whose left half is `left` and right half `right`: shows colour (winner/loser) and flips."""
    w, h = size
    img = Image.new("RGB", size, left)
    img.paste(Image.new("RGB", (w // 2, h), right), (w // 2, 0))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


WIN, LOSE = two_tone(RED, DARK_RED), two_tone(BLUE, DARK_BLUE)


def make_rows(n=N_ROWS):
    """Winner red / loser blue; row 1 has the winner in jpg_1, row 2 is a tie, row 3 has a corrupt jpg_1."""
    rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1",
                            "model_0", "model_1", "weight", "user_id")}
    for i in range(n):
        swap = i == SWAP_ROW
        rows["caption"].append(None if i == 5 else f"prompt {i}")
        rows["jpg_0"].append(LOSE if swap else (two_tone(RED, DARK_RED, fmt="JPEG") if i == 4 else WIN))
        rows["jpg_1"].append(b"not an image" if i == CORRUPT_ROW else (WIN if swap else LOSE))
        rows["label_0"].append(0.5 if i == TIE_ROW else float(not swap))
        rows["label_1"].append(0.5 if i == TIE_ROW else float(swap))
        rows["model_0"].append(f"m{i}-loser" if swap else f"m{i}-winner")
        rows["model_1"].append(f"m{i}-winner" if swap else f"m{i}-loser")
        rows["weight"].append(float(i))
        rows["user_id"].append(i)
    return rows


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return str(path)


@pytest.fixture
def parquet_file(tmp_path):
    return write_parquet(tmp_path / "pairs.parquet", make_rows())


def is_red(pixels):
    return pixels[0].mean() > 0 and pixels[2].mean() < 0


# ---------------------------------------------------------------- load_pairs

def test_load_single_parquet_drops_ties_and_keeps_needed_columns(parquet_file):
    ds, stats = load_pairs(parquet_file)
    assert (stats.rows, stats.ties_dropped, stats.pairs) == (N_ROWS, 1, N_ROWS - 1)
    assert len(ds) == N_ROWS - 1 and "prompt 2" not in ds["caption"]
    assert ds.column_names == list(REQUIRED_COLUMNS)

    ds, stats = load_pairs(parquet_file, keep_ties=True, extra_columns=["model_0", "model_1"])
    assert (stats.ties_dropped, stats.pairs, len(ds)) == (0, N_ROWS, N_ROWS)
    assert ds.column_names == [*REQUIRED_COLUMNS, "model_0", "model_1"]


def test_max_pairs_counts_after_tie_filtering(parquet_file):
    ds, stats = load_pairs(parquet_file, max_pairs=3)  # no seed: the first N, as the resumable shard writers need
    assert ds["caption"] == ["prompt 0", "prompt 1", "prompt 3"] and stats.pairs == 3


def test_max_pairs_with_a_seed_is_a_sorted_random_sample(tmp_path):
    path = write_parquet(tmp_path / "many.parquet", make_rows(40))  # row 2 is the only tie

    def sample(seed, streaming=False):
        ds, stats = load_pairs(path, max_pairs=5, extra_columns=["user_id"], seed=seed, streaming=streaming)
        rows = [row["user_id"] for row in ds]  # user_id = source row
        assert len(rows) == 5 and (streaming or stats.pairs == 5)
        return rows

    first = sample(0)
    assert first == sorted(first) and len(set(first)) == 5 and TIE_ROW not in first
    assert sample(0) == first  # the same on every process and on resume
    assert sample(1) != first and first != [0, 1, 3, 4, 5]  # not the first five
    assert sample(0, streaming=True) == [0, 1, 3, 4, 5]  # a stream keeps its first N, whatever the seed


def test_load_folder_glob_and_comma_list(tmp_path):
    rows = make_rows()
    half = {k: v[:6] for k, v in rows.items()}, {k: v[6:] for k, v in rows.items()}
    a = write_parquet(tmp_path / "shards" / "a.parquet", half[0])
    b = write_parquet(tmp_path / "shards" / "nested" / "b.parquet", half[1])
    for source in (str(tmp_path / "shards"), str(tmp_path / "shards" / "**" / "*.parquet"), f"{a},{b}"):
        ds, stats = load_pairs(source)
        assert (stats.rows, stats.pairs) == (N_ROWS, N_ROWS - 1), source


def test_files_of_other_columns_in_one_source_are_named(tmp_path):
    """datasets failed on a folder whose files' columns differ with a cast error naming no file (streamed, at the
    first batch of the odd file); their order and number types may differ, as before."""
    rows = make_rows()
    write_parquet(tmp_path / "a" / "1.parquet", {k: v[:6] for k, v in rows.items()})
    write_parquet(tmp_path / "a" / "2.parquet", {k: v[6:] for k, v in rows.items()} | {"extra": [1] * (N_ROWS - 6)})
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"a: its parquet files hold different columns: .*2.parquet has "
                                             r"\['extra'\] more than .*1.parquet; they are read as one table"):
            load_pairs(str(tmp_path / "a"), streaming=streaming)
    half = {k: v[6:] for k, v in rows.items() if k != "label_0"}
    write_parquet(tmp_path / "b" / "1.parquet", {k: v[:6] for k, v in rows.items()})
    write_parquet(tmp_path / "b" / "2.parquet", {"label_0": [int(x) for x in rows["label_0"][6:]], **half})
    assert load_pairs(str(tmp_path / "b"))[1].rows == N_ROWS


def test_a_comma_list_expands_home_in_each_item(tmp_path, monkeypatch):
    """`data.path=~/a.parquet,~/b.parquet`: the config expands the first `~/` only, and the second was looked for
    in a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    rows = make_rows()
    write_parquet(tmp_path / "a.parquet", {k: v[:6] for k, v in rows.items()})
    write_parquet(tmp_path / "b.parquet", {k: v[6:] for k, v in rows.items()})
    ds, stats = load_pairs(f"{tmp_path / 'a.parquet'},~/b.parquet")
    assert (stats.rows, stats.pairs) == (N_ROWS, N_ROWS - 1)


def test_a_downloaded_hub_folder_is_read_by_split(tmp_path, caplog):
    """A local copy of Pick-a-Pic v2 holds every split's shards in one folder (data/train-00000-of-00645-<hash>.parquet,
    data/validation-..., data/test_unique-...): data.split=train read the test and validation rows too."""
    rows = make_rows()
    part = [{k: v[i:i + 3] for k, v in rows.items()} for i in (0, 3, 6, 9)]
    write_parquet(tmp_path / "pickapic" / "data" / "train-00000-of-00002-1a2b.parquet", part[0])
    write_parquet(tmp_path / "pickapic" / "data" / "train-00001-of-00002-3c4d.parquet", part[1])
    write_parquet(tmp_path / "pickapic" / "data" / "validation_unique-00000-of-00001-5e6f.parquet", part[2])
    write_parquet(tmp_path / "pickapic" / "data" / "test-00000-of-00001.parquet", part[3])
    folder = str(tmp_path / "pickapic")
    for split, captions in (("train", rows["caption"][:6]), ("validation_unique", rows["caption"][6:9]),
                            ("test", rows["caption"][9:12])):
        for streaming in (False, True):
            ds, _ = load_pairs(folder, split=split, keep_ties=True, streaming=streaming)
            assert [row["caption"] for row in ds] == captions, (split, streaming)
    with pytest.raises(ValueError, match=r"pickapic: its parquet files are the hub's shards of the splits \['test', "
                                         r"'train', 'validation_unique'\], none of split 'validation'"):
        load_pairs(folder, split="validation")
    # a folder not named by split is read whole, whatever the split's name (our own pairs-00000.parquet shards)
    write_parquet(tmp_path / "ours" / "pairs-00000.parquet", rows)
    assert load_pairs(str(tmp_path / "ours"), split="validation", keep_ties=True)[1].rows == N_ROWS


def test_paths_with_glob_characters_are_read_as_they_are(tmp_path):
    """A folder or file named like a glob (a sweep's `beta[5000]/labelled`) was not found, or read as a pattern."""
    rows = make_rows()
    folder = write_parquet(tmp_path / "beta[5000]" / "pairs.parquet", rows).rsplit("/", 1)[0]
    write_parquet(tmp_path / "beta5" / "pairs.parquet", {k: v[:2] for k, v in rows.items()})  # [5000] matches 5
    for source in (folder, f"{folder}/pairs.parquet"):
        for streaming in (False, True):
            ds, _ = load_pairs(source, keep_ties=True, streaming=streaming)
            assert len(list(ds)) == N_ROWS, (source, streaming)


def test_a_comma_list_reads_each_file_once_and_a_comma_named_path_whole(tmp_path):
    """A sweep's folder `lr=1e-5,beta=5000` was split at its comma (not found); a file reached by two parts of a
    list (`a.parquet,*.parquet`) was read twice, its rows weighing double."""
    rows = make_rows()
    folder = tmp_path / "lr=1e-5,beta=5000"
    write_parquet(folder / "pairs.parquet", rows)
    for source in (str(folder), str(folder / "pairs.parquet")):
        assert load_pairs(source, keep_ties=True)[1].rows == N_ROWS, source
    check_out_dir(str(folder), tmp_path / "out")  # a source that is one folder, not a list
    with pytest.raises(ValueError, match="the output folder lies in source folder"):
        check_out_dir(str(folder), folder / "out")
    a = write_parquet(tmp_path / "d" / "a.parquet", {k: v[:6] for k, v in rows.items()})
    write_parquet(tmp_path / "d" / "b.parquet", {k: v[6:] for k, v in rows.items()})
    for source, twice in ((f"{a},{tmp_path / 'd' / '*.parquet'}", "*.parquet"), (f"{a},{a}", "a.parquet"),
                          (f"{tmp_path / 'd'},{tmp_path / 'd' / '..' / 'd' / 'a.parquet'}", "a.parquet")):
        with pytest.raises(ValueError, match=rf"a.parquet is read by both '.*' and '.*{re.escape(twice)}'; name "
                                             "each file once"):
            load_pairs(source)


def test_an_unreadable_parquet_file_is_named(tmp_path):
    """A partial copy among a download's shards failed with pyarrow's "Parquet magic bytes not found", naming no
    file."""
    rows = make_rows()
    write_parquet(tmp_path / "d" / "a.parquet", rows)
    (tmp_path / "d" / "b.parquet").write_bytes((tmp_path / "d" / "a.parquet").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"d/b.parquet: not a readable parquet file \(.*magic bytes.*\); copy it "
                                         "again or leave it out"):
        load_pairs(str(tmp_path / "d"))


def test_zero_row_files_are_left_out_with_a_warning(tmp_path, caplog):
    rows = make_rows()
    write_parquet(tmp_path / "shards" / "a.parquet", rows)
    empty = write_parquet(tmp_path / "shards" / "b.parquet", {k: v[:0] for k, v in rows.items()})
    for streaming in (False, True):  # datasets failed on it: "BatchSize must be greater than 0", naming no file
        caplog.clear()
        ds, stats = load_pairs(str(tmp_path / "shards"), streaming=streaming)
        assert len(list(ds)) == N_ROWS - 1 and f"{empty}: the parquet holds no rows; left out" in caplog.text


def test_load_save_to_disk_dataset_and_datasetdict(tmp_path):
    ds = datasets.Dataset.from_dict(make_rows())
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(train=ds, validation=ds.select(range(4))).save_to_disk(str(tmp_path / "dict"))

    assert load_pairs(str(tmp_path / "single"))[1].pairs == N_ROWS - 1
    assert load_pairs(str(tmp_path / "dict"), split="validation")[1] == PairStats(4, 1, 3)
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_pairs(str(tmp_path / "dict"), split="test")


def test_image_feature_columns_decode_and_corrupt_image_does_not_crash(tmp_path):
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float32"),
                                  "label_1": datasets.Value("float32")})
    rows = {k: v for k, v in make_rows().items() if k in features}
    rows["jpg_0"] = [{"bytes": b, "path": None} for b in rows["jpg_0"]]
    rows["jpg_1"] = [{"bytes": b, "path": None} for b in rows["jpg_1"]]
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "img"))

    pairs, _ = load_pairs(str(tmp_path / "img"))
    dataset = PairDataset(pairs, PairTransform(16), seed=0)
    assert is_red(dataset[(0, 0)]["pixel_values_w"])
    assert "pair 2, column jpg_1" in dataset[(0, 2)]["error"]  # row 3 of the source is pair 2 once the tie is gone
    named, _ = load_pairs(str(tmp_path / "img"), source_rows=True)  # as a latent cache's run: by the source's row
    assert "row 3, column jpg_1" in PairDataset(named, PairTransform(16), seed=0)[(0, 2)]["error"]
    _, stats = load_pairs(str(tmp_path / "img"))  # as other runs: the rows kept, the pairs' table as it was
    assert stats.source_rows.tolist() == [i for i in range(N_ROWS) if i != TIE_ROW]
    assert "row 3, column jpg_1" in PairDataset(pairs, PairTransform(16), 0, source_rows=stats.source_rows)[(0, 2)][
        "error"] and pairs._fingerprint == load_pairs(str(tmp_path / "img"))[0]._fingerprint


def test_missing_path_and_missing_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        load_pairs(str(tmp_path / "nowhere.parquet"))
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        load_pairs(str(tmp_path / "*.parquet"))
    rows = make_rows()
    del rows["label_1"]
    bad = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError) as err:
        load_pairs(bad, extra_columns=["ranking_id"])
    message = str(err.value)
    assert bad in message and "missing column(s) ['label_1', 'ranking_id']" in message
    assert "'label_0', 'label_1', 'ranking_id'" in message and "found ['caption'" in message


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or
                        datasets.Dataset.from_dict(make_rows()))
    _, stats = load_pairs("yuvalkirstain/pickapic_v2", split="validation_unique")
    assert calls == [(("yuvalkirstain/pickapic_v2",), {"split": "validation_unique", "streaming": False})]
    assert stats.pairs == N_ROWS - 1


def test_decode_image_inputs_and_errors():
    assert decode_image(WIN, "x").size == (40, 30)
    assert decode_image({"bytes": WIN, "path": None}, "x").size == (40, 30)
    assert decode_image(Image.new("L", (3, 3)), "x").size == (3, 3)
    for bad in (b"", None, b"garbage", WIN[:60]):
        with pytest.raises(ValueError, match="row 17, column jpg_1"):
            decode_image(bad, "row 17, column jpg_1")


# ---------------------------------------------------------------- transform

def test_center_crop_offsets_and_original_size_for_landscape_image():
    out = PairTransform(16)(Image.open(io.BytesIO(WIN)), Image.new("RGB", (30, 60)), torch.Generator())
    # 40x30 (w x h) -> 21x16, centre crop left = (21 - 16) // 2 = 2;  30x60 -> 16x32, top = (32 - 16) // 2 = 8.
    assert out["original_size_w"] == (30, 40) and out["crop_top_left_w"] == (0, 2)
    assert out["original_size_l"] == (60, 30) and out["crop_top_left_l"] == (8, 0)
    assert out["pixel_values_w"].shape == (3, 16, 16) and out["pixel_values_w"].dtype == torch.float32
    assert out["pixel_values_w"].min() >= -1 and out["pixel_values_w"].max() <= 1


def test_random_crop_stays_in_bounds_and_matches_pixels():
    # Red encodes x and green encodes y, so a wrong crop offset shows up in the pixels.
    ys, xs = np.mgrid[0:30, 0:40]
    gradient = Image.fromarray(np.stack([xs * 6, ys * 8, np.zeros_like(xs)], -1).astype(np.uint8))
    resized = gradient.resize((21, 16), Image.Resampling.BILINEAR)
    lefts = set()
    for s in range(40):
        out = PairTransform(16, center_crop=False)(gradient, gradient, torch.Generator().manual_seed(s))
        top, left = out["crop_top_left_w"]
        assert top == 0 and 0 <= left <= 5 and out["original_size_w"] == (30, 40)
        expected = torch.from_numpy(np.array(resized.crop((left, top, left + 16, top + 16)))).permute(2, 0, 1)
        assert torch.allclose(out["pixel_values_w"], expected / 127.5 - 1)
        lefts.add(left)
        lefts.add(out["crop_top_left_l"][1])
    assert lefts == set(range(6))  # every offset reachable; w and l drawn independently


def test_flip_is_shared_by_both_images_of_a_pair():
    win, lose = decode_image(WIN, "w"), decode_image(LOSE, "l")
    flips = []
    for s in range(20):
        out = PairTransform(16, random_flip="pair")(win, lose, torch.Generator().manual_seed(s))
        # Unflipped, the bright half is on the left (column 0); flipped, on the right.
        w_flipped = out["pixel_values_w"][0, :, 0].mean() < out["pixel_values_w"][0, :, -1].mean()
        l_flipped = out["pixel_values_l"][2, :, 0].mean() < out["pixel_values_l"][2, :, -1].mean()
        assert w_flipped == l_flipped
        flips.append(bool(w_flipped))
    assert any(flips) and not all(flips)


def test_image_flips_toss_a_coin_per_image():
    win, lose = decode_image(WIN, "w"), decode_image(LOSE, "l")
    flips = set()
    for s in range(20):
        out = PairTransform(16, random_flip="image")(win, lose, torch.Generator().manual_seed(s))
        flips.add((bool(out["pixel_values_w"][0, :, 0].mean() < out["pixel_values_w"][0, :, -1].mean()),
                   bool(out["pixel_values_l"][2, :, 0].mean() < out["pixel_values_l"][2, :, -1].mean())))
    assert flips == {(False, False), (False, True), (True, False), (True, True)}
    with pytest.raises(ValueError, match="random_flip must be one of"):
        PairTransform(16, random_flip=True)  # the old boolean: which flip is meant must be said


def test_thin_image_has_only_its_crop_resized(monkeypatch):
    # Red encodes x and green y, so a crop taken from the wrong place (or flipped wrongly) shows in the pixels.
    ys, xs = np.mgrid[0:400, 0:20]
    thin = Image.fromarray(np.stack([xs * 12, ys * 255 // 399, np.zeros_like(xs)], -1).astype(np.uint8))
    whole = thin.resize((16, 320), Image.Resampling.BILINEAR)  # 20 x 16^2 pixels: over MAX_RESIZED_AREA
    assert 16 * 320 > MAX_RESIZED_AREA * 16 ** 2
    for s in range(6):
        flip = s % 2 == 1
        pixels, size, (top, left) = PairTransform(16, center_crop=False).apply(
            thin, flip, torch.Generator().manual_seed(s))
        expected = whole.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else whole
        expected = torch.from_numpy(np.array(expected.crop((left, top, left + 16, top + 16)))).permute(2, 0, 1)
        assert size == (400, 20) and left == 0 and 0 <= top <= 304
        assert (pixels - (expected / 127.5 - 1)).abs().max() <= 1.01 / 127.5  # a box resize rounds a level off

    sizes, resize = [], Image.Image.resize

    def recorded(image, size, *args, **kwargs):
        sizes.append(size)
        return resize(image, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", recorded)
    pixels, size, crop = PairTransform(64).apply(Image.new("RGB", (1, 2000), (9, 9, 9)), False, None)
    # resized whole it was 64 x 128,000 pixels (at resolution 512: 512 x 1,024,000, 1.5 GB)
    assert sizes == [(64, 64)] and (size, crop) == ((2000, 1), (63968, 0))
    assert torch.allclose(pixels, torch.full((3, 64, 64), 9 / 127.5 - 1))
    PairTransform(16).apply(Image.new("RGB", (40, 30)), False, None)
    assert sizes[-1] == (21, 16)  # a normal image is still resized whole, so its pixels are as they were


# ---------------------------------------------------------------- dataset + collate

@pytest.fixture
def pairs(parquet_file):
    return load_pairs(parquet_file, extra_columns=["model_0", "model_1", "weight", "user_id"])[0]


def test_winner_first_orientation_prompt_and_extras(pairs):
    dataset = PairDataset(pairs, PairTransform(16), seed=0, extra_columns=["model_0", "model_1", "weight", "user_id"])
    for index in range(len(dataset)):
        item = dataset[(0, index)]
        if "error" in item:
            continue
        assert is_red(item["pixel_values_w"]) and not is_red(item["pixel_values_l"]), index
        assert item["label_w"] == 1.0 and item["model_w"].endswith("winner") and item["model_l"].endswith("loser")
        assert "model_0" not in item and isinstance(item["weight"], float) and isinstance(item["user_id"], int)
    assert dataset[(0, SWAP_ROW)]["model_w"] == "m1-winner"  # the swapped row
    assert dataset[(0, 4)]["prompt"] == ""  # source row 5 has a None caption


def test_corrupt_row_is_skipped_and_batch_stays_aligned(pairs):
    extras = ["model_0", "model_1", "weight", "user_id"]
    dataset = PairDataset(pairs, PairTransform(16), seed=0, extra_columns=extras)
    batch = collate_pairs([dataset[(0, i)] for i in range(4)])  # index 2 is source row 3 (corrupt jpg_1)
    assert batch["indices"] == [0, 1, 3] and [i for i, _ in batch["skipped"]] == [2]
    assert "column jpg_1" in batch["skipped"][0][1]
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    assert all(is_red(p) for p in batch["pixel_values"][:3]) and not any(is_red(p) for p in batch["pixel_values"][3:])
    assert batch["prompts"] == ["prompt 0", "prompt 1", "prompt 4"]
    assert batch["original_sizes"].tolist() == [[30, 40]] * 6 and batch["crop_top_left"].tolist() == [[0, 2]] * 6
    assert batch["label_w"].tolist() == [1.0] * 3 and batch["user_id"] == [0, 1, 4]
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [0.0, 1.0, 4.0]
    assert batch["model_w"] == ["m0-winner", "m1-winner", "m4-winner"]

    empty = collate_pairs([dataset[(0, 2)]])
    assert empty["pixel_values"].shape == (0, 3, 0, 0) and empty["original_sizes"].shape == (0, 2)
    assert empty["prompts"] == [] and len(empty["skipped"]) == 1


def test_null_dcpo_caption_is_skipped_and_named(tmp_path):
    rows = make_rows(4) | {"caption_0": ["a", None, "c", "d"], "caption_1": ["w", "x", "y", "z"]}
    rows["jpg_1"][CORRUPT_ROW] = LOSE
    pairs, _ = load_pairs(write_parquet(tmp_path / "dcpo.parquet", rows), keep_ties=True,
                          extra_columns=["caption_0", "caption_1"])
    dataset = PairDataset(pairs, PairTransform(16), seed=0, extra_columns=["caption_0", "caption_1"])
    batch = collate_pairs([dataset[(0, i)] for i in range(4)])  # the tokenizer failed on the None
    assert batch["skipped"] == [(1, "pair 1: column caption_0 is null; expected a value")]
    assert batch["caption_w"] == ["a", "c", "d"] and batch["caption_l"] == ["w", "y", "z"]


def test_augmentation_depends_only_on_seed_epoch_index(pairs):
    dataset = PairDataset(pairs, PairTransform(16, center_crop=False, random_flip="pair"), seed=3)
    same = PairDataset(pairs, PairTransform(16, center_crop=False, random_flip="pair"), seed=3)
    for i in (0, 1, 4):
        a, b = dataset[(2, i)], same[(2, i)]
        assert torch.equal(a["pixel_values_w"], b["pixel_values_w"]) and a["crop_top_left_l"] == b["crop_top_left_l"]
    keys = lambda epoch: [(dataset[(epoch, i)]["crop_top_left_w"], dataset[(epoch, i)]["crop_top_left_l"])
                          for i in (0, 1, 4, 5, 6)]
    assert keys(0) != keys(1)


def test_loader_identical_with_and_without_workers(pairs):
    transform = PairTransform(16, center_crop=False, random_flip="pair")

    def first_batches(num_workers):
        loader = make_pair_loader(pairs, transform, batch_size=2, seed=7, num_workers=num_workers)
        return list(itertools.islice(loader, 7))  # 11 pairs -> 5 batches per epoch: crosses into epoch 1

    for a, b in zip(first_batches(0), first_batches(2), strict=True):
        assert a["indices"] == b["indices"] and a["skipped"] == b["skipped"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["crop_top_left"], b["crop_top_left"])


# ---------------------------------------------------------------- sampler

def test_sampler_uses_documented_permutation_and_ranks_partition_global_batches():
    n, bs, world = 23, 3, 2
    samplers = [PairBatchSampler(n, bs, seed=5, rank=r, world_size=world) for r in range(world)]
    assert samplers[0].batches_per_epoch == 3
    streams = [list(itertools.islice(iter(s), 6)) for s in samplers]
    for k in range(6):
        epoch, b = divmod(k, 3)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert streams[0][k] + streams[1][k] == [(epoch, i) for i in perm[b * 6:(b + 1) * 6]]
        assert not {i for _, i in streams[0][k]} & {i for _, i in streams[1][k]}


@pytest.mark.parametrize("start_batch", [1, 3, 4, 7])
def test_sampler_resume_is_exact_continuation(start_batch):
    full = list(itertools.islice(iter(PairBatchSampler(10, 2, seed=1, rank=1, world_size=2)), 12))
    resumed = PairBatchSampler(10, 2, seed=1, rank=1, world_size=2, start_batch=start_batch)
    assert list(itertools.islice(iter(resumed), 12 - start_batch)) == full[start_batch:]


def test_sampler_rejects_too_few_pairs():
    with pytest.raises(ValueError, match="5 pairs cannot fill one global batch"):
        PairBatchSampler(5, 3, seed=0, world_size=2)


# ---------------------------------------------------------------- streaming

def test_streaming_filters_ties(parquet_file):
    stream, stats = load_pairs(parquet_file, streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and stats == PairStats(None, None, None, None, None)
    captions = [row["caption"] for row in stream]
    assert len(captions) == N_ROWS - 1 and "prompt 2" not in captions
    assert len(list(load_pairs(parquet_file, streaming=True, keep_ties=True)[0])) == N_ROWS


def test_streaming_loader_batches_and_resume(parquet_file):
    stream, _ = load_pairs(parquet_file, streaming=True)
    transform = PairTransform(16, center_crop=False, random_flip="pair")
    full = list(itertools.islice(make_pair_loader(stream, transform, batch_size=3, seed=2), 7))
    resumed = list(itertools.islice(make_pair_loader(stream, transform, batch_size=3, seed=2, start_batch=4), 3))

    # 11 pairs -> 3 full batches of 3 per epoch (2 pairs dropped); a corrupt row shows up in "skipped".
    assert all(len(b["indices"]) + len(b["skipped"]) == 3 for b in full)
    assert all("column jpg_1" in msg for b in full for _, msg in b["skipped"])
    for batch in full:
        n = len(batch["prompts"])
        assert batch["pixel_values"].shape == (2 * n, 3, 16, 16) and "prompt 2" not in batch["prompts"]
        assert all(is_red(p) for p in batch["pixel_values"][:n])
    epoch0 = [p for b in full[:3] for p in b["prompts"]]
    assert epoch0 != [p for b in full[3:6] for p in b["prompts"]]  # reshuffled each epoch
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["prompts"] == b["prompts"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_streaming_ranks_get_disjoint_rows(tmp_path):
    rows = make_rows()
    rows["jpg_1"][CORRUPT_ROW] = LOSE
    path = write_parquet(tmp_path / "clean.parquet", rows)
    stream, _ = load_pairs(path, streaming=True)
    seen = []
    for rank in range(2):
        loader = make_pair_loader(stream, PairTransform(16), batch_size=2, seed=0, rank=rank, world_size=2)
        seen.append([p for b in itertools.islice(loader, 2) for p in b["prompts"]])
    assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])


def test_a_streams_first_n_pairs_are_shared_between_the_ranks(tmp_path):
    """Two files (which datasets splits between 2 processes whole) and max_pairs=4: the ranks share the stream's
    first 4 pairs, 2 each, whatever the number of processes; split by file, each took the first 2 of its own file."""
    for k in range(2):
        rows = make_rows()
        rows["jpg_1"][CORRUPT_ROW] = LOSE
        rows["caption"] = [f"file {k} prompt {i}" for i in range(N_ROWS)]
        write_parquet(tmp_path / "data" / f"{k}.parquet", rows)
    stream, _ = load_pairs(str(tmp_path / "data"), streaming=True, max_pairs=4)
    first = [row["caption"] for row in stream]
    assert first == [f"file 0 prompt {i}" for i in (0, 1, 3, 4)]  # the tie (row 2) dropped
    seen = []
    for rank in range(2):
        loader = make_pair_loader(stream, PairTransform(16), batch_size=1, seed=0, rank=rank, world_size=2,
                                  read_whole=True)
        seen.append({p for b in itertools.islice(loader, 2) for p in b["prompts"]})  # an epoch: 2 batches a rank
    assert len(seen[0]) == len(seen[1]) == 2 and seen[0] | seen[1] == set(first)


def test_streaming_from_save_to_disk_knows_its_counts(tmp_path):
    datasets.Dataset.from_dict(make_rows()).save_to_disk(str(tmp_path / "saved"))
    stream, stats = load_pairs(str(tmp_path / "saved"), streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and stats == PairStats(N_ROWS, 1, N_ROWS - 1)
    assert len(list(stream)) == N_ROWS - 1


# ---------------------------------------------------------------- labels without a winner

def test_null_and_nan_labels_are_dropped_and_counted(tmp_path):
    rows = make_rows()
    rows["label_0"][6], rows["label_1"][6] = None, None  # float(None) used to crash the loader
    rows["label_0"][7] = float("nan")  # a NaN comparison used to make image 0 the winner
    path = write_parquet(tmp_path / "nulls.parquet", rows)
    ds, stats = load_pairs(path, extra_columns=["user_id"])
    assert (stats.rows, stats.ties_dropped, stats.unlabelled, stats.pairs) == (N_ROWS, 1, 2, N_ROWS - 3)
    assert not {6, 7} & set(ds["user_id"])
    _, stats = load_pairs(path, keep_ties=True, keep_unlabelled=False)  # what training passes
    assert (stats.ties_dropped, stats.unlabelled, stats.pairs) == (0, 2, N_ROWS - 2)

    every, stats = load_pairs(path, keep_ties=True)  # tools that label or caption every row get them all
    assert stats.pairs == N_ROWS
    dataset = PairDataset(every, PairTransform(16), seed=0)
    assert dataset[(0, 6)]["error"].startswith("pair 6: no preference") and "label_0=None" in dataset[(0, 6)]["error"]
    assert "label_0=nan" in dataset[(0, 7)]["error"]

    # a label column with no value at all is arrow's null type: an object array of None, whose Nones would "tie"
    empty = {k: v[:3] for k, v in make_rows().items()} | {"label_0": [None] * 3, "label_1": [None] * 3}
    _, stats = load_pairs(write_parquet(tmp_path / "unlabelled.parquet", empty))
    assert (stats.ties_dropped, stats.unlabelled, stats.pairs) == (0, 3, 0)


def test_rows_pick_a_pic_flags_as_unlabelled_are_dropped_and_counted(tmp_path):
    """Pick-a-Pic's has_label false: whatever label_0/1 hold, no one chose; training read them as a preference.
    After `label`, label_0/1 are a scorer's and the flag is the human_label_0/1's, which SmPO orients by."""
    rows = make_rows()
    rows["has_label"] = [i not in (0, 6) for i in range(N_ROWS)]  # row 0: 1/0 labels, unflagged
    rows["has_label"][7] = None
    path = write_parquet(tmp_path / "flagged.parquet", rows)
    ds, stats = load_pairs(path, extra_columns=["user_id"])
    assert (stats.rows, stats.ties_dropped, stats.unlabelled, stats.pairs) == (N_ROWS, 1, 3, N_ROWS - 4)
    assert not {0, 6, 7} & set(ds["user_id"])
    assert load_pairs(path, keep_ties=True)[1].pairs == N_ROWS  # the labelling tools get every row
    stream, _ = load_pairs(path, extra_columns=["user_id"], streaming=True)
    assert [row["user_id"] for row in stream] == ds["user_id"]
    # a labelling output: label_0/1 are the scorer's, for every row; the flag belongs to human_label_0/1
    labelled = rows | {"human_label_0": rows["label_0"], "human_label_1": rows["label_1"],
                       "pickscore_0": [2.0] * N_ROWS, "pickscore_1": [1.0] * N_ROWS}
    path = write_parquet(tmp_path / "labelled.parquet", labelled)
    assert load_pairs(path)[1].unlabelled == 0
    _, stats = load_pairs(path, orient_by="pickscore")  # SmPO decides ties and labels on the human labels
    assert (stats.ties_dropped, stats.unlabelled) == (1, 3)


def test_a_has_label_of_1_0_is_read_as_flags_and_one_of_text_is_named(tmp_path):
    """A has_label of integers (a CSV's copy of Pick-a-Pic) or of 1.0/0.0/NaN (pandas') failed in pyarrow, naming no
    file; one of text was kept whole when streamed ("false" is a true string)."""
    rows = make_rows()
    rows["has_label"] = [0 if i in (0, 6) else 1 for i in range(N_ROWS)]
    rows["has_label"][7] = None
    path = write_parquet(tmp_path / "ints.parquet", rows)
    ds, stats = load_pairs(path, extra_columns=["user_id"])
    assert (stats.unlabelled, stats.pairs) == (3, N_ROWS - 4) and not {0, 6, 7} & set(ds["user_id"])
    assert [row["user_id"] for row in load_pairs(path, extra_columns=["user_id"], streaming=True)[0]] == ds["user_id"]
    floats = [float("nan") if f is None else float(f) for f in rows["has_label"]]  # pandas' copy of 1/0/null
    for flags in (floats, [None if f is None else float(f) for f in rows["has_label"]]):
        path = write_parquet(tmp_path / "floats.parquet", rows | {"has_label": flags})
        assert load_pairs(path, extra_columns=["user_id"])[0]["user_id"] == ds["user_id"]
        assert [row["user_id"] for row in load_pairs(path, extra_columns=["user_id"], streaming=True)[0]] \
            == ds["user_id"]
    text = write_parquet(tmp_path / "text.parquet", rows | {"has_label": ["false", *["true"] * (N_ROWS - 1)]})
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"text.parquet: column has_label holds string values; expected "
                                             r"true/false \(or 1/0\)"):
            load_pairs(text, streaming=streaming)


def test_labels_outside_0_1_are_unlabelled_streamed_or_not(tmp_path):
    rows = make_rows()
    rows["jpg_1"][CORRUPT_ROW] = LOSE
    rows["label_0"][6], rows["label_1"][6] = 2.0, 0.0  # no stronger than 1 / 0: says nothing
    rows["label_0"][7], rows["label_1"][7] = -1.0, 0.0
    path = write_parquet(tmp_path / "range.parquet", rows)
    ds, stats = load_pairs(path, keep_ties=True, keep_unlabelled=False)
    assert (stats.unlabelled, stats.out_of_range, stats.pairs) == (2, 2, N_ROWS - 2)
    for orient_by in (None, "r"):
        extras = ["r_0", "r_1"] if orient_by else []
        scores = {"r_0": np.ones(N_ROWS), "r_1": np.zeros(N_ROWS)} if orient_by else {}
        streamed = write_parquet(tmp_path / "scored.parquet", rows | scores)
        stream, _ = load_pairs(streamed, keep_ties=True, streaming=True, extra_columns=extras, orient_by=orient_by)
        batch, = itertools.islice(make_pair_loader(stream, PairTransform(16), N_ROWS, 0, extra_columns=extras), 1)
        assert sorted(batch["prompts"]) == sorted(p or "" for p in ds["caption"])  # the rows trained on: the same
        reasons = " ".join(why for _, why in batch["skipped"])  # a stream's index is its position, not its row
        assert len(batch["skipped"]) == 2 and reasons.count("no preference to orient the pair by") == 2


def test_integer_score_columns_collate_to_float_tensors(tmp_path):
    rows = make_rows(6) | {"rating_0": [7, 1, 5, 2, 4, 3], "rating_1": [1, 7, 2, 5, 3, 4]}
    rows["jpg_1"][CORRUPT_ROW] = LOSE
    path = write_parquet(tmp_path / "ratings.parquet", rows)
    assert pq.read_schema(path).field("rating_0").type == pa.int64()
    extras = ["rating_0", "rating_1"]
    pairs, _ = load_pairs(path, extra_columns=extras, orient_by="rating")
    dataset = PairDataset(pairs, PairTransform(16), seed=0, extra_columns=extras)
    stream, _ = load_pairs(path, streaming=True, extra_columns=extras, orient_by="rating")
    for batch in (collate_pairs([dataset[(0, i)] for i in range(4)]),
                  next(iter(make_pair_loader(stream, PairTransform(16), 4, 0, extra_columns=extras)))):
        # a list of ints reached SmPO's soft label, which fails on it
        assert batch["rating_w"].dtype == batch["rating_l"].dtype == torch.float32
        assert len(batch["rating_w"]) == 4 and (batch["rating_w"] > batch["rating_l"]).all()


def test_streamed_null_and_nan_labels_are_skipped_and_counted(tmp_path):
    rows = make_rows()
    rows["label_0"][6], rows["label_1"][6] = None, None
    rows["label_0"][7] = float("nan")
    stream, _ = load_pairs(write_parquet(tmp_path / "nulls.parquet", rows), streaming=True)
    batch, = itertools.islice(make_pair_loader(stream, PairTransform(16), batch_size=N_ROWS - 1, seed=0), 1)
    assert len(batch["skipped"]) == 3  # one epoch of 11 rows, all in this batch
    assert sum("no preference" in why for _, why in batch["skipped"]) == 2  # rows 6 and 7
    assert sum("column jpg_1" in why for _, why in batch["skipped"]) == 1  # row 3, as before
    assert sorted(batch["prompts"]) == sorted(["prompt 0", "prompt 1", "prompt 4", "", "prompt 8", "prompt 9",
                                               "prompt 10", "prompt 11"])  # row 5's caption is None
    assert all(is_red(p) for p in batch["pixel_values"][:len(batch["prompts"])])


# ---------------------------------------------------------------- orientation by a reward (SmPO)

def reward_rows(human: str):
    """Red jpg_0, blue jpg_1; people's labels in `<human>_0/1` (with AI ties in label_0/1 when that is
    human_label, as `diffusion-align label` writes them) and reward scores r_0 / r_1."""
    # (human label_0, r_0, r_1): the reward orients; human ties (rows 2, 6) are dropped first
    table = [(1.0, 0.3, 0.1),    # 0: both pick image 0
             (1.0, 0.1, 0.2),    # 1: the reward picks image 1, people image 0
             (0.5, 0.3, 0.1),    # 2: human tie
             (0.0, 0.2, 0.2),    # 3: equal rewards: label 0.5, image 0 stays first
             (0.0, None, 0.1),   # 4: no reward score
             (None, 0.3, 0.1),   # 5: no human label
             (0.5, 0.1, 0.3)]    # 6: human tie
    rows = {"caption": [f"prompt {i}" for i in range(len(table))], "jpg_0": [WIN] * len(table),
            "jpg_1": [LOSE] * len(table), f"{human}_0": [h for h, _, _ in table],
            f"{human}_1": [None if h is None else 1 - h for h, _, _ in table],
            "r_0": [a for _, a, _ in table], "r_1": [b for _, _, b in table]}
    if human != "label":
        rows["label_0"] = rows["label_1"] = [0.5] * len(table)
    return rows


@pytest.mark.parametrize("human", ["label", "human_label"])
def test_orient_by_reward_after_dropping_human_ties(tmp_path, human):
    path = write_parquet(tmp_path / "pairs.parquet", reward_rows(human))
    ds, stats = load_pairs(path, extra_columns=["r_0", "r_1"], keep_unlabelled=False, orient_by="r")
    assert (stats.rows, stats.ties_dropped, stats.unlabelled, stats.unscored, stats.pairs) == (7, 2, 1, 1, 3)
    assert ds["caption"] == ["prompt 0", "prompt 1", "prompt 3"] and ds["label_0"] == [1.0, 0.0, 0.5]
    items = [PairDataset(ds, PairTransform(16), seed=0, extra_columns=["r_0", "r_1"])[(0, i)] for i in range(3)]
    assert [is_red(it["pixel_values_w"]) for it in items] == [True, False, True]  # the higher reward first
    assert all(it["r_w"] >= it["r_l"] for it in items) and [it["label_w"] for it in items] == [1.0, 1.0, 0.5]

    kept, stats = load_pairs(path, keep_ties=True, keep_unlabelled=False, orient_by="r")  # ties oriented too
    assert (stats.ties_dropped, stats.pairs) == (0, 5) and kept["label_0"] == [1.0, 0.0, 1.0, 0.5, 0.0]

    stream, _ = load_pairs(path, streaming=True, extra_columns=["r_0", "r_1"], orient_by="r")
    batch, = itertools.islice(make_pair_loader(stream, PairTransform(16), batch_size=5, seed=0,
                                               extra_columns=["r_0", "r_1"]), 1)
    assert sorted(batch["prompts"]) == ["prompt 0", "prompt 1", "prompt 3"]  # ties filtered out of the stream
    assert sum("no preference" in why for _, why in batch["skipped"]) == 2  # rows 4 and 5
    assert (batch["r_w"] >= batch["r_l"]).all()
    red_first = {p: is_red(w) for p, w in zip(batch["prompts"], batch["pixel_values"])}
    assert red_first == {"prompt 0": True, "prompt 1": False, "prompt 3": True}


def test_scores_are_joined_by_source_row(parquet_file):
    scores = {"r_0": np.arange(N_ROWS, dtype=np.float32), "r_1": np.full(N_ROWS, 5.5, np.float32)}
    scores["r_0"][4] = np.nan  # an image the scorer could not decode
    ds, stats = load_pairs(parquet_file, extra_columns=["r_0", "r_1", "user_id"], orient_by="r", scores=scores)
    assert (stats.ties_dropped, stats.unscored, stats.pairs) == (1, 1, N_ROWS - 2)
    assert ds["user_id"] == [0, 1, 3, 5, 6, 7, 8, 9, 10, 11] and ds["r_0"] == [float(i) for i in ds["user_id"]]
    assert ds["label_0"] == [0.0] * 4 + [1.0] * 6  # r_0 = row < 5.5 = r_1 for rows 0-5
    with pytest.raises(ValueError, match=r"pairs.parquet: 12 rows, but 11 values for column r_0"):
        load_pairs(parquet_file, orient_by="r", scores={k: v[:-1] for k, v in scores.items()})
    with pytest.raises(ValueError, match="joined by source row, which needs streaming=False"):
        load_pairs(parquet_file, streaming=True, orient_by="r", scores=scores)
