"""DCPO's dual captions: write a pair set again with `caption_0` describing image 0 and `caption_1` image 1.

Strategies (Saeidi et al., DCPO), "winner" and "loser" meaning the images with the higher and lower label:

    captioning (c)    an image-to-text model captions each image, given the prompt (see `Captioner`)
    perturbation (p)  winner: the prompt; loser: the prompt semantically perturbed (see `perturb_prompt`,
                      `ModelPerturber`)
    hybrid (h)        both images captioned, then the loser's caption perturbed

Image order and labels stay as they are, so the loser's caption lands in slot 1 when label_1 < label_0; the
trainer swaps captions with their images (`PairDataset` turns `caption_0/1` into `caption_w/l`). Ties (and
pairs without labels) have no loser: p and h leave both captions unperturbed (the prompt twice for p) and count
them; the trainer drops ties anyway.

Output: the label_pairs layout (`pairs-00000.parquet`, ... with every source column plus `caption_0` /
`caption_1`, which replace any the source had; `.shards/` records; a rerun keeps finished shards) and the report
`captions.json`, which records strategy, models, strength and seed. Rows with an undecodable image are skipped
and listed; a model caption that comes out empty is replaced by the prompt and counted.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from ..devices import default_device
from ..files import local_or_hub, report_dict
from ..progress import progress
from .pairs import check_out_dir, decode_pair, first_rows, is_flagged, outcomes, preference_columns
from .shards import CAPTIONS_REPORT as REPORT_NAME, run_shards, write_json

STRATEGIES = ("captioning", "perturbation", "hybrid")
_STRATEGY_LETTERS = {"c": "captioning", "p": "perturbation", "h": "hybrid"}
# The Stable Diffusion text encoders read 77 tokens, so longer generated captions would be cut anyway.
DEFAULT_MAX_NEW_TOKENS = 77

# ---------------------------------------------------------------- rule-based perturbation

STRENGTHS = {"weak": 1, "medium": 2, "strong": 4}  # edits per prompt
EDIT_TYPES = ("drop", "swap", "attribute", "count")

# Attribute lexicons: category -> groups of near-synonyms. A change picks another group of the same category, so
# "small" never becomes "tiny" (no change of meaning) but may become "huge".
ATTRIBUTES = {
    "colour": tuple((c,) for c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                                   "white", "gray", "turquoise", "beige")),
    "size": (("tiny", "small", "little", "miniature"), ("large", "big", "huge", "giant", "enormous", "massive"),
             ("tall",), ("short",), ("long",), ("wide",), ("narrow", "thin")),
    "material": tuple((m,) for m in ("wooden", "metal", "glass", "stone", "plastic", "paper", "marble", "golden",
                                     "silver", "crystal", "leather", "wool", "ceramic", "concrete")),
    "style": (("photorealistic", "realistic", "photographic", "photo"), ("cartoon", "cartoonish"), ("anime", "manga"),
              ("watercolor", "watercolour"), ("oil",), ("sketch", "pencil", "drawing"), ("pixel",), ("minimalist",),
              ("surreal", "surrealist"), ("abstract",), ("cyberpunk",), ("steampunk",), ("vintage", "retro"),
              ("futuristic",), ("impressionist",), ("gothic",), ("3d",)),
    "light": (("sunny", "bright"), ("rainy",), ("snowy",), ("foggy", "misty"), ("stormy",), ("dark", "dim"),
              ("day", "daytime"), ("night", "nighttime"), ("sunset", "dusk"), ("sunrise", "dawn")),
    "mood": (("happy", "smiling", "cheerful"), ("sad", "crying"), ("angry", "furious"), ("scary", "creepy"),
             ("calm", "peaceful"), ("young",), ("old", "elderly", "ancient")),
}
_INSERTED = ("colour", "size", "material")  # categories that read well in front of any noun
_ATTRIBUTE_OF = {w: (cat, g) for cat, groups in ATTRIBUTES.items() for g, words in enumerate(groups) for w in words}
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "twenty", "hundred")
_STOPWORDS = frozenset("a an the of on in at to and or with without for by from as into onto over under near is "
                       "are be it its this that these those his her their very".split())
# A word: letters and digits, with inner apostrophes or hyphens ("don't", "sci-fi"); the rest is separator.
_WORD = re.compile(r"([^\W_]+(?:['’-][^\W_]+)*)")


def _as_random(rng) -> random.Random:
    """The perturber's stream: an int seed, a random.Random (used as is), or a numpy Generator (seeds one)."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return random.Random(int(rng))
    raise TypeError(f"rng must be an int seed, random.Random or numpy Generator, got {type(rng).__name__}")


