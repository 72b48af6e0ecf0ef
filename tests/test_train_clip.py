"""train_clip.py: the contrastive loss, accumulation, DDP, compile, and runs under faults.

Proves: the loss equals open_clip's ClipLoss on the same features, on one process and as the local
loss of 2 DDP ranks; `torchrun --nproc_per_node=2` (gloo, CPU) gives the same loss and the same
weights after an AdamW step as one process with the same global batch; cached-feature accumulation
over 4 micro-batches gives the same weights as the whole batch at once; torch.compile over DDP with
accumulation (no_sync through the kept DDP handle) gives the eager run's gradients, parameter by
parameter, on 2 ranks; `--init` takes the vision tower only, and the text tower starts as in the
baseline; a run killed with SIGKILL between checkpoints, or stopped with SIGTERM (sent to the
trainer and its loader worker, as a scheduler does), each at a known step (tests/hold_at_step.py
holds the trainer there: no race with a polling loop), and restarted with the same command ends
bit-for-bit equal to one that never stopped; rerunning a finished run changes nothing; a changed
setting is refused by name; a non-finite loss stops the run with the last good checkpoint intact;
bad samples are counted over both ranks into summary.json. Two torchrun launchers of one process
each, met through c10d rendezvous on 127.0.0.1 (two nodes), reach the weights of one launcher of
two processes, bit for bit, step by step. With a ResNet tower (tiny-rn):
`python train_clip.py --init=<stage-1 ckpt.pt>` starts from exactly the stage-1 vision tower
(BatchNorm statistics included) and the baseline's text tower, and trains it in train mode;
accumulation's cached pass leaves BatchNorm's statistics alone (one update per micro-batch). The
authors' recipe (configs/yfcc15m_authors.yaml) steps a huge gradient unclipped, as their code
does (a hand-written AdamW loop with no clipping is the reference; clipping at their json's unused
3 would have moved the weights elsewhere); `--lr_schedule=authors` gives every step of a whole run
the lr of their LambdaLR (tests/test_training.py their_lrs), whatever the groups; a checkpoint
whose model its preset no longer builds is refused by field. All fp32 on the CPU with the tiny
presets.
"""
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import training  # noqa: E402
from stage2 import contrastive  # noqa: E402
from stage1 import objective
from stage1 import nights  # noqa: E402
from tests import hold_at_step  # noqa: E402  (tests/: holds a trainer at a step)
import train_clip  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from world.make_data import make_nights, write_shards  # noqa: E402
from model import create_model
from tests.test_training import their_lrs

FP32 = training.autocast("cpu", "fp32")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def global_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49406, (n, 77), generator=g)
    # SOT ... EOT
    tokens[:, 0], tokens[torch.arange(n), torch.randint(3, 20, (n,), generator=g)] = 49406, 49407
    return images, tokens


def one_step(model, images, tokens, accum_steps, forward=None, ddp=None):
    """One optimiser step as the loop runs it (train_clip.train_step, lr 1e-3): returns the loss."""
    cfg = train_clip.Config(accum_steps=accum_steps, lr=1e-3, weight_decay=0.1, grad_clip=0.0)
    optimizer = training.make_optimizer(model, cfg, "cpu")
    loss = train_clip.train_step(model, forward or model, ddp, optimizer,
                                 training.grad_scaler("cpu", "fp32"), FP32, images, tokens, cfg.lr,
                                 cfg)
    return loss.item()


# AdamW's first step moves each weight by lr * g / (|g| + eps): for gradients near eps (1e-6) it
# magnifies fp32 rounding (1e-7 in g) up to ~1e-5 in the weight, out of a step of lr = 1e-3. The
# gradients themselves are compared at 1e-6; the weights after the step at this bound.
ADAM_ATOL = 1e-4


def tiny_model():
    torch.manual_seed(0)
    return create_model("tiny")


def test_loss_equals_open_clip():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    scale = torch.tensor(14.3)
    assert torch.allclose(contrastive.contrastive_loss(image, text, scale),
                          ClipLoss()(image, text, scale), atol=1e-6)


def test_accumulation_equals_one_large_batch():
    torch.set_num_threads(1)
    images, tokens = global_batch(8)
    whole, accumulated = tiny_model(), tiny_model()
    loss_whole = one_step(whole, images, tokens, accum_steps=1)
    loss_accumulated = one_step(accumulated, images, tokens, accum_steps=4)
    assert abs(loss_whole - loss_accumulated) < 1e-6
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        # logit_scale included: counted once
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
        assert torch.allclose(a, b, atol=ADAM_ATOL), name


