"""Stage 1 of Perceptual-Initialization: train CLIP's vision tower on human (or brain) similarity
judgments.

  python train_triplet.py configs/nights.yaml                 # the paper's recipe (ViT-B/32)
  python train_triplet.py configs/nights_tiny.yaml           # CPU, generated data, ~40 s
  python train_triplet.py configs/nights.yaml --data_format=things --data_root=DIR   # any source
  torchrun --nproc_per_node=8 train_triplet.py configs/nights.yaml   # DDP: batch_size is global

Each triplet holds a reference and two images with the share p of judges who chose the right one
closer: NIGHTS by default (stage1/nights.py), or BAPPS, THINGS odd-one-out trials, triplet tables,
class-folder triplets or a dissimilarity matrix (data_format; stage1/other_sources.py,
docs/stage1-data.md). The vision tower embeds all three; d = 1 - cos of the projected embeddings; a
hinge with margin 0.05 pushes d(ref, right) below d(ref, left) when most judges chose right and the
other way otherwise (stage1/objective.py). Only the vision tower trains, but ckpt.pt holds the full
CLIP (text tower at its random init), so it loads anywhere a CLIP checkpoint does.

The story, as train() reads: config -> resume check -> model (--init, else random) -> data ->
optimiser -> loop (train_step, log, evaluate val, save, stop) -> final 2AFC of every split ->
summary. A run whose out_dir holds ckpt.pt resumes from it exactly (the data order is a function of
seed and epoch: stage1/triplets.py's batch_order) after training.check_resume has refused any
changed TRAJECTORY_KEYS; a finished run is left as it is. SIGTERM / SIGINT stop it at the next step
boundary with a checkpoint (exit 0). Outputs in out_dir: ckpt.pt, metrics.jsonl, summary.json (the
triplet counts and 2AFC score of every split; THINGS also the odd-one-out accuracy).
"""
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

import logs
import training
from analysis.alignment import odd_one_out_accuracy
from checkpoints import check_state_dict, config_from_state_dict, read_checkpoint
from cli import UserError, progress, user_input
from model import CLIP, CLIPConfig, create_model, model_config, parse_settings
from stage1 import nights, other_sources, triplets
from stage1.objective import hinge_loss, triplet_distances, two_afc