def _match_case(word: str, like: str) -> str:
    if len(like) > 1 and like.isupper():
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _is_number(word: str) -> bool:
    return word.isdecimal() or word.lower() in NUMBER_WORDS


def _kind(word: str) -> str:
    """An attribute's category, "number", or "other"."""
    return "number" if _is_number(word) else _ATTRIBUTE_OF.get(word.lower(), ("other",))[0]


class _Prompt:
    """A prompt as alternating separators and words (`parts[1::2]` are words), with the words already edited,
    so no edit touches a word twice (a second swap could undo the first). With `visible` (the characters a text
    encoder reads), only the words that end within them are offered for editing."""

    def __init__(self, text: str, visible: int | None = None):
        self.parts = _WORD.split(text)
        self.touched = [False] * len(self.parts)
        ends = enumerate(itertools.accumulate(map(len, self.parts)))
        # the parts from the first word that is not read whole on are not edited
        self.limit = None if visible is None else next((i for i, end in ends if i % 2 and end > visible), None)

    def words(self, content_only: bool = False, untouched: bool = True) -> list[int]:
        stop = len(self.parts) if self.limit is None else self.limit
        return [i for i in range(1, stop, 2) if not (untouched and self.touched[i])
                and not (content_only and self.parts[i].lower() in _STOPWORDS)]

    def set(self, i: int, word: str) -> None:
        self.parts[i], self.touched[i] = _match_case(word, self.parts[i]), True

    def drop(self, i: int) -> None:
        left, right = self.parts[i - 1], self.parts[i + 1]
        # Keep the punctuation around the word ("a cat, on" -> "a, on"), not two spaces.
        joined = right if not left.strip() else left if not right.strip() else left + right
        self.parts[i - 1:i + 2], self.touched[i - 1:i + 2] = [joined], [False]
        if self.limit is not None:  # the word past the window that moves up is not known to fit in it
            self.limit -= 2

    def insert(self, i: int | None, word: str) -> None:
        """Put `word` before the word at part `i`; at the start when no word may be edited (`i` None). (The window
        keeps its parts: the last word in it may have been pushed out.)"""
        if i is None:
            self.parts[:1], self.touched[:1] = ["", word, " " + self.parts[0]], [False, True, False]
        else:
            self.parts[i:i], self.touched[i:i] = [word, " "], [True, False]

    def text(self) -> str:
        return " ".join("".join(self.parts).split()).strip(" ,;:")


