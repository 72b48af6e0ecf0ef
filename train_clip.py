"""Stage 2: contrastive image-text pretraining (CLIP), optionally from a perceptually initialised
vision tower.

  python train_clip.py configs/clip_tiny.yaml                        # CPU, a minute
  torchrun --nproc_per_node=8 train_clip.py configs/yfcc15m.yaml --init runs/nights/ckpt.pt
  python train_clip.py configs/yfcc15m.yaml --train_data='/data/{00000..00099}.tar'

Without CONFIG, the Config defaults below (the paper's model, data and schedule with the kit's
exact large-batch objective; configs/yfcc15m.yaml holds the authors' values, each with its
source, and configs/yfcc15m_authors.yaml runs them as their code does; docs/stage2-recipes.md
compares them). Without --init: the random-initialisation baseline,
with the same seed, text tower and data order as the PI run, so the two differ only in the vision
tower's start. Starting the same command again on the same out_dir resumes exactly where it
stopped, mid-epoch; with a setting that changes the run (TRAJECTORY_KEYS) it refuses and names it;
on a finished run it does nothing. SIGTERM / SIGINT stop it at the next step boundary with a
checkpoint (exit 0).

The story, as train() reads: config -> resume check -> data (stage2/shards.py) -> model (resume,
else --init, else random) -> optimiser -> loop (train_step, log, evaluate, save, stop) -> summary.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from tqdm import tqdm

import logs
import training
from analysis import zero_shot
from checkpoints import check_activation, check_state_dict, optional_key, read_checkpoint
from cli import UserError, UserFileNotFound, progress, user_input
from model import CLIPConfig, create_model, model_config, parse_settings
from stage1 import nights, objective
from stage2 import formats, held_out, shards
from stage2.augment import TrainTransform
from stage2.contrastive import accumulate_gradients


@dataclass
class Config:
    # --- data ---
    # tar or parquet files: braces for ranges; several specs joined by '::'
    train_data: str = "/data/yfcc15m/{00000..01499}.tar"
    image_column: str = "images"  # parquet: the image column (binary, or a struct with `bytes`)
    text_column: str = "texts"  # parquet: captions (strings) or CLIP token ids (the first 77 used)
    data_fraction: float = 1.0  # train on this share of the units (the same subset for any ranks)
    max_samples: int = 0  # or on units adding up to at least this many samples (0: no limit)
    val_samples: int = 0  # pairs held out of training (whole units), scored at each evaluation
    augment: str = "moco"  # moco (MoCo v2, the PI authors'), train (open_clip's) or eval (none)
    streams: int = 0  # canonical data streams (0: gcd(64, batch_size)); they fix the sample order
    shuffle_buffer: int = 1000  # each stream permutes its samples in buffers of this many
    decode_on_device: bool = False  # cuda: JPEGs decoded by nvjpeg, not in the loader's workers
    workers: int = 8  # DataLoader worker processes per rank
    allow_data_change: bool = False  # resume although the data's files or counts changed
    # --- model ---
    model: str = "ViT-B-32"  # a preset of model.py
    model_settings: str = ""  # CLIPConfig fields over the preset, e.g. "context_length=16"
    # checkpoint whose vision tower starts the run (stage 1's ckpt.pt, open_clip, OpenAI)
    init: str = ""
    init_text: bool = False  # also take the text tower (and logit scale) from `init`
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    sync_batchnorm: bool = False  # DDP with a ResNet: BatchNorm statistics over the global batch
    compile: bool = False  # torch.compile the training forward (DDP first, then compile)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation)
    # --- optimiser and schedule ---
    epochs: int = 32
    max_steps: int = 0  # stop after this many optimiser steps (0: epochs decide)
    batch_size: int = 6144  # GLOBAL batch: the same whatever the number of ranks
    accum_steps: int = 6  # micro-batches per rank and step (the same result, less memory)
    # pairs each loss contrasts: groups of the global batch (0: all of it)
    contrastive_batch: int = 0
    lr: float = 5e-4
    lr_schedule: str = "cosine"  # cosine (warmup, then to 0 at the end) or authors (their code's)
    warmup_steps: int = 2500
    weight_decay: float = 0.1
    beta1: float = 0.9  # AdamW's betas and eps (docs/stage2-recipes.md: open_clip's, the authors')
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 0.0  # max global gradient norm (0: off)
    seed: int = 0
    # --- loop ---
    out_dir: str = "runs/clip"  # out_dir/ckpt.pt is the latest checkpoint; a run resumes from it
    device: str = ""  # cuda when present, else cpu
    precision: str = ""  # bf16 / fp16 / fp32 (empty: bf16 on cuda, fp32 on cpu)
    save_every: int = 500  # steps between checkpoints (and at the end, and on SIGTERM / SIGINT)
    keep_every_epochs: int = 0  # keep out_dir/ckpt_epoch{E}.pt every this many epochs (0: none)
    stop_after_steps: int | None = None  # save and stop here (the schedule still spans all steps)
    # --- logging ---
    log_every: int = 50  # steps between log lines
    log_to: str = ""  # also log to: tensorboard, wandb (comma-separated; wandb offline by default)
    # --- evaluation ---
    eval_every: int = 2000  # steps between evaluations (0: only at the end)
    eval_every_epochs: int = 0  # also evaluate at the end of every this many epochs (0: never)
    eval_tasks: str = ""  # comma-separated zero-shot tasks, e.g. "cifar100,cifar10"
    eval_data_root: str = "data/clip_benchmark"  # the tasks' folder (evaluate.py's default too)
    nights_root: str = ""  # NIGHTS folder: log the 2AFC score at each evaluation

    # What each value may be, checked where the config is read: (lowest, highest), None unbounded.
    RANGES: ClassVar[dict] = {
        "data_fraction": (1e-9, 1.0), "max_samples": (0, None), "val_samples": (0, None),
        "streams": (0, None), "shuffle_buffer": (1, None), "workers": (0, None),
        "epochs": (1, None), "max_steps": (0, None), "batch_size": (1, None),
        "accum_steps": (1, None), "contrastive_batch": (0, None), "lr": (0.0, None),
        "warmup_steps": (0, None), "weight_decay": (0.0, None), "beta1": (0.0, 0.9999),
        "beta2": (0.0, 0.9999), "eps": (0.0, None), "grad_clip": (0.0, None),
        "save_every": (1, None), "keep_every_epochs": (0, None), "stop_after_steps": (1, None),
        "log_every": (1, None),
        "eval_every": (0, None), "eval_every_epochs": (0, None)}
    CHOICES: ClassVar[dict] = {"augment": ("moco", "train", "eval"),
                               "lr_schedule": training.LR_SCHEDULES,
                               "precision": ("", "bf16", "fp16", "fp32")}

    def check(self):
        """The model preset and settings build a model, and --init names a file (both named
        before any data is read)."""
        model_config(self.model, **parse_settings(self.model_settings))
        if self.init and not os.path.isfile(self.init):
            raise FileNotFoundError(f"init: checkpoint {self.init} does not exist")


# Settings that change what a run computes: resuming with another value would splice two runs, so
# training.check_resume refuses it. The rest (logging, saving, evaluation, workers, device, the
# number of ranks, ...) may change between a run's starts: the sample order depends on (seed, epoch,
# streams, shuffle_buffer, batch_size) and the units' counts only (stage2/shards.py). train_data may
# move, not change: DATA_FACTS (the units and samples found) are compared instead of its path.
TRAJECTORY_KEYS = (
    "model", "model_settings", "epochs", "max_steps", "batch_size", "accum_steps",
    "contrastive_batch", "lr", "lr_schedule", "warmup_steps", "weight_decay", "beta1", "beta2",
    "eps", "data_fraction", "max_samples", "val_samples", "grad_clip", "seed", "init", "init_text",
    "augment", "streams", "shuffle_buffer", "decode_on_device", "image_column", "text_column",
    "precision")
# Found in train_data at start-up: its units, samples and files (name: size).
DATA_FACTS = ("data_units", "data_samples", "data_files")


def main(argv):
    with training.StopSignal() as stop:  # SIGTERM / SIGINT: stop at a step boundary, saved
        train(argv, stop)


def train(argv, stop):
    cfg, ranks, precision, out_dir = training.start_run(Config, argv)
    cfg = resolve_config(cfg, ranks.world_size)
    ckpt_path = out_dir / "ckpt.pt"
    state = training.read_resume_state(ckpt_path, cfg, precision, TRAJECTORY_KEYS)
    if training.is_finished(state):
        return finish(out_dir, ckpt_path, state["step"], state["metrics"], state["samples_skipped"],
                      cfg, ranks, already=True)
    loader, held_out_pairs, facts, schedule = make_data(cfg, argv, ranks, precision, state,
                                                        ckpt_path)
    lr_at = training.lr_function(schedule)  # the lr of optimiser step `step` (counting from 1)
    model = make_model(cfg, ranks, state)
    forward, ddp = training.wrap_model(model, ranks, cfg.compile, cfg.compile_backend,
                                       cfg.sync_batchnorm)  # `model` stays plain for saving
    optimizer = training.make_optimizer(model, cfg, ranks.device)
    scaler = training.grad_scaler(ranks.device, precision)
    step, position, metrics = training.restore(state, model, optimizer, scaler, schedule)
    skipped = torch.zeros(len(formats.SKIP_REASONS), dtype=torch.int64)
    if state is not None and ranks.is_main:  # the saved count is the sum over ranks: one carries it
        skipped += torch.tensor([state["samples_skipped"][r] for r in formats.SKIP_REASONS])
    log = logs.open_log(out_dir, ranks.is_main, cfg.log_to, dataclasses.asdict(cfg))
    log.write({**logs.run_header(cfg), "resumed_from_step": step, **schedule, **facts,
               "world_size": ranks.world_size, "params": model.num_params()})
    amp, total_steps = training.autocast(ranks.device, precision), schedule["total_steps"]
    save = dict(ranks=ranks, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg, facts=facts,
                schedule=schedule)
    bar = progress(total=total_steps, initial=step, disable=not ranks.is_main, desc="train")
    watch = training.LossWatch(ranks, lr_at)  # losses stay on the device until a log or a save
    throughput, saved_step = training.Throughput(), step
    batches = training.epochs_from(position, loader.epoch_batches)
    trained = False  # has a step since the last save held a usable sample (on any rank)?
    for epoch, step_in_epoch, batch in throughput.timed(batches):
        if training.any_rank(batch["good"] > 0, ranks):  # a batch of bad samples alone: no update
            loss = train_step(model, forward, ddp, optimizer, scaler, amp, batch["images"],
                              batch["tokens"], lr_at(step + 1), cfg, batch["valid"], batch["slots"])
            watch.add(loss, step + 1)
            trained = True
        step, skipped = step + 1, skipped + batch["skipped"]
        throughput.steps += 1
        bar.update()
        epochs_done = epoch + 1 if step_in_epoch + 1 == schedule["steps_per_epoch"] else None
        due = training.due_after(step, total_steps, epochs_done, cfg,
                                 stop.stop_now(ranks) or step == cfg.stop_after_steps)
        if due.log or due.evaluate or due.save:
            watch.check(ckpt_path, saved_step)  # nothing non-finite is logged, evaluated or saved
        if due.log:
            skipped_now = training.all_reduce_sum(skipped.tolist(), ranks.device, torch.int64)
            training.log_interval(log, step, total_steps, schedule["steps_per_epoch"], watch,
                                  lr_at(step), throughput, cfg.batch_size,
                                  logit_scale=model.logit_scale.exp().item(),
                                  samples_skipped=int(sum(skipped_now)))
        with throughput.pause():  # evaluation and saving do not count in samples/s
            if due.evaluate:
                metrics = evaluate_now(model, cfg, ranks, precision, held_out_pairs)
                log_evaluation(log, step, schedule["steps_per_epoch"], cfg.batch_size, metrics)
            if due.save and not trained:  # never a checkpoint of steps on nothing
                raise nothing_to_train(batch, loader, step, ckpt_path, saved_step)
            if due.save:
                skipped_by_reason, trained = count_skipped(skipped, ranks), False
                training.save_checkpoint(ckpt_path, **save, step=step, metrics=metrics,
                                         samples_skipped=skipped_by_reason)
                saved_step = step
            if due.keep:  # the whole state, so a run can branch (or be scored) from any epoch
                training.save_checkpoint(out_dir / f"ckpt_epoch{epochs_done:03d}.pt", **save,
                                         step=step, metrics=metrics,
                                         samples_skipped=skipped_by_reason)
        if due.stop:
            log.close()
            return training.stopped(stop, cfg, ranks, step, total_steps, ckpt_path, bar)
        if step == total_steps:
            break
    bar.close()
    log.close()
    finish(out_dir, ckpt_path, step, metrics, skipped_by_reason, cfg, ranks, already=False)


# --------------------------------------------------------------------------------------------------
# One optimiser step (the loss and its accumulation live in stage2/contrastive.py)
# --------------------------------------------------------------------------------------------------


def train_step(model, forward, ddp, optimizer, scaler, amp, images, tokens, lr, cfg, valid=None,
               slots=None):
    """One optimiser step, exactly as the loop runs it and bench/gpu_bench.py times it: set the lr,
    accumulate the whole batch's gradients in cfg.accum_steps micro-batches, clip (grad_clip), step
    (through the fp16 scaler, a no-op otherwise), clamp the temperature (unless the model caps it
    in the loss, as the PI authors' code does: CLIPConfig.logit_scale_clamp). `model` is the plain
    CLIP (parameters, logit scale), `forward` what runs it (DDP and / or compiled), `ddp` the DDP
    handle. `valid`: the rows that hold a sample (None: all); `slots`: the rows' positions in the
    global batch, which name their groups when cfg.contrastive_batch is below the batch. Returns
    the loss as a tensor on the device: reading it is the caller's choice (a host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    group_size = cfg.contrastive_batch if 0 < cfg.contrastive_batch < cfg.batch_size else 0
    loss = accumulate_gradients(forward, images, tokens, cfg.accum_steps, amp, scaler, ddp, valid,
                                slots, group_size)
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if model.config.logit_scale_clamp == "parameter":  # else the loss caps it (model.py)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # temperature >= 0.01 (CLIP)
    return loss


# --------------------------------------------------------------------------------------------------
# Setup: the config, the data, the model
# --------------------------------------------------------------------------------------------------


def resolve_config(cfg, world):
    """The config with its derived defaults filled in (streams), checked against the ranks."""
    if cfg.batch_size % world or cfg.batch_size // world < cfg.accum_steps:
        raise UserError(f"batch_size {cfg.batch_size} must divide into {world} rank(s) of at least "
                        f"{cfg.accum_steps} (accum_steps) rows each")
    if not cfg.streams:  # what divides the batch: --batch_size=16 runs on any config
        cfg = dataclasses.replace(cfg, streams=math.gcd(64, cfg.batch_size))
    if 0 < cfg.contrastive_batch < cfg.batch_size and cfg.batch_size % cfg.contrastive_batch:
        raise UserError(f"contrastive_batch {cfg.contrastive_batch} must divide batch_size "
                        f"{cfg.batch_size} (or be 0: the whole batch)")
    if cfg.lr_schedule not in training.LR_SCHEDULES:
        raise UserError(f"lr_schedule must be one of {', '.join(training.LR_SCHEDULES)}, "
                        f"got {cfg.lr_schedule!r}")
    logs.check(cfg.log_to)
    return cfg


def make_data(cfg, argv, ranks, precision, state, ckpt_path):
    """-> (loader, held-out pairs or None, facts, schedule). The sample order depends on (seed,
    epoch, streams, shuffle_buffer, batch_size) and the units' counts, not on ranks or workers
    (stage2/shards.py), so the data position is two integers. A resumed run's data must be the same:
    its units and samples (it may have moved to another path)."""
    with user_input():  # data_fraction, max_samples, val_samples that the data cannot meet
        units, held_out_units = held_out.split_units(list_units(cfg, argv, ranks),
                                                     cfg.data_fraction, cfg.max_samples,
                                                     cfg.val_samples)
    architecture = model_architecture(cfg)
    with user_input():  # streams that do not fit the batch or the ranks
        loader = shards.Loader(
            units, TrainTransform(architecture.image_size, cfg.augment), cfg.batch_size,
            cfg.streams, ranks.rank, ranks.world_size, cfg.workers, cfg.accum_steps, cfg.seed,
            cfg.shuffle_buffer, architecture.context_length, ranks.device, cfg.image_column,
            cfg.text_column, decode_on_device=cfg.decode_on_device,
            worker_init_fn=training.ignore_stop_signals)  # workers leave SIGTERM to the loop
    plan = loader.plan(0)
    files = {os.path.basename(u.path): os.path.getsize(u.path) for u in units}
    facts = {"precision": precision, "data_units": len(units), "data_samples": plan.total,
             "data_files": files,
             "samples_per_epoch": plan.total, "dropped_per_epoch": plan.dropped}
    if state is not None:
        training.check_same_data(ckpt_path, training.saved_settings(state), facts, DATA_FACTS,
                                 cfg.allow_data_change)
    if plan.steps == 0:
        raise UserError(f"train_data: {plan.total} samples do not fill one batch of "
                        f"{cfg.batch_size}: lower batch_size")
    held_out_pairs = None
    if ranks.is_main and cfg.val_samples:  # read once, by the rank that evaluates
        with user_input():
            held_out_pairs = held_out.HeldOutPairs(
                held_out_units, cfg.val_samples, architecture.image_size,
                architecture.context_length, cfg.image_column, cfg.text_column)
    if ranks.is_main:
        tqdm.write(f"data: {len(units)} units, {plan.total} samples; an epoch is {plan.steps} "
                   f"steps of {cfg.batch_size} over {cfg.streams} streams ({plan.dropped} samples "
                   "left over each epoch)"
                   + (f"; {len(held_out_pairs)} pairs of {len(held_out_units)} units held out"
                      if held_out_pairs else ""))
    schedule = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "total_steps": cfg.max_steps or cfg.epochs * plan.steps,
                "steps_per_epoch": plan.steps, "lr_schedule": cfg.lr_schedule,
                "epochs": cfg.epochs}  # the authors' schedule's length counts epochs
    if state is not None:
        # equal by the resume check; the checkpoint's is the truth
        schedule.update(state.get("schedule", {}))
    return loader, held_out_pairs, facts, schedule


