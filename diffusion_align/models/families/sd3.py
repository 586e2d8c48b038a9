"""Stable Diffusion 3 and 3.5: an MMDiT transformer (`SD3Transformer2DModel`) on 16-channel latents, trained by
rectified flow, reading three text encoders: CLIP-L and OpenCLIP-G (penultimate states and projected pooled
outputs) and T5-XXL (last states)."""

from __future__ import annotations

import torch

from .base import STABILITY_IMPLEMENTATION, Conditioning, TextStates, outside_autocast, tokenize
from .transformer import TransformerFamily


class SD3(TransformerFamily):
    name = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_pipeline = "StableDiffusion3Pipeline"
    # both streams' attention projections: diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (default)
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
    # T5 tokens: `StableDiffusion3Pipeline.__call__`'s and `encode_prompt`'s default; model.max_sequence_length
    # sets another (`with_max_sequence_length`)
    max_sequence_length = 256
    single_file_loaders = ("ComfyUI (Load Checkpoint; models/checkpoints/, SD3's text encoders beside it), diffusers "
                           "(SD3Transformer2DModel and AutoencoderKL.from_single_file), or, as a whole pipeline, "
                           "`diffusion-align convert FILE --config BASE`")

    @torch.no_grad()
    def encode_texts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> TextStates:
        """`StableDiffusion3Pipeline.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)`:
        each CLIP's penultimate states (both CLIPs padded to the first tokenizer's `model_max_length`, 77), side by
        side, zero-padded to T5's width and followed on the sequence axis by T5's last states (`max_sequence_length`
        tokens, `</s>` appended, no attention mask); pooled = both CLIPs' projected pooled outputs side by side.
        As in the pipeline, both CLIPs' states are cast to the first CLIP's dtype."""
        clip_l, clip_g, t5 = text_encoders
        device = clip_l.device
        clip_length = tokenizers[0].model_max_length
        with outside_autocast(device):
            states, pooled = [], []
            for tokenizer, encoder in zip(tokenizers[:2], (clip_l, clip_g)):
                out = encoder(tokenize(tokenizer, prompts, encoder.device, clip_length), output_hidden_states=True)
                states.append(out.hidden_states[-2].to(dtype=clip_l.dtype, device=device))
                pooled.append(out.text_embeds.to(device))
            t5_states = t5(tokenize(tokenizers[2], prompts, t5.device, self.max_sequence_length))[0]
            t5_states = t5_states.to(device)
            clip_states = torch.cat(states, dim=-1)
            clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
            return TextStates(torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1))

    def model_spec(self, denoiser_config: dict, prediction_type: str) -> tuple[str, str]:
        # kohya's sd-scripts append the model type they tell from the weights (library/sd3_utils.py,
        # analyze_state_dict_state): QK norm is SD3.5's, its second attention SD3.5-medium's
        if denoiser_config.get("qk_norm"):
            model_type = "3-5-medium" if denoiser_config.get("dual_attention_layers") else "3-5-large"
        else:
            model_type = "3-medium"
        return f"stable-diffusion-3-{model_type}", STABILITY_IMPLEMENTATION

    def input_shapes(self, denoiser_config: dict) -> tuple[int, int, int, int | None]:
        c = denoiser_config  # both CLIPs' 77 tokens, then T5's
        return c["in_channels"], 77 + self.max_sequence_length, c["joint_attention_dim"], c["pooled_projection_dim"]

    def latent_multiple(self, denoiser_config: dict) -> int:
        return denoiser_config["patch_size"]  # its patch embedding cuts the latents into patch_size^2 tokens (2)

    def max_latent_side(self, denoiser_config: dict) -> int | None:
        # its position table, cropped to the image's patches, covers pos_embed_max_size patches a side
        # (SD3.5-medium: 384, i.e. 6144 px; SD3-medium: 192; the class's default: 96); null makes them for any size
        size = denoiser_config.get("pos_embed_max_size", 96)
        return size * denoiser_config["patch_size"] if size else None

    def denoise(self, model, sample: torch.Tensor, timesteps, cond: Conditioning) -> torch.Tensor:
        # the transformer takes the scheduler's timestep (1000 s), as `StableDiffusion3Pipeline` passes it
        timesteps = torch.as_tensor(timesteps, device=sample.device).expand(len(sample))
        return model(hidden_states=sample, timestep=timesteps, encoder_hidden_states=cond.encoder_hidden_states,
                     pooled_projections=cond.pooled_projections, return_dict=False)[0]
