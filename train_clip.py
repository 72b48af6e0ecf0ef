"""Stage 2: contrastive image-text pretraining (CLIP), optionally from a perceptually initialised
vision tower.

  python train_clip.py configs/clip_tiny.yaml                            # CPU, a minute
  torchrun --nproc_per_node=8 train_clip.py configs/yfcc15m.yaml --init stage1/ckpt.pt
  python train_clip.py configs/yfcc15m.yaml --train_data='/data/{00000..00099}.tar' --batch_size=1024

Without CONFIG, the Config defaults below (the paper's model, data and schedule with the kit's exact
large-batch objective; configs/yfcc15m.yaml is the authors' recipe, every value with its source, and
docs/stage2-recipes.md compares them). Without --init: the random-initialisation baseline, with the same seed, text tower and data
order as the PI run, so the two differ only in the vision tower's start.
Starting the same command again on the same out_dir resumes exactly where it stopped, mid-epoch; with a
setting that changes the run (TRAJECTORY_KEYS) it refuses and names it; on a finished run it does
nothing. SIGTERM / SIGINT stop it at the next step boundary with a checkpoint (exit 0).

The story: config -> setup -> checkpoint (resume check, finished?) -> data -> model (resume, else
--init, else random) -> optimiser -> loop (train_step, logging, evaluation, checkpoints, stop) -> summary.

Beside it, each with one responsibility, so that this file stays readable in one sitting:
contrastive.py (the loss, over the whole batch or groups of it, and its cached-feature accumulation),
held_out.py (which units train and which are held out, and the held-out score), logs.py
(TensorBoard / W&B beside metrics.jsonl), shards.py (the data order).
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (torch.distributed.nn.functional.all_gather: not imported by the line above)
from tqdm import tqdm

import cli
import logs
import training
from stage1 import nights
from stage2 import shards
from stage2 import formats
from stage2 import held_out
from stage2.augment import TrainTransform
from checkpoints import check_activation, check_state_dict, optional_key, read_checkpoint
from stage2.contrastive import accumulate_gradients
from model import create_model, model_config, parse_settings
from cli import progress



@dataclass
class Config:
    train_data: str = "/data/yfcc15m/{00000..01499}.tar"  # tar or parquet files: braces, several joined by '::'
    image_column: str = "images"  # parquet: the image column (binary, or a struct with a `bytes` field)
    text_column: str = "texts"  # parquet: captions (strings) or CLIP token ids (the first context_length)
    out_dir: str = "runs/clip"  # out_dir/ckpt.pt is the latest checkpoint; a run resumes from it
    model: str = "ViT-B-32"  # a preset of model.py
    # CLIPConfig fields over the preset, e.g. "init_logit_scale=2.6593,context_length=16": one of the
    # authors' settings at a time (docs/authors-model.md) without a preset of its own; ckpt.pt records them
    model_settings: str = ""
    epochs: int = 32
    max_steps: int = 0  # stop after this many optimiser steps (0: epochs decide)
    batch_size: int = 6144  # GLOBAL batch: the same whatever the number of ranks
    accum_steps: int = 6  # split each rank's batch into this many micro-batches (same result, less memory)
    contrastive_batch: int = 0  # pairs each loss contrasts over: groups of the global batch (0: the whole batch)
    lr: float = 5e-4
    lr_schedule: str = "cosine"  # cosine (warmup, then to 0 at the end) or authors (as their code runs: see lr_function)
    warmup_steps: int = 2500
    weight_decay: float = 0.1
    beta1: float = 0.9  # AdamW; (0.9, 0.98): open_clip's for ViTs and the PI authors' (optimizer "betas"). open_clip
    beta2: float = 0.98  # trains ResNets with (0.9, 0.999, 1e-8) (open_clip_train/params.py get_default_params, after
    eps: float = 1e-6  # the CLIP paper); configs/rn50_yfcc15m.yaml sets those; the PI authors' configs set eps 1e-8
    grad_clip: float = 0.0  # max global gradient norm (0: off)
    save_every: int = 500  # steps between checkpoints (and always at the end, and on SIGTERM / SIGINT)
    seed: int = 0
    device: str = ""  # cuda when present, else cpu
    precision: str = ""  # bf16 / fp16 / fp32; default bf16 on cuda, fp32 on cpu
    workers: int = 8  # DataLoader worker processes per rank
    grad_checkpointing: bool = False
    # DDP with a ResNet tower: BatchNorm statistics over the global batch (SyncBatchNorm, GPUs only)
    # instead of each rank's share. The PI authors' RN50 configs set it (github cheesepuff90/Brain_Initialization,
    # config/trainingconfig/perceptual_init_yfcc15m_resnet50.json "distributed.sync_batchnorm": true);
    # open_clip's default is off (its --use-bn-sync flag).
    sync_batchnorm: bool = False
    compile: bool = False  # torch.compile the training forward (DDP first, then compile)
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager captures graphs without code generation
    init: str = ""  # checkpoint whose vision tower starts the run (stage 1's ckpt.pt, open_clip, OpenAI)
    init_text: bool = False  # also take the text tower (and logit scale) from `init`
    augment: str = "moco"  # moco (the PI fork, MoCo v2), train (open_clip's default) or eval (no augmentation)
    streams: int = 0  # canonical data streams: fix the sample order for any ranks / workers (shards.py); must
    #                   divide batch_size and be divisible by the number of ranks (0: gcd(64, batch_size))
    shuffle_buffer: int = 1000  # each stream permutes its samples in windows of this many (held undecoded)
    decode_on_device: bool = False  # cuda: JPEGs decoded by nvjpeg (torchvision.io.decode_jpeg), not in the workers
    data_fraction: float = 1.0  # train on this share of the units (a fixed subset: the same for any ranks, workers, resumes)
    max_samples: int = 0  # or on units adding up to at least this many samples (0: no limit)
    val_samples: int = 0  # held out of training (whole units) and scored at each evaluation: loss, recall@1/5/10
    eval_every: int = 2000  # steps between evaluations (0: only at the end)
    eval_every_epochs: int = 0  # also evaluate at the end of every this many epochs (0: never)
    keep_every_epochs: int = 0  # keep out_dir/ckpt_epoch{E}.pt at the end of every this many epochs (0: none)
    log_to: str = ""  # also log the metrics to: tensorboard, wandb (comma-separated; wandb offline unless WANDB_MODE says)
    eval_tasks: str = ""  # comma-separated zero-shot tasks, e.g. "cifar100,cifar10"
    eval_data_root: str = "data/clip_benchmark"  # evaluate.py's default too
    nights_root: str = ""  # NIGHTS folder: log the 2AFC score at each evaluation
    log_every: int = 50


# Settings that change what a run computes: resuming with another value would splice two runs, so
# training.check_resume refuses it. Everything else (log_every, save_every, eval_*, nights_root,
# grad_checkpointing, compile, device, out_dir, workers, the number of ranks) may change between a run's
# starts: the sample order depends on (seed, epoch, streams, shuffle_buffer, batch_size) and the units'
# counts only (shards.py). train_data may move, not change: data_units / data_samples (the units and
# samples found) are compared instead of its path. precision is compared as resolved.
TRAJECTORY_KEYS = ("model", "model_settings", "epochs", "max_steps", "batch_size", "accum_steps", "contrastive_batch", "lr", "lr_schedule",
                   "warmup_steps", "weight_decay", "beta1", "beta2", "eps", "data_fraction", "max_samples", "val_samples", "grad_clip", "seed", "init", "init_text", "augment", "streams", "shuffle_buffer", "decode_on_device",
                   "image_column", "text_column", "precision", "data_units", "data_samples")
DATA_FACTS = ("data_units", "data_samples")  # found in train_data at start-up, compared once it is read


# ---------------------------------------------------------------------------------------------------
# One optimiser step (the loss and its accumulation live in contrastive.py)
# ---------------------------------------------------------------------------------------------------


def make_optimizer(model, cfg, device):
    """AdamW as the PI fork and open_clip run it; fused (one kernel for all parameters) on CUDA."""
    return torch.optim.AdamW(training.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=torch.device(device).type == "cuda")


def train_step(model, forward, ddp, optimizer, scaler, amp, images, tokens, lr, cfg, valid=None, slots=None):
    """One optimiser step, exactly as the loop runs it and bench/gpu_bench.py times it: set the lr,
    accumulate the whole batch's gradients in cfg.accum_steps micro-batches, clip (grad_clip), step
    (through the fp16 scaler, a no-op otherwise), clamp the temperature. `model` is the plain CLIP
    (parameters, logit scale), `forward` what runs it (DDP and / or compiled), `ddp` the DDP handle.
    `valid`: the rows that hold a sample (None: all); `slots`: the rows' positions in the global batch,
    which name their groups when cfg.contrastive_batch is below the batch. Returns the loss as a tensor
    on the device: reading it is the caller's choice (a host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    group_size = cfg.contrastive_batch if 0 < cfg.contrastive_batch < cfg.batch_size else 0  # 0: the whole batch
    loss = accumulate_gradients(forward, images, tokens, cfg.accum_steps, amp, scaler, ddp, valid, slots, group_size)
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # temperature >= 0.01 (CLIP)
    return loss


