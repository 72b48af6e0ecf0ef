"""The plumbing both trainers share, written once so that the two cannot drift apart.

  distributed   single process by default, DDP when torchrun sets RANK; DDP + compile wrapping
  precision     one autocast path (bf16 / fp16 / fp32) and the GradScaler that fp16 alone needs
  optimiser     AdamW parameter groups with CLIP's weight-decay exclusions, the lr schedules
  checkpoints   atomic saves, RNG state capture, the resume check both trainers apply
  faults        SIGTERM / SIGINT stop at a step boundary agreed by all ranks; non-finite losses
                caught without a host sync per step; the next batch copied to the GPU while the
                step runs
  a run         start, resume, checkpoint save, what is due after a step, the log interval: the
                pieces both trainers' loops are made of
"""
import contextlib
import dataclasses
import datetime
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import UserError, load_config, writable_folder

# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------


# Ranks wait for each other on a CPU (gloo) group with this timeout where one rank works alone: the
# main rank's evaluation (an ImageNet-sized task can outlast NCCL's default 10 minutes), its
# checkpoint save. No NCCL operation is pending meanwhile, so NCCL's watchdog does not fire; a rank
# that dies is noticed by torchrun, which stops the others.
WAIT_TIMEOUT = datetime.timedelta(hours=4)


