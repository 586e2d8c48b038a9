"""`diffusion-align export`: per-module rank and alpha patterns and rsLoRA reach the kohya alphas (checked with the
rule ComfyUI and AUTOMATIC1111 apply), dtypes, full fine-tunes, and the errors for sources it cannot export; the
single-file checkpoint (read back by diffusers' converter, and on the real architectures' names and shapes) and
`diffusion-align convert`, which undoes it."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FluxTransformer2DModel, StableDiffusionPipeline, \
    StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion_align.cli import main
from diffusion_align.config import config_to_yaml, load_config
from diffusion_align.files import EMA_FOLDER
from diffusion_align.models.export import DTYPES, find_source
from diffusion_align.models.policy import LORA_WEIGHTS, write_diffusers_lora
from diffusion_align.models.single_file import dequantized, single_file_state
from test_kohya import apply_kohya_rule, images

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def export(*args):
    main(["export", *map(str, args)])


@pytest.fixture(scope="module")
def patterned(tmp_path_factory, tiny_models):
    """A LoRA trained elsewhere: rsLoRA (scale alpha / sqrt(r)), rank 2 on attn2.to_k, alpha 3 on every to_v; saved
    as a diffusers file without a training config. Returns (folder, the UNet with the adapter)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"attn2.to_k": 2},
                                alpha_pattern={"to_v": 3}, target_modules=TARGETS, init_lora_weights="gaussian"))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    folder = tmp_path_factory.mktemp("patterned")
    write_diffusers_lora(unet, "sd", folder / LORA_WEIGHTS)
    return folder, unet.eval()


def test_rank_and_alpha_patterns_and_rslora_reach_the_kohya_alphas(tmp_path, tiny_models, patterned):
    folder, unet = patterned
    out = tmp_path / "k.safetensors"
    export(folder, "--format", "kohya", "--base", tiny_models["sd"], "--out", out)
    with safe_open(out, "pt") as f:
        alphas = {k.removesuffix(".alpha"): f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
        metadata = f.metadata()
    # hand-computed: rsLoRA scale = alpha / sqrt(r), kohya alpha = scale x r
    expected = {"to_v": 3 / math.sqrt(4) * 4, "attn2_to_k": 8 / math.sqrt(2) * 2, "other": 8 / math.sqrt(4) * 4}
    assert expected == {"to_v": 6.0, "attn2_to_k": pytest.approx(11.3137, abs=1e-4), "other": 16.0}
    for name, alpha in alphas.items():
        kind = "to_v" if name.endswith("_to_v") else "attn2_to_k" if name.endswith("attn2_to_k") else "other"
        assert alpha == pytest.approx(expected[kind], rel=1e-6), name
    assert sorted(alphas.values()).count(16.0) == 20  # 4 blocks x 8 modules, less 8 to_v and 4 attn2.to_k
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "16")  # the most common
    assert (metadata["diffusion_align.method"], metadata["modelspec.title"]) == ("unknown", folder.name)

    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    base = images(pipe, "sd")
    pipe.unet = unet
    trained = images(pipe, "sd")
    assert abs(trained - base).max() > 1e-2
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    assert apply_kohya_rule(pipe.unet, out) == 32
    assert abs(images(pipe, "sd") - trained).max() < 1e-4, "the kohya alphas give the trained scale per module"
    # (diffusers 0.42's own kohya loader misreads alphas that differ between modules: its alpha_pattern keeps
    # attention-processor names that match no module; in diffusers the diffusers file is the one to load)
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    pipe.load_lora_weights(folder, weight_name=LORA_WEIGHTS)
    assert abs(images(pipe, "sd") - trained).max() < 1e-4, "the diffusers file keeps the patterns and rsLoRA"


@pytest.mark.parametrize("fmt, dtype", [("kohya", "fp16"), ("diffusers", "bf16")])
def test_lora_dtypes(tmp_path, tiny_models, patterned, fmt, dtype):
    folder, _ = patterned
    export(folder, "--format", fmt, "--dtype", dtype, "--base", tiny_models["sd"], "--out", tmp_path / "out")
    (written,) = (tmp_path / "out").iterdir()
    tensors = load_file(written)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {t.dtype for k, t in tensors.items() if k.endswith("weight")} == {want}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} <= {torch.float32}
    if fmt == "diffusers":  # the settings that restore the scale travel with it
        pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
        pipe.load_lora_weights(tmp_path / "out")
        (config,) = pipe.unet.peft_config.values()
        assert (config.use_rslora, config.rank_pattern, config.alpha_pattern) == (True, {"attn2.to_k": 2},
                                                                                  {"to_v": 3})


def test_a_base_whose_scheduler_config_predates_prediction_type_exports_as_epsilon(tmp_path, tiny_models, patterned):
    """SD1.5's own scheduler_config.json (diffusers 0.6.0, PNDMScheduler) has no prediction_type: the kohya file
    takes the scheduler's default, epsilon, as training does."""
    base = tmp_path / "sd15-like"
    shutil.copytree(tiny_models["sd"], base)
    config_file = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.pop("prediction_type", None)
    config_file.write_text(json.dumps({**config, "_class_name": "PNDMScheduler", "skip_prk_steps": True}))
    out = tmp_path / "k.safetensors"
    export(patterned[0], "--format", "kohya", "--base", base, "--out", out)
    with safe_open(out, "pt") as f:
        assert f.metadata()["ss_v_parameterization"] == "False"


