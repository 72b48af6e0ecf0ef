"""training.py and cli.py: the trainers' shared plumbing and command line behave as documented.

Configs (cli.py): YAML + command-line overrides, typed, with errors that name the key and its
source; run_cli prints a user's mistake as one line.
Schedule: hand-computed warmup and cosine values; `authors` equals the PI authors' LambdaLR as
their code runs it (their_lrs: their lambda stepped by torch's own LambdaLR) over whole runs of
stage 2 on 1 and 8 GPUs and of stage 1, and a checkpoint of the kit's first, wrong `authors`
schedule is refused. Weight decay: CLIP's exclusions.
Checkpoints: atomic writes and RNG state that survives torch.load(weights_only=True).
DDP wrapping: sync_batchnorm on CPU ranks is refused by name.
"""
import io
import math
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

import cli
import training
import model as M


@dataclass
class Config:
    lr: float = 5e-4
    epochs: int = 32
    model: str = "ViT-B-32"
    init: Optional[str] = None
    grad_checkpointing: bool = False


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\nepochs: 4\nmodel: tiny\n")
    config = cli.load_config(Config, [str(path), "--epochs=7", "--init", "ckpt.pt",
                                      "--grad-checkpointing", "true"])
    assert config == Config(lr=1e-3, epochs=7, model="tiny", init="ckpt.pt",
                            grad_checkpointing=True)
    assert cli.load_config(Config, [], default_path=str(path)).epochs == 4
    assert cli.load_config(Config, ["--init=none"]).init is None


@pytest.mark.parametrize(
    "yaml_text, argv, message",
    [
        ("lrr: 1\n", [], "unknown key lrr; did you mean lr"),
        ("epochs: 2.5\n", [], "epochs must be of type int"),
        ("grad_checkpointing: 3\n", [], "grad_checkpointing must be of type bool"),
        ("", ["--epoch=3"], "unknown key --epoch"),
        ("", ["--lr=fast"], "lr must be of type float"),
        ("", ["--epochs"], "--epochs needs a value"),
        ("", ["stray"], "unexpected argument 'stray'"),
        ("- a list\n", [], "expected a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path, yaml_text, argv, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message) as error:
        cli.load_config(Config, [str(path), *argv])
    assert ("bad.yaml" if not argv else "command line") in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        cli.load_config(Config, [str(tmp_path / "nope.yaml")])


def test_cosine_schedule_hand_computed():
    lr = lambda step: training.cosine_lr(step, 1.0, warmup_steps=4, total_steps=14)  # noqa: E731
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == 1.0  # cosine starts at the top
    assert lr(9) == pytest.approx(0.5)  # half way through the 10 cosine steps
    assert lr(14) == pytest.approx(0.0, abs=1e-12)
    assert lr(11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.7)))


def their_lrs(lr, warmup_steps, max_epochs, steps):
    """The lr of optimiser steps 1..steps as the PI authors' code runs them: github
    cheesepuff90/Brain_Initialization @38f3395 src/lightning_module.py _get_lr_scheduler (lines
    504-553), under their pinned Lightning 2.5.1. It runs inside configure_optimizers, before the
    fit loop has sized its data (num_training_batches is still inf; max_steps -1, src/train.py:850),
    so the length is lines 526-527's fallback; its lr_lambda (lines 535-543; min_lr 0.0 in every
    json) drives torch's own LambdaLR, stepped once per optimiser step ("interval": "step"), as
    Lightning steps it."""
    total_steps = max(10000, warmup_steps * 5) * max_epochs
    if warmup_steps >= total_steps:
        warmup_steps = max(1, total_steps // 2)

    def lr_lambda(current_step):
        if warmup_steps > 0 and current_step < warmup_steps:
            return float(current_step) / float(warmup_steps)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = float(current_step - warmup_steps) / float(decay_steps)
        progress = max(0.0, min(1.0, progress))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup_steps, epochs, steps, end", [
    (2500, 32, 78_100, 0.913),  # stage 2 on one GPU: ~78.1k steps of 6,144 (computed, ~15M pairs)
    (2500, 32, 9_800, 0.9992),  # stage 2 on 8 GPUs: ~9.8k steps of 49,152
    (150, 32, 670, 1.0),  # stage 1: 32 epochs of ~15.9k triplets at 768
    (3, 2, 12, 1.0),  # a tiny run: warmup, then the cosine's first steps
])
def test_authors_schedule_is_their_lambdalr_over_a_whole_run(warmup_steps, epochs, steps, end):
    peak = 5e-4
    # total_steps (the kit's own length) must not matter: their length is epochs x the fallback.
    lr_at = training.lr_function({"lr": peak, "warmup_steps": warmup_steps, "epochs": epochs,
                                  "total_steps": steps, "lr_schedule": "authors"})
    ours = [lr_at(step) for step in range(1, steps + 1)]
    theirs = their_lrs(peak, warmup_steps, epochs, steps)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-9 * peak
    assert ours[0] == 0.0 and ours[-1] / peak == pytest.approx(end, abs=5e-4)