@dataclasses.dataclass
class Ranks:
    """Where this process stands among a run's ranks (one rank without torchrun), and where it
    computes."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # a gloo group for CPU-side agreement (stop flags, waiting for the main rank)
    control: object = None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def enable_tf32():
    """fp32 matmuls and convolutions in TF32, through the calls every torch from 2.9 on reads both
    ways: set_float32_matmul_precision("high") and cudnn.allow_tf32. Setting the newer per-backend
    `fp32_precision` instead makes torch 2.11 .. 2.14 raise when anything reads the older getters
    (`torch.backends.cuda.matmul.allow_tf32`, `get_float32_matmul_precision`), as inductor's
    max-autotune does ("mix of the legacy and new APIs"); set this way, both kinds of getter answer
    (tests/test_gpu_session.py reads them all)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def setup_distributed(device=""):
    """One process on `device` (cuda when present, if empty), or DDP when torchrun set RANK:
    nccl on GPUs, gloo on the CPU. No process group is made for a single process. On CUDA, fp32
    matmuls and convolutions use TF32 (what every fast CLIP trainer does; bf16 autocast covers most
    matmuls anyway)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is visible; use --device=cpu")
    if device.startswith("cuda"):
        enable_tf32()
    if "RANK" not in os.environ:
        return Ranks(device=torch.device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return Ranks(rank, world_size, local_rank, device,
                 dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def stopped(stop, cfg, ranks, step, total_steps, ckpt_path, bar):
    """A run stopped by a signal or stop_after_steps, after its checkpoint: say how to resume, and
    leave the process group."""
    bar.close()
    if ranks.is_main:
        reason = stop.received or ("stop_after_steps" if step == cfg.stop_after_steps
                                   else "another rank")
        tqdm.write(f"stopped by {reason} at step {step} of {total_steps}, saved {ckpt_path}; "
                   "run the same command to resume")
    cleanup_distributed()


def all_reduce_sum(values, device, dtype=torch.float64):
    """Sum a list of numbers over ranks (identity on one process). dtype=torch.int64 for counts and
    positions, which float64 holds exactly only up to 2**53 (and float32 only up to 2**24)."""
    t = torch.tensor(values, dtype=dtype, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag, ranks):
    """True on every rank when `flag` is true on any: one tiny all-reduce on the CPU group, so
    asking at every step costs no GPU synchronisation."""
    if not ranks.enabled:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ranks.control)
    return bool(t.item())


def wait_for_main(ranks):
    """Every rank waits here for the main one (done with its evaluation), up to WAIT_TIMEOUT."""
    if ranks.enabled:
        dist.barrier(group=ranks.control)


def wrap_model(module, ranks, compile=False, compile_backend="inductor", sync_batchnorm=False):
    """-> (forward, ddp): what runs the training forward, and the DistributedDataParallel under it
    (None on one process). DDP first, then compile (PyTorch's recommended order); `ddp` is kept
    apart because torch.compile(DDP(m)) is no longer a DistributedDataParallel, and accumulation
    needs ddp.no_sync(). gradient_as_bucket_view: gradients live in DDP's buckets, one copy fewer.

    BatchNorm (the ResNet towers) under DDP normalises by each rank's share of the batch unless
    sync_batchnorm, which swaps every BatchNorm of `module` in place for torch's SyncBatchNorm:
    batch statistics over the global batch, as one process would compute them (same parameters
    and buffers, so checkpoints are unchanged). A ViT has no BatchNorm: the setting does
    nothing there."""
    ddp = None
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        for m in module.modules())
    if ranks.enabled and sync_batchnorm and has_batchnorm:
        if ranks.device.type != "cuda":
            raise UserError("sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; on CPU ranks "
                            "set --sync_batchnorm=false (each rank then normalises by its own "
                            "share of the batch)")
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        # children replaced in place: the caller's model is what trains and saves
        assert converted is module
    if ranks.enabled:
        device_ids = [ranks.local_rank] if ranks.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                        gradient_as_bucket_view=True)
    forward = ddp if ddp is not None else module
    if compile:
        forward = torch.compile(forward, backend=compile_backend)
    return forward, ddp


def no_sync(ddp, skip):
    """ddp.no_sync() when `skip` (a micro-batch that only accumulates gradients), else nothing."""
    return ddp.no_sync() if ddp is not None and skip else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


def default_precision(device):
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device, precision):
    """The one mixed-precision path: autocast for bf16 / fp16, nothing for fp32."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device, precision):
    """fp16 needs loss scaling against underflow; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------

_NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


def param_groups(model, weight_decay):
    """AdamW groups: decay on weight matrices only. Biases, LayerNorm gains, embeddings of position
    and the class token and logit_scale are not decayed (open_clip; the PI fork's
    stage-1 recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(n in name for n in _NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, cfg, device):
    """AdamW over the trainable parameters, as the PI authors and open_clip run it (cfg's lr,
    weight_decay, beta1, beta2, eps); fused (one kernel for all parameters) on CUDA. With
    weight_decay 0 it is exactly Adam."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=torch.device(device).type == "cuda")


def cosine_lr(step, base_lr, warmup_steps, total_steps):
    """Linear warmup to base_lr over warmup_steps, then cosine to 0 at total_steps (open_clip)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


LR_SCHEDULES = ("cosine", "authors")


def lr_function(schedule):
    """step (optimiser steps counted from 1) -> lr. `schedule`: the trainer's dict (lr,
    warmup_steps, total_steps, epochs, lr_schedule).

    cosine (the kit's): linear warmup, then a cosine to 0 at the last step (open_clip).

    authors: the PI authors' LambdaLR as their code runs it (github
    cheesepuff90/Brain_Initialization @38f3395, src/lightning_module.py _get_lr_scheduler, lines
    504-553, under their pinned Lightning 2.5.1). Lightning calls configure_optimizers
    (lightning_module.py:555-561) from strategy.setup (Lightning's trainer/trainer.py:988) before
    the fit loop sizes its data (loops/fit_loop.py:207-208), so trainer.num_training_batches is
    still float("inf") (fit_loop.py:103); max_steps is -1 (their src/train.py:850) and
    limit_train_batches 1.0 (train.py:1027). So the length is the fallback of
    lightning_module.py:526-527, max(10000, 5 x warmup_steps) x epochs OPTIMISER steps, whatever
    the data, batch, accumulation or GPUs; max_steps does not shorten it. LambdaLR starts at
    lam(0) and steps once per optimiser step ("interval": "step"), so step k runs at
    lr x lam(k - 1): 0 at the first step, the peak at step warmup + 1. The cosine (to the json's
    min_lr 0) is far longer than any stored recipe: the lr ends at ~91% of the peak after the
    ~78k steps of one-GPU stage 2, and stays at the peak in stage 1 (docs/stage2-recipes.md)."""
    lr, warmup = schedule["lr"], schedule["warmup_steps"]
    if schedule.get("lr_schedule", "cosine") == "cosine":
        return lambda step: cosine_lr(step - 1, lr, warmup, schedule["total_steps"])
    total = max(10000, warmup * 5) * schedule["epochs"]  # lightning_module.py:526-527
    if warmup >= total:  # :531-532 (no recipe gets here: total >= 5 x warmup)
        warmup = max(1, total // 2)

    def lam(current_step):  # :535-543, min_lr_ratio 0
        if warmup > 0 and current_step < warmup:
            return float(current_step) / float(warmup)
        progress = float(current_step - warmup) / float(max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * max(0.0, min(1.0, progress))))
    return lambda step: lr * lam(step - 1)


def check_schedule_meaning(ckpt_path, saved_schedule):
    """Refuse a checkpoint of the kit's first `authors` schedule (it records no `epochs`): its
    cosine was sized in micro-batches, which is not what their code does, so the same name now
    means another lr curve and resuming would splice the two."""
    if saved_schedule.get("lr_schedule") == "authors" and "epochs" not in saved_schedule:
        raise UserError(
            f"{ckpt_path} was written with the kit's first lr_schedule: authors, whose cosine was "
            "sized in micro-batches; the authors' code sizes it as max(10000, 5 x warmup_steps) x "
            "epochs optimiser steps (docs/stage2-recipes.md, 'What changed'), so resuming would "
            "change the run's lr midway. Start afresh with another out_dir (or move the checkpoint "
            "away), or finish the run with the kit's commit that wrote it (git_commit in the first "
            "line of its metrics.jsonl)")


# --------------------------------------------------------------------------------------------------
# Checkpoints and randomness
# --------------------------------------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG the loop draws from, in types that torch.load(weights_only=True) accepts. On
    CUDA only the current device's generator: a run resumed where fewer (or other) GPUs are
    visible still loads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def atomic_save(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash mid-write never leaves a
    truncated checkpoint where the last good one was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_training_state(path):
    """A checkpoint written by a trainer, loaded safely (tensors and plain Python values only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot resume from {path}: {e}. Move it away to start afresh.") from e


def check_resume(ckpt_path, saved, current, keys):
    """Refuse to resume when a setting that changes the run's trajectory differs from the one its
    checkpoint was written with: resuming would splice two different runs into one. `saved` and
    `current` map keys to values (the configs, plus derived facts such as the number of training
    samples); settings not in `keys` (logging, workers where they do not change the order,
    evaluation, save_every, ...) may change freely. The error names every changed key with
    both values. A key the checkpoint does not record (written before the key existed) is
    not compared."""
    changed = [f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in keys
               if k in saved and saved[k] != current.get(k)]
    if changed:
        raise UserError(f"{ckpt_path} is a run with other settings ({'; '.join(changed)}): resume "
                        "it with the saved values, or start afresh with another out_dir (or move "
                        f"{ckpt_path} away)")


def check_same_data(ckpt_path, saved, current, keys, allowed=False):
    """Refuse to resume on other data: the facts in `keys` (counts, and a fingerprint of the files
    or rows) must equal the checkpoint's, else the run would splice training on two data sets (or
    on data that broke) into one. The error names what changed; allowed=True (the trainers'
    allow_data_change) resumes anyway, with a warning."""
    changed = []
    for key in keys:
        if key not in saved or saved[key] == current.get(key):
            continue
        if isinstance(saved[key], dict):  # {file: size}: name the files that differ
            old, new = saved[key], current.get(key) or {}
            files = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
            changed.append(f"{key}: {len(files)} file(s) differ in name or size, e.g. "
                           + ", ".join(f"{f} ({old.get(f, 'absent')} -> {new.get(f, 'absent')})"
                                       for f in files[:3]))
        else:
            changed.append(f"{key}: {saved[key]!r} -> {current.get(key)!r}")
    if changed and allowed:
        tqdm.write(f"warning: resuming {ckpt_path} on other data ({'; '.join(changed)}), as "
                   "allow_data_change asks")
    elif changed:
        raise UserError(f"{ckpt_path} was trained on other data ({'; '.join(changed)}): resume on "
                        "the data it was trained on, start afresh with another out_dir, or, if "
                        "the change is meant, resume with --allow_data_change=true")


# --------------------------------------------------------------------------------------------------
# Faults: preemption, non-finite losses; and the host-to-device copy
# --------------------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM (what SLURM and other schedulers send before they kill a job; torchrun forwards it to
    every rank and waits 30 s before SIGKILL) and SIGINT (Ctrl-C) ask the run to stop instead of
    killing it. The loop calls `stop_now()` at each step boundary: every rank gets the same answer
    (one rank may see the signal a step later than another), then the main rank saves and all
    exit 0. The check is one tiny all-reduce on the CPU (gloo) group: no GPU synchronisation.
    A second signal kills at once. SLURM signals every process of the job, loader workers included,
    and torch's workers die of SIGTERM unless it comes from their parent: every loader of the kit
    passes worker_init_fn=ignore_stop_signals, so they leave the signal to the loop instead of dying
    under it. `with StopSignal() as stop:` restores the old handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self.previous = None, {}

    def _handle(self, signum, frame):
        # a second signal; or a forked worker
        if self.received is not None or os.getpid() != self.pid:
            if os.getpid() == self.pid:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        tqdm.write(f"{self.received} received: stopping after this step with a checkpoint "
                   "(again to kill now)")

    def __enter__(self):
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            # handler None: it was set outside Python
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def stop_now(self, ranks):
        return any_rank(self.received is not None, ranks)


def ignore_stop_signals(worker_id=None):
    """A DataLoader worker_init_fn: the worker ignores SIGTERM / SIGINT and leaves stopping to the
    main process (it still exits when the main process shuts the loader down or dies)."""
    for s in StopSignal.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: the run stopped, its last good checkpoint untouched."""


class LossWatch:
    """Each step's loss kept on the device: a running sum for the log, and the first step whose loss
    was not finite. Nothing is read back to the host per step (a .item() per step stalls the GPU's
    queue); `check()` at log steps and before every evaluation and save does one all-reduce and
    raises NonFiniteLoss if any rank saw a non-finite loss since the start. So a checkpoint never
    holds a state that a non-finite loss has touched, and the batches after the last save are not
    counted as consumed: a restart repeats them from the last good state. The price: up to log_every
    steps run on after a blow-up before the loop notices (their result is discarded).
    `interval_mean()` gives the log its mean loss (one more all-reduce, at log steps only).

    `lr_at(step)` names the learning rate of the step in the message."""

    NONE = 2**62

    def __init__(self, ranks, lr_at):
        self.ranks, self.lr_at = ranks, lr_at
        self.total = torch.zeros((), dtype=torch.float64, device=ranks.device)
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=ranks.device)
        self.steps = 0

    def add(self, loss, step):
        """The loss of optimiser step number `step` (counting from 1), this rank's value."""
        loss = loss.detach()
        self.total += loss.double()
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad,
                                     self.first_bad.clamp(max=step))
        self.steps += 1

    def check(self, ckpt_path, saved_step):
        """Raise NonFiniteLoss if any rank's loss was not finite (every rank raises together)."""
        first_bad = self.first_bad.clone()
        if self.ranks.enabled:
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        step = int(first_bad.item())
        if step != self.NONE:
            raise NonFiniteLoss(
                f"non-finite loss at step {step} (lr {self.lr_at(step):.3g}): stopped without "
                f"saving; {ckpt_path} "
                + (f"still holds step {saved_step}, the last good state" if saved_step
                   else "was not written")
                + ". Try a lower lr or more warmup_steps, grad_clip=1.0 where the trainer has it, "
                "or precision=bf16 or fp32 instead of fp16; then rerun (it resumes from the "
                "checkpoint), or start afresh in another out_dir")

    def interval_mean(self):
        """Mean loss over the steps since the last call and over ranks (None if none); resets."""
        total = self.total.clone()
        if self.ranks.enabled:
            dist.all_reduce(total)
        mean = total.item() / self.steps / self.ranks.world_size if self.steps else None
        self.total.zero_()
        self.steps = 0
        return mean