def test_full_fine_tune_exports_as_a_merged_pipeline(tmp_path, tiny_models, capsys):
    """A full fine-tune's checkpoint holds unet/ only; merged writes it with the rest of the base pipeline."""
    run = tmp_path / "run"
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd"], subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias += 0.25  # "trained"
    unet.save_pretrained(run / "checkpoint-2" / "unet")
    run.joinpath("config.yaml").write_text(config_to_yaml(load_config(None, [
        f"model.pretrained={tiny_models['sd']}", "model.lora_rank=null", f"train.output_dir={run}"])))
    with pytest.raises(SystemExit):
        export(run, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert "holds a full fine-tune, not a LoRA" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # onto another family's base: it used to be written with the wrong UNet
        export(run, "--format", "merged", "--base", tiny_models["sd2"], "--out", tmp_path / "wrong")
    assert "another model family" in capsys.readouterr().err and not (tmp_path / "wrong").exists()
    with pytest.raises(SystemExit):  # the run folder itself: the pipeline would replace its checkpoints
        export(run, "--format", "merged", "--out", run, "--overwrite")
    assert "holds the weights exported" in capsys.readouterr().err and (run / "checkpoint-2" / "unet").is_dir()
    export(run, "--format", "merged", "--dtype", "fp16", "--out", tmp_path / "merged")
    weights = load_file(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert torch.equal(weights["conv_out.bias"], unet.conv_out.bias.detach().half())
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert pipe.text_encoder.dtype == torch.float32 and pipe.unet.conv_out.bias.sum() != 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_transformer_full_fine_tune_exports_as_a_merged_pipeline(tmp_path, tiny_flow_models, family):
    """A transformer's full fine-tune (transformer/ in its checkpoint) is written with the rest of its base, and
    the merged pipeline holds the trained weights, not the base's."""
    run = tmp_path / "run"
    base = DiffusionPipeline.from_pretrained(tiny_flow_models[family])
    transformer = base.transformer
    with torch.no_grad():
        transformer.proj_out.bias += 0.25  # "trained"
    transformer.save_pretrained(run / "checkpoint-2" / "transformer")
    run.joinpath("config.yaml").write_text(config_to_yaml(load_config(None, [
        f"model.pretrained={tiny_flow_models[family]}", "model.lora_rank=null", f"train.output_dir={run}"])))
    export(run, "--format", "merged", "--out", tmp_path / "merged")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert type(merged) is type(base) and torch.equal(merged.transformer.proj_out.bias, transformer.proj_out.bias)
    assert all(torch.equal(a, b) for a, b in zip(merged.vae.state_dict().values(), base.vae.state_dict().values()))


def test_a_unet_lora_beside_the_attention_loads_whole(tmp_path, tiny_models, capsys):
    """A UNet LoRA on proj_in / proj_out / ff too: diffusers' naming has the attention projections alone and its
    loader reads a file in the naming of its first key (proj_in's), so a file mixing the two loaded the attention's
    adapters nowhere. Written in peft's names throughout, every module loads, to the trained outputs; a mixed file
    (as written before) is refused by export and generate, not loaded in part."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=[*TARGETS, "proj_in", "proj_out", "ff.net.2"],
                                init_lora_weights="gaussian"))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    folder = tmp_path / "lora"
    folder.mkdir()
    write_diffusers_lora(unet, "sd", folder / LORA_WEIGHTS)
    keys = list(load_file(folder / LORA_WEIGHTS))
    assert not any(".lora.down." in k for k in keys) and any("to_q.lora_A" in k for k in keys)
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    pipe.load_lora_weights(folder)
    adapted = sum(1 for m in pipe.unet.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert adapted == sum(k.endswith("lora_A.weight") for k in keys) > 16
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, text).sample, unet.eval()(x, t, text).sample)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, mixed / LORA_WEIGHTS)
    with pytest.raises(SystemExit):
        export(mixed, "--format", "kohya", "--base", tiny_models["sd"], "--out", tmp_path / "k.safetensors")
    assert "mix diffusers' attention names (.lora.down / .lora.up) with peft's" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_models["sd"]), "--lora", str(mixed), "--prompts",
              str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "images")])
    assert "diffusers would load only part of it" in capsys.readouterr().err
    # a text encoder's peft keys beside a UNet's diffusers ones: each part is read under its own prefix, whole
    from diffusion_align.models.policy import check_lora_naming
    attention = {k: v for k, v in state.items() if ".lora_" not in k.replace(".lora.", "")}
    assert attention and all(".lora.down." in k or ".lora.up." in k for k in attention)
    save_file({**{f"unet.{k}": v.contiguous() for k, v in attention.items()},
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              mixed / LORA_WEIGHTS)
    check_lora_naming(mixed / LORA_WEIGHTS)


def test_what_cannot_be_exported_is_named(tmp_path, tiny_models, patterned, capsys):
    folder, _ = patterned

    def error(*args):
        with pytest.raises(SystemExit) as exit_info:
            export(*args)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    out = tmp_path / "k.safetensors"
    assert "no such folder" in error(tmp_path / "missing", "--format", "kohya", "--out", out)
    (tmp_path / "empty").mkdir()
    assert "holds no trained weights" in error(tmp_path / "empty", "--format", "kohya", "--out", out)
    assert "pass it with --base" in error(folder, "--format", "kohya", "--out", out)
    # a base of another family: refused before any weights load, in one line naming both widths (issue 24)
    for family, width in (("sd2", 64), ("sdxl", 96)):
        message = error(folder, "--format", "merged", "--base", tiny_models[family], "--out", tmp_path / "m")
        assert message.count("\n") == 1 and str(folder) in message and "another model family" in message
        assert f"reads 32-wide text features, but the UNet of --base {tiny_models[family]} reads {width}" in message
    stray = tmp_path / "stray"  # modules the base does not have: diffusers would only log them
    stray.mkdir()
    with safe_open(folder / LORA_WEIGHTS, "pt") as f:
        save_file({k.replace("mid_block.", "middle_block."): f.get_tensor(k) for k in f.keys()},
                  stray / LORA_WEIGHTS, f.metadata())
    assert "32 UNet LoRA modules, but 24 of them loaded" in error(stray, "--format", "merged", "--base",
                                                                  tiny_models["sd"], "--out", tmp_path / "m")
    with safe_open(folder / LORA_WEIGHTS, "pt") as f:  # peft's names without diffusers' unet. prefix
        save_file({k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}, stray / LORA_WEIGHTS, f.metadata())
    assert "holds no UNet LoRA weights" in error(stray, "--format", "kohya", "--base", tiny_models["sd"], "--out", out)
    assert "a whole diffusers pipeline, a folder" in error(folder, "--format", "merged", "--base", tiny_models["sd"],
                                                          "--out", tmp_path / "m.safetensors")
    assert "--format comfyui writes SD3 and FLUX LoRAs; ComfyUI loads a sd LoRA in the kohya layout" in error(
        folder, "--format", "comfyui", "--base", tiny_models["sd"], "--out", out)
    assert not out.exists() and not (tmp_path / "m").exists()
    export(folder, "--format", "kohya", "--base", tiny_models["sd"], "--out", out)
    assert "already exists; pass --overwrite" in error(folder, "--format", "kohya", "--base", tiny_models["sd"],
                                                       "--out", out)


def test_a_checkpoint_with_an_ema_exports_the_ema_unless_the_live_weights_are_asked_for(tmp_path, tiny_models,
                                                                                       tiny_pairs, caplog):
    """A run stopped after its checkpoint (no final/) exports the model it would have ended with, the EMA: the same
    LoRA as its final/ had, bit for bit; --live-weights, the weights training resumes from."""
    from test_train import run
    caplog.set_level("INFO", logger="diffusion_align")
    result = run(tmp_path, tiny_models["sd"], tiny_pairs, "train.ema_decay=0.9", "train.max_steps=2",
                 "train.checkpoint_every=2", "train.lr=1e-3")
    run_dir, checkpoint = result.final_dir.parent, result.final_dir.parent / "checkpoint-2"
    final = load_file(result.final_dir / LORA_WEIGHTS)
    # with its final/ (the EMA): --live-weights gives the newest checkpoint's (it gave final/'s EMA), and final/
    # itself has none to give
    export(run_dir, "--format", "diffusers", "--out", tmp_path / "live-beside-final", "--live-weights")
    with pytest.raises(SystemExit):
        export(result.final_dir, "--format", "diffusers", "--out", tmp_path / "none", "--live-weights")
    beside_final = load_file(tmp_path / "live-beside-final" / LORA_WEIGHTS)
    shutil.rmtree(result.final_dir)
    export(run_dir, "--format", "diffusers", "--out", tmp_path / "ema")
    export(run_dir, "--format", "diffusers", "--out", tmp_path / "live", "--live-weights")
    ema, live = load_file(tmp_path / "ema" / LORA_WEIGHTS), load_file(tmp_path / "live" / LORA_WEIGHTS)
    assert ema.keys() == final.keys() and all(torch.equal(ema[k], final[k]) for k in final)
    checkpoint_live = load_file(checkpoint / LORA_WEIGHTS)
    assert live.keys() == final.keys() and all(torch.equal(live[k], checkpoint_live[k]) for k in live)
    assert all(torch.equal(beside_final[k], checkpoint_live[k]) for k in live)
    export(checkpoint, "--format", "diffusers", "--out", tmp_path / "checkpoint-live", "--live-weights")
    named = load_file(tmp_path / "checkpoint-live" / LORA_WEIGHTS)  # a checkpoint named: its own live weights
    assert all(torch.equal(named[k], checkpoint_live[k]) for k in live)
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    source = find_source(checkpoint)  # the checkpoint named, and the config is its copy of the run's
    assert (source.folder, source.base, source.method) == (checkpoint / EMA_FOLDER, str(tiny_models["sd"]), "dpo")
    assert f"{checkpoint / EMA_FOLDER}: the EMA of the run's weights" in caplog.text


def test_base_replaces_the_configs_base_with_its_revision_and_variant(tmp_path, tiny_models, patterned):
    """A run trained on an fp16 variant of a hub base, exported against a local copy saved without variants: the
    config's model.variant was kept for --base, whose loading then failed on files it does not have."""
    folder = tmp_path / "run"
    shutil.copytree(patterned[0], folder)
    (folder / "config.yaml").write_text("model:\n  pretrained: org/base\n  revision: abc123\n  variant: fp16\n")
    source = find_source(folder, base=str(tiny_models["sd"]))
    assert (source.base, source.revision, source.variant) == (str(tiny_models["sd"]), None, None)
    assert (find_source(folder).revision, find_source(folder).variant) == ("abc123", "fp16")
    export(folder, "--format", "diffusers", "--base", tiny_models["sd"], "--out", tmp_path / "out")
    assert (tmp_path / "out" / LORA_WEIGHTS).is_file()


def test_the_command_line_offers_every_format_and_dtype():
    """cli.py spells them out so that --help imports nothing heavy; they must stay those export.py knows."""
    from diffusion_align.cli import build_parser
    from diffusion_align.models.export import DTYPES, FORMATS
    parser = build_parser()
    export_parser = parser._subparsers._group_actions[0].choices["export"]
    choices = {a.dest: a.choices for a in export_parser._actions if a.choices}
    assert tuple(choices["format"]) == FORMATS and set(choices["dtype"]) == set(DTYPES)


@pytest.fixture(scope="module")
def flux_lora_run(tmp_path_factory, tiny_flow_models, tiny_pairs):
    from test_train import run
    return run(tmp_path_factory.mktemp("flux-lora"), tiny_flow_models["flux"], tiny_pairs, "train.lr=3e-2")


def test_a_flux_lora_exports_as_diffusers_and_merged_and_is_refused_as_kohya(tmp_path, tiny_models, flux_lora_run,
                                                                           capsys):
    """The transformer families' LoRA: the diffusers file (`transformer.` keys, cast) and the merged pipeline, whose
    transformer computes what the trained one does; kohya's layout and a UNet base are refused in one line."""
    from test_flow_train import probe
    run_dir = flux_lora_run.final_dir.parent
    export(run_dir, "--format", "diffusers", "--dtype", "bf16", "--out", tmp_path / "lora")
    tensors = load_file(tmp_path / "lora" / LORA_WEIGHTS)
    assert tensors and all(k.startswith("transformer.") and v.dtype == torch.bfloat16 for k, v in tensors.items())
    export(run_dir, "--format", "merged", "--out", tmp_path / "merged")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.transformer.named_parameters())
    assert torch.allclose(probe(merged.transformer, "flux"), probe(flux_lora_run.denoiser, "flux"), atol=1e-4)
    for args, message in (
            (["--format", "kohya", "--out", tmp_path / "k.safetensors"],
             "no kohya-layout file is written for flux LoRAs; for ComfyUI use --format comfyui"),
            (["--format", "merged", "--base", tiny_models["sd"], "--out", tmp_path / "wrong"],
             f"holds a trained transformer, but --base {tiny_models['sd']} is a sd pipeline, whose denoiser is a "
             "unet")):
        with pytest.raises(SystemExit) as exit_info:
            export(run_dir, *args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_merged_export_keeps_each_part_of_a_bf16_base_in_bf16(tmp_path, tiny_flow_models, flux_lora_run):
    """diffusers loads its own models in fp32 whatever they were saved in: a LoRA merged into bf16 FLUX.1-dev held
    its transformer in 48 GB and wrote it, and the VAE, in fp32 beside bf16 text encoders, twice the base's size."""
    base = tmp_path / "base-bf16"
    DiffusionPipeline.from_pretrained(tiny_flow_models["flux"], dtype=torch.bfloat16).save_pretrained(base)
    export(flux_lora_run.final_dir.parent, "--format", "merged", "--base", base, "--out", tmp_path / "merged")
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        [weights] = (tmp_path / "merged" / part).glob("*.safetensors")
        assert {t.dtype for t in load_file(weights).values()} == {torch.bfloat16}, part
    merged = load_file(tmp_path / "merged" / "transformer" / "diffusion_pytorch_model.safetensors")
    stored = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    changed = {k.removesuffix(".weight") for k in stored if not torch.equal(merged[k], stored[k])}
    adapted = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0]
               for k in load_file(flux_lora_run.final_dir / LORA_WEIGHTS)}
    assert changed == adapted  # the LoRA fused into the bf16 weights, and nothing else moved

    # --dtype fp32: fused in fp32, as the LoRA computes at run time (fused in bf16, then cast, updates under half a
    # bf16 step of a weight were lost)
    export(flux_lora_run.final_dir.parent, "--format", "merged", "--base", base, "--dtype", "fp32", "--out",
           tmp_path / "merged-fp32")
    exact = FluxTransformer2DModel.from_pretrained(base / "transformer", dtype=torch.float32)
    exact.load_lora_adapter(flux_lora_run.final_dir, weight_name=LORA_WEIGHTS, prefix="transformer")
    exact.fuse_lora()
    exact.unload_lora()
    merged = load_file(tmp_path / "merged-fp32" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(merged[k], v) for k, v in exact.state_dict().items())


