"""train_triplet.py end to end on the demo world's NIGHTS-format triplets (tiny CLIP, 32 px, CPU).

Proves that
  - training on the simulated observers' votes lifts 2AFC clearly above its random-init value (which
    is already ~0.6: random features see colour), while the same run on shuffled labels does not
    (the observers' structure is what is learned, not some artefact of the images);
  - ckpt.pt is the kit's checkpoint: checkpoints.load_checkpoint reads it, reproduces the reported
    val score, and its text tower is still the random init (only the vision tower trained);
  - a run stopped mid-epoch (stop_after_steps, or SIGTERM sent to the running script at a known
    step: tests/hold_at_step.py holds it there) and started again ends with bit-identical weights to
    one that never stopped; rerunning a finished run changes nothing; a changed setting is refused
    by name; a non-finite loss stops the run, names its step and leaves the last good checkpoint as
    it was;
  - the post-hoc control changes only the vision blocks' qkv, weights and biases
    (attn.in_proj_weight and attn.in_proj_bias), as the PI authors' preset unfreezes them;
  - --lr_schedule=authors gives every step of a whole run the lr of their LambdaLR
    (tests/test_training.py their_lrs);
  - a ResNet tower (tiny-rn) trains on the same hinge (on its attention-pooled embedding): its
    vision weights and BatchNorm statistics move, its text tower does not; with gradient
    checkpointing the run ends with the same weights and the same statistics; its ckpt.pt loads in
    open_clip with equal features; its post-hoc control changes only the attention pool's q/k/v
    weights and biases, BatchNorm statistics included;
  - DDP with 2 processes (torchrun --standalone, gloo: a free port, never a fixed one) reaches the
    same weights as 1 process with the same global batch.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import training
from tests import hold_at_step  # tests/: holds a trainer at a step
import train_triplet
from stage1 import objective
from stage1.objective import two_afc_by_triplet
from world.make_data import make_nights
from checkpoints import load_checkpoint
from model import create_model
from stage1.nights import NightsDataset
from tests.test_training import their_lrs

ROOT = Path(__file__).resolve().parents[1]
TINY = [str(ROOT / "configs/nights_tiny.yaml")]
SIZE = yaml.safe_load((ROOT / "configs/nights_tiny.yaml").read_text())["image_size"]


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """6,000 demo triplets, as configs/nights_tiny.yaml says: ~3,400 train, ~450 val and ~430 test
    rows survive min_votes=6."""
    root = tmp_path_factory.mktemp("nights")
    make_nights(root, 6000, seed=0, image_size=SIZE)
    return root


@pytest.fixture(scope="module")
def small_nights(tmp_path_factory):
    """200 triplets: 120 train rows, 3 steps an epoch at batch 32 (the resume test stops mid epoch
    2)."""
    root = tmp_path_factory.mktemp("small_nights")
    make_nights(root, 200, seed=1, image_size=SIZE)
    return root


def run(data_root, out_dir, *overrides):
    metrics = train_triplet.main([*TINY, f"--data_root={data_root}", f"--out_dir={out_dir}",
                                  *overrides])
    return metrics, (json.loads((Path(out_dir) / "summary.json").read_text())
                     if (Path(out_dir) / "summary.json").exists() else None)


@pytest.fixture(scope="module")
def trained(nights, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    run(nights, out)  # configs/nights_tiny.yaml as it is
    return out


@pytest.fixture(scope="module")
def short_run(small_nights, tmp_path_factory):
    """configs/nights_tiny.yaml for one epoch of 3 steps on small_nights: a trained checkpoint in
    a few seconds (the full `trained` run takes a minute: the slow tier's)."""
    out = tmp_path_factory.mktemp("short")
    run(small_nights, out, "--epochs=1", "--batch_size=32")
    return out


def held_out(scores, counts):
    """2AFC over val and test together (~880 triplets): half the sampling noise of either alone."""
    return sum(scores[s] * counts[s] for s in ("val", "test")) / (counts["val"] + counts["test"])


@pytest.mark.slow
def test_real_labels_are_learned_and_shuffled_are_not(nights, trained, tmp_path):
    """Measured with this config on data seeds 0 / 1 / 2 (run seed 42), val+test 2AFC: random init
    0.616 / 0.584 / 0.619, trained 0.672 / 0.631 / 0.665, shuffled 0.592 / 0.578 / 0.606: training
    gains +0.046 to +0.056 over the random init; the control loses 0.006-0.024 and ends 0.053-0.080
    below the trained run."""
    summary = json.loads((trained / "summary.json").read_text())
    _, shuffled = run(nights, tmp_path, "--shuffle_labels=true")
    torch.manual_seed(42)  # the runs' seed: the same random init they started from
    model = create_model("tiny", image_size=SIZE)
    splits = {s: NightsDataset(nights, s, SIZE) for s in ("val", "test")}
    counts = {s: len(d) for s, d in splits.items()}
    untrained = held_out({s: two_afc_by_triplet(model, d, "cpu") for s, d in splits.items()},
                         counts)
    real, control = held_out(summary["2afc"], counts), held_out(shuffled["2afc"], counts)
    print(f"val+test 2AFC: random init {untrained:.3f}, trained {real:.3f}, "
          f"shuffled labels {control:.3f}")
    # Thresholds with room for the measured spread (docstring).
    assert real > untrained + 0.025
    assert control < real - 0.03 and control < untrained + 0.01
    assert summary["n_triplets"] == shuffled["n_triplets"] and summary["n_triplets"]["val"] > 100
    n_in, n_no = summary["n_triplets"]["test_imagenet"], summary["n_triplets"]["test_no_imagenet"]
    assert n_in + n_no == summary["n_triplets"]["test"]
    # total: the size-weighted mean of the two halves.
    assert summary["2afc"]["total"] == pytest.approx(summary["2afc"]["test"])
    assert summary["2afc"]["total"] == pytest.approx(
        (summary["2afc"]["test_imagenet"] * n_in + summary["2afc"]["test_no_imagenet"] * n_no)
        / (n_in + n_no))
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert "git_commit" in lines[0] and lines[0]["config"]["shuffle_labels"] is False
    assert [r["val_2afc"] for r in lines if "val_2afc" in r][-1] == summary["2afc"]["val"]


def test_checkpoint_loads_anywhere_and_only_vision_trained(small_nights, short_run):
    model = load_checkpoint(short_run / "ckpt.pt")
    summary = json.loads((short_run / "summary.json").read_text())
    val = NightsDataset(small_nights, "val", model.config.image_size)
    # The same embeddings as in training: the same score. Evaluated in training's batches: with
    # other batches the float sums run in another order, and a triplet whose two distances differ by
    # one ulp (seen: 6e-8) can flip and move the score by ~5e-4.
    batch_size = yaml.safe_load((ROOT / "configs/nights_tiny.yaml").read_text())["eval_batch_size"]
    assert two_afc_by_triplet(model, val, "cpu", batch_size) == pytest.approx(
        summary["2afc"]["val"], abs=1e-6)
    torch.manual_seed(42)
    initial = create_model("tiny", image_size=SIZE).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial[key]) != key.startswith("visual."), key


