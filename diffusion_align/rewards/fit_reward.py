"""Fit a PickScore-style reward model: a CLIP model fine-tuned on preference pairs (Kirstain et al., 2023).

Objective, for pair i with prompt embedding t_i and image embeddings v_i0, v_i1 (all L2-normalised):

    logits_ik = exp(logit_scale) * cos(t_i, v_ik)                    k = 0, 1
    loss_i    = sum_k y_ik * (log y_ik - log softmax(logits_i)_k)     = CE(y_i, p_i) - H(y_i) = KL(y_i || p_i)
    loss      = sum_i w_i * loss_i / sum_i w_i                       w_i = 1 / num_example_per_prompt_i

with y_i = (label_0, label_1): 1/0, 0/1, or 0.5/0.5 for a tie. Ties are kept (they teach the model to score both
images alike). Subtracting the target's entropy H(y) is the authors' "log 0.5 offset": a tie predicted as a tie
costs 0 instead of log 2, and a hard label costs -log p of the preferred image. Weights are normalised within the
batch, as in the authors' criterion, so prompts with many pairs do not dominate; without the column every w_i = 1.

Training: AdamW (weight decay on weight matrices and embeddings only; biases, norm gains, the class embedding and
logit_scale are not decayed, as in open_clip), linear warm-up then a constant lr (the authors' schedule) or cosine
decay to 0, grad-norm clipping, fp32. logit_scale is clamped to ln(100) after each step, as in CLIP. A step whose
gradient is not finite is skipped. Deterministic for a seed (batches come from `data.pairs.PairBatchSampler`).

Validation splits by prompt, never by pair, so no prompt is in both sets. Accuracy against the dataset's labels,
ties included: predict a tie when |p0 - 0.5| <= t, else the image with p > 0.5. Credit per pair: a strict label
gets 1 for the same image, 0.5 for a predicted tie, 0 for the other image; a tie label gets 1 only for a predicted
tie. The threshold t is chosen on the validation pairs themselves, so the accuracy at t is optimistic; the accuracy
at t = 0 is not (use t on a test set). The authors' training code scores validation differently,
(p0 > p1) * label_0 + (p0 < p1) * label_1: no threshold, and a tie label gets 0.5 whatever the prediction.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.pairs import PairBatchSampler, flag_values, load_pairs, preference_columns
from ..devices import default_device
from ..files import folder_written_beside, report_dict, write_text_atomic
from ..progress import progress
from .clip import PROCESSOR_FILES, ClipImageTransform, projected
from .labeling import PairImages, collate_pair_images, outcomes

logger = logging.getLogger("diffusion_align")

MAX_LOGIT_SCALE = math.log(100.0)
REPORT_NAME = "fit_report.json"


# ---------------------------------------------------------------- objective and metrics (pure)

def pickscore_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i KL(y_i || softmax(logits_i)) / sum_i w_i for logits and targets (N, 2); see the module docstring.

    Equal weights (None) give the plain mean.
    """
    targets = targets.float()
    per_pair = (torch.special.xlogy(targets, targets) - targets * logits.float().log_softmax(-1)).sum(-1)
    if weights is None:
        return per_pair.mean()
    weights = weights.float()
    return (weights * per_pair).sum() / weights.sum()


def pair_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 2) logits exp(logit_scale) * cos(text_i, image_ik) of a CLIPModel; pixel_values (N, 2, 3, H, W)."""
    n = len(input_ids)
    text = projected(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    image = projected(model.get_image_features(pixel_values=pixel_values.flatten(0, 1)))
    text, image = F.normalize(text.float(), dim=-1), F.normalize(image.float(), dim=-1).view(n, 2, -1)
    return model.logit_scale.float().exp() * torch.einsum("nd,nkd->nk", text, image)


def _credits(prob_0: np.ndarray, label_0, label_1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per labelled pair: |p0 - 0.5|, the credit if predicted by side, the credit if predicted a tie."""
    truth = outcomes(label_0, label_1)
    keep = truth >= 0
    p, truth = np.asarray(prob_0, np.float64)[keep], truth[keep]
    side = np.where(p > 0.5, 0, 1)
    by_side = np.where(truth == 2, 0.0, (side == truth).astype(np.float64))
    as_tie = np.where(truth == 2, 1.0, 0.5)
    return np.abs(p - 0.5), by_side, as_tie