def list_units(cfg, argv, ranks):
    """The training data's units with their sample counts (stage2/formats.py). If a counting pass is
    needed, the main rank makes it (and saves it) while the others wait, then read the saved counts.
    The wait is on the CPU (gloo) group with its long timeout: a first counting pass over many
    shards can outlast NCCL's default 10 minutes, and no GPU work is pending meanwhile."""
    if ranks.enabled and not ranks.is_main:
        dist.barrier(group=ranks.control)
    try:
        found = formats.list_units(cfg.train_data, progress=ranks.is_main,
                                   image_column=cfg.image_column, text_column=cfg.text_column)
    except FileNotFoundError as e:
        source = next((a for a in argv if a.endswith((".yaml", ".yml"))), "the Config defaults")
        raise UserFileNotFound(
            f"train_data: {e} (train_data={cfg.train_data!r}, from {source} or the command line). "
            "Put the data there, or point elsewhere with "
            "--train_data='/path/to/{00000..00099}.tar' (or .parquet; several specs joined by '::')"
        ) from None
    if ranks.enabled and ranks.is_main:
        dist.barrier(group=ranks.control)
    return found


def model_architecture(cfg):
    """The CLIPConfig of cfg.model with cfg.model_settings over it."""
    with user_input():  # a bad preset name or setting
        return model_config(cfg.model, **parse_settings(cfg.model_settings))


