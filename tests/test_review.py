import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from diffusion_align.data.pairs import load_pairs
from diffusion_align.evaluation.review import import_review, match_folders, read_choices, review_data, write_review_page

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPTS = ["a red cube", "a lighthouse at dusk", "an owl"]


def write_folder(root, shade, seeds=(1, 2), missing=(), prompts=PROMPTS, name="{p}-{seed}.png"):
    """One image per prompt x seed (a colour of its own, so the bytes differ), listed in metadata.jsonl."""
    root.mkdir(parents=True)
    records = []
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            file = name.format(p=p, seed=seed)
            records.append({"file_name": file, "prompt": prompt, "seed": seed})
            if (p, seed) not in missing:
                Image.new("RGB", (16, 16), (shade, 40 * p, 100 * seed % 256)).save(root / file)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture
def folders(tmp_path):
    return [write_folder(tmp_path / "base", 10), write_folder(tmp_path / "tuned", 200, missing=[(2, 2)])]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def choice(file_a, file_b, choice, prompt="a red cube", seed=1, left="a", folder_a="base", folder_b="tuned"):
    return {"prompt": prompt, "seed": seed, "folder_a": folder_a, "folder_b": folder_b, "file_a": file_a,
            "file_b": file_b, "left": left, "choice": choice, "time": "2025-01-01T00:00:00.000Z"}


# ---------------------------------------------------------------- the page's data (no browser)

def test_data_block_survives_script_breaking_prompts(tmp_path):
    prompt = "</script><script>alert(1)</script> <!-- & \u2028 caf\u00e9"
    folder = write_folder(tmp_path / "a", 0, prompts=[prompt], seeds=(1,))
    page = write_review_page([folder], tmp_path / "review.html").read_text(encoding="ascii")  # ASCII only
    block = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page, re.S)[1]
    assert json.loads(block)["rows"][0]["prompt"] == prompt
    assert "<" not in block and page.count("</script>") == 2  # the data block's and the code's own
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)[1]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe" not in policy


def test_review_data_pairs_rows_with_both_images_and_draws_sides_from_the_seed(folders):
    data = review_data(folders, seed=1)
    assert data["folders"] == ["base", "tuned"] and len(data["rows"]) == 6
    assert data["rows"][5]["cells"][1] is None  # missing in tuned
    assert data["images"][data["rows"][0]["cells"][0]["image"]].startswith("data:image/png;base64,")
    ab = data["ab"]
    assert ab["folders"] == ["base", "tuned"] and [p["row"] for p in ab["pairs"]] == [0, 1, 2, 3, 4]
    sides = [[p["left"] for p in review_data(folders, seed=s)["ab"]["pairs"]] for s in range(8)]
    assert sides[1] == [p["left"] for p in ab["pairs"]]  # the same seed, the same sides
    assert len({tuple(s) for s in sides}) > 1 and {"a", "b"} <= {x for s in sides for x in s}
    assert review_data(folders, ab=["tuned", 0])["ab"]["folders"] == ["tuned", "base"]
    assert review_data(folders, ab=["1", "0"])["ab"]["folders"] == ["tuned", "base"]  # as the command line gives them
    with pytest.raises(ValueError, match="no folder 'other'"):
        review_data(folders, ab=["other", "base"])
    assert review_data(folders[:1])["ab"] is None  # one folder: nothing to compare


def test_saved_choices_resume_only_on_the_same_images(folders):
    """The page keeps its choices in localStorage under data["id"]: a folder regenerated under the same names,
    prompts and seeds (a retrained model) must not take the old choices as judged."""
    first = review_data(folders, seed=1)
    assert review_data(folders, seed=1)["id"] == first["id"]  # a page written again resumes
    assert review_data(folders, seed=2)["id"] != first["id"]  # other sides
    shutil.rmtree(folders[1])
    write_folder(folders[1], 201, missing=[(2, 2)])  # other pixels, the same files
    assert review_data(folders, seed=1)["id"] != first["id"]


def test_seeds_past_javascript_integers_go_as_strings(tmp_path):
    folder = write_folder(tmp_path / "a", 0, prompts=["x"], seeds=(2**53 - 1, 2**64 - 1))
    assert [r["seed"] for r in review_data([folder])["rows"]] == [2**53 - 1, str(2**64 - 1)]
    path = write_jsonl(tmp_path / "c.jsonl", [choice("0-1.png", "0-1.png", "a", seed=str(2**64 - 1))])
    assert read_choices(path)[0]["seed"] == str(2**64 - 1)