def test_a_lora_with_text_encoder_weights_is_refused_not_cut(tmp_path, tiny_flow_models, flux_lora_run, capsys):
    """A file from diffusers' DreamBooth scripts holds text-encoder LoRAs too: every export left them out in silence,
    and the merged pipeline computed other images than the file loaded with load_lora_weights."""
    lora = tmp_path / "lora"
    shutil.copytree(flux_lora_run.final_dir, lora)
    text_encoder_key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = load_file(lora / LORA_WEIGHTS) | {text_encoder_key: torch.zeros(4, 32)}
    save_file(tensors, lora / LORA_WEIGHTS)
    for fmt in ("merged", "diffusers"):
        with pytest.raises(SystemExit) as exit_info:
            export(lora, "--format", fmt, "--base", tiny_flow_models["flux"], "--out", tmp_path / fmt)
        assert exit_info.value.code == 2 and ("holds LoRA weights of text_encoder too, which are not exported (only "
                                              "the transformer's are)") in capsys.readouterr().err


def test_the_base_pipeline_keeps_a_variants_and_a_replacement_vaes_dtypes(tmp_path, tiny_models):
    """A component without the variant's files (here the VAE) is loaded from its others, and so is its dtype read;
    model.vae's replacement VAE keeps its own (both were fp32)."""
    from diffusion_align.models.loading import base_pipeline, component_digest, load_components
    base = tmp_path / "base"
    DiffusionPipeline.from_pretrained(tiny_models["sd"], dtype=torch.bfloat16).save_pretrained(base)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=torch.float16)
    unet.save_pretrained(base / "unet", variant="fp16")
    vae = DiffusionPipeline.from_pretrained(tiny_models["sd"], dtype=torch.bfloat16).vae
    vae.save_pretrained(tmp_path / "vae")
    pipe = base_pipeline(str(base), variant="fp16")
    assert (pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (torch.float16, torch.bfloat16,
                                                                         torch.bfloat16)
    DiffusionPipeline.from_pretrained(tiny_models["sd"]).vae.save_pretrained(base / "vae")  # fp32 now
    assert base_pipeline(str(base), variant="fp16", replacement_vae=str(tmp_path / "vae")).vae.dtype == torch.bfloat16
    # training loads such a base too (it failed at the VAE, "no file named diffusion_pytorch_model.fp16.bin"), and
    # keys what it derives from a part by the weights it reads
    parts = load_components(str(base), variant="fp16")  # in fp32, diffusers' default
    assert torch.equal(parts.denoiser.conv_in.weight, unet.conv_in.weight.float()) and len(parts.text_encoders) == 1
    before = component_digest(str(base), "vae", variant="fp16")
    AutoencoderKL.from_pretrained(tiny_models["sd"], subfolder="vae").half().save_pretrained(base / "vae")
    assert component_digest(str(base), "vae", variant="fp16") != before


def apply_comfyui_diffusers_rule(transformer, path):
    """What ComfyUI does with a diffusers-keyed transformer LoRA (`transformer.<module>.lora_A.weight`): W += scale x
    lora_B @ lora_A, the scale alpha / rank where the file has a `<module>.alpha` tensor, else 1
    (comfy/weight_adapter/lora.py). Returns the modules changed."""
    tensors = load_file(path)
    names = [k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")]
    with torch.no_grad():
        for name in names:
            down, up = tensors[f"{name}.lora_A.weight"].float(), tensors[f"{name}.lora_B.weight"].float()
            alpha = tensors.get(f"{name}.alpha")
            scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
            transformer.get_submodule(name.removeprefix("transformer.")).weight += scale * (up @ down)
    return len(names)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_transformer_lora_exports_for_comfyui_at_its_trained_scale(tmp_path, tiny_flow_models, tiny_pairs, family):
    """Trained at alpha = 2 x rank (the SD3.5 recipes' scale 2): the comfyui file, applied as ComfyUI applies a
    diffusers-keyed file (no alpha: scale 1), and loaded by diffusers, gives the trained transformer's outputs; the
    diffusers file applied the same way does not (it keeps alpha in its metadata, which ComfyUI does not read)."""
    from test_flow_train import probe
    from test_train import run
    from diffusion_align.models.export import COMFYUI_WEIGHTS
    model = tiny_flow_models[family]
    result = run(tmp_path, model, tiny_pairs, "train.lr=3e-2", "model.lora_rank=4", "model.lora_alpha=8")
    trained = probe(result.denoiser, family)
    export(tmp_path / "run", "--format", "comfyui", "--out", tmp_path / "comfy")
    tensors = load_file(tmp_path / "comfy" / COMFYUI_WEIGHTS)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    for file, matches in ((tmp_path / "comfy" / COMFYUI_WEIGHTS, True), (result.final_dir / LORA_WEIGHTS, False)):
        transformer = DiffusionPipeline.from_pretrained(model).transformer
        assert apply_comfyui_diffusers_rule(transformer, file) == len(tensors) // 2
        assert torch.allclose(probe(transformer, family), trained, atol=1e-5) is matches, file.name
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(tmp_path / "comfy", weight_name=COMFYUI_WEIGHTS)
    assert torch.allclose(probe(pipe.transformer, family), trained, atol=1e-5)


def _full_fine_tune_run(tmp_path, base, denoiser="unet"):
    """A run folder whose checkpoint holds a "trained" denoiser (every weight moved) and the config naming `base`."""
    run = tmp_path / "run"
    unet = DiffusionPipeline.from_pretrained(base).components[denoiser]
    torch.manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():
            param += 0.01 * torch.randn_like(param)
    unet.save_pretrained(run / "checkpoint-2" / denoiser)
    run.joinpath("config.yaml").write_text(config_to_yaml(load_config(None, [
        f"model.pretrained={base}", "model.lora_rank=null", f"train.output_dir={run}"])))
    return run, unet


@pytest.mark.parametrize("family, architecture, prediction", [
    ("sd", "stable-diffusion-v1", "epsilon"),
    ("sd2", "stable-diffusion-v2-768-v", "v"),  # the tiny SD2 predicts v, as SD2.1 768 does
    ("sdxl", "stable-diffusion-xl-v1-base", "epsilon"),
])
def test_a_full_fine_tune_exports_as_one_checkpoint_that_diffusers_single_file_loader_reads_back(
        tmp_path, tiny_models, capsys, family, architecture, prediction):
    """diffusers' own converter of original checkpoints (`from_single_file`, written against the released SD1.5,
    SD2.1 and SDXL files) reads the file back to the trained UNet and the base's VAE and text encoders, bit for bit:
    every weight written once, under the name and in the shape that converter looks for."""
    run, unet = _full_fine_tune_run(tmp_path, tiny_models[family])
    export(run, "--format", "single-file", "--out", tmp_path / "out")
    assert "load it in ComfyUI (Load Checkpoint" in capsys.readouterr().out
    path = tmp_path / "out" / "run.safetensors"
    with safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    assert (metadata["modelspec.architecture"], metadata["modelspec.prediction_type"]) == (architecture, prediction)
    assert ("v_pred" in keys) == (prediction == "v") and "ztsnr" not in keys  # the markers ComfyUI reads

    base = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    loaded = pipeline_class.from_single_file(path, config=str(tiny_models[family]), local_files_only=True)
    expected = {"unet": unet, **{name: getattr(base, name) for name in ("vae", "text_encoder", "text_encoder_2")
                                 if getattr(base, name, None) is not None}}
    for name, model in expected.items():
        want, got = model.state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    # nothing twice, and for SD2.x the 24th of ViT-H's layers (an identity: test_sd2s_missing_layer_...)
    identity = sum(t.numel() for k, t in base.text_encoder.state_dict().items() if ".layers.0." in k)
    assert numel == sum(t.numel() for m in expected.values() for t in m.state_dict().values()) + (
        identity if family == "sd2" else 0)


def test_a_lora_exports_as_one_checkpoint_with_the_merged_pipelines_weights(tmp_path, tiny_models, patterned):
    folder, _ = patterned
    export(folder, "--format", "merged", "--base", tiny_models["sd"], "--out", tmp_path / "merged")
    export(folder, "--format", "single-file", "--dtype", "fp16", "--base", tiny_models["sd"],
           "--out", tmp_path / "model.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(tmp_path / "model.safetensors", config=str(tiny_models["sd"]),
                                                      local_files_only=True)
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(merged, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(want[k].half(), got[k].half()) for k in want), name
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.float16}
    to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    base_unet = UNet2DConditionModel.from_pretrained(tiny_models["sd"], subfolder="unet")
    assert not torch.equal(merged.unet.state_dict()[to_k], base_unet.state_dict()[to_k]), "the LoRA is fused in"


def test_an_sd3_full_fine_tune_exports_as_stabilitys_file_and_converts_back(tmp_path, tiny_flow_models, tiny_models,
                                                                           capsys, monkeypatch):
    """SD3 as Stability AI releases SD3.5: the MMDiT under model.diffusion_model. and the VAE, no text encoder (none
    is loaded to write it). diffusers' converters read back the trained transformer and the base's VAE bit for bit,
    every weight written once; convert puts the base's text encoders beside them, in the file's dtype, and needs a
    --config to take them from."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from diffusion_align.models import export as export_module
    base = tiny_flow_models["sd3"]
    run, transformer = _full_fine_tune_run(tmp_path, base, "transformer")
    loaded = []
    monkeypatch.setattr(export_module, "single_file_state", lambda pipeline, family: loaded.append(
        [name for name, part in pipeline.components.items() if part is not None])
        or single_file_state(pipeline, family))
    export(run, "--format", "single-file", "--out", tmp_path / "sd3.safetensors")
    assert not any(name.startswith("text_encoder") for name in loaded[0]) and {"transformer", "vae"} <= set(loaded[0])
    assert "load it in ComfyUI (Load Checkpoint; models/checkpoints/, SD3's text encoders beside it)" in (
        capsys.readouterr().out)
    path = tmp_path / "sd3.safetensors"
    with safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-3-5-medium"  # its layout: QK norm, attn2
    assert "modelspec.prediction_type" not in metadata
    assert all(k.startswith(("model.diffusion_model.joint_blocks.", "first_stage_model.")) for k in keys
               if "blocks" in k)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    expected = {"transformer": transformer, "vae": vae}
    read = {"transformer": SD3Transformer2DModel.from_single_file(path, config=str(base), subfolder="transformer",
                                                                  local_files_only=True),
            "vae": AutoencoderKL.from_single_file(path, config=str(base), subfolder="vae", local_files_only=True)}
    for name, model in expected.items():
        want, got = model.state_dict(), read[name].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert numel == sum(t.numel() for m in expected.values() for t in m.state_dict().values())

    export(run, "--format", "single-file", "--dtype", "fp16", "--out", tmp_path / "half.safetensors", "--overwrite")
    main(["convert", str(tmp_path / "half.safetensors"), "--out", str(tmp_path / "converted"), "--config", str(base)])
    converted = DiffusionPipeline.from_pretrained(tmp_path / "converted", torch_dtype=torch.float16)
    for folder in ("transformer", "vae", "text_encoder"):  # (T5 keeps its `wo` layers in fp32, as transformers does)
        weights = next((tmp_path / "converted" / folder).glob("*.safetensors"))
        assert {t.dtype for t in load_file(weights).values()} == {torch.float16}, folder
    base_pipe = DiffusionPipeline.from_pretrained(base)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        want = (transformer if name == "transformer" else getattr(base_pipe, name)).state_dict()
        got = getattr(converted, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k].half(), got[k].half()) for k in want), name
    # the MMDiT without the prefix, and without the VAE (the --config's is taken)
    save_file({k.removeprefix("model.diffusion_model."): t for k, t in load_file(tmp_path / "half.safetensors").items()
               if k.startswith("model.")}, tmp_path / "bare.safetensors")
    main(["convert", str(tmp_path / "bare.safetensors"), "--out", str(tmp_path / "bare"), "--config", str(base)])
    bare = DiffusionPipeline.from_pretrained(tmp_path / "bare", torch_dtype=torch.float16)
    assert all(torch.equal(t, bare.transformer.state_dict()[k]) for k, t in converted.transformer.state_dict().items())
    assert all(torch.equal(t.half(), bare.vae.state_dict()[k]) for k, t in base_pipe.vae.state_dict().items())
    capsys.readouterr()
    for config, message in ((None, "holds a sd3 transformer without the text encoders: give the pipeline they come "
                                   "from with --config"),
                            (tiny_flow_models["flux"], "is a flux pipeline, but"),
                            (tiny_models["sdxl"], "is a sdxl pipeline, but")):
        with pytest.raises(SystemExit):
            main(["convert", str(path), "--out", str(tmp_path / "out"), *(["--config", str(config)] if config else [])])
        assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_flux_lora_and_a_flux_full_fine_tune_export_as_the_transformer_alone(tmp_path, tiny_flow_models,
                                                                             flux_lora_run, monkeypatch):
    """Neither the VAE nor a text encoder is loaded to write a FLUX file, with a replacement VAE configured too; the
    file holds the merged transformer (the LoRA fused in) in Black Forest Labs' names."""
    from diffusion_align.models import export as export_module
    from diffusion_align.models.transformer_layouts import flux_to_original
    loaded = []
    monkeypatch.setattr(export_module, "single_file_state", lambda pipeline, family: loaded.append(
        {name for name, part in pipeline.components.items() if part is not None})
        or single_file_state(pipeline, family))
    export(flux_lora_run.final_dir.parent, "--format", "merged", "--out", tmp_path / "merged")
    export(flux_lora_run.final_dir.parent, "--format", "single-file", "--out", tmp_path / "lora.safetensors")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged").transformer.state_dict()
    written = load_file(tmp_path / "lora.safetensors")
    assert written.keys() == flux_to_original(merged).keys()
    assert all(torch.allclose(written[k], t) for k, t in flux_to_original(merged).items())
    run, transformer = _full_fine_tune_run(tmp_path, tiny_flow_models["flux"], "transformer")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("vae: null", f"vae: {tiny_flow_models['flux'] / 'vae'}"))
    assert f"vae: {tiny_flow_models['flux'] / 'vae'}" in config.read_text()
    export(run, "--format", "single-file", "--out", tmp_path / "full.safetensors")
    assert load_file(tmp_path / "full.safetensors").keys() == flux_to_original(transformer.state_dict()).keys()
    assert loaded[0] == loaded[1] == {"transformer", "scheduler", "tokenizer", "tokenizer_2"}


