"""fit_reward: the golden PickScore objective, tie-aware accuracy, the prompt split, a tiny CLIP fitted end to end."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_align.data.pairs import decode_image, load_pairs
from diffusion_align.models.tiny import write_tiny_pairs
from diffusion_align.rewards import load_scorer
from diffusion_align.rewards.clip import projected
from diffusion_align.rewards.fit_reward import (
    choose_tie_threshold, fit_reward, load_clip, pair_logits, pairwise_accuracy, pickscore_loss, split_by_prompt,
)
from diffusion_align.rewards.tiny import save_tiny_scorer


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- objective

def test_perfect_tie_costs_exactly_zero():
    assert pickscore_loss(t([1.3, 1.3], [-4.0, -4.0]), t([0.5, 0.5], [0.5, 0.5])).item() == 0.0


def test_pickscore_loss_golden():
    logits = t([2.0, 0.0])
    # hard label (1, 0): -log softmax_0 = -log sigmoid(2) = log(1 + e^-2)
    assert pickscore_loss(logits, t([1.0, 0.0])).item() == pytest.approx(0.12692801104297263, abs=1e-6)
    # hard label (0, 1): log(1 + e^2)
    assert pickscore_loss(logits, t([0.0, 1.0])).item() == pytest.approx(2.1269280110429727, abs=1e-6)
    # tie: -log 2 - (log sigmoid(2) + log sigmoid(-2)) / 2 = -0.693147 + (0.126928 + 2.126928) / 2
    assert pickscore_loss(logits, t([0.5, 0.5])).item() == pytest.approx(0.4337808304830271, abs=1e-6)


def test_weights_normalise_within_the_batch():
    logits, targets = t([2.0, 0.0], [2.0, 0.0]), t([1.0, 0.0], [0.0, 1.0])
    # w = 1/1 and 1/3: (0.126928 * 1 + 2.126928 / 3) / (1 + 1/3) = 0.126928 + 0.5
    weights = torch.tensor([1.0, 1 / 3])
    assert pickscore_loss(logits, targets, weights).item() == pytest.approx(0.6269280110429727, abs=1e-6)
    assert pickscore_loss(logits, targets, 7 * weights).item() == pytest.approx(0.6269280110429727, abs=1e-6)
    assert pickscore_loss(logits, targets).item() == pytest.approx((0.12692801 + 2.12692801) / 2, abs=1e-6)


def test_matches_the_authors_cross_entropy_with_the_log_half_offset():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 2, generator=g) * 3
    label_0 = torch.tensor([1.0, 0.0, 0.5])[torch.randint(3, (64,), generator=g)]
    targets = torch.stack([label_0, 1 - label_0], dim=1)
    ce = -(targets * logits.log_softmax(-1)).sum(-1) + (label_0 == 0.5).float() * math.log(0.5)
    weights = 1 / torch.randint(1, 5, (64,), generator=g).float()
    expected = (ce * weights / weights.sum()).sum()
    assert pickscore_loss(logits, targets, weights).item() == pytest.approx(expected.item(), abs=1e-6)


# ---------------------------------------------------------------- accuracy with ties

P0 = [0.9, 0.2, 0.52, 0.5, 0.7, 0.45, 0.99]
LABEL_0 = [1.0, 1.0, 0.0, 0.5, 0.5, 0.0, None]  # the last pair has no label: left out


def labels_1(label_0):
    return [None if x is None else 1 - x for x in label_0]


def test_pairwise_accuracy_golden():
    # t = 0: right, wrong, wrong, predicted tie (p0 == 0.5) on a tie, side on a tie, right -> 3 / 6
    assert pairwise_accuracy(P0, LABEL_0, labels_1(LABEL_0), 0.0) == pytest.approx(3 / 6)
    # t = 0.03: pair 2 (|0.52 - 0.5| = 0.02) becomes a tie on a strict label: 0.5
    assert pairwise_accuracy(P0, LABEL_0, labels_1(LABEL_0), 0.03) == pytest.approx(3.5 / 6)
    # t = 0.3: pairs 1, 2, 5 ties on strict labels (0.5 each), pairs 3, 4 ties on ties (1 each), pair 0 right
    assert pairwise_accuracy(P0, LABEL_0, labels_1(LABEL_0), 0.3) == pytest.approx(4.5 / 6)
    assert pairwise_accuracy(P0, LABEL_0, labels_1(LABEL_0), 0.45) == pytest.approx(4 / 6)  # everything a tie
    assert pairwise_accuracy([0.7], [None], [None]) is None


def test_tie_threshold_is_the_smallest_best():
    threshold, accuracy = choose_tie_threshold(P0, LABEL_0, labels_1(LABEL_0))
    assert threshold == pytest.approx(0.3) and accuracy == pytest.approx(0.75)
    g = np.random.default_rng(0)
    p0 = np.round(g.uniform(size=300), 2)  # rounding makes equal distances, and some p0 == 0.5
    label_0 = g.choice([1.0, 0.0, 0.5], size=300, p=[0.45, 0.45, 0.1])
    threshold, accuracy = choose_tie_threshold(p0, label_0, 1 - label_0)
    brute = {t: pairwise_accuracy(p0, label_0, 1 - label_0, t) for t in np.append(0.0, np.abs(p0 - 0.5))}
    best = max(brute.values())
    assert accuracy == pytest.approx(best) and threshold == pytest.approx(min(t for t, a in brute.items()
                                                                           if a == pytest.approx(best)))


def test_split_by_prompt_shares_no_prompt():
    captions = [f"p{i % 7}" for i in range(40)]
    train, val = split_by_prompt(captions, 0.3, seed=0)
    assert sorted([*train, *val]) == list(range(40))
    assert not {captions[i] for i in train} & {captions[i] for i in val}
    assert len({captions[i] for i in val}) == 2  # round(0.3 * 7)
    assert (split_by_prompt(captions, 0.3, seed=0)[1] == val).all()
    assert len(split_by_prompt(captions, 0.0, seed=0)[1]) == 0
    assert len(split_by_prompt(["one"] * 5, 0.5, seed=0)[0]) == 5  # at least one prompt left for training


# ---------------------------------------------------------------- fitting a tiny CLIP

@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    base = str(save_tiny_scorer("pickscore", root / "base"))  # a tiny random CLIPModel + tokenizer + processor
    data = str(write_tiny_pairs(root / "pairs.parquet", num_pairs=32, resolution=32, seed=0))
    report = fit_reward(data, base, root / "reward", steps=30, lr=2e-3, weight_decay=0.01, batch_size=8,
                        val_fraction=0.25, warmup_steps=3, log_every=10, seed=0)
    return root, base, data, report


def test_fit_lowers_the_training_loss_and_reports(fitted):
    root, base, data, report = fitted
    assert report.train_loss_end < 0.8 * report.train_loss_start
    assert [s for s, _ in report.loss_history] == [10, 20, 30] and report.nonfinite_steps == 0
    pairs, _ = load_pairs(data, keep_ties=True)
    assert report.train_pairs + report.val_pairs == len(pairs) == 32
    assert report.train_prompts + report.val_prompts == len(set(pairs["caption"])) and report.val_prompts == 4
    assert report.val_accuracy is not None and 0 <= report.tie_threshold <= 0.5
    saved = json.loads((root / "reward" / "fit_report.json").read_text())
    assert saved["train_loss_end"] == report.train_loss_end and saved["settings"]["lr"] == 2e-3


def test_saved_folder_loads_as_a_pickscore_scorer(fitted):
    root, base, data, report = fitted
    assert sorted(p.name for p in (root / "reward").glob("*.safetensors")) == ["model.safetensors"]
    model, tokenizer, image_processor = load_clip(str(root / "reward"))
    pairs, _ = load_pairs(data, keep_ties=True)
    rows = pairs[:]
    images = [[decode_image(rows[c][i], c).convert("RGB") for c in ("jpg_0", "jpg_1")] for i in range(len(pairs))]
    pixels = torch.stack([torch.cat([image_processor(images=im, return_tensors="pt")["pixel_values"]
                                     for im in pair]) for pair in images])
    tokens = tokenizer(rows["caption"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = pair_logits(model, tokens["input_ids"], tokens["attention_mask"], pixels)
    scorer = load_scorer("pickscore", str(root / "reward"), device="cpu")
    scores = scorer.score([im for pair in images for im in pair], [c for c in rows["caption"] for _ in (0, 1)])
    torch.testing.assert_close(scores.view(-1, 2), logits, rtol=1e-5, atol=1e-4)
    # the trained weights, not the base's: the saved model has the lower loss on the training data
    start, _, _ = load_clip(base)
    with torch.no_grad():
        before = pair_logits(start, tokens["input_ids"], tokens["attention_mask"], pixels)
    targets = torch.tensor([rows["label_0"], rows["label_1"]]).T
    assert pickscore_loss(logits, targets) < pickscore_loss(before, targets)


def test_fit_is_deterministic_and_refuses_foreign_folders(fitted, tmp_path):
    root, base, data, _ = fitted
    kwargs = dict(steps=4, lr=1e-3, batch_size=8, val_fraction=0.25, warmup_steps=1, log_every=1, seed=3)
    a = fit_reward(data, base, tmp_path / "a", **kwargs)
    b = fit_reward(data, base, tmp_path / "b", num_workers=2, **kwargs)  # decoding in workers changes nothing
    assert a.loss_history == b.loss_history and a.val_loss_end == b.val_loss_end
    rerun = fit_reward(data, base, tmp_path / "a", **kwargs)  # an earlier fit-reward output is replaced
    assert rerun.loss_history == a.loss_history
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a fit-reward output"):
        fit_reward(data, base, tmp_path / "foreign", **kwargs)
    with pytest.raises(FileExistsError, match=r"keep.txt: is a file; expected a folder"):
        fit_reward(data, base, tmp_path / "foreign" / "keep.txt", **kwargs)


def test_pair_logits_are_scaled_cosines(fitted):
    _, base, _, _ = fitted
    model, tokenizer, _ = load_clip(base)
    tokens = tokenizer(["a red circle"], return_tensors="pt")
    pixels = torch.randn(1, 2, 3, 32, 32)
    logits = pair_logits(model, tokens["input_ids"], tokens["attention_mask"], pixels)
    text = F.normalize(projected(model.get_text_features(**tokens)), dim=-1)
    image = F.normalize(projected(model.get_image_features(pixel_values=pixels[0])), dim=-1)
    torch.testing.assert_close(logits[0], model.logit_scale.exp() * (image @ text[0]), rtol=1e-5, atol=1e-5)


def test_rows_pick_a_pic_flags_unlabelled_are_skipped_and_named():
    """has_label=false: label_0/1 hold no one's preference (they were trained on); in a `label` output the flag is
    the people's (human_label_0/1), and label_0/1 are the scorer's, trained on."""
    import datasets
    from diffusion_align.rewards.fit_reward import _checked_rows
    rows = {"label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5], "has_label": [True, False, None]}
    for flags in (rows["has_label"], [1, 0, None]):  # 1/0: a CSV's copy, whose null was read as true
        _, _, skipped = _checked_rows(datasets.Dataset.from_dict(rows | {"has_label": flags}), False, "p.parquet")
        assert skipped == [(1, "row 1: has_label is false: its label_0/label_1 hold no one's preference"),
                           (2, "row 2: has_label is false: its label_0/label_1 hold no one's preference")]
    labelled = datasets.Dataset.from_dict({**rows, "human_label_0": [1.0, None, 0.5], "human_label_1": [0.0, None, 0.5]})
    assert _checked_rows(labelled, False, "p.parquet")[2] == []
