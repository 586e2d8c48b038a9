"""train.ema_decay: the EMA's update rule by hand (Flow-GRPO's), the final model it makes offline and online, exact
resume with it, a run without it unchanged, and the planner's term for it. Sharded runs: test_sharding.py."""

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffusion_align.config import ConfigError, load_config
from diffusion_align.files import EMA_FOLDER
from diffusion_align.models.policy import LORA_WEIGHTS
from diffusion_align.training import methods, online, trainer
from diffusion_align.training.checkpoints import load_checkpoint
from diffusion_align.training.ema import EMA
from diffusion_align.training.memory import ModelCounts, memory_bytes
import test_online
from test_train import run

setup = test_online.setup  # its fixture: the tiny pipeline, prompts and scorer
EMA_ON = ["train.ema_decay=0.9", "train.ema_every=2"]  # Flow-GRPO's decay, every 2nd update


def test_the_update_rule_by_hand():
    """Weights n after update n = 1, 2, 3, ... from 0, every 2nd as flow_grpo counts (at n = 1, 3, 5: (n + 1) % 2 is
    0): the warm-up decays 2/11, 4/13, 6/15 (below 0.9) give 0 * 2/11 + 1 * 9/11 = 9/11, then 9/11 * 4/13 + 3 * 9/13
    = 333/143, then 333/143 * 6/15 + 5 * 9/15 = 2811/715; from n = 81 on the decay is 0.9 itself
    ((1 + 81) / (10 + 81) > 0.9)."""
    weight = torch.nn.Parameter(torch.zeros(2))
    ema = EMA({"w": weight}, decay=0.9, every=2)
    averages = []
    for n in range(1, 7):
        with torch.no_grad():
            weight.fill_(n)
        ema.update()
        averages.append(ema.average["w"][0].item())
    assert averages == pytest.approx([9 / 11, 9 / 11, 333 / 143, 333 / 143, 2811 / 715, 2811 / 715], rel=1e-6)
    assert weight[0].item() == 6 and ema.updates == 6  # the EMA never writes the weights in training
    ema.updates = 80
    ema.update()
    assert ema.average["w"][0].item() == pytest.approx(0.9 * 2811 / 715 + 0.1 * 6, rel=1e-6)
    saved = ema.state_dict()
    restored = EMA({"w": torch.nn.Parameter(torch.zeros(2))}, decay=0.9, every=2)
    restored.load_state_dict(saved)
    assert restored.updates == 81 and torch.equal(restored.average["w"], ema.average["w"])


def test_repeats_apply_the_rule_that_many_times_to_the_same_weights():
    """Flow-GRPO's online scripts step their EMA after each of an update's 2 micro-batches, the count unchanged: at
    n = 1 (every 2nd) d = 2/11 twice, so 0 -> 9/11 -> 2/11 * 9/11 + 9/11 = 117/121, i.e. d^2 = 4/121 once."""
    weight = torch.nn.Parameter(torch.ones(2))
    ema = EMA({"w": weight}, decay=0.9, every=2, repeats=2)
    ema.average["w"].zero_()
    ema.update()
    assert ema.average["w"][0].item() == pytest.approx(117 / 121, rel=1e-6)


def test_the_weights_hold_the_ema_inside_copied_in_only_and_take_it_back():
    """What a checkpoint writes and reads through: the weights are the EMA inside the block and their live values
    after it, even after an error; `take_weights` makes an EMA of what was loaded into them."""
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"w": weight}, decay=0.9, every=1)
    ema.average["w"].copy_(torch.tensor([5.0, 7.0]))
    with pytest.raises(RuntimeError, match="written"):
        with ema.copied_in():
            assert weight.tolist() == [5.0, 7.0]
            raise RuntimeError("written")
    assert weight.tolist() == [1.0, 2.0] and ema.average["w"].tolist() == [5.0, 7.0]
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 4.0]))  # a checkpoint's EMA, loaded into the weights
    ema.take_weights()
    assert ema.average["w"].tolist() == [3.0, 4.0] and ema.average["w"].data_ptr() != weight.data_ptr()


@pytest.mark.parametrize("override, message", [
    ("train.ema_decay=1", r"'train.ema_decay' .* must be between 0 and 1 \(\[0, 1\)\)"),
    ("train.ema_every=0", "'train.ema_every' .* must be at least 1")])
