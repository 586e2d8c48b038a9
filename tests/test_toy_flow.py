"""The toy world's flow-matching base (SD3 at toy size): its pretraining, the shipped folder through the real loaders,
its recipes, and a shortened `demo --family flow` end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_align.toy import oracle_scores, sample_prompts
from diffusion_align.toy.pretrain import PretrainSettings
from diffusion_align.toy.pretrain_flow import TEXT_TOKENS, build_flow_pipeline, pretrain_flow

TINY = PretrainSettings(images=16, unet_steps=2, unet_batch=4)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from diffusion_align.toy.assets import base_model
    out = tmp_path_factory.mktemp("flow")
    return [pretrain_flow(out / name, base_model(), TINY) for name in ("a", "b")]


def test_flow_pretraining_is_deterministic_and_keeps_the_unet_bases_vae(pretrained):
    from diffusers import AutoencoderKL

    from diffusion_align.toy.assets import base_model
    first, again = pretrained
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        a, b = load_file(first / part), load_file(again / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    ours, theirs = (AutoencoderKL.from_pretrained(f, subfolder="vae") for f in (first, base_model()))
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert ours.config.shift_factor == 0.0 and ours.config.scaling_factor == theirs.config.scaling_factor


def test_flow_pretraining_feeds_the_transformer_rectified_flow_under_the_pipelines_conditioning(monkeypatch):
    """What the transformer receives in pretraining: x_s = (1 - s) x_0 + s eps at timestep 1000 s (so (x_s - (1 - s)
    x_0) / s is the unit Gaussian noise), and the pipeline's own encoding of the caption or, dropped, of ""."""
    import diffusion_align.toy.pretrain_flow as pretrain_flow_module
    from diffusers import AutoencoderKL

    from diffusion_align.toy.assets import base_model
    pipe = build_flow_pipeline(AutoencoderKL.from_pretrained(base_model(), subfolder="vae"), seed=0)
    caption = "a small red circle on the left, white background"
    hidden, pooled, index = pretrain_flow_module._text_states(pipe, [caption] * 3)
    assert index.tolist() == [1, 1, 1] and hidden.shape[1] == pipe.tokenizer.model_max_length + TEXT_TOKENS
    expected, _, expected_pooled, _ = pipe.encode_prompt(["", caption], None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=TEXT_TOKENS)
    assert torch.equal(hidden, expected) and torch.equal(pooled, expected_pooled)

    latents = torch.randn(3, 4, 8, 8)
    seen = []
    forward = pipe.transformer.forward

    def record(**kwargs):
        seen.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return forward(**kwargs)
    monkeypatch.setattr(pipe.transformer, "forward", record)
    settings = PretrainSettings(unet_steps=3, unet_batch=64, prompt_dropout=0.5)
    pretrain_flow_module._train_transformer(pipe.transformer, latents, hidden, pooled, index, settings,
                                            torch.Generator().manual_seed(0))
    assert len(seen) == 3
    for call in seen:
        s = call["timestep"] / 1000
        assert ((s > 0) & (s < 1)).all() and s.unique().numel() > 32  # one logit-normal draw per row
        x_s = call["hidden_states"]
        # each row's x_0 is one of the three latents: the one that leaves unit Gaussian noise
        noise = torch.stack([(x_s - (1 - s.view(-1, 1, 1, 1)) * x0) / s.view(-1, 1, 1, 1) for x0 in latents])
        assert (noise.flatten(2).std(dim=2) - 1).abs().min(dim=0).values.max() < 0.2
        dropped = (call["encoder_hidden_states"] == hidden[0]).flatten(1).all(dim=1)
        kept = (call["encoder_hidden_states"] == hidden[1]).flatten(1).all(dim=1)
        assert (dropped ^ kept).all() and 0 < dropped.sum() < len(dropped)
        assert torch.equal(call["pooled_projections"], torch.where(dropped[:, None], pooled[0], pooled[1]))


