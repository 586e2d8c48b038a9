"""DCPO dual captions: the rule-based perturber (golden and property tests), the tiny real captioners and text
model, and make_captions end to end (slots follow the labels, skipping, loading, resuming)."""

import difflib
import json
import random
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffusion_align.data.captions import (
    ATTRIBUTES, NUMBER_WORDS, STRENGTHS, Captioner, ModelPerturber, RuleBasedPerturber, clip_visible_chars,
    make_captions, perturb_prompt, row_seed,
)
from diffusion_align.data.pairs import PairDataset, PairTransform, collate_pairs, decode_image, load_pairs
from diffusion_align.models.tiny import clip_tokenizer, save_tiny_captioner, save_tiny_causal_lm, write_tiny_pairs

ATTRIBUTE_WORDS = {w: cat for cat, groups in ATTRIBUTES.items() for g in groups for w in g}
BROKEN_ROW, TIE_ROW = 3, 5


def words(text):
    return text.lower().replace(",", " ").split()


def changed_words(before, after):
    """Words that differ between two texts (word-level diff; a replaced run counts its longer side)."""
    ops = difflib.SequenceMatcher(a=words(before), b=words(after), autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def many_prompts(n=300, seed=0):
    """Prompts of 1-12 words mixing lexicon attributes, numbers, nouns and stopwords, plus edge cases."""
    rng = random.Random(seed)
    vocab = [*ATTRIBUTE_WORDS, *NUMBER_WORDS, "3", "12", *"cat dog tree house man robot city castle".split(),
             *"a the of on with in".split()]
    prompts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12))) for _ in range(n)]
    return prompts + ["cat", "the", "a a a", "Cat, cat. CAT!", "x", "sci-fi don't", "2024", "  spaced   out  "]


# ---------------------------------------------------------------- rule-based perturber

def test_golden_examples():
    prompt = "Three small wooden cats sitting on 2 chairs, oil painting"
    assert perturb_prompt(prompt, "weak", 1) == "2 small wooden cats sitting on three chairs, oil painting"
    assert perturb_prompt(prompt, "medium", 1) == "2 small wooden chairs sitting on three cats, oil painting"
    assert perturb_prompt(prompt, "strong", 1) == "2 small chairs sitting on three cats, painting"
    assert perturb_prompt("a red circle on a white background", "weak", 1) == "a white circle on a red background"
    assert perturb_prompt("cat", "medium", 1) == "wool ceramic cat"


@pytest.mark.parametrize("strength", list(STRENGTHS))
def test_edit_counts_per_strength(strength):
    n = STRENGTHS[strength]
    attrs = "a red tiny wooden cartoon sunny happy cat on a blue glass table"
    for seed in range(20):
        out = perturb_prompt(attrs, strength, seed, edits=("attribute",))
        assert len(words(out)) == len(words(attrs))  # replaced in place: this prompt has 9 attributes
        changed = [(a, b) for a, b in zip(words(attrs), words(out)) if a != b]
        assert len(changed) == n and all(ATTRIBUTE_WORDS[a] == ATTRIBUTE_WORDS[b] for a, b in changed)

        counts = "one cat, 2 dogs, three birds, 4 fish, five frogs"
        out = perturb_prompt(counts, strength, seed, edits=("count",))
        changed = [(a, b) for a, b in zip(words(counts), words(out)) if a != b]
        assert len(changed) == n
        assert all(a.isdecimal() == b.isdecimal() and (b.isdecimal() or b in NUMBER_WORDS) for a, b in changed)

        nouns = "cat dog bird fish frog tree house boat car"
        assert len(words(perturb_prompt(nouns, strength, seed, edits=("drop",)))) == 9 - n
        out = perturb_prompt(nouns, strength, seed, edits=("swap",))
        moved = sum(a != b for a, b in zip(words(nouns), words(out)))
        assert sorted(words(out)) == sorted(words(nouns)) and moved == 2 * n


