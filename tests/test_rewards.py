"""Reward scorers on tiny random models saved in the real layouts: scores checked against hand computations
from the underlying models' own forward passes, preference formulas, preprocessing, and the error messages."""

import json
import pickle
import shutil
import types

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from diffusion_align.rewards import SCORERS, MissingWeightsError, load_scorer, parse_scorer_spec
from diffusion_align.rewards import registry
from diffusion_align.rewards.clip import ClipImageTransform, ClipSimilarityScorer
from diffusion_align.rewards.hps import OPENAI_MEAN, OPENAI_STD, Letterbox, open_clip_config
from diffusion_align.rewards.tiny import save_tiny_scorer

LONG = "a red circle on a white background " * 15  # ~100 tokens: truncated to 77
PROMPTS = ["a red circle", "a photo of a dog", "", LONG, "Ünïcödé 東京 🐱!!"]
SIZES = [(40, 30), (24, 48), (64, 64), (33, 17), (50, 50)]  # (width, height)


MODEL_SCORERS = [name for name in SCORERS if name != "toy-oracle"]  # the oracle is a rule: tests in test_toy.py


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-scorers")
    return {name: save_tiny_scorer(name, root / name, seed=i) for i, name in enumerate(MODEL_SCORERS)}


@pytest.fixture(scope="module")
def scorers(paths):
    return {name: load_scorer(name, str(path), device="cpu", batch_size=2) for name, path in paths.items()}


@pytest.fixture()
def empty_hub(monkeypatch, tmp_path):
    """Offline with an empty cache: whatever this machine has cached, hub downloads fail."""
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


# --- registry and names -------------------------------------------------------------------------------------------

def test_registry_matches_scorers():
    assert registry.registry_names() == sorted(SCORERS)
    columns = []
    for name in SCORERS:
        spec = registry.load_spec(name)
        assert spec["default_convention"] in spec["conventions"]
        columns += [c["column"] for c in spec["conventions"].values()]
    assert len(columns) == len(set(columns))  # every output column is unambiguous
    implemented = {key for key in ClipSimilarityScorer.SIMILARITIES}
    declared = {(n, c) for n in ("pickscore", "clip", "toy-pickscore") for c in registry.load_spec(n)["conventions"]}
    assert implemented == declared


def test_registry_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "registry_dir", lambda: tmp_path)
    (tmp_path / "x.yaml").write_text("name: x\ntitle: X\n")
    with pytest.raises(ValueError, match=r"x\.yaml: missing key\(s\) \['paper'"):
        registry.load_spec("x")
    with pytest.raises(FileNotFoundError, match="no registry entry for scorer 'y'"):
        registry.load_spec("y")


def test_parse_scorer_spec(tmp_path, monkeypatch):
    assert parse_scorer_spec("pickscore=/models/ps") == ("pickscore", "/models/ps")
    monkeypatch.setenv("HOME", str(tmp_path))  # `hpsv2.1=~/w`: bash leaves a ~ after `name.1=` as it is
    assert parse_scorer_spec("hpsv2.1=~/w.pt") == ("hpsv2.1", str(tmp_path / "w.pt"))
    assert parse_scorer_spec("clip") == ("clip", None)
    assert parse_scorer_spec(" hpsv2.1 = /a=b/HPS_v2.1_compressed.pt ") == ("hpsv2.1", "/a=b/HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="empty path"):
        parse_scorer_spec("clip=")
    with pytest.raises(ValueError, match="unknown scorer 'imagereward'; known scorers: pickscore, hpsv2, hpsv2.1"):
        parse_scorer_spec("imagereward=/x")


def test_unknown_scorer_option_and_convention(paths):
    with pytest.raises(ValueError, match="unknown scorer 'pick'; known scorers: pickscore, hpsv2, hpsv2.1, clip, "
                                         "aesthetic"):
        load_scorer("pick")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['processor'\] for scorer 'hpsv2'; its options: "
                                         "batch_size, convention"):
        load_scorer("hpsv2", str(paths["hpsv2"]), processor="x")
    with pytest.raises(ValueError, match=r"unknown convention 'logit' for scorer 'clip'; expected one of "
                                         r"\['hessel', 'torchmetrics', 'raw'\]"):
        load_scorer("clip", str(paths["clip"]), convention="logit")


