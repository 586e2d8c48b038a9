"""A batch of pairs -> what the UNet is given: latents sampled from the images' VAE posteriors, each row's
conditioning, and the pairs' draws (`likelihood.PairDraws`: prompt dropout, timestep, noise, posterior sample) made
by the family's forward process (`forward_process`: DDPM for the UNets, rectified flow for SD3 and FLUX).

The posteriors and text states come from the VAE and text encoders, or from a latent cache (`data.cache`); either
way the same draws make the same latents, which is what lets reference errors be computed before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError, TrainConfig
from ..data.cache import LatentCache
from ..models.conditioning import CaptionTruncation, Conditioning, TextStates, conditioning, encode_texts
from ..models.families import Family
from .flow import FlowNoising
from .likelihood import DDPMNoising, PairDraws, Posteriors, encode_posteriors
from .methods import Method


def _noises_by_flow(family: Family) -> bool:
    return family.training_scheduler == "FlowMatchEulerDiscreteScheduler"


def forward_process(family: Family, scheduler, train: TrainConfig) -> DDPMNoising | FlowNoising:
    """How `family` noises latents in training, with its training scheduler's settings and, on the flow families,
    `train`'s timestep sampling (the UNet families draw t uniformly: `check_timestep_sampling`)."""
    if not _noises_by_flow(family):
        return DDPMNoising(scheduler)
    return FlowNoising(scheduler, train.timestep_sampling or "logit_normal", train.logit_mean, train.logit_std)


def timestep_sampling_set(train: TrainConfig) -> bool:
    """Whether train.timestep_sampling, logit_mean or logit_std is set away from its default (the flow families' own
    training density)."""
    default = TrainConfig()
    return train.timestep_sampling is not None or (train.logit_mean, train.logit_std) != (default.logit_mean,
                                                                                          default.logit_std)


def check_timestep_sampling(family: Family, train: TrainConfig) -> None:
    """train.timestep_sampling, logit_mean and logit_std are the flow families' settings: an error on a UNet's."""
    if not _noises_by_flow(family) and timestep_sampling_set(train):
        raise ConfigError(f"train.timestep_sampling, logit_mean and logit_std are settings of the flow families "
                          f"(SD3, FLUX); {family} trains on timesteps drawn uniformly")


@dataclass
class PairInputs:
    family: Family
    method: Method
    seed: int
    prompt_dropout: float
    resolution: int
    process: DDPMNoising | FlowNoising
    device: torch.device
    vae: torch.nn.Module | None = None
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    cache: LatentCache | None = None
    text_dtype: torch.dtype = torch.float32  # cached states are cast to the dtype the text encoders would run in
    truncation: CaptionTruncation = field(default_factory=CaptionTruncation)  # the cache counts its own
    latents: str = "sample"  # data.latents: a posterior draw, or its mean
    guidance: float | None = None  # FLUX.1-dev's distilled guidance scale (`Family.training_guidance`)
    vae_batch: int | None = None  # images a VAE call (data.vae_encode_batch_size); None: all of a step's at once

    def posteriors(self, batch: dict, rows: int) -> Posteriors:
        if self.cache is None:
            return encode_posteriors(self.vae, batch["pixel_values"][:rows], self.vae_batch)
        mean, std = (batch[k][:rows].to(self.device, torch.float32) for k in ("mean", "std"))
        return Posteriors(mean, std, self.cache.key["scaling_factor"], self.cache.key.get("shift_factor", 0.0))

    def texts(self, prompts: list[str]) -> TextStates:
        if self.cache is None:  # each distinct text once: a pair's rows share their prompt
            distinct = list(dict.fromkeys(prompts))
            self.truncation.check(self.family, self.tokenizers, distinct)
            states = encode_texts(self.family, self.tokenizers, self.text_encoders, distinct)
            index = torch.tensor([distinct.index(p) for p in prompts], device=states.hidden.device)
            return TextStates(states.hidden[index], None if states.pooled is None else states.pooled[index])
        hidden, pooled = (None if x is None else x.to(self.device, self.text_dtype) for x in self.cache.texts(prompts))
        return TextStates(hidden, pooled)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, Conditioning, PairDraws]:
        """(latents in fp32, conditioning, draws) for the batch's rows in pair layout (winners only for one-row
        methods). Made in the encoders' and the cache's own dtypes, outside any enclosing autocast."""
        rows = self.method.rows_per_pair * len(batch["prompts"])
        with torch.autocast(self.device.type, enabled=False):
            posteriors = self.posteriors(batch, rows)
            draws = PairDraws.draw(self.seed, batch["keys"], tuple(posteriors.mean.shape[1:]),
                                   self.method.rows_per_pair, self.prompt_dropout, self.process)
            cond = conditioning(self.family, self.texts(self.method.row_prompts(batch, draws.keep)),
                                batch["original_sizes"][:rows], batch["crop_top_left"][:rows], self.resolution,
                                self.guidance)
            latents = posteriors.sample(draws.posterior) if self.latents == "sample" else posteriors.mode()
            return latents, cond, draws
