"""Pairwise judges for Pref-GRPO: which of two images made for one prompt is better, as a probability.

    judge = VLMJudge(model_id_or_folder, device="cuda", dtype=torch.bfloat16)
    pref = judge_preferences(judge, images, prompts, group_size=8, generator=torch.Generator().manual_seed(0))
    rewards = pairwise_win_rates(pref).flatten()        # objectives.pairwise_win_rates: one reward per image

A judge sees a pair in some order and may prefer a position whatever the images show, so `judge_preferences`
shows each pair in random order by default, or in both orders.
"""

from __future__ import annotations

import abc
import inspect
from typing import Sequence

import PIL.Image
import torch

from ..devices import default_device

ORDERS = ("random", "both", "fixed")
DEFAULT_QUESTION = ('Both images were generated for the prompt "{prompt}". Which image matches the prompt better? '
                    "Answer {first} for the first image or {second} for the second image.")
DEFAULT_ANSWERS = ("1", "2")


class PairwiseJudge(abc.ABC):
    """Compares two images made for the same prompt."""

    @abc.abstractmethod
    def prefer_first(self, first: list[PIL.Image.Image], second: list[PIL.Image.Image],
                     prompts: list[str]) -> torch.Tensor:
        """P(first[k] is the better image for prompts[k]), judged as shown (first[k] first): float32 CPU, [N]."""


