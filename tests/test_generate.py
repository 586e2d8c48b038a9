"""`generate_images` on the tiny pipelines (32x32 px, 2 steps): files, metadata, resuming, LoRA, errors."""

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from diffusion_align.evaluation.generate import MAX_SEED, generate_images, parse_seeds, read_prompts
from diffusion_align.evaluation.scoring import collect_images
from diffusion_align.files import EMA_FOLDER, SHARDED_STATE
from diffusion_align.models.loading import weights_digest
from diffusion_align.models.policy import LORA_WEIGHTS, Policy

FAST = dict(steps=2, height=32, width=32)
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metadata.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Counts the images each SD pipeline call makes."""
    calls = []
    original = StableDiffusionPipeline.__call__

    @functools.wraps(original)  # keeps the signature, which supplies the default steps and guidance
    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    return calls


# ---------------------------------------------------------------- prompts files and seeds

def test_prompt_file_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\ufeff# a comment\n  a red circle  \n\n   # indented comment\na blue square\r\na red circle\n")
    assert read_prompts(txt) == ["a red circle", "a blue square", "a red circle"]  # repeats are kept here

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "id": 3}\n\n{"text": "a dog"}\n{"caption": "a fox", "prompt": null}\n')
    assert read_prompts(jsonl) == ["a cat", "a dog", "a fox"]

    csv_file = tmp_path / "p.csv"
    csv_file.write_text('id,Prompt\n1,"a cat, sitting"\n\n2,"a dog\nrunning"\n3,a fox\n')
    assert read_prompts(csv_file) == ["a cat, sitting", "a dog\nrunning", "a fox"]


@pytest.mark.parametrize("name, text, message", [
    ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n', r"p\.jsonl:2: not valid JSON"),
    ("p.jsonl", '["a cat"]\n', r"p\.jsonl:1: expected a JSON object with one of the keys prompt, text, caption"),
    ("p.jsonl", '{"title": "a cat"}\n', r"p\.jsonl:1: expected a JSON object"),
    ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": 3}\n', r'p\.jsonl:2: expected "prompt" to be a non-empty string'),
    ("p.jsonl", '{"caption": "  "}\n', r'p\.jsonl:1: expected "caption" to be a non-empty string'),
    ("p.csv", "id,title\n1,a cat\n", r"p\.csv:1: expected a header row with a column named prompt / text / caption"),
    ("p.csv", "id,prompt\n1,a cat\n2\n", r"p\.csv:3: expected a prompt in column 2, the row has 1 fields"),
    ("p.csv", "id,prompt\n1,a cat\n2,\n", r'p\.csv:3: expected "prompt" to be a non-empty string'),
    ("p.txt", "# only a comment\n\n", r"p\.txt: no prompts found"),
    ("p.json", '["a cat"]', r"p\.json: expected a prompts file ending in \.txt, \.jsonl, \.csv"),
])
def test_prompt_file_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(tmp_path / name)


@pytest.mark.parametrize("text, seeds", [
    ("0-3", [0, 1, 2, 3]), ("0,2,5", [0, 2, 5]), ("7", [7]), ("0-3,10", [0, 1, 2, 3, 10]),
    (" 10 , 4-5 ", [10, 4, 5]), ("3-3", [3]), (str(MAX_SEED), [MAX_SEED]),
])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [
    ("", "cannot read ''"), ("0-3,", "cannot read ''"), ("a", "cannot read 'a'"), ("-1", "cannot read '-1'"),
    ("1.5", "cannot read '1.5'"), ("0-3-5", "cannot read '0-3-5'"), ("3-1", "the range 3-1 runs backwards"),
    ("0-3,2", "seed 2 is given twice"), (str(MAX_SEED + 1), "past the largest seed"),
])
def test_parse_seeds_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(text)


def test_the_largest_seed_is_the_last_whose_noise_is_its_own():
    """torch's CPU generator reads 32 bits of a seed: MAX_SEED + 1 draws seed 0's noise, which generate recorded
    as another image."""
    def noise(seed):
        return torch.randn(8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(noise(MAX_SEED + 1), noise(0)) and not torch.equal(noise(MAX_SEED), noise(0))


# ---------------------------------------------------------------- generating

@pytest.mark.parametrize("family, scheduler", [("sd", None), ("sd2", "EulerDiscreteScheduler"), ("sdxl", None)])
def test_generate_every_family(tmp_path, tiny_models, prompts_txt, family, scheduler):
    out = tmp_path / "out"
    report = generate_images(tiny_models[family], prompts_txt, "0,5", out, scheduler=scheduler, batch_size=3,
                             **FAST)
    assert (report.generated, report.kept) == (4, 0)
    names = ["p0000-s0000.png", "p0000-s0005.png", "p0001-s0000.png", "p0001-s0005.png"]
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl", *names]
    for name in names:
        with Image.open(out / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    default_scheduler = {"sd": "PNDMScheduler", "sdxl": "EulerDiscreteScheduler"}
    first = records(out)[0]
    assert first == {"file_name": "p0000-s0000.png", "prompt": "a red circle", "seed": 0, "prompt_index": 0,
                     "model": str(tiny_models[family]), "lora": None,
                     "weights": weights_digest(str(tiny_models[family])),
                     "scheduler": scheduler or default_scheduler[family], "steps": 2,
                     "guidance": 5.0 if family == "sdxl" else 7.5, "height": 32, "width": 32,
                     "negative_prompt": None, "dtype": "float32", "nsfw_content_detected": None}
    # what score / compare read: prompts and seeds matched to the files
    entries = collect_images(out)
    assert [(e.file, e.prompt, e.seed) for e in entries] == [
        ("p0000-s0000.png", "a red circle", 0), ("p0000-s0005.png", "a red circle", 5),
        ("p0001-s0000.png", "a blue square", 0), ("p0001-s0005.png", "a blue square", 5)]
    assert np.abs(pixels(out / names[0]) - pixels(out / names[1])).mean() > 5, "seeds give different images"
    assert "generated 4 images, kept 0" in str(report) and str(out) in str(report)


@pytest.mark.parametrize("family, guidance", [("sd3", 7.0), ("flux", 3.5)])
def test_generate_on_the_flow_transformers(tmp_path, tiny_flow_models, prompts_txt, family, guidance, monkeypatch):
    """SD3 and FLUX.1-dev generate through the same code with their pipelines' own defaults (guidance: SD3's CFG
    scale 7, FLUX-dev's distilled guidance 3.5; their flow-matching Euler scheduler), each image the pipeline's for
    its seed."""
    from diffusers import DiffusionPipeline
    model, out = tiny_flow_models[family], tmp_path / "out"
    report = generate_images(model, prompts_txt, "0,5", out, batch_size=3, **FAST)
    assert (report.generated, report.kept) == (4, 0)
    first = records(out)[0]
    assert (first["scheduler"], first["guidance"], first["steps"]) == ("FlowMatchEulerDiscreteScheduler", guidance, 2)
    pipe = DiffusionPipeline.from_pretrained(model)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(5),
                 output_type="np").images[0]
    assert np.abs(pixels(out / "p0000-s0005.png") - np.round(image * 255)).max() <= 1
    assert np.abs(pixels(out / "p0000-s0000.png") - pixels(out / "p0000-s0005.png")).mean() > 5
    # a size off the latent patches (here with a VAE of the real models' factor 8: 16 pixels a side) is refused
    # before any image, as training refuses it: FLUX rounded it down with a warning, SD3 failed on the first batch
    from diffusion_align.models import loading
    monkeypatch.setattr(loading, "vae_downsampling", lambda config: 8)
    with pytest.raises(ValueError, match=rf"height=40 must be a multiple of 16 for {model} \({family}\)"):
        generate_images(model, prompts_txt, "0", tmp_path / "off", **{**FAST, "height": 40})
    assert not (tmp_path / "off" / "metadata.jsonl").exists()
    monkeypatch.undo()
    if family == "flux":  # FluxPipeline reads a negative prompt only with true CFG, which generate does not run
        with pytest.raises(ValueError, match="FluxPipeline ignores it"):
            generate_images(model, prompts_txt, "0", tmp_path / "negative", negative_prompt="blurry", **FAST)
        assert not (tmp_path / "negative").exists()


def test_batch_size_does_not_change_images(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    one, three = tmp_path / "one", tmp_path / "three"
    generate_images(tiny_models["sd"], prompts, "0-1", one, batch_size=1, negative_prompt="blurry", **FAST)
    generate_images(tiny_models["sd"], prompts, "0-1", three, batch_size=3, negative_prompt="blurry", **FAST)
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in three.glob("*.png")) and len(names) == 6
    for name in names:
        # the same noise; batched matmuls round differently on CPU, so a pixel may move by a level
        assert np.abs(pixels(one / name) - pixels(three / name)).max() <= 2, name
    assert records(one)[0]["negative_prompt"] == "blurry"


def test_resume(tmp_path, tiny_models, prompts_txt, pipeline_calls):
    out = tmp_path / "out"
    generate_images(tiny_models["sd"], prompts_txt, "0-1", out, batch_size=3, **FAST)
    assert pipeline_calls == [3, 1]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    report = generate_images(tiny_models["sd"], prompts_txt, "0-1", out, batch_size=3, **FAST)
    assert (report.generated, report.kept) == (0, 4) and pipeline_calls == [3, 1]
    assert "generated 0 images, kept 4" in str(report)

    (out / "p0001-s0000.png").unlink()
    report = generate_images(tiny_models["sd"], prompts_txt, "0-1", out, batch_size=3, **FAST)
    assert (report.generated, report.kept) == (1, 3) and pipeline_calls == [3, 1, 1]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name != "p0001-s0000.png"} == \
        {k: v for k, v in mtimes.items() if k != "p0001-s0000.png"}
    assert len(records(out)) == 4, "the image's metadata line is kept, not written twice"

    # a crash in the middle of a metadata line: the line is dropped and its image made again
    text = (out / "metadata.jsonl").read_text()
    (out / "metadata.jsonl").write_text(text[:-40])
    report = generate_images(tiny_models["sd"], prompts_txt, "0-1", out, batch_size=3, **FAST)
    assert (report.generated, report.kept) == (1, 3)
    assert (out / "metadata.jsonl").read_text() == text
    # a last line whole but for its line break (a crash between the two): kept, and given its break
    (out / "metadata.jsonl").write_text(text[:-1])
    assert generate_images(tiny_models["sd"], prompts_txt, "0-1", out, batch_size=3, **FAST).kept == 4
    assert (out / "metadata.jsonl").read_text() == text

    # more prompts (and a repeat) and more seeds: old prompts keep their numbers, new ones get the next
    prompts_txt.write_text("a green triangle\na blue square\na red circle\na green triangle\n")
    report = generate_images(tiny_models["sd"], prompts_txt, "0-2", out, batch_size=3, **FAST)
    assert (report.generated, report.kept, report.prompts, report.repeated_prompts) == (5, 4, 3, 1)
    assert "1 repeated prompt lines" in str(report)
    files = {(e.prompt, e.seed): e.file for e in collect_images(out)}
    assert len(files) == 9
    assert files["a green triangle", 2] == "p0002-s0002.png" and files["a red circle", 2] == "p0000-s0002.png"


def test_a_folder_of_other_metadata_is_refused_as_it_is(tmp_path, tiny_models, prompts_txt):
    """A dataset folder whose metadata.jsonl ends without a line break lost its last line before it was refused."""
    out = tmp_path / "dataset"
    out.mkdir()
    lines = ['{"file_name": "a.png", "text": "caption 0"}', '{"file_name": "b.png", "text": "caption 1"}']
    for text in ("\n".join(lines), lines[0], "file_name,text"):  # one line alone was emptied
        (out / "metadata.jsonl").write_text(text)
        with pytest.raises(ValueError, match=r"metadata\.jsonl(:1)?: expected (a line|lines) written by diffusion-"):
            generate_images(tiny_models["sd"], prompts_txt, "0", out, **FAST)
        assert (out / "metadata.jsonl").read_text() == text


def test_other_settings_are_an_error(tmp_path, tiny_models, prompts_txt):
    out = tmp_path / "out"
    generate_images(tiny_models["sd"], prompts_txt, "0", out, **FAST)
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: .* generated with other settings \(steps=2 there, 3 "
                                         r"now; guidance=7.5 there, 4.0 now\)"):
        generate_images(tiny_models["sd"], prompts_txt, "0", out, **{**FAST, "steps": 3}, guidance=4)
    with pytest.raises(ValueError, match="scheduler='PNDMScheduler' there, 'DDIMScheduler' now"):
        generate_images(tiny_models["sd"], prompts_txt, "0", out, scheduler="DDIMScheduler", **FAST)
    with pytest.raises(ValueError, match=f"model={str(tiny_models['sd'])!r} there, "
                                         f"{str(tiny_models['sd2'])!r} now"):
        generate_images(tiny_models["sd2"], prompts_txt, "0", out, **FAST)
    with pytest.raises(ValueError, match="dtype='float32' there, 'bfloat16' now"):  # other pixels: never mixed
        generate_images(tiny_models["sd"], prompts_txt, "0", out, dtype=torch.bfloat16, **FAST)
    assert len(records(out)) == 2


def test_safety_checker_blackouts_are_reported(tmp_path, tiny_models, prompts_txt, monkeypatch):
    def flag_everything(self, image, device, dtype):  # what a checker does with flagged images: zeros
        return torch.zeros_like(image), [True] * len(image)

    monkeypatch.setattr(StableDiffusionPipeline, "run_safety_checker", flag_everything)
    out = tmp_path / "out"
    report = generate_images(tiny_models["sd"], prompts_txt, "0", out, **FAST)
    assert report.blacked_out == ["p0000-s0000.png", "p0001-s0000.png"]
    assert "2 images were blacked out by the pipeline's safety checker" in str(report)
    assert [r["nsfw_content_detected"] for r in records(out)] == [True, True]
    assert pixels(out / "p0000-s0000.png").max() == 0


def save_random_lora(model, path, seed=0):
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    policy = Policy(unet, lora_rank=4)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # zero at creation: the adapter would change nothing
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    policy.save(path)
    return path


def test_lora_changes_images(tmp_path, tiny_models, prompts_txt):
    lora = save_random_lora(tiny_models["sd"], tmp_path / "lora")

    base, with_lora, from_file = tmp_path / "base", tmp_path / "with-lora", tmp_path / "from-file"
    generate_images(tiny_models["sd"], prompts_txt, "0", base, **FAST)
    generate_images(tiny_models["sd"], prompts_txt, "0", with_lora, lora=lora, **FAST)
    report = generate_images(tiny_models["sd"], prompts_txt, "0", from_file, lora=lora / LORA_WEIGHTS, **FAST)
    assert f"+ LoRA {lora / LORA_WEIGHTS}" in str(report)
    assert records(with_lora)[0]["lora"] == str(lora) and records(base)[0]["lora"] is None
    for name in ("p0000-s0000.png", "p0001-s0000.png"):
        assert np.abs(pixels(base / name) - pixels(with_lora / name)).mean() > 1
        assert np.array_equal(pixels(with_lora / name), pixels(from_file / name))
    with pytest.raises(ValueError, match="lora=.* there, None now"):
        generate_images(tiny_models["sd"], prompts_txt, "0", with_lora, **FAST)


def test_a_lora_of_another_family_is_refused_not_ignored(tmp_path, tiny_models, tiny_flow_models, prompts_txt):
    """An SD3 transformer's LoRA loaded nothing onto an SD UNet (diffusers warns only), and the images were the
    base's under the name of the LoRA."""
    from diffusion_align.models.families import get_family
    from diffusion_align.models.loading import load_components
    sd3 = get_family("sd3")
    Policy(load_components(str(tiny_flow_models["sd3"])).denoiser, 4, None, sd3.lora_targets,
           family="sd3").save(tmp_path / "sd3-lora")
    with pytest.raises(ValueError, match=r"--lora .*sd3-lora: none of its weights loaded onto the unet of this "
                                         r"StableDiffusionPipeline \(none at all\): a LoRA of another model family"):
        generate_images(tiny_models["sd"], prompts_txt, "0", tmp_path / "out", lora=tmp_path / "sd3-lora", **FAST)
    assert not (tmp_path / "out" / "metadata.jsonl").exists()