# --- common behaviour ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_SCORERS)
def test_common_behaviour(scorers, name):
    scorer = scorers[name]
    images = _images()
    assert scorer.name == name and scorer.column and scorer.convention and scorer.device == torch.device("cpu")
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())
    scores = scorer.score(images, PROMPTS)  # batch_size 2: three chunks, the last one short
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (5,)
    assert not scores.requires_grad and torch.isfinite(scores).all()
    one_by_one = torch.cat([scorer.score([im], [p]) for im, p in zip(images, PROMPTS)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)
    # preprocess is picklable and carries no model (DataLoader workers)
    blob = pickle.dumps(scorer.preprocess)
    assert len(blob) < 50_000
    torch.testing.assert_close(pickle.loads(blob)(images[0]), scorer.preprocess(images[0]), atol=0, rtol=0)
    pixels = scorer.preprocess(images[1])
    assert pixels.dtype == torch.float32 and pixels.shape[0] == 3 and pixels.shape[1] == pixels.shape[2]
    # preference: the formula, from images or from scores, and P(a > b) + P(b > a) = 1
    other = _images(seed=1)
    p = scorer.preference_prob(images, other, PROMPTS)
    s_other = scorer.score(other, PROMPTS)
    torch.testing.assert_close(p, torch.sigmoid(scorer.preference_scale * (scores - s_other)))
    torch.testing.assert_close(p, scorer.preference_prob_from_scores(scores, s_other))
    torch.testing.assert_close(p + scorer.preference_prob(other, images, PROMPTS), torch.ones(5))
    assert p.dtype == torch.float32
    with pytest.raises(ValueError, match="expected a list of 5 prompts"):
        scorer.score(images, PROMPTS[:4] if scorer.needs_prompts else "one prompt")
    with pytest.raises(ValueError, match=f"{name}: image 1 is a ndarray; expected a PIL image"):
        scorer.score([images[0], np.asarray(images[1])], PROMPTS[:2])
    if scorer.needs_prompts:
        with pytest.raises(ValueError, match=f"{name}: prompt 1 is a NoneType; expected a str"):
            scorer.score(images[:2], [PROMPTS[0], None])


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "clip"])
def test_prompts_truncated_to_77_tokens(scorers, name):
    image = _images()[:1]
    assert scorers[name].score(image, [LONG]) == scorers[name].score(image, [LONG + " and a blue square" * 20])


# --- PickScore and CLIPScore --------------------------------------------------------------------------------------

def _clip_forward(path, images, prompts):
    """cos(text_i, image_i) and exp(logit_scale) straight from CLIPModel.forward, preprocessing loaded afresh."""
    model = CLIPModel.from_pretrained(path).eval()
    tokens = CLIPTokenizer.from_pretrained(path)(prompts, padding=True, truncation=True, max_length=77,
                                                 return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    scale = model.logit_scale.exp()
    return out.logits_per_image.diagonal() / scale, scale  # logits_per_image = exp(logit_scale) * cos


def test_pickscore_matches_model_forward(scorers, paths):
    images, scorer = _images(), scorers["pickscore"]
    cos, scale = _clip_forward(paths["pickscore"], images, PROMPTS)
    assert scorer.column == "pickscore" and scorer.convention.startswith("PickScore: exp(logit_scale) * cos")
    scores = scorer.score(images, PROMPTS)
    torch.testing.assert_close(scores, scale * cos, atol=1e-4, rtol=1e-5)
    cosine = load_scorer("pickscore", str(paths["pickscore"]), convention="cosine", device="cpu")
    assert cosine.column == "pickscore_cosine"
    cos_scores = cosine.score(images, PROMPTS)
    torch.testing.assert_close(cos_scores, cos, atol=1e-5, rtol=1e-5)
    # PickScore's preference is the softmax over the two images' scores; the cosine convention gives the same
    flipped = images[::-1]
    p = scorer.preference_prob(images, flipped, PROMPTS)
    softmax = torch.stack([scores, scorer.score(flipped, PROMPTS)], dim=-1).softmax(-1)[:, 0]
    torch.testing.assert_close(p, softmax)
    torch.testing.assert_close(cosine.preference_prob(images, flipped, PROMPTS), p, atol=1e-5, rtol=1e-5)
    assert p[2] == 0.5  # the same image against itself


def test_clipscore_conventions(scorers, paths):
    images = _images()
    cos, scale = _clip_forward(paths["clip"], images, PROMPTS)
    hessel_cos, _ = _clip_forward(paths["clip"], images, ["A photo depicts " + p for p in PROMPTS])
    expected = {"hessel": 2.5 * hessel_cos.clamp(min=0), "torchmetrics": (100 * cos).clamp(min=0), "raw": cos}
    other = _images(seed=1)
    for convention, want in expected.items():
        scorer = load_scorer("clip", str(paths["clip"]), convention=convention, device="cpu")
        assert scorer.column == f"clip_{convention}"
        scores = scorer.score(images, PROMPTS)
        torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)
        # preference from the cosines the scores keep: sigmoid(exp(logit_scale) * (cos_a - cos_b))
        s_other = scorer.score(other, PROMPTS)
        back_to_cos = {"hessel": 2.5, "torchmetrics": 100.0, "raw": 1.0}[convention]
        torch.testing.assert_close(scorer.preference_prob_from_scores(scores, s_other),
                                   torch.sigmoid(scale * (scores - s_other) / back_to_cos))
    assert (hessel_cos < 0).any()  # the tiny model has negative cosines: the clipping above was exercised


