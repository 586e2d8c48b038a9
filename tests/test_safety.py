"""A run never silently replaces another, resumes only the run that wrote its checkpoint, and stops with a message
(checkpoints intact, no NaN weights saved) when a write fails or its gradients stay non-finite."""

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_align.cli import main as cli_main
from diffusion_align.config import ConfigError, config_to_dict, load_config
from diffusion_align.models.policy import LORA_WEIGHTS
from diffusion_align.training import checkpoints, methods, trainer
from diffusion_align.training.safety import ADDED_KEYS, RunStopped, changed_keys
from test_train import TINY_CONFIG, read_metrics, run


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_not_replaced_without_being_asked(tmp_path, tiny_models, tiny_pairs):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=2")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint-2, final, metrics.jsonl\)"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=2")
    assert snapshot(tmp_path / "run") == before, "nothing was touched"

    (tmp_path / "run" / "latent-cache").mkdir()  # a cache outlives the runs that made it
    (tmp_path / "run" / "latent-cache" / "kept").write_text("x")
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=2", "train.overwrite=true")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "checkpoint-2" not in names, "the old run's checkpoints go too: no mix of two runs"
    assert {"final", "metrics.jsonl", "config.yaml", "latent-cache"} <= names
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "latent-cache" / "kept").read_text() == "x"
    with pytest.raises(ConfigError, match="choose one"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.overwrite=true", "train.resume=latest")


def test_a_resume_must_continue_the_same_run(tmp_path, tiny_models, tiny_pairs):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=3")
    assert (tmp_path / "run" / "checkpoint-3" / "config.yaml").is_file(), "each checkpoint keeps its run's config"
    with pytest.raises(ConfigError) as info:
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.resume=latest", "method.name=mapo", "train.seed=7")
    message = str(info.value)
    assert "method.name: 'dpo' -> 'mapo'" in message and "train.seed: 0 -> 7" in message
    assert "train.overwrite=true" in message
    # keys about how long to run and what to record may change: two more steps, logged every step
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.resume=latest", "train.max_steps=5", "train.log_every=1",
        "train.checkpoint_every=0")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_a_resume_over_other_pairs_is_refused(tmp_path, tiny_models, tiny_pairs):
    """Pairs added to the data folder since the checkpoint: the sampler would draw a shuffle of the new pairs from
    the old position, training some pairs of the epoch twice and others never."""
    import shutil
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_pairs, data / "a.parquet")
    run(tmp_path, tiny_models["sd"], data, "train.checkpoint_every=2", "train.max_steps=2")
    shutil.copy(tiny_pairs, data / "b.parquet")
    with pytest.raises(ValueError, match=r"trained on (\d+) pairs, but .*data now gives (\d+): its batches would be "
                                         r"drawn in another order"):
        run(tmp_path, tiny_models["sd"], data, "train.resume=latest", "train.max_steps=4")
    (data / "b.parquet").unlink()
    run(tmp_path, tiny_models["sd"], data, "train.resume=latest", "train.max_steps=4")


def test_a_resume_past_max_steps_is_refused(tmp_path, tiny_models, tiny_pairs):
    """A checkpoint past a lowered train.max_steps (allowed to change under a constant schedule) trained nothing more
    and shipped its weights as final/, the model card saying max_steps."""
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=2", "train.max_steps=4")
    with pytest.raises(ConfigError, match=r"checkpoint-4 is at step 4, past train.max_steps=2, so the run would end at "
                                          r"once .* or resume from a checkpoint at step 2 or before"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=2", "train.max_steps=2",
            "train.resume=latest")