def test_a_checkpoint_with_an_ema_gives_its_ema_and_its_lora_file_the_live_weights(tmp_path, tiny_models,
                                                                                   prompts_txt):
    checkpoint = save_random_lora(tiny_models["sd"], tmp_path / "checkpoint-2", seed=0)  # the live weights
    save_random_lora(tiny_models["sd"], checkpoint / EMA_FOLDER, seed=1)
    ema, live = tmp_path / "ema", tmp_path / "live"
    generate_images(tiny_models["sd"], prompts_txt, "0", ema, lora=checkpoint, **FAST)
    generate_images(tiny_models["sd"], prompts_txt, "0", live, lora=checkpoint / LORA_WEIGHTS, **FAST)
    assert records(ema)[0]["lora"] == str(checkpoint / EMA_FOLDER)
    assert np.abs(pixels(ema / "p0000-s0000.png") - pixels(live / "p0000-s0000.png")).mean() > 1
    # the run folder (no final/): its newest checkpoint's EMA, as export finds it (it was read as a LoRA folder)
    generate_images(tiny_models["sd"], prompts_txt, "0", tmp_path / "run", lora=tmp_path, **FAST)
    assert records(tmp_path / "run")[0]["lora"] == str(checkpoint / EMA_FOLDER)


def test_a_sharded_checkpoint_is_sent_to_export(tmp_path, tiny_models, prompts_txt):
    """A sharded (fsdp2) checkpoint's LoRA is in shards, which diffusers cannot read: one line says how to gather it."""
    (tmp_path / "checkpoint-2" / SHARDED_STATE).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"checkpoint-2: a sharded \(fsdp2\) checkpoint, whose LoRA is in shards; "
                                         r"gather it into one file first: diffusion-align export .*checkpoint-2 "
                                         r"--format diffusers"):
        generate_images(tiny_models["sd"], prompts_txt, "0", tmp_path / "out", lora=tmp_path / "checkpoint-2", **FAST)
    assert not (tmp_path / "out").exists()