def pairwise_accuracy(prob_0, label_0, label_1, tie_threshold: float = 0.0) -> float | None:
    """Accuracy of P(image 0 preferred) against labels with ties (rule in the module docstring); None if no
    labelled pairs."""
    distance, by_side, as_tie = _credits(prob_0, label_0, label_1)
    if not len(distance):
        return None
    return float(np.where(distance <= tie_threshold, as_tie, by_side).mean())


def choose_tie_threshold(prob_0, label_0, label_1) -> tuple[float, float | None]:
    """(t, accuracy at t): the smallest threshold with the best `pairwise_accuracy`, in O(n log n).

    Only the thresholds t = 0 and t = |p0 - 0.5| of some pair change the prediction, so those are tried.
    """
    distance, by_side, as_tie = _credits(prob_0, label_0, label_1)
    if not len(distance):
        return 0.0, None
    order = np.argsort(distance, kind="stable")
    distance, gain = distance[order], (as_tie - by_side)[order]
    last = np.flatnonzero(np.append(distance[1:] != distance[:-1], True))  # last pair at each distinct distance
    totals = by_side.sum() + np.cumsum(gain)[last]
    candidates, totals = np.append(0.0, distance[last]), np.append(by_side.sum(), totals)
    if distance[0] == 0:  # t = 0 already turns the pairs with p0 == 0.5 into ties
        candidates, totals = candidates[1:], totals[1:]
    best = int(np.argmax(totals))  # the first maximum: the smallest threshold
    return float(candidates[best]), float(totals[best] / len(distance))


