"""What the flow-matching transformer families (SD3 / SD3.5, FLUX.1) share: a pipeline folder recognised by its
transformer's class, rectified-flow training (`FlowMatchEulerDiscreteScheduler`'s forward process:
training/flow.py), and LoRA files in diffusers' format only."""

from __future__ import annotations

from .base import Conditioning, Family, TextStates


class TransformerFamily(Family):
    denoiser = "transformer"
    training_scheduler = "FlowMatchEulerDiscreteScheduler"
    kohya_version = kohya_architecture = None  # no kohya-layout LoRA files: ComfyUI maps diffusers' keys
    # their released single files (Stability AI's SD3.5, Black Forest Labs' FLUX.1) leave the text encoders out
    single_file_text_encoders = ()
    # SmPO publishes ReNoise inversion steps for SD1.5 and SDXL only: a flow run names its own (method.inversion_steps)
    inversion_steps = None
    # how its pipeline sets the sampling steps: by their count (StableDiffusion3Pipeline), or by the sigmas
    # linspace(1, 1 / steps, steps) (FluxPipeline); training/flow.py `FlowSDEPolicy`
    linspace_sigmas = False

    def matches(self, index: dict, denoiser_config: dict) -> bool:
        # the family's text-to-image pipeline and its img2img / inpaint / ControlNet ones share the transformer
        return (index.get("transformer") or [None, None])[1] == self.denoiser_class

    def conditioning(self, texts: TextStates, original_sizes=None, crop_top_left=None, resolution=None,
                     guidance: float | None = None) -> Conditioning:
        return Conditioning(texts.hidden, pooled_projections=texts.pooled, family=self)