def test_a_damaged_checkpoint_is_named_with_the_ones_before(tmp_path, tiny_models, tiny_pairs, capsys):
    """A checkpoint file cut short (an interrupted copy) was told as "could not write", or a traceback: the file is
    named, with the earlier checkpoints to resume from; export names a LoRA file it cannot read."""
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=2", "train.max_steps=4")
    (tmp_path / "run" / "final").rename(tmp_path / "run-final")  # as a run stopped after its second checkpoint
    latest = tmp_path / "run" / "checkpoint-4"
    for name in (LORA_WEIGHTS, "optimizer.pt", "trainer_state.json"):
        kept = (latest / name).read_bytes()
        (latest / name).write_bytes(kept[:len(kept) // 2])
        with pytest.raises(ValueError, match=r"checkpoint-4.*: cannot be read back \(.+\)\. If checkpoint-4 is "
                                             r"damaged .* an earlier checkpoint may be whole: [^,]*checkpoint-2 "
                                             r"\(train\.resume=PATH"):
            run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=2", "train.max_steps=6",
                "train.resume=latest")
        if name == LORA_WEIGHTS:
            with pytest.raises(SystemExit):
                cli_main(["export", str(latest), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")])
            assert f"error: {latest / name}: cannot be read back" in capsys.readouterr().err
        (latest / name).write_bytes(kept)
    first = tmp_path / "run" / "checkpoint-2" / LORA_WEIGHTS
    first.write_bytes(first.read_bytes()[:100])  # a later checkpoint is no way back
    with pytest.raises(SystemExit):
        cli_main(["export", str(first.parent), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")])
    assert "If checkpoint-2 is damaged (a copy cut short), there is no earlier checkpoint" in capsys.readouterr().err
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=2", "train.max_steps=6", "train.resume=latest")


@pytest.mark.parametrize("schedule, refused", [("constant_with_warmup", False), ("constant", False),
                                                ("linear", True), ("cosine", True)])
def test_max_steps_changes_on_resume_only_under_a_schedule_that_does_not_decay_to_it(schedule, refused):
    """A linear schedule rebuilt for 8 steps after 4 of a 4-step run trained step 5 at lr 0, then rose again."""
    saved = config_to_dict(load_config(TINY_CONFIG, [f"train.lr_scheduler={schedule}", "train.max_steps=4"]))
    resumed = load_config(TINY_CONFIG, [f"train.lr_scheduler={schedule}", "train.max_steps=8", "train.log_every=2"])
    assert changed_keys(saved, resumed) == ([("train.max_steps", 4, 8)] if refused else [])


def check_saved_before(cfg, key: str, changed: list) -> None:
    """`cfg`'s run saved before `key` (section.name) existed: resuming it with `cfg` changes `changed`, and nothing
    once the key is set to what such a run trained with (safety.ADDED_KEYS)."""
    section, name = key.split(".")
    saved = config_to_dict(cfg)
    del saved[section][name]
    assert changed_keys(saved, cfg) == changed
    setattr(getattr(cfg, section), name, ADDED_KEYS[key][0])
    assert changed_keys(saved, cfg) == []


def test_a_run_saved_before_online_sde_kl_resumes_with_the_kl_it_trained_with(tiny_models, tiny_flow_models):
    """Flow runs saved before online.sde_kl took the SDE steps' Gaussians' KL: a resume under the new default would
    change the objective part-way. Where the key changes nothing (no KL, CPS steps, a UNet's DDIM), it is not asked
    for."""
    def case(model, *overrides):
        return load_config(None, [f"model.pretrained={model}", "method.name=grpo", "model.lora_rank=4", *overrides])
    flow, unet = tiny_flow_models["sd3"], tiny_models["sd"]
    for cfg, changed in ((case(flow, "online.kl_beta=0.1"), [("online.sde_kl", "gaussian", "flow_grpo")]),
                         (case(flow), []), (case(flow, "online.kl_beta=0.1", "online.sde_type=cps"), []),
                         (case(unet, "online.kl_beta=0.1"), [])):
        check_saved_before(cfg, "online.sde_kl", changed)


def test_a_run_saved_before_online_reward_dtype_resumes_with_its_rewards_in_the_frozen_dtype(tiny_models):
    """Online runs saved before online.reward_dtype scored in the frozen dtype: a half-precision one resumed under the
    new default (fp32) would reward otherwise part-way. Where the key changes nothing (fp32 runs, a judge's
    preferences, offline methods), it is not asked for."""
    def case(*overrides):
        return load_config(None, [f"model.pretrained={tiny_models['sd']}", "model.lora_rank=4", *overrides])
    for cfg, changed in ((case("method.name=grpo", "train.mixed_precision=bf16"),
                          [("online.reward_dtype", "frozen", "fp32")]),
                         (case("method.name=pref_grpo", "train.mixed_precision=fp16"),
                          [("online.reward_dtype", "frozen", "fp32")]),
                         (case("method.name=grpo"), []), (case("method.name=dpo", "train.mixed_precision=bf16"), []),
                         (case("method.name=pref_grpo", "train.mixed_precision=bf16", "online.judge=some/vlm"), [])):
        check_saved_before(cfg, "online.reward_dtype", changed)


def test_a_run_saved_before_train_ema_repeats_resumes_with_one_rule_an_update(tiny_models):
    """A run with an EMA saved before train.ema_repeats applied the rule once an update: resumed with the Flow-GRPO
    recipes' repeats, its EMA would change part-way. Without an EMA the key changes nothing."""
    def case(*overrides):
        return load_config(None, [f"model.pretrained={tiny_models['sd']}", "train.ema_repeats=2", *overrides])
    for cfg, changed in ((case("train.ema_decay=0.9"), [("train.ema_repeats", 1, 2)]), (case(), [])):
        check_saved_before(cfg, "train.ema_repeats", changed)


def test_online_runs_saved_before_sde_window_per_and_deterministic_last_step_resume_as_they_trained(tiny_models):
    """Windowed runs saved before online.sde_window_per drew one window a step (a group-noise one still does);
    online runs saved before online.deterministic_last_step drew their last step."""
    def case(*overrides):
        return load_config(None, [f"model.pretrained={tiny_models['sd']}", "method.name=grpo", "model.lora_rank=4",
                                  *overrides])
    for cfg, changed in ((case("online.sde_window=2"), [("online.sde_window_per", "step", "call")]),
                         (case("online.sde_window=2", "online.same_noise_per_group=true"), []), (case(), [])):
        check_saved_before(cfg, "online.sde_window_per", changed)
    check_saved_before(case("online.deterministic_last_step=true"), "online.deterministic_last_step",
                       [("online.deterministic_last_step", False, True)])


def test_a_warmup_under_the_constant_schedule_is_refused_at_the_start_and_may_go_on_resume():
    """diffusers' `constant` schedule takes no warm-up: the steps asked for were silently not run. Configs saved
    with one still load (export reads them), and a run resumed from one may drop it."""
    from diffusion_align.training.run import make_accelerator
    with pytest.raises(ConfigError, match="train.warmup_steps=200 does nothing with train.lr_scheduler=constant"):
        make_accelerator(load_config(TINY_CONFIG, ["train.lr_scheduler=constant", "train.warmup_steps=200"]))
    saved = config_to_dict(load_config(TINY_CONFIG, ["train.lr_scheduler=constant", "train.warmup_steps=200"]))
    assert changed_keys(saved, load_config(TINY_CONFIG, ["train.lr_scheduler=constant", "train.warmup_steps=0"])) == []
    assert changed_keys(saved, load_config(TINY_CONFIG, ["train.lr_scheduler=linear", "train.warmup_steps=0"])) == [
        ("train.lr_scheduler", "constant", "linear"), ("train.warmup_steps", 200, 0)]


def test_resume_latest_without_a_checkpoint(tmp_path, tiny_models, tiny_pairs):
    # no run folder at all (a misspelt output_dir): an error, not a new run (issue 24)
    with pytest.raises(FileNotFoundError, match=r"run.* does not exist, so there is no run to resume"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.resume=latest")
    assert not (tmp_path / "run").exists()
    # a finished run with no checkpoint: nothing to resume, and its final model must not be replaced
    run(tmp_path, tiny_models["sd"], tiny_pairs)
    with pytest.raises(ConfigError, match="holds a finished model"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.resume=latest")
    # a run cut short before its first checkpoint (metrics only) starts again at step 0
    (tmp_path / "run" / "final").rename(tmp_path / "elsewhere")
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.resume=latest")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    import dataclasses
    dpo = methods.METHODS["dpo"]

    def diverged(errors, cfg):  # the DPO loss, NaN from the second batch on
        loss, metrics = dpo.objective(errors, cfg)
        diverged.calls += 1
        return (loss * float("nan") if diverged.calls >= 2 else loss), metrics
    diverged.calls = 0

    monkeypatch.setitem(methods.METHODS, "dpo", dataclasses.replace(dpo, objective=diverged))
    with pytest.raises(RunStopped, match=r"step 3: the gradient was not finite for 2 updates in a row"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=6", "train.max_nonfinite_steps=2",
            "train.checkpoint_every=1")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "final" not in names and {"checkpoint-1", "checkpoint-2"} <= names and "checkpoint-3" not in names
    state = torch.load(tmp_path / "run" / "checkpoint-2" / "process_0.pt", weights_only=True)
    assert state["nonfinite_steps"] == 1 and state["nonfinite_in_a_row"] == 1  # a resume goes on counting


def test_nan_weights_are_never_saved(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    apply_update = trainer.apply_update

    def poisoning(accelerator, models, grad_norm):  # an update that leaves a NaN in the weights
        updated = apply_update(accelerator, models, grad_norm)
        next(p for group in models.optimizer.param_groups for p in group["params"]).data.view(-1)[0] = float("nan")
        return updated

    monkeypatch.setattr(trainer, "apply_update", poisoning)
    with pytest.raises(RunStopped, match="step 1: the trained weights hold NaN or inf values, so they were not saved"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=1")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")]


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_models, tiny_pairs, monkeypatch, capsys):
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=1", "train.max_steps=1")
    first, final = snapshot(tmp_path / "run" / "checkpoint-1"), snapshot(tmp_path / "run" / "final")
    save = checkpoints.save_torch

    def disk_full(obj, path):
        if "checkpoint-2" in str(path) and str(path).endswith("optimizer.pt"):
            save(obj, path)  # part of the file was written when the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path)

    monkeypatch.setattr(checkpoints, "save_torch", disk_full)
    args = ["train", str(TINY_CONFIG), f"model.pretrained={tiny_models['sd']}", f"data.path={tiny_pairs}",
            f"train.output_dir={tmp_path / 'run'}", "train.batch_size=2", "train.grad_accum=1", "train.warmup_steps=0",
            "train.report_to=none", "train.checkpoint_every=1", "train.max_steps=3", "train.resume=latest"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffusion-align train: stopped: step 2: could not write")
    assert "No space left on device" in err[-1] and "checkpoint-1 is intact" in err[-1]
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "checkpoint-2" not in names and "checkpoint-2.tmp" not in names
    assert snapshot(tmp_path / "run" / "checkpoint-1") == first and snapshot(tmp_path / "run" / "final") == final
    # once there is space again, the run resumes from the intact checkpoint
    monkeypatch.setattr(checkpoints, "save_torch", save)
    cli_main(args)
    assert load_file(tmp_path / "run" / "final" / LORA_WEIGHTS)
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3]


def test_a_failed_final_or_metrics_write_stops_the_run_and_keeps_what_was_there(tmp_path, tiny_models, tiny_pairs,
                                                                                monkeypatch):
    from pathlib import Path

    from diffusion_align.training import outputs
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=1", "train.max_steps=2")
    final = snapshot(tmp_path / "run" / "final")
    model_card = outputs.model_card
    written = []

    def disk_full(*args):  # the model card is written last: the weights are in the temp folder by then
        written.extend(p.name for p in (tmp_path / "run" / ".final.tmp").iterdir())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "model_card", disk_full)
    with pytest.raises(RunStopped, match=r"could not write the final model to .*final \(\[Errno 28\] No space left"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=1", "train.resume=latest")
    assert "pytorch_lora_weights.safetensors" in written
    assert snapshot(tmp_path / "run" / "final") == final and not (tmp_path / "run" / ".final.tmp").exists()
    assert (tmp_path / "run" / "checkpoint-3").is_dir(), "the last step's checkpoint holds what the final would"
    monkeypatch.setattr(outputs, "model_card", model_card)

    open_path = Path.open

    def metrics_disk_full(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return open_path(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", metrics_disk_full)
    with pytest.raises(RunStopped, match=r"step 4: could not append to .*metrics.jsonl .*checkpoints .* are intact"):
        run(tmp_path, tiny_models["sd"], tiny_pairs, "train.checkpoint_every=1", "train.resume=latest",
            "train.max_steps=4")
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and not (tmp_path / "run" / "checkpoint-4").exists()


def test_ordinary_mistakes_get_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A YAML syntax error, an output_dir that is a file, Ctrl-C during train: one line each (issue 24)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: dpo\n   beta: [1\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", str(bad)])
    assert exit_.value.code == 2
    assert f"{bad} is not valid YAML at line 3, column 8: mapping values are not allowed here" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        cli_main(["train", "configs/tiny/dpo.yaml", f"train.output_dir={a_file}"])
    assert f"train.output_dir={a_file} is a file; expected a folder" in capsys.readouterr().err

    def interrupted(cfg):
        (Path(cfg.train.output_dir) / "checkpoint-10").mkdir(parents=True)
        (Path(cfg.train.output_dir) / "checkpoint-10" / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "configs/tiny/dpo.yaml", f"train.output_dir={tmp_path / 'run'}"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == (
        f"diffusion-align train: interrupted; the newest checkpoint is {tmp_path / 'run' / 'checkpoint-10'}: "
        "continue with train.resume=latest")


def test_a_resume_never_mixes_two_runs_in_one_folder(tmp_path):
    from diffusion_align.config import config_to_yaml, load_config
    from diffusion_align.training.safety import check_output_dir

    def checkpoint(folder, step):
        path = folder / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
        return path

    run_dir, other = tmp_path / "run", tmp_path / "other"
    first, _, last = (checkpoint(run_dir, step) for step in (2, 4, 6))
    elsewhere = checkpoint(other, 8)

    def cfg(resume, output_dir=run_dir):
        return load_config(TINY_CONFIG, [f"train.output_dir={output_dir}", f"train.resume={resume}"])
    for path in (first, last, elsewhere):
        (path / "config.yaml").write_text(config_to_yaml(cfg(path)))
    check_output_dir(cfg(last), last)  # the newest: what resume=latest takes
    with pytest.raises(ConfigError, match=r"holds checkpoints after checkpoint-2 \(checkpoint-4, checkpoint-6\)"):
        check_output_dir(cfg(first), first)
    with pytest.raises(ConfigError, match=r"a checkpoint of another folder.*already holds a run \(checkpoint-2"):
        check_output_dir(cfg(elsewhere), elsewhere)
    check_output_dir(cfg(elsewhere, tmp_path / "new"), elsewhere)  # a fork into a folder of its own
    with pytest.raises(ConfigError, match="holds checkpoints after"):  # the same folder, however it is written
        check_output_dir(cfg(first, run_dir / ".." / "run"), first)