def test_images_browsers_cannot_show_are_embedded_as_png(tmp_path):
    folder = write_folder(tmp_path / "scans", 0, prompts=["a scan"], seeds=(1,), name="scan.tif")
    data = review_data([folder])
    assert data["rows"][0]["cells"][0]["file"] == "scan.tif" and data["images"][0].startswith("data:image/png;")


def test_an_unreadable_image_browsers_cannot_show_is_a_broken_image_not_an_error(tmp_path, caplog):
    """As an unreadable PNG is: the page was not written at all, after the grid had coped with it."""
    folder = write_folder(tmp_path / "scans", 0, prompts=["a scan", "another", "third"], seeds=(1,),
                          name="scan{p}.tif")
    (folder / "scan1.tif").write_bytes(b"II*\x00 not really a TIFF")
    (folder / "scan2.tif").unlink()
    (folder / "scan2.tif").symlink_to(tmp_path / "nowhere.tif")  # a broken link: it stopped the page too
    page = write_review_page([folder], tmp_path / "page.html")
    data = review_data([folder])
    assert data["images"][1:] == ["data:image/png;base64,"] * 2 and len(data["images"][0]) > 100
    assert page.is_file() and "scan1.tif: cannot convert to PNG for the page" in caplog.text
    assert "scan2.tif: cannot be read (No such file or directory)" in caplog.text


# ---------------------------------------------------------------- import

def test_import_review_writes_pick_a_pic_pairs(folders, tmp_path):
    choices = write_jsonl(tmp_path / "choices.jsonl", [
        choice("0-1.png", "0-1.png", "a"), choice("0-2.png", "0-2.png", "b", seed=2, left="b"),
        choice("1-1.png", "1-1.png", "tie", prompt=None), choice("1-2.png", "1-2.png", "skip"), ""])
    report = import_review(choices, folders[::-1], tmp_path / "pairs")
    assert (report.pairs, report.skipped, report.choices) == (3, 1, {"a": 1, "b": 1, "tie": 1})
    assert report.folders == {"base": str(folders[0]), "tuned": str(folders[1])}
    assert [p.name for p in report.shards] == ["pairs-00000.parquet"]

    pairs, stats = load_pairs(str(tmp_path / "pairs"), keep_ties=True, extra_columns="all")
    assert stats.rows == 3
    assert [(r["label_0"], r["label_1"]) for r in pairs] == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    assert pairs[0]["jpg_0"] == (folders[0] / "0-1.png").read_bytes()
    assert pairs[0]["jpg_1"] == (folders[1] / "0-1.png").read_bytes()
    assert pairs["caption"] == ["a red cube", "a red cube", ""] and pairs["image_1_path"] == ["0-1.png", "0-2.png",
                                                                                          "1-1.png"]
    assert pairs["left"] == ["a", "b", "a"] and pairs["folder_1"] == ["tuned"] * 3
    untied, _ = load_pairs(str(tmp_path / "pairs"))  # training's default drops ties
    assert len(untied) == 2

    # a later import replaces the earlier one's shards whole
    import_review([choices, choices], folders, tmp_path / "pairs", shard_size=2)
    again, _ = load_pairs(str(tmp_path / "pairs"), keep_ties=True)
    assert len(again) == 6 and len(list((tmp_path / "pairs").glob("pairs-*.parquet"))) == 3
    import_review(choices, folders, tmp_path / "pairs")
    assert len(list((tmp_path / "pairs").glob("pairs-*.parquet"))) == 1
    assert not list((tmp_path / "pairs").glob(".*"))  # no temporary files left


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"prompt": "x"}, r"missing key\(s\) \['seed'"),
    (choice("0-1.png", "0-1.png", "left"), "expected 'choice' to be one of"),
    (choice("0-1.png", "0-1.png", "a", left="left"), "expected 'left'"),
    (choice("0-1.png", "0-1.png", "a", seed="one"), "expected 'seed'"),
    (choice("0-1.png", "0-1.png", "a", seed=1.5), "expected 'seed'"),
    (choice("../base/0-1.png", "0-1.png", "a"), "file_a .* points outside its folder"),
    ({**choice("0-1.png", "0-1.png", "a"), "sha256_b": "abc"}, "expected 'sha256_b' to be a sha256"),
])
def test_read_choices_names_the_bad_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "c.jsonl", [choice("0-1.png", "0-1.png", "a"), "", line])
    with pytest.raises(ValueError, match=f"c.jsonl:3: {message}"):
        read_choices(path)


