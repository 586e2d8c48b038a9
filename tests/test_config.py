from pathlib import Path

import pytest
import yaml

from diffusion_align.cli import build_parser
from diffusion_align.config import (ConfigError, OnlineConfig, TrainConfig, all_keys, config_to_yaml, describe_keys,
                                    load_config)

# training configs; configs/accelerate/ holds accelerate's launch configs (test_sharding.py reads them as it does)
CONFIGS = sorted(p for p in Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml")
                 if p.parent.name != "accelerate")

ISSUE_KEYS = ["method.name", "method.beta", "model.pretrained", "model.lora_rank", "data.path", "train.output_dir",
              "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr", "train.seed", "train.resolution",
              "train.checkpoint_every", "train.resume"]


def test_documented_keys_exist_and_help_lists_every_key():
    keys = all_keys()
    assert set(ISSUE_KEYS) <= set(keys)
    text = describe_keys()
    for key in keys:
        assert f"  {key} = " in text
    assert "train.lr = 1.0e-05" in text and "model.lora_rank = 8" in text
    assert describe_keys() in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: sft\ntrain:\n  lr: 1e-4\n  max_steps: 10\nmodel:\n  lora_rank: 4\n")
    cfg = load_config(path, ["train.max_steps=3", "model.lora_rank=null", "model.lora_target_modules=to_q,to_v",
                             "data.random_flip=image"])
    assert cfg.method.name == "sft"
    assert cfg.train.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string; the schema makes it a float
    assert cfg.train.max_steps == 3
    assert cfg.model.lora_rank is None
    assert cfg.model.lora_target_modules == ["to_q", "to_v"]
    assert cfg.data.random_flip == "image"
    assert cfg.train.batch_size == 1  # untouched default


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", "unknown config key 'train.learning_rate' (on the command line); did you mean 'train.lr'?"),
    ("lr=1", "did you mean 'train.lr'?"),
    ("weighting_scheme=none", "did you mean 'train.timestep_sampling'?"),  # diffusers' SD3 / FLUX scripts' name
    ("train.max_step=5", "did you mean 'train.max_steps'?"),
    ("modle.pretrained=x", "did you mean 'model.pretrained'?"),
    ("train.max_steps=1.5", "'train.max_steps' (on the command line) expects int, got 1.5"),
    ("train.seed=yes", "expects int"),
    ("train.lr=fast", "expects float"),
    ("train.max_steps=null", "cannot be null"),
    ("method.name=ppo", "must be one of dpo, mapo, smpo, dcpo, sft"),
    ("train.resume", "not of the form section.key=value"),
    # ranges: nonsense settings stop here, before anything runs
    ("train.max_steps=-5", "'train.max_steps' (on the command line) must be at least 1; got -5"),
    ("model.lora_rank=0", "'model.lora_rank' (on the command line) must be at least 1 (or null); got 0"),
    ("train.lr=0", "'train.lr' (on the command line) must be greater than 0; got 0.0"),
    ("data.prompt_dropout=1.5", "'data.prompt_dropout' (on the command line) must be between 0 and 1 ([0, 1]); "
                                "got 1.5"),
    ("train.adam_beta2=1", "must be between 0 and 1 ([0, 1)); got 1.0"),
    ("online.train_fraction=0", "must be between 0 and 1 ((0, 1]); got 0.0"),
    ("train.checkpoint_every=-1", "must be at least 0; got -1"),
    # a bad seed failed after the models loaded, naming no key; a mistyped key whose value YAML cannot read gave a
    # YAML error; swapped SmPO score bounds turned every soft label over
    ("train.seed=-1", "'train.seed' (on the command line) must be between 0 and 4294967295"),
    ("train.seed=4294967296", "must be between 0 and 4294967295"),
    ("data.pth=*.parquet", "unknown config key 'data.pth' (on the command line); did you mean 'data.path'?"),
    ("method.score_max=0.1", "method.score_max=0.1 must be above method.score_min=0.115"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_edges_of_the_ranges_are_allowed_and_help_shows_them():
    cfg = load_config(None, ["train.max_steps=1", "model.lora_rank=null", "data.prompt_dropout=1",
                             "online.train_fraction=1", "train.adam_beta1=0", "train.checkpoint_every=0"])
    assert cfg.train.max_steps == 1 and cfg.model.lora_rank is None and cfg.data.prompt_dropout == 1.0
    assert "Number of steps" in describe_keys() and "[at least 1]" in describe_keys()


def test_an_empty_text_value_is_refused():
    """`train.output_dir=$OUT` with OUT unset trained into the working folder."""
    for override, expected in (("train.output_dir=", "a str"), ("model.revision= ", "a str or null")):
        with pytest.raises(ConfigError, match=rf"is empty; expected {expected} \(an unset shell variable\?\)"):
            load_config(None, [override])


def test_a_path_under_home_is_expanded_in_a_file_as_on_the_command_line(tmp_path, monkeypatch):
    """`output_dir: ~/runs/x` in a YAML file (or `train.output_dir=~/runs/x`, which bash does not expand) wrote into
    a folder named `~` under the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  output_dir: ~/runs/x\ndata:\n  cache_dir: ~user-not-home/cache\n")
    cfg = load_config(path)
    assert cfg.train.output_dir == str(tmp_path / "home" / "runs" / "x")
    assert cfg.data.cache_dir == "~user-not-home/cache"  # only ~/ is the home folder here
    assert load_config(None, ["model.pretrained=~/models/sd"]).model.pretrained == str(tmp_path / "home/models/sd")


def test_yes_no_on_off_are_text_for_text_keys(tmp_path):
    # YAML 1.1 reads `no`, `off`, `yes`, `on` as bools, on the command line and in files alike
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  output_dir: On\ndata:\n  random_flip: no\n"
                    "model:\n  revision: yes\n  lora_target_modules: [off, to_q]\n  gradient_checkpointing: yes\n")
    for cfg in (load_config(path), load_config(None, [
            "train.mixed_precision=no", "train.output_dir=On", "data.random_flip=no", "model.revision=yes",
            "model.lora_target_modules=[off, to_q]", "model.gradient_checkpointing=yes"])):
        assert (cfg.train.mixed_precision, cfg.data.random_flip, cfg.model.revision) == ("no", "no", "yes")
        assert cfg.train.output_dir == "On" and cfg.model.lora_target_modules == ["off", "to_q"]
        assert cfg.model.gradient_checkpointing is True  # a bool key reads them as YAML does
    assert load_config(None, ["train.mixed_precision=false"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'data.random_flip' .* expects one of no, pair, image, got True"):
        load_config(None, ["data.random_flip=true"])  # which flip is meant must be said
    with pytest.raises(ConfigError, match="'model.pretrained' .* expects str, got True"):
        load_config(None, ["model.pretrained=true"])
    with pytest.raises(ConfigError, match="'train.max_steps' .* expects int, got 'on'"):
        load_config(None, ["train.max_steps=on"])


@pytest.mark.parametrize("text, twice", [
    ("train:\n  lr: 1e-5\n  max_steps: 10\n  lr: 1e-4\n", "line 4, column 3: key 'lr' is set twice"),
    ("train:\n  lr: 1e-5\nmethod:\n  beta: 10\ntrain:\n  max_steps: 3\n", "line 5, column 1: key 'train' is set twice"),
    ("train:\n  lr: 1e-5\ntrain.lr: 1e-4\n", "config key 'train.lr' is set twice"),
])
def test_a_key_set_twice_in_one_file_is_an_error(tmp_path, text, twice):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)) as err:  # PyYAML alone keeps the last, silently
        load_config(path)
    assert twice in str(err.value)


# YAML 1.1 reads each of these as a number that prints otherwise (0123456 is an octal 42798, 1:30 a sexagesimal 90),
# or as a date; plain numbers print as written
WRITTEN = ["0123456", "0700", "1_000", "1.10", "1:30", "0x1F", "+1", ".5", "1.0e-4", ".inf", "2024-05-01",
           "100", "0.5", "-3", "1e-5"]


@pytest.mark.parametrize("written", WRITTEN)
def test_text_keys_take_numbers_and_dates_as_written(tmp_path, written):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  revision: {written}\n  lora_target_modules: [{written}, to_q]\n"
                    f"train:\n  output_dir: {written}\n")
    overrides = [f"model.revision={written}", f"model.lora_target_modules=[{written}, to_q]",
                 f"train.output_dir={written}"]
    for cfg in (load_config(path), load_config(None, overrides)):
        assert (cfg.model.revision, cfg.train.output_dir) == (written, written)
        assert cfg.model.lora_target_modules == [written, "to_q"]
        assert all(type(v) is str for v in (cfg.model.revision, *cfg.model.lora_target_modules))
        saved = yaml.safe_load(config_to_yaml(cfg))  # the run's config.yaml, which a resume compares with
        assert saved["model"]["revision"] == saved["train"]["output_dir"] == written


@pytest.mark.parametrize("override, value", [
    ("train.max_steps=1000", 1000), ("train.max_steps=1_000", 1000), ("train.max_steps=0x10", 16),
    ("train.max_steps=+5", 5), ("train.seed=3", 3), ("train.logit_mean=-3", -3.0), ("model.lora_rank=8.0", 8), ("train.lr=1e-5", 1e-5),
    ("train.lr=0.0003", 3e-4), ("train.lr=3.0e-4", 3e-4), ("train.lr=.5", 0.5), ("method.beta=5e3", 5000.0),
    ("method.beta=1_000.5", 1000.5), ("train.logit_mean=-.inf", float("-inf")), ("data.max_skipped_share=1", 1.0),
])
def test_numeric_keys_read_numbers_as_yaml_does(override, value):
    key, _ = override.split("=")
    section, name = key.split(".")
    got = getattr(getattr(load_config(None, [override]), section), name)
    assert got == value and type(got) is type(value)


def test_a_section_with_no_keys_sets_nothing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: sft\nonline:\n#  group_size: 4\ntrain:\n")  # its keys commented out
    cfg = load_config(path)
    assert cfg.method.name == "sft" and cfg.online == OnlineConfig() and cfg.train == TrainConfig()
    path.write_text("onlin:\n")
    with pytest.raises(ConfigError, match="unknown config key 'onlin'"):
        load_config(path)


def test_a_config_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x9c\x00\xff binary")
    with pytest.raises(ConfigError, match=r"model.safetensors: not a text file; expected a YAML config file"):
        load_config(path)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"'train.batchsize' \(in .*c.yaml\); did you mean 'train.batch_size'"):
        load_config(path)


def test_a_config_builds_on_the_file_its_base_names(tmp_path):
    """`base:` (relative to the file) is read first, recursively; the file's keys, then the overrides, win."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "first.yaml").write_text("method:\n  name: sft\ntrain:\n  lr: 1e-4\n  max_steps: 10\n")
    (tmp_path / "recipes" / "second.yaml").write_text("base: ../first.yaml\ntrain:\n  max_steps: 20\n  batch_size: 4\n")
    (tmp_path / "recipes" / "third.yaml").write_text("base: second.yaml\ntrain:\n  batch_size: 8\n")
    cfg = load_config(tmp_path / "recipes" / "third.yaml", ["train.lr=2e-4"])
    assert (cfg.method.name, cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == ("sft", 2e-4, 20, 8)
    assert load_config(tmp_path / "recipes" / "second.yaml").train.lr == 1e-4


def test_a_bad_base_is_an_error_that_names_the_files(tmp_path):
    (tmp_path / "typo.yaml").write_text("train:\n  batchsize: 4\n")
    (tmp_path / "c.yaml").write_text("base: typo.yaml\n")
    with pytest.raises(ConfigError, match=r"'train.batchsize' \(in .*typo.yaml\); did you mean 'train.batch_size'"):
        load_config(tmp_path / "c.yaml")  # a key of the base is reported in the base
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base: expects the path of a config file relative to .*, got "
                                          r"'missing.yaml'"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: its chain of `base:` files comes back to it \(.*a.yaml -> "
                                          r".*b.yaml -> .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_shipped_configs_load(path):
    load_config(path)


def test_shipped_configs_cover_the_families():
    names = {str(p.relative_to(p.parent.parent)) for p in CONFIGS}
    assert {"sd15/dpo.yaml", "sd21/dpo.yaml", "sdxl/dpo.yaml", "tiny/dpo.yaml", "sdxl/mapo.yaml", "sd15/smpo.yaml",
            "sdxl/smpo.yaml", "sd21/dcpo.yaml", "sd15/sft.yaml", "tiny/mapo.yaml", "tiny/smpo.yaml", "tiny/dcpo.yaml",
            "tiny/sft.yaml"} <= names
    # every offline method on both flow families
    assert {f"{family}/{method}.yaml" for family in ("sd35", "flux") for method in ("dpo", "mapo", "smpo", "dcpo", "sft")
            } <= names


RECIPES = [p for p in CONFIGS if p.parent.name != "tiny"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_recipe_constant_names_its_source(path):
    """A value line of a shipped recipe carries a comment saying where the value comes from (or "ours")."""
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if line.startswith("  ") and rest.strip() and key.strip() not in ("name", "output_dir", "num_workers", "path"):
            assert "#" in rest, f"{path.name}: {line.strip()!r} names no source"


def test_recipes_follow_the_published_scripts():
    recipes = {str(p.relative_to(p.parent.parent)): load_config(p) for p in RECIPES}
    for name in ("sd15/smpo.yaml", "sdxl/smpo.yaml"):  # 100 of 200 steps warm-up, then constant; prompt dropout
        cfg = recipes[name]
        assert (cfg.train.lr_scheduler, cfg.train.warmup_steps, cfg.train.max_steps, cfg.data.prompt_dropout) == (
            "constant_with_warmup", 100, 200, 0.2)
    assert recipes["sd21/dcpo.yaml"].train.warmup_steps == 500
    for name, cfg in recipes.items():  # DCPO reads caption_0 / caption_1, which Pick-a-Pic's pairs do not carry
        if cfg.method.name == "dcpo" and not name.startswith("toy"):
            assert cfg.data.path == "outputs/pick-double-caption", name  # where `diffusion-align captions` writes
    for name in ("dpo", "mapo", "smpo", "dcpo", "sft", "pref-grpo"):  # [D]'s and Pref-GRPO's --*weight_decay 1e-4
        assert recipes[f"flux/{name}.yaml"].train.weight_decay == 1e-4, name
    # [G] encodes prompts at 128 T5 tokens (train_sd3.py, train_sd3_dpo.py, train_flux.py), not the pipelines' 256 /
    # 512; the SD3.5 recipes all take [G]'s values
    flux = recipes["flux/grpo.yaml"]
    assert {cfg.model.max_sequence_length for name, cfg in recipes.items() if name.startswith("sd35/")} == {128}
    assert flux.model.max_sequence_length == 128
    assert recipes["flux/pref-grpo.yaml"].model.max_sequence_length == 512  # Pref-GRPO's (DanceGRPO's) FluxPipeline
    # [G] keeps an EMA of the weights (decay 0.9 every 8 updates) and saves it: its recipes alone set one
    with_ema = {name for name, cfg in recipes.items() if (cfg.train.ema_decay, cfg.train.ema_every) == (0.9, 8)}
    assert with_ema == {name for name in recipes if name.startswith("sd35/")} | {"flux/grpo.yaml"}
    assert all(cfg.train.ema_decay == 0 for name, cfg in recipes.items() if name not in with_ema)
    # pickscore_flux: G = 24, 6 steps at noise level 0.9, no KL, LoRA r 64 / alpha 128, 3 images a micro-batch
    assert (flux.method.name, flux.online.group_size, flux.online.sample_steps, flux.online.noise_level,
            flux.online.kl_beta, flux.online.guidance, flux.model.lora_rank, flux.model.lora_alpha,
            flux.train.batch_size) == ("grpo", 24, 6, 0.9, 0.0, 3.5, 64, 128, 3)
    # [G] z-scores with the std of all the step's rewards (global_std) in every recipe shipped here; the others
    # (DanceGRPO, Pref-GRPO) with each group's
    global_std = {name for name, cfg in recipes.items() if cfg.online.advantage_std == "global"}
    assert global_std == {"sd35/grpo.yaml", "sd35/grpo-fast.yaml", "flux/grpo.yaml"}
    # pickscore_sd3_fast_nocfg: CPS at noise level 0.8 in a window of 3 of 10 steps, no CFG, G = 18, clip 1e-5, no KL
    fast = recipes["sd35/grpo-fast.yaml"]
    assert (fast.online.sde_type, fast.online.noise_level, fast.online.sde_window, fast.online.sample_steps,
            fast.online.guidance, fast.online.group_size, fast.online.clip_range, fast.online.kl_beta,
            fast.train.batch_size) == ("cps", 0.8, 3, 10, 1.0, 18, 1e-5, 0.0, 9)
    assert {name for name, cfg in recipes.items() if cfg.online.sde_type == "cps"} == {"sd35/grpo-fast.yaml"}
    assert recipes["sdxl/dpo.yaml"].train.warmup_steps == 200 and recipes["sd15/dpo.yaml"].train.warmup_steps == 500
    for name in ("sdxl/dpo.yaml", "sdxl/dpo-lora.yaml", "sdxl/mapo.yaml", "sdxl/smpo.yaml"):  # the fp16-safe VAE
        assert recipes[name].model.vae == "madebyollin/sdxl-vae-fp16-fix", name
    flips = {name: cfg.data.random_flip for name, cfg in recipes.items()}
    assert flips["sd15/dpo.yaml"] == flips["sd15/dpo-lora.yaml"] == flips["sdxl/dpo.yaml"] == "image"
    assert flips["sdxl/dpo-lora.yaml"] == flips["sdxl/mapo.yaml"] == "pair"
    sdxl_lora = next(p for p in RECIPES if p.parent.name == "sdxl" and p.name == "dpo-lora.yaml").read_text()
    assert "--beta_dpo 5000], which uses the same -1/2 factor" in sdxl_lora and "2500" not in sdxl_lora


@pytest.mark.parametrize("override, expected", [
    ("model.pretrained=a #b", "a #b"),  # YAML cut it at the comment
    ("data.path=*.parquet", "*.parquet"),  # YAML read an alias and failed
    ("model.pretrained=org/model: v2", "org/model: v2"),  # YAML read a mapping
    ("model.pretrained='my model'", "my model"),  # one pair of quotes goes
    ("model.revision=0123456", "0123456"),
    ("train.seed=0042", 42),  # YAML 1.1 read octal 34
    ("train.warmup_steps=010", 10),
    ("model.variant=null", None),
    ("model.variant=~", None),
    ('model.pretrained="a\\tb"', "a\tb"),  # a quoted text is YAML's, escapes and all
    ("method.beta=05000", 5000.0),  # a float key too
])
def test_override_values_are_read_as_written(override, expected):
    key, _ = override.split("=", 1)
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == expected


def test_a_base_60_integer_and_a_folder_for_a_config_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="'train.max_steps' .* got '1:30', which YAML 1.1 reads as base 60 \\(90\\)"):
        load_config(None, ["train.max_steps=1:30"])
    with pytest.raises(ConfigError, match=f"{tmp_path}: a folder; expected a YAML config file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="'train.output_dir' .* cannot be null"):
        load_config(None, ["train.output_dir=~"])  # not a folder named ~