def test_the_shipped_flow_base_loads_through_the_real_loaders():
    from diffusers import StableDiffusion3Pipeline

    from diffusion_align.models.loading import load_components
    from diffusion_align.toy.assets import base_model
    folder = base_model("flow")
    assert not list(folder.rglob("*.bin")) and sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 14e6
    parts = load_components(str(folder), max_sequence_length=TEXT_TOKENS)
    assert parts.family == "sd3" and parts.family.max_sequence_length == TEXT_TOKENS
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    assert {m.dtype for m in (pipe.transformer, pipe.vae, pipe.text_encoder_3, *parts.text_encoders)} == {torch.float32}
    prompts = sample_prompts(4, seed=0, split="heldout")
    images = pipe(prompts, num_inference_steps=10, guidance_scale=3.0, height=32, width=32,
                  max_sequence_length=TEXT_TOKENS,
                  generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    assert [im.size for im in images] == [(32, 32)] * 4
    assert oracle_scores(images, prompts).mean() > 0.3  # it draws the world, if imperfectly (see measured.json)


@pytest.mark.parametrize("flow", [False, True])
def test_build_assets_rebuilds_each_base_at_its_shipped_settings(monkeypatch, tmp_path, flow):
    """`toy build-assets [--flow]` with no --unet-steps pretrains each base as long as the shipped one was
    (measured.json records it): the UNet base 6000 steps, the flow base `pretrain_flow.STEPS`."""
    import diffusion_align.toy.assets as assets
    from diffusion_align.cli import main
    seen = {}

    def build(out, seed, settings, **_):
        seen["settings"] = settings
        return {}
    monkeypatch.setattr(assets, "build_flow_base" if flow else "build_assets", build)
    main(["toy", "build-assets", "--out", str(tmp_path), *(["--flow"] if flow else [])])
    measured = json.loads((assets.asset_dir() / "measured.json").read_text())
    shipped = measured["flow"]["settings"]["pretrain"] if flow else measured["settings"]["pretrain"]
    assert seen["settings"].unet_steps == shipped["unet_steps"] == (3000 if flow else 6000)
    assert {k: v for k, v in vars(seen["settings"]).items() if k != "unet_steps"} == {
        k: v for k, v in shipped.items() if k != "unet_steps"}


def test_the_toy_flow_recipes_read_the_bases_text_length():
    from diffusion_align.config import load_config
    from diffusion_align.toy.demo import METHODS, recipe
    shipped = [p.stem for p in (Path(__file__).parent.parent / "configs" / "toy-flow").glob("*.yaml")]
    assert shipped and all(m.replace("-", "_") in METHODS for m in shipped)
    for method in shipped:
        cfg = load_config(recipe(method.replace("-", "_"), "flow"))
        assert cfg.model.max_sequence_length == TEXT_TOKENS and cfg.model.pretrained == "assets/toy/flow-base"
    with pytest.raises(ValueError, match="no toy recipe for"):
        recipe("nonexistent", "flow")


@pytest.mark.parametrize("method", ["mapo", "smpo", "sft", "pref_grpo", "grpo"])
def test_the_untuned_toy_flow_recipes_are_the_unet_bases(method):
    """The flow recipes not tuned on the flow base (their comments say so) are the UNet base's toy recipes (their
    `base:`) but for the base, its text length, where the output goes and the sampler's noise (DDIM's eta there, the
    SDE's noise level here, and its KL the Gaussians' as DDIM's): a setting changed in one of them without a flow
    sweep fails here."""
    from dataclasses import asdict

    from diffusion_align.config import load_config
    from diffusion_align.toy.demo import recipe
    unet, flow = (asdict(load_config(recipe(method, family))) for family in ("unet", "flow"))
    assert flow["model"]["pretrained"] == "assets/toy/flow-base"
    assert not flow["online"]["kl_beta"] or flow["online"]["sde_kl"] == "gaussian"  # the KL the UNet's DDIM takes
    for config in (unet, flow):
        del config["model"]["pretrained"], config["model"]["max_sequence_length"], config["train"]["output_dir"]
        del config["online"]["eta"], config["online"]["noise_level"], config["online"]["sde_kl"]
    assert flow == unet


def test_the_flow_demos_pairs_are_the_raters_labels_of_8_images_a_prompt(tmp_path, monkeypatch):
    """Unless told otherwise, `demo --family flow` trains the offline methods on the simulated raters' labels of every
    pair of 8 images a prompt (SmPO on the toy PickScore's cosines of them), the UNet base on the toy PickScore's of
    4; what is set explicitly is kept."""
    import pyarrow.parquet as pq
    from test_toy import config_trained

    from diffusion_align.toy.demo import DemoSettings

    trained = config_trained(monkeypatch, tmp_path / "flow", DemoSettings(family="flow", prompts=2, seed=3))
    assert Path(trained.data.path) == tmp_path / "flow" / "pairs-raters" / "pairs.parquet"
    table = pq.read_table(trained.data.path).to_pandas()
    assert len(table) == 2 * 28 and table.groupby("caption").size().tolist() == [28, 28]
    assert {"oracle_0", "oracle_1"} <= set(table.columns)  # the raters' labels come from the oracle's scores
    assert trained.train.max_steps == 2000  # the flow DPO recipe's, tuned on the validation split
    resolved = {(m, f): (s.labels, s.images_per_prompt) for m in ("dpo", "mapo", "dcpo", "sft", "smpo", "grpo")
                for f in ("unet", "flow") for s in [DemoSettings(method=m, family=f).resolved()]}
    assert resolved == {**{(m, "unet"): ("proxy", 4) for m in ("dpo", "mapo", "dcpo", "sft", "smpo", "grpo")},
                        **{(m, "flow"): ("raters", 8) for m in ("dpo", "mapo", "dcpo", "sft")},
                        ("smpo", "flow"): ("proxy", 8), ("grpo", "flow"): ("proxy", 8)}
    explicit = DemoSettings(family="flow", labels="proxy", images_per_prompt=3).resolved()
    assert (explicit.labels, explicit.images_per_prompt) == ("proxy", 3)


def test_flow_demo_end_to_end(tmp_path):
    """A shortened `demo --family flow`: pairs, labels, training and judging all on the flow base, every image drawn
    with T5 at the base's length, and the LoRA loads into StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    from diffusion_align.data.pairs import load_pairs
    from diffusion_align.toy.assets import base_model
    from diffusion_align.toy.demo import DemoSettings, run_demo
    out = tmp_path / "demo"
    report = run_demo(out, DemoSettings(family="flow", labels="proxy", label_margin=2.0, steps=2, prompts=4,
                                        images_per_prompt=3, eval_seeds=1, overrides=("train.batch_size=4",)))
    assert report["settings"]["family"] == "flow" and report["settings"]["recipe"] == "dpo.yaml"
    # the proxy's labels with a tie margin: a gap of 2 or less is a tie (which training drops)
    assert report["settings"]["label_margin"] == 2.0
    pairs, _ = load_pairs(str(out / "pairs"), keep_ties=True, extra_columns=("toy_pickscore_0", "toy_pickscore_1"))
    assert len(pairs) == 12
    for pair in pairs:
        gap = pair["toy_pickscore_0"] - pair["toy_pickscore_1"]
        assert (pair["label_0"], pair["label_1"]) == ((0.5, 0.5) if abs(gap) <= 2 else (float(gap > 0), float(gap < 0)))
    assert 0 < sum(p["label_0"] == 0.5 for p in pairs) < 12
    assert report["oracle_win_rate"]["comparisons"] == 73
    for name in ("pair-images", "base", "aligned"):
        records = [json.loads(line) for line in (out / name / "metadata.jsonl").read_text().splitlines()]
        assert {(r["model"], r["max_sequence_length"]) for r in records} == {(str(base_model("flow")), TEXT_TOKENS)}
    pipe = StableDiffusion3Pipeline.from_pretrained(base_model("flow"))
    pipe.load_lora_weights(report["files"]["LoRA weights"])
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())