@pytest.mark.parametrize("form", ["tensor", "object"])
def test_feature_outputs_tensor_or_object(scorers, monkeypatch, form):
    """transformers 5 returns an output object whose pooler_output is the embedding; other versions a tensor."""
    scorer, images = scorers["pickscore"], _images()
    expected = scorer.score(images, PROMPTS)
    for method in ("get_image_features", "get_text_features"):
        original = getattr(scorer.model, method)

        def patched(*args, _original=original, **kwargs):
            embedding = _original(*args, **kwargs).pooler_output
            return embedding if form == "tensor" else types.SimpleNamespace(pooler_output=embedding)

        monkeypatch.setattr(scorer.model, method, patched)
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2"])
def test_dtype_applies_to_model_only(scorers, paths, name):
    images = _images()
    half = load_scorer(name, str(paths[name]), device="cpu", dtype=torch.bfloat16, batch_size=2)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    scores = half.score(images, PROMPTS)
    assert scores.dtype == torch.float32 and half.preprocess(images[0]).dtype == torch.float32
    reference = scorers[name].score(images, PROMPTS)
    torch.testing.assert_close(scores, reference, atol=0.02 * reference.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name, clip_dir", [("pickscore", "."), ("aesthetic", "clip")])
def test_clip_processor_layout_loads_offline(empty_hub, scorers, paths, tmp_path, name, clip_dir):
    """A folder whose tokenizer and image processor were saved by CLIPProcessor.save_pretrained (transformers 5: the
    image processor's settings nested in processor_config.json, no preprocessor_config.json) is self-contained."""
    folder = tmp_path / name
    shutil.copytree(paths[name], folder)
    clip = folder / clip_dir
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(clip),
                              tokenizer=CLIPTokenizer.from_pretrained(clip))
    for old in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (clip / old).unlink()
    processor.save_pretrained(clip)
    files = {f.name for f in clip.iterdir()}
    assert "processor_config.json" in files and "preprocessor_config.json" not in files
    images = _images()
    torch.testing.assert_close(load_scorer(name, str(folder), device="cpu", batch_size=2).score(images, PROMPTS),
                               scorers[name].score(images, PROMPTS), atol=0, rtol=0)


