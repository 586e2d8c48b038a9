"""What a run leaves behind: `metrics.jsonl`, the final model in a diffusers-loadable folder, and its model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import Config, config_to_yaml
from ..files import folder_written_beside, write_text_atomic
from ..models.families import Family
from ..models.kohya import KOHYA_WEIGHTS
from ..models.loading import base_pipeline
from ..models.policy import LORA_WEIGHTS
from .safety import RunStopped


class MetricsLog:
    """One JSON object per logged step in `<output_dir>/metrics.jsonl`."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if path.exists():
            # a resumed run rewrites the steps after its checkpoint (and a line cut short by a crash)
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as err:  # a line cut short is rewritten when the run is resumed
            raise RunStopped(f"step {record.get('step')}: could not append to {self.path} ({err}); the checkpoints "
                             f"in {self.path.parent} are intact: resume with train.resume=latest once the cause is "
                             "fixed") from err


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def save_final(cfg: Config, policy, denoiser, output_dir: Path, family: Family, summary: dict) -> Path:
    """Write `<output_dir>/final`: LoRA weights for `pipeline.load_lora_weights`, or a full pipeline for
    `DiffusionPipeline.from_pretrained`, plus the resolved config and a model card."""
    final = output_dir / "final"
    with folder_written_beside(final) as tmp:
        if policy.is_lora:
            policy.save(tmp)
        else:
            # reload the untouched parts from the source so the saved pipeline keeps their original precision
            m = cfg.model
            pipeline = base_pipeline(m.pretrained, m.revision, m.variant, m.vae, **{family.denoiser: denoiser})
            pipeline.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_config.yaml").write_text(config_to_yaml(cfg))
        (tmp / "README.md").write_text(model_card(cfg, family, summary))
    return final


def model_card(cfg: Config, family: Family, summary: dict) -> str:
    kind = f"LoRA (rank {cfg.model.lora_rank})" if cfg.model.lora_rank is not None else \
        f"full {'UNet' if family.denoiser == 'unet' else family.denoiser} fine-tune"
    if cfg.model.lora_rank is not None:
        usage = (f'pipe = DiffusionPipeline.from_pretrained("{cfg.model.pretrained}")\n'
                 f'pipe.load_lora_weights("path/to/final", weight_name="{LORA_WEIGHTS}")')
    else:
        usage = 'pipe = DiffusionPipeline.from_pretrained("path/to/final")'
    tokens = cfg.model.max_sequence_length  # a model is sampled at the T5 length it was trained at
    lines = [
        "---",
        f"base_model: {cfg.model.pretrained}",
        "library_name: diffusers",
        f"tags: [diffusion-align, {cfg.method.name}, text-to-image, {'lora' if cfg.model.lora_rank else 'full'}]",
        "---",
        f"# {cfg.method.name.upper()} {kind} of {cfg.model.pretrained}",
        "",
        f"Trained with diffusion-align on `{cfg.data.path}` ({family} family).",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in summary.items()],
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        usage,
        "```",
        "",
        *([f"Trained on prompts of {tokens} T5 tokens (model.max_sequence_length): sample it so, "
           f"`pipe(prompt, max_sequence_length={tokens})` (`diffusion-align generate --max-sequence-length {tokens}`).",
           ""] if tokens is not None else []),
        *([f"For ComfyUI, AUTOMATIC1111 and Forge: `{KOHYA_WEIGHTS}` (their `models/Lora/` folder). "
           "`diffusion-align export` writes it in another dtype, or merges the LoRA into a whole pipeline or one "
           "checkpoint file (`--format single-file`).", ""]
          if cfg.model.lora_rank is not None and family.kohya_version is not None else []),
        *([f"`diffusion-align export RUN_FOLDER --format single-file --out FOLDER` writes the model as one checkpoint "
           f"file in its original layout, which loads in {family.single_file_loaders}.", ""]
          if cfg.model.lora_rank is None else []),
        "The full resolved training configuration is in `training_config.yaml`.",
    ]
    return "\n".join(lines) + "\n"