def make_model(cfg, ranks, state):
    """The CLIP this run trains, on its device in train mode: a resumed run's weights are restored
    later (training.restore); else --init's vision tower, else random weights. The random init is
    drawn first in every case, so the baseline and the PI run share the text tower (and, seeded
    apart inside the loader, the data order)."""
    training.seed_everything(cfg.seed)
    with user_input():
        model = create_model(model_architecture(cfg))
    if state is not None:
        check_same_model(model.config, state["model_config"], f"{cfg.out_dir}/ckpt.pt")
    if state is not None and ranks.is_main:
        tqdm.write(f"resuming from {cfg.out_dir}/ckpt.pt at step {state['step']}")
    elif state is None and cfg.init:
        n = load_init(model, cfg.init, cfg.init_text)
        if ranks.is_main:
            tqdm.write(f"initialised {n} tensors from {cfg.init}")
    model.to(ranks.device).train()
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def check_same_model(config, saved, ckpt_path):
    """A resumed run's model must be its checkpoint's. model and model_settings are compared by the
    resume check, but a preset's meaning may change between the kit's versions (the -authors
    presets' logit-scale cap moved into the loss, as their code has it), and a run must not switch
    models midway. A field the checkpoint does not record takes its default, as when it loads."""
    saved = CLIPConfig(**saved)
    changed = [f"{name}: {getattr(saved, name)!r} -> {getattr(config, name)!r}"
               for name in vars(config) if getattr(saved, name) != getattr(config, name)]
    if changed:
        raise UserError(f"{ckpt_path} holds a model that its preset no longer builds "
                        f"({'; '.join(changed)}; docs/authors-model.md, 'What changed'): start "
                        "afresh with another out_dir, or finish the run with the kit's commit that "
                        "wrote it (git_commit in the first line of its metrics.jsonl)")


