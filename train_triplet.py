"""Stage 1 of Perceptual-Initialization: train CLIP's vision tower on human (or brain) similarity judgments.

  python train_triplet.py configs/nights.yaml                    # the paper's recipe (ViT-B/32)
  python train_triplet.py configs/nights_tiny.yaml              # CPU, generated data, ~40 s
  python train_triplet.py configs/nights.yaml --data_format=things --data_root=DIR   # any source: docs/stage1-data.md
  torchrun --nproc_per_node=8 train_triplet.py configs/nights.yaml   # DDP: batch_size is global

Each triplet holds a reference and two images with the share p of judges who chose the right one
closer: NIGHTS by default, or BAPPS, THINGS odd-one-out trials, triplet tables, class-folder triplets or
a dissimilarity matrix (data_format; docs/stage1-data.md). The vision tower embeds all three; d = 1 - cos
of the projected embeddings; a hinge with margin 0.05 pushes d(ref, right) below d(ref, left) when most
judges chose right and the other way otherwise (the PI authors' src/loss.py and
config/trainingconfig/nights_init_vitb32.json, github cheesepuff90/Brain_Initialization). Only the vision tower trains, but ckpt.pt holds the
full CLIP (text tower at its random init), so it loads anywhere a CLIP checkpoint does.

Start-up order: if out_dir holds ckpt.pt the run resumes from it exactly (weights, optimiser, step,
RNG, schedule; the data order is a function of seed + epoch (triplets.epoch_batches), so skipping the
batches already seen reproduces it) after training.check_resume has refused any changed TRAJECTORY_KEYS; a finished run is
left as it is. Otherwise weights come from `init` when given, else from a random init. SIGTERM /
SIGINT stop it at the next step boundary with a checkpoint (exit 0).
Outputs in out_dir: ckpt.pt, metrics.jsonl (run header, one line per log interval and evaluation),
summary.json (triplet counts and 2AFC score of every split; THINGS also the odd-one-out accuracy).
"""
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import logs
import training
from analysis import alignment
from stage1 import objective
from stage1 import other_sources
from stage1 import triplets
from checkpoints import check_state_dict, config_from_state_dict, read_checkpoint
from model import CLIP, CLIPConfig, create_model, model_config, parse_settings
from stage1.objective import triplet_distances
from cli import progress


@dataclass
class Config:
    # data (docs/stage1-data.md: each source's layout under data_root and where to download it)
    data_format: str = "nights"  # nights | bapps | things | triplets | categories | rdm (other_sources.py)
    data_root: str = "data/nights"  # the source's folder as its producer ships it (nights: data.csv, ref/, distort/)
    max_triplets: int = 0  # train on at most this many training rows (0 = all): a nested subset drawn from seed
    triplet_fraction: float = 1.0  # train on this share of the training rows (1.0 = all): nested as max_triplets
    min_votes: int = 6  # nights: keep rows with >= 6 votes: the unanimous ~20k triplets (PI fork)
    bapps_subsets: str = ""  # bapps: comma-separated subsets (traditional,cnn,...); empty: all
    odd_column: int = 2  # things: the column of the odd one out (2 = last, THINGS-data; 0 = cblearn's SPoSE file)
    image_dir: str = ""  # triplets / categories: the folder images or class folders sit in; empty: the source's default
    images_per_class: int = 1  # categories: images drawn per class folder (from seed, once)
    rdm: str = ""  # rdm: comma-separated names of <data_root>/rdms/<name>.npy; empty: all
    rdm_triplets_per_image: int = 20  # rdm: triplets drawn per reference image (per RDM)
    rdm_min_gap: float = 0.0  # rdm: keep a triplet only where the dissimilarity gap exceeds this (ties skipped)
    rdm_holdout: float = 0.1  # rdm: share of the images held out for val, and the same share for test
    skip_missing: bool = False  # drop (and count) rows whose images are missing instead of stopping
    image_size: int | None = None  # input size; None: the model preset's (224 for ViT-B-32)
    cache: bool = True  # decode + resize every image once into a uint8 cache, not every epoch (triplets.py)
    cache_dir: str | None = None  # where the cache lives; None: <data_root>/cache. Set it for a read-only data_root
    workers: int = 4  # data-loader processes per rank (they also build the cache)
    # model
    model: str = "ViT-B-32"  # model.py preset; the PI paper's backbone
    # CLIPConfig fields over the preset, e.g. "init_logit_scale=2.6593,context_length=16": one of the
    # authors' settings at a time (docs/authors-model.md) without a preset of its own; ckpt.pt records
    # them, and stage 2 (train_clip.py) takes the same key
    model_settings: str = ""
    init: str | None = None  # start from this CLIP checkpoint instead of random weights
    posthoc: bool = False  # the paper's control: train only the vision qkv weights of a trained CLIP
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute
    # DDP with a ResNet tower: BatchNorm statistics over the global batch (SyncBatchNorm, GPUs only)
    # instead of each rank's share. The PI authors' RN50 configs set it (github cheesepuff90/
    # Brain_Initialization, config/trainingconfig/nod_init_resnet50.json "distributed.sync_batchnorm": true).
    sync_batchnorm: bool = False
    compile: bool = False  # torch.compile the vision tower's training forward (DDP first, then compile)
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager captures graphs without code generation
    # optimisation (the PI authors' config/trainingconfig/nights_init_vitb32.json)
    epochs: int = 32
    batch_size: int = 768  # global: each of N ranks takes batch_size / N
    lr: float = 5e-4
    weight_decay: float = 0.1  # not on biases, norms, class / positional embeddings (training.param_groups)
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