# ---------------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------------


def resolve_config(cfg, world):
    """The config with its derived defaults filled in (streams), checked against the number of ranks."""
    if cfg.batch_size % world or cfg.batch_size // world < cfg.accum_steps:  # micro-batches may differ by a row
        raise cli.UserError(f"batch_size {cfg.batch_size} must divide into {world} rank(s) of at least {cfg.accum_steps} "
                               "(accum_steps) rows each")
    if not cfg.streams:  # what divides the batch, as `python shards.py` picks: --batch_size=16 runs on any config
        cfg = dataclasses.replace(cfg, streams=math.gcd(64, cfg.batch_size))
    if 0 < cfg.contrastive_batch < cfg.batch_size and cfg.batch_size % cfg.contrastive_batch:
        raise cli.UserError(f"contrastive_batch {cfg.contrastive_batch} must divide batch_size {cfg.batch_size} "
                               "(or be 0: the whole batch)")
    if cfg.lr_schedule not in ("cosine", "authors"):
        raise cli.UserError(f"lr_schedule must be cosine or authors, got {cfg.lr_schedule!r}")
    logs.check(cfg.log_to)
    return cfg


def lr_function(schedule):
    """step (optimiser steps counted from 1) -> lr. cosine: linear warmup, then a cosine to 0 at the
    last step (open_clip). authors: the PI authors' LambdaLR as their code runs it (github
    cheesepuff90/Brain_Initialization src/lightning_module.py _get_lr_scheduler): warmup from 0, then a
    cosine whose length is counted in MICRO-batches (num_training_batches x max_epochs) while the
    scheduler steps once per OPTIMISER step; with accumulate_grad_batches 6 it has run ~1/6 of its
    course at the end (the lr ends at ~94% of its peak): in effect, warmup then a nearly constant lr."""
    lr, warmup, length = schedule["lr"], schedule["warmup_steps"], schedule["total_steps"]
    if schedule.get("lr_schedule", "cosine") == "cosine":
        return lambda step: training.cosine_lr(step - 1, lr, warmup, length)
    length *= schedule["groups_per_step"]  # their micro-batches: one per group of contrastive_batch

    def authors(step):
        if step - 1 < warmup:
            return lr * (step - 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 1 - warmup) / max(1, length - warmup))))
    return authors