# --- HPS ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hpsv2", "hpsv2.1"])
def test_hps_matches_open_clip_forward(scorers, paths, name):
    folder, scorer, images = paths[name], scorers[name], _images()
    checkpoint = folder / ("HPS_v2_compressed.pt" if name == "hpsv2" else "HPS_v2.1_compressed.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in state.values())
    model = open_clip.CLIP(**json.loads((folder / "open_clip_config.json").read_text())["model_cfg"])
    model.load_state_dict(state)
    model.eval()
    transform = hps_transform(32)
    with torch.no_grad():
        image_features, text_features, scale = model(torch.stack([transform(im) for im in images]),
                                                     open_clip.tokenize(PROMPTS))
    cos = (image_features * text_features).sum(-1)  # open_clip returns both normalised
    scores = scorer.score(images, PROMPTS)
    torch.testing.assert_close(scores, cos, atol=1e-5, rtol=1e-5)
    assert scorer.column == name and scorer.preference_scale == pytest.approx(scale.item())
    other = _images(seed=1)
    torch.testing.assert_close(scorer.preference_prob(images, other, PROMPTS),
                               torch.sigmoid(scale * (scores - scorer.score(other, PROMPTS))))


def test_letterbox_pads_black_and_never_crops(scorers):
    red = Image.new("RGB", (300, 100), (255, 0, 0))
    mean, std = torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD)
    black, red_value = -mean / std, (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    # the real size: 300x100 -> 224x75, centred: rows 74..148 hold the image across the full width
    for pixels, size, top, rows in ((Letterbox(224)(red), 224, 74, 75), (scorers["hpsv2"].preprocess(red), 32, 10, 11)):
        assert pixels.shape == (3, size, size)
        per_row = pixels.permute(1, 2, 0)  # (H, W, 3)
        torch.testing.assert_close(per_row[:top], black.expand(top, size, 3))
        torch.testing.assert_close(per_row[top + rows:], black.expand(size - top - rows, size, 3))
        torch.testing.assert_close(per_row[top:top + rows], red_value.expand(rows, size, 3))
    assert OPENAI_MEAN == open_clip.OPENAI_DATASET_MEAN and OPENAI_STD == open_clip.OPENAI_DATASET_STD


def test_a_very_thin_image_reaches_the_clip_processor_as_its_central_part():
    """Thinner than 16:1, the processor gets the central 16:1 part (resized whole, 1 x 3000 took 1.4 GB): the
    central square it keeps is the same, so the pixels are the whole image's within resampling; 16:1 and wider go
    through untouched."""
    seen = []

    class Spy(CLIPImageProcessorPil):
        def __call__(self, images, **kwargs):
            seen.append(images.size)
            return super().__call__(images, **kwargs)

    processor = Spy(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transform = ClipImageTransform(processor)
    # columns of a colour ramp, so a part cut off-centre would change the pixels
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None], (4, 1, 3)))
    torch.testing.assert_close(transform(ramp), processor(images=ramp, return_tensors="pt")["pixel_values"][0],
                               atol=0.05, rtol=0)
    transform(Image.new("RGB", (1, 3000))), transform(Image.new("RGB", (64, 4)))
    assert seen == [(64, 4), (400, 4), (1, 16), (64, 4)]


def hps_transform(size):
    """HPSv2's eval transform (`hpsv2/img_score.py`, resize_longest_max): ToTensor, then its ResizeMaxSize on the
    float image (torchvision's bicubic) and a black pad, then the OpenAI normalisation."""
    from torchvision.transforms import functional as TF

    def transform(image):
        pixels = TF.to_tensor(image.convert("RGB"))
        h, w = pixels.shape[1:]
        new = [round(h * size / max(h, w)), round(w * size / max(h, w))]
        pixels = TF.resize(pixels, new, TF.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new[0], size - new[1]
        pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(pixels, OPENAI_MEAN, OPENAI_STD)
    return transform


def test_letterbox_is_hps_own_preprocessing():
    """Resized as a float image, as HPS does, not as 8-bit PIL pixels (open_clip's resize_mode="longest"): images
    larger than the model's size, as generated ones are, and smaller."""
    rng = np.random.default_rng(3)
    large = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((512, 512), (768, 512),
                                                                                          (300, 1000))]
    for image in _images() + large + [Image.new("RGB", (100, 300), (0, 0, 255))]:
        torch.testing.assert_close(Letterbox(224)(image), hps_transform(224)(image), atol=1e-5, rtol=0)
    pil = open_clip.image_transform(224, is_train=False, resize_mode="longest")  # differs on a downscale
    assert (Letterbox(224)(large[0]) - pil(large[0])).abs().max() > 1e-3


def test_hps_architecture_is_vit_h_14_without_a_local_config(tmp_path):
    config = open_clip_config(tmp_path / "HPS_v2_compressed.pt", "ViT-H-14")
    assert config == open_clip.get_model_config("ViT-H-14") and config["vision_cfg"]["width"] == 1280


@pytest.mark.parametrize("name", MODEL_SCORERS)
def test_models_on_meta_are_the_loaded_ones_from_configs_alone(empty_hub, scorers, paths, tmp_path, name):
    """What the memory planner counts: each scorer's models built on the meta device from the tiny folder's configs,
    with its weights files gone, have the loaded scorer's parameters, name for name and shape for shape (the
    aesthetic head, which takes its shapes from its file, left out)."""
    config_only = tmp_path / name
    shutil.copytree(paths[name], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "*.pth", "*.bin"))
    models = SCORERS[name].models_on_meta(name, str(config_only))
    assert [p.device.type for m in models for p in m.parameters()] == ["meta"] * sum(
        len(list(m.parameters())) for m in models)
    assert [{n: p.shape for n, p in m.named_parameters()} for m in models] == [
        {n: p.shape for n, p in scorers[name].model.named_parameters()}]