def test_import_review_errors_name_folders_and_lines(folders, tmp_path):
    choices = write_jsonl(tmp_path / "c.jsonl", [choice("0-1.png", "0-1.png", "a"),
                                                 choice("2-2.png", "2-2.png", "b", seed=2)])
    with pytest.raises(ValueError, match=r"names folder\(s\) 'tuned' that no --images folder ends in"):
        import_review(choices, folders[:1], tmp_path / "out")
    # a missing (or unreadable) image leaves its pair out, named; the rest is imported
    report = import_review(choices, folders, tmp_path / "partly")
    assert report.pairs == 1 and len(report.unreadable) == 1
    assert re.match(r".*c.jsonl:2: cannot read image .*tuned/2-2.png", report.unreadable[0])
    assert "left out, 1 pair(s) whose image cannot be read" in str(report)
    # an image regenerated under its name since the page showed it: not the image judged, so its pair is left out
    shown = hashlib.sha256((folders[1] / "0-1.png").read_bytes()).hexdigest()
    Image.new("RGB", (16, 16), (0, 0, 0)).save(folders[1] / "0-1.png")
    seen = write_jsonl(tmp_path / "seen.jsonl", [{**choice("0-1.png", "0-1.png", "b"), "sha256_b": shown},
                                                 {**choice("1-1.png", "1-1.png", "a"), "sha256_b": hashlib.sha256(
                                                     (folders[1] / "1-1.png").read_bytes()).hexdigest()}])
    report = import_review(seen, folders, tmp_path / "seen")
    assert report.pairs == 1 and re.match(r".*seen.jsonl:1: image .*tuned/0-1.png changed since the page showed it",
                                          report.unreadable[0])
    (tmp_path / "labelled" / ".shards").mkdir(parents=True)  # a label or captions output: its records would lie
    with pytest.raises(ValueError, match="labelled: holds the resumable shards of another tool"):
        import_review(seen, folders, tmp_path / "labelled")
    lone = write_jsonl(tmp_path / "lone.jsonl", [choice("2-2.png", "2-2.png", "b", seed=2)])
    with pytest.raises(ValueError, match=r"no pair could be imported: .*lone.jsonl:1: cannot read image"):
        import_review(lone, folders, tmp_path / "out")
    skips = write_jsonl(tmp_path / "s.jsonl", [choice("0-1.png", "0-1.png", "skip")])
    with pytest.raises(ValueError, match=r"no judged pairs to import \(1 skipped\)"):
        import_review(skips, folders, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_match_folders_by_trailing_path(tmp_path):
    a, b = tmp_path / "runs/a/samples", tmp_path / "runs/b/samples"
    assert match_folders(["a/samples", "b/samples"], [b, a]) == {"a/samples": a, "b/samples": b}
    with pytest.raises(ValueError, match="matches several --images"):
        match_folders(["samples"], [a, b])


# ---------------------------------------------------------------- in a browser

@pytest.fixture
def browser(tmp_path):
    """Headless Chromium under ChromeDriver (Debian's, so selenium-manager downloads nothing); downloads go to
    tmp_path/downloads."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"{CHROMIUM} and {CHROMEDRIVER} are needed for the review page test; scripts/test.sh installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains
    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def test_blind_ab_with_the_keyboard_exports_choices_that_import_as_labels(browser, folders, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = write_review_page(folders, tmp_path / "review.html", seed=3)
    data = review_data(folders, seed=3)
    pairs = data["ab"]["pairs"]  # which folder each pair shows left
    assert {p["left"] for p in pairs} == {"a", "b"}
    browser.get(page.as_uri())
    assert browser.execute_script("return window.exportChoices()") == ""
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid-view figure img")) == 11  # 12 cells, one missing
    browser.find_element(By.ID, "show-ab").click()
    progress = browser.find_element(By.ID, "progress")
    assert progress.text == "0 / 5"
    assert "skip" in browser.find_element(By.ID, "ab-view").text  # the keys are shown

    def judge(i, key, judged):
        """Check pair i shows its folders on the recorded sides, press `key`, check the progress."""
        cells = data["rows"][pairs[i]["row"]]["cells"]
        a, b = (data["images"][cells[c]["image"]] for c in (0, 1))
        shown = [browser.find_element(By.ID, side).get_attribute("src") for side in ("ab-left", "ab-right")]
        assert shown == ([a, b] if pairs[i]["left"] == "a" else [b, a])
        assert browser.find_element(By.ID, "ab-prompt").text == data["rows"][pairs[i]["row"]]["prompt"]
        press(browser, key)
        assert progress.text == f"{judged} / 5"

    keys = [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, "t", "s", Keys.ARROW_DOWN]
    for i, key in enumerate(keys[:3]):
        judge(i, key, i + 1)
    press(browser, Keys.BACKSPACE)  # back to the third pair, now judged "left" instead of a tie
    keys[2] = Keys.ARROW_LEFT
    for i in range(2, 5):
        judge(i, keys[i], max(3, i + 1))
    assert browser.find_element(By.ID, "ab-done").is_displayed()

    exported = browser.execute_script("return window.exportChoices()")
    records = [json.loads(line) for line in exported.splitlines()]
    assert len(records) == 5
    expected = []
    for pair, key, record in zip(pairs, keys, records):
        other = "b" if pair["left"] == "a" else "a"
        want = {Keys.ARROW_LEFT: pair["left"], Keys.ARROW_RIGHT: other, "t": "tie", Keys.ARROW_DOWN: "tie",
                "s": "skip"}[key]
        row = data["rows"][pair["row"]]
        assert (record["choice"], record["left"]) == (want, pair["left"])
        assert (record["prompt"], record["seed"], record["folder_a"], record["folder_b"]) == (
            row["prompt"], row["seed"], "base", "tuned")
        assert record["file_a"] == record["file_b"] == row["cells"][0]["file"]
        assert [record["sha256_a"], record["sha256_b"]] == [hashlib.sha256(
            (folder / record["file_a"]).read_bytes()).hexdigest() for folder in folders]
        if want != "skip":
            expected.append({"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}[want])

    # the Export button downloads the same text. Chromium can show the file before it has written it (seen once in
    # CI: the file was there and empty), so wait for its text, for up to 10 s.
    browser.find_element(By.ID, "export").click()
    download = tmp_path / "downloads" / "choices.jsonl"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (download.is_file() and download.read_text() == exported):
        time.sleep(0.1)
    assert download.read_text() == exported

    # a reload keeps the choices (localStorage). The page wrote them; Chromium hands a page's storage writes to its
    # browser process asynchronously, so a reload on a loaded machine can come before they land (seen once in CI):
    # reload until the page shows them, for up to 10 s. A page that never saved fails all the same.
    stored = browser.execute_script("return Object.keys(localStorage).map(k => localStorage.getItem(k))")
    assert [len(json.loads(value)) for value in stored] == [5]
    deadline = time.monotonic() + 10
    while True:
        browser.refresh()
        browser.find_element(By.ID, "show-ab").click()
        shown = browser.find_element(By.ID, "progress").text
        if shown == "5 / 5" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert shown == "5 / 5"

    report = import_review(download, folders, tmp_path / "dataset")
    assert report.skipped == 1
    dataset, _ = load_pairs(str(tmp_path / "dataset"), keep_ties=True)
    assert [(r["label_0"], r["label_1"]) for r in dataset] == expected


XSS_PROMPT = "</script><script>alert(2)</script><img src=x onerror=\"window.__xss=1\"><!-- <b>bold</b>"
XSS_FILE = "<img src=x onerror=\"window.__xss=1\">.png"


def test_prompts_and_file_names_are_shown_as_text(browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    folders = [write_folder(tmp_path / name, shade, prompts=[XSS_PROMPT], seeds=(1,), name=XSS_FILE)
               for name, shade in (("<i onmouseover=alert(3)>a", 0), ("b", 99))]
    page = write_review_page(folders, tmp_path / "review.html")
    browser.get(page.as_uri())

    def injected():
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text
        assert browser.execute_script("return window.__xss") is None
        assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"], b, i').length") == 0

    injected()
    texts = browser.execute_script("return [...document.querySelectorAll('.prompt, .file, .folder')]"
                                   ".map((e) => e.textContent)")
    assert texts.count(XSS_PROMPT) == 1 and texts.count(XSS_FILE) == 2
    assert "<i onmouseover=alert(3)>a" in texts
    browser.find_element(By.ID, "show-ab").click()
    assert browser.find_element(By.ID, "ab-prompt").get_attribute("textContent") == XSS_PROMPT
    injected()


class RedScorer:
    """Scores an image by its mean red: predictable bests for the page's data, no model needed."""
    name = column = "red"
    needs_prompts = False

    def score(self, images, prompts):
        import numpy as np
        import torch
        return torch.tensor([np.asarray(image)[..., 0].mean() / 255 for image in images])


class CountingScorer:
    """Scores an image by its mean over all channels (it differs from row to row here) and counts what it scored."""
    name = column = "mean"
    needs_prompts = False
    scored = 0

    def score(self, images, prompts):
        import numpy as np
        import torch
        self.scored += len(images)
        return torch.tensor([np.asarray(image).mean() / 255 for image in images])


def test_grid_checks_the_review_page_settings_before_drawing(tmp_path, folders, capsys):
    from diffusion_align.cli import main
    pages = tmp_path / "grid.png"
    for extra, message in [(["--html", str(tmp_path / "r.html"), "--ab", "base", "other"],
                            "no folder 'other' to compare blind; the folders are base, tuned"),
                           (["--ab", "tuned", "base"], "--ab and --title are the review page's: give --html too")]:
        with pytest.raises(SystemExit):
            main(["grid", *map(str, folders), "--out", str(pages), *extra])
        assert message in capsys.readouterr().err
    assert not pages.exists(), "no page drawn"


def test_the_grid_scores_serve_the_page_without_scoring_again(tmp_path, folders):
    from diffusion_align.evaluation.grid import make_grid
    scorer = CountingScorer()
    report = make_grid(folders, tmp_path / "grid.png", scorer=scorer, rows_per_page=2)  # 3 pages: rows offset
    assert len(report.pages) == 3 and scorer.scored == 11  # 12 cells, one image missing
    shown = review_data(folders, scorer=scorer, scores=report.scores)["rows"]
    assert scorer.scored == 11, "nothing scored twice"
    assert shown == review_data(folders, scorer=CountingScorer())["rows"]


def test_scores_are_shown_side_by_side_and_never_blind(browser, tmp_path):
    folders = [write_folder(tmp_path / "base", 10), write_folder(tmp_path / "tuned", 200, missing=[(2, 2)]),
               write_folder(tmp_path / "same", 200)]
    data = review_data(folders, scorer=RedScorer())
    assert data["scorer"] == "red"
    cells = data["rows"][0]["cells"]
    assert [c["score"] for c in cells] == ["0.03922", "0.7843", "0.7843"]
    assert [c["best"] for c in cells] == [False, True, True], "equal scores are both the best"
    last = data["rows"][-1]["cells"]  # tuned's image is missing: no score, base is not the best (same is)
    assert last[1] is None and [last[0]["best"], last[2]["best"]] == [False, True]
    assert "score" not in review_data(folders)["rows"][0]["cells"][0]

    from selenium.webdriver.common.by import By
    notes = {(PROMPTS[1], 2): "judge: tuned better"}  # shown first, beside its row, never blind
    browser.get(write_review_page(folders, tmp_path / "review.html", scorer=RedScorer(), notes=notes).as_uri())
    shown = browser.execute_script("return [...document.querySelectorAll('#grid-view .score')]"
                                   ".map((e) => [e.textContent, e.classList.contains('best')])")
    assert len(shown) == 17 and shown[:3] == [["0.03922", False], ["0.7843  best", True], ["0.7843  best", True]]
    first = browser.execute_script("const row = document.querySelectorAll('#grid-view .grid-row')[1];"
                                   "return [row.querySelector('.prompt').textContent, row.querySelector('.note')"
                                   ".textContent, document.querySelectorAll('#grid-view .note').length]")
    assert first == [PROMPTS[1], "judge: tuned better", 1]
    browser.find_element(By.ID, "show-ab").click()
    body = browser.find_element(By.TAG_NAME, "body").get_attribute("innerText")
    assert "0.78" not in body and "tuned better" not in body and PROMPTS[1] in body  # the noted pair comes first