@dataclass
class Config:
    # --- data (docs/stage1-data.md: each source's layout and where to download it) ---
    data_format: str = "nights"  # nights | bapps | things | triplets | categories | rdm
    data_root: str = "data/nights"  # the source's folder as its producer ships it
    max_triplets: int = 0  # train on at most this many training rows (0: all), a nested subset
    triplet_fraction: float = 1.0  # train on this share of the training rows, nested likewise
    min_votes: int = 6  # nights: keep rows with >= this many votes (6: the unanimous ~20k)
    bapps_subsets: str = ""  # bapps: comma-separated subsets (traditional,cnn,...); empty: all
    odd_column: int = 2  # things: the odd one's column (2: last, THINGS-data; 0: cblearn's file)
    image_dir: str = ""  # triplets / categories: the folder of images or class folders
    images_per_class: int = 1  # categories: images drawn per class folder (from seed, once)
    rdm: str = ""  # rdm: comma-separated names of <data_root>/rdms/<name>.npy; empty: all
    rdm_triplets_per_image: int = 20  # rdm: triplets drawn per reference image (per RDM)
    rdm_min_gap: float = 0.0  # rdm: keep a triplet only where the dissimilarity gap exceeds this
    rdm_holdout: float = 0.1  # rdm: share of the images held out for val, and again for test
    skip_missing: bool = False  # drop (and count) rows whose images are missing, not stop
    image_size: int | None = None  # input size; None: the model preset's (224 for ViT-B-32)
    cache: bool = True  # decode + resize every image once into a uint8 cache, not every epoch
    cache_dir: str | None = None  # where the cache lives; None: <data_root>/cache
    workers: int = 4  # data-loader processes per rank (they also build the cache)
    shuffle_labels: bool = False  # control: permute p among training triplets (seeded)
    allow_data_change: bool = False  # resume although the training triplets changed
    # --- model ---
    model: str = "ViT-B-32"  # model.py preset; the PI paper's backbone
    model_settings: str = ""  # CLIPConfig fields over the preset, e.g. "context_length=16"
    init: str | None = None  # start from this CLIP checkpoint instead of random weights
    posthoc: bool = False  # the paper's control: train only the vision qkv (weights and biases)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    sync_batchnorm: bool = False  # DDP with a ResNet: BatchNorm statistics over the global batch
    compile: bool = False  # torch.compile the vision tower's training forward
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation)
    # --- optimiser and schedule (the PI authors' stage-1 values: configs/nights.yaml) ---
    epochs: int = 32
    batch_size: int = 768  # global: each of N ranks takes batch_size / N
    lr: float = 5e-4
    lr_schedule: str = "cosine"  # cosine (warmup, then to 0 at the end) or authors (their code's)
    warmup_steps: int = 150
    weight_decay: float = 0.1  # not on biases, norms, class and positional embeddings
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    margin: float = 0.05  # hinge margin (the PI authors' and DreamSim's)
    seed: int = 42
    # --- loop ---
    out_dir: str = "runs/nights"
    device: str = ""  # cuda / cpu; empty: cuda when present
    precision: str = ""  # bf16 / fp16 / fp32; empty: bf16 on cuda, fp32 on cpu
    save_every: int = 1000  # steps between checkpoints (and at every epoch's end)
    keep_every_epochs: int = 0  # keep out_dir/ckpt_epoch{E}.pt every this many epochs (0: none)
    stop_after_steps: int | None = None  # save and stop here (the schedule still spans all epochs)
    # --- logging ---
    log_every: int = 10  # steps between log lines
    log_to: str = ""  # also log to: tensorboard, wandb (comma-separated; wandb offline by default)
    # --- evaluation ---
    eval_every: int = 0  # steps between val 2AFC scores (0: only at epochs' ends)
    eval_every_epochs: int = 1  # val 2AFC at the end of every this many epochs
    eval_batch_size: int = 256

    # What each value may be, checked where the config is read: (lowest, highest), None unbounded.
    RANGES: ClassVar[dict] = {
        "max_triplets": (0, None), "triplet_fraction": (1e-9, 1.0), "min_votes": (0, None),
        "odd_column": (0, 2), "images_per_class": (1, None), "rdm_triplets_per_image": (1, None),
        "rdm_min_gap": (0.0, None), "rdm_holdout": (0.0, 0.5), "image_size": (1, None),
        "workers": (0, None), "epochs": (1, None), "batch_size": (1, None), "lr": (0.0, None),
        "warmup_steps": (0, None), "weight_decay": (0.0, None), "beta1": (0.0, 0.9999),
        "beta2": (0.0, 0.9999), "eps": (0.0, None), "margin": (0.0, None),
        "save_every": (1, None), "keep_every_epochs": (0, None), "stop_after_steps": (1, None),
        "log_every": (1, None), "eval_every": (0, None), "eval_every_epochs": (0, None),
        "eval_batch_size": (1, None)}
    CHOICES: ClassVar[dict] = {"data_format": other_sources.DATA_FORMATS,
                               "lr_schedule": training.LR_SCHEDULES,
                               "precision": ("", "bf16", "fp16", "fp32")}

    def check(self):
        """--init names a file (before any data is read)."""
        if self.init and not os.path.isfile(self.init):
            raise FileNotFoundError(f"init: checkpoint {self.init} does not exist")