def test_properties_over_many_prompts():
    mean_changed = {}
    for strength in STRENGTHS:
        changed = []
        for k, prompt in enumerate(many_prompts()):
            out = perturb_prompt(prompt, strength, k)
            assert out.strip() and out == " ".join(out.split())  # never empty, whitespace normalised
            assert words(out) != words(prompt), (prompt, strength, k)
            assert out == perturb_prompt(prompt, strength, k)  # deterministic per seed
            assert out == perturb_prompt(prompt, strength, random.Random(k))  # an int seeds a random.Random
            changed.append(changed_words(prompt, out))
        mean_changed[strength] = np.mean(changed)
    assert mean_changed["weak"] < mean_changed["medium"] < mean_changed["strong"], mean_changed
    outs = {perturb_prompt("a red cat on a wooden table at night", "medium", s) for s in range(30)}
    assert len(outs) > 15  # seeds matter
    assert perturb_prompt("a red cat", "weak", np.random.default_rng(5)) == perturb_prompt(
        "a red cat", "weak", np.random.default_rng(5))  # a numpy Generator seeds one draw


@pytest.mark.parametrize("strength", ["medium", "strong"])
def test_drops_never_take_the_last_content_word(strength):
    """"a cat on a mat" at medium lost both nouns in 16% of seeds ("a on a"): a loser's caption describing nothing."""
    stop = {"a", "an", "the", "of", "on", "in", "at"}
    for prompt in ("a cat on a mat", "portrait of an old man", "a dog in the park at night"):
        for seed in range(300):
            words = perturb_prompt(prompt, strength, seed, edits=("drop",)).split()
            assert [w for w in words if w not in stop], (prompt, seed, words)


def test_attribute_and_count_changes_change_the_word_present():
    for seed in range(30):
        article, size, noun = perturb_prompt("a small cat", "weak", seed, edits=("attribute",)).split()
        assert (article, noun) == ("a", "cat") and ATTRIBUTE_WORDS[size] == "size"
        assert size not in ("small", "tiny", "little", "miniature")  # a synonym would change nothing
        number, noun = perturb_prompt("Two dogs", "weak", seed, edits=("count",)).split()
        assert noun == "dogs" and number.lower() in NUMBER_WORDS and number != "Two" and number[0].isupper()
        number = perturb_prompt("12 dogs", "weak", seed, edits=("count",)).split()[0]
        assert number.isdecimal() and 1 <= int(number) <= 24 and number != "12"


def test_fallbacks_when_the_chosen_edit_does_not_apply():
    inserted = {g[0] for cat in ("colour", "size", "material") for g in ATTRIBUTES[cat]}
    article, new, noun = perturb_prompt("a cat", "weak", 0, edits=("count",)).split()  # no number: an attribute
    assert (article, noun) == ("a", "cat") and new in inserted
    assert perturb_prompt("cat", "weak", 0, edits=("drop", "swap")) != "cat"  # neither applies: an attribute
    for seed in range(10):
        assert perturb_prompt("", "strong", seed) and perturb_prompt("!!!", "weak", seed).endswith("!!!")


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="unknown strength 'extreme'"):
        perturb_prompt("a cat", "extreme")
    with pytest.raises(ValueError, match="edits must be"):
        perturb_prompt("a cat", edits=("shuffle",))
    with pytest.raises(TypeError, match="rng must be"):
        perturb_prompt("a cat", rng="0")


# ---------------------------------------------------------------- tiny real models

@pytest.fixture(scope="module")
def clip_read():
    """The token ids a CLIP text encoder reads of a text: its first 77, as every family tokenizes."""
    tokenizer = clip_tokenizer()
    return lambda text: tokenizer(text, truncation=True, max_length=77)["input_ids"]


def test_what_a_clip_encoder_reads():
    # "cat" is one CLIP token: the encoder reads 75 of them between its start and end tokens
    assert clip_visible_chars("cat " * 75) is None and clip_visible_chars("a red cat") is None
    assert clip_visible_chars("cat " * 76) == 75 * len("cat ") - 1
    assert clip_visible_chars("two cats, " * 40) == 25 * len("two cats, ") - 1  # 3 tokens each: to the 25th ","


LONG_PROMPT = "a red cat on a blue mat, " + " ".join(["detailed"] * 80)  # past CLIP's window