def test_what_convert_cannot_read_of_an_sd3_or_flux_file_is_named(tmp_path, tiny_flow_models, capsys, caplog):
    """A transformer of another variant than the --config's (SD3 with QK norm against one without; FLUX.1-dev's
    guidance against -schnell), a FLUX transformer of another width than FLUX.1's, and a model built on FLUX's blocks;
    an SD3 file's own text encoders are said not to be read."""
    def config_with(family, **settings):
        folder = tmp_path / f"{family}-{'-'.join(settings)}"
        shutil.copytree(tiny_flow_models[family], folder, dirs_exist_ok=True)
        path = folder / "transformer" / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | settings))
        return folder

    for family in ("sd3", "flux"):
        export(tiny_flow_models[family], "--format", "single-file", "--out", tmp_path / f"{family}.safetensors")
    sd3, flux = load_file(tmp_path / "sd3.safetensors"), load_file(tmp_path / "flux.safetensors")
    save_file({k: t for k, t in flux.items() if not k.startswith("time_in.")}, tmp_path / "chroma.safetensors")
    cases = [("sd3", config_with("sd3", qk_norm=None), "is not the sd3 transformer --config"),
             ("sd3", config_with("sd3", qk_norm=None), "it has joint_blocks.0.context_block.attn.ln_k.weight, "),
             ("flux", config_with("flux", guidance_embeds=False), "it has guidance_in.in_layer.bias, "
                                                                  "guidance_in.in_layer.weight, guidance_in.out_layer."
                                                                  "bias and 1 more, which the config's lacks"),
             ("flux", config_with("flux", num_single_layers=2), "the file lacks single_blocks.1."),
             ("flux", tiny_flow_models["flux"], "FLUX transformer is 32 wide: diffusers' converter reads FLUX.1's "
                                                "width, 3072, only"),
             ("chroma", tiny_flow_models["flux"], "has double_blocks.* weights but not time_in.in_layer.weight")]
    for name, config, message in cases:
        with pytest.raises(SystemExit):
            main(["convert", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / "out"), "--config",
                  str(config)])
        assert message in capsys.readouterr().err and not (tmp_path / "out").exists(), message
    # text encoders in float8 (as Stability AI's sd3_medium_incl_clips_t5xxlfp8 holds T5) are not read, so not refused
    save_file(sd3 | {"text_encoders.t5xxl.transformer.shared.weight": torch.ones(8, 4).to(torch.float8_e4m3fn)},
              tmp_path / "all-in-one.safetensors")
    main(["convert", str(tmp_path / "all-in-one.safetensors"), "--out", str(tmp_path / "out"), "--config",
          str(tiny_flow_models["sd3"])])
    assert "holds text encoders (or a VAE under vae.) too; they are not read" in caplog.text


