"""Stage 2: contrastive image-text pretraining (CLIP), optionally from a perceptually initialised
vision tower.

  python train_clip.py configs/clip_tiny.yaml                            # CPU, a minute
  torchrun --nproc_per_node=8 train_clip.py configs/yfcc15m.yaml --init stage1/ckpt.pt
  python train_clip.py configs/yfcc15m.yaml --train_data='/data/{00000..00099}.tar' --batch_size=1024

Without CONFIG, configs/yfcc15m.yaml. Without --init: the random-initialisation baseline, with the same
seed, text tower and data order as the PI run, so the two differ only in the vision tower's start.
Starting the same command again on the same out_dir resumes exactly where it stopped, mid-epoch.

The story: config -> setup -> data -> model (resume, else --init, else random) -> optimiser -> loop
(accumulated contrastive step, schedule, logging, checkpoints, periodic evaluation) -> summary.
"""
import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common
import data
import nights
import shards
import sources
from augment import TrainTransform
from model import check_activation, check_state_dict, create_model, model_config, read_checkpoint
from progress import progress

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "yfcc15m.yaml"
ORDER_KEYS = ("seed", "batch_size", "streams", "shuffle_buffer")  # with the units' counts, they fix the data order


@dataclass
class Config:
    train_data: str = "/data/yfcc15m/{00000..01499}.tar"  # tar or parquet files: braces, several joined by '::'
    image_column: str = "images"  # parquet: the image column (binary, or a struct with a `bytes` field)
    text_column: str = "texts"  # parquet: captions (strings) or CLIP token ids (the first context_length)
    out_dir: str = "runs/clip"  # out_dir/ckpt.pt is the latest checkpoint; a run resumes from it
    model: str = "ViT-B-32"  # a preset of model.py
    epochs: int = 32
    max_steps: int = 0  # stop after this many optimiser steps (0: epochs decide)
    batch_size: int = 4096  # GLOBAL batch: the same whatever the number of ranks
    accum_steps: int = 1  # split each rank's batch into this many micro-batches (same result, less memory)
    lr: float = 5e-4
    warmup_steps: int = 2500
    weight_decay: float = 0.1
    grad_clip: float = 0.0  # max global gradient norm (0: off)
    save_every: int = 1000  # steps between checkpoints (and always at the end)
    seed: int = 0
    device: str = ""  # cuda when present, else cpu
    precision: str = ""  # bf16 / fp16 / fp32; default bf16 on cuda, fp32 on cpu
    workers: int = 8  # DataLoader worker processes per rank
    grad_checkpointing: bool = False
    compile: bool = False
    init: str = ""  # checkpoint whose vision tower starts the run (stage 1's ckpt.pt, open_clip, OpenAI)
    init_text: bool = False  # also take the text tower (and logit scale) from `init`
    augment: str = "moco"  # moco (the PI fork, MoCo v2), train (open_clip's default) or eval (no augmentation)
    streams: int = 64  # canonical data streams: fix the sample order for any ranks / workers (shards.py);
    #                    must divide batch_size and be divisible by the number of ranks
    shuffle_buffer: int = 1000  # each stream permutes its samples in windows of this many (held undecoded)
    decode_on_device: bool = False  # cuda: JPEGs decoded by nvjpeg (torchvision.io.decode_jpeg), not in the workers
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_tasks: str = ""  # comma-separated zero-shot tasks, e.g. "cifar100,cifar10"
    eval_data_root: str = ""
    nights_root: str = ""  # NIGHTS folder: log the 2AFC score at each evaluation
    log_every: int = 50


# ---------------------------------------------------------------------------------------------------
# The contrastive loss and one optimiser step's gradients
# ---------------------------------------------------------------------------------------------------