# Settings that change what a run computes: resuming with different values would splice two runs,
# so training.check_resume refuses it. The rest (workers, logging, saving, evaluation, device, the
# number of ranks, ...) may change between starts; data_root and image_dir may move; train_triplets
# (the training set's size) is compared as found.
TRAJECTORY_KEYS = (
    "model", "model_settings", "image_size", "init", "posthoc", "epochs", "batch_size", "lr",
    "lr_schedule", "weight_decay", "beta1", "beta2", "eps", "warmup_steps", "margin",
    "shuffle_labels", "seed", "min_votes", "precision", "data_format", "max_triplets",
    "triplet_fraction", "bapps_subsets", "odd_column", "images_per_class", "rdm",
    "rdm_triplets_per_image", "rdm_min_gap", "rdm_holdout")


def main(argv=None):
    with training.StopSignal() as stop:  # SIGTERM / SIGINT: stop at a step boundary, saved
        return train(sys.argv[1:] if argv is None else argv, stop)


def train(argv, stop):
    cfg, ranks, precision, out_dir = training.start_run(Config, argv)
    check_config(cfg, ranks.world_size)
    ckpt_path = out_dir / "ckpt.pt"
    state = training.read_resume_state(ckpt_path, cfg, precision, TRAJECTORY_KEYS)
    if training.is_finished(state) and (out_dir / "summary.json").exists():
        return finished(out_dir, state, ranks)
    training.seed_everything(cfg.seed)  # the same random init on every rank
    model = make_model(cfg).to(ranks.device)
    # All that trains is the vision tower: DDP (and compile) wrap just it; `model` stays plain.
    forward, ddp = training.wrap_model(model.visual, ranks, cfg.compile, cfg.compile_backend,
                                       cfg.sync_batchnorm)
    splits, facts, schedule = make_data(cfg, model.config.image_size, precision, state, ckpt_path)
    loader = triplets.Loader(splits["train"], cfg.batch_size, cfg.seed, cfg.workers, ranks.rank,
                             ranks.world_size, ranks.device, training.ignore_stop_signals)
    lr_at = training.lr_function(schedule)  # the lr of optimiser step `step` (counting from 1)
    optimizer = training.make_optimizer(model, cfg, ranks.device)
    scaler = training.grad_scaler(ranks.device, precision)
    step, position, metrics = training.restore(state, model, optimizer, scaler, schedule)
    log = logs.open_log(out_dir, ranks.is_main, cfg.log_to, dataclasses.asdict(cfg))
    log_start(log, cfg, model, splits, step, schedule, ranks, precision)
    amp, total_steps, steps_per_epoch = (training.autocast(ranks.device, precision),
                                         schedule["total_steps"], schedule["steps_per_epoch"])
    save = dict(ranks=ranks, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg, facts=facts,
                schedule=schedule)
    train_mode(model, cfg.posthoc)
    bar = progress(total=total_steps, initial=step, desc="stage 1", disable=not ranks.is_main)
    watch = training.LossWatch(ranks, lr_at)  # losses stay on the device until a log or a save
    throughput, saved_step = training.Throughput(), step
    batches = training.epochs_from(position, loader.epoch_batches) if step < total_steps else ()
    for epoch, step_in_epoch, (ref, left, right, p) in throughput.timed(batches):
        loss = train_step(forward, optimizer, scaler, amp, ref, left, right, p,
                          lr_at(step + 1), cfg)
        step += 1
        watch.add(loss, step)
        throughput.steps += 1
        bar.update()
        epochs_done = step // steps_per_epoch if step % steps_per_epoch == 0 else None
        due = training.due_after(step, total_steps, epochs_done, cfg,
                                 stop.stop_now(ranks) or step == cfg.stop_after_steps)
        if due.log or due.evaluate or due.save or epochs_done:
            watch.check(ckpt_path, saved_step)  # nothing non-finite is logged, evaluated or saved
        if due.log:
            training.log_interval(log, step, total_steps, steps_per_epoch, watch, lr_at(step),
                                  throughput, cfg.batch_size)
        if step == total_steps:
            break  # the final evaluation and save follow
        with throughput.pause():  # evaluation and saving do not count in samples/s
            if due.evaluate and len(splits.get("val", ())):
                metrics["val"] = evaluate_val(model, splits["val"], cfg, ranks, precision, log,
                                              step, steps_per_epoch)
            if due.save or epochs_done:
                training.save_checkpoint(ckpt_path, **save, step=step, metrics=metrics)
                saved_step = step
            if due.keep:
                training.save_checkpoint(out_dir / f"ckpt_epoch{epochs_done:03d}.pt", **save,
                                         step=step, metrics=metrics)
        if due.stop:
            training.stopped(stop, cfg, ranks, step, total_steps, ckpt_path, bar)
            return metrics
    bar.close()
    metrics, odd_one_out = final_scores(model, splits, cfg, ranks, precision)
    training.save_checkpoint(ckpt_path, **save, step=step, metrics=metrics)
    write_summary(out_dir, cfg, model, splits, metrics, odd_one_out, step, steps_per_epoch, ranks,
                  log)
    log.close()
    training.cleanup_distributed()
    return metrics