def test_stop_and_resume_gives_identical_weights(small_nights, tmp_path):
    args = ["--epochs=2", "--batch_size=32", "--save_every=3"]
    run(small_nights, tmp_path / "straight", *args)
    # Stopped mid epoch 2.
    metrics, summary = run(small_nights, tmp_path / "resumed", *args, "--stop_after_steps=4")
    assert (summary is None
            and torch.load(tmp_path / "resumed/ckpt.pt", weights_only=True)["step"] == 4)
    run(small_nights, tmp_path / "resumed", *args)
    straight = torch.load(tmp_path / "straight/ckpt.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/ckpt.pt", weights_only=True)
    assert straight["step"] == resumed["step"] > 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert (json.loads((tmp_path / "resumed/summary.json").read_text())["2afc"]
            == resumed["metrics"] == straight["metrics"])
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.0003 -> 0.01\)"):
        run(small_nights, tmp_path / "resumed", *args, "--lr=0.01")
    # A finished run: rerunning it (settings that do not change the run may differ) changes nothing.
    before = {name: (tmp_path / "resumed" / name).read_bytes()
              for name in ("ckpt.pt", "summary.json", "metrics.jsonl")}
    metrics, _ = run(small_nights, tmp_path / "resumed", *args, "--log_every=1", "--workers=1")
    assert metrics == straight["metrics"]
    assert {name: (tmp_path / "resumed" / name).read_bytes() for name in before} == before