# Settings that change what a run computes: resuming with different values would splice two runs, so
# training.check_resume refuses it. Everything else (workers, log_every, save_every, eval_batch_size,
# stop_after_steps, grad_checkpointing, compile, device, the number of ranks) may change between starts;
# precision is compared as resolved, train_triplets (the training set's size) as found.
TRAJECTORY_KEYS = ("model", "model_settings", "image_size", "init", "posthoc", "epochs", "batch_size", "lr", "weight_decay", "beta1",
                   "beta2", "eps", "warmup_steps", "margin", "shuffle_labels", "seed", "min_votes", "precision",
                   "data_format", "max_triplets", "triplet_fraction", "bapps_subsets", "odd_column", "images_per_class",
                   "rdm", "rdm_triplets_per_image", "rdm_min_gap", "rdm_holdout")  # data_root, image_dir: data may move


def hinge_loss(d0, d1, p, margin):
    """y = +1 when most observers chose right (p > 0.5), else -1; logit = d(ref,left) - d(ref,right)
    is positive when the model finds right closer. mean(relu(margin - y * logit))."""
    y = torch.where(p > 0.5, 1.0, -1.0)
    return torch.relu(margin - y * (d0 - d1)).mean()


def posthoc_parameter(name):
    """The post-hoc control's trainable weights: the vision attention's query, key and value
    projections. A ViT's are its blocks' in_proj_weight; a ResNet's only attention is its pool."""
    return (name.startswith("visual.transformer.") and name.endswith("attn.in_proj_weight")) or \
        name in ("visual.attnpool.q_proj.weight", "visual.attnpool.k_proj.weight", "visual.attnpool.v_proj.weight")