def judge_preferences(judge: PairwiseJudge, images: Sequence[PIL.Image.Image], prompts: Sequence[str],
                      group_size: int, order: str = "random", generator: torch.Generator | None = None) -> torch.Tensor:
    """Pref-GRPO's preference matrices from a pairwise judge, [P, G, G] float32:

        pref[g, i, j] = P(image i of group g beats image j),   pref[g, j, i] = 1 - pref[g, i, j],   pref[g, i, i] = 0.5

    `images`: P * G images, group after group (G = `group_size` consecutive rows made for one prompt); `prompts`:
    one per image. Every pair i < j of every group is judged, all in one `judge.prefer_first` call (two for
    "both"); images of different groups are never compared. `order` says which image of a pair is shown first:

      random  the default: a random order per pair, drawn from `generator` (torch's global one when None);
              a position bias of the judge then favours no index, it only adds noise
      both    each pair in both orders, P(i beats j) = (p(i first) + 1 - p(j first)) / 2: cancels a constant
              position bias exactly, for twice the judging
      fixed   i first, as the Pref-GRPO authors' code does: a position bias favours the lower indices
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a pair to compare), got {group_size}")
    if not images or len(images) % group_size:
        raise ValueError(f"expected groups of {group_size} images (a positive multiple of {group_size}), "
                         f"got {len(images)} images")
    if len(prompts) != len(images):
        raise ValueError(f"expected one prompt per image ({len(images)}), got {len(prompts)} prompts")
    groups = len(images) // group_size
    for g in range(groups):
        mixed = set(prompts[g * group_size:(g + 1) * group_size])
        if len(mixed) > 1:
            raise ValueError(f"group {g} (rows {g * group_size} to {(g + 1) * group_size - 1}) mixes prompts "
                             f"{sorted(mixed)}; each group of {group_size} consecutive images shares one prompt")

    i, j = torch.triu_indices(group_size, group_size, offset=1)
    offsets = torch.arange(groups).unsqueeze(1) * group_size
    a, b = (offsets + i).flatten(), (offsets + j).flatten()  # rows of every pair a < b, group after group

    def a_beats_b(b_first: torch.Tensor) -> torch.Tensor:
        """P(a beats b), each pair shown with b first where `b_first`."""
        first, second = torch.where(b_first, b, a).tolist(), torch.where(b_first, a, b).tolist()
        p = judge.prefer_first([images[k] for k in first], [images[k] for k in second], [prompts[k] for k in first])
        if p.shape != a.shape:
            raise ValueError(f"{type(judge).__name__}.prefer_first returned shape {tuple(p.shape)} for "
                             f"{len(a)} pairs; expected ({len(a)},)")
        p = p.float().cpu()
        return torch.where(b_first, 1 - p, p)

    if order == "random":
        p = a_beats_b(torch.rand(len(a), generator=generator) < 0.5)
    elif order == "fixed":
        p = a_beats_b(torch.zeros(len(a), dtype=torch.bool))
    else:
        p = (a_beats_b(torch.zeros(len(a), dtype=torch.bool)) + a_beats_b(torch.ones(len(a), dtype=torch.bool))) / 2
    pref = torch.full((groups, group_size, group_size), 0.5, dtype=torch.float32)
    pref[:, i, j] = p.view(groups, -1)
    pref[:, j, i] = 1 - p.view(groups, -1)
    return pref


class VLMJudge(PairwiseJudge):
    """A chat vision-language model as judge (transformers id or folder: AutoProcessor with a chat template and
    AutoModelForImageTextToText, in eval mode, no gradients).

    The user turn shows the first image, then the second, then `question` (placeholders: {prompt}, and {first} /
    {second} for the two answers). The model writes nothing: its logits for the next token after the generation
    prompt, restricted to the two answer tokens, give

        P(first) = softmax(logit[answers[0]], logit[answers[1]])[0]

    This differs from the Pref-GRPO authors' judge: their UnifiedReward-Think model writes its reasoning, then an
    `<answer>` that is parsed as a hard verdict ("Image 1 is better" -> a win 1 / 0, "Image 2 is better" -> 0 / 1,
    anything else or no answer -> a tie 0.5 / 0.5). Here the preference is soft, read from two answer tokens without
    generating: win rates carry the judge's confidence, exact ties (and all-tie groups) are rare, and a thinking
    judge's reasoning is skipped, so rewards are not the authors' numbers even with their judge.

    Each answer must be one known token of the model's tokenizer, else a ValueError says which; a tokenizer that
    splits "1" in two (SentencePiece ones may write it "▁" + "1") needs other `answers`, e.g. ("A", "B").
    `batch_size` pairs go through the model at a time, left-padded, so the last position of every row is where
    its answer starts (rotary position embeddings, as in LLaVA's and Qwen2-VL's language models, see the same
    relative positions as without padding).

    Checked on: LLaVA (LlavaForConditionalGeneration + LlavaProcessor, two images per sample as a nested list,
    each expanded to its own image tokens), as the tiny random model of models/tiny.py; no released checkpoint
    was run (none offline). Chat VLMs whose processor takes a list of images per sample (Qwen2-VL, ...) are
    expected to work the same way, untested.
    """

    def __init__(self, model: str, device=None, dtype=None, batch_size: int = 8, question: str = DEFAULT_QUESTION,
                 answers: tuple[str, str] = DEFAULT_ANSWERS):
        from transformers import AutoProcessor

        from ..data.captions import load_image_text_model  # not at the top: data.captions imports this package

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if "{prompt}" not in question:
            raise ValueError(f"question must contain the placeholder {{prompt}}, got {question!r}")
        if len(answers) != 2:
            raise ValueError(f"answers must be two strings (first image, second image), got {answers!r}")
        self.device, self.batch_size = default_device(device), batch_size
        self.question, self.answers = question, tuple(answers)
        self.processor = AutoProcessor.from_pretrained(model)  # checked before the (large) model loads
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or not getattr(self.processor, "chat_template", None):
            raise ValueError(f"judge {model!r}: its processor has no tokenizer with a chat template; VLMJudge needs "
                             f"a chat model that reads several images in one turn (LLaVA, Qwen2-VL, ...)")
        tokenizer.padding_side = "left"
        self.answer_ids = [self._token_id(model, tokenizer, answer) for answer in self.answers]
        if self.answer_ids[0] == self.answer_ids[1]:
            raise ValueError(f"judge {model!r}: answers {self.answers} are the same token {self.answer_ids[0]}")
        self.model = load_image_text_model(model, "judge", self.device, dtype)
        # Only the last position is read; full logits over a long image prompt and a large vocabulary take GBs.
        keeps = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._forward_options = {"logits_to_keep": 1} if keeps else {}

    @staticmethod
    def model_on_meta(model: str) -> torch.nn.Module:
        """The judge's model from its config alone, on the meta device (no weights read): for the memory planner."""
        from transformers import AutoConfig, AutoModelForImageTextToText
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model))

    @staticmethod
    def _token_id(model: str, tokenizer, answer: str) -> int:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            return ids[0]
        found = "the unknown token" if ids == [tokenizer.unk_token_id] else f"{len(ids)} tokens {ids}"
        raise ValueError(f"judge {model!r}: answer {answer!r} is {found} for its tokenizer, not one known token; "
                         f"pass answers=(first, second) that are one token each (e.g. single letters or words "
                         f"in its vocabulary), and a question naming them through {{first}} / {{second}}")

    @torch.inference_mode()
    def prefer_first(self, first: list[PIL.Image.Image], second: list[PIL.Image.Image],
                     prompts: list[str]) -> torch.Tensor:
        from ..data.captions import chat_prompt

        if not len(first) == len(second) == len(prompts):
            raise ValueError(f"expected as many second images and prompts as first images ({len(first)}), got "
                             f"{len(second)} and {len(prompts)}")
        probs = []
        for start in range(0, len(first), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(first)))
            texts = [chat_prompt(self.processor, self.question.format(
                prompt=prompts[k], first=self.answers[0], second=self.answers[1]), images=2) for k in rows]
            inputs = self.processor(images=[[first[k], second[k]] for k in rows], text=texts, return_tensors="pt",
                                    padding=True)
            inputs = inputs.to(self.device).to(self.model.dtype)  # the second casts floating tensors only
            logits = self.model(**inputs, **self._forward_options).logits[:, -1, self.answer_ids]
            probs.append(logits.float().softmax(dim=-1)[:, 0].cpu())
        return torch.cat(probs) if probs else torch.zeros(0)
