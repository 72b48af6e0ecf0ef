"""Stage 1 of Perceptual-Initialization: train CLIP's vision tower on NIGHTS human 2AFC judgments.

  python train_triplet.py configs/nights.yaml                    # the paper's recipe (ViT-B/32)
  python train_triplet.py configs/nights_tiny.yaml              # CPU, generated data, ~40 s
  torchrun --nproc_per_node=8 train_triplet.py configs/nights.yaml   # DDP: batch_size is global

Each NIGHTS triplet holds a reference and two variations with the share p of observers who judged
the right one closer. The vision tower embeds all three; d = 1 - cos of the projected embeddings;
a hinge with margin 0.05 pushes d(ref, right) below d(ref, left) when most observers chose right and
the other way otherwise (REFERENCE.md section 2). Only the vision tower trains, but ckpt.pt holds the
full CLIP (text tower at its random init), so it loads anywhere a CLIP checkpoint does.

Start-up order: if out_dir holds ckpt.pt the run resumes from it exactly (weights, optimiser, step,
RNG; the data order is a function of seed + epoch (nights.epoch_batches), so skipping the batches
already seen reproduces it); otherwise weights come from `init` when given, else from a random init.
Outputs in out_dir: ckpt.pt, metrics.jsonl (run header, one line per log interval and evaluation),
summary.json (triplet counts and 2AFC score of every split).
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from progress import progress

from common import (MetricsLog, all_reduce_sum, atomic_save, autocast, cleanup_distributed, cosine_lr,
                    default_precision, grad_scaler, load_config, load_training_state, param_groups, rng_state,
                    run_cli, run_header, seed_everything, set_rng_state, setup_distributed)
from evaluate import evaluate_nights, nights_distances
from model import CLIP, CLIPConfig, check_state_dict, config_from_state_dict, create_model, model_config, read_checkpoint
from nights import NIGHTS_SPLITS, NightsDataset, model_input, train_loader


@dataclass
class Config:
    # data
    data_root: str = "data/nights"  # folder holding data.csv, ref/ and distort/
    min_votes: int = 6  # keep rows with >= 6 votes: the unanimous ~20k triplets (PI fork)
    skip_missing: bool = False  # drop (and count) rows whose images are missing instead of stopping
    image_size: int | None = None  # input size; None: the model preset's (224 for ViT-B-32)
    cache: bool = True  # decode + resize every image once into a uint8 cache, not every epoch (nights.py)
    cache_dir: str | None = None  # where the cache lives; None: <data_root>/cache. Set it for a read-only data_root
    workers: int = 4  # data-loader processes per rank (they also build the cache)
    # model
    model: str = "ViT-B-32"  # model.py preset; the PI paper's backbone
    init: str | None = None  # start from this CLIP checkpoint instead of random weights
    posthoc: bool = False  # the paper's control: train only the vision qkv weights of a trained CLIP
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute
    # optimisation (PI fork's stage-1 recipe, REFERENCE.md section 2)
    epochs: int = 32
    batch_size: int = 768  # global: each of N ranks takes batch_size / N
    lr: float = 5e-4
    weight_decay: float = 0.1  # not on biases, norms, class / positional embeddings (common.param_groups)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 150  # linear warmup, then cosine to 0 at the last step
    margin: float = 0.05  # hinge margin (PI fork and DreamSim)
    shuffle_labels: bool = False  # control: permute p among training triplets (seeded): does human structure matter?
    # run
    out_dir: str = "runs/nights"
    seed: int = 42
    device: str = ""  # cuda / cpu; empty: cuda when present
    precision: str = ""  # bf16 / fp16 / fp32; empty: bf16 on cuda, fp32 on cpu
    eval_batch_size: int = 256
    save_every: int = 1000  # steps between checkpoints (one is also written at every epoch end)
    log_every: int = 10  # steps between log lines
    stop_after_steps: int | None = None  # save and stop at this step (the schedule still spans all epochs)


# Settings that change what a run computes: resuming with different values would splice two runs.
TRAJECTORY_KEYS = ("model", "image_size", "init", "posthoc", "epochs", "batch_size", "lr", "weight_decay", "beta1",
                   "beta2", "eps", "warmup_steps", "margin", "shuffle_labels", "seed", "min_votes")


def hinge_loss(d0, d1, p, margin):
    """y = +1 when most observers chose right (p > 0.5), else -1; logit = d(ref,left) - d(ref,right)
    is positive when the model finds right closer. mean(relu(margin - y * logit))."""
    y = torch.where(p > 0.5, 1.0, -1.0)
    return torch.relu(margin - y * (d0 - d1)).mean()


def build_model(cfg):
    """A CLIP with only the parameters stage 1 trains left trainable: the whole vision tower, or for
    the post-hoc control only the qkv projections of the vision blocks."""
    if cfg.init:
        state_dict, stored = read_checkpoint(cfg.init)
        # Architecture from the checkpoint's record; a raw state dict gets the preset's activation.
        config = CLIPConfig(**stored) if stored else config_from_state_dict(state_dict, model_config(cfg.model).quickgelu)
        model = CLIP(config)
        check_state_dict(model, state_dict, cfg.init)
        model.load_state_dict(state_dict)
    else:
        model = create_model(cfg.model, **({"image_size": cfg.image_size} if cfg.image_size else {}))
    for name, param in model.named_parameters():
        if cfg.posthoc:
            param.requires_grad = name.startswith("visual.transformer.") and name.endswith("attn.in_proj_weight")
        else:
            param.requires_grad = name.startswith("visual.")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def main(argv=None):
    # ---- setup ------------------------------------------------------------------------------------
    cfg = load_config(Config, sys.argv[1:] if argv is None else argv)
    if cfg.posthoc and not cfg.init:
        raise ValueError("posthoc: true fine-tunes a trained CLIP: give its checkpoint with --init=PATH")
    dist = setup_distributed(cfg.device)
    device, precision = dist.device, cfg.precision or default_precision(dist.device)
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
    out_dir, ckpt_path = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # the same random init on every rank
    log = MetricsLog(out_dir, enabled=dist.is_main)

    # ---- model ------------------------------------------------------------------------------------
    model = build_model(cfg).to(device)
    visual = model.visual  # all that trains; DDP wraps just this tower
    if dist.enabled:
        visual = DistributedDataParallel(visual, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    # ---- data -------------------------------------------------------------------------------------
    # With the cache, every image is decoded here, once (the first process to get there builds it,
    # other ranks wait); later runs reuse it while the source files are unchanged.
    splits = {s: NightsDataset(cfg.data_root, s, model.config.image_size, cfg.min_votes, cfg.skip_missing, cfg.cache,
                               cfg.cache_dir, cfg.workers) for s in NIGHTS_SPLITS}
    train_set = splits["train"]
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{cfg.data_root}/data.csv has {len(train_set)} training triplets with >= {cfg.min_votes} "
                         f"votes, fewer than one batch of {cfg.batch_size}")
    if cfg.shuffle_labels:
        train_set.p = train_set.p[torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))]
    steps_per_epoch = len(train_set) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    # Built once: its workers live across epochs; the batches stay a pure function of seed + epoch.
    loader = train_loader(train_set, cfg.batch_size, cfg.seed, cfg.workers, dist.rank, dist.world_size,
                          pin_memory=device.type == "cuda")

    # ---- optimiser --------------------------------------------------------------------------------
    # With weight_decay 0 AdamW is exactly Adam: the post-hoc control's optimiser.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    scaler = grad_scaler(device, precision)

    # ---- resume -----------------------------------------------------------------------------------
    step, metrics = 0, {}
    if ckpt_path.exists():
        state = load_training_state(ckpt_path)
        changed = [f"{k}: {state['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in TRAJECTORY_KEYS
                   if state["config"].get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{ckpt_path} is a run with other settings ({'; '.join(changed)}): "
                             "use another out_dir, or the same settings to resume it")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, metrics = state["step"], state["metrics"]

    def save():
        if dist.is_main:
            epoch, batch = divmod(step, steps_per_epoch)
            atomic_save({"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                         "config": dataclasses.asdict(cfg), "metrics": metrics, "step": step,
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                         "data_position": {"epoch": epoch, "batch": batch}}, ckpt_path)

    counts = {s: d.counts for s, d in splits.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    few_votes, missing = (sum(counts[s][k] for s in ("train", "val", "test") for k in keys)
                          for keys in (("few_votes",), ("missing_images", "unreadable_images")))
    log.write({**run_header(cfg), "precision": precision, "world_size": dist.world_size, "resumed_from_step": step,
               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "data": counts},
              f"{trainable:,} trainable parameters on {dist.world_size} x {device} ({precision}) | triplets: "
              + ", ".join(f"{s} {c['triplets']}" for s, c in counts.items())
              + f" | dropped: {few_votes} rows with < {cfg.min_votes} votes, {missing} with missing or unreadable images"
              + f" | {'resuming at' if step else 'starting at'} step {step} of {total_steps}")

    # ---- loop -------------------------------------------------------------------------------------
    visual.train()
    bar = progress(total=total_steps, initial=step, desc="stage 1", disable=not dist.is_main)
    loss_sum, loss_count, clock = torch.zeros((), device=device), 0, time.time()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        loader.batch_sampler.set_epoch(epoch, position)
        for ref, left, right, p in loader:
            ref, left, right = (model_input(t, device) for t in (ref, left, right))  # uint8 -> normalised, on device
            p = p.to(device, non_blocking=True)
            lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, precision):
                d0, d1 = nights_distances(visual, ref, left, right)
            loss = hinge_loss(d0, d1, p, cfg.margin)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            bar.update()
            loss_sum += loss.detach()
            loss_count += 1

            if step % cfg.log_every == 0 or step == total_steps:
                total_loss, = all_reduce_sum([loss_sum.item()], device)
                mean_loss = total_loss / loss_count / dist.world_size
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}: stopping (lower lr?)")
                rate = loss_count * cfg.batch_size / (time.time() - clock)
                log.write({"step": step, "epoch": step / steps_per_epoch, "loss": mean_loss, "lr": lr,
                           "samples_per_s": rate},
                          f"step {step}/{total_steps} | loss {mean_loss:.4f} | lr {lr:.2e} | {rate:.0f} triplets/s")
                loss_sum.zero_()
                loss_count, clock = 0, time.time()

            paused = time.time()  # evaluation and saving do not count in triplets/s
            epoch_end = step % steps_per_epoch == 0
            if epoch_end and dist.is_main and len(splits["val"]):
                metrics["val"] = evaluate_nights(model, splits["val"], device, cfg.eval_batch_size, precision, cfg.workers)
                log.write({"step": step, "epoch": step // steps_per_epoch, "val_2afc": metrics["val"]},
                          f"epoch {step // steps_per_epoch}: val 2AFC {metrics['val']:.4f}")
            if step == total_steps:
                break  # the final evaluation and save follow
            if epoch_end or step % cfg.save_every == 0 or step == cfg.stop_after_steps:
                save()
            if step == cfg.stop_after_steps:
                bar.close()
                cleanup_distributed()
                return metrics
            clock += time.time() - paused
    bar.close()

    # ---- final evaluation and save ----------------------------------------------------------------
    if dist.is_main:
        for split, dataset in splits.items():
            if len(dataset):
                metrics[split] = evaluate_nights(model, dataset, device, cfg.eval_batch_size, precision, cfg.workers)
        sizes = {s: len(splits[s]) for s in ("test_imagenet", "test_no_imagenet") if s in metrics}
        if sizes:  # "nights_total": the size-weighted mean of the two test subsets (DreamSim)
            metrics["total"] = sum(metrics[s] * n for s, n in sizes.items()) / sum(sizes.values())
        save()
        summary = {"n_triplets": {s: len(d) for s, d in splits.items()}, "2afc": metrics, "data": counts,
                   "steps": step, "model_config": dataclasses.asdict(model.config)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.write({"step": step, "2afc": metrics}, "2AFC " + ", ".join(f"{s} {v:.4f}" for s, v in metrics.items()))
    cleanup_distributed()
    return metrics


if __name__ == "__main__":
    run_cli(main)