def test_settings_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def recording_updates(monkeypatch, module) -> list:
    """Wrap `module.apply_update`: the trainable LoRA weights (peft's names) before the first update, then, after
    each, whether the weights were updated and their values."""
    apply_update, seen = module.apply_update, []

    def lora(models) -> dict:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(models.policy.denoiser).items()}

    def recorded(accelerator, models, grad_norm):
        if not seen:
            seen.append((True, lora(models)))
        updated = apply_update(accelerator, models, grad_norm)
        seen.append((updated, lora(models)))
        return updated
    monkeypatch.setattr(module, "apply_update", recorded)
    return seen


def expected_ema(seen: list, decay: float, every: int) -> dict:
    """The EMA by its formula from the recorded weights, counting the updates that happened (n) alone."""
    average = {name: w.clone() for name, w in seen[0][1].items()}
    n = 0
    for updated, weights in seen[1:]:
        n += updated
        if updated and (n + 1) % every == 0:
            d = min((1 + n) / (10 + n), decay)
            average = {name: d * average[name] + (1 - d) * weights[name] for name in average}
    return average


def saved_lora(path) -> dict:
    """A LoRA file in peft's names (as `get_peft_model_state_dict` gives them)."""
    return convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in load_file(path).items()})


def test_the_final_lora_is_the_ema_of_the_weights_and_skipped_updates_do_not_count(tmp_path, tiny_models, tiny_pairs,
                                                                                   monkeypatch):
    dpo = methods.METHODS["dpo"]

    def nan_at_step_2(errors, cfg):  # step 2's gradient is not finite: its update is skipped
        loss, metrics = dpo.objective(errors, cfg)
        nan_at_step_2.calls += 1
        return (loss * float("nan") if nan_at_step_2.calls == 2 else loss), metrics
    nan_at_step_2.calls = 0
    monkeypatch.setitem(methods.METHODS, "dpo", dataclasses.replace(dpo, objective=nan_at_step_2))
    seen = recording_updates(monkeypatch, trainer)
    result = run(tmp_path, tiny_models["sd"], tiny_pairs, *EMA_ON, "train.max_steps=5", "train.lr=1e-3")
    assert [updated for updated, _ in seen[1:]] == [True, False, True, True, True]
    final, live = saved_lora(result.final_dir / LORA_WEIGHTS), seen[-1][1]
    expected = expected_ema(seen, 0.9, 2)
    assert final.keys() == expected.keys() == live.keys()
    for name in final:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-5, atol=1e-7)
    up = [name for name in final if "lora_B" in name]
    assert max((final[n] - live[n]).abs().max() for n in up) > 1e-2 * max(live[n].abs().max() for n in up)
    assert "| weights | the EMA (decay 0.9, every 2 updates) |" in (result.final_dir / "README.md").read_text()