def test_rule_perturbations_stay_in_what_clip_reads(clip_read):
    """Past 75 CLIP tokens a caption is cut: a loser perturbed there is conditioned as its winner (plain DPO)."""
    seeds = range(100)
    assert any(clip_read(perturb_prompt(LONG_PROMPT, "medium", s)) == clip_read(LONG_PROMPT) for s in seeds)
    tail = LONG_PROMPT[clip_visible_chars(LONG_PROMPT):]
    for strength in STRENGTHS:
        for text in RuleBasedPerturber(strength).perturb([LONG_PROMPT] * len(seeds), seeds)[0]:
            assert clip_read(text) != clip_read(LONG_PROMPT) and text.endswith(tail)
    # a first word CLIP reads only in part (75 tokens of "ab"): the attribute goes in front of it
    (text,), _ = RuleBasedPerturber("weak").perturb(["ab" * 100], [0])
    assert text.split()[0] in {g[0] for c in ("colour", "size", "material") for g in ATTRIBUTES[c]}
    assert text.split()[1] == "ab" * 100


@pytest.fixture(scope="module")
def tiny_captioners(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {kind: str(save_tiny_captioner(root / kind, kind)) for kind in ("blip", "llava", "vit-gpt2")}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "gpt2"))


def solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def test_blip_captions_continue_the_prompt(tiny_captioners):
    captioner = Captioner(tiny_captioners["blip"], device="cpu", max_new_tokens=6)
    assert captioner.mode == "prefix"
    images = [solid((200, 20, 20)), solid((20, 20, 200), (30, 40)), solid((20, 200, 20))]
    prompts = ["A Red circle", "a red circle", "a green tree on a white background"]
    assert [captioner.group_key(p) for p in prompts][:2] == [5, 5] and captioner.group_key(prompts[2]) == 9
    captions, empty = captioner.caption(images[:2], prompts[:2])
    assert empty == 0 and all(c.startswith("a red circle") and len(c.split()) > 3 for c in captions)
    assert captions == [captioner.caption([im], [p])[0][0] for im, p in zip(images[:2], prompts[:2])]  # batched
    unconditional = Captioner(tiny_captioners["blip"], device="cpu", max_new_tokens=6, use_prompt=False)
    assert unconditional.mode == "image" and unconditional.group_key("anything") == 0


def test_chat_and_image_only_captioners(tiny_captioners):
    images, prompts = [solid((200, 20, 20)), solid((20, 20, 200))], ["a red circle", "a blue square on a background"]
    llava = Captioner(tiny_captioners["llava"], device="cpu", max_new_tokens=5)
    assert llava.mode == "instruction"
    captions, empty = llava.caption(images, prompts)  # different prompt lengths: left padding
    assert (captions, empty) == (["image yellow with yellow with", prompts[1]], 1)  # only the answer, or the prompt
    assert llava.caption(images[:1], prompts[:1]) == (captions[:1], 0)  # the same alone as batched
    # This tiny ViT-GPT2 writes nothing but special tokens: each caption falls back to its prompt.
    vit_gpt2 = Captioner(tiny_captioners["vit-gpt2"], device="cpu", max_new_tokens=5)
    assert vit_gpt2.mode == "image" and vit_gpt2.caption(images, prompts) == (prompts, 2)


def force_lm_output(perturber, token):
    """Make the tiny LM write `token` at every step (an untied head whose bias picks it)."""
    model, vocab = perturber.model, len(perturber.tokenizer)
    head = torch.nn.Linear(model.config.n_embd, vocab)
    torch.nn.init.zeros_(head.weight)
    head.bias.data = torch.nn.functional.one_hot(torch.tensor(perturber.tokenizer.convert_tokens_to_ids(token)),
                                                 vocab).float() * 10
    model.lm_head = head


@pytest.mark.parametrize("chat", [False, True])
def test_model_perturber(tmp_path, chat):
    perturber = ModelPerturber(str(save_tiny_causal_lm(tmp_path / "lm", chat=chat)), "weak", device="cpu",
                               max_new_tokens=3, batch_size=2)
    assert perturber.info["chat_template"] is chat
    texts, seeds = ["a red circle", "tree", "two green cats on a table"], [1, 2, 3]
    force_lm_output(perturber, "tree")
    assert perturber.perturb(texts, seeds) == (["tree tree tree"] * 3, 0)
    force_lm_output(perturber, "</s>")  # writes nothing: the rules take over with each row's seed
    assert perturber.perturb(texts, seeds) == ([perturb_prompt(t, "weak", s) for t, s in zip(texts, seeds)], 3)
    # a rewrite that differs only past what CLIP reads: the rules take over, within it
    long = "tree " * 80 + "cat"
    perturber.max_new_tokens = 90
    force_lm_output(perturber, "tree")
    assert perturber.perturb([long], [4]) == (RuleBasedPerturber("weak").perturb([long], [4])[0], 1)