def list_units(cfg, argv, d):
    """The training data's units with their sample counts (formats.py). If a counting pass is
    needed, the main rank makes it (and saves it) while the others wait, then read the saved counts."""
    def units():
        try:
            return formats.list_units(cfg.train_data, progress=d.is_main, image_column=cfg.image_column,
                                      text_column=cfg.text_column)
        except FileNotFoundError as e:
            source = next((a for a in argv if a.endswith((".yaml", ".yml"))), "the Config defaults")
            raise cli.UserFileNotFound(
                f"train_data: {e} (train_data={cfg.train_data!r}, from {source} or the command line). Put the data "
                f"there, or point elsewhere with --train_data='/path/to/{{00000..00099}}.tar' (or .parquet; several "
                "specs joined by '::')") from None

    # The wait is on the CPU (gloo) group with its long timeout: a first counting pass over many
    # shards can outlast NCCL's default 10 minutes, and no GPU work is pending meanwhile.
    if d.enabled and not d.is_main:
        dist.barrier(group=d.control)
    found = units()
    if d.enabled and d.is_main:
        dist.barrier(group=d.control)
    return found


def load_init(model, path, include_text):
    """The vision tower (and with include_text, everything) from any CLIP checkpoint checkpoints.load_checkpoint
    reads; one that records the other activation than this model's is an error naming both."""
    with cli.user_input():
        state_dict, stored = read_checkpoint(path)
        if stored is not None:
            check_activation(f"--init {path}", stored["quickgelu"], model.config.quickgelu)
    taken = {k: v for k, v in state_dict.items() if include_text or k.startswith("visual.")}
    missing = [k for k in model.state_dict() if k.startswith("visual.") and k not in taken and not optional_key(k)]
    if missing:
        raise cli.UserError(f"--init {path}: no vision tower for this model, missing {missing[:5]}{' ...' * (len(missing) > 5)}")
    with cli.user_input():
        check_state_dict(model, {**model.state_dict(), **taken}, f"--init {path} (for model {model.config})")
    model.load_state_dict(taken, strict=False)
    return len(taken)