def test_models_on_meta_without_a_path_are_the_registrys():
    """HPS's ViT-H-14 needs no hub: open_clip's built-in config, 986.11M parameters as open_clip's model profile
    lists it; the toy oracle is a rule and holds none."""
    (hps,) = SCORERS["hpsv2.1"].models_on_meta("hpsv2.1", None)
    assert sum(p.numel() for p in hps.parameters()) == 986_109_441
    assert SCORERS["toy-oracle"].models_on_meta("toy-oracle", None) == []


def test_models_on_meta_name_what_they_could_not_read(empty_hub):
    with pytest.raises(MissingWeightsError, match="pickscore.*yuvalkirstain/PickScore_v1.*config.json"):
        SCORERS["pickscore"].models_on_meta("pickscore", None)


def test_hps_checkpoint_errors(paths, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(paths["hpsv2"], folder)
    checkpoint = folder / "HPS_v2_compressed.pt"
    torch.save({"model": {}}, checkpoint)
    with pytest.raises(ValueError, match=r"HPS_v2_compressed.pt: expected a dict with key 'state_dict'"):
        load_scorer("hpsv2", str(folder))
    torch.save({"state_dict": {}, "hook": print}, checkpoint)  # a pickled global: refused, never run
    with pytest.raises(ValueError, match="not a loadable tensor checkpoint.*weights_only=True"):
        load_scorer("hpsv2", str(checkpoint))
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] = 8
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(paths["hpsv2"] / "HPS_v2_compressed.pt", checkpoint)
    with pytest.raises(ValueError, match="does not fit the open_clip ViT-H-14 model"):
        load_scorer("hpsv2", str(folder))


# --- aesthetic ----------------------------------------------------------------------------------------------------