def test_a_whole_denoiser_is_not_taken_for_a_lora(tmp_path, tiny_models, prompts_txt):
    """A full fine-tune's checkpoint (a whole unet/) and a whole pipeline (its final/) are not LoRAs: one line each
    says what to do instead, where diffusers would look for a LoRA file there and name a .bin."""
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(Path(tiny_models["sd"]) / "unet", checkpoint / "unet")
    with pytest.raises(ValueError, match=r"checkpoint-2: a full fine-tune's checkpoint \(a whole unet/\), not a LoRA; "
                                         r"export it as a pipeline first: diffusion-align export .*checkpoint-2 "
                                         r"--format merged --out FOLDER, then generate with --model FOLDER"):
        generate_images(tiny_models["sd"], prompts_txt, "0", tmp_path / "out", lora=checkpoint, **FAST)
    with pytest.raises(ValueError, match=r"--lora .*sd: a whole pipeline \(model_index.json\), not a LoRA; generate "
                                         r"from it with --model .*sd$"):
        generate_images(tiny_models["sd"], prompts_txt, "0", tmp_path / "out", lora=tiny_models["sd"], **FAST)
    assert not (tmp_path / "out").exists()


def test_weights_retrained_at_the_same_path_are_not_resumed(tmp_path, tiny_models, prompts_txt, pipeline_calls):
    lora, out = save_random_lora(tiny_models["sd"], tmp_path / "lora", seed=0), tmp_path / "out"
    generate_images(tiny_models["sd"], prompts_txt, "0-1", out, lora=lora, **FAST)
    first = {r["file_name"]: pixels(out / r["file_name"]) for r in records(out)}
    save_random_lora(tiny_models["sd"], lora, seed=1)  # retrained: same path, other weights
    with pytest.raises(ValueError, match=r"generated with other settings \(weights='[0-9a-f]{20}' there, "
                                         r"'[0-9a-f]{20}' now\)"):
        generate_images(tiny_models["sd"], prompts_txt, "0-1", out, lora=lora, **FAST)
    assert len(records(out)) == 4 and pipeline_calls == [4]  # refused before any image was made

    # prune: the images of other weights, prompts or seeds go (lines and files); those of this run are made anew
    (out / "p0000-s0000.txt").write_text("a file generate never wrote stays")
    report = generate_images(tiny_models["sd"], prompts_txt, "1", out, lora=lora, prune=True, **FAST)
    assert (report.generated, report.kept) == (2, 0)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl", "p0000-s0000.txt", "p0000-s0001.png",
                                                      "p0001-s0001.png"]
    assert [r["seed"] for r in records(out)] == [1, 1] and len({r["weights"] for r in records(out)}) == 1
    for name in ("p0000-s0001.png", "p0001-s0001.png"):
        assert np.abs(pixels(out / name) - first[name]).mean() > 1
    report = generate_images(tiny_models["sd"], prompts_txt, "1", out, lora=lora, prune=True, **FAST)
    assert (report.generated, report.kept) == (0, 2)  # same weights: resumed