# --------------------------------------------------------------------------------------------------
# One optimiser step (the distance and the hinge live in stage1/objective.py)
# --------------------------------------------------------------------------------------------------


def train_step(forward, optimizer, scaler, amp, ref, left, right, p, lr, cfg):
    """One optimiser step of stage 1 (as train_clip.train_step is stage 2's): set the lr, embed the
    three images of each triplet in one forward, hinge loss, backward, step (through the fp16
    scaler, a no-op otherwise). Returns the loss as a tensor on the device (no host sync)."""
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


# --------------------------------------------------------------------------------------------------
# Setup: the config, the model, the data
# --------------------------------------------------------------------------------------------------


def check_config(cfg, world):
    if cfg.posthoc and not cfg.init:
        raise UserError("posthoc: true fine-tunes a trained CLIP: "
                        "give its checkpoint with --init=PATH")
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    if cfg.lr_schedule not in training.LR_SCHEDULES:
        raise UserError(f"lr_schedule must be one of {', '.join(training.LR_SCHEDULES)}, "
                        f"got {cfg.lr_schedule!r}")
    logs.check(cfg.log_to)


def posthoc_parameter(name):
    """The post-hoc control's trainable tensors: the vision attention's query, key and value
    projections, weights and biases, as the PI authors' nights_ft_from_yfcc_vitb32 preset unfreezes
    them (github cheesepuff90/Brain_Initialization src/train.py:939-943: every parameter of each
    vision block's attn.qkv, an nn.Linear with bias, src/model.py:77, :237-242). A ViT's are its
    blocks' in_proj_weight and in_proj_bias; a ResNet's only attention is its pool."""
    return ((name.startswith("visual.transformer.")
             and name.endswith(("attn.in_proj_weight", "attn.in_proj_bias")))
            or name in {f"visual.attnpool.{p}_proj.{kind}" for p in "qkv"
                        for kind in ("weight", "bias")})


def train_mode(model, posthoc):
    """Stage 1 trains the vision tower in train mode (a ResNet's BatchNorm normalises by the batch
    and updates its statistics). The post-hoc control changes only the qkv: BatchNorm stays in
    eval mode, normalising by the trained model's statistics and leaving them as they were."""
    model.train()
    if posthoc:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def make_model(cfg):
    """A CLIP with only the parameters stage 1 trains left trainable: the whole vision tower, or for
    the post-hoc control only the attention qkv projections of the vision tower
    (posthoc_parameter)."""
    with user_input():  # a bad preset name or init checkpoint is the user's to fix
        settings = parse_settings(cfg.model_settings)
        if cfg.init and settings:
            raise ValueError(f"model_settings ({cfg.model_settings}) sets up a new model; "
                             f"--init {cfg.init} brings its own")
        if cfg.init:
            state_dict, stored = read_checkpoint(cfg.init)
            # The architecture from the checkpoint's record; a raw state dict gets the preset's
            # activation.
            config = (CLIPConfig(**stored) if stored else
                      config_from_state_dict(state_dict, model_config(cfg.model).quickgelu))
            check_same_size(config, cfg)
            model = CLIP(config)
            check_state_dict(model, state_dict, cfg.init)
            model.load_state_dict(state_dict)
        else:
            size = {"image_size": cfg.image_size} if cfg.image_size else {}
            model = create_model(cfg.model, **{**settings, **size})
    for name, param in model.named_parameters():
        if cfg.posthoc:
            param.requires_grad = posthoc_parameter(name)
        else:
            param.requires_grad = name.startswith("visual.")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