@pytest.mark.parametrize("lora", [True, False])
def test_resume_with_an_ema_reaches_the_uninterrupted_weights(tmp_path, tiny_models, tiny_pairs, lora):
    """The checkpoint at step 2 holds the live weights and the EMA (`ema/`, as the final model is written); a run
    resumed from it ends with both equal to the uninterrupted run's, bit for bit, which also fails if writing the EMA
    left it in the weights training goes on with."""
    common = [*EMA_ON, "train.max_steps=4", "train.checkpoint_every=2", "train.lr=1e-3", "train.ema_every=1",
              *([] if lora else ["model.lora_rank=null", "train.lr=1e-4"])]
    whole = run(tmp_path / "whole", tiny_models["sd"], tiny_pairs, *common)
    resumed_dir = tmp_path / "resumed" / "run"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole/run/checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(tmp_path / "resumed", tiny_models["sd"], tiny_pairs, *common, "train.resume=latest")
    weights = LORA_WEIGHTS if lora else "unet/diffusion_pytorch_model.safetensors"
    for name in (f"final/{weights}", f"checkpoint-4/{weights}", f"checkpoint-4/{EMA_FOLDER}/{weights}"):
        a, b = load_file(whole.final_dir.parent / name), load_file(resumed.final_dir.parent / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # EMA and live, bit for bit
    state = json.loads((resumed.final_dir.parent / "checkpoint-4/trainer_state.json").read_text())
    assert state["ema"] is True and state["ema_updates"] == 4
    final, ema, live = (load_file(resumed.final_dir.parent / name) for name in (
        f"final/{weights}", f"checkpoint-4/{EMA_FOLDER}/{weights}", f"checkpoint-4/{weights}"))
    assert all(torch.equal(final[k], ema[k]) for k in final)  # the run ended at its checkpoint: final is the EMA
    assert any(not torch.equal(live[k], ema[k]) for k in live)


def test_an_online_run_saves_its_ema(setup, tmp_path, monkeypatch):
    seen = recording_updates(monkeypatch, online)
    result = trainer.train(test_online.config(setup, tmp_path / "run", *EMA_ON, "train.checkpoint_every=2",
                                              "online.updates_per_rollout=2", "train.lr=1e-3", method="grpo"))
    updates = sum(updated for updated, _ in seen[1:])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["ema_updates"] == updates >= 2
    final, live = saved_lora(result.final_dir / LORA_WEIGHTS), seen[-1][1]
    assert all(torch.equal(saved_lora(checkpoint / EMA_FOLDER / LORA_WEIGHTS)[n], final[n]) for n in final)
    assert all(torch.equal(saved_lora(checkpoint / LORA_WEIGHTS)[n], live[n]) for n in live)
    assert any(not torch.equal(final[n], live[n]) for n in final)


def test_without_an_ema_none_is_kept_or_written(tmp_path, tiny_models, tiny_pairs, monkeypatch):
    apply_update, seen = trainer.apply_update, []

    def recorded(accelerator, models, grad_norm):
        seen.append(models.ema)
        return apply_update(accelerator, models, grad_norm)
    monkeypatch.setattr(trainer, "apply_update", recorded)
    run(tmp_path, tiny_models["sd"], tiny_pairs, "train.max_steps=1", "train.checkpoint_every=1")
    assert seen == [None] and not (tmp_path / "run" / "checkpoint-1" / EMA_FOLDER).exists()
    assert "| weights |" not in (tmp_path / "run" / "final" / "README.md").read_text()


def test_a_checkpoint_resumes_only_with_an_ema_if_written_with_one(tmp_path):
    state = {"step": 5, "num_processes": 1, "optimizer": "whole"}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    policy = SimpleNamespace(denoiser=torch.nn.Linear(2, 2))
    ema = EMA(dict(policy.denoiser.named_parameters()), decay=0.9, every=1)

    def resume(with_ema):
        load_checkpoint(SimpleNamespace(num_processes=1), tmp_path, policy,
                        torch.optim.AdamW(policy.denoiser.parameters()), None, with_ema)
    with pytest.raises(ValueError, match="written without an EMA of the weights; this run keeps one. Resume with the "
                                         "train.ema_decay it was written with"):
        resume(ema)
    (tmp_path / "trainer_state.json").write_text(json.dumps({**state, "ema": True, "ema_updates": 5}))
    with pytest.raises(ValueError, match="written with an EMA of the weights; this run keeps none"):
        resume(None)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / EMA_FOLDER}: no such folder, though the checkpoint "
                                                "was written with an EMA"):
        resume(ema)


COUNTS = ModelCounts("sd", denoiser=1000, lora=100, adafactor_state=30, adafactor_step=50, vae=200, text_encoders=300,
                     activation_bytes={"plain": 4000, "checkpointed": 1000},
                     sharded_activation_bytes={"plain": 3000, "checkpointed": 700}, cache_batch=16,
                     vae_encode_bytes=(400, 6400), text_encode_bytes=(40, 640))


@pytest.mark.parametrize("lora, strategy, processes, ema", [
    (False, "ddp", 2, 4000),           # 4 bytes a trained weight, on every process
    (True, "ddp", 1, 400),             # a LoRA's adapters only
    (False, "fsdp2", 2, 2000),         # sharded as the weights are
    (False, "zero2", 2, 4000),         # the weights are whole on every process under ZeRO-2, and so is the EMA
    (False, "fsdp2-offload", 2, 0),    # on the CPU with the weights
])
def test_the_planner_counts_the_ema_as_a_state(lora, strategy, processes, ema):
    overrides = ["model.lora_rank=8" if lora else "model.lora_rank=null"]
    without = memory_bytes(load_config(None, overrides), COUNTS, processes, strategy)
    usage = memory_bytes(load_config(None, [*overrides, "train.ema_decay=0.9"]), COUNTS, processes, strategy)
    assert "ema" not in without and usage.get("ema", 0) == ema
    assert usage["total"] - without["total"] == ema
    assert {k: v for k, v in usage.items() if k not in ("ema", "total")} == {k: v for k, v in without.items()
                                                                             if k != "total"}