def test_argument_errors(tmp_path, tiny_models, prompts_txt):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown scheduler 'DDIM' for StableDiffusionPipeline; expected one of "
                                         ".*DDIMScheduler, .*DPMSolverMultistepScheduler, .*EulerDiscreteScheduler"):
        generate_images(tiny_models["sd"], prompts_txt, "0", out, scheduler="DDIM", **FAST)
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        generate_images(tiny_models["sd"], prompts_txt, "0", out, steps=2, height=30)
    with pytest.raises(ValueError, match="batch_size and steps must be >= 1"):
        generate_images(tiny_models["sd"], prompts_txt, "0", out, batch_size=0, **FAST)
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        generate_images(tmp_path, prompts_txt, "0", out, **FAST)
    with pytest.raises(FileNotFoundError, match="LoRA './missing/lora.safetensors': no such file or folder"):
        generate_images(tiny_models["sd"], prompts_txt, "0", out, lora="./missing/lora.safetensors", **FAST)
    with pytest.raises(ValueError, match=r"seeds \[1, 1\]: seed 1 is given twice"):
        generate_images(tiny_models["sd"], prompts_txt, [1, 1], out, **FAST)
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    unconditional = tmp_path / "ddpm"  # a pipeline, but not one of a family's text-to-image ones
    DDPMPipeline(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                             down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
                 DDPMScheduler()).save_pretrained(unconditional)
    with pytest.raises(ValueError, match="loads a DDPMPipeline; expected a text-to-image pipeline of the families "
                                         "diffusion-align trains \\(StableDiffusion3Pipeline, FluxPipeline, "
                                         "StableDiffusionXLPipeline, StableDiffusionPipeline\\)"):
        generate_images(unconditional, prompts_txt, "0", out, **FAST)
    assert not out.exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.jsonl").write_text('{"file_name": "cat.png", "text": "a cat"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: expected a line written by diffusion-align generate"):
        generate_images(tiny_models["sd"], prompts_txt, "0", foreign, **FAST)
    assert os.listdir(foreign) == ["metadata.jsonl"]
