"""End-to-end training runs on tiny pipelines of every family, loaded through the real diffusers loading code."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from diffusion_align.cli import main as cli_main
from diffusion_align.config import load_config
from diffusion_align.files import list_checkpoints
from diffusion_align.models.policy import LORA_WEIGHTS
from diffusion_align.training import checkpoints
from diffusion_align.training.trainer import train

TINY_CONFIG = Path(__file__).parent.parent / "configs" / "tiny" / "dpo.yaml"
METRIC_KEYS = {"step", "loss", "implicit_acc", "reward_margin", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l",
               "lr", "grad_norm", "pairs_per_s", "skipped_rows"}


def run(tmp_path, model, pairs, *overrides):
    cfg = load_config(TINY_CONFIG, [f"model.pretrained={model}", f"data.path={pairs}",
                                    f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
                                    "train.batch_size=2", "train.grad_accum=1", "train.warmup_steps=0",
                                    "train.checkpoint_every=0", "train.report_to=none", *overrides])
    return train(cfg)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def generate(pipe, **kw):
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", **kw}
    return pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0), **kw).images


def test_dpo_lora_sd_end_to_end(tmp_path, tiny_models, tiny_pairs):
    result = run(tmp_path, tiny_models["sd"], tiny_pairs, "train.report_to=tensorboard")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert METRIC_KEYS <= set(records[0])
    # LoRA's up-projection starts at zero, so the first step sees policy == reference: loss = log 2 exactly
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["model_err_w"] == records[0]["ref_err_w"]
    assert records[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert list((tmp_path / "run").rglob("events.out.tfevents*")), "TensorBoard logs are written by default"
    with Image.open(tmp_path / "run" / "training_curves.png") as curves:  # drawn at the end of every run
        assert curves.size[0] > 500
    final = result.final_dir
    assert {LORA_WEIGHTS, "README.md", "training_config.yaml"} <= {p.name for p in final.iterdir()}
    assert "base_model:" in (final / "README.md").read_text()
    assert load_config(final / "training_config.yaml").method.name == "dpo"

    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    before = generate(pipe)
    pipe.load_lora_weights(final, weight_name=LORA_WEIGHTS)
    after = generate(pipe)
    assert abs(after - before).max() > 1e-4, "the trained LoRA changes what the pipeline generates"
    # the loaded adapter holds exactly the trained weights
    trained = {k: v for k, v in result.denoiser.state_dict().items() if "lora_B" in k}
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_B" in k}
    assert len(trained) == len(loaded) > 0
    for (k1, v1), (k2, v2) in zip(sorted(trained.items()), sorted(loaded.items())):
        assert torch.equal(v1, v2), (k1, k2)


def test_full_finetune_v_prediction_sd2(tmp_path, tiny_models, tiny_pairs):
    result = run(tmp_path, tiny_models["sd2"], tiny_pairs, "model.lora_rank=null", "train.lr=1e-4")
    records = read_metrics(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the frozen copy equals the policy at start
    pipe = DiffusionPipeline.from_pretrained(result.final_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    original = DiffusionPipeline.from_pretrained(tiny_models["sd2"])
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, original.unet.state_dict()[k])]
    assert changed, "the saved pipeline carries the trained UNet"
    for name in ("vae", "text_encoder"):  # untouched parts are saved as they were
        for k, v in getattr(pipe, name).state_dict().items():
            assert torch.equal(v, getattr(original, name).state_dict()[k])
    assert not list(result.final_dir.rglob("*.bin")), "weights are written as safetensors only"
    # the card points ComfyUI / AUTOMATIC1111 users to the single file, which holds the trained UNet
    assert "--format single-file" in (result.final_dir / "README.md").read_text()
    cli_main(["export", str(tmp_path / "run"), "--format", "single-file", "--out", str(tmp_path / "sd2.safetensors")])
    loaded = StableDiffusionPipeline.from_single_file(tmp_path / "sd2.safetensors", config=str(tiny_models["sd2"]),
                                                      local_files_only=True)
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_dpo_lora_sdxl_loads_in_the_sdxl_pipeline(tmp_path, tiny_models, tiny_pairs):
    result = run(tmp_path, tiny_models["sdxl"], tiny_pairs, "data.center_crop=false", "data.random_flip=pair")
    records = read_metrics(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sdxl"])
    before = generate(pipe)
    pipe.load_lora_weights(result.final_dir)
    assert abs(generate(pipe) - before).max() > 1e-4


def test_sft_trains_without_a_reference(tmp_path, tiny_models, tiny_pairs):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "method.name=sft")
    records = read_metrics(tmp_path / "run")
    assert "ref_err_w" not in records[0] and "model_err_l" not in records[0]
    assert records[0]["loss"] == pytest.approx(records[0]["model_err_w"])


def test_resume_reaches_the_uninterrupted_weights(tmp_path, tiny_models, tiny_pairs):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "data.random_flip=image", "data.center_crop=false",
              "data.prompt_dropout=0.3", "train.grad_accum=2", "train.warmup_steps=2"]
    whole = run(tmp_path / "whole", tiny_models["sd"], tiny_pairs, *common)
    assert (tmp_path / "whole/run/checkpoint-2").is_dir() and (tmp_path / "whole/run/checkpoint-4").is_dir()
    # a second run that stopped after its step-2 checkpoint: copy only that checkpoint and resume from it
    resumed_dir = tmp_path / "resumed" / "run"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole/run/checkpoint-2", resumed_dir / "checkpoint-2")
    (resumed_dir / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in read_metrics(tmp_path / "whole/run") if r["step"] <= 3) + '{"step": 4, "lo')
    # it crashed while writing step 4's line: on resume, step 3's line and the broken line are written anew
    resumed = run(tmp_path / "resumed", tiny_models["sd"], tiny_pairs, *common, "train.resume=latest")
    a = load_file(whole.final_dir / LORA_WEIGHTS)
    b = load_file(resumed.final_dir / LORA_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_metrics(resumed_dir)]
    assert steps == [1, 2, 3, 4], "metrics after the checkpoint are rewritten, not duplicated"
    assert read_metrics(resumed_dir)[2]["loss"] == read_metrics(tmp_path / "whole/run")[2]["loss"]


def test_checkpoints_keep_only_the_newest(tmp_path, tiny_models, tiny_pairs):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=3", "train.checkpoint_every=1",
        "train.checkpoints_keep=2")
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_kill_while_pruning_leaves_no_half_checkpoint(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    """An older checkpoint is moved out of sight before it is removed: a kill in the removal left a half folder
    named checkpoint-N, which train.resume=PATH or export would then read."""
    real_rmtree = checkpoints.shutil.rmtree

    def killed(path, *args, **kwargs):
        if ".removed" in str(path):
            (Path(path) / "optimizer.pt").unlink()  # part of it gone
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=3", "train.checkpoint_every=1",
            "train.checkpoints_keep=1")
    assert [p.name for _, p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    from diffusion_align.training.safety import run_entries
    assert ".checkpoint-1.removed" in run_entries(tmp_path / "run")  # what train.overwrite clears
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=3", "train.checkpoint_every=1",
        "train.checkpoints_keep=1", "train.resume=latest")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]


def test_bad_rows_are_skipped_and_counted(tmp_path, tiny_models, tiny_pairs):
    table = pq.read_table(tiny_pairs).to_pylist()
    table[1]["jpg_1"] = b"not an image"
    table[4]["jpg_0"] = b""
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(tiny_pairs)), bad)
    run(tmp_path, tiny_models["sd"], bad, "train.max_steps=8", "train.batch_size=2")  # 16 pairs: one epoch
    records = read_metrics(tmp_path / "run")
    assert records[-1]["skipped_rows"] == 2
    assert len(records) == 8


def test_cli_train_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.checkpoint_every" in out and "model.lora_rank = 8" in out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", str(TINY_CONFIG), "train.learning_rate=1"])
    assert exit_info.value.code == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_missing_model_folder_is_explained(tmp_path, tiny_models, tiny_pairs):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        run(tmp_path, tmp_path / "not-a-model", tiny_pairs)
    # a pipeline folder without its denoiser's config: a missing input, not "could not write"
    shutil.copytree(tiny_models["sd"], tmp_path / "no-unet-config")
    (tmp_path / "no-unet-config" / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="its model_index.json names a unet, but unet/config.json could not be "
                                                "read"):
        run(tmp_path, tmp_path / "no-unet-config", tiny_pairs)


@pytest.mark.parametrize("override, message", [
    ("model.pretrained=outputs/no/such-model", "outputs/no/such-model: no such folder, and not a hub id"),
    ("model.pretrained=someone/no-such-model", "model.pretrained 'someone/no-such-model': not a local path, and the "
                                               "hub could not provide it"),
    ("data.path=someone/no-such-pairs", "data.path 'someone/no-such-pairs': not a local path, and the hub could not "
                                        "provide it \\(.*huggingface-cli download --repo-type dataset someone/no-such"),
    ("model.vae=someone/no-such-vae", "model.vae 'someone/no-such-vae': not a local path"),
], ids=["missing-folder", "hub-model-offline", "hub-dataset-offline", "hub-vae-offline"])
def test_unreachable_models_and_data_are_one_line_errors(tmp_path, tiny_models, tiny_pairs, capsys, override,
                                                         message):
    args = ["train", str(TINY_CONFIG), f"model.pretrained={tiny_models['sd']}", f"data.path={tiny_pairs}",
            f"train.output_dir={tmp_path / 'run'}", "train.report_to=none", override]
    with pytest.raises(SystemExit) as exit_info:  # the tests run offline (conftest)
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert re.search(message, err.splitlines()[-1]) and err.splitlines()[-1].startswith("diffusion-align train: error")


@pytest.mark.parametrize("options", [
    ["train.mixed_precision=bf16", "model.gradient_checkpointing=true", "train.optimizer=adafactor"],
    ["model.lora_rank=null", "model.ref_offload=true", "data.streaming=true", "data.prompt_dropout=0.5"],
], ids=["lora-bf16-checkpointing-adafactor", "full-offloaded-reference-streaming"])
def test_training_options(tmp_path, tiny_models, tiny_pairs, options, monkeypatch):
    loaded_in, from_pretrained = [], UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded_in.append(kwargs.get("dtype"))
        return from_pretrained(cls, *args, **kwargs)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    result = run(tmp_path, tiny_models["sd"], tiny_pairs, *options)
    # a LoRA's frozen base loads straight into its dtype (through fp32, FLUX.1's took 48 GB of host memory)
    assert loaded_in[0] == (torch.bfloat16 if "train.mixed_precision=bf16" in options else None)
    records = read_metrics(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert result.final_dir.is_dir()
    assert "None" not in (result.final_dir / "README.md").read_text()  # a stream's counts are not known: left out


def test_unusable_settings_are_explained(tmp_path, tiny_models, tiny_pairs):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
            run(tmp_path, tiny_models["sd"], tiny_pairs, "train.mixed_precision=fp16")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs bitsandbytes"):
            run(tmp_path, tiny_models["sd"], tiny_pairs, "train.optimizer=adamw8bit")
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, f"train.resume={tmp_path}")


def test_a_nonfinite_step_is_skipped(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    import dataclasses

    from diffusion_align.training import methods
    dpo, calls = methods.METHODS["dpo"], []

    def poisoned(errors, cfg):  # the DPO loss, but NaN on the second batch
        calls.append(1)
        loss, metrics = dpo.objective(errors, cfg)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    monkeypatch.setitem(methods.METHODS, "dpo", dataclasses.replace(dpo, objective=poisoned))
    result = run(tmp_path, tiny_models["sd"], tiny_pairs)
    records = read_metrics(tmp_path / "run")
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in result.denoiser.parameters())


@pytest.fixture
def unet_calls(monkeypatch):
    """Every UNet forward: (id of the module, number of rows)."""
    from diffusers import UNet2DConditionModel
    calls, forward = [], UNet2DConditionModel.forward

    def counted(self, sample, *args, **kwargs):
        calls.append((id(self), sample.shape[0]))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    return calls


@pytest.mark.parametrize("lora", ["4", "null"], ids=["lora", "full"])
def test_mapo_runs_no_reference(tmp_path, tiny_models, tiny_pairs, unet_calls, lora):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "method.name=mapo", f"model.lora_rank={lora}")
    # 3 steps x 1 micro-batch: one UNet pass each, over 2 pairs = 4 rows, always the same (and only) UNet
    assert [rows for _, rows in unet_calls] == [4, 4, 4]
    assert len({module for module, _ in unet_calls}) == 1
    records = read_metrics(tmp_path / "run")
    assert {"score_w", "score_l", "margin_term", "implicit_acc"} <= records[0].keys()
    assert "ref_err_w" not in records[0]


def test_dpo_runs_the_reference_on_the_same_rows(tmp_path, tiny_models, tiny_pairs, unet_calls):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=1")
    assert [rows for _, rows in unet_calls] == [4, 4]  # policy, then the same UNet with its adapters off


def test_smpo_soft_labels_and_inversion(tmp_path, tiny_models, tiny_pairs, unet_calls, monkeypatch):
    from diffusion_align import rewards
    from diffusion_align.rewards.tiny import save_tiny_scorer
    from diffusion_align.rewards.labeling import reward_scores
    from diffusion_align.training import trainer
    scorer = save_tiny_scorer("pickscore", tmp_path / "pickscore")
    table = pq.read_table(tiny_pairs).to_pylist()
    for i in range(4):  # human ties: dropped before the reward orients the other pairs
        table[i].update(caption=f"tied pair {i}", label_0=0.5, label_1=0.5)
    source = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(table), source)
    loaded, load_pairs = [], trainer.load_pairs
    monkeypatch.setattr(trainer, "load_pairs", lambda *a, **kw: loaded.append(load_pairs(*a, **kw)) or loaded[-1])

    run(tmp_path, tiny_models["sd"], source, "method.name=smpo", f"method.pref_scorer=pickscore={scorer}",
        "method.inversion_steps=2", "data.max_pairs=12")  # 12 pairs are left: max_pairs keeps them all
    # per step: 2 inversion steps x (step + ReNoise re-evaluation), the policy, the reference
    assert [rows for _, rows in unet_calls[:6]] == [4] * 6 and len(unet_calls) == 18
    records = read_metrics(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert 0.5 <= records[0]["pref_prob"] <= 1.0  # pairs are oriented by the reward
    assert "effective_scale" in records[0]
    pairs, stats = loaded[0]
    assert (stats.rows, stats.ties_dropped, stats.pairs) == (16, 4, 12) and "tied pair 0" not in pairs["caption"]
    for row in pairs:  # the higher reward is image 0 exactly where label_0 is 1
        s0, s1 = row["pickscore_cosine_0"], row["pickscore_cosine_1"]
        assert row["label_0"] == (0.5 if s0 == s1 else float(s0 > s1))
    # the cache holds the scores and the source rows of the 12 pairs trained on (not of the ties), no images
    [cache] = (tmp_path / "run" / "soft-labels").iterdir()
    table = pq.read_table(cache / "pairs-00000.parquet")
    assert table.column_names == ["row", "pickscore_cosine_0", "pickscore_cosine_1"]
    assert table["row"].to_pylist() == list(range(4, 16))
    assert sum(p.stat().st_size for p in cache.glob("*.parquet")) < source.stat().st_size / 4

    # the finished cache is found without loading the scorer again (as the other processes of a run find it)
    monkeypatch.setattr(rewards, "load_scorer", lambda *a, **kw: pytest.fail("the scorer was loaded again"))
    scores = reward_scores(str(source), "pickscore_cosine", f"pickscore={scorer}", cache.parent)["pickscore_cosine_0"]
    assert np.isnan(scores[:4]).all() and all(abs(s) <= 1 for s in scores[4:])
    run(tmp_path, tiny_models["sd"], source, "method.name=smpo", f"method.pref_scorer=pickscore={scorer}",
        "method.inversion_steps=0", "train.max_steps=1", "train.overwrite=true")  # the scores cache is kept


def test_dcpo_conditions_winner_and_loser_on_their_captions(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    rows = pq.read_table(tiny_pairs).to_pylist()
    for i, row in enumerate(rows):  # unique per row: a prompt repeats across pairs
        row["caption_0"], row["caption_1"] = f"{row['caption']} {i}#0", f"{row['caption']} {i}#1"
    captions = tmp_path / "captions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), captions)
    from diffusion_align.training import inputs
    seen, encode = [], inputs.encode_texts
    monkeypatch.setattr(inputs, "encode_texts", lambda *a, **kw: seen.append(a[3]) or encode(*a, **kw))
    run(tmp_path, tiny_models["sd"], captions, "method.name=dcpo", "train.max_steps=2")
    winners = {r["caption_0"] if r["label_0"] > r["label_1"] else r["caption_1"] for r in rows}
    assert len(seen) == 2  # one batch per step
    for prompts in seen:
        half = len(prompts) // 2
        assert all(p in winners for p in prompts[:half]) and not any(p in winners for p in prompts[half:])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption_0', 'caption_1'\]"):
        run(tmp_path / "plain", tiny_models["sd"], tiny_pairs, "method.name=dcpo")


def test_prediction_type_mismatch_is_an_error(tmp_path, tiny_models, tiny_pairs):
    with pytest.raises(ValueError, match="model.prediction_type=epsilon, but .* says v_prediction"):
        run(tmp_path, tiny_models["sd2"], tiny_pairs, "model.prediction_type=epsilon")
    with pytest.raises(ValueError, match="inversion_steps is an smpo setting"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "method.inversion_steps=3")
    with pytest.raises(ValueError, match="label_smoothing is a dpo and dcpo setting .*; mapo's loss does not"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "method.name=mapo", "method.label_smoothing=0.1")
    for override in ("train.timestep_sampling=uniform", "train.logit_std=2"):
        with pytest.raises(ValueError, match="settings of the flow families .*; sd trains on timesteps drawn "
                                             "uniformly"):
            run(tmp_path, tiny_models["sd"], tiny_pairs, override)


def test_training_on_data_where_no_image_decodes_stops_with_one_line(tmp_path, tiny_models, tiny_pairs):
    """It used to draw batches forever, logging every skipped row (hundreds of MB in minutes)."""
    from diffusion_align.training.safety import RunStopped
    table = pq.read_table(tiny_pairs).to_pylist()
    for row in table:
        row["jpg_0"] = b"x"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(tiny_pairs)), bad)
    with pytest.raises(RunStopped, match=r"bad.parquet: no pair of a whole pass over the data \(8 batches, 16 rows "
                                         r"skipped in all\) could be decoded; the last: "):
        run(tmp_path, tiny_models["sd"], bad, "train.batch_size=2")
    # a stream, whose length is not known before a pass: it stops at the end of the first
    with pytest.raises(ValueError, match=r"rank 0: no pair of a whole pass over the pair stream \(8 batches\) could "
                                         r"be used; the last: pair \d+, column jpg_0"):  # a stream's: as read
        run(tmp_path / "streamed", tiny_models["sd"], bad, "train.batch_size=2", "data.streaming=true")


def test_training_on_data_mostly_undecodable_stops_after_a_pass(tmp_path, tiny_models, tiny_pairs):
    """12 of 16 rows broken: a pass over the data is 75% skipped rows, above data.max_skipped_share (0.5)."""
    from diffusion_align.training.safety import RunStopped
    table = pq.read_table(tiny_pairs).to_pylist()
    for row in table[:12]:
        row["jpg_1"] = b"x"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(tiny_pairs)), bad)
    with pytest.raises(RunStopped, match=r"bad.parquet: 12 of the 16 rows drawn \(75%\) could not be decoded, more "
                                         r"than data.max_skipped_share=0.5; the last: row \d+, column jpg_1"):
        run(tmp_path, tiny_models["sd"], bad, "train.batch_size=2", "train.max_steps=20")
    run(tmp_path / "tolerant", tiny_models["sd"], bad, "train.batch_size=2", "train.max_steps=20",
        "data.max_skipped_share=1")  # told to keep going: it trains on the 4 good pairs
    assert read_metrics(tmp_path / "tolerant" / "run")[-1]["skipped_rows"] >= 12


def test_written_models_get_the_usual_permissions(tmp_path, tiny_models, tiny_pairs):
    """safetensors writes through a private temp file (0600): a LoRA that a ComfyUI server running as another user
    could not read. Every file of the final model and the checkpoints gets what the umask gives a new file."""
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=3")
    written = [p for folder in ("final", "checkpoint-3") for p in (tmp_path / "run" / folder).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}


def test_the_returned_denoiser_is_the_saved_one(tmp_path, tiny_models, tiny_pairs):
    """A bf16 full fine-tune returned its UNet still wrapped in accelerate's autocast: its outputs were bf16's,
    1e-2 away from the same weights loaded from final/."""
    from diffusers import UNet2DConditionModel
    result = run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=1", "model.lora_rank=null",
                 "train.mixed_precision=bf16")
    saved = UNet2DConditionModel.from_pretrained(result.final_dir / "unet")
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(result.denoiser.float()(x, t, text).sample, saved(x, t, text).sample,
                                   rtol=0, atol=0)