# ---------------------------------------------------------------- make_captions

class FakeCaptioner:
    """Caption = the image's mean colour, so a caption shows which image it describes; can crash like a run."""

    info = {"model": "fake", "mode": "image", "max_new_tokens": 0}

    def __init__(self, fail_after=None):
        self.calls, self.images, self.fail_after = 0, 0, fail_after

    @staticmethod
    def describe(image):
        return "mean " + " ".join(str(round(v)) for v in np.asarray(image.convert("RGB"), np.float64).mean((0, 1)))

    def group_key(self, prompt):
        return len(prompt)

    def caption(self, images, prompts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        assert len({len(p) for p in prompts}) == 1  # batches never mix group keys
        self.calls, self.images = self.calls + 1, self.images + len(images)
        return [self.describe(im) for im in images], 0


@pytest.fixture
def pairs_file(tmp_path):
    """16 tiny pairs (winner in slot 0 or 1), row 3 with a corrupt jpg_1, row 5 a tie, row 7 a null caption."""
    path = write_tiny_pairs(tmp_path / "src" / "pairs.parquet", num_pairs=16, resolution=32, seed=1)
    rows = pq.read_table(path).to_pylist()
    rows[BROKEN_ROW]["jpg_1"] = b"not an image"
    rows[TIE_ROW]["label_0"] = rows[TIE_ROW]["label_1"] = 0.5
    rows[7]["caption"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    return str(path)


def read_out(out_dir):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out_dir.glob("pairs-*.parquet"))]).to_pylist()


def source_rows(path):
    return [r for i, r in enumerate(pq.read_table(path).to_pylist()) if i != BROKEN_ROW]


def kept_indices():
    return [i for i in range(16) if i != BROKEN_ROW]


def test_perturbation_end_to_end_and_loading(pairs_file, tmp_path):
    out = tmp_path / "out"
    report = make_captions(pairs_file, out, "p", strength="strong", seed=3, batch_size=4, shard_size=6)
    assert (report.pairs_written, report.ties, report.shards, report.empty_captions) == (15, 1, 3, 0)
    assert [i for i, _ in report.skipped] == [BROKEN_ROW] and "row 3, column jpg_1" in report.skipped[0][1]
    rows = read_out(out)
    for i, row, src in zip(kept_indices(), rows, source_rows(pairs_file)):
        assert {k: row[k] for k in src} == src  # every source column kept as it was
        prompt = src["caption"] or ""
        if i == TIE_ROW:
            assert row["caption_0"] == row["caption_1"] == prompt
            continue
        w = 0 if src["label_0"] > src["label_1"] else 1
        assert row[f"caption_{w}"] == prompt  # the winner's slot, wherever the winner sits
        assert row[f"caption_{1 - w}"] == perturb_prompt(prompt, "strong", row_seed(3, i))
    saved = json.loads((out / "captions.json").read_text())
    assert saved["strategy"] == "perturbation" and saved["settings"]["perturber"]["kind"] == "rules"
    assert (saved["settings"]["strength"], saved["settings"]["seed"]) == ("strong", 3)
    assert "15 pairs with dual captions (perturbation; perturber rules, strength strong, seed 3)" in str(report)
    # Each row's edits depend on the seed and the row alone, not on shards or batches.
    make_captions(pairs_file, tmp_path / "one-shard", "p", strength="strong", seed=3, batch_size=16)
    assert read_out(tmp_path / "one-shard") == rows
    # Captioning an output again replaces its captions.
    make_captions(str(out), tmp_path / "again", "p", strength="weak")
    again = read_out(tmp_path / "again")
    assert list(again[0]) == list(rows[0]) and [r["caption_0"] for r in again] != [r["caption_0"] for r in rows]

    pairs, stats = load_pairs(str(out), extra_columns=("caption_0", "caption_1"))
    assert stats.pairs == 14 and stats.ties_dropped == 1  # the trainer's default drops the tie
    dataset = PairDataset(pairs, PairTransform(16), seed=0, extra_columns=("caption_0", "caption_1"))
    items = [dataset[(0, k)] for k in range(len(dataset))]
    assert all(it["caption_w"] == it["prompt"] != it["caption_l"] for it in items)
    batch = collate_pairs(items[:4])
    assert batch["caption_w"] == batch["prompts"] and len(batch["caption_l"]) == 4