def load_init(model, path, include_text):
    """The vision tower (and with include_text, everything) from any CLIP checkpoint that
    checkpoints.read_checkpoint reads; one that records the other activation than this model's is
    an error naming both."""
    with user_input():
        state_dict, stored = read_checkpoint(path)
        if stored is not None:
            check_activation(f"--init {path}", stored["quickgelu"], model.config.quickgelu)
    taken = {k: v for k, v in state_dict.items() if include_text or k.startswith("visual.")}
    missing = [k for k in model.state_dict()
               if k.startswith("visual.") and k not in taken and not optional_key(k)]
    if missing:
        raise UserError(f"--init {path}: no vision tower for this model, missing "
                        f"{missing[:5]}{' ...' * (len(missing) > 5)}")
    with user_input():
        check_state_dict(model, {**model.state_dict(), **taken},
                         f"--init {path} (for model {model.config})")
    model.load_state_dict(taken, strict=False)
    return len(taken)


# --------------------------------------------------------------------------------------------------
# Evaluation, checkpoints and the end of a run
# --------------------------------------------------------------------------------------------------


def evaluate_now(model, cfg, ranks, precision, held_out_pairs=None):
    """Zero-shot tasks, NIGHTS 2AFC and the held-out pairs (stage2/held_out.py) on the main process
    -> flat {metric: value}; the other ranks wait on the CPU group, whose timeout
    (training.WAIT_TIMEOUT) is far above any evaluation's time."""
    tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
    metrics = {}
    if ranks.is_main and held_out_pairs is not None:
        metrics.update(held_out_pairs.score(model, ranks.device,
                                            training.autocast(ranks.device, precision),
                                            workers=min(cfg.workers, 4)))
    if ranks.is_main and (tasks or cfg.nights_root):
        model.eval()
        if tasks:
            results = zero_shot.run_tasks(model, tasks, cfg.eval_data_root, ranks.device,
                                          workers=cfg.workers, precision=precision)
            for task, result in results.items():
                name, value = zero_shot.main_metric(task, result)
                metrics[f"zeroshot/{task}/{name}"] = value
        if cfg.nights_root:
            test = nights.NightsDataset(cfg.nights_root, "test", model.config.image_size)
            metrics["nights/2afc"] = objective.two_afc_by_triplet(
                model, test, ranks.device, precision=precision, workers=cfg.workers)
        model.train()
    training.wait_for_main(ranks)
    return metrics