def test_a_float8_weight_reads_as_bf16_exactly_and_a_scaled_one_times_its_scale():
    """By hand: float8 values are bf16 values (e4m3fn's largest, 448, and its smallest subnormal, 2^-9, included); a
    scaled one is multiplied in float32 and rounded once: 1.75 * 0.1 = 0.175, whose nearest bf16 is 1.0110011b x 2^-3
    = 0.1748046875 (1.40625 x 2^-3 is farther); a tensor of another dtype without a scale is left as it is."""
    w8 = torch.tensor([0.5, -1.75, 448.0, 2.0 ** -9]).to(torch.float8_e4m3fn)
    assert dequantized(w8).dtype == torch.bfloat16 and dequantized(w8).tolist() == [0.5, -1.75, 448.0, 2.0 ** -9]
    assert dequantized(w8, torch.tensor(0.25)).tolist() == [0.125, -0.4375, 112.0, 2.0 ** -11]
    assert dequantized(torch.tensor([1.75]).to(torch.float8_e5m2), torch.tensor(0.1)).item() == 0.1748046875
    kept = torch.tensor([0.1, 0.2])
    assert dequantized(kept) is kept


def _in_float8(state: dict[str, torch.Tensor], quantized, scaled: str | None = None,
               prefix: str = "model.diffusion_model.") -> tuple[dict, dict]:
    """`state` with the weights `quantized(name, tensor)` picks in float8 (e4m3fn): plain, or `scaled` in one of
    ComfyUI's formats, each weight beside its scale (the largest magnitude over 448) and an input scale: "scaled_fp8"
    (the marker under the denoiser's `prefix`, `scale_weight`, `scale_input`) or "mixed" (`weight_scale`,
    `input_scale`, the layer's format in `comfy_quant`); and the weights as read back by hand: float8 values in bf16,
    times the scale where there is one."""
    names = {"scaled_fp8": ("scale_weight", "scale_input"), "mixed": ("weight_scale", "input_scale")}
    stored, expected = {}, {}
    for name, tensor in state.items():
        if not quantized(name, tensor):
            stored[name], expected[name] = tensor, tensor
            continue
        scale = tensor.abs().max().float() / 448 if scaled else None
        stored[name] = (tensor / scale if scaled else tensor).to(torch.float8_e4m3fn)
        expected[name] = stored[name].to(torch.bfloat16)
        if scaled:
            layer = name.removesuffix(".weight")
            stored[f"{layer}.{names[scaled][0]}"], stored[f"{layer}.{names[scaled][1]}"] = scale, torch.ones(())
            expected[name] = (stored[name].float() * scale).to(torch.bfloat16)
            if scaled == "mixed":
                stored[f"{layer}.comfy_quant"] = _json_bytes({"format": "float8_e4m3fn"})
    if scaled == "scaled_fp8":
        stored[f"{prefix}scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    return stored, expected


def _json_bytes(settings: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(settings).encode()), dtype=torch.uint8)


