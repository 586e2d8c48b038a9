import json

import numpy as np
import pytest
from PIL import Image

from diffusion_align.evaluation.grid import (
    BACKGROUND, BEST, LETTERBOX, PLACEHOLDER, folder_labels, load_font, make_grid, match_rows, wrap_text,
)
from diffusion_align.evaluation.scoring import ScoringError

PROMPTS = ["a red cube on a table", "a lighthouse at dusk, long exposure, waves crashing on the rocks below",
           "an owl"]
CELL = 64
ABSENT = {(1, 2, 2), (2, 2, 1)}  # (folder, prompt, seed) of tuned's missing image and third's corrupt one


def colour(folder: int, prompt: int, seed: int) -> tuple[int, int, int]:
    """A colour of its own for every image, so each can be found on the page."""
    return 40 + 60 * folder, 30 + 70 * prompt, 60 + 90 * (seed - 1)


def write_folder(root, index, size_of, missing=(), broken=(), seeds=(1, 2)):
    """Images of PROMPTS x seeds, of size size_of(prompt index), listed in metadata.jsonl; `missing` (prompt, seed)
    listed but never written, `broken` written as a corrupt PNG."""
    root.mkdir(parents=True)
    records = []
    for p, prompt in enumerate(PROMPTS):
        for seed in seeds:
            name = f"{p:02d}-{seed}.png"
            records.append({"file_name": name, "prompt": prompt, "seed": seed})
            if (p, seed) in broken:
                (root / name).write_bytes(b"\x89PNG not really")
            elif (p, seed) not in missing:
                Image.new("RGB", size_of(p), colour(index, p, seed)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture
def folders(tmp_path):
    """base: squares of 64 and 128 px; tuned: a wide image for the second prompt, one image missing;
    third: a tall image for the second prompt, one corrupt file. The first prompt is square everywhere."""
    base = write_folder(tmp_path / "base", 0, lambda p: (64, 64) if p != 2 else (128, 128))
    tuned = write_folder(tmp_path / "tuned", 1, lambda p: (96, 48) if p == 1 else (80, 80), missing=[(2, 2)])
    third = write_folder(tmp_path / "third", 2, lambda p: (48, 96) if p == 1 else (64, 64), broken=[(2, 1)])
    return [base, tuned, third]


def load(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def find(page, rgb, tolerance=3):
    """Bounding box (x0, y0, x1, y1), inclusive, of the pixels within `tolerance` of `rgb`; None if there are none."""
    ys, xs = np.nonzero((np.abs(page - np.array(rgb)) <= tolerance).all(axis=-1))
    return None if len(xs) == 0 else (xs.min(), ys.min(), xs.max(), ys.max())


def ink(region):
    """Pixels that are not page background: text was drawn there."""
    return int((np.abs(region - np.array(BACKGROUND)).sum(axis=-1) > 100).sum())


def test_match_rows_pairs_prompt_and_seed_across_folders(folders):
    labels, rows = match_rows(folders)
    assert labels == ["base", "tuned", "third"]
    assert [(r.prompt, r.seed) for r in rows] == [(p, s) for p in PROMPTS for s in (1, 2)]
    assert rows[0].files == ("00-1.png", "00-1.png", "00-1.png")
    assert rows[5].files == ("02-2.png", None, "02-2.png")  # never written in tuned
    assert rows[4].files == ("02-1.png", "02-1.png", "02-1.png")  # corrupt in third: found, drawn as unreadable
    assert rows[0].label == "seed 1"


def test_rows_with_notes_come_first_in_the_notes_order_and_show_them(folders, tmp_path):
    notes = {(PROMPTS[2], 2): "judge: tuned better by far", (PROMPTS[0], 2): "judge: base better"}
    _, rows = match_rows(folders, notes=notes)
    assert [(r.prompt, r.seed, r.note) for r in rows[:3]] == [(PROMPTS[2], 2, notes[PROMPTS[2], 2]),
                                                             (PROMPTS[0], 2, notes[PROMPTS[0], 2]),
                                                             (PROMPTS[0], 1, None)]
    assert [(r.prompt, r.seed) for r in rows[2:]] == [(PROMPTS[0], 1), (PROMPTS[1], 1), (PROMPTS[1], 2),
                                                      (PROMPTS[2], 1)]  # the rest in their usual order
    noted = load(make_grid(folders, tmp_path / "noted.png", cell_size=CELL, notes=notes).pages[0])
    silent = load(make_grid(folders, tmp_path / "silent.png", cell_size=CELL,
                            notes=dict.fromkeys(notes, "")).pages[0])  # the same order, no text
    prompt_column = slice(0, 160)  # max(160, cell)
    assert ink(noted[:, prompt_column]) > ink(silent[:, prompt_column])
    assert np.array_equal(noted[:, 160:], silent[:, 160:])
    first_row = noted[:noted.shape[0] // 5]  # header and the first row, of six: tuned's image is missing there
    assert find(first_row, PLACEHOLDER) is not None and find(silent[:silent.shape[0] // 5], PLACEHOLDER) is not None


def test_match_rows_without_seeds_pairs_by_prompt_and_order(tmp_path):
    a = write_folder(tmp_path / "a", 0, lambda p: (8, 8), seeds=(1, 2))
    b = tmp_path / "b"
    b.mkdir()
    for name in ("x1.png", "x2.png", "x3.png"):  # .txt prompts record no seed
        Image.new("RGB", (8, 8)).save(b / name)
        (b / name).with_suffix(".txt").write_text(PROMPTS[0])
    _, rows = match_rows([a, b])
    first = [(r.seed, r.occurrence, r.files) for r in rows if r.prompt == PROMPTS[0]]
    # images with a seed never match seed-less ones; seed-less ones fill rows in file-name order
    assert first == [(1, 0, ("00-1.png", None)), (2, 0, ("00-2.png", None)), (None, 0, (None, "x1.png")),
                     (None, 1, (None, "x2.png")), (None, 2, (None, "x3.png"))]
    assert [r.label for r in rows[2:4]] == ["no seed, #1", "no seed, #2"]


def test_folder_labels_tell_same_named_folders_apart(tmp_path):
    assert folder_labels([tmp_path / "runs/a/samples", tmp_path / "runs/b/samples", tmp_path / "base"]) == [
        "a/samples", "b/samples", "base"]
    with pytest.raises(ValueError, match="more than once"):
        folder_labels([tmp_path / "a", tmp_path / "x/../a"])


def test_wrap_text_fits_the_width_and_ends_cut_text_with_an_ellipsis():
    font = load_font(14)
    lines = wrap_text("a lighthouse at dusk " + "x" * 80, font, 120, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 120 for line in lines)
    assert wrap_text("an owl", font, 120, 3) == ["an owl"]


def test_grid_letterboxes_marks_missing_and_labels(folders, tmp_path):
    report = make_grid(folders, tmp_path / "out" / "grid.png", cell_size=CELL, rows_per_page=10)
    assert report.pages == [tmp_path / "out" / "grid.png"] and report.rows == 6
    assert report.missing == [("tuned", f"{PROMPTS[2]!r}, seed 2")]
    assert [file for file, _ in report.unreadable] == ["third/02-1.png"]
    page = load(report.pages[0])

    # the first prompt is square in every folder: its images fill their cells, which gives the columns
    cells = [find(page, colour(f, 0, 1)) for f in range(3)]
    assert all(x1 - x0 + 1 == CELL and y1 - y0 + 1 == CELL for x0, y0, x1, y1 in cells)
    assert len({y0 for _, y0, _, _ in cells}) == 1 and cells[0][0] < cells[1][0] < cells[2][0]
    top = cells[0][1]
    for x0, _, x1, _ in cells:  # the folder names above the columns
        assert ink(page[:top - 2, x0:x1 + 1]) > 20
    assert ink(page[top:top + CELL, :cells[0][0] - 2]) > 50  # the prompt beside the row

    # 128 px squares are scaled down to the same cell
    x0, y0, x1, y1 = find(page, colour(0, 2, 1))
    assert (x1 - x0 + 1, y1 - y0 + 1) == (CELL, CELL)

    # a 96x48 image: 64x32 between bars of 16 px above and below; a 48x96 one: bars left and right
    x0, y0, x1, y1 = find(page, colour(1, 1, 1))
    assert (x1 - x0 + 1, y1 - y0 + 1) == (CELL, CELL // 2)
    mid = (x0 + x1) // 2
    assert all(tuple(page[y, mid]) == LETTERBOX for y in (y0 - 16, y0 - 1, y1 + 1, y1 + 16))
    assert tuple(page[y0 - 17, mid]) != LETTERBOX and tuple(page[y1 + 17, mid]) != LETTERBOX
    x0, y0, x1, y1 = find(page, colour(2, 1, 2))
    assert (x1 - x0 + 1, y1 - y0 + 1) == (CELL // 2, CELL)
    mid = (y0 + y1) // 2
    assert all(tuple(page[mid, x]) == LETTERBOX for x in (x0 - 16, x0 - 1, x1 + 1, x1 + 16))

    # placeholders (missing and unreadable): crossed-out cells, with the word on them
    placeholders = (np.abs(page - np.array(PLACEHOLDER)) <= 3).all(axis=-1)
    tuned_column = placeholders[:, cells[1][0]:cells[1][2] + 1]
    third_column = placeholders[:, cells[2][0]:cells[2][2] + 1]
    assert tuned_column.sum() > CELL * CELL // 2 and third_column.sum() > CELL * CELL // 2
    assert placeholders[:, cells[0][0]:cells[0][2] + 1].sum() == 0


def test_grid_pages_and_their_names(folders, tmp_path):
    out = tmp_path / "grid.png"
    whole = make_grid(folders, out, cell_size=CELL, rows_per_page=10)
    assert whole.pages == [out]
    sizes = [Image.open(out).size]
    paged = make_grid(folders, out, cell_size=CELL, rows_per_page=4)
    assert paged.pages == [out, tmp_path / "grid-002.png"], "the first page is always the name given"
    sizes += [Image.open(p).size for p in paged.pages]
    assert len({w for w, _ in sizes}) == 1 and sizes[0][0] >= 3 * CELL + 160
    row = sizes[1][1] - sizes[2][1]  # 4 rows and 2 rows on the pages, 6 on the whole
    assert row > CELL and sizes[0][1] - sizes[1][1] == row

    small = make_grid(folders, out, cell_size=CELL, rows_per_page=2)
    assert [p.name for p in small.pages] == ["grid.png", "grid-002.png", "grid-003.png"]
    for name in ("grid-001.png", "grid-2024.png", "grid-04.png"):  # files of the user's, never a page
        Image.new("RGB", (2, 2)).save(tmp_path / name)
    make_grid(folders, out, cell_size=CELL, rows_per_page=3)
    # the third page of the run before would look current: it is removed
    assert sorted(p.name for p in tmp_path.glob("grid*.png")) == ["grid-001.png", "grid-002.png", "grid-04.png",
                                                                  "grid-2024.png", "grid.png"]

    with pytest.raises(ValueError, match="unknown image type"):
        make_grid(folders, tmp_path / "grid.txt")


def test_grid_scores_and_marks_the_best_of_each_row(folders, tmp_path):
    from diffusion_align.rewards.tiny import save_tiny_scorer
    from diffusion_align.rewards import load_scorer
    scorer = load_scorer("pickscore", save_tiny_scorer("pickscore", tmp_path / "scorer"), device="cpu")
    report = make_grid(folders, tmp_path / "grid.png", scorer=scorer, cell_size=CELL)
    page = load(report.pages[0])
    assert report.scorer == "pickscore"

    # cells: columns from the first row (square everywhere), rows from base (square in every row)
    xs = [find(page, colour(f, 0, 1))[0] for f in range(3)]
    best = dict.fromkeys(report.folders, 0)
    for p, prompt in enumerate(PROMPTS):
        for seed in (1, 2):
            y = find(page, colour(0, p, seed))[1]
            files = [d / f"{p:02d}-{seed}.png" for d in folders]
            present = [f for f in range(3) if (f, p, seed) not in ABSENT]
            scores = scorer.score([Image.open(files[f]).convert("RGB") for f in present], [prompt] * len(present))
            winners = {f for f, s in zip(present, scores.tolist()) if f"{s:.4g}" == f"{scores.max().item():.4g}"}
            for f in range(3):
                ring = page[y - 4:y + CELL + 4, xs[f] - 4:xs[f] + CELL + 4].copy()
                ring[4:-4, 4:-4] = BACKGROUND  # only the frame around the cell, not the image
                assert (np.abs(ring - np.array(BEST)) <= 3).all(axis=-1).any() == (f in winners), (prompt, seed, f)
                under = ink(page[y + CELL + 2:y + CELL + 20, xs[f]:xs[f] + CELL])
                assert (under > 10) == (f in present)  # the score under each scored image
            for f in winners:
                best[report.folders[f]] += 1
    assert report.best == best and sum(best.values()) >= 6


def test_a_photo_turned_by_its_exif_is_shown_upright_and_scored_as_score_scores_it(tmp_path):
    """The grid scored the upright image and `score` the stored one: two numbers for one photo."""
    from diffusion_align.evaluation.scoring import score_folder
    from diffusion_align.rewards import load_scorer
    from diffusion_align.rewards.tiny import save_tiny_scorer
    scorer = load_scorer("pickscore", save_tiny_scorer("pickscore", tmp_path / "scorer"), device="cpu")
    folder = tmp_path / "photos"
    folder.mkdir()
    stored = Image.new("RGB", (96, 48), (200, 40, 40))
    stored.paste((40, 40, 200), (0, 0, 48, 48))  # a left half to tell the turns apart
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    stored.save(folder / "photo.jpg", exif=exif, quality=95)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "photo.jpg", "prompt": "a photo"}) + "\n")

    report = make_grid([folder], tmp_path / "grid.png", scorer=scorer, cell_size=CELL)
    scored = score_folder(folder, [scorer], tmp_path / "scores.csv", num_workers=0)
    assert list(report.scores.values()) == pytest.approx([scored.rows[0][scorer.column]], abs=1e-6)
    # upright: 48 wide and 96 tall, letterboxed to 32 x 64, the stored left half now on top
    page = load(report.pages[0])
    red, blue = find(page, (200, 40, 40), tolerance=40), find(page, (40, 40, 200), tolerance=40)
    assert (red[2] - red[0] + 1, blue[2] - blue[0] + 1) == (CELL // 2, CELL // 2)
    assert blue[3] < red[1]


def test_equal_looking_scores_are_all_the_best():
    from diffusion_align.evaluation.grid import best_columns
    # 0.12341 and 0.12344 both print as 0.1234: marking only the larger would look arbitrary
    scores = {(0, 0): 0.12341, (0, 1): 0.12344, (0, 2): 0.1233, (1, 0): float("nan"), (1, 1): -2.0, (1, 2): -3.0}
    assert best_columns(scores, 0, 3) == {0, 1}
    assert best_columns(scores, 1, 3) == {1} and best_columns({}, 0, 3) == set()
    # one score in a row beats nothing: an unreadable or missing image beside it (which counted as a win), one folder
    assert best_columns({(0, 0): float("nan"), (0, 1): 5.0}, 0, 3) == set() == best_columns({(0, 0): 5.0}, 0, 1)


def test_grid_needs_prompts_for_a_prompted_scorer(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")

    class NeedsPrompts:
        name, column, needs_prompts = "fake", "fake", True

    with pytest.raises(ScoringError, match="needs a prompt for each image; 1 have none, e.g. plain/x.png"):
        make_grid([folder], tmp_path / "g.png", scorer=NeedsPrompts())
    report = make_grid([folder], tmp_path / "g.png", prompt="an owl")  # a prompt for all, as `score --prompt`
    assert report.rows == 1


def test_a_grid_inside_a_compared_folder_is_refused(tmp_path):
    """Its pages would be images of that folder on the next run: a row of their own."""
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    for out in (folder / "grid.png", folder / "results" / "grid.png"):
        with pytest.raises(ValueError, match=f"{out}: lies inside the compared folder {folder}"):
            make_grid([folder], out, prompt="an owl")
        assert not out.exists()