def _edit(p: _Prompt, kind: str, rng: random.Random) -> bool:
    """Apply one edit of `kind` to words not edited yet; False where it does not apply to this prompt."""
    if kind == "drop":
        candidates = p.words(content_only=True) or p.words()
        if len(p.words(untouched=False)) < 2 or not candidates:
            return False  # dropping the only word would leave nothing
        if len(p.words(content_only=True, untouched=False)) < 2 and p.parts[candidates[0]].lower() not in _STOPWORDS:
            return False  # the last content word: "a cat on a mat" must not become "a on a"
        p.drop(rng.choice(candidates))
    elif kind == "swap":
        # Only words of one kind trade places (two colours, two numbers, two other words): swapping an adjective
        # with its noun ("red circle" -> "circle red") would change the order more than the meaning.
        content = p.words(content_only=True)
        pairs = [(i, j) for i, j in itertools.combinations(content, 2)
                 if p.parts[i].lower() != p.parts[j].lower() and _kind(p.parts[i]) == _kind(p.parts[j])]
        if not pairs:
            return False
        i, j = rng.choice(pairs)
        wi, wj = p.parts[i], p.parts[j]
        p.set(i, wj.lower() if not wj.isupper() else wj)
        p.set(j, wi.lower() if not wi.isupper() else wi)
    elif kind == "attribute":
        present = [i for i in p.words() if p.parts[i].lower() in _ATTRIBUTE_OF]
        if present:
            i = rng.choice(present)
            category, group = _ATTRIBUTE_OF[p.parts[i].lower()]
            others = [g for k, g in enumerate(ATTRIBUTES[category]) if k != group]
            p.set(i, rng.choice(others)[0])
        else:  # no attribute to change: add one, which always applies (the fallback of last resort)
            words = p.words(content_only=True) or p.words(untouched=False)
            present = {w.lower() for w in p.parts[1::2]}
            new = [g[0] for cat in _INSERTED for g in ATTRIBUTES[cat] if g[0] not in present]
            p.insert(rng.choice(words) if words else None, rng.choice(new))
    elif kind == "count":
        numbers = [i for i in p.words() if _is_number(p.parts[i])]
        if not numbers:
            return False
        i = rng.choice(numbers)
        word = p.parts[i]
        if word.isdecimal():
            n = int(word)
            p.set(i, str(rng.choice([k for k in range(1, max(10, 2 * n) + 1) if k != n])))
        else:
            p.set(i, rng.choice([w for w in NUMBER_WORDS if w != word.lower()]))
    else:
        raise ValueError(f"unknown edit type {kind!r}; expected one of {EDIT_TYPES}")
    return True


def perturb_prompt(prompt: str, strength: str = "medium", rng: random.Random | np.random.Generator | int = 0,
                   edits: Sequence[str] = EDIT_TYPES, visible: int | None = None) -> str:
    """A semantically different prompt made by rule, needing no model; the same `rng` seed gives the same result.
    With `visible` (`clip_visible_chars`), every edit lies in the first `visible` characters, which the text encoder
    reads: an edit past them would leave the loser's condition the winner's.

    `strength` sets the number of edits: weak 1, medium 2, strong 4. Each edit picks a type from `edits` at random
    and applies it to words no earlier edit touched; where that type does not apply it falls back to the other
    types of `edits` in random order, and to an attribute insertion when none applies. The types:

      drop       removes one word: a content word (not a, the, of, ...) where one is left; never the last word,
                 nor the last content word.
      swap       exchanges two different content words of the same kind: two words of one attribute category,
                 two numbers, or two other words ("a red cat on a blue mat" -> "a blue cat on a red mat",
                 "a dog chasing a cat" -> "a cat chasing a dog"); it moves 2 words.
      attribute  replaces a colour / size / material / style / light / mood word (`ATTRIBUTES`) with a word of
                 another synonym group of its category ("small" -> "huge", never "tiny"); with none left, inserts
                 a colour, size or material word not yet in the prompt before a content word. Always applies.
      count      replaces a number: digits by other digits (1 .. max(10, 2n)), a number word by another
                 (`NUMBER_WORDS`); nouns are not re-inflected ("one cat" -> "three cat").

    Replacements keep the case of the word they replace; whitespace is normalised. The result is never empty and
    never has the same words as the prompt, nor with `visible` the same words read (in the rare case edits cancel
    out, an attribute is inserted); a prompt without words gets an attribute word.
    """
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}; expected one of {list(STRENGTHS)}")
    unknown = [e for e in edits if e not in EDIT_TYPES]
    if unknown or not edits:
        raise ValueError(f"edits must be a non-empty subset of {EDIT_TYPES}, got {list(edits)}")
    rng = _as_random(rng)
    p = _Prompt(prompt, visible)
    read = None if visible is None else len(p.words()) + 1  # the words read, the last of them in part
    for _ in range(STRENGTHS[strength]):
        if not any(_edit(p, kind, rng) for kind in rng.sample(list(edits), len(edits))):
            _edit(p, "attribute", rng)  # `edits` excluded attribute and nothing else applied
    # edits may cancel out, or (a word dropped from a run of its copies) leave the words read as they were
    while _WORD.findall(p.text().casefold())[:read] == _WORD.findall(prompt.casefold())[:read]:
        _edit(p, "attribute", rng)
    return p.text()