def test_a_float8_file_converts_to_its_weights_in_fp16_or_bf16(tmp_path, tiny_flow_models, tiny_models, capsys):
    """FLUX and SD3 fine-tunes are shared in float8: plain, or scaled in ComfyUI's formats (the linear weights over
    a scale each). convert reads an SD3 file of each kind, a UNet alone in plain float8 (its convolutions too) and
    one unprefixed in the mixed format, in the dtype of the denoiser's other weights where it is fp16 (every float8
    value is an fp16 value), else bf16: exported again, the pipeline gives back the weights as read by hand, bit for
    bit, the scales applied (a scale left out would be off by it). A whole SD checkpoint in plain float8 converts
    too, ComfyUI's marker in it or not. Refused, each in one line naming what: a whole checkpoint with scales
    (diffusers' pipeline converter would read it without them), a layer of another format (nvfp4, in a comfy_quant
    tensor; int8, in the header), a scale per channel, or beside a convolution's weight, an integer weight, settings
    that are not ComfyUI's JSON, bitsandbytes' NF4."""
    def converted(name, stored, config, dtype="bf16"):
        save_file(stored, tmp_path / f"{name}.safetensors")
        main(["convert", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / name), "--config", str(config)])
        again = tmp_path / f"{name}-again.safetensors"
        export(tmp_path / name, "--format", "single-file", "--dtype", dtype, "--out", again)
        return load_file(again)

    def in_mmdit(name, tensor):
        return name.startswith("model.") and tensor.dim() == 2

    export(tiny_flow_models["sd3"], "--format", "single-file", "--out", tmp_path / "sd3.safetensors")
    sd3 = load_file(tmp_path / "sd3.safetensors")
    for scaled, dtype in ((None, torch.float16), ("mixed", torch.float32)):  # the MMDiT's other weights' dtype
        state = {k: t.to(dtype) if k.startswith("model.") else t for k, t in sd3.items()}
        stored, expected = _in_float8(state, in_mmdit, scaled)
        assert sum(t.dtype == torch.float8_e4m3fn for t in stored.values()) > 20
        written = {torch.float16: "fp16", torch.float32: "bf16"}[dtype]
        transformer = tmp_path / f"sd3-{scaled}" / "transformer" / "diffusion_pytorch_model.safetensors"
        again = converted(f"sd3-{scaled}", stored, tiny_flow_models["sd3"], written)
        assert {t.dtype for t in load_file(transformer).values()} == {DTYPES[written]}
        assert again.keys() == expected.keys()
        assert all(torch.equal(again[k], t.to(DTYPES[written])) for k, t in expected.items()), scaled
    # scaled_fp8, the MMDiT alone and unprefixed (as FLUX's files are: the marker is then `scaled_fp8`)
    mmdit = {k.removeprefix("model.diffusion_model."): t for k, t in sd3.items() if k.startswith("model.")}
    stored, expected = _in_float8(mmdit, lambda name, t: t.dim() == 2, "scaled_fp8", prefix="")
    assert "scaled_fp8" in stored and "joint_blocks.0.x_block.attn.qkv.scale_weight" in stored
    again = converted("sd3-scaled", stored, tiny_flow_models["sd3"])
    assert all(torch.equal(again[f"model.diffusion_model.{k}"], t.bfloat16()) for k, t in expected.items())
    export(tiny_models["sd"], "--format", "single-file", "--out", tmp_path / "sd.safetensors")
    whole = load_file(tmp_path / "sd.safetensors")
    unet, expected = _in_float8({k: t for k, t in whole.items() if k.startswith("model.")},
                                lambda name, t: t.is_floating_point())
    again = converted("unet", unet, tiny_models["sd"])
    assert all(torch.equal(again[k], t) for k, t in expected.items())
    # the UNet alone, unprefixed (as ComfyUI's Load Diffusion Model takes one), its linear layers in the mixed format
    unet = {k.removeprefix("model.diffusion_model."): t for k, t in whole.items() if k.startswith("model.")}
    stored, expected = _in_float8(unet, lambda name, t: t.dim() == 2, "mixed")
    assert "time_embed.0.weight_scale" in stored and "scaled_fp8" not in stored
    again = converted("unet-unprefixed", stored, tiny_models["sd"])
    assert all(torch.equal(again[f"model.diffusion_model.{k}"], t.bfloat16()) for k, t in expected.items())
    stored, expected = _in_float8(whole, lambda name, t: t.is_floating_point())
    again = converted("whole", stored | {"model.diffusion_model.scaled_fp8": torch.tensor([])}, tiny_models["sd"])
    assert again.keys() == expected.keys() and all(torch.equal(again[k], t) for k, t in expected.items())

    capsys.readouterr()
    mixed, _ = _in_float8(sd3, in_mmdit, "mixed")
    layer = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
    plain, _ = _in_float8(sd3, in_mmdit)
    rows, columns = sd3[f"{layer}.weight"].shape
    patches = "model.diffusion_model.x_embedder.proj.weight"
    cases = [("whole-scaled", _in_float8(whole, lambda name, t: t.dim() == 2, "scaled_fp8")[0], {},
              "is a whole checkpoint in scaled float8 (cond_stage_model."),
             ("nvfp4", mixed | {f"{layer}.comfy_quant": _json_bytes({"format": "nvfp4"})}, {},
              f"layer {layer} is quantized as 'nvfp4', which is not read here"),
             ("int8", plain, {"_quantization_metadata": json.dumps({"layers": {layer: {"format": "int8_tensorwise"}}})},
              f"layer {layer} is quantized as 'int8_tensorwise', which is not read here"),
             ("channel", mixed | {f"{layer}.weight_scale": torch.ones(rows, 1)}, {},
              f"{layer}.weight_scale scales {layer}.weight (F8_E4M3, shape [{rows}, {columns}]) by a tensor of shape "
              f"[{rows}, 1]: only linear layers' float weights"),
             ("integer", mixed | {f"{layer}.weight": sd3[f"{layer}.weight"].to(torch.int8)}, {},
              f"{layer}.weight_scale scales {layer}.weight (I8, shape [{rows}, {columns}]) by a tensor of shape []"),
             ("convolution", mixed | {f"{patches}_scale": torch.ones(())}, {},
              f"{patches}_scale scales {patches} (F32, shape [{', '.join(map(str, sd3[patches].shape))}]) by"),
             ("not-json", mixed | {f"{layer}.comfy_quant": torch.tensor([1, 2], dtype=torch.uint8)}, {},
              "its quantization settings are unreadable (Expecting value"),
             ("nf4", plain | {f"{layer}.weight.absmax": torch.ones(4),
                              f"{layer}.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)}, {},
              f"holds weights quantized by bitsandbytes (such as {layer}.weight.absmax: NF4 or FP4)")]
    for name, stored, metadata, message in cases:
        save_file(stored, tmp_path / f"{name}.safetensors", metadata=metadata)
        config = tiny_models["sd"] if name == "whole-scaled" else tiny_flow_models["sd3"]
        with pytest.raises(SystemExit):
            main(["convert", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / "out"), "--config",
                  str(config)])
        err = capsys.readouterr().err
        assert message in err and not (tmp_path / "out").exists(), err


def test_a_transformer_weight_without_its_place_in_the_original_layout_is_named(tiny_flow_models):
    from diffusion_align.models.transformer_layouts import flux_to_original, sd3_to_original
    for family, to_original in (("sd3", sd3_to_original), ("flux", flux_to_original)):
        state = DiffusionPipeline.from_pretrained(tiny_flow_models[family]).transformer.state_dict()
        with pytest.raises(ValueError, match=r"weight 'extra.weight' has no place in .*'s original layout"):
            to_original(state | {"extra.weight": torch.zeros(1)})
        state.pop("transformer_blocks.0.attn.to_k.weight")
        with pytest.raises(ValueError, match=r"qkv.weight fuses 3 weights, but 2 of them are in the state dict"):
            to_original(state)