def split_by_prompt(captions: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation): round(val_fraction * prompts) random prompts (at least one, leaving at
    least one for training) with all their pairs go to validation."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    prompts = sorted(set(captions))
    n_val = 0 if val_fraction == 0 else min(max(1, round(val_fraction * len(prompts))), len(prompts) - 1)
    held_out = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:n_val]}
    is_val = np.array([c in held_out for c in captions], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---------------------------------------------------------------- fitting

@dataclass
class FitReport:
    out_dir: Path
    base: str
    steps: int
    train_pairs: int
    train_prompts: int
    val_pairs: int
    val_prompts: int
    train_loss_start: float | None  # on up to `eval_pairs` training pairs, before and after
    train_loss_end: float | None
    val_loss_start: float | None
    val_loss_end: float | None
    val_accuracy_start: float | None  # at t = 0
    val_accuracy: float | None  # at t = 0
    tie_threshold: float  # chosen on validation
    val_accuracy_at_threshold: float | None
    loss_history: list[tuple[int, float]]  # (step, mean training loss since the previous entry)
    skipped: list[tuple[int, str]]  # (row, reason): never trained on
    nonfinite_steps: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return report_dict(self, item="row")

    def __str__(self) -> str:
        def num(x):
            return "n/a" if x is None else f"{x:.4f}"
        lines = [f"{self.out_dir}: {self.steps} steps from {self.base} on {self.train_pairs} pairs "
                 f"({self.train_prompts} prompts); validation {self.val_pairs} pairs ({self.val_prompts} prompts)",
                 f"  train loss {num(self.train_loss_start)} -> {num(self.train_loss_end)}, "
                 f"validation loss {num(self.val_loss_start)} -> {num(self.val_loss_end)}",
                 f"  validation accuracy (t=0) {num(self.val_accuracy_start)} -> {num(self.val_accuracy)}; at the "
                 f"tie threshold t={self.tie_threshold:.4g} (of |P(image 0) - 0.5|, not the scores' units of "
                 f"label --tie-margin) chosen on validation: "
                 f"{num(self.val_accuracy_at_threshold)}"]
        if self.skipped:
            lines.append(f"  {len(self.skipped)} pairs skipped, e.g. row {self.skipped[0][0]}: {self.skipped[0][1]}")
        return "\n".join(lines)


def load_clip(base: str, processor: str | None = None):
    """(CLIPModel in fp32, tokenizer, image processor) from `base` (folder or hub id); the tokenizer and image
    processor come from `processor` if given (e.g. PickScore_v1 ships without them)."""
    import transformers
    # transformers 5's CLIPImageProcessor resizes with torchvision; the PIL one is what the scorers use.
    image_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    parts = []
    for cls, source, what in ((transformers.CLIPModel, base, "a CLIPModel (config.json + weights)"),
                              (transformers.AutoTokenizer, processor or base, PROCESSOR_FILES["tokenizer"]),
                              (image_cls, processor or base, PROCESSOR_FILES["image processor"])):
        try:
            parts.append(cls.from_pretrained(source))
        except OSError as err:
            raise FileNotFoundError(f"cannot load {cls.__name__} from {source}: expected {what} in that folder or "
                                    f"hub repo ({err}); pass processor=... where the base has no processor files"
                                    ) from err
    return parts[0].float(), parts[1], parts[2]


def _decay_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, warmup_steps: int, total: int, schedule: str) -> float:
    """Multiplier of lr for optimizer step `step` (0-based): linear warm-up, then constant or cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _ModelInputs:
    """A collated PairImages batch -> tokens, pixels (N, 2, 3, H, W), targets and weights, on the device."""

    def __init__(self, tokenizer, context_length: int, labels: np.ndarray, weights: np.ndarray, device):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.labels, self.weights, self.device = labels, weights, device

    def __call__(self, batch: dict) -> dict:
        rows = batch["indices"]
        tokens = self.tokenizer(batch["prompts"][::2], padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device),
                "attention_mask": tokens["attention_mask"].to(self.device),
                "pixel_values": batch["pixels"].view(len(rows), 2, *batch["pixels"].shape[1:]).to(self.device),
                "targets": torch.from_numpy(self.labels[rows]).to(self.device),
                "weights": torch.from_numpy(self.weights[rows]).to(self.device)}


@torch.no_grad()
def _evaluate(model, pairs, rows: np.ndarray, preprocess, to_device: _ModelInputs, batch_size: int,
              num_workers: int) -> tuple[np.ndarray, np.ndarray, float | None, list[tuple[int, str]]]:
    """(rows evaluated, P(image 0) for each, weighted loss over them, [(row, reason)] undecodable) for `rows`."""
    model.eval()
    loader = torch.utils.data.DataLoader(PairImages(pairs, rows, preprocess), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_pair_images)
    done, probs, losses, weights, errors = [], [], [], [], []
    for batch in loader:
        errors += batch["errors"]
        if batch["indices"]:
            b = to_device(batch)
            logits = pair_logits(model, b["input_ids"], b["attention_mask"], b["pixel_values"])
            done += batch["indices"]
            probs.append(logits.softmax(-1)[:, 0].cpu())
            losses.append(pickscore_loss(logits, b["targets"], b["weights"]).cpu() * b["weights"].sum().cpu())
            weights.append(b["weights"].sum().cpu())
    model.train()
    if not done:
        return np.zeros(0, np.int64), np.zeros(0), None, errors
    return np.asarray(done), torch.cat(probs).double().numpy(), float(sum(losses) / sum(weights)), errors


def _checked_rows(pairs, has_weights: bool, source: str) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """(labels (n, 2) float32, weights (n,) float32, [(row, reason)] of rows unusable for their labels/weights)."""
    _, flagged = preference_columns(pairs.column_names, human_labels=False)  # the labels fitted are label_0/1
    cols = pairs.select_columns(["label_0", "label_1", *(["num_example_per_prompt"] if has_weights else [])]
                                ).with_format("numpy")[:]
    labels = np.stack([np.asarray(cols["label_0"], np.float64), np.asarray(cols["label_1"], np.float64)], axis=1)
    counts = np.asarray(cols["num_example_per_prompt"], np.float64) if has_weights else np.ones(len(labels))
    unflagged = (~flag_values(pairs.select_columns(["has_label"]).with_format("arrow")[:]["has_label"], source)
                 if flagged else np.zeros(len(labels), bool))
    bad_labels = ~(np.isfinite(labels).all(1) & (labels >= 0).all(1) & (np.abs(labels.sum(1) - 1) < 1e-6))
    bad_counts = ~(np.isfinite(counts) & (counts >= 1))
    skipped = [(int(i), f"row {i}: has_label is false: its label_0/label_1 hold no one's preference")
               for i in np.flatnonzero(unflagged)]
    skipped += [(int(i), f"row {i}: label_0/label_1 = {tuple(labels[i])}, expected two probabilities summing to 1 "
                         f"(1/0, 0/1 or 0.5/0.5)") for i in np.flatnonzero(bad_labels & ~unflagged)]
    skipped += [(int(i), f"row {i}: num_example_per_prompt = {counts[i]}, expected a count >= 1")
                for i in np.flatnonzero(bad_counts & ~bad_labels & ~unflagged)]
    return labels.astype(np.float32), (1.0 / np.where(bad_counts, 1.0, counts)).astype(np.float32), skipped


def fit_reward(dataset: str, base: str, out_dir, steps: int = 4000, lr: float = 3e-6, weight_decay: float = 0.3,
               batch_size: int = 128, val_fraction: float = 0.05, seed: int = 0, warmup_steps: int = 500,
               schedule: str = "constant", max_grad_norm: float | None = 1.0, processor: str | None = None,
               split: str = "train", max_pairs: int | None = None, eval_pairs: int = 1000, log_every: int = 50,
               num_workers: int = 0, device=None) -> FitReport:
    """Fine-tune the CLIPModel at `base` on the pairs of `dataset` with the PickScore objective; save it to `out_dir`.

    Defaults are the authors' (lr 3e-6, weight decay 0.3, 500 warm-up steps then constant, ~4000 steps, batch 128
    pairs). `out_dir` gets the model, tokenizer and image processor (save_pretrained, safetensors), loadable with
    `load_scorer("pickscore", out_dir)`, and `fit_report.json`; it is written beside and renamed into place, and
    must be new or an earlier fit-reward output. Undecodable pairs and pairs with unusable labels are skipped.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if min(steps, batch_size, eval_pairs, log_every) < 1 or warmup_steps < 0:
        raise ValueError(f"expected steps, batch_size, eval_pairs, log_every >= 1 and warmup_steps >= 0; got "
                         f"{steps}, {batch_size}, {eval_pairs}, {log_every}, {warmup_steps}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: is a file; expected a folder (new, or an earlier fit-reward output) to "
                              "save the model in")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / REPORT_NAME).is_file():
        raise FileExistsError(f"{out_dir}: exists and is not a fit-reward output (no {REPORT_NAME}); the saved model "
                              f"replaces the whole folder, so pick a new one")
    settings = {"dataset": dataset, "split": split, "max_pairs": max_pairs, "steps": steps, "lr": lr,
                "weight_decay": weight_decay, "batch_size": batch_size, "val_fraction": val_fraction, "seed": seed,
                "warmup_steps": warmup_steps, "schedule": schedule, "max_grad_norm": max_grad_norm,
                "processor": processor}
    device = default_device(device)
    torch.manual_seed(seed)  # only a base with dropout draws from it; batches have their own generator

    # ---- data first: a wrong path fails before the model loads ----
    pairs, _ = load_pairs(dataset, split=split, keep_ties=True, max_pairs=max_pairs, extra_columns="all")
    has_weights = "num_example_per_prompt" in pairs.column_names
    labels, weights, skipped = _checked_rows(pairs, has_weights, dataset)
    captions = [c or "" for c in pairs["caption"]]
    train_rows, val_rows = split_by_prompt(captions, val_fraction, seed)
    unusable = {i for i, _ in skipped}
    train_rows = np.array([i for i in train_rows if i not in unusable], dtype=np.int64)
    val_rows = np.array([i for i in val_rows if i not in unusable], dtype=np.int64)
    if len(train_rows) < batch_size:
        raise ValueError(f"{dataset}: {len(train_rows)} usable training pairs cannot fill one batch of {batch_size}; "
                         f"lower batch_size or add data")
    images = pairs.select_columns(["caption", "jpg_0", "jpg_1"])  # what DataLoader workers need to see

    model, tokenizer, image_processor = load_clip(base, processor)
    model.to(device).train()
    preprocess = ClipImageTransform(image_processor)
    to_device = _ModelInputs(tokenizer, model.config.text_config.max_position_embeddings, labels, weights, device)
    probe = np.random.default_rng(seed).permutation(train_rows)[:eval_pairs]  # fixed training pairs for the loss

    def evaluate(rows):
        return _evaluate(model, images, rows, preprocess, to_device, batch_size, num_workers)

    _, _, train_loss_start, _ = evaluate(probe)
    val_done, val_prob, val_loss_start, _ = evaluate(val_rows)
    val_accuracy_start = pairwise_accuracy(val_prob, *labels[val_done].T)

    optimizer = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup_steps, steps, schedule))
    sampler = PairBatchSampler(len(train_rows), batch_size, seed)
    loader = iter(torch.utils.data.DataLoader(
        PairImages(images, train_rows, preprocess), batch_sampler=([i for _, i in keys] for keys in sampler),
        num_workers=num_workers, collate_fn=collate_pair_images))
    seen_bad, nonfinite, history, window = {}, 0, [], []
    started = time.perf_counter()
    for step in progress(range(1, steps + 1), desc="fit-reward"):
        for _ in range(sampler.batches_per_epoch + 1):
            batch = next(loader)
            seen_bad.update(batch["errors"])
            if batch["indices"]:
                break
        else:
            raise ValueError(f"{dataset}: a whole epoch of training pairs could not be decoded, e.g. "
                             f"{next(iter(seen_bad.values()))}")
        b = to_device(batch)
        loss = pickscore_loss(pair_logits(model, b["input_ids"], b["attention_mask"], b["pixel_values"]),
                              b["targets"], b["weights"])
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf))
        if math.isfinite(grad_norm):
            optimizer.step()
        else:  # one NaN/inf batch must not poison the weights
            nonfinite += 1
            logger.warning("step %d: gradient norm is %s; update skipped", step, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            history.append((step, float(np.mean(window))))
            logger.info("step %d: loss %.4f, lr %.3g, %.1f s", step, history[-1][1], scheduler.get_last_lr()[0],
                        time.perf_counter() - started)
            window = []

    _, _, train_loss_end, _ = evaluate(probe)
    val_done, val_prob, val_loss_end, val_bad = evaluate(val_rows)
    val_labels = labels[val_done].T
    threshold, accuracy_at_threshold = choose_tie_threshold(val_prob, *val_labels)
    skipped = sorted(skipped + [(int(i), r) for i, r in seen_bad.items()] + [(int(i), r) for i, r in val_bad])
    report = FitReport(out_dir, base, steps, len(train_rows), len({captions[i] for i in train_rows}), len(val_done),
                       len({captions[i] for i in val_rows}), train_loss_start, train_loss_end, val_loss_start,
                       val_loss_end, val_accuracy_start, pairwise_accuracy(val_prob, *val_labels), threshold,
                       accuracy_at_threshold, history, skipped, nonfinite, settings)

    with folder_written_beside(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        write_text_atomic(tmp / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report