def log_evaluation(log, step, steps_per_epoch, batch_size, metrics):
    """The evaluation's metrics against samples seen and epochs (the x axes of
    `evaluate.py --curves`)."""
    if metrics:
        log.write({"step": step, "samples_seen": step * batch_size,
                   "epochs": step / steps_per_epoch, **metrics},
                  f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def nothing_to_train(batch, loader, step, ckpt_path, saved_step):
    """The error at a save when no step since the last one held a usable sample: every sample was
    skipped (the data is broken), and a checkpoint would record steps that trained on nothing."""
    reasons = {r: n for r, n in zip(formats.SKIP_REASONS, batch["skipped"].tolist()) if n}
    return UserError(
        f"steps {saved_step + 1}-{step}: no sample of their batches could be used ({reasons} in "
        f"the last; e.g. in {', '.join(map(str, loader.bad_sources)) or 'the data'}): check the "
        f"data's images and captions. Nothing was saved: {ckpt_path} "
        + (f"still holds step {saved_step}" if saved_step else "was not written"))


def count_skipped(skipped, ranks):
    """{reason: samples skipped} summed over the ranks (a collective: every rank calls it)."""
    return dict(zip(formats.SKIP_REASONS,
                    training.all_reduce_sum(skipped.tolist(), ranks.device, torch.int64)))




def finish(out_dir, ckpt_path, step, metrics, skipped, cfg, ranks, already):
    """out_dir/summary.json: what the run did and its last evaluation. A finished run started again
    writes it if it is missing (killed between the last save and this), and changes nothing else."""
    if ranks.is_main and not (already and (out_dir / "summary.json").exists()):
        summary = {"steps": step, "samples_seen": step * cfg.batch_size,
                   "samples_skipped": sum(skipped.values()), "skipped_by_reason": skipped,
                   "metrics": metrics, "checkpoint": str(ckpt_path)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        tqdm.write(f"done: {summary['steps']} steps, {summary['samples_seen']} samples seen, "
                   f"{summary['samples_skipped']} skipped")
    if ranks.is_main and already:
        tqdm.write(f"{out_dir} holds a finished run ({step} steps): nothing to do "
                   "(use another out_dir for a new run)")
    training.cleanup_distributed()


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main)