def test_a_flux_transformer_exports_as_black_forest_labs_file_and_converts_back(tmp_path, tiny_flow_models):
    """FLUX.1's transformer alone, unprefixed, as flux1-dev.safetensors holds it. diffusers' converter of those files
    assumes FLUX.1's width (3072), so the pipeline here has a transformer of that width, one block of each kind. The
    converter reads it back bit for bit, and convert puts it into the --config pipeline, every part in the file's
    dtype (bf16); a file with the prefix the community's files often carry converts too."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    pipeline = FluxPipeline.from_pretrained(tiny_flow_models["flux"])
    torch.manual_seed(0)
    pipeline.transformer = FluxTransformer2DModel(
        num_layers=1, num_single_layers=1, in_channels=64, joint_attention_dim=72, pooled_projection_dim=40,
        guidance_embeds=True).to(torch.bfloat16)
    pipeline.save_pretrained(tmp_path / "wide")
    export(tmp_path / "wide", "--format", "single-file", "--dtype", "bf16", "--out", tmp_path / "flux.safetensors")
    path = tmp_path / "flux.safetensors"
    with safe_open(path, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["modelspec.architecture"] == "flux-1-dev" and len(keys) == 20 + 24 + 8
    assert {"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"} <= keys
    want = pipeline.transformer.state_dict()
    read = FluxTransformer2DModel.from_single_file(path, config=str(tmp_path / "wide"), subfolder="transformer",
                                                   local_files_only=True, torch_dtype=torch.bfloat16).state_dict()
    assert want.keys() == read.keys() and all(torch.equal(want[k], read[k]) for k in want)

    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": t for k, t in load_file(path).items()}, prefixed)
    for file in (path, prefixed):
        out = tmp_path / f"converted-{file.stem}"
        main(["convert", str(file), "--out", str(out), "--config", str(tmp_path / "wide")])
        converted = FluxPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            want, got = getattr(pipeline, name).state_dict(), getattr(converted, name).state_dict()
            assert want.keys() == got.keys() and all(torch.equal(want[k].bfloat16(), got[k]) for k in want), name


def test_the_real_architectures_take_the_names_and_shapes_of_the_released_checkpoints():
    """On SD1.5's, SDXL's and SD2.1's architectures (built without weights), tensors as the released single files
    (v1-5-pruned-emaonly, sd_xl_base_1.0, v2-1_768-ema-pruned) name and shape them, read off those files."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusion_align.models.single_file import open_clip_to_ldm, unet_to_ldm, vae_to_ldm
    from test_kohya import UNET_CONFIGS

    def shapes(state):
        return {k: tuple(v.shape) for k, v in state.items()}

    with torch.device("meta"):
        unets = {name: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(UNET_CONFIGS / f"{name}.json"))
                 for name in ("sd15-unet", "sdxl-unet")}
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=20,
                                                           projection_dim=1280, hidden_act="gelu"))
        vit_h = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                             num_attention_heads=16, hidden_act="gelu"))
    sd15 = shapes(unet_to_ldm(unets["sd15-unet"].state_dict(), unets["sd15-unet"].config))
    assert len(sd15) == len(unets["sd15-unet"].state_dict()) == 686
    assert {"model.diffusion_model.time_embed.0.weight": (1280, 320),
            "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (320,),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
            "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
            "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
            "model.diffusion_model.out.0.weight": (320,),
            "model.diffusion_model.out.2.weight": (4, 320, 3, 3)}.items() <= sd15.items()
    sdxl = shapes(unet_to_ldm(unets["sdxl-unet"].state_dict(), unets["sdxl-unet"].config))
    assert len(sdxl) == 1680
    assert {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
            "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
            "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3)}.items() <= sdxl.items()
    ldm_vae = shapes(vae_to_ldm(vae.state_dict(), 4))
    assert len(ldm_vae) == 248
    assert {"first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
            "first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "first_stage_model.encoder.norm_out.weight": (512,),
            "first_stage_model.decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
            "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
            "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
            "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
            "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
            "first_stage_model.quant_conv.weight": (8, 8, 1, 1)}.items() <= ldm_vae.items()
    assert not any(k.startswith(("first_stage_model.decoder.up.0.upsample", "first_stage_model.encoder.down.3.down"))
                   for k in ldm_vae)
    g = shapes(open_clip_to_ldm(big_g.state_dict(), "conditioner.embedders.1.model."))
    assert {"conditioner.embedders.1.model.positional_embedding": (77, 1280),
            "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
            "conditioner.embedders.1.model.text_projection": (1280, 1280),
            "conditioner.embedders.1.model.ln_final.weight": (1280,),
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight": (1280, 1280),
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
            "conditioner.embedders.1.model.transformer.resblocks.0.ln_2.bias": (1280,)}.items() <= g.items()
    assert len(g) == 4 + 1 + 32 * 12  # embeddings, ln_final; projection; per layer 2 in_proj, 2 out_proj, 4 ln, 4 mlp
    h = shapes(open_clip_to_ldm(vit_h.state_dict(), "cond_stage_model.model.", added_layers=1))
    assert h["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert h["cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight"] == (4096, 1024)
    assert len(h) == 4 + 24 * 12 and "cond_stage_model.model.text_projection" not in h


def test_sd2s_missing_layer_is_written_as_one_that_returns_its_input():
    """The original SD2.x checkpoints hold all 24 of ViT-H's layers, diffusers' text encoder the 23 its pipeline reads.
    Read back by diffusers' open_clip converter into a model one layer deeper, the added layer returns its input
    exactly, so reading the last layer or the penultimate gives the same conditioning."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_align.models.single_file import open_clip_to_ldm
    config = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, hidden_act="gelu")
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, **config)).eval()
    deeper = CLIPTextModel(CLIPTextConfig(num_hidden_layers=3, **config)).eval()
    prefix = "cond_stage_model.model."
    converted = convert_open_clip_checkpoint(deeper, open_clip_to_ldm(encoder.state_dict(), prefix, 1), prefix)
    # transformers 5.6 dropped CLIPTextModel's text_model. prefix, which the converter writes
    deeper.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        own, read = (model(ids, output_hidden_states=True).hidden_states for model in (encoder, deeper))
    assert torch.equal(read[3], read[2]), "the added layer returns its input"
    assert torch.equal(read[2], own[2]) and torch.equal(read[1], own[1])


@pytest.mark.parametrize("family", ["sd", "sd2", "sdxl"])
def test_a_single_file_checkpoint_converts_to_the_pipeline_it_was_written_from(tmp_path, tiny_models, capsys, family):
    """convert is export --format single-file undone: the trained UNet, the base's other parts, their dtype (fp16
    here, beside the float32 schedule buffers that old releases such as SD1.5's carry) and the prediction type the
    file records (v_pred, or modelspec.prediction_type) over a --config of the other; training reads it."""
    run, unet = _full_fine_tune_run(tmp_path, tiny_models[family])
    export(run, "--format", "single-file", "--dtype", "fp16", "--out", tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    save_file(load_file(tmp_path / "model.safetensors") | {"alphas_cumprod": torch.linspace(1, 0, 1000)},
              tmp_path / "model.safetensors", metadata)
    config = _with_scheduler(tiny_models[family], tmp_path / "flipped-config",
                             prediction_type="epsilon" if family == "sd2" else "v_prediction")
    main(["convert", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "converted"), "--config",
          str(config)])
    assert "model.pretrained=" in capsys.readouterr().out
    converted = DiffusionPipeline.from_pretrained(tmp_path / "converted")
    base = DiffusionPipeline.from_pretrained(tiny_models[family])
    assert type(converted) is type(base)
    assert {t.dtype for t in load_file(tmp_path / "converted" / "unet" / "diffusion_pytorch_model.safetensors")
            .values()} == {torch.float16}
    assert converted.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    expected = {"unet": unet, **{name: getattr(base, name) for name in ("vae", "text_encoder", "text_encoder_2")
                                 if getattr(base, name, None) is not None}}
    for name, model in expected.items():
        want, got = model.state_dict(), getattr(converted, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k].half(), got[k].half()) for k in want), name
    from diffusion_align.models.loading import load_components
    assert load_components(str(tmp_path / "converted")).family.name == family


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_unet_alone_converts_into_its_config_pipeline(tmp_path, tiny_models, family):
    """A file with the UNet alone (as some fine-tunes are shared), or the UNet and the VAE: the --config gives the
    rest, the file's own parts are read (its VAE, changed here, over the config's), in the file's dtype."""
    run, unet = _full_fine_tune_run(tmp_path, tiny_models[family])
    export(run, "--format", "single-file", "--dtype", "fp16", "--out", tmp_path / "whole.safetensors")
    whole = load_file(tmp_path / "whole.safetensors")
    save_file({k: t if k.startswith("model.") else t + 0.01 for k, t in whole.items()
               if k.startswith(("model.diffusion_model.", "first_stage_model."))}, tmp_path / "model.safetensors")
    main(["convert", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "converted"), "--config",
          str(tiny_models[family])])
    converted = DiffusionPipeline.from_pretrained(tmp_path / "converted", torch_dtype=torch.float16)
    base = DiffusionPipeline.from_pretrained(tiny_models[family], torch_dtype=torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "converted" / "unet" / "diffusion_pytorch_model.safetensors")
            .values()} == {torch.float16}
    got = converted.unet.state_dict()
    assert all(torch.equal(t.half(), got[k]) for k, t in unet.state_dict().items())
    got = converted.vae.state_dict()
    assert all(torch.equal(t + 0.01, got[k]) for k, t in base.vae.state_dict().items()), "the file's VAE"
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(base, name, None) is not None:
            got = getattr(converted, name).state_dict()
            assert all(torch.equal(t, got[k]) for k, t in getattr(base, name).state_dict().items()), name
    save_file({k: t for k, t in whole.items() if k.startswith("model.diffusion_model.")}, tmp_path / "unet.safetensors")
    main(["convert", str(tmp_path / "unet.safetensors"), "--out", str(tmp_path / "unet-only"), "--config",
          str(tiny_models[family])])
    got = DiffusionPipeline.from_pretrained(tmp_path / "unet-only", torch_dtype=torch.float16).vae.state_dict()
    assert all(torch.equal(t, got[k]) for k, t in base.vae.state_dict().items()), "the config's VAE"
    # without the prefix, as ComfyUI's Load Diffusion Model takes a UNet (SDXL's label_emb among its top modules)
    save_file({k.removeprefix("model.diffusion_model."): t for k, t in whole.items()
               if k.startswith("model.diffusion_model.")}, tmp_path / "unprefixed.safetensors")
    main(["convert", str(tmp_path / "unprefixed.safetensors"), "--out", str(tmp_path / "unprefixed"), "--config",
          str(tiny_models[family])])
    got = UNet2DConditionModel.from_pretrained(tmp_path / "unprefixed", subfolder="unet").state_dict()
    assert all(torch.equal(t.half(), got[k]) for k, t in unet.state_dict().items())