def train_mode(model, posthoc):
    """Stage 1 trains the vision tower in train mode (a ResNet's BatchNorm normalises by the batch and
    updates its statistics). The post-hoc control changes only qkv weights: BatchNorm stays in eval
    mode, normalising by the trained model's statistics and leaving them as they were."""
    model.train()
    if posthoc:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_model(cfg):
    """A CLIP with only the parameters stage 1 trains left trainable: the whole vision tower, or for
    the post-hoc control only the attention qkv projections of the vision tower (posthoc_parameter)."""
    with cli.user_input():  # a bad preset name or init checkpoint is the user's to fix
        settings = parse_settings(cfg.model_settings)
        if cfg.init and settings:
            raise ValueError(f"model_settings ({cfg.model_settings}) sets up a new model; --init {cfg.init} brings its own")
        if cfg.init:
            state_dict, stored = read_checkpoint(cfg.init)
            # Architecture from the checkpoint's record; a raw state dict gets the preset's activation.
            config = CLIPConfig(**stored) if stored else config_from_state_dict(state_dict, model_config(cfg.model).quickgelu)
            model = CLIP(config)
            check_state_dict(model, state_dict, cfg.init)
            model.load_state_dict(state_dict)
        else:
            model = create_model(cfg.model, **{**settings, **({"image_size": cfg.image_size} if cfg.image_size else {})})
    for name, param in model.named_parameters():
        if cfg.posthoc:
            param.requires_grad = posthoc_parameter(name)
        else:
            param.requires_grad = name.startswith("visual.")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def make_optimizer(model, cfg, device):
    """AdamW over the trainable parameters; fused (one kernel for all parameters) on CUDA. With
    weight_decay 0 it is exactly Adam: the post-hoc control's optimiser."""
    return torch.optim.AdamW(training.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=torch.device(device).type == "cuda")