def test_a_pair_pick_a_pic_flags_unlabelled_has_no_loser_to_perturb(pairs_file, tmp_path):
    """has_label=false: its label_0/1 hold no one's preference (it used to get a perturbed 'loser')."""
    table = pq.read_table(pairs_file)
    flags = pa.array([i != 0 for i in range(table.num_rows)])
    flagged = tmp_path / "flagged" / "pairs.parquet"
    flagged.parent.mkdir()
    pq.write_table(table.append_column("has_label", flags), flagged)
    report = make_captions(str(flagged), tmp_path / "out", "p", seed=3)
    first = read_out(tmp_path / "out")[0]
    assert report.ties == 2 and first["caption_0"] == first["caption_1"] == (first["caption"] or "")


def test_a_larger_max_pairs_extends_an_earlier_run(pairs_file, tmp_path):
    """The records kept the fingerprint of the first N rows, so a larger N was 'other settings' (as the docs say it
    extends); the models' dtype is recorded too (a resume in another would mix precisions)."""
    first = make_captions(pairs_file, tmp_path / "out", "p", seed=3, max_pairs=8, shard_size=8)
    more = make_captions(pairs_file, tmp_path / "out", "p", seed=3, shard_size=8)
    assert (first.shards, more.shards, more.shards_reused) == (1, 2, 1)
    assert json.loads((tmp_path / "out" / "captions.json").read_text())["settings"]["dtype"] is None  # rules


def test_captioning_puts_each_caption_with_its_image(pairs_file, tmp_path):
    fake = FakeCaptioner()
    report = make_captions(pairs_file, tmp_path / "out", "captioning", captioner=fake, batch_size=6, shard_size=8)
    assert report.pairs_written == 15 and report.ties == 0 and report.settings["perturber"] is None
    assert fake.images == 30 and fake.calls >= 6  # 3 pairs per call at most, grouped by prompt length
    for row in read_out(tmp_path / "out"):
        for slot in (0, 1):
            assert row[f"caption_{slot}"] == FakeCaptioner.describe(decode_image(row[f"jpg_{slot}"], "out"))
    pairs, _ = load_pairs(str(tmp_path / "out"), extra_columns=("caption_0", "caption_1"))
    dataset = PairDataset(pairs, PairTransform(16), seed=0, extra_columns=("caption_0", "caption_1"))
    for k in range(len(dataset)):
        row, item = pairs[k], dataset[(0, k)]
        w = 0 if row["label_0"] > row["label_1"] else 1
        assert item["caption_w"] == FakeCaptioner.describe(decode_image(row[f"jpg_{w}"], "row"))


def test_pairs_captioned_by_their_labels_are_not_relabelled(pairs_file, tmp_path, capsys):
    """captions -> label: the perturbed caption sat on the loser of the old labels, so a pair the scorer turned round
    trained its perturbed caption as the winner's. Captions of their own images (captioning) are relabelled."""
    from diffusion_align.rewards.labeling import label_pairs
    from test_labeling import FakeScorer
    make_captions(pairs_file, tmp_path / "p", "p", seed=3)
    shutil.copytree(tmp_path / "p", tmp_path / "copy", ignore=shutil.ignore_patterns("captions.json", ".shards"))
    for source, how in ((tmp_path / "p", "were made by `captions --strategy perturbation`, which perturbs"),
                        (tmp_path / "p" / "pairs-00000.parquet", "were made by `captions --strategy perturbation`"),
                        (tmp_path / "copy", "come with no captions.json to say how they were made")):
        with pytest.raises(ValueError, match=f"its caption_0/caption_1 {re.escape(how)}.* label first"):
            label_pairs(str(source), FakeScorer(), tmp_path / "labelled")
    from diffusion_align.cli import main  # the command refuses it before its scorer loads (a minute for PickScore)
    with pytest.raises(SystemExit):
        main(["label", str(tmp_path / "p"), "--scorer", f"pickscore={tmp_path / 'none'}", "--out", str(tmp_path / "l")])
    assert "--strategy perturbation" in capsys.readouterr().err
    make_captions(pairs_file, tmp_path / "c", "captioning", captioner=FakeCaptioner())
    for k, source in enumerate((tmp_path / "c", tmp_path / "c" / "pairs-00000.parquet", tmp_path / "c" / "*.parquet")):
        assert label_pairs(str(source), FakeScorer(), tmp_path / f"labelled-{k}").pairs_scored == 15