SIZES = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
         "context_length", "vocab_size", "text_width", "text_layers", "text_heads")


def check_same_size(stored, cfg):
    """--init brings its own architecture; one of another size than cfg.model would train that size
    instead of the config's without a word: refused, naming what differs."""
    wanted = model_config(cfg.model, **({"image_size": cfg.image_size} if cfg.image_size else {}))
    differ = [f"{k} {getattr(stored, k)} (model {cfg.model}: {getattr(wanted, k)})" for k in SIZES
              if getattr(stored, k) != getattr(wanted, k)]
    if differ:
        raise ValueError(f"--init {cfg.init} is a CLIP of another size than model={cfg.model}: "
                         f"{'; '.join(differ)}. Set --model to the checkpoint's preset")


def make_data(cfg, image_size, precision, state, ckpt_path):
    """-> ({split: TripletDataset}, facts, schedule). Any source becomes rows of (ref, left, right,
    p); with the cache, every image is decoded here, once (the first process to get there builds it,
    other ranks wait), and later runs reuse it while the source files are unchanged."""
    with user_input():  # a missing file or image, a bad row: named by the reader
        if cfg.data_format == "nights":
            splits = nights.read_splits(cfg.data_root, image_size, cfg.min_votes, cfg.skip_missing,
                                        cfg.cache, cfg.cache_dir, cfg.workers)
        else:
            splits = other_sources.open_splits(
                cfg.data_format, cfg.data_root, image_size, cfg.skip_missing, cfg.cache,
                cfg.cache_dir, cfg.workers, **{k: getattr(cfg, k) for k in other_sources.OPTIONS})
        train_set = splits["train"]
        train_set.keep(triplets.nested_subset(len(train_set), cfg.max_triplets,
                                              cfg.triplet_fraction, cfg.seed))
    if len(train_set) < cfg.batch_size:
        votes = f" with >= {cfg.min_votes} votes" if cfg.data_format == "nights" else ""
        subset = (" after max_triplets / triplet_fraction"
                  if cfg.max_triplets or cfg.triplet_fraction < 1 else "")
        raise UserError(f"{cfg.data_root} ({cfg.data_format}) gives {len(train_set)} training "
                        f"triplets{votes}{subset}, fewer than one batch of {cfg.batch_size}")
    facts = {"precision": precision, "train_triplets": len(train_set),
             "train_digest": triplets.digest(train_set)}
    if cfg.shuffle_labels:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))
        train_set.p = train_set.p[order]
    steps_per_epoch = len(train_set) // cfg.batch_size
    schedule = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "total_steps": cfg.epochs * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "lr_schedule": cfg.lr_schedule, "epochs": cfg.epochs}
    if state is not None:  # the same data (the order is a permutation of this many triplets)
        training.check_same_data(ckpt_path, training.saved_settings(state), facts,
                                 ["train_triplets", "train_digest"], cfg.allow_data_change)
        # Equal by the resume check; the checkpoint's is the truth.
        schedule.update(state.get("schedule", {}))
    return splits, facts, schedule


# --------------------------------------------------------------------------------------------------
# Logs, evaluation and the end of a run
# --------------------------------------------------------------------------------------------------