def gather(x):
    """(n, E) on each rank -> (world * n, E), rank order; gradients flow back to every rank's rows."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def contrastive_loss(image_features, text_features, logit_scale, valid=None):
    """Symmetric InfoNCE over the global batch, computing this rank's n rows only: its images against
    all N texts and its texts against all N images (open_clip's local loss, REFERENCE.md section 8).
    DDP averages gradients over ranks; the all-gather's backward sums them, so the result is the
    gradient of the global loss.

    `valid` (n,) bool marks real rows: the loader pads a batch that lost bad samples. Padded rows are
    neither anchors nor negatives, and the loss is the mean over the valid rows of ALL ranks (scaled
    by the world size, which DDP's average divides out): the gradient of the large batch of good
    samples, however the good ones fall over ranks."""
    n, rank = image_features.shape[0], dist.get_rank() if dist.is_initialized() else 0
    all_images, all_texts = gather(image_features), gather(text_features)  # (N, E)
    logits_per_image = logit_scale * image_features @ all_texts.T  # (n, N)
    logits_per_text = logit_scale * text_features @ all_images.T  # (n, N)
    labels = torch.arange(n, device=image_features.device) + n * rank  # each row's pair in the global batch
    if valid is None:
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    all_valid = gather_mask(valid)  # (N,)
    # -1e4 is far below any logit (|logit| <= 100): its exp is exactly 0, as -inf's would be, yet a
    # row of padding alone stays finite (its loss and gradient are then dropped by ignore_index).
    hide = torch.zeros(all_valid.shape, dtype=logits_per_image.dtype, device=valid.device).masked_fill(~all_valid, -1e4)
    labels = labels.masked_fill(~valid, -100)  # cross_entropy's ignore_index: no loss, no gradient
    total = (F.cross_entropy(logits_per_image + hide, labels, reduction="sum")
             + F.cross_entropy(logits_per_text + hide, labels, reduction="sum")) / 2
    world = dist.get_world_size() if dist.is_initialized() else 1
    return total * world / all_valid.sum().clamp(min=1)


def gather_mask(valid):
    """(n,) bool on each rank -> (world * n,), rank order (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()):
        return valid
    parts = [torch.empty_like(valid) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, valid.contiguous())
    return torch.cat(parts)


def accumulate_gradients(model, images, tokens, accum_steps, amp, scaler, valid=None):
    """Gradients of the contrastive loss of the whole batch, in `accum_steps` micro-batches.

    A contrastive loss cannot average micro-batch losses: every pair's negatives are the whole batch.
    open_clip's scheme: embed every micro-batch without gradients and cache the features; then re-embed
    each micro-batch with gradients, put its fresh features among the cached ones, and backward the
    full loss. Micro-batch j's backward yields dL/df_j * df_j/dtheta; their sum is dL/dtheta exactly.
    logit_scale enters every re-forward, so it keeps its gradient in one of them only (the last,
    where DDP synchronises); open_clip lets it accumulate accum_steps times. `valid`: see
    contrastive_loss. Returns the loss.
    """
    if accum_steps == 1:
        with amp:
            loss = contrastive_loss(*model(images, tokens), valid=valid)
        scaler.scale(loss).backward()
        return loss.detach()
    image_chunks, token_chunks = images.chunk(accum_steps), tokens.chunk(accum_steps)
    with torch.no_grad(), amp:
        cached = [model(i, t)[:2] for i, t in zip(image_chunks, token_chunks)]
    cached_images, cached_texts = [c[0] for c in cached], [c[1] for c in cached]
    for j in range(accum_steps):
        last = j == accum_steps - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with no_sync:
            with amp:
                image_features, text_features, logit_scale = model(image_chunks[j], token_chunks[j])
                all_images = torch.cat(cached_images[:j] + [image_features] + cached_images[j + 1:])  # (n, E)
                all_texts = torch.cat(cached_texts[:j] + [text_features] + cached_texts[j + 1:])
                loss = contrastive_loss(all_images, all_texts, logit_scale if last else logit_scale.detach(), valid)
            scaler.scale(loss).backward()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------------


def list_units(cfg, argv, d):
    """The training data's units with their sample counts (sources.py). If a counting pass is
    needed, the main rank makes it (and saves it) while the others wait, then read the saved counts."""
    def units():
        try:
            return sources.list_units(cfg.train_data, progress=d.is_main, image_column=cfg.image_column,
                                      text_column=cfg.text_column)
        except FileNotFoundError as e:
            source = next((a for a in argv if a.endswith((".yaml", ".yml"))), str(DEFAULT_CONFIG))
            raise FileNotFoundError(
                f"train_data: {e} (train_data={cfg.train_data!r}, from {source} or the command line). Put the data "
                f"there, or point elsewhere with --train_data='/path/to/{{00000..00099}}.tar' (or .parquet; several "
                "specs joined by '::')") from None

    if d.enabled and not d.is_main:
        dist.barrier()
    found = units()
    if d.enabled and d.is_main:
        dist.barrier()
    return found


def load_init(model, path, include_text):
    """The vision tower (and with include_text, everything) from any CLIP checkpoint model.load_checkpoint
    reads; one that records the other activation than this model's is an error naming both."""
    state_dict, stored = read_checkpoint(path)
    if stored is not None:
        check_activation(f"--init {path}", stored["quickgelu"], model.config.quickgelu)
    taken = {k: v for k, v in state_dict.items() if include_text or k.startswith("visual.")}
    missing = [k for k in model.state_dict() if k.startswith("visual.") and k not in taken]
    if missing:
        raise ValueError(f"--init {path}: no vision tower for this model, missing {missing[:5]}{' ...' * (len(missing) > 5)}")
    check_state_dict(model, {**model.state_dict(), **taken}, f"--init {path} (for model {model.config})")
    model.load_state_dict(taken, strict=False)
    return len(taken)


def evaluate_now(model, cfg, device, precision):
    """Zero-shot tasks and NIGHTS 2AFC on the main process -> flat {metric: value}. evaluate.py is
    imported only when something is asked for, so a run without evaluation needs nothing of it."""
    tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
    if not tasks and not cfg.nights_root:
        return {}
    import evaluate

    metrics = {}
    model.eval()
    if tasks:
        for task, result in evaluate.run_tasks(model, tasks, cfg.eval_data_root, device, precision=precision).items():
            name, value = evaluate.main_metric(task, result)
            metrics[f"zeroshot/{task}/{name}"] = value
    if cfg.nights_root:
        triplets = nights.NightsDataset(cfg.nights_root, "test", model.config.image_size)
        metrics["nights/2afc"] = evaluate.evaluate_nights(model, triplets, device, precision=precision)
    model.train()
    return metrics


def main(argv):
    # --- config and setup -------------------------------------------------------------------------
    cfg = common.load_config(Config, argv, default_path=DEFAULT_CONFIG)
    d = common.setup_distributed(cfg.device)
    precision = cfg.precision or common.default_precision(d.device)
    amp = common.autocast(d.device, precision)
    world = d.world_size
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ValueError(f"batch_size {cfg.batch_size} must divide into {world} rank(s) x {cfg.accum_steps} accum_steps")
    units = list_units(cfg, argv, d)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "ckpt.pt"
    log = common.MetricsLog(out_dir, d.is_main)

    # --- data -------------------------------------------------------------------------------------
    # The sample order depends on (seed, epoch, streams, shuffle_buffer, batch_size) and the units'
    # counts, not on ranks or workers (shards.py); the data position is (epoch, step), two integers.
    # Images leave the workers as uint8 crops; jitter, grayscale, blur and normalisation run on the device.
    shape = model_config(cfg.model)
    loader = shards.Loader(units, TrainTransform(shape.image_size, cfg.augment), cfg.batch_size, cfg.streams, d.rank,
                           world, cfg.workers, cfg.accum_steps, cfg.seed, cfg.shuffle_buffer, shape.context_length,
                           d.device, cfg.image_column, cfg.text_column, decode_on_device=cfg.decode_on_device)
    plan = loader.plan(0)
    steps_per_epoch = plan.steps
    if steps_per_epoch == 0:
        raise ValueError(f"train_data: {plan.total} samples do not fill one batch of {cfg.batch_size}: lower batch_size")
    if d.is_main:
        tqdm.write(f"data: {len(units)} units, {plan.total} samples; an epoch is {steps_per_epoch} steps of "
                   f"{cfg.batch_size} over {cfg.streams} streams ({plan.dropped} samples left over each epoch)")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # --- model: resume, else --init, else random --------------------------------------------------
    # The random init is drawn first in every case, so the baseline and the PI run share the text
    # tower and (seeded separately, inside the loader) the data order.
    common.seed_everything(cfg.seed)
    model = create_model(cfg.model)
    state = common.load_training_state(ckpt_path) if ckpt_path.exists() else None
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
    optimizer = torch.optim.AdamW(common.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = common.grad_scaler(d.device, precision)
    step, skipped = 0, torch.zeros(len(shards.SKIP_REASONS), dtype=torch.float64)
    position = {"epoch": 0, "step": 0}  # the next step to take: exact ints, valid for any ranks and workers
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        common.set_rng_state(state["rng"])
        step, position = state["step"], state["data_position"]
        saved_data = {**{k: state["config"].get(k) for k in ORDER_KEYS}, "units": state.get("data_units"),
                      "samples": state.get("data_samples")}
        for key, now in {**{k: getattr(cfg, k) for k in ORDER_KEYS}, "units": len(units), "samples": plan.total}.items():
            if saved_data[key] != now:  # the data may move (train_data), not change
                raise ValueError(f"{ckpt_path} was written with {key}={saved_data[key]!r}, now {key}={now!r}: the data "
                                 f"order would change. Resume with the same {key if key in ORDER_KEYS else 'data'}, or start a fresh out_dir")
        if d.is_main:  # the saved count is the sum over ranks: one rank carries it on
            skipped += torch.tensor([state["samples_skipped"][r] for r in shards.SKIP_REASONS], dtype=torch.float64)
    train_model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.enabled else model
    train_model = torch.compile(train_model) if cfg.compile else train_model  # `model` stays uncompiled for saving

    def save(metrics):
        skipped_total = common.all_reduce_sum(skipped.tolist(), d.device)
        if d.is_main:
            common.atomic_save({
                "state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "config": dataclasses.asdict(cfg), "metrics": metrics, "step": step,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": common.rng_state(),
                "schedule": {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "total_steps": total_steps},
                "data_position": dict(position), "data_units": len(units), "data_samples": plan.total,
                "samples_skipped": dict(zip(shards.SKIP_REASONS, map(int, skipped_total))),
            }, ckpt_path)
        return skipped_total

    # --- the loop ---------------------------------------------------------------------------------
    if d.is_main:
        log.write({**common.run_header(cfg), "resumed_from_step": step, "total_steps": total_steps,
                   "steps_per_epoch": steps_per_epoch, "samples_per_epoch": plan.total, "dropped_per_epoch": plan.dropped,
                   "world_size": world, "precision": precision,
                   "params": model.num_params()})
    bar = progress(total=total_steps, initial=step, disable=not d.is_main, desc="train", dynamic_ncols=True)
    epoch, metrics = position["epoch"], {}
    interval = {"loss": 0.0, "steps": 0, "wait": 0.0, "start": time.perf_counter()}
    while step < total_steps:
        ready = time.perf_counter()
        for batch in loader.epoch_batches(epoch, position["step"] if position["epoch"] == epoch else 0):
            interval["wait"] += time.perf_counter() - ready
            skipped += batch["skipped"]
            images = loader.transform.device(batch["images"], batch["params"])  # uint8 -> augmented, normalised
            tokens = batch["tokens"]
            lr = common.cosine_lr(step, cfg.lr, cfg.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(train_model, images, tokens, cfg.accum_steps, amp, scaler, batch["valid"])
            loss = common.all_reduce_sum([loss.item()], d.device)[0] / world  # every rank stops together
            if not math.isfinite(loss):
                save(metrics)
                raise FloatingPointError(
                    f"non-finite loss {loss} at step {step} (lr {lr:.3g}); saved the state before this step to "
                    f"{ckpt_path}. Try a lower lr, grad_clip=1, or precision=bf16 / fp32 instead of fp16")
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # temperature >= 0.01 (CLIP)
            step += 1
            last_of_epoch = batch["step"] + 1 == steps_per_epoch
            position = {"epoch": epoch + 1, "step": 0} if last_of_epoch else {"epoch": epoch, "step": batch["step"] + 1}
            bar.update()
            interval["loss"] += loss
            interval["steps"] += 1

            if step % cfg.log_every == 0 or step == total_steps:
                seconds = time.perf_counter() - interval["start"]
                skipped_total = common.all_reduce_sum(skipped.tolist(), d.device)
                record = {"step": step, "epoch": epoch, "loss": interval["loss"] / interval["steps"], "lr": lr,
                          "logit_scale": model.logit_scale.exp().item(), "samples_per_s": interval["steps"] * cfg.batch_size / seconds,
                          "data_wait": interval["wait"] / seconds, "samples_seen": step * cfg.batch_size,
                          "samples_skipped": int(sum(skipped_total))}
                log.write(record, f"step {step}/{total_steps}  loss {record['loss']:.4f}  lr {lr:.3g}  scale "
                          f"{record['logit_scale']:.1f}  {record['samples_per_s']:.0f} samples/s  data wait "
                          f"{100 * record['data_wait']:.0f}%  skipped {record['samples_skipped']}")
                interval = {"loss": 0.0, "steps": 0, "wait": 0.0, "start": time.perf_counter()}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
                metrics = evaluate_now(model, cfg, d.device, precision) if d.is_main else {}
                if metrics:
                    log.write({"step": step, **metrics}, f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if d.enabled:
                    dist.barrier()  # other ranks wait for the main one's evaluation
                interval["start"] = time.perf_counter()  # timings exclude evaluation
            if step % cfg.save_every == 0 or step == total_steps:
                save(metrics)
            if step >= total_steps:
                break
            ready = time.perf_counter()
        else:
            epoch += 1
    bar.close()

    # --- summary ----------------------------------------------------------------------------------
    skipped_total = common.all_reduce_sum(skipped.tolist(), d.device)
    if d.is_main:
        summary = {"steps": step, "samples_seen": step * cfg.batch_size, "samples_skipped": int(sum(skipped_total)),
                   "skipped_by_reason": dict(zip(shards.SKIP_REASONS, map(int, skipped_total))), "metrics": metrics,
                   "checkpoint": str(ckpt_path)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        tqdm.write(f"done: {step} steps, {summary['samples_seen']} samples seen, {summary['samples_skipped']} skipped")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_cli(main)