def test_hybrid_perturbs_the_losers_caption(pairs_file, tmp_path):
    make_captions(pairs_file, tmp_path / "out", "h", captioner=FakeCaptioner(), strength="weak", seed=7,
                  num_workers=2)  # images decoded in worker processes
    for i, row in zip(kept_indices(), read_out(tmp_path / "out")):
        described = [FakeCaptioner.describe(decode_image(row[f"jpg_{s}"], "out")) for s in (0, 1)]
        if i == TIE_ROW:
            assert [row["caption_0"], row["caption_1"]] == described
            continue
        w = 0 if row["label_0"] > row["label_1"] else 1
        assert row[f"caption_{w}"] == described[w]
        assert row[f"caption_{1 - w}"] == perturb_prompt(described[1 - w], "weak", row_seed(7, i))


def test_real_models_loaded_by_path(pairs_file, tiny_captioners, tiny_lm, tmp_path):
    out = tmp_path / "out"
    report = make_captions(pairs_file, out, "hybrid", captioner=tiny_captioners["blip"], perturber=tiny_lm,
                           device="cpu", max_new_tokens=4, batch_size=8, max_pairs=8)
    assert report.pairs_written == 7 and report.settings["captioner"]["model"] == tiny_captioners["blip"]
    assert report.settings["perturber"] == {"kind": "model", "model": tiny_lm, "strength": "medium",
                                            "max_new_tokens": 4, "chat_template": False, "clip_window": 77}
    rows = read_out(out)
    winners = [0 if r["label_0"] > r["label_1"] else 1 for r in rows]
    blip = Captioner(tiny_captioners["blip"], device="cpu", max_new_tokens=4)

    def caption(rows, slots):  # one call: every caption here but row 7's (null) has the same token count
        return blip.caption([decode_image(r[f"jpg_{s}"], "out").convert("RGB") for r, s in zip(rows, slots)],
                            [r["caption"] or "" for r in rows])[0]

    assert kept_indices()[6] == 7 and rows[6]["caption"] is None
    got = [r[f"caption_{w}"] for r, w in zip(rows, winners)]
    assert got[:6] == caption(rows[:6], winners[:6]) and got[6:] == caption(rows[6:], winners[6:])
    # The tiny LM writes only punctuation, so each loser caption was perturbed by the rules instead.
    assert report.perturber_fallbacks == 6 and report.ties == 1
    losers = caption(rows[:6], [1 - w for w in winners[:6]]) + caption(rows[6:], [1 - w for w in winners[6:]])
    for i, row, w, loser in zip(kept_indices(), rows, winners, losers):
        if i != TIE_ROW:
            assert row[f"caption_{1 - w}"] == perturb_prompt(loser, "medium", row_seed(0, i))
    pairs, _ = load_pairs(str(out), extra_columns=("caption_0", "caption_1"))
    assert len(pairs) == 6

    report = make_captions(pairs_file, tmp_path / "vit", "c", captioner=tiny_captioners["vit-gpt2"], device="cpu",
                           max_new_tokens=3, max_pairs=4)
    assert report.empty_captions == 8 - 2  # every caption fell back to the prompt (row 3 skipped)
    assert all(r["caption_0"] == r["caption_1"] == r["caption"] for r in read_out(tmp_path / "vit"))


