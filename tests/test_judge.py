"""Pairwise judges (Pref-GRPO): judge_preferences with rule-based judges, VLMJudge on a tiny random LLaVA."""

import itertools
import math

import pytest
import torch
from PIL import Image, ImageStat

from diffusion_align.models.tiny import save_tiny_captioner
from diffusion_align.objectives import pairwise_win_rates
from diffusion_align.rewards import PairwiseJudge, VLMJudge, judge_preferences

G = 4
PROMPTS = ["a red circle"] * G + ["a blue square on a white background"] * G


def grey(level, size=16):
    return Image.new("RGB", (size, size), (level,) * 3)


def brightness(image):
    return ImageStat.Stat(image.convert("L")).mean[0]


class Recording(PairwiseJudge):
    """Keeps every call's (first, second, prompts); `decide` says P(first better)."""

    def __init__(self):
        self.calls = []

    def prefer_first(self, first, second, prompts):
        self.calls.append((first, second, prompts))
        return torch.tensor([self.decide(f, s) for f, s in zip(first, second)], dtype=torch.float32)


class FirstShownWins(Recording):
    """Nothing but position bias."""

    def decide(self, first, second):
        return 1.0


class BrighterWins(Recording):
    """No position bias: P(first better) = sigmoid((brightness(first) - brightness(second)) / 50)."""

    def decide(self, first, second):
        return 1 / (1 + math.exp(-(brightness(first) - brightness(second)) / 50))


@pytest.fixture
def images():
    return [grey(level) for level in (10, 200, 90, 150, 250, 30, 120, 60)]  # two groups of G = 4


def assert_consistent(pref):
    off = ~torch.eye(pref.shape[-1], dtype=torch.bool)
    assert torch.allclose((pref + pref.transpose(-1, -2))[:, off], torch.ones(1))
    assert (pref.diagonal(dim1=-2, dim2=-1) == 0.5).all()


# ---------------------------------------------------------------- judge_preferences

def test_both_orders_cancel_a_pure_position_bias(images):
    pref = judge_preferences(FirstShownWins(), images, PROMPTS, G, order="both")
    assert pref.shape == (2, G, G) and pref.dtype == torch.float32
    assert (pref == 0.5).all()
    assert (pairwise_win_rates(pref) == 0.5).all()


def test_fixed_order_hands_the_bias_to_the_first_index(images):
    rates = pairwise_win_rates(judge_preferences(FirstShownWins(), images, PROMPTS, G, order="fixed"))
    torch.testing.assert_close(rates, torch.tensor([1, 2 / 3, 1 / 3, 0]).repeat(2, 1))


def test_random_order_follows_the_seed(images):
    judge = FirstShownWins()
    pref = judge_preferences(judge, images, PROMPTS, G, generator=torch.Generator().manual_seed(0))
    assert_consistent(pref)
    rates = pairwise_win_rates(pref)
    assert rates.unique().numel() > 1 and torch.allclose(rates.mean(dim=1), torch.tensor(0.5))
    # the image shown first won: the matrix is oriented by what the judge saw, not by index
    index = {id(image): divmod(row, G) for row, image in enumerate(images)}
    (first, second, _), = judge.calls
    for f, s in zip(first, second):
        (g, i), (_, j) = index[id(f)], index[id(s)]
        assert pref[g, i, j] == 1 and pref[g, j, i] == 0
    again = judge_preferences(FirstShownWins(), images, PROMPTS, G, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, pref)


@pytest.mark.parametrize("order, calls", [("random", 1), ("fixed", 1), ("both", 2)])
def test_every_pair_of_a_group_judged_once_per_order(images, order, calls):
    judge = BrighterWins()
    pref = judge_preferences(judge, images, PROMPTS, G, order=order, generator=torch.Generator().manual_seed(1))
    assert pref.shape == (2, G, G)
    assert_consistent(pref)
    levels = torch.tensor([brightness(im) for im in images]).view(2, G)
    expected = torch.sigmoid((levels.unsqueeze(-1) - levels.unsqueeze(-2)) / 50)  # position-free, so any order
    torch.testing.assert_close(pref, expected)
    assert ((pref > 0.5) == (levels.unsqueeze(-1) > levels.unsqueeze(-2))).all()  # the brighter one wins

    index = {id(image): divmod(row, G) for row, image in enumerate(images)}
    assert len(judge.calls) == calls
    shown = []
    for first, second, prompts in judge.calls:
        for f, s, prompt in zip(first, second, prompts):
            (g, i), (h, j) = index[id(f)], index[id(s)]
            assert g == h and prompt == PROMPTS[g * G]  # never across groups, always the group's prompt
            shown.append((g, i, j))
    pairs = [(g, i, j) for g in range(2) for i, j in itertools.combinations(range(G), 2)]
    assert len(shown) == calls * 2 * G * (G - 1) // 2
    if order == "both":  # each pair once in each order
        assert sorted(shown) == sorted(pairs + [(g, j, i) for g, i, j in pairs])
    else:
        assert sorted((g, min(i, j), max(i, j)) for g, i, j in shown) == pairs
        assert (order == "fixed") == all(i < j for _, i, j in shown)


class WrongShape(PairwiseJudge):
    def prefer_first(self, first, second, prompts):
        return torch.ones(len(first) + 1)