def evaluate_now(model, cfg, d, precision, held_out_pairs=None):
    """Zero-shot tasks, NIGHTS 2AFC and the held-out pairs (held_out.py) on the main process -> flat
    {metric: value}; the other ranks wait
    on the CPU group, whose timeout (training.WAIT_TIMEOUT) is far above any evaluation's time. evaluate.py
    is imported only when something is asked for, so a run without evaluation needs nothing of it."""
    tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
    metrics = {}
    if d.is_main and held_out_pairs is not None:
        metrics.update(held_out_pairs.score(model, d.device, training.autocast(d.device, precision), workers=min(cfg.workers, 4)))
    if d.is_main and (tasks or cfg.nights_root):
        from analysis import zero_shot
        from stage1 import objective

        model.eval()
        if tasks:
            results = zero_shot.run_tasks(model, tasks, cfg.eval_data_root, d.device, workers=cfg.workers, precision=precision)
            for task, result in results.items():
                name, value = zero_shot.main_metric(task, result)
                metrics[f"zeroshot/{task}/{name}"] = value
        if cfg.nights_root:
            triplets = nights.NightsDataset(cfg.nights_root, "test", model.config.image_size)
            metrics["nights/2afc"] = objective.two_afc_by_triplet(model, triplets, d.device, precision=precision, workers=cfg.workers)
        model.train()
    training.wait_for_main(d)
    return metrics


def write_summary(out_dir, step, cfg, skipped_by_reason, metrics, ckpt_path):
    """out_dir/summary.json: what a finished run did and its last evaluation."""
    summary = {"steps": step, "samples_seen": step * cfg.batch_size, "samples_skipped": sum(skipped_by_reason.values()),
               "skipped_by_reason": skipped_by_reason, "metrics": metrics, "checkpoint": str(ckpt_path)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv):
    with training.StopSignal() as stop:  # SIGTERM / SIGINT: stop at a step boundary, saved
        train(argv, stop)