def test_rerun_resumes_finished_shards(pairs_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_captions(pairs_file, out, "h", captioner=FakeCaptioner(fail_after=5), batch_size=2, shard_size=5)
    # One pair per call: shard 0 (rows 0-4, row 3 undecodable) takes 4 calls, the crash comes in shard 1.
    assert sorted(p.name for p in out.glob("pairs-*.parquet")) == ["pairs-00000.parquet"]
    with pytest.raises(ValueError, match=r"holds part of its pairs only: shards in \.shards/ but no"):
        load_pairs(str(out))  # DCPO does not train on the part written as if it were the whole output
    again = FakeCaptioner()
    report = make_captions(pairs_file, out, "h", captioner=again, batch_size=2, shard_size=5)
    assert report.shards_reused == 1 and again.images == 2 * 11  # rows 5-15 only
    assert report.pairs_written == 15 and [i for i, _ in report.skipped] == [BROKEN_ROW]
    first = read_out(out)

    idle = FakeCaptioner()
    assert make_captions(pairs_file, out, "h", captioner=idle, batch_size=2, shard_size=5).shards_reused == 4
    assert idle.images == 0 and read_out(out) == first
    with pytest.raises(ValueError, match="strength='medium' there, 'strong' now"):
        make_captions(pairs_file, out, "h", captioner=FakeCaptioner(), strength="strong", shard_size=5)
    with pytest.raises(ValueError, match="past the 1 this run writes"):
        make_captions(pairs_file, out, "h", captioner=FakeCaptioner(), shard_size=5, max_pairs=4)
    # shards whose rules could edit past the CLIP window (recorded before the window was) are not resumed with
    records = {path: path.read_text() for path in (out / ".shards").glob("pairs-*.json")}
    for record_path, text in records.items():
        record = json.loads(text)
        del record["settings"]["perturber"]["clip_window"]
        record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"pairs-00000.parquet was made with other settings \(perturber=.*'edits': "
                                         r"\[[^]]*\]\} there, .*'clip_window': 77\} now"):
        make_captions(pairs_file, out, "h", captioner=FakeCaptioner(), batch_size=2, shard_size=5)
    for record_path, text in records.items():
        record_path.write_text(text)
    # the source rewritten in place: the shards of its old rows were returned as its captions
    rows = pq.read_table(pairs_file)
    pq.write_table(rows.set_column(rows.column_names.index("caption"), "caption",
                                   pa.array([f"new {i}" for i in range(len(rows))])), pairs_file)
    with pytest.raises(ValueError, match=r"other settings \(fingerprint='[0-9a-f]+' there, '[0-9a-f]+' now\)"):
        make_captions(pairs_file, out, "h", captioner=FakeCaptioner(), batch_size=2, shard_size=5)


def test_bad_arguments(pairs_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown strategy 'x'"):
        make_captions(pairs_file, out, "x")
    with pytest.raises(ValueError, match="strategy hybrid needs a captioner"):
        make_captions(pairs_file, out, "h")
    with pytest.raises(ValueError, match="strategy perturbation takes no captioner"):
        make_captions(pairs_file, out, "p", captioner="some/model")
    with pytest.raises(ValueError, match="strategy perturbation needs a perturber"):
        make_captions(pairs_file, out, "p", perturber=None)
    with pytest.raises(ValueError, match="perturbs nothing"):
        make_captions(pairs_file, out, "c", captioner=FakeCaptioner(), perturber="some/lm")
    with pytest.raises(ValueError, match="unknown strength"):
        make_captions(pairs_file, out, "p", strength="huge")


def test_output_folder_holding_the_source_is_refused(pairs_file, tmp_path):
    src = tmp_path / "src"
    shard = src / "pairs-00000.parquet"  # the name of the first output shard, which overwrote it
    (src / "pairs.parquet").rename(shard)
    before = shard.read_bytes()
    other = tmp_path / "other" / "pairs.parquet"
    other.parent.mkdir()
    other.write_bytes(before)
    for source, out, why in [(src, src, "holds source file"), (shard, src, "holds source file"),
                             (src / ".." / "src" / shard.name, tmp_path, "holds source file"),
                             (src, src / "captioned", "lies in source folder"),  # read again by a rerun
                             (f"{other},{src}", src / "captioned", "lies in source folder")]:
        with pytest.raises(ValueError, match=f"^{out}: the output folder {why} .*write to another folder"):
            make_captions(source, out, "p")
    assert shard.read_bytes() == before and sorted(p.name for p in src.iterdir()) == ["pairs-00000.parquet"]