def log_start(log, cfg, model, splits, step, schedule, ranks, precision):
    """The run header and a readable line: parameters, triplets per split, rows dropped and why."""
    counts = {s: split.counts for s, split in splits.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    few_votes, missing = (sum(counts.get(s, {}).get(k, 0)
                              for s in ("train", "val", "test") for k in keys)
                          for keys in (("few_votes",), ("missing_images", "unreadable_images")))
    log.write({**logs.run_header(cfg), "precision": precision, "world_size": ranks.world_size,
               "resumed_from_step": step, "steps_per_epoch": schedule["steps_per_epoch"],
               "total_steps": schedule["total_steps"], "data": counts},
              f"{trainable:,} trainable parameters on {ranks.world_size} x {ranks.device} "
              f"({precision}) | triplets: "
              + ", ".join(f"{s} {c['triplets']}" for s, c in counts.items())
              + f" | dropped: {few_votes} rows with < {cfg.min_votes} votes, {missing} with "
              f"missing or unreadable images | {'resuming at' if step else 'starting at'} step "
              f"{step} of {schedule['total_steps']}")


def evaluate_val(model, val, cfg, ranks, precision, log, step, steps_per_epoch):
    """The val split's 2AFC, on the main rank; the others wait on the CPU group, whose timeout
    (training.WAIT_TIMEOUT) is far above any evaluation's time."""
    score = None
    if ranks.is_main:
        score = two_afc(model, val, ranks.device, cfg.eval_batch_size, precision, cfg.workers)
        log.write({"step": step, "epoch": step / steps_per_epoch, "val_2afc": score},
                  f"epoch {step / steps_per_epoch:g}: val 2AFC {score:.4f}")
        train_mode(model, cfg.posthoc)  # evaluation restored model.train(): BatchNorm's mode again
    training.wait_for_main(ranks)
    return score


def final_scores(model, splits, cfg, ranks, precision):
    """-> ({split: 2AFC}, {split: odd-one-out}) of every split (THINGS: the odd-one-out accuracy of
    its trials too; NIGHTS: "total", DreamSim's size-weighted mean of its two test subsets)."""
    metrics, odd_one_out = {}, {}
    if ranks.is_main:
        for split, dataset in splits.items():
            if len(dataset):
                metrics[split] = two_afc(model, dataset, ranks.device, cfg.eval_batch_size,
                                         precision, cfg.workers)
                if hasattr(dataset, "trials"):
                    odd_one_out[split] = odd_one_out_accuracy(model, dataset, ranks.device,
                                                              cfg.eval_batch_size, precision)
        sizes = {s: len(splits[s]) for s in ("test_imagenet", "test_no_imagenet") if s in metrics}
        if sizes:
            metrics["total"] = sum(metrics[s] * n for s, n in sizes.items()) / sum(sizes.values())
    return metrics, odd_one_out


def write_summary(out_dir, cfg, model, splits, metrics, odd_one_out, step, steps_per_epoch, ranks,
                  log):
    if ranks.is_main:
        summary = {"data_format": cfg.data_format,
                   "n_triplets": {s: len(split) for s, split in splits.items()}, "2afc": metrics,
                   **({"odd_one_out": odd_one_out} if odd_one_out else {}),
                   "data": {s: split.counts for s, split in splits.items()}, "steps": step,
                   "model_config": dataclasses.asdict(model.config)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if "val" in metrics:  # the last epoch's val score, as every other epoch's
            log.write({"step": step, "epoch": step / steps_per_epoch, "val_2afc": metrics["val"]},
                      f"epoch {step / steps_per_epoch:g}: val 2AFC {metrics['val']:.4f}")
        log.write({"step": step, "2afc": metrics},
                  "2AFC " + ", ".join(f"{s} {v:.4f}" for s, v in metrics.items()))


def finished(out_dir, state, ranks):
    if ranks.is_main:
        tqdm.write(f"{out_dir} holds a finished run ({state['step']} steps): nothing to do "
                   "(use another out_dir for a new run)")
    training.cleanup_distributed()
    return state["metrics"]


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main)