# Every family's CLIP text encoder reads a caption's first 77 tokens, the start and end tokens included (T5, where
# SD3 and FLUX have it, reads more): a perturbation past them changes nothing a UNet family is conditioned on.
CLIP_WINDOW = 77


@functools.cache
def _clip_tokenizer():
    from ..models.tiny import clip_tokenizer  # built from open_clip's vocabulary, offline; loaded when first asked
    return clip_tokenizer(model_max_length=10 ** 9)  # counted here, never cut (and no warning of a long text)


def clip_visible_chars(text: str) -> int | None:
    """How many leading characters of `text` a CLIP text encoder reads (its first CLIP_WINDOW - 2 tokens); None
    where it reads all of them."""
    offsets = _clip_tokenizer()(text, return_offsets_mapping=True)["offset_mapping"]
    return None if len(offsets) <= CLIP_WINDOW else offsets[CLIP_WINDOW - 2][1]


def _clip_window(text: str) -> list[int]:
    """The token ids a CLIP text encoder reads of `text` (it lowercases)."""
    return _clip_tokenizer()(text)["input_ids"][:CLIP_WINDOW - 1]


def row_seed(seed: int, index: int) -> int:
    """The perturbation seed of source row `index`: independent of batching, sharding and resuming."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class RuleBasedPerturber:
    """`perturb_prompt` over a batch, each edit within what a CLIP text encoder reads; needs no model."""

    def __init__(self, strength: str = "medium", edits: Sequence[str] = EDIT_TYPES):
        perturb_prompt("x", strength, 0, edits)  # fail on bad settings now, not in the first shard
        self.strength, self.edits = strength, tuple(edits)
        # clip_window: recorded since the edits keep within it, so a run from before is not resumed with them
        self.info = {"kind": "rules", "strength": strength, "edits": list(self.edits), "clip_window": CLIP_WINDOW}

    def perturb(self, texts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], int]:
        """(perturbed texts, how many fell back to the rules: none here)."""
        return [perturb_prompt(t, self.strength, s, self.edits, clip_visible_chars(t))
                for t, s in zip(texts, seeds)], 0


# ---------------------------------------------------------------- model-based parts

def _one_line(text: str) -> str:
    return " ".join(text.split()).strip("\"'")


PERTURB_INSTRUCTION = (
    "Rewrite this image description so that it describes a different image: change {edits} of its details (an "
    "object, colour, number, size, material or style) and keep the rest. Reply with the new description only.")


class ModelPerturber:
    """Perturbation by a text-generation model (any transformers causal LM id or folder), greedy decoding.

    The model reads `PERTURB_INSTRUCTION` (the number of details = the rule-based edits for `strength`) followed by
    "Description: <text>" — as the user turn of its chat template where the tokenizer has one, else as plain text
    ending in "New description:". The first non-empty line it writes is the result; one without a word, or with
    the same words as the input, is replaced by `perturb_prompt` with the row's seed and counted as a fallback.
    Greedy decoding ignores the seed, so a rerun gives the same texts.
    """

    def __init__(self, model: str, strength: str = "medium", device=None, dtype=None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.rules = RuleBasedPerturber(strength)
        self.device, self.max_new_tokens, self.batch_size = default_device(device), max_new_tokens, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except ValueError as err:
            raise ValueError(f"perturber {model!r}: not a text-generation model AutoModelForCausalLM loads "
                             f"({err})") from err
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"perturber {model!r}: its tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.info = {"kind": "model", "model": local_or_hub(model), "strength": strength,
                     "max_new_tokens": max_new_tokens, "chat_template": self.chat, "clip_window": CLIP_WINDOW}

    def _input(self, text: str) -> str:
        edits = STRENGTHS[self.rules.strength]
        request = f"{PERTURB_INSTRUCTION.format(edits=edits)}\nDescription: {text}"
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{request}\nNew description:"

    @torch.inference_mode()
    def perturb(self, texts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], int]:
        """(perturbed texts, how many fell back to the rules)."""
        results, fallbacks = [], 0
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            # A chat template already writes the special tokens it wants.
            enc = self.tokenizer([self._input(t) for t in chunk], return_tensors="pt", padding=True,
                                 add_special_tokens=not self.chat)
            out = self.model.generate(input_ids=enc["input_ids"].to(self.device),
                                      attention_mask=enc["attention_mask"].to(self.device), do_sample=False,
                                      num_beams=1, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
            written = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, seed, new in zip(chunk, seeds[start:start + self.batch_size], written):
                line = next((_one_line(x) for x in new.splitlines() if _one_line(x)), "")
                words = _WORD.findall(line.casefold())
                # nothing written, nothing changed, or nothing a CLIP text encoder reads
                if not words or words == _WORD.findall(text.casefold()) or _clip_window(line) == _clip_window(text):
                    line, fallbacks = self.rules.perturb([text], [seed])[0][0], fallbacks + 1
                results.append(line)
        return results, fallbacks


CAPTION_INSTRUCTION = ("This image was generated for the prompt \"{prompt}\". In one sentence, describe what the "
                       "image actually shows, as a prompt for an image generator. Reply with the description only.")
CAPTION_INSTRUCTION_NO_PROMPT = "In one sentence, describe what this image shows. Reply with the description only."


def load_image_text_model(model: str, role: str, device: torch.device, dtype=None):
    """An AutoModelForImageTextToText (id or folder) on `device`, in eval mode; `role` names it in the error for a
    model of another kind. Shared by `Captioner` and the pairwise judge (rewards/judge.py)."""
    from transformers import AutoModelForImageTextToText
    try:
        return AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
    except ValueError as err:
        raise ValueError(f"{role} {model!r}: not an image-to-text model AutoModelForImageTextToText loads "
                         f"({err})") from err


def chat_prompt(processor, text: str, images: int = 1) -> str:
    """The user turn `images` images then `text`, through `processor`'s chat template, ending with the generation
    prompt (where the model's answer starts)."""
    content = [*[{"type": "image"}] * images, {"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class Captioner:
    """An image-to-text model (transformers id or folder) loaded with AutoProcessor and AutoModelForImageTextToText;
    greedy decoding of at most `max_new_tokens` tokens. How the prompt is used depends on the processor:

      instruction  chat models (a processor with a chat template: LLaVA, Qwen2-VL, ... as DCPO used):
                   the user turn is the image and `CAPTION_INSTRUCTION` quoting the prompt; the caption is what the
                   model answers.
      prefix       captioning models whose processor also takes text (BLIP, BLIP-2, GIT): the prompt is the text
                   prefix the caption continues, so the caption starts with the prompt as the tokenizer
                   normalises it (BLIP lowercases), then what the model adds about the image. Prompts longer
                   than the tokenizer's limit less max_new_tokens are truncated.
      image        image-only models (VisionEncoderDecoder ones such as ViT-GPT2), or `use_prompt=False`:
                   the caption describes the image alone (chat models get `CAPTION_INSTRUCTION_NO_PROMPT`).
    Whitespace is collapsed to one line; an empty caption (no word at all) is replaced by the prompt and counted.
    """

    def __init__(self, model: str, device=None, dtype=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 use_prompt: bool = True):
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
        self.device, self.max_new_tokens, self.use_prompt = default_device(device), max_new_tokens, use_prompt
        self.model = load_image_text_model(model, "captioner", self.device, dtype)
        processor = AutoProcessor.from_pretrained(model)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            self.processor, self.tokenizer = processor, processor.tokenizer
            self.mode = "instruction" if getattr(processor, "chat_template", None) else "prefix"
        else:  # AutoProcessor found only one part (VisionEncoderDecoder folders): load both
            self.processor = AutoImageProcessor.from_pretrained(model)
            self.tokenizer, self.mode = AutoTokenizer.from_pretrained(model), "image"
        # A decoder reading no input_ids (VisionEncoderDecoder, e.g. TrOCR's joint processor) takes no prefix.
        takes_text = "input_ids" in inspect.signature(self.model.forward).parameters
        if self.mode == "prefix" and not (use_prompt and takes_text):
            self.mode = "image"
        if self.mode == "instruction":
            self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        limit = self.tokenizer.model_max_length - max_new_tokens
        self._truncate = {"truncation": True, "max_length": limit} if 0 < limit < 1_000_000 else {}
        self.info = {"model": local_or_hub(model), "mode": self.mode, "use_prompt": use_prompt,
                     "max_new_tokens": max_new_tokens}

    def group_key(self, prompt: str) -> int:
        """Images whose keys differ must not share a batch: in prefix mode the prompt's token count, because
        models such as BLIP read a padded prefix wrongly (BLIP drops the last column as if it were [SEP])."""
        if self.mode != "prefix":
            return 0
        return len(self.tokenizer(prompt, **self._truncate)["input_ids"])

    @torch.inference_mode()
    def caption(self, images: Sequence, prompts: Sequence[str]) -> tuple[list[str], int]:
        """(one caption per image, how many came out empty and were replaced by the prompt)."""
        if self.mode == "instruction":
            texts = [chat_prompt(self.processor, CAPTION_INSTRUCTION.format(prompt=p) if self.use_prompt
                                 else CAPTION_INSTRUCTION_NO_PROMPT) for p in prompts]
            inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        elif self.mode == "prefix":
            inputs = self.processor(images=list(images), text=list(prompts), return_tensors="pt", **self._truncate)
        else:
            inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = inputs.to(self.device).to(self.model.dtype)  # the second casts floating tensors only
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        if self.mode == "instruction" and not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only models echo the conversation
        captions = [_one_line(c) for c in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        captions = [c if _WORD.search(c) else "" for c in captions]  # punctuation alone describes nothing
        empty = sum(not c for c in captions)
        return [c or p for c, p in zip(captions, prompts)], empty


# ---------------------------------------------------------------- make_captions

class _PairImages(torch.utils.data.Dataset):
    """Row index -> both images decoded (RGB), or why they cannot be; runs in DataLoader workers."""

    def __init__(self, pairs):
        self.pairs = pairs.select_columns(["jpg_0", "jpg_1"])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        row = self.pairs[index]
        try:
            images = decode_pair(row, index)
        except (ValueError, OSError) as err:  # an undecodable pair is reported and skipped, not fatal
            return {"index": index, "error": str(err)}
        return {"index": index, "images": images}


@dataclass
class CaptionReport:
    out_dir: Path
    strategy: str
    settings: dict  # what the shards were made with (captioner, perturber, strength, seed, source, ...)
    pairs_written: int  # over all shards, reused ones included
    skipped: list[tuple[int, str]]  # (source row, reason): not written
    empty_captions: int  # model captions that came out empty and were replaced by the prompt
    perturber_fallbacks: int  # model perturbations (empty or unchanged) replaced by the rule-based perturber
    ties: int  # pairs without a loser (tie or no label): not perturbed
    shards: int
    shards_reused: int
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return report_dict(self)

    def __str__(self) -> str:
        s = self.settings
        models = ", ".join(f"{k} {s[k].get('model', s[k].get('kind'))}" for k in ("captioner", "perturber") if s[k])
        lines = [f"{self.out_dir}: {self.pairs_written} pairs with dual captions ({self.strategy}; {models}"
                 f"{'' if s['strength'] is None else ', strength ' + s['strength']}, seed {s['seed']}); "
                 f"{len(self.skipped)} skipped, {self.empty_captions} empty captions replaced by the prompt, "
                 f"{self.perturber_fallbacks} perturber fallbacks to rules, {self.ties} ties not perturbed; "
                 f"{self.shards} shards ({self.shards_reused} kept from an earlier run)"]
        lines += [f"  skipped {item}: {reason}" for item, reason in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more (all listed in {self.out_dir / REPORT_NAME})")
        return "\n".join(lines)


def make_captions(source, out_dir, strategy: str, captioner: str | Captioner | None = None,
                  perturber: str | RuleBasedPerturber | ModelPerturber = "rules", strength: str = "medium",
                  seed: int = 0, batch_size: int = 8, device=None, dtype=None,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, use_prompt: bool = True, split: str = "train",
                  max_pairs: int | None = None, shard_size: int = 1000, num_workers: int = 0) -> CaptionReport:
    """Write `source` (anything `load_pairs` reads; ties kept) with `caption_0` / `caption_1` to `out_dir`; see the
    module docstring for strategies and files.

    `strategy`: captioning / perturbation / hybrid (or c / p / h). `captioner`: a model id or folder (or a loaded
    `Captioner`) for c and h. `perturber`: "rules" (`perturb_prompt`), a causal LM id or folder (`ModelPerturber`),
    or a loaded perturber (which brings its own strength), for p and h; `strength` weak / medium / strong; `seed`
    makes the rule-based edits reproducible (each row's seed comes from `seed` and its row index). `batch_size`:
    images per captioner call (whole pairs, at least one) and texts per perturber call. `device`, `dtype` (a torch
    dtype or a transformers name such as "float16" or "auto"), `max_new_tokens` and `use_prompt` go to the models
    loaded here. Images are decoded once, in `num_workers` DataLoader processes. A rerun with the same settings
    keeps the finished shards; other settings are an error naming the difference.
    """
    strategy = _STRATEGY_LETTERS.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES} (or c / p / h)")
    if (captioner is None) == (strategy != "perturbation"):
        raise ValueError(f"strategy {strategy} needs a captioner (an image-to-text model id or folder)"
                         if captioner is None else f"strategy {strategy} takes no captioner, got {captioner!r}")
    if strategy == "captioning" and perturber != "rules":
        raise ValueError(f"strategy captioning perturbs nothing; got perturber {perturber!r}")
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}; expected one of {list(STRENGTHS)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    out_dir, source = Path(out_dir), str(source)
    check_out_dir(source, out_dir)
    pairs, fingerprint = first_rows(source, split, max_pairs)

    if isinstance(captioner, str):
        captioner = Captioner(captioner, device, dtype, max_new_tokens, use_prompt)
    if strategy == "captioning":
        perturber = None
    elif perturber is None:
        raise ValueError(f"strategy {strategy} needs a perturber: 'rules' or a text-generation model")
    elif perturber == "rules":
        perturber = RuleBasedPerturber(strength)
    elif isinstance(perturber, str):
        perturber = ModelPerturber(perturber, strength, device, dtype, max_new_tokens, batch_size)
    models = [m.model for m in (captioner, perturber) if getattr(m, "model", None) is not None]
    settings = {"source": local_or_hub(source), "split": split, "fingerprint": fingerprint,
                "strategy": strategy, "captioner": captioner.info if captioner else None,
                "perturber": perturber.info if perturber else None,
                "dtype": str(models[0].dtype) if models else None,  # the models' (a resume in another mixes)
                "strength": perturber.info["strength"] if perturber else None, "seed": seed,
                "shard_size": shard_size}

    def caption_shard(start: int, stop: int, desc: str):
        return _caption_shard(pairs, start, stop, captioner, perturber, seed, batch_size, num_workers,
                              f"captions, {desc}")

    results = run_shards(out_dir, len(pairs), shard_size, settings, caption_shard)
    counts = {key: sum(r[key] for r, _ in results)
              for key in ("written", "empty_captions", "perturber_fallbacks", "ties")}
    counts["reused"] = sum(kept for _, kept in results)
    skipped = [tuple(s) for r, _ in results for s in r["skipped"]]

    report = CaptionReport(out_dir, strategy, settings, counts["written"], skipped, counts["empty_captions"],
                           counts["perturber_fallbacks"], counts["ties"], len(results), counts["reused"],
                           {"source": settings["source"], "split": split, "rows": len(pairs)})
    write_json(out_dir / REPORT_NAME, report.to_dict())
    return report


def _batches(indices: list[int], key, size: int) -> list[list[int]]:
    """Consecutive runs of at most `size` indices, sorted by key, never mixing two keys in one run."""
    ordered = sorted(indices, key=lambda i: (key(i), i))
    return [chunk for _, group in itertools.groupby(ordered, key=key) for chunk in _chunks(list(group), size)]


def _chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def _caption_shard(pairs, start: int, stop: int, captioner, perturber, seed: int, batch_size: int,
                   num_workers: int, desc: str) -> tuple[pa.Table, dict]:
    """Rows start..stop-1 with their two captions (undecodable rows left out) and the shard's counts."""
    labels, flagged = preference_columns(pairs.column_names, human_labels=False)  # the winner is label_0/1's
    meta = pairs.select_columns(["caption", *labels, *(["has_label"] if flagged else [])])[start:stop]  # no images
    prompts = {start + n: p or "" for n, p in enumerate(meta["caption"])}
    if captioner is None:  # images only checked: any order, full batches
        batches = _chunks(list(range(start, stop)), batch_size)
    else:
        keys = {i: captioner.group_key(p) for i, p in prompts.items()}
        batches = _batches(list(prompts), keys.__getitem__, max(1, batch_size // 2))
    loader = torch.utils.data.DataLoader(_PairImages(pairs), batch_sampler=batches, collate_fn=list,
                                         num_workers=num_workers)
    captions, skipped, empty = {}, [], 0
    with progress(total=stop - start, unit="pair", desc=desc) as bar:
        for items in loader:
            skipped += [(it["index"], it["error"]) for it in items if "error" in it]
            good = [it["index"] for it in items if "error" not in it]
            if captioner is None:
                texts = [prompts[i] for i in good for _ in (0, 1)]
            elif good:
                texts, n = captioner.caption([im for it in items if "error" not in it for im in it["images"]],
                                             [prompts[i] for i in good for _ in (0, 1)])
                if len(texts) != 2 * len(good):
                    raise RuntimeError(f"captioner returned {len(texts)} captions for {2 * len(good)} images")
                empty += n
            captions.update({i: texts[2 * n:2 * n + 2] for n, i in enumerate(good)})
            bar.update(len(items))

    kept = sorted(captions)
    has_label = [is_flagged(f) for f in meta["has_label"]] if flagged else None
    winner = dict(zip(range(start, stop), outcomes(meta[labels[0]], meta[labels[1]], has_label).tolist()))
    ties, fallbacks = 0, 0
    if perturber is not None:
        ties = sum(winner[i] not in (0, 1) for i in kept)
        losers = [(i, 1 - winner[i]) for i in kept if winner[i] in (0, 1)]
        perturbed, fallbacks = perturber.perturb([captions[i][slot] for i, slot in losers],
                                                 [row_seed(seed, i) for i, _ in losers])
        for (i, slot), text in zip(losers, perturbed):
            captions[i][slot] = text

    rows = pairs.with_format("arrow")[start:stop]
    rows = rows.take(pa.array([i - start for i in kept], pa.int64())).replace_schema_metadata(None)
    rows = rows.drop_columns([c for c in ("caption_0", "caption_1") if c in rows.column_names])
    for slot in (0, 1):
        rows = rows.append_column(f"caption_{slot}", pa.array([captions[i][slot] for i in kept], pa.string()))
    record = {"skipped": sorted(skipped), "empty_captions": empty,
              "perturber_fallbacks": fallbacks, "ties": ties}
    return rows, record