def test_aesthetic_matches_clip_and_head(scorers, paths):
    scorer, images, folder = scorers["aesthetic"], _images(), paths["aesthetic"]
    model = CLIPModel.from_pretrained(folder / "clip").eval()
    pixels = CLIPImageProcessorPil.from_pretrained(folder / "clip")(images=images, return_tensors="pt")["pixel_values"]
    head = torch.load(folder / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    with torch.no_grad():
        x = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # no activations: the dropouts between were identity at eval
            x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    scores = scorer.score(images, PROMPTS)
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(scorer.score(images, None), scores)  # prompts ignored
    assert torch.equal(scorer.score(images, ["something else"] * 5), scores)
    assert scorer.column == "aesthetic" and scorer.preference_scale == 1.0


def test_aesthetic_safetensors_head_and_width_check(scorers, paths, tmp_path):
    folder = tmp_path / "st"
    shutil.copytree(paths["aesthetic"] / "clip", folder / "clip")
    head = torch.load(paths["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    save_file(head, folder / "sac+logos+ava1-l14-linearMSE.safetensors")
    images = _images()
    torch.testing.assert_close(load_scorer("aesthetic", str(folder), batch_size=2).score(images, None),
                               scorers["aesthetic"].score(images, None), atol=0, rtol=0)
    head["layers.0.weight"] = head["layers.0.weight"][:, :8].contiguous()
    save_file(head, folder / "sac+logos+ava1-l14-linearMSE.safetensors")
    with pytest.raises(ValueError, match="takes 8-d embeddings but the CLIP from .* gives 16-d"):
        load_scorer("aesthetic", str(folder))
    save_file({"layers.0.weight": head["layers.0.weight"]}, folder / "sac+logos+ava1-l14-linearMSE.safetensors")
    with pytest.raises(ValueError, match="expected the aesthetic head's state dict with keys"):
        load_scorer("aesthetic", str(folder))


# --- missing weights ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, needles", [
    ("hpsv2", ["HPS_v2_compressed.pt", "xswu/HPSv2", "--scorer hpsv2=/path/to/HPS_v2_compressed.pt"]),
    ("hpsv2.1", ["HPS_v2.1_compressed.pt", "xswu/HPSv2", "--scorer hpsv2.1=/path/to/HPS_v2.1_compressed.pt"]),
    ("pickscore", ["yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "--scorer pickscore="]),
    ("clip", ["openai/clip-vit-base-patch32", "--scorer clip="]),
    ("aesthetic", ["aesthetic-model.pth", "trl-lib/ddpo-aesthetic-predictor",
                   "improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth", "--scorer aesthetic="]),
])
def test_missing_weights_offline(empty_hub, name, needles):
    with pytest.raises(MissingWeightsError) as err:
        load_scorer(name)
    assert isinstance(err.value, FileNotFoundError)  # the CLI reports these as errors, not tracebacks
    for needle in needles:
        assert needle in str(err.value)


def test_missing_local_files(empty_hub, paths, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match=r"HPS_v2_compressed.pt does not exist; hpsv2 needs "
                                                   r"HPS_v2_compressed.pt\. Download https://huggingface.co/xswu/"):
        load_scorer("hpsv2", str(empty))
    with pytest.raises(MissingWeightsError, match=r"expected a CLIPModel folder \(config.json \+ model.safetensors\)"
                                                   r".*--scorer pickscore=DIR"):
        load_scorer("pickscore", str(empty))
    with pytest.raises(MissingWeightsError, match="holds no aesthetic head file .looked for "
                                                   "sac.logos.ava1-l14-linearMSE.pth, .*aesthetic=/path/to/folder"):
        load_scorer("aesthetic", str(empty))
    with pytest.raises(MissingWeightsError, match="/nowhere/ps does not exist"):
        load_scorer("pickscore", "/nowhere/ps")
    with pytest.raises(MissingWeightsError, match="nowhere does not exist"):  # a pathlib.Path works as well
        load_scorer("clip", tmp_path / "nowhere")
    # a model-only folder takes the registry's processor, here unreachable: the message names it and what the
    # folder lacks; each part the folder does hold still loads from it
    model_only = tmp_path / "model-only"
    CLIPModel.from_pretrained(paths["pickscore"]).save_pretrained(model_only)
    laion = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    tokenizer_files = r"tokenizer.json, or vocab.json \+ merges.txt"
    image_files = "preprocessor_config.json, or processor_config.json with an image_processor entry"
    with pytest.raises(MissingWeightsError, match=rf"AutoTokenizer from {laion} .*model-only lacks the tokenizer "
                                                   rf"\({tokenizer_files}\) and the image processor \({image_files}\), "
                                                   rf"taken from {laion} instead"):
        load_scorer("pickscore", str(model_only))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(paths["pickscore"] / name, model_only)
    with pytest.raises(MissingWeightsError, match=rf"CLIPImageProcessorPil from {laion} .*model-only lacks the "
                                                   rf"image processor \({image_files}\), taken from {laion}"):
        load_scorer("pickscore", str(model_only))


def test_the_crop_is_placed_as_each_scorers_reference_places_it(paths, scorers):
    """A 67 x 32 image resizes to 67 x 32 at the tiny size 32: a margin of 35, whose half the processor floors
    (17) and torchvision's CenterCrop rounds (18). PickScore and torchmetrics' CLIPScore crop as the processor does;
    the aesthetic predictor and Hessel's CLIPScore as OpenAI's clip.load does, through torchvision."""
    from diffusion_align.rewards import load_scorer
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 67, 3), dtype=np.uint8))
    torchmetrics = load_scorer("clip", str(paths["clip"]), convention="torchmetrics")
    assert scorers["clip"].convention_key == "hessel"  # the default
    for scorer, left in ((scorers["pickscore"], 17), (torchmetrics, 17), (scorers["aesthetic"], 18),
                         (scorers["clip"], 18)):
        processor = scorer.preprocess.processor
        whole = processor(images=image, do_center_crop=False, return_tensors="pt")["pixel_values"][0]
        assert whole.shape[-1] == 67
        torch.testing.assert_close(scorer.preprocess(image), whole[..., left:left + 32], rtol=0, atol=0)
    # the scorers whose preprocessing changed say so, for the score caches to tell old scores from new
    assert {name: scorers[name].preprocessing for name in ("pickscore", "clip", "aesthetic", "hpsv2")} == {
        "pickscore": None, "clip": "openai-clip-crop", "aesthetic": "openai-clip-crop", "hpsv2": "hps-float-resize"}
    assert torchmetrics.preprocessing is None