def train(argv, stop):
    # --- config and setup -------------------------------------------------------------------------
    cfg = cli.load_config(Config, argv)
    d = training.setup_distributed(cfg.device)
    precision = cfg.precision or training.default_precision(d.device)
    amp = training.autocast(d.device, precision)
    world = d.world_size
    cfg = resolve_config(cfg, world)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "ckpt.pt"
    log = logs.open_log(out_dir, d.is_main, cfg.log_to, dataclasses.asdict(cfg))

    # --- checkpoint: the resume check (settings here, the data below); a finished run is left as it is
    state = training.load_training_state(ckpt_path) if ckpt_path.exists() else None
    saved = {**state["config"], **state.get("run", {})} if state is not None else None
    if state is not None:
        training.check_resume(ckpt_path, saved, {**dataclasses.asdict(cfg), "precision": precision},
                            [k for k in TRAJECTORY_KEYS if k not in DATA_FACTS])
    if state is not None and state["step"] >= state["schedule"]["total_steps"]:
        if d.is_main and not (out_dir / "summary.json").exists():  # killed between the last save and this
            write_summary(out_dir, state["step"], cfg, state["samples_skipped"], state["metrics"], ckpt_path)
        if d.is_main:
            tqdm.write(f"{out_dir} holds a finished run ({state['step']} steps): nothing to do "
                       "(use another out_dir for a new run)")
        training.cleanup_distributed()
        return

    # --- data -------------------------------------------------------------------------------------
    # The sample order depends on (seed, epoch, streams, shuffle_buffer, batch_size) and the units'
    # counts, not on ranks or workers (shards.py); the data position is (epoch, step), two integers.
    # Images leave the workers as uint8 crops; jitter, grayscale, blur and normalisation run on the device.
    with cli.user_input():  # data_fraction, max_samples, val_samples that the data cannot meet
        units, held_out_units = held_out.split_units(list_units(cfg, argv, d), cfg.data_fraction, cfg.max_samples, cfg.val_samples)
    with cli.user_input():  # a bad preset name or setting
        shape = model_config(cfg.model, **parse_settings(cfg.model_settings))
    with cli.user_input():  # streams that do not fit the batch or the ranks
        loader = shards.Loader(units, TrainTransform(shape.image_size, cfg.augment), cfg.batch_size, cfg.streams, d.rank,
                               world, cfg.workers, cfg.accum_steps, cfg.seed, cfg.shuffle_buffer, shape.context_length,
                               d.device, cfg.image_column, cfg.text_column, decode_on_device=cfg.decode_on_device,
                               worker_init_fn=training.ignore_stop_signals)  # workers leave SIGTERM to the loop
    plan = loader.plan(0)
    run_facts = {"precision": precision, "data_units": len(units), "data_samples": plan.total}
    if state is not None:  # the same data: its units and samples (it may have moved to another path)
        training.check_resume(ckpt_path, saved, run_facts, DATA_FACTS)
    if plan.steps == 0:
        raise cli.UserError(f"train_data: {plan.total} samples do not fill one batch of {cfg.batch_size}: lower batch_size")
    held_out_pairs = None
    if d.is_main and cfg.val_samples:  # read once by the rank that evaluates
        shape_kwargs = {"image_size": shape.image_size, "context_length": shape.context_length}
        with cli.user_input():
            held_out_pairs = held_out.HeldOutPairs(held_out_units, cfg.val_samples, **shape_kwargs, image_column=cfg.image_column,
                                                     text_column=cfg.text_column)
    if d.is_main:
        tqdm.write(f"data: {len(units)} units, {plan.total} samples; an epoch is {plan.steps} steps of "
                   f"{cfg.batch_size} over {cfg.streams} streams ({plan.dropped} samples left over each epoch)"
                   + (f"; {len(held_out_pairs)} pairs of {len(held_out_units)} units held out" if held_out_pairs else ""))
    schedule = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "total_steps": cfg.max_steps or cfg.epochs * plan.steps,
                "steps_per_epoch": plan.steps, "lr_schedule": cfg.lr_schedule,
                "groups_per_step": cfg.batch_size // cfg.contrastive_batch if 0 < cfg.contrastive_batch < cfg.batch_size else 1}
    if state is not None:
        schedule.update(state["schedule"])  # equal by the resume check; the checkpoint's is authoritative
    steps_per_epoch, total_steps = schedule["steps_per_epoch"], schedule["total_steps"]
    lr_at = lr_function(schedule)  # the lr of optimiser step number `step` (counting from 1)

    # --- model: resume, else --init, else random --------------------------------------------------
    # The random init is drawn first in every case, so the baseline and the PI run share the text
    # tower and (seeded separately, inside the loader) the data order.
    training.seed_everything(cfg.seed)
    with cli.user_input():
        model = create_model(shape)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        if d.is_main:
            tqdm.write(f"resuming from {ckpt_path} at step {state['step']}")
    elif cfg.init:
        n = load_init(model, cfg.init, cfg.init_text)
        if d.is_main:
            tqdm.write(f"initialised {n} tensors from {cfg.init}")
    model.to(d.device).train()
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    optimizer = make_optimizer(model, cfg, d.device)
    scaler = training.grad_scaler(d.device, precision)
    step, skipped = 0, torch.zeros(len(formats.SKIP_REASONS), dtype=torch.int64)
    position = {"epoch": 0, "step": 0}  # the next step to take: exact ints, valid for any ranks and workers
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        training.set_rng_state(state["rng"])
        step, position = state["step"], state["data_position"]
        if d.is_main:  # the saved count is the sum over ranks: one rank carries it on
            skipped += torch.tensor([state["samples_skipped"][r] for r in formats.SKIP_REASONS], dtype=torch.int64)
    forward, ddp = training.wrap_model(model, d, cfg.compile, cfg.compile_backend, cfg.sync_batchnorm)  # `model` stays plain for saving

    saved_step = step

    def save(metrics, path=ckpt_path):
        skipped_total = training.all_reduce_sum(skipped.tolist(), d.device, torch.int64)
        if d.is_main:
            training.atomic_save({
                "state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "config": dataclasses.asdict(cfg), "run": run_facts, "metrics": metrics, "step": step,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": training.rng_state(),
                "schedule": schedule, "data_position": dict(position),
                "samples_skipped": dict(zip(formats.SKIP_REASONS, skipped_total)),
            }, path)
        training.wait_for_main(d)  # no rank runs ahead (and into a NCCL timeout) while the main one writes
        return dict(zip(formats.SKIP_REASONS, skipped_total))

    # --- the loop ---------------------------------------------------------------------------------
    if d.is_main:
        log.write({**logs.run_header(cfg), "resumed_from_step": step, "total_steps": total_steps,
                   "steps_per_epoch": steps_per_epoch, "samples_per_epoch": plan.total, "dropped_per_epoch": plan.dropped,
                   "world_size": world, "precision": precision, "params": model.num_params()})
    bar = progress(total=total_steps, initial=step, disable=not d.is_main, desc="train", dynamic_ncols=True)
    epoch, metrics = position["epoch"], state["metrics"] if state is not None else {}
    watch = training.LossWatch(d, lr_at)  # losses stay on the device; read at log, evaluation and save steps
    interval = {"steps": 0, "wait": 0.0, "start": time.perf_counter()}
    while step < total_steps:
        ready = time.perf_counter()
        # The loader puts each worker's pieces on the device as they arrive (pinned memory, non_blocking
        # copies of uint8), so the next batch's copies are queued while the host is not waiting.
        for batch in loader.epoch_batches(epoch, position["step"] if position["epoch"] == epoch else 0):
            interval["wait"] += time.perf_counter() - ready
            skipped += batch["skipped"]
            images = loader.transform.device(batch["images"], batch["params"])  # uint8 -> augmented, normalised
            loss = train_step(model, forward, ddp, optimizer, scaler, amp, images, batch["tokens"], lr_at(step + 1), cfg,
                              batch["valid"], batch["slots"])
            step += 1
            last_of_epoch = batch["step"] + 1 == steps_per_epoch
            position = {"epoch": epoch + 1, "step": 0} if last_of_epoch else {"epoch": epoch, "step": batch["step"] + 1}
            watch.add(loss, step)
            bar.update()
            interval["steps"] += 1

            log_now = step % cfg.log_every == 0 or step == total_steps
            epochs_done = epoch + 1 if last_of_epoch else None  # an epoch's end: epochs counted from 1
            keep_now = bool(epochs_done and cfg.keep_every_epochs and epochs_done % cfg.keep_every_epochs == 0)
            eval_now = ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps
                        or bool(epochs_done and cfg.eval_every_epochs and epochs_done % cfg.eval_every_epochs == 0))
            stop_now = stop.stop_now(d) and step < total_steps
            save_now = step % cfg.save_every == 0 or step == total_steps or stop_now or keep_now
            if log_now or eval_now or save_now:
                watch.check(ckpt_path, saved_step)  # nothing non-finite is logged as good, evaluated or saved
            if log_now:
                seconds = time.perf_counter() - interval["start"]
                skipped_total = training.all_reduce_sum(skipped.tolist(), d.device, torch.int64)
                record = {"step": step, "epoch": epoch, "loss": watch.interval_mean(), "lr": lr_at(step),
                          "logit_scale": model.logit_scale.exp().item(), "samples_per_s": interval["steps"] * cfg.batch_size / seconds,
                          "data_wait": interval["wait"] / seconds, "samples_seen": step * cfg.batch_size,
                          "samples_skipped": int(sum(skipped_total))}
                log.write(record, f"step {step}/{total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  scale "
                          f"{record['logit_scale']:.1f}  {record['samples_per_s']:.0f} samples/s  data wait "
                          f"{100 * record['data_wait']:.0f}%  skipped {record['samples_skipped']}")
                interval = {"steps": 0, "wait": 0.0, "start": time.perf_counter()}
            if eval_now:
                metrics = evaluate_now(model, cfg, d, precision, held_out_pairs)
                if metrics:  # against samples seen and epochs (fractional): the x axes of evaluate.py --curves
                    log.write({"step": step, "samples_seen": step * cfg.batch_size, "epochs": step / steps_per_epoch, **metrics},
                              f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                interval["start"] = time.perf_counter()  # timings exclude evaluation
            if save_now:
                skipped_by_reason = save(metrics)
                saved_step = step
                if keep_now:  # the whole state, so the full suite (or a resumed branch) can start from any epoch
                    save(metrics, out_dir / f"ckpt_epoch{epochs_done:03d}.pt")
            if stop_now:
                bar.close()
                if d.is_main:
                    tqdm.write(f"stopped by {stop.received or 'another rank'} at step {step} of {total_steps}, saved "
                               f"{ckpt_path}; run the same command to resume")
                log.close()
                training.cleanup_distributed()
                return
            if step >= total_steps:
                break
            ready = time.perf_counter()
        else:
            epoch += 1
    bar.close()
    log.close()

    # --- summary ----------------------------------------------------------------------------------
    if d.is_main:
        summary = write_summary(out_dir, step, cfg, skipped_by_reason, metrics, ckpt_path)
        tqdm.write(f"done: {step} steps, {summary['samples_seen']} samples seen, {summary['samples_skipped']} skipped")
    training.cleanup_distributed()


if __name__ == "__main__":
    cli.run_cli(main)
