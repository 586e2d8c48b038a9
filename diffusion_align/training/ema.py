"""An exponential moving average (EMA) of the trained weights (train.ema_decay, train.ema_every, train.ema_repeats),
as Flow-GRPO keeps one (flow_grpo/ema.py's EMAModuleWrapper: decay 0.9, every 8 updates) and saves and evaluates
with.

After the n-th weight update (n = 1, 2, ...: flow_grpo's global step, which it counts up before the EMA's step; an
update skipped for a non-finite gradient changed no weight and is not counted: n, and so the warm-up, follows the
weights' changes, not the batches):

    if (n + 1) % every == 0:   d = min((1 + n) / (10 + n), decay) ** repeats;   ema = d * ema + (1 - d) * weight

The warm-up min lets the early, large changes through. `repeats` is the rule applied that many times to the same
weights: Flow-GRPO's online scripts (train_sd3.py, train_sd3_fast.py, train_flux.py) step their EMA after every
micro-batch, with the update count unchanged between an update's micro-batches, so each EMA update applies the rule
train.gradient_accumulation_steps times (its DPO script steps it once per update).

The EMA starts as a copy of the initial trainable weights, in fp32 on each weight's device; of a sharded (FSDP2) weight,
its local shard, as a DTensor like the weight (under ZeRO-2 every process holds the whole updated weights after each
step, and so the whole EMA, as in data-parallel training). It only reads the live weights, which train on unaffected;
the run's final model is the EMA (`copy_to_weights`). A checkpoint writes the EMA as the run writes its weights
(`copied_in`, then the policy's save) and reads it back the same way (the policy's load, then `take_weights`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, named_weights: dict[str, torch.nn.Parameter], decay: float, every: int, repeats: int = 1):
        self.weights, self.decay, self.every, self.repeats, self.updates = named_weights, decay, every, repeats, 0
        self.average = {name: w.detach().float().clone() for name, w in named_weights.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Called after each weight update."""
        self.updates += 1
        n = self.updates
        if (n + 1) % self.every:
            return
        d = min((1 + n) / (10 + n), self.decay) ** self.repeats
        for name, weight in self.weights.items():
            average = self.average[name]
            average.add_((weight.detach().float() - average) * (1 - d))  # flow_grpo's form of the rule above

    @torch.no_grad()
    def copy_to_weights(self) -> None:
        for name, weight in self.weights.items():
            weight.copy_(self.average[name])

    @contextmanager
    def copied_in(self):
        """The weights hold the EMA inside the block, and their live values again after it, bit for bit (kept on
        the CPU meanwhile, so the accelerator needs no second copy)."""
        live = {name: weight.detach().to("cpu", copy=True) for name, weight in self.weights.items()}
        self.copy_to_weights()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, weight in self.weights.items():
                    weight.copy_(live[name])

    @torch.no_grad()
    def take_weights(self) -> None:
        """The EMA becomes the weights' current values (an EMA just loaded into them)."""
        for name, weight in self.weights.items():
            self.average[name].copy_(weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by weight name, and the count of updates under `updates` (no weight's name: those have
        dots); loading fills these very tensors in place where the loader does (torch.distributed.checkpoint)."""
        return {"updates": torch.tensor(self.updates), **self.average}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["updates"])
        for name, average in self.average.items():
            average.copy_(state[name])
