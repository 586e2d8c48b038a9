"""The latent and text-embedding cache: a cached run is the uncached run, without the VAE or text encoders; a cache
made from anything else is refused; building resumes and skips what does not decode."""

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from diffusion_align.cli import main as cli_main
from diffusion_align.data.cache import LatentCache, build_cache, cache_key, check_key
from diffusion_align.models.policy import LORA_WEIGHTS
from test_flow_train import vae_by_8
from test_train import read_metrics, run


@pytest.mark.parametrize("family, overrides", [
    ("sd", ["data.random_flip=image", "data.prompt_dropout=0.3"]),
    ("sdxl", ["data.random_flip=pair"]),  # sizes, crops and pooled states come from the cache
    ("sd3", ["data.random_flip=pair"]),  # three encoders' states, the VAE's shift factor
    ("flux", ["data.prompt_dropout=0.3"]),
])
def test_a_cached_run_is_the_uncached_run_without_vae_or_text_encoders(tmp_path, request, tiny_pairs,
                                                                       monkeypatch, family, overrides):
    flow = family in ("sd3", "flux")
    model = request.getfixturevalue("tiny_flow_models" if flow else "tiny_models")[family]
    common = [*overrides, "train.max_steps=3", "data.num_workers=0"]
    run(tmp_path / "plain", model, tiny_pairs, *common)
    cache = tmp_path / "cache"
    build_cache(str(tiny_pairs), cache, str(model), resolution=32, flips=True, dtype="fp32", device="cpu",
                num_workers=0)

    if flow:  # texts holding T5's states are sharded small (2.7 MB and more a text in fp16)
        assert all(len(load_file(path)["hidden"]) <= 64 for path in cache.glob("texts-*.safetensors"))
        assert json.loads((cache / "key.json").read_text())["shift_factor"] > 0
    loaded = []
    for cls in (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel):
        original = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained",
                            classmethod(lambda c, *a, _o=original, **kw: loaded.append(c.__name__) or _o(c, *a, **kw)))
    run(tmp_path / "cached", model, tiny_pairs, *common, "data.cache=true", f"data.cache_dir={cache}",
        "data.cache_dtype=fp32")
    assert not loaded

    # The same draws give the same errors to float rounding (the cache encodes 16 images a batch, the loop 4, and
    # CPU convolutions round differently per batch shape); DPO's beta (5000) scales their differences into the loss.
    plain, cached = read_metrics(tmp_path / "plain" / "run"), read_metrics(tmp_path / "cached" / "run")
    assert len(plain) == len(cached) == 3
    for a, b in zip(plain, cached):
        for name in ("model_err_w", "model_err_l", "ref_err_w", "ref_err_l"):
            assert a[name] == pytest.approx(b[name], rel=2e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    weights = [load_file(tmp_path / name / "run" / "final" / LORA_WEIGHTS) for name in ("plain", "cached")]
    # Adam turns those rounding differences into weight differences far below its step (lr 1e-3)
    assert all((weights[0][k] - weights[1][k]).norm() <= 1e-3 * weights[0][k].norm() for k in weights[0])


def test_an_fp16_cache_is_made_automatically_and_close(tmp_path, tiny_models, tiny_pairs):
    model = tiny_models["sd"]
    run(tmp_path / "plain", model, tiny_pairs, "train.max_steps=2")
    run(tmp_path / "cached", model, tiny_pairs, "train.max_steps=2", "data.cache=true")
    folder = tmp_path / "cached" / "run" / "latent-cache"
    assert json.loads((folder / "key.json").read_text())["dtype"] == "fp16"
    assert load_file(folder / "latents-00000.safetensors")["mean_0"].dtype == torch.float16
    plain, cached = read_metrics(tmp_path / "plain" / "run"), read_metrics(tmp_path / "cached" / "run")
    assert plain[-1]["model_err_w"] == pytest.approx(cached[-1]["model_err_w"], rel=1e-2)


def _changed_copy(model, tmp_path, part: str):
    """A copy of the tiny pipeline with one component's files changed."""
    copy = tmp_path / f"model-{part}"
    shutil.copytree(model, copy)
    edits = {"tokenizer": ("tokenizer_config.json", '"model_max_length": 77', '"model_max_length": 76'),
             "scheduler": ("scheduler_config.json", '"beta_end": 0.012', '"beta_end": 0.02')}
    if part in edits:
        name, old, new = edits[part]
        config = copy / part / name
        assert old in config.read_text()
        config.write_text(config.read_text().replace(old, new))
        return copy
    weights = next((copy / part).glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    return copy


def test_a_cache_made_from_anything_else_is_refused(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    model, pairs = tiny_models["sd"], str(tiny_pairs)
    folder = tmp_path / "cache"
    base = dict(resolution=32, flips=False, dtype="fp16")
    build_cache(pairs, folder, str(model), device="cpu", num_workers=0, **base)
    assert check_key(folder, cache_key(pairs, "train", str(model), **base))

    other_rows = tmp_path / "other.parquet"
    table = pq.read_table(pairs)
    pq.write_table(table.slice(0, table.num_rows - 1), other_rows)
    changes = {
        "resolution": cache_key(pairs, "train", str(model), **{**base, "resolution": 48}),
        "flips": cache_key(pairs, "train", str(model), **{**base, "flips": True}),
        "dtype": cache_key(pairs, "train", str(model), **{**base, "dtype": "fp32"}),
        "source.rows": cache_key(str(other_rows), "train", str(model), **base),
        **{f"models.{part}": cache_key(pairs, "train", str(_changed_copy(model, tmp_path, part)), **base)
           for part in ("vae", "text_encoder", "tokenizer")},
    }
    for changed, key in changes.items():
        with pytest.raises(ValueError, match=rf"made from other inputs \(.*{changed}=.*; a stale cache is never used"):
            check_key(folder, key)
    # the same file spelled otherwise (relative to another working folder) is the same source: its fingerprint is
    # of the resolved path and time, and the cache (up to a terabyte) was refused with the advice to delete it
    monkeypatch.chdir(Path(pairs).parent.parent)
    relative = os.path.relpath(pairs)
    assert check_key(folder, cache_key(relative, "train", str(model), **base))["source"]["path"] == pairs != relative
    made = build_cache(relative, folder, str(model), device="cpu", num_workers=0, **base)  # as a cached run calls it
    assert made.shards_reused == 2 and LatentCache(folder, cache_key(relative, "train", str(model), **base))
    # no cached tensor depends on the scheduler: the cache serves an edited one (reference errors key it themselves)
    assert check_key(folder, cache_key(pairs, "train", str(_changed_copy(model, tmp_path, "scheduler")), **base))
    with pytest.raises(ValueError, match="resolution=32 there, 48 now"):  # training refuses it too
        run(tmp_path, model, pairs, "train.max_steps=1", "train.resolution=48", "data.cache=true",
            f"data.cache_dir={folder}")


def test_building_resumes_and_counts_undecodable_rows(tmp_path, tiny_models, tiny_pairs, monkeypatch, caplog):
    from diffusion_align.data import cache as cache_module
    rows = pq.read_table(tiny_pairs).to_pylist()
    rows[3]["jpg_1"] = b"not an image"
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows), broken)
    monkeypatch.setattr(cache_module, "LATENT_SHARD_ROWS", 5)
    folder = tmp_path / "cache"
    report = build_cache(str(broken), folder, str(tiny_models["sd"]), resolution=32, device="cpu", num_workers=0)
    assert (report.rows, report.skipped, report.shards_reused) == (16, 1, 0)
    assert "row 3, column jpg_1: not a recognised image format" in caplog.text
    (folder / ".shards" / "latents-00002.json").unlink()  # as if killed while making the third shard
    report = build_cache(str(broken), folder, str(tiny_models["sd"]), resolution=32, device="cpu", num_workers=0)
    assert report.shards_reused == 4 and report.skipped == 1  # 4 latent shards and 1 text shard, one redone

    cache = LatentCache(folder)
    with pytest.raises(ValueError, match="row 3: an image of this pair did not decode"):
        cache.image(3, 0, False)
    assert cache.image(2, 1, False)["mean"].shape == (4, 16, 16)
    assert cache.texts(["", rows[0]["caption"]]).hidden.shape[0] == 2
    # training from it skips that pair, as the uncached loader does
    run(tmp_path, tiny_models["sd"], broken, "train.max_steps=8", "train.batch_size=4", "data.cache=true",
        f"data.cache_dir={folder}", "data.random_flip=no")
    assert read_metrics(tmp_path / "run")[-1]["skipped_rows"] >= 1


def test_the_cache_command(tmp_path, tiny_models, tiny_pairs, capsys):
    cli_main(["cache", str(tiny_pairs), "--model", str(tiny_models["sd"]), "--out", str(tmp_path / "c"),
              "--resolution", "32", "--flips", "--device", "cpu", "--workers", "0"])
    assert "16 rows (0 with an undecodable image)" in capsys.readouterr().out
    key = json.loads((tmp_path / "c" / "key.json").read_text())
    assert key["flips"] and key["resolution"] == 32 and set(key["models"]) == {"vae", "text_encoder", "tokenizer"}
    assert {"mean_0_flip", "std_1_flip", "ok"} <= set(load_file(tmp_path / "c" / "latents-00000.safetensors"))
    # settings no run can use, or that torch would refuse naming nothing, stop before anything is encoded
    for flag, value, message in (("--max-sequence-length", "5000", "max_sequence_length=5000: expected 1 to 512"),
                                 ("--batch-size", "0", "batch_size=0 and num_workers=0: expected at least 1"),
                                 ("--workers", "-1", "num_workers=-1: expected at least 1 image")):
        with pytest.raises(SystemExit):
            cli_main(["cache", str(tiny_pairs), "--model", str(tiny_models["sd"]), "--out", str(tmp_path / "d"),
                      "--resolution", "32", "--workers", "0", flag, value])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_component_digests_follow_the_weights_the_loaders_read(tmp_path, monkeypatch):
    from diffusion_align.models import loading
    folder = tmp_path / "model" / "vae"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (folder / name).write_bytes(b"weights " + name.encode())

    def digests():
        return [loading.component_digest(str(tmp_path / "model"), "vae", variant=v) for v in (None, "fp16")]
    before = digests()
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"other half-precision weights")
    after = digests()
    assert after[0] == before[0] and after[1] != before[1]  # each variant keyed by its own file only
    (folder / "config.json").write_text('{"scaling_factor": 0.2}')
    assert all(a != b for a, b in zip(digests(), after))  # and by the config

    # a hub id resolves to the hub cache, whose files link to blobs named by their sha256: those are not read
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    snapshot = tmp_path / "snapshot" / "vae"
    snapshot.mkdir(parents=True)
    (snapshot / "diffusion_pytorch_model.safetensors").symlink_to(blob)
    asked = {}
    monkeypatch.setattr(loading, "snapshot_download",
                        lambda repo, revision, allow_patterns, ignore_patterns: asked.update(
                            repo=repo, allow=allow_patterns, ignore=ignore_patterns) or str(tmp_path / "snapshot"))
    digest = loading.component_digest("org/model", "vae")
    assert asked["repo"] == "org/model" and "vae/*.safetensors" in asked["allow"]
    assert asked["ignore"] == ["vae/*.*.safetensors"]  # no other variant is downloaded
    blob.write_bytes(b"other bytes under the same name")
    assert loading.component_digest("org/model", "vae") == digest  # the name, not the content, was read

    # a component shipped as .bin only: its weights are downloaded (once no .safetensors came) and keyed too
    (snapshot / "diffusion_pytorch_model.safetensors").unlink()
    shipped = {"blob": blob}

    def download_bin(repo, revision, allow_patterns, ignore_patterns):
        asked.setdefault("calls", []).append(allow_patterns)
        if "vae/*.bin" in allow_patterns:
            (snapshot / "diffusion_pytorch_model.bin").unlink(missing_ok=True)
            (snapshot / "diffusion_pytorch_model.bin").symlink_to(shipped["blob"])
        return str(tmp_path / "snapshot")
    monkeypatch.setattr(loading, "snapshot_download", download_bin)
    bin_digest = loading.component_digest("org/model", "vae")
    assert asked["calls"][-1] == ["vae/*.bin"] and bin_digest != digest
    shipped["blob"] = blob.with_name("cd" * 32)
    shipped["blob"].write_bytes(b"new weights")
    (snapshot / "diffusion_pytorch_model.bin").unlink()
    assert loading.component_digest("org/model", "vae") != bin_digest
    (snapshot / "diffusion_pytorch_model.bin").unlink()
    (snapshot / "diffusion_pytorch_model.safetensors").symlink_to(blob)

    # what the hub gives for those patterns (huggingface_hub's own filter): a variant's weights whole or in shards,
    # which `*.fp16.safetensors` alone missed, so a sharded fp16 text encoder's weights were not in its digest
    from huggingface_hub.utils import filter_repo_objects
    repo = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors", "vae/model.fp16-00001-of-00002.safetensors", "vae/model.fp16-00002-of-00002.safetensors",
            "vae/model.safetensors.index.fp16.json", "vae/model-00001-of-00002.safetensors", "unet/config.json"]
    calls = []
    monkeypatch.setattr(loading, "snapshot_download", lambda repo, revision, allow_patterns, ignore_patterns:
                        calls.append((allow_patterns, ignore_patterns)) or str(tmp_path / "snapshot"))
    for variant, expected in ((None, [0, 1, 5, 6]), ("fp16", [0, 2, 3, 4, 5])):
        calls.clear()
        loading.component_digest("org/model", "vae", variant=variant)
        allow, ignore = calls[0]  # (the snapshot holds no fp16 weights: a second call asks for .bin ones)
        assert list(filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore)) == [
            repo[i] for i in expected], variant


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_cache_of_latents_not_whole_tokens_is_refused_before_encoding(tmp_path, tiny_flow_models, tiny_pairs,
                                                                             capsys, family):
    """40 px through a VAE downsampling by 8 are 5x5 latents, which SD3's 2x2 patches and FLUX's 2x2 packing cannot
    cut: refused before any image is encoded (test_flow_train.py: the run refuses them too)."""
    vae = vae_by_8(tmp_path / "vae", tiny_flow_models[family])
    with pytest.raises(SystemExit) as exit_:
        cli_main(["cache", str(tiny_pairs), "--model", str(tiny_flow_models[family]), "--vae", vae, "--resolution",
                  "40", "--out", str(tmp_path / "c"), "--device", "cpu", "--workers", "0"])
    assert exit_.value.code == 2 and not (tmp_path / "c").exists()
    assert "resolution=40 must be a multiple of 16 for" in capsys.readouterr().err