class GradientTimes(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient: a huge gradient on demand."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class AmplifiedImages(torch.nn.Module):
    """A CLIP whose image features pass `factor` times their gradient back to the vision tower."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, images, tokens):
        image_features, text_features, logit_scale = self.model(images, tokens)
        return GradientTimes.apply(image_features, self.factor), text_features, logit_scale


def test_the_authors_recipe_steps_a_huge_gradient_unclipped():
    """Their src/train.py:1047 leaves gradient_clip_val commented out, so Lightning never clips:
    configs/yfcc15m_authors.yaml's two steps (the first with a gradient ~1e6 times its size) end
    where a hand-written loop ends that computes the same gradients and takes torch's AdamW step
    without clipping. Clipping at 3 (their json's value, never applied) ends elsewhere, so the
    comparison sees the clip."""
    torch.set_num_threads(1)
    cfg = cli.load_config(train_clip.Config, [str(ROOT / "configs" / "yfcc15m_authors.yaml"),
                                              "--model=tiny-authors", "--batch_size=8",
                                              "--accum_steps=2", "--contrastive_batch=4"])
    images, tokens = global_batch(8)
    slots = torch.arange(8)  # the rows' places in the batch: groups of 4 are rows 0-3 and 4-7

    def run(step):
        torch.manual_seed(0)
        model = create_model(cfg.model)
        optimizer = training.make_optimizer(model, cfg, "cpu")
        for factor in (1e6, 1.0):
            step(model, AmplifiedImages(model, factor), optimizer)
        return model

    def kit_step(cfg):
        return lambda model, forward, optimizer: train_clip.train_step(
            model, forward, None, optimizer, training.grad_scaler("cpu", "fp32"), FP32, images,
            tokens, cfg.lr, cfg, slots=slots)

    def unclipped_step(model, forward, optimizer):  # the reference: no clipping, no clamp
        optimizer.zero_grad(set_to_none=True)
        contrastive.accumulate_gradients(forward, images, tokens, 2, FP32,
                                         training.grad_scaler("cpu", "fp32"), slots=slots,
                                         group_size=4)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                     if p.grad is not None]))
        norms.append(norm.item())
        optimizer.step()

    norms = []
    authors, reference = run(kit_step(cfg)), run(unclipped_step)
    clipped = run(kit_step(dataclasses.replace(cfg, grad_clip=3.0)))
    assert norms[0] > 1e3 * 3  # the first gradient is far above their json's 3
    for (name, a), b, c in zip(authors.named_parameters(), reference.parameters(),
                               clipped.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    moved = max((a - c).abs().max().item() for a, c in zip(authors.parameters(),
                                                            clipped.parameters()))
    assert moved > 100 * 1e-6  # clipping would have moved the weights elsewhere


def ddp_worker(out):
    """Run by torchrun in test_two_ranks_equal_one_process: each rank takes half of the batch."""
    from open_clip.loss import ClipLoss

    torch.set_num_threads(1)
    ranks = training.setup_distributed("cpu")
    images, tokens = global_batch(8)
    mine = slice(4 * ranks.rank, 4 * ranks.rank + 4)
    model = tiny_model()
    with torch.no_grad():  # the local loss equals open_clip's with gathered features
        image, text, scale = model(images[mine], tokens[mine])
        reference = ClipLoss(local_loss=True, gather_with_grad=True, rank=ranks.rank,
                             world_size=ranks.world_size)(image, text, scale)
        assert torch.allclose(contrastive.contrastive_loss(image, text, scale), reference,
                              atol=1e-6)
    forward, ddp = training.wrap_model(model, ranks)  # as train_clip.main wraps it
    results, grads = {}, None
    for accum_steps in (1, 2):
        loss = one_step(model, images[mine], tokens[mine], accum_steps, forward, ddp)
        results[accum_steps] = training.all_reduce_sum([loss], "cpu")[0] / ranks.world_size
        # after the first step
        grads = grads or {name: p.grad.clone() for name, p in model.named_parameters()}
    if ranks.is_main:
        torch.save({"loss": results, "grads": grads, "state_dict": model.state_dict()}, out)
    training.cleanup_distributed()


def recorded_step(model, forward, ddp, optimizer, images, tokens, cfg):
    """train_step as the loop calls it -> (loss, {name: gradient}), the gradients as the
    optimiser is about to use them (a step pre-hook: after accumulation, DDP's average and
    clipping, before AdamW)."""
    seen = {}

    def record(optimizer_, args, kwargs):
        seen.update({name: p.grad.detach().clone() for name, p in model.named_parameters()})

    handle = optimizer.register_step_pre_hook(record)
    loss = train_clip.train_step(model, forward, ddp, optimizer,
                                 training.grad_scaler("cpu", "fp32"), FP32, images, tokens, cfg.lr,
                                 cfg).item()
    handle.remove()
    return loss, seen


def compile_worker(out):
    """Run by torchrun in test_compile_with_ddp_and_accumulation_equals_eager: two steps of the
    loop's train_step with accum_steps=2, eager and compiled, each wrapped as train_clip.main wraps;
    the gradients of each step are recorded before the optimiser uses them."""
    torch.set_num_threads(1)
    ranks = training.setup_distributed("cpu")
    images, tokens = global_batch(8, seed=1)
    mine = slice(4 * ranks.rank, 4 * ranks.rank + 4)
    # No clipping: clipping (like Adam) divides out a constant factor in the gradients, so a path
    # that doubles them would reach the same weights. The raw gradients show it.
    cfg = train_clip.Config(accum_steps=2, lr=1e-3, weight_decay=0.1, grad_clip=0.0)
    results = {}
    for compiled in (False, True):
        model = tiny_model()
        # aot_eager: dynamo's graph capture, DDP's graph splitting at bucket boundaries and
        # AOTAutograd's joint forward-backward graph, i.e. everything of compile that touches
        # DDP and no_sync; only inductor's C++ code generation is left out (it would take
        # minutes on 2 shared cores).
        forward, ddp = training.wrap_model(model, ranks, compile=compiled,
                                           compile_backend="aot_eager")
        optimizer = training.make_optimizer(model, cfg, "cpu")
        steps = [recorded_step(model, forward, ddp, optimizer, images[mine], tokens[mine], cfg)
                 for _ in range(2)]
        results[compiled] = {"losses": [loss for loss, _ in steps],
                             "grads": [grads for _, grads in steps],
                             "state_dict": model.state_dict()}
    if ranks.is_main:
        torch.save(results, out)
    training.cleanup_distributed()


# Gradients of the same batch agree to fp32 rounding of the sums' order, measured as a share of each
# tensor's largest gradient: compiled (aot_eager) vs eager 0 (bit-equal); 2 ranks x 2 micro-batches
# vs one process 1.1e-6. A path that doubles or halves a gradient, or counts the logit scale twice,
# is off by 50-100% of it.
GRAD_RTOL = 1e-5


def assert_same_gradients(ours, reference, what):
    for name, expected in reference.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=GRAD_RTOL * scale + 1e-12,
                                   msg=f"{what}: {name}")


@pytest.mark.slow
def test_compile_with_ddp_and_accumulation_equals_eager(tmp_path):
    out = tmp_path / "compile.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", __file__, "compile", str(out)],
                   check=True, env=ENV, cwd=ROOT, timeout=300)
    results = torch.load(out, weights_only=True)
    eager, compiled = results[False], results[True]
    # The eager run's first gradients are the whole batch's on one process (no DDP, no
    # accumulation).
    torch.set_num_threads(1)
    images, tokens = global_batch(8, seed=1)
    model = tiny_model()
    _, whole_batch = recorded_step(model, model, None,
                                   training.make_optimizer(model, train_clip.Config(), "cpu"),
                                   images, tokens,
                                   train_clip.Config(accum_steps=1, lr=1e-3, weight_decay=0.1,
                                                     grad_clip=0.0))
    assert_same_gradients(eager["grads"][0], whole_batch,
                          "eager, 2 ranks x 2 micro-batches vs 1 process")
    for step in range(2):  # the second step's gradients also depend on the first step's update
        assert_same_gradients(compiled["grads"][step], eager["grads"][step],
                              f"compiled vs eager, step {step + 1}")
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-6)
    for name, value in eager["state_dict"].items():
        assert torch.allclose(compiled["state_dict"][name], value, atol=ADAM_ATOL), name
    assert any(not torch.equal(value, tiny_model().state_dict()[name])
               for name, value in eager["state_dict"].items())


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", __file__, str(out)],
                   check=True, env=ENV, cwd=ROOT, timeout=120)
    ddp = torch.load(out, weights_only=True)
    torch.set_num_threads(1)
    images, tokens = global_batch(8)
    model = tiny_model()
    losses = {1: one_step(model, images, tokens, 1)}
    for name, p in model.named_parameters():  # DDP's averaged gradients equal the global batch's
        assert torch.allclose(ddp["grads"][name], p.grad, atol=1e-6, rtol=1e-4), name
    losses[2] = one_step(model, images, tokens, 2)
    for accum_steps in (1, 2):
        assert abs(ddp["loss"][accum_steps] - losses[accum_steps]) < 1e-6
    for name, value in model.state_dict().items():
        assert torch.allclose(ddp["state_dict"][name], value, atol=ADAM_ATOL), name


def steps_worker(out):
    """Run by torchrun in test_two_nodes_equal_one_node_of_two_processes: three steps of the loop's
    train_step (accum_steps 2) on each rank's half of three global batches; rank 0 saves the
    weights after each step."""
    torch.set_num_threads(1)
    ranks = training.setup_distributed("cpu")
    model = tiny_model()
    forward, ddp = training.wrap_model(model, ranks)
    cfg = train_clip.Config(accum_steps=2, lr=1e-3, weight_decay=0.1, grad_clip=1.0)
    optimizer = training.make_optimizer(model, cfg, "cpu")
    weights = []
    for step in range(3):
        images, tokens = global_batch(8, seed=10 + step)
        mine = slice(4 * ranks.rank, 4 * ranks.rank + 4)
        train_clip.train_step(model, forward, ddp, optimizer, training.grad_scaler("cpu", "fp32"),
                              FP32, images[mine], tokens[mine], cfg.lr, cfg)
        weights.append({name: value.clone() for name, value in model.state_dict().items()})
    if ranks.is_main:
        torch.save({"weights": weights, "world_size": ranks.world_size}, out)
    training.cleanup_distributed()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_one_node_of_two_processes(tmp_path):
    """docs/training.md's multi-node command on loopback: two torchrun launchers, each a node of
    one process, meet through c10d rendezvous on 127.0.0.1 (the second without --node_rank: c10d
    assigns ranks) and train step for step to the same weights, bit for bit, as one launcher of
    two processes."""
    env = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}  # loopback only, whatever the machine's name says
    one_node = tmp_path / "one_node.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", __file__, "steps", str(one_node)],
                   check=True, env=env, cwd=ROOT, timeout=180)
    two_nodes, port = tmp_path / "two_nodes.pt", free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=pi-{port}",
                "--local_addr=127.0.0.1"]
    nodes = [subprocess.Popen(launcher + node_rank + [__file__, "steps", str(two_nodes)],
                              env=env, cwd=ROOT)
             for node_rank in (["--node_rank=0"], [])]
    try:
        assert [node.wait(timeout=180) for node in nodes] == [0, 0]
    finally:
        for node in nodes:
            node.kill()
    ours, reference = (torch.load(path, weights_only=True) for path in (two_nodes, one_node))
    assert ours["world_size"] == reference["world_size"] == 2
    for step, (a, b) in enumerate(zip(ours["weights"], reference["weights"])):
        for name in b:
            assert torch.equal(a[name], b[name]), (step, name)
    assert not torch.equal(ours["weights"][0]["logit_scale"], ours["weights"][2]["logit_scale"])


def test_init_takes_the_vision_tower_only(tmp_path):
    donor = create_model("tiny")
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}},
               tmp_path / "stage1.pt")
    baseline, pi = tiny_model(), tiny_model()
    train_clip.load_init(pi, tmp_path / "stage1.pt", include_text=False)
    for name, value in pi.state_dict().items():
        source = donor if name.startswith("visual.") else baseline
        assert torch.equal(value, source.state_dict()[name]), name
    with pytest.raises(ValueError, match="stage1.pt"):
        train_clip.load_init(create_model("small"), tmp_path / "stage1.pt", include_text=False)


def test_accumulation_updates_batchnorm_statistics_once_per_micro_batch():
    torch.manual_seed(0)
    model, plain = create_model("tiny-rn").train(), create_model("tiny-rn").train()
    plain.load_state_dict(model.state_dict())
    images, tokens = global_batch(8)
    images = torch.nn.functional.interpolate(images, size=64)  # tiny-rn's input size
    contrastive.accumulate_gradients(model, images, tokens, 2, FP32,
                                     training.grad_scaler("cpu", "fp32"))
    with torch.no_grad():
        for chunk in images.chunk(2):  # what the re-forwards with gradients alone would do
            plain.visual(chunk)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, atol=1e-6, rtol=0,
                                   msg=name)
    assert model.visual.layer1[0].bn1.num_batches_tracked.item() == 2


# --------------------------------------------------------------------------------------------------
# End to end: the script itself
# --------------------------------------------------------------------------------------------------


def photo_jpeg(i, size=40):
    photo = skdata.chelsea()
    y, x = (13 * i) % (photo.shape[0] - size), (29 * i) % (photo.shape[1] - size)
    buffer = io.BytesIO()
    Image.fromarray(photo[y : y + size, x : x + size]).save(buffer, "JPEG")
    return buffer.getvalue()


def run_command(shards, out_dir, *extra):
    return [sys.executable, str(ROOT / "train_clip.py"), str(ROOT / "configs" / "clip_tiny.yaml"),
            f"--train_data={shards}", f"--out_dir={out_dir}", "--max_steps=20", "--batch_size=8",
            "--accum_steps=2", "--save_every=4", "--log_every=5", "--workers=1",
            "--shuffle_buffer=16", *extra]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """60 samples in 6 shards (7 steps an epoch: 20 steps cross 3 epochs), a small NIGHTS folder for
    the final evaluation (so summary.json has metrics), and one uninterrupted run:
    `command(out_dir, *extra)` and the run's folder."""
    root = tmp_path_factory.mktemp("clip")
    write_shards(root / "shards",
                 ((f"{i:05d}", {"jpg": photo_jpeg(i), "txt": f"cat photo {i}"}) for i in range(60)),
                 10)
    make_nights(root / "nights", 100, seed=2, image_size=32)
    shards = str(root / "shards" / "{00000..00005}.tar")

    def command(out_dir, *extra):
        return run_command(shards, out_dir, f"--nights_root={root / 'nights'}", *extra)

    subprocess.run(command(root / "straight"), check=True, env=ENV, capture_output=True,
                   timeout=120)
    return command, root / "straight"


def assert_same_run(a_dir, b_dir):
    a = torch.load(a_dir / "ckpt.pt", weights_only=True)
    b = torch.load(b_dir / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name  # bit for bit
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert a["data_position"] == b["data_position"] and a["metrics"] == b["metrics"]
    summary = json.loads((b_dir / "summary.json").read_text())
    assert (summary["steps"] == 20 and summary["samples_seen"] == 160
            and summary["samples_skipped"] == 0)
    assert summary["metrics"] == json.loads((a_dir / "summary.json").read_text())["metrics"]


@pytest.mark.slow
def test_sigkill_and_restart_equals_an_uninterrupted_run(clip_run, tmp_path):
    command, straight = clip_run
    killed = tmp_path / "killed"
    # Held before step 6 (tests/hold_at_step.py): step 4's checkpoint is written, step 5 is done and
    # unsaved. The kill lands there, not wherever a polling loop happens to notice a file.
    process, go = hold_at_step.start("train_clip.py", command(killed)[2:], 6, env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and its loader worker
    assert process.wait() == -signal.SIGKILL
    os.close(go)
    state = torch.load(killed / "ckpt.pt", weights_only=True)
    # mid epoch 0 (7 steps)
    assert state["step"] == 4 and state["data_position"] == {"epoch": 0, "step": 4}
    subprocess.run(command(killed), check=True, env=ENV, capture_output=True, timeout=120)
    assert_same_run(straight, killed)  # step 5 done again, the same
    header = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert header["config"]["max_steps"] == 20 and "git_commit" in header


@pytest.mark.slow
def test_sigterm_saves_at_the_step_and_restart_equals_an_uninterrupted_run(clip_run, tmp_path):
    command, straight = clip_run
    stopped = tmp_path / "stopped"
    process, go = hold_at_step.start("train_clip.py", command(stopped)[2:], 6, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the trainer and its loader worker, as a scheduler signals a job
    os.killpg(process.pid, signal.SIGTERM)
    os.write(go, b"G")  # step 6 runs; the trainer stops at its end
    os.close(go)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    state = torch.load(stopped / "ckpt.pt", weights_only=True)
    # not a save_every step
    assert state["step"] == 6 and state["data_position"] == {"epoch": 0, "step": 6}
    assert "stopped by SIGTERM at step 6 of 20" in out
    assert not (stopped / "summary.json").exists()  # not finished
    subprocess.run(command(stopped), check=True, env=ENV, capture_output=True, timeout=120)
    assert_same_run(straight, stopped)


@pytest.mark.slow
def test_rerun_of_a_finished_run_changes_nothing_and_a_changed_setting_is_refused(clip_run):
    command, straight = clip_run
    before = {name: (straight / name).read_bytes() for name in ("ckpt.pt", "summary.json")}
    # The summary's score is the final weights' 2AFC on the NIGHTS test split, recomputed here.
    reported = json.loads(before["summary.json"])["metrics"]["nights/2afc"]
    model = load_checkpoint(straight / "ckpt.pt")
    triplets = nights.NightsDataset(straight.parent / "nights", "test", model.config.image_size)
    assert reported == pytest.approx(objective.two_afc_by_triplet(model, triplets, "cpu"),
                                     abs=1e-6)
    # Settings that do not change the run may differ: still a finished run, left as it is.
    rerun = subprocess.run(command(straight, "--log_every=1", "--save_every=2", "--eval_every=3"),
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout, rerun.stderr
    assert {name: (straight / name).read_bytes() for name in before} == before
    refused = subprocess.run(command(straight, "--lr=0.01", "--accum_steps=4"), env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    message = refused.stderr.strip()
    assert "\n" not in message and message.startswith("train_clip.py: error:")  # run_cli's one line
    assert ("lr: 0.001 -> 0.01" in message and "accum_steps: 2 -> 4" in message
            and "another out_dir" in message)
    assert {name: (straight / name).read_bytes() for name in before} == before


def test_authors_lr_schedule_over_a_whole_run_is_theirs(clip_run, tmp_path):
    """--lr_schedule=authors: the lr of every step of a whole run (2 epochs of 7 steps, 3 warmup
    steps, groups of 4 in batches of 8), as metrics.jsonl logs it at log_every 1, is their
    LambdaLR's to 1e-9 of the peak: its length counts epochs, not groups or micro-batches."""
    command, _ = clip_run
    out = tmp_path / "authors"
    subprocess.run(command(out, "--lr_schedule=authors", "--warmup_steps=3", "--epochs=2",
                           "--max_steps=0", "--log_every=1", "--contrastive_batch=4"),
                   check=True, env=ENV, capture_output=True, timeout=120)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ours = [r["lr"] for r in records if "loss" in r]
    theirs = their_lrs(1e-3, warmup_steps=3, max_epochs=2, steps=14)  # clip_tiny.yaml's lr
    assert len(ours) == 14 and max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-9 * 1e-3


@pytest.fixture
def one_thread():
    """A tiny model trained in-process: more threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(clip_run, tmp_path, monkeypatch,
                                                                   one_thread):
    command, _ = clip_run
    real_step, losses = train_clip.train_step, []

    # from step 6 on the loss (only) is NaN: the weights stay good, as after a spike
    def poisoned(*args):
        loss = real_step(*args)
        losses.append(loss)
        return loss * float("nan") if len(losses) >= 6 else loss

    monkeypatch.setattr(train_clip, "train_step", poisoned)
    saves = []
    monkeypatch.setattr(training, "atomic_save",
                        lambda obj, path, save=training.atomic_save: (saves.append(obj["step"]),
                                                                      save(obj, path)))
    out = tmp_path / "nan"
    with pytest.raises(training.NonFiniteLoss,
                       match=r"non-finite loss at step 6 \(lr 0.0003\).*still holds step 4"):
        train_clip.main(command(out)[2:])
    # Checked at step 8's save (no host sync per step), yet named exactly; the save of step 8
    # never happened.
    assert len(losses) == 8 and saves == [4]
    assert (torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
            and not (out / "summary.json").exists())


@pytest.mark.slow
def test_two_ranks_count_bad_samples_into_the_summary(tmp_path):
    # 4 shards of 10; the first sample of each has no caption. 4 streams of 10 sample indices
    # each own one whole shard; unpermuted (shuffle_buffer=1) each reads its bad first sample
    # at step 0: 4 skipped.
    def samples():
        for i in range(40):
            yield f"{i:05d}", ({"jpg": photo_jpeg(i)} if i % 10 == 0
                               else {"jpg": photo_jpeg(i), "txt": f"cat {i}"})

    write_shards(tmp_path / "shards", samples(), 10)
    command = run_command(tmp_path / "shards" / "{00000..00003}.tar", tmp_path / "run",
                          "--max_steps=9", "--batch_size=4", "--accum_steps=1",
                          "--shuffle_buffer=1", "--streams=4")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", *command[1:]],
                   check=True, env=ENV, capture_output=True, timeout=120)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["samples_seen"] == 36
    assert summary["samples_skipped"] == 4 and summary["skipped_by_reason"]["no_caption"] == 4


def test_init_moves_a_stage1_resnet_tower_exactly(tmp_path):
    """The script's own load path: a stage-1 ckpt.pt (the kit's format) -> train_clip.py --init,
    run at lr 0 (AdamW then leaves every weight as it is), so the saved weights are the ones it
    started from."""
    torch.manual_seed(5)
    donor = create_model("tiny-rn")
    with torch.no_grad():
        for m in donor.modules():  # trained-looking statistics, different from a fresh init's
            if isinstance(m, torch.nn.BatchNorm2d):
                (m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2),
                 m.weight.uniform_(0.5, 1.5))
    torch.save({"state_dict": donor.state_dict(), "model_config": donor.config.__dict__, "step": 3},
               tmp_path / "stage1.pt")
    write_shards(tmp_path / "shards",
                 ((f"{i:05d}", {"jpg": photo_jpeg(i), "txt": f"cat {i}"}) for i in range(16)), 8)
    command = run_command(tmp_path / "shards" / "{00000..00001}.tar", tmp_path / "run",
                          "--model=tiny-rn", "--lr=0", f"--init={tmp_path / 'stage1.pt'}")
    command = [c for c in command if not c.startswith("--max_steps")] + ["--max_steps=2"]
    subprocess.run(command, check=True, env=ENV, capture_output=True, timeout=300)
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["state_dict"]
    # clip_tiny.yaml's seed: the baseline's random init, drawn before --init loads
    torch.manual_seed(0)
    baseline = create_model("tiny-rn").state_dict()
    for name, value in donor.state_dict().items():
        if "running_" in name or "num_batches_tracked" in name:
            continue  # stage 2 trains in train mode: the statistics move on from the donor's
        assert torch.equal(saved[name],
                           value if name.startswith("visual.") else baseline[name]), name
    # 2 steps x 2 micro-batches
    assert saved["visual.layer1.0.bn1.num_batches_tracked"].item() == 2 * 2
    assert not torch.equal(saved["visual.layer1.0.bn1.running_mean"],
                           donor.state_dict()["visual.layer1.0.bn1.running_mean"])


@pytest.mark.slow
def test_model_settings_reach_the_checkpoint_and_a_changed_one_is_refused(clip_run, tmp_path):
    """The path users run for an ablation:
    `train_clip.py --model tiny-authors --model_settings ...`; the checkpoint records the settings
    (evaluate.py rebuilds that model), and a resume with others is refused."""
    command, _ = clip_run
    out = tmp_path / "settings"
    setting = "--model_settings=context_length=16,init_logit_scale=2.6593"
    run = subprocess.run(command(out, "--model=tiny-authors", setting, "--max_steps=3"), env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    model = load_checkpoint(out / "ckpt.pt")
    assert model.config.context_length == 16 and model.positional_embedding.shape[0] == 16
    assert (model.config.init_logit_scale, model.config.text_pooling) == (2.6593, "mean")
    refused = subprocess.run(command(out, "--model=tiny-authors",
                                     "--model_settings=context_length=16", "--max_steps=3"),
                             env=ENV, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and (
        "model_settings: 'context_length=16,init_logit_scale=2.6593' -> 'context_length=16'"
        in refused.stderr), refused.stderr


if __name__ == "__main__":
    if sys.argv[1] in ("compile", "steps"):
        (compile_worker if sys.argv[1] == "compile" else steps_worker)(sys.argv[2])
    else:
        ddp_worker(sys.argv[1])