def test_a_unet_alone_leaves_out_the_configs_safety_checker(tmp_path, tiny_models):
    """SD1.5's --config holds a safety checker (1.2 GB), which a pipeline for training never runs: a UNet alone
    converts without it, as a whole checkpoint (which holds none) does."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    layers = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=layers, projection_dim=8,
                                                      vision_config=layers | {"image_size": 32, "patch_size": 16}))
    parts = {k: v for k, v in DiffusionPipeline.from_pretrained(tiny_models["sd"]).components.items()
             if k not in ("safety_checker", "feature_extractor")}
    StableDiffusionPipeline(**parts, safety_checker=checker, feature_extractor=CLIPImageProcessor(size=32),
                            requires_safety_checker=True).save_pretrained(tmp_path / "config")
    export(tiny_models["sd"], "--format", "single-file", "--out", tmp_path / "sd.safetensors")
    save_file({k: t for k, t in load_file(tmp_path / "sd.safetensors").items() if k.startswith("model.")},
              tmp_path / "unet.safetensors")
    main(["convert", str(tmp_path / "unet.safetensors"), "--out", str(tmp_path / "out"), "--config",
          str(tmp_path / "config")])
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert (index["safety_checker"], index["requires_safety_checker"]) == ([None, None], False)
    assert not (tmp_path / "out" / "safety_checker").exists() and (tmp_path / "config" / "safety_checker").is_dir()


def test_a_config_folder_of_one_variant_gives_its_parts_by_variant(tmp_path, tiny_models, capsys, caplog):
    """A --config folder whose text encoder was downloaded in one variant only (model.fp16.safetensors), as the text
    encoders of a UNet alone, SD3 and FLUX files are taken from it: --variant reads its weights (the VAE falls back on
    its unvaried ones, as in diffusers); without it, or with a variant it lacks, the error names the component and
    the variant to give. A whole checkpoint takes no weights from the --config: --variant is not used, and says so."""
    export(tiny_models["sd"], "--format", "single-file", "--out", tmp_path / "sd.safetensors")
    save_file({k: t for k, t in load_file(tmp_path / "sd.safetensors").items() if k.startswith("model.")},
              tmp_path / "unet.safetensors")
    config = shutil.copytree(tiny_models["sd"], tmp_path / "fp16-text-encoder")
    (config / "text_encoder" / "model.safetensors").unlink()
    base = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    with torch.no_grad():  # the variant's weights, told from the unvaried ones
        base.text_encoder.get_parameter("final_layer_norm.bias").add_(1)
    base.text_encoder.save_pretrained(config / "text_encoder", variant="fp16")
    for variant in (None, "bf16"):
        with pytest.raises(SystemExit):
            main(["convert", str(tmp_path / "unet.safetensors"), "--out", str(tmp_path / "out"), "--config",
                  str(config), *(["--variant", variant] if variant else [])])
        err = capsys.readouterr().err
        assert "its text_encoder holds fp16 weights only: give --variant fp16" in err
        assert not (tmp_path / "out").exists()
    main(["convert", str(tmp_path / "unet.safetensors"), "--out", str(tmp_path / "out"), "--config", str(config),
          "--variant", "fp16"])
    got = DiffusionPipeline.from_pretrained(tmp_path / "out").text_encoder.state_dict()
    assert all(torch.equal(t, got[k]) for k, t in base.text_encoder.state_dict().items())
    main(["convert", str(tmp_path / "sd.safetensors"), "--out", str(tmp_path / "whole"), "--config", str(config),
          "--variant", "fp16"])
    assert "is a whole checkpoint, which takes no weights from the --config: --variant fp16 is not used" in caplog.text


def _with_scheduler(pipeline, out, **settings):
    """A copy of pipeline folder `pipeline` at `out`, its scheduler config with `settings`."""
    shutil.copytree(pipeline, out)
    scheduler = out / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | settings))
    return out


def test_a_v_prediction_zero_snr_model_carries_both_markers_and_converts_back_to_its_schedule(tmp_path, tiny_models):
    """v_pred and ztsnr, as the v-prediction SDXL checkpoints carry them and ComfyUI reads them: written from the
    scheduler's config, and read back over a --config of the stock (epsilon) schedule."""
    base = _with_scheduler(tiny_models["sdxl"], tmp_path / "zsnr", prediction_type="v_prediction",
                           rescale_betas_zero_snr=True, timestep_spacing="trailing")
    export(base, "--format", "single-file", "--out", tmp_path / "zsnr.safetensors")
    with safe_open(tmp_path / "zsnr.safetensors", "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys()) and f.metadata()["modelspec.prediction_type"] == "v"
    main(["convert", str(tmp_path / "zsnr.safetensors"), "--out", str(tmp_path / "converted"), "--config",
          str(tiny_models["sdxl"])])
    scheduler = DiffusionPipeline.from_pretrained(tmp_path / "converted").scheduler.config
    assert (scheduler.prediction_type, scheduler.rescale_betas_zero_snr, scheduler.timestep_spacing) == (
        "v_prediction", True, "trailing")


def test_what_convert_cannot_read_is_named(tmp_path, tiny_models, tiny_flow_models, patterned, capsys, monkeypatch):
    folder, _ = patterned
    export(tiny_models["sd"], "--format", "single-file", "--out", tmp_path / "sd.safetensors")
    whole = load_file(tmp_path / "sd.safetensors")
    save_file({k: v for k, v in whole.items() if k.startswith("model.diffusion_model.")}, tmp_path / "unet.safetensors")
    save_file({k: v for k, v in whole.items() if not k.startswith("first_stage_model.")},
              tmp_path / "no-vae.safetensors")
    save_file(whole | {"ztsnr": torch.tensor([])}, tmp_path / "zsnr.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    unprefixed = {k.removeprefix("model.diffusion_model."): t for k, t in whole.items() if k.startswith("model.")}
    save_file(unprefixed | {"zero_convs.0.0.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    save_file(unprefixed | {"input_hint_block.0.weight": torch.zeros(1)}, tmp_path / "controlnet.safetensors")
    cases = [(folder / LORA_WEIGHTS, tiny_models["sd"], "holds no model.diffusion_model.* weights (nor an original "
              "UNet's without that prefix), nor SD3's joint_blocks.* or FLUX's double_blocks.*: not a checkpoint in an "
              "original single-file layout; it holds a LoRA's weights (such as unet."),
             (Path(tiny_models["sd"]) / "unet" / "diffusion_pytorch_model.safetensors", tiny_models["sd"],
              "its names are a diffusers model's (such as down_blocks."),
             (Path(tiny_flow_models["sd3"]) / "transformer" / "diffusion_pytorch_model.safetensors",
              tiny_flow_models["sd3"], "its names are a diffusers model's (such as transformer_blocks."),
             (tmp_path / "extra.safetensors", tiny_models["sd"], "it has zero_convs.0.0.weight, which the config's"),
             (tmp_path / "controlnet.safetensors", tiny_models["sd"], "holds a ControlNet (input_hint_block.*)"),
             (tmp_path / "model.ckpt", tiny_models["sd"], "a .ckpt file is a pickle"),
             (tmp_path / "bad.safetensors", tiny_models["sd"], "not a readable safetensors file"),
             (tmp_path / "unet.safetensors", tiny_models["sdxl"], "is not the sdxl unet --config"),
             (tmp_path / "unet.safetensors", tiny_flow_models["sd3"], "is a sd3 pipeline, but"),
             (tmp_path / "no-vae.safetensors", tiny_models["sd"], "holds a UNet and its text encoders without the VAE"),
             (tmp_path / "sd.safetensors", tiny_models["sdxl"], "is a sdxl pipeline, but"),
             (tmp_path / "sd.safetensors", tmp_path, "is not a diffusers pipeline folder"),
             (tmp_path / "zsnr.safetensors", tiny_models["sd"], "which the --config's PNDMScheduler cannot run")]
    for checkpoint, config, message in cases:
        with pytest.raises(SystemExit):
            main(["convert", str(checkpoint), "--out", str(tmp_path / "out"), "--config", str(config)])
        assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):  # without --config, where the hub cannot be reached
        main(["convert", str(tmp_path / "sd.safetensors"), "--out", str(tmp_path / "out")])
    assert "could not fetch the configs of its architecture from the hub" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "unet.safetensors"), "--out", str(tmp_path / "out")])
    assert "holds a UNet without the text encoders: give the pipeline they come from with --config" in (
        capsys.readouterr().err)
    for out in (tmp_path, tmp_path / "sd.safetensors"):  # its own folder, or itself, which the pipeline would replace
        with pytest.raises(SystemExit):
            main(["convert", str(tmp_path / "sd.safetensors"), "--out", str(out), "--overwrite"])
        assert "which the pipeline written there would replace" in capsys.readouterr().err
        assert (tmp_path / "sd.safetensors").is_file()
    with pytest.raises(SystemExit):  # a single file given where a pipeline folder is read
        main(["train", str(Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"),
              f"model.pretrained={tmp_path / 'model.ckpt'}",
              f"train.output_dir={tmp_path / 'run'}"])
    assert "is a single-file checkpoint" in capsys.readouterr().err