def train_step(forward, optimizer, scaler, amp, ref, left, right, p, lr, cfg):
    """One optimiser step of stage 1 (as train_clip.train_step is stage 2's): set the lr, embed the
    three images of each triplet in one forward, hinge loss, backward, step (through the fp16 scaler,
    a no-op otherwise). Returns the loss as a tensor on the device (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with amp:
        d0, d1 = triplet_distances(forward, ref, left, right)
    loss = hinge_loss(d0, d1, p, cfg.margin)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def main(argv=None):
    with training.StopSignal() as stop:  # SIGTERM / SIGINT: stop at a step boundary, saved
        return train(sys.argv[1:] if argv is None else argv, stop)


def train(argv, stop):
    # ---- setup ------------------------------------------------------------------------------------
    cfg = cli.load_config(Config, argv)
    if cfg.posthoc and not cfg.init:
        raise cli.UserError("posthoc: true fine-tunes a trained CLIP: give its checkpoint with --init=PATH")
    d = training.setup_distributed(cfg.device)
    device, precision = d.device, cfg.precision or training.default_precision(d.device)
    amp = training.autocast(device, precision)
    if cfg.batch_size % d.world_size:
        raise cli.UserError(f"batch_size {cfg.batch_size} is not divisible by the {d.world_size} processes")
    out_dir, ckpt_path = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    log = logs.MetricsLog(out_dir, enabled=d.is_main)

    # ---- checkpoint: the resume check; a finished run is left as it is ----------------------------
    state = training.load_training_state(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        saved = {**state["config"], **state.get("run", {})}
        training.check_resume(ckpt_path, saved, {**dataclasses.asdict(cfg), "precision": precision}, TRAJECTORY_KEYS)
        if "schedule" in state and state["step"] >= state["schedule"]["total_steps"] and (out_dir / "summary.json").exists():
            if d.is_main:
                tqdm.write(f"{out_dir} holds a finished run ({state['step']} steps): nothing to do "
                           "(use another out_dir for a new run)")
            training.cleanup_distributed()
            return state["metrics"]
    training.seed_everything(cfg.seed)  # the same random init on every rank

    # ---- model ------------------------------------------------------------------------------------
    model = build_model(cfg).to(device)
    # All that trains is the vision tower: DDP (and compile) wrap just it; `model` stays plain for saving.
    forward, ddp = training.wrap_model(model.visual, d, cfg.compile, cfg.compile_backend, cfg.sync_batchnorm)

    # ---- data -------------------------------------------------------------------------------------
    # Any source becomes rows of (ref, left, right, p) (other_sources.py). With the cache, every image
    # is decoded here, once (the first process to get there builds it, other ranks wait); later runs
    # reuse it while the source files are unchanged.
    with cli.user_input():  # a missing file or image, a bad row: named by the reader
        splits = other_sources.open_splits(cfg.data_format, cfg.data_root, model.config.image_size, cfg.skip_missing,
                                             cfg.cache, cfg.cache_dir, cfg.workers,
                                             **{k: getattr(cfg, k) for k in other_sources.OPTIONS})
        train_set = splits["train"]
        train_set.keep(triplets.nested_subset(len(train_set), cfg.max_triplets, cfg.triplet_fraction, cfg.seed))
    if len(train_set) < cfg.batch_size:
        votes = f" with >= {cfg.min_votes} votes" if cfg.data_format == "nights" else ""
        subset = " after max_triplets / triplet_fraction" if cfg.max_triplets or cfg.triplet_fraction < 1 else ""
        raise cli.UserError(f"{cfg.data_root} ({cfg.data_format}) gives {len(train_set)} training triplets{votes}{subset}, "
                               f"fewer than one batch of {cfg.batch_size}")
    if cfg.shuffle_labels:
        train_set.p = train_set.p[torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))]
    run_facts = {"precision": precision, "train_triplets": len(train_set)}
    steps_per_epoch = len(train_set) // cfg.batch_size
    schedule = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "total_steps": cfg.epochs * steps_per_epoch,
                "steps_per_epoch": steps_per_epoch}
    if state is not None:  # the same data (the order is a permutation of this many triplets); the saved schedule
        training.check_resume(ckpt_path, {**state["config"], **state.get("run", {})}, run_facts, ["train_triplets"])
        schedule.update(state.get("schedule", {}))
    steps_per_epoch, total_steps = schedule["steps_per_epoch"], schedule["total_steps"]
    # Built once: its workers live across epochs; the batches stay a pure function of seed + epoch.
    loader = triplets.train_loader(train_set, cfg.batch_size, cfg.seed, cfg.workers, d.rank, d.world_size,
                                 pin_memory=device.type == "cuda",
                                 worker_init_fn=training.ignore_stop_signals)  # SIGTERM is the loop's

    def lr_at(step):  # the lr of optimiser step number `step` (counting from 1)
        return training.cosine_lr(step - 1, schedule["lr"], schedule["warmup_steps"], total_steps)

    # ---- optimiser and resume ---------------------------------------------------------------------
    optimizer = make_optimizer(model, cfg, device)
    scaler = training.grad_scaler(device, precision)
    step, metrics = 0, {}
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        training.set_rng_state(state["rng"])
        step, metrics = state["step"], state["metrics"]
    saved_step = step

    def save():
        if d.is_main:
            epoch, batch = divmod(step, steps_per_epoch)
            training.atomic_save({"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                                "config": dataclasses.asdict(cfg), "run": run_facts, "metrics": metrics, "step": step,
                                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": training.rng_state(),
                                "schedule": schedule, "data_position": {"epoch": epoch, "batch": batch}}, ckpt_path)
        training.wait_for_main(d)  # no rank runs ahead (and into a NCCL timeout) while the main one writes
        return step

    def evaluate_val():  # on the main rank; the others wait on the CPU group (training.WAIT_TIMEOUT)
        if d.is_main:
            metrics["val"] = objective.two_afc(model, splits["val"], device, cfg.eval_batch_size, precision, cfg.workers)
            log.write({"step": step, "epoch": step // steps_per_epoch, "val_2afc": metrics["val"]},
                      f"epoch {step // steps_per_epoch}: val 2AFC {metrics['val']:.4f}")
        training.wait_for_main(d)

    counts = {s: split.counts for s, split in splits.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    few_votes, missing = (sum(counts.get(s, {}).get(k, 0) for s in ("train", "val", "test") for k in keys)
                          for keys in (("few_votes",), ("missing_images", "unreadable_images")))
    log.write({**logs.run_header(cfg), "precision": precision, "world_size": d.world_size, "resumed_from_step": step,
               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "data": counts},
              f"{trainable:,} trainable parameters on {d.world_size} x {device} ({precision}) | triplets: "
              + ", ".join(f"{s} {c['triplets']}" for s, c in counts.items())
              + f" | dropped: {few_votes} rows with < {cfg.min_votes} votes, {missing} with missing or unreadable images"
              + f" | {'resuming at' if step else 'starting at'} step {step} of {total_steps}")

    # ---- loop -------------------------------------------------------------------------------------
    train_mode(model, cfg.posthoc)
    bar = progress(total=total_steps, initial=step, desc="stage 1", disable=not d.is_main)
    watch = training.LossWatch(d, lr_at)  # losses stay on the device; read at log, evaluation and save steps
    loss_count, clock = 0, time.time()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        loader.batch_sampler.set_epoch(epoch, position)
        for ref, left, right, p in training.prefetch_to_device(loader, device):
            ref, left, right = (triplets.model_input(t, device) for t in (ref, left, right))  # uint8 -> normalised
            loss = train_step(forward, optimizer, scaler, amp, ref, left, right, p, lr_at(step + 1), cfg)
            step += 1
            watch.add(loss, step)
            bar.update()
            loss_count += 1

            log_now = step % cfg.log_every == 0 or step == total_steps
            epoch_end = step % steps_per_epoch == 0
            stop_now = (stop.stop_now(d) or step == cfg.stop_after_steps) and step < total_steps
            save_now = (epoch_end or step % cfg.save_every == 0 or stop_now) and step < total_steps
            if log_now or epoch_end or save_now:
                watch.check(ckpt_path, saved_step)  # nothing non-finite is logged as good, evaluated or saved
            if log_now:
                mean_loss = watch.interval_mean()
                rate = loss_count * cfg.batch_size / (time.time() - clock)
                log.write({"step": step, "epoch": step / steps_per_epoch, "loss": mean_loss, "lr": lr_at(step),
                           "samples_per_s": rate},
                          f"step {step}/{total_steps} | loss {mean_loss:.4f} | lr {lr_at(step):.2e} | {rate:.0f} triplets/s")
                loss_count, clock = 0, time.time()

            paused = time.time()  # evaluation and saving do not count in triplets/s
            if epoch_end and len(splits.get("val", ())):
                evaluate_val()
                train_mode(model, cfg.posthoc)  # evaluation restored model.train(): BatchNorm's mode again
            if step == total_steps:
                break  # the final evaluation and save follow
            if save_now:
                saved_step = save()
            if stop_now:
                bar.close()
                if d.is_main:
                    reason = stop.received or ("stop_after_steps" if step == cfg.stop_after_steps else "another rank")
                    tqdm.write(f"stopped by {reason} at step {step} of {total_steps}, saved {ckpt_path}; "
                               "run the same command to resume")
                training.cleanup_distributed()
                return metrics
            clock += time.time() - paused
    bar.close()

    # ---- final evaluation and save ----------------------------------------------------------------
    odd_one_out = {}
    if d.is_main:
        for split, dataset in splits.items():
            if len(dataset):
                metrics[split] = objective.two_afc(model, dataset, device, cfg.eval_batch_size, precision, cfg.workers)
                if hasattr(dataset, "trials"):  # THINGS: the odd-one-out accuracy of the same split's trials
                    odd_one_out[split] = alignment.odd_one_out_accuracy(model, dataset, device, cfg.eval_batch_size, precision)
        sizes = {s: len(splits[s]) for s in ("test_imagenet", "test_no_imagenet") if s in metrics}
        if sizes:  # "nights_total": the size-weighted mean of the two test subsets (DreamSim)
            metrics["total"] = sum(metrics[s] * n for s, n in sizes.items()) / sum(sizes.values())
    save()
    if d.is_main:
        summary = {"data_format": cfg.data_format, "n_triplets": {s: len(split) for s, split in splits.items()},
                   "2afc": metrics, **({"odd_one_out": odd_one_out} if odd_one_out else {}), "data": counts,
                   "steps": step, "model_config": dataclasses.asdict(model.config)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.write({"step": step, "2afc": metrics}, "2AFC " + ", ".join(f"{s} {v:.4f}" for s, v in metrics.items()))
    training.cleanup_distributed()
    return metrics


if __name__ == "__main__":
    cli.run_cli(main)