@pytest.fixture
def one_thread():
    """The in-process runs on the thread count of the script's subprocess (OMP_NUM_THREADS=1): the
    number of threads changes the order of float sums, and the comparison is bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_and_restart_is_exact(small_nights, tmp_path, one_thread):
    args = [f"--data_root={small_nights}", "--epochs=4", "--batch_size=32", "--log_every=1",
            "--workers=1"]
    run(small_nights, tmp_path / "straight", *args)
    stopped = tmp_path / "stopped"
    # Held before step 5 (tests/hold_at_step.py; 3 steps an epoch): the signal comes mid epoch 1 at
    # a known step, not wherever a polling loop happens to notice the log.
    process, go = hold_at_step.start("train_triplet.py", [*TINY, *args, f"--out_dir={stopped}"], 5,
                                     cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The trainer and its loader worker, as a scheduler signals a job.
    os.killpg(process.pid, signal.SIGTERM)
    os.write(go, b"G")  # step 5 runs; the trainer stops at its end
    os.close(go)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    state = torch.load(stopped / "ckpt.pt", weights_only=True)
    assert state["step"] == 5 and state["data_position"] == {"epoch": 1, "step": 2}
    assert "stopped by SIGTERM at step 5 of 12" in out and not (stopped / "summary.json").exists()
    run(small_nights, stopped, *args)
    straight = torch.load(tmp_path / "straight/ckpt.pt", weights_only=True)
    resumed = torch.load(stopped / "ckpt.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 12 and straight["metrics"] == resumed["metrics"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_nights, tmp_path,
                                                                  monkeypatch):
    real_loss, losses = objective.hinge_loss, []

    def poisoned(*args):  # the loss of step 4 (only) is NaN, as in a one-step spike
        losses.append(real_loss(*args))
        return losses[-1] * float("nan") if len(losses) == 4 else losses[-1]

    monkeypatch.setattr(train_triplet, "hinge_loss", poisoned)
    with pytest.raises(training.NonFiniteLoss,
                       match=r"non-finite loss at step 4 \(lr 0.00012\).*still holds step 3"):
        # 3 steps an epoch.
        run(small_nights, tmp_path, "--epochs=2", "--batch_size=32", "--log_every=100")
    # Found at the next check (the last step: no host sync per step), yet named exactly; the
    # checkpoint is the one of step 3 (epoch end), nothing was saved after the bad step.
    assert len(losses) == 6 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_posthoc_trains_only_vision_qkv(small_nights, short_run, tmp_path):
    run(small_nights, tmp_path, "--epochs=1", "--batch_size=32",
        f"--init={short_run / 'ckpt.pt'}", "--posthoc=true", "--lr=1e-3", "--weight_decay=0")
    before = load_checkpoint(short_run / "ckpt.pt").state_dict()
    after = load_checkpoint(tmp_path / "ckpt.pt").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Weights and biases, as the authors' src/train.py:939-943 unfreezes every qkv parameter.
    assert changed == {f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"
                       for i in range(2) for kind in ("weight", "bias")}


def test_authors_lr_schedule_over_a_whole_run_is_theirs(small_nights, tmp_path):
    """--lr_schedule=authors: the lr of every step of a whole run (2 epochs of 3 steps, 3 warmup
    steps), as metrics.jsonl logs it at log_every 1, is their LambdaLR's to 1e-9 of the peak."""
    run(small_nights, tmp_path, "--epochs=2", "--batch_size=32", "--lr_schedule=authors",
        "--warmup_steps=3", "--log_every=1")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ours = [r["lr"] for r in records if "loss" in r]
    theirs = their_lrs(3e-4, warmup_steps=3, max_epochs=2, steps=6)  # nights_tiny.yaml's lr
    assert len(ours) == 6 and max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-9 * 3e-4


