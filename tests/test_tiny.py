"""Tiny offline pipelines, the real CLIP tokenizer, and the synthetic Pick-a-Pic parquet."""

import io
import os

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from diffusion_align.models import tiny
from diffusion_align.models.tiny import FAMILIES, clip_tokenizer, save_tiny_pipeline, write_tiny_pairs
from diffusion_align.rewards import tiny as tiny_scorers

PROMPTS = [
    "a photo of a cat",
    "Hello, World!! It's a DOG's life; isn't it? (yes) #1",
    "3.14159 apples & 42 pears -- 2024/05/06",
    "café naïve Ünïcödé 東京 🐱 emoji",
    "   lots   of\twhite\nspace   ",
    "",
    " ".join(["a very long prompt about a red circle"] * 20),  # truncated to 77
]


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def test_tokenizer_vocabulary(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.model_max_length == 77


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_open_clip(tokenizer, prompt):
    # open_clip pads with id 0; SD1.5 pads with <|endoftext|>: equal up to the first end token, then 49407s.
    expected = open_clip.tokenize([prompt])[0].tolist()
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    n = expected.index(49407) + 1
    assert ids[:n] == expected[:n] and ids[n:] == [49407] * (77 - n)


def test_bang_padded_tokenizer_matches_open_clip_and_shipped_quirk():
    bang = clip_tokenizer(pad_token="!")
    for prompt in [p for p in PROMPTS if "!" not in p]:
        expected = open_clip.tokenize([prompt])[0].tolist()  # pads with 0 == "!" as well
        assert bang(prompt, padding="max_length", max_length=77, truncation=True).input_ids == expected
    # As in the shipped SD2.1 / SDXL tokenizer_2 (diffusers#4153), "!" in a prompt is the special pad token,
    # id 0 per character, where open_clip merges "!!" into one BPE token.
    assert bang("wow!!").input_ids == [49406, 2781, 0, 0, 49407]
    assert open_clip.tokenize(["wow!!"])[0, :4].tolist() == [49406, 2781, 748, 49407]


def test_long_prompt_is_truncated_with_end_token(tokenizer):
    ids = tokenizer(PROMPTS[-1], truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_round_trip(pad_token, tmp_path):
    tokenizer = clip_tokenizer(pad_token=pad_token)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.pad_token == pad_token and loaded.model_max_length == 77
    for prompt in PROMPTS:
        assert loaded(prompt, padding="max_length", truncation=True).input_ids == tokenizer(
            prompt, padding="max_length", truncation=True
        ).input_ids


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_pipeline(request, tmp_path_factory):
    path = save_tiny_pipeline(tmp_path_factory.mktemp(request.param), family=request.param)
    return request.param, path, DiffusionPipeline.from_pretrained(path)


EXPECTED = {
    "sd": (StableDiffusionPipeline, "PNDMScheduler", "epsilon", None),
    "sd2": (StableDiffusionPipeline, "DDIMScheduler", "v_prediction", None),
    "sdxl": (StableDiffusionXLPipeline, "EulerDiscreteScheduler", "epsilon", "text_time"),
}


def test_pipeline_loads_as_expected(tiny_pipeline):
    family, path, pipe = tiny_pipeline
    cls, scheduler, prediction, addition = EXPECTED[family]
    assert type(pipe) is cls and type(pipe.scheduler).__name__ == scheduler
    assert pipe.scheduler.config.prediction_type == prediction
    assert pipe.unet.config.addition_embed_type == addition
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert pipe.vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    assert pipe.unet.config.cross_attention_dim == sum(e.config.hidden_size for e in encoders)
    assert all(e.config.vocab_size == 49408 and e.config.max_position_embeddings == 77 for e in encoders)
    if family == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!" and pipe.vae.config.force_upcast
        time_dim = pipe.unet.config.addition_time_embed_dim
        expected_in = 6 * time_dim + pipe.text_encoder_2.config.projection_dim
        assert pipe.unet.config.projection_class_embeddings_input_dim == expected_in
    if family == "sd2":
        assert pipe.unet.config.use_linear_projection
        assert pipe.text_encoder.config.hidden_size != 32  # wider than "sd"'s


@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_pipeline_generates(tiny_pipeline, size):
    _, _, pipe = tiny_pipeline
    height, width = size
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        "a red circle", num_inference_steps=2, height=height, width=width, output_type="np", generator=generator
    )
    image = out.images
    assert image.shape == (1, height, width, 3) and np.isfinite(image).all()


def test_same_seed_same_weights(tmp_path):
    a = save_tiny_pipeline(tmp_path / "a", family="sdxl", seed=3)
    b = save_tiny_pipeline(tmp_path / "b", family="sdxl", seed=3)
    c = save_tiny_pipeline(tmp_path / "c", family="sdxl", seed=4)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder_2/model"):
        wa, wb, wc = (load_file(p / f"{part}.safetensors") for p in (a, b, c))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_seed_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_pipeline(tmp_path, family="sd")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        save_tiny_pipeline(tmp_path, family="sd3")


def test_tiny_pairs(tmp_path):
    path = write_tiny_pairs(tmp_path / "sub" / "pairs.parquet", num_pairs=12, resolution=64, seed=1)
    assert sorted(os.listdir(path.parent)) == ["pairs.parquet"]  # no temp file left behind
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 12
    assert set(rows[0]) == {
        "caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid", "num_example_per_prompt"
    }
    sizes = set()
    for row in rows:
        images = [Image.open(io.BytesIO(row[f"jpg_{i}"])).convert("RGB") for i in (0, 1)]
        assert images[0].size == images[1].size and max(images[0].size) == 64
        sizes.add(images[0].size)
        assert {row["label_0"], row["label_1"]} == {0.0, 1.0} and row["label_0"] + row["label_1"] == 1.0
        assert row["num_example_per_prompt"] == sum(r["caption"] == row["caption"] for r in rows)
        assert row["caption"].endswith(" on a white background")
    assert len(sizes) > 1  # varied aspect ratios
    assert {r["label_0"] for r in rows} == {0.0, 1.0}  # winners in both slots
    assert len({r["image_0_uid"] for r in rows} | {r["image_1_uid"] for r in rows}) == 24


def test_tiny_pairs_preference_is_visible(tmp_path):
    """The preferred image shows the prompt's colour more than the rejected one does, on average."""
    rows = pq.read_table(write_tiny_pairs(tmp_path / "p.parquet", num_pairs=32, seed=0)).to_pylist()
    margins = []
    for row in rows:
        target = np.array(tiny._COLOURS[row["caption"].split()[1]], dtype=np.float32)

        def match(slot):
            pixels = np.asarray(Image.open(io.BytesIO(row[f"jpg_{slot}"])).convert("RGB"), dtype=np.float32)
            return (np.linalg.norm(pixels - target, axis=-1) < 60).mean()

        winner = 0 if row["label_0"] == 1.0 else 1
        margins.append(match(winner) - match(1 - winner))
    assert np.mean(margins) > 0.05 and np.mean(np.array(margins) >= 0) > 0.75


def test_tiny_pairs_deterministic(tmp_path):
    a = pq.read_table(write_tiny_pairs(tmp_path / "a.parquet", seed=5)).to_pylist()
    b = pq.read_table(write_tiny_pairs(tmp_path / "b.parquet", seed=5)).to_pylist()
    c = pq.read_table(write_tiny_pairs(tmp_path / "c.parquet", seed=6)).to_pylist()
    assert a == b and a != c


# --- tiny reward scorers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, files", [
    ("pickscore", {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"}),
    ("clip", {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"}),
    ("hpsv2", {"HPS_v2_compressed.pt", "open_clip_config.json"}),
    ("hpsv2.1", {"HPS_v2.1_compressed.pt", "open_clip_config.json"}),
    ("aesthetic", {"sac+logos+ava1-l14-linearMSE.pth", "clip"}),
])
def test_tiny_scorer_layout(name, files, tmp_path):
    path = tiny_scorers.save_tiny_scorer(name, tmp_path / name)
    assert files <= set(os.listdir(path))
    if name.startswith("hpsv2"):
        # HPS's format: {"state_dict": fp16 tensors}, readable without unpickling arbitrary objects
        checkpoint = torch.load(path / sorted(files)[0], map_location="cpu", weights_only=True)
        assert set(checkpoint) == {"state_dict"}
        assert all(v.dtype == torch.float16 for v in checkpoint["state_dict"].values())
        assert checkpoint["state_dict"]["token_embedding.weight"].shape[0] == 49408  # the real BPE vocabulary
    if name == "aesthetic":
        head = torch.load(path / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
        assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
        assert [head[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)] == [1024, 128, 64, 16, 1]
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(path / "clip"))


def test_tiny_scorer_seeded(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = (tiny_scorers.save_tiny_scorer("hpsv2", tmp_path / k, seed=s) for k, s in (("a", 1), ("b", 1), ("c", 2)))
    assert torch.equal(torch.rand(3), expected)  # callers' RNG left alone
    wa, wb, wc = (torch.load(p / "HPS_v2_compressed.pt", weights_only=True)["state_dict"] for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and any(not torch.equal(wa[k], wc[k]) for k in wa)
    with pytest.raises(ValueError, match="no tiny version of scorer 'imagereward'"):
        tiny_scorers.save_tiny_scorer("imagereward", tmp_path / "x")


def test_make_tiny_checks_scorer_names_before_building(tmp_path, capsys):
    from diffusion_align.cli import TINY_SCORERS, main
    assert TINY_SCORERS == tiny_scorers.TINY_SCORERS
    with pytest.raises(SystemExit):
        main(["make-tiny", "--help"])
    assert "any of: pickscore, clip, toy-pickscore, hpsv2, hpsv2.1, aesthetic" in " ".join(
        capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exit_info:
        main(["make-tiny", str(tmp_path / "out"), "--scorers", "pickscore", "imagereward"])
    assert exit_info.value.code == 2 and "invalid choice: 'imagereward'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing was built"


def test_make_tiny_files_get_the_usual_permissions(tmp_path):
    """save_pretrained and safetensors write owner-only (0600) weights: a tiny model other users (a test server, a
    shared folder) could not read. Every file make-tiny writes gets what the umask gives a new file."""
    from diffusion_align.cli import main
    umask = os.umask(0o022)
    os.umask(umask)
    main(["make-tiny", str(tmp_path), "--family", "sd", "flux", "--scorers", "pickscore", "hpsv2", "--pairs", "2"])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"model.safetensors", "diffusion_pytorch_model.safetensors", "tiny-pairs.parquet"} <= {p.name for p in written}
    assert (tmp_path / "tiny-flux" / "transformer" / "diffusion_pytorch_model.safetensors") in written
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in written} == {str(p): oct(0o666 & ~umask) for p in written}