def test_a_checkpoint_of_the_first_authors_schedule_is_refused(tmp_path):
    """The kit's first `authors` schedule sized its cosine in micro-batches (its checkpoints record
    groups_per_step, no epochs): a resume would change its lr midway, so it is refused; the
    kit's cosine, and the corrected `authors`, resume."""
    first = {"lr": 5e-4, "warmup_steps": 2500, "total_steps": 78_000, "steps_per_epoch": 2440,
             "lr_schedule": "authors", "groups_per_step": 6}
    path = tmp_path / "ckpt.pt"
    for schedule, refused in ((first, True), ({**first, "lr_schedule": "cosine"}, False),
                              ({**first, "epochs": 32}, False)):
        training.atomic_save({"config": vars(Config()), "schedule": schedule}, path)
        if refused:
            with pytest.raises(cli.UserError, match="sized in micro-batches.*another out_dir"):
                training.read_resume_state(path, Config(), "fp32", ["lr"])
        else:
            state = training.read_resume_state(path, Config(), "fp32", ["lr"])
            assert state["schedule"] == schedule


def test_param_groups_exclusions():
    clip = M.create_model("tiny")
    decay, no_decay = training.param_groups(clip, 0.1)
    names = {id(p): n for n, p in clip.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name in ["logit_scale", "positional_embedding", "visual.positional_embedding",
                 "visual.class_embedding", "ln_final.weight",
                 "visual.transformer.resblocks.0.attn.in_proj_bias"]:
        assert name in no_decay_names
    for name in ["visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight",
                 "transformer.resblocks.1.mlp.c_fc.weight"]:
        assert name in decay_names
    assert len(decay_names) + len(no_decay_names) == len(names)


REAL_TORCH_SAVE = torch.save


def crash_half_way(obj, f, *args, **kwargs):
    """torch.save that dies half way through: it writes the first half of the file, then raises, as
    a process killed (or a disk filling up) during a save does."""
    whole = io.BytesIO()
    REAL_TORCH_SAVE(obj, whole)
    half = whole.getvalue()[: len(whole.getvalue()) // 2]
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(half)
    else:
        f.write(half)
        f.flush()
    raise KeyboardInterrupt("killed half way through a save")


def last_good_file_survives_a_crash(save, path, monkeypatch):
    """Save a good checkpoint with `save`, crash half way through the next save, and say whether the
    good one can still be read back whole."""
    good = {"step": 1, "weights": torch.arange(1000.0)}
    save(good, path)
    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    try:
        kept = torch.load(path, weights_only=True)
    except Exception:  # a truncated zip archive
        return False
    return kept["step"] == 1 and torch.equal(kept["weights"], good["weights"])


def test_atomic_save_keeps_last_good_file(tmp_path, monkeypatch):
    assert last_good_file_survives_a_crash(training.atomic_save, tmp_path / "ckpt.pt", monkeypatch)
    # The crash is a real one: a plain torch.save, which writes in place, loses the last good file
    # to it (torch.save is looked up at call time, so this one crashes too).
    plain_save = lambda obj, path: torch.save(obj, path)  # noqa: E731
    assert not last_good_file_survives_a_crash(plain_save, tmp_path / "plain.pt", monkeypatch)


def test_rng_state_round_trip_through_safe_load():
    training.seed_everything(3)
    buffer = io.BytesIO()
    torch.save(training.rng_state(), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    buffer.seek(0)
    training.set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_autocast_and_scaler():
    assert training.default_precision("cpu") == "fp32"
    with training.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with training.autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert not training.grad_scaler("cpu", "bf16").is_enabled()
    with pytest.raises(ValueError, match="precision"):
        training.autocast("cpu", "fp8")


def test_resume_check_names_every_changed_key():
    saved, current = ({"lr": 1e-3, "batch_size": 8, "log_every": 5},
                      {"lr": 1e-2, "batch_size": 16, "log_every": 1})
    # log_every may change
    training.check_resume("out/ckpt.pt", saved, {**saved, "log_every": 1}, ["lr", "batch_size"])
    with pytest.raises(cli.UserError) as error:
        training.check_resume("out/ckpt.pt", saved, current, ["lr", "batch_size"])
    message = str(error.value)
    assert ("out/ckpt.pt" in message and "lr: 0.001 -> 0.01" in message
            and "batch_size: 8 -> 16" in message)
    assert "log_every" not in message and "another out_dir" in message


def test_loss_watch_names_the_first_non_finite_step_and_its_lr():
    watch = training.LossWatch(training.Ranks(), lr_at=lambda step: 0.1 * step)
    for step, loss in enumerate([1.0, 3.0], start=1):
        watch.add(torch.tensor(loss), step)
    watch.check("ckpt.pt", saved_step=0)  # all finite: nothing raised
    assert watch.interval_mean() == 2.0 and watch.interval_mean() is None
    for step, loss in enumerate([1.0, float("inf"), float("nan"), 1.0], start=3):
        watch.add(torch.tensor(loss), step)
    with pytest.raises(training.NonFiniteLoss,
                       match=r"step 4 \(lr 0.4\).*ckpt.pt still holds step 2"):
        watch.check("ckpt.pt", saved_step=2)


def test_run_cli_one_line_for_user_errors_only(monkeypatch):
    def user_mistake(argv):
        raise cli.UserError("config.yaml: lr must be of type float, got 'fast'")

    def kit_bug(argv):
        # e.g. from inside torch or numpy: keeps its traceback
        raise ValueError("not enough values to unpack")

    monkeypatch.setattr("sys.argv", ["train_x.py"])
    monkeypatch.delenv("PI_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(user_mistake)
    assert exit_.value.code == ("train_x.py: error: config.yaml: lr must be of type float, "
                                "got 'fast'")
    with pytest.raises(ValueError, match="not enough values"):
        cli.run_cli(kit_bug)
    with pytest.raises(cli.UserFileNotFound):  # what a trainer raises for a file of the user's
        with cli.user_input():
            open("/nonexistent/data.csv")


def test_prefetch_keeps_the_batch_structure():
    batches = [{"images": torch.ones(2, 3), "meta": [torch.zeros(1), "key"]}, (torch.ones(1), 7)]
    out = list(training.prefetch_to_device(iter(batches), "cpu"))
    assert (out[0]["meta"][1] == "key" and out[1][1] == 7
            and torch.equal(out[0]["images"], torch.ones(2, 3)))


def test_sync_batchnorm_on_cpu_ranks_is_refused_by_name():
    """torch's SyncBatchNorm runs on GPUs only: asking for it on CPU ranks with a BatchNorm tower is
    an error that names the setting (before DDP is built), not a crash in the first forward."""
    from model import create_model

    visual = create_model("tiny-rn").visual
    with pytest.raises(cli.UserError, match="sync_batchnorm.*--sync_batchnorm=false"):
        training.wrap_model(visual, training.Ranks(world_size=2), sync_batchnorm=True)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in visual.modules())