@pytest.fixture(scope="module")
def resnet_run(small_nights, tmp_path_factory):
    """Stage 1 with the tiny ResNet at its 64 px: 1 epoch of 3 steps at batch 32."""
    out = tmp_path_factory.mktemp("resnet")
    run(small_nights, out, "--model=tiny-rn", "--image_size=64", "--epochs=1", "--batch_size=32")
    return out


def test_resnet_tower_trains_on_the_hinge(small_nights, resnet_run, tmp_path):
    trained = load_checkpoint(resnet_run / "ckpt.pt")
    assert (trained.config.resnet
            and json.loads((resnet_run / "summary.json").read_text())["2afc"]["val"] > 0)
    torch.manual_seed(42)  # the run's seed: its random init
    start = create_model("tiny-rn").state_dict()
    after = trained.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    # The text tower stays at its init.
    assert not {k for k in changed if not k.startswith("visual.")}
    assert {"visual.conv1.weight", "visual.attnpool.c_proj.weight", "visual.layer4.0.bn3.weight",
            "visual.layer1.0.bn1.running_mean", "visual.layer1.0.bn1.running_var"} <= changed
    assert after["visual.layer1.0.bn1.num_batches_tracked"].item() == 3  # one update a step
    # Gradient checkpointing: the same run (its recomputation leaves BatchNorm's statistics alone).
    run(small_nights, tmp_path, "--model=tiny-rn", "--image_size=64", "--epochs=1",
        "--batch_size=32", "--grad_checkpointing=true")
    checkpointed = load_checkpoint(tmp_path / "ckpt.pt").state_dict()
    for key, value in after.items():
        torch.testing.assert_close(checkpointed[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_resnet_checkpoint_loads_in_open_clip(resnet_run):
    pytest.importorskip("open_clip")
    from tests.test_backbones import open_clip_twin

    ours = load_checkpoint(resnet_run / "ckpt.pt")
    reference = open_clip_twin(ours.config).eval()
    reference.load_state_dict(torch.load(resnet_run / "ckpt.pt", weights_only=True)["state_dict"],
                              strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images),
                                   reference.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=0)


def test_posthoc_on_a_resnet_trains_only_the_attention_pool_qkv(small_nights, resnet_run, tmp_path):
    # 2 epochs: an evaluation between them.
    run(small_nights, tmp_path, "--epochs=2", "--batch_size=32", f"--init={resnet_run / 'ckpt.pt'}",
        "--posthoc=true", "--lr=1e-3", "--weight_decay=0", "--model=tiny-rn", "--image_size=64")
    before = load_checkpoint(resnet_run / "ckpt.pt").state_dict()
    after = load_checkpoint(tmp_path / "ckpt.pt").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # BatchNorm statistics too stay as they were. The key's bias may stay too: the softmax over
    # the keys is blind to it, so its gradient is 0 up to rounding.
    trainable = {f"visual.attnpool.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")}
    assert trainable - {"visual.attnpool.k_proj.bias"} <= changed <= trainable


@pytest.mark.slow
def test_ddp_two_processes_match_one(small_nights, tmp_path):
    args = ["--epochs=2", "--batch_size=32", f"--data_root={small_nights}"]
    run(small_nights, tmp_path / "one", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "train_triplet.py", *TINY, *args,
                    f"--out_dir={tmp_path / 'two'}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    one = torch.load(tmp_path / "one/ckpt.pt", weights_only=True)
    two = torch.load(tmp_path / "two/ckpt.pt", weights_only=True)
    assert one["step"] == two["step"]
    for key, value in one["state_dict"].items():
        other = two["state_dict"][key]
        if key.endswith("attn.in_proj_bias"):
            # The key bias adds the same amount to every score of a query, which softmax ignores:
            # its true gradient is 0, and Adam scales the float noise left there (which differs
            # with the order of sums) up to steps of size lr. Compare the query and value biases
            # only.
            width = value.shape[0] // 3
            value, other = (torch.cat([value[:width], value[2 * width:]]),
                            torch.cat([other[:width], other[2 * width:]]))
        # Same global batches; only the order of float sums differs (gradient all-reduce).
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)