@pytest.mark.parametrize("change, message", [
    ({"order": "sideways"}, "unknown order 'sideways'; expected one of .*random.*both.*fixed"),
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"group_size": 3}, "expected groups of 3 images .* got 8 images"),
    ({"images": []}, "got 0 images"),
    ({"prompts": PROMPTS[:-1]}, "one prompt per image \\(8\\), got 7"),
    ({"prompts": PROMPTS[:5] + ["a cat"] * 3}, "group 1 \\(rows 4 to 7\\) mixes prompts"),
    ({"judge": WrongShape()}, "WrongShape.prefer_first returned shape \\(13,\\) for 12 pairs"),
])
def test_judge_preferences_errors(images, change, message):
    args = {"judge": FirstShownWins(), "images": images, "prompts": PROMPTS, "group_size": G, **change}
    with pytest.raises(ValueError, match=message):
        judge_preferences(**args)


# ---------------------------------------------------------------- VLMJudge on a tiny random LLaVA

ANSWERS = ("sun", "sky")  # words of the tiny vocabulary; it has no "1" or "2"
PER_IMAGE = (32 // 8) ** 2  # image tokens: 8-px patches of the 32-px crop


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return str(save_tiny_captioner(tmp_path_factory.mktemp("judge") / "llava", "llava"))


@pytest.fixture(scope="module")
def judge(tiny_llava):
    return VLMJudge(tiny_llava, device="cpu", batch_size=3, answers=ANSWERS)


def sample_pairs():
    """4 pairs (first, second, prompt), images of 16 to 32 px, prompts of different lengths (padding)."""
    colours = [(0, 0, 0), (255, 255, 255), (200, 30, 30), (30, 30, 200)]
    first = [Image.new("RGB", (16 + 4 * k, 24), colours[k]) for k in range(4)]
    second = [Image.new("RGB", (32, 20), colours[3 - k]) for k in range(4)]
    return first, second, ["a red circle", "a blue square on a white background", "a tree", "two green dogs"]


def test_vlm_judge_probabilities_batched_as_alone(judge):
    p = judge.prefer_first(*sample_pairs())
    assert p.shape == (4,) and p.dtype == torch.float32 and p.device.type == "cpu"
    assert ((p > 0) & (p < 1)).all() and p.unique().numel() == 4
    assert not judge.model.training and not p.requires_grad
    judge.batch_size = 1
    try:
        torch.testing.assert_close(judge.prefer_first(*sample_pairs()), p, rtol=0, atol=1e-5)
    finally:
        judge.batch_size = 3


def test_vlm_judge_shows_both_images_in_order(judge, monkeypatch):
    seen, forward = [], judge.model.forward
    monkeypatch.setattr(judge.model, "forward", lambda **inputs: seen.append(inputs) or forward(**inputs))
    first, second, prompts = sample_pairs()
    judge.prefer_first(first[:2], second[:2], prompts[:2])
    (inputs,) = seen
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    assert ((ids == judge.processor.image_token_id).sum(dim=1) == 2 * PER_IMAGE).all()
    assert pixels.shape == (4, 3, 32, 32)
    assert pixels[0].mean() < pixels[1].mean() and pixels[2].mean() > pixels[3].mean()  # black | blue, white | red
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding: every row ends on its last token
    text = judge.processor.tokenizer.decode(ids[1], skip_special_tokens=True)
    assert "a blue square on a white background" in text and text.index("sun") < text.index("sky")


def test_vlm_judge_reads_two_answer_logits(tiny_llava):
    """P(first) = softmax over the answers' logits only: biases 1 (first answer), 0 (second), 10 (another token)."""
    judge = VLMJudge(tiny_llava, device="cpu", batch_size=3, answers=ANSWERS)  # its own: the head is replaced
    tokenizer, lm_head = judge.processor.tokenizer, judge.model.lm_head
    head = torch.nn.Linear(lm_head.in_features, lm_head.out_features)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[tokenizer.convert_tokens_to_ids(["sun", "tree"])] = torch.tensor([1.0, 10.0])
    judge.model.lm_head = head
    first, second, prompts = sample_pairs()
    torch.testing.assert_close(judge.prefer_first(first, second, prompts), torch.full((4,), 1 / (1 + math.exp(-1))))


def test_vlm_judge_in_judge_preferences(judge):
    images = [grey(level, 24) for level in (0, 80, 160, 40, 120, 240)]
    prompts = ["a red circle"] * 3 + ["a cat"] * 3
    pref = judge_preferences(judge, images, prompts, 3, order="both")
    assert pref.shape == (2, 3, 3) and ((pref > 0) & (pref < 1)).all()
    assert_consistent(pref)


@pytest.mark.parametrize("options, message", [
    ({}, "judge '.*llava': answer '1' is the unknown token for its tokenizer.*pass answers="),
    ({"answers": ("sun", "red circle")}, "answer 'red circle' is 2 tokens"),
    ({"answers": ("sun", "SUN")}, "are the same token"),
    ({"question": "Which image is better?"}, "question must contain the placeholder \\{prompt\\}"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
])
def test_vlm_judge_errors(tiny_llava, options, message):
    with pytest.raises(ValueError, match=message):
        VLMJudge(tiny_llava, device="cpu", **options)


def test_vlm_judge_needs_a_chat_model(tmp_path):
    blip = save_tiny_captioner(tmp_path / "blip", "blip")  # an image-to-text model without a chat template
    with pytest.raises(ValueError, match="processor has no tokenizer with a chat template"):
        VLMJudge(str(blip), device="cpu")


def test_model_on_meta_is_the_loaded_judges_from_its_config_alone(judge, tiny_llava):
    """What the memory planner counts: the judge's model built on the meta device from its config has the loaded
    judge's parameters, name for name and shape for shape."""
    model = VLMJudge.model_on_meta(tiny_llava)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in judge.model.named_parameters()}