def to_device(batch, device):
    """A batch (a tensor, or a dict / list / tuple holding tensors and other values) with every
    tensor moved to `device`, asynchronously where the source is pinned."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


def prefetch_to_device(batches, device):
    """Yields the batches of `batches` already on `device` (any structure to_device takes). On CUDA
    the next batch's host-to-device copy is issued on a side stream before the current one is handed
    out, so it overlaps the current step's compute (the loader should pin its memory); record_stream
    keeps the allocator from reusing a batch's memory while the compute stream still reads it.
    Elsewhere it is a plain .to(device)."""
    device = torch.device(device)
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    stream, compute, done = torch.cuda.Stream(device), torch.cuda.current_stream(device), object()
    iterator = iter(batches)

    def issue():
        batch = next(iterator, done)
        if batch is done:
            return done
        with torch.cuda.stream(stream):
            return to_device(batch, device)

    upcoming = issue()
    while upcoming is not done:
        batch = upcoming
        compute.wait_stream(stream)
        for t in _tensors(batch):
            t.record_stream(compute)
        upcoming = issue()
        yield batch


# --------------------------------------------------------------------------------------------------
# A run: what both trainers do alike around their loop
# --------------------------------------------------------------------------------------------------


def start_run(config_class, argv):
    """-> (cfg, ranks, precision, out_dir): the config (defaults < YAML < flags), this
    process's place among the ranks (DDP when torchrun set RANK), the resolved precision, and
    the output folder."""
    cfg = load_config(config_class, argv)
    out_dir = writable_folder(cfg.out_dir, "--out_dir")
    ranks = setup_distributed(cfg.device)
    return cfg, ranks, cfg.precision or default_precision(ranks.device), out_dir


def saved_settings(state):
    """The settings a checkpoint was written with: its config and the facts found at its start."""
    return {**state["config"], **state.get("run", {})}


def read_resume_state(ckpt_path, cfg, precision, keys):
    """The checkpoint a run resumes from (None: a new run), once check_resume has refused any change
    of the settings in `keys` (precision compared as resolved)."""
    if not ckpt_path.exists():
        return None
    state = load_training_state(ckpt_path)
    check_schedule_meaning(ckpt_path, state.get("schedule", {}))
    check_resume(ckpt_path, saved_settings(state),
                 {**dataclasses.asdict(cfg), "precision": precision}, keys)
    return state


def is_finished(state):
    """True for the checkpoint of a run that took all its steps."""
    return (state is not None
            and state["step"] >= state.get("schedule", {}).get("total_steps", 2**62))


def restore(state, model, optimizer, scaler, schedule):
    """A resumed run's weights, optimiser, scaler and RNGs -> (step, data position, metrics); a new
    run's (0, its first position, {})."""
    if state is None:
        return 0, {"epoch": 0, "step": 0}, {}
    model.load_state_dict(state["state_dict"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # e.g. a post-hoc run of the kit before its qkv biases trained
        raise UserError(f"cannot resume: the checkpoint's optimiser holds other tensors than this "
                        f"run trains ({e}). Start afresh with another out_dir, or finish the run "
                        "with the kit's commit that wrote it (git_commit in the first line of its "
                        "metrics.jsonl)") from None
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    position = position_after(state["step"], schedule["steps_per_epoch"])
    return state["step"], position, state["metrics"]


def position_after(step, steps_per_epoch):
    """The data position after `step` optimiser steps: {"epoch", "step"}, the next step to take
    inside that epoch (every epoch has the same number of steps, in both stages)."""
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    return {"epoch": epoch, "step": step_in_epoch}


def save_checkpoint(path, ranks, model, optimizer, scaler, cfg, facts, schedule, step, metrics,
                    **extra):
    """The whole state of a run at `step`, written atomically by the main rank while the others wait
    (none runs ahead, into a NCCL timeout): model and its config, optimiser, scaler, RNGs, the
    config and the facts found at start (the resume check reads both), the schedule and the
    data position."""
    if ranks.is_main:
        atomic_save({
            "state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "config": dataclasses.asdict(cfg), "run": facts, "metrics": metrics, "step": step,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "schedule": schedule,
            "data_position": position_after(step, schedule["steps_per_epoch"]),
            **extra}, path)
    wait_for_main(ranks)


@dataclasses.dataclass
class Due:
    """What the loop does after an optimiser step, decided alike for both trainers from the config's
    log_every, eval_every, eval_every_epochs, save_every and keep_every_epochs."""
    log: bool
    evaluate: bool
    save: bool
    keep: bool  # also keep this epoch's checkpoint as ckpt_epoch{E}.pt
    stop: bool  # a signal (or the config) asked to stop here: save and exit


def due_after(step, total_steps, epochs_done, cfg, stop_asked):
    """Due after optimiser step `step` (counting from 1). epochs_done: the epochs completed by this
    step (counting from 1), or None inside an epoch. The last step always logs,
    evaluates and saves."""
    def every(n, count):
        return bool(n) and count is not None and count % n == 0

    last = step == total_steps
    keep = every(cfg.keep_every_epochs, epochs_done)
    stop = stop_asked and not last
    return Due(log=last or every(cfg.log_every, step),
               evaluate=(last or every(cfg.eval_every, step)
                         or every(cfg.eval_every_epochs, epochs_done)),
               save=last or stop or keep or every(cfg.save_every, step), keep=keep, stop=stop)


def epochs_from(position, epoch_batches):
    """(epoch, step inside it, batch) from a data position on, epoch after epoch, without end:
    epoch_batches(epoch, first step) gives one epoch's batches (each stage's loader has it)."""
    epoch, first = position["epoch"], position["step"]
    while True:
        for step_in_epoch, batch in enumerate(epoch_batches(epoch, first), first):
            yield epoch, step_in_epoch, batch
        epoch, first = epoch + 1, 0


class Throughput:
    """Samples per second over a log interval, and the share of it the loop waited for data. Time
    spent evaluating and saving is left out (`pause`), so the rate is the training's."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.steps, self.wait, self.start = 0, 0.0, time.perf_counter()

    def timed(self, batches):
        """The same batches, the time spent waiting for each one counted as data wait."""
        iterator = iter(batches)
        while True:
            ready = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - ready
            yield batch

    @contextlib.contextmanager
    def pause(self):
        paused = time.perf_counter()
        yield
        self.start += time.perf_counter() - paused

    def rates(self, batch_size):
        """-> (samples per second, share of the time spent waiting for data) since the restart."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return self.steps * batch_size / seconds, self.wait / seconds


def log_interval(log, step, total_steps, steps_per_epoch, watch, lr, throughput, batch_size,
                 **extra):
    """One log record of the interval just ended (both trainers' keys, and theirs in `extra`) and
    its readable line; restarts the interval. Reads the loss (one all-reduce): at log steps only."""
    samples_per_s, data_wait = throughput.rates(batch_size)
    record = {"step": step, "epoch": step / steps_per_epoch, "loss": watch.interval_mean(),
              "lr": lr, "samples_per_s": samples_per_s, "data_wait": data_wait,
              "samples_seen": step * batch_size, **extra}
    shown = "".join(f"  {k.replace('_', ' ')} {v:.4g}" for k, v in extra.items())
    # None: no step of the interval held a usable sample (stage 2 then makes no update).
    loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
    log.write(record, f"step {step}/{total_steps}  loss {loss}  lr {lr:.3g}{shown}  "
                      f"{samples_per_s:.0f} samples/s  data wait {100 * data_wait:.0f}%")
    throughput.restart()
    return record
