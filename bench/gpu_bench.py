"""Stage 2's training step on one GPU as the trainer runs it: samples/s, MFU / HFU, peak memory, and
the largest micro-batch that fits, for ViT-B/32 (or the config's / --model's tower, e.g. RN50) in
bf16 (~4-5 minutes on an H100 / H200: an estimate, not yet run on a GPU).

  python bench/gpu_bench.py [--config configs/yfcc15m.yaml] [--micro-batch 1024] [--steps 10]
                            [--out gpu_bench.json] [--parts ceiling,eager,compiled,fit]
  python bench/gpu_bench.py --config configs/rn50_yfcc15m.yaml  # ResNet-50 CLIP (or --model RN50)
  python bench/gpu_bench.py --dry-run [--model RN50]   # CPU, tiny model (tiny-rn for a ResNet);
                                                       # the tests run it

Parts (--parts; each result is printed and appended to OUT's .jsonl as it comes, so a timeout or a
failing part loses only what was running):
  ceiling   the measured bf16 matmul TFLOP/s (8192^3), printed beside the datasheet's dense peak;
  eager     train_clip.train_step with grad checkpointing off / on, at accum_steps 1 and the
            config's; and TrainTransform.device_half (the augmentation's GPU half) on one step's
            batch, ms;
  compiled  the config's step (its checkpointing, its accum_steps) through training.wrap_model's
            compile, compiled once (warmup_s holds the compile time); and the augmentation
            compiled;
  fit       the largest micro-batch at the config's accum_steps, without / with checkpointing.
What is timed is train_clip.train_step itself (lr set, zero_grad, accumulate_gradients with its
cached no-grad forward, clipping, the scaler's step, the logit clamp), with
training.make_optimizer's fused AdamW and TF32 from training.setup_distributed, on synthetic data
made on the GPU (the loader is benched in bench/bench_loader.py): one micro-batch of --micro-batch
(default: the config's per-GPU micro-batch, batch_size / accum_steps), 3 warm-up steps, then
--steps timed steps.

The fit search measures what train_clip.py holds, not the step alone: the loader's uint8 batch of
micro-batch x accum_steps images with params and tokens, the augmented fp32 batch
TrainTransform.device_half makes from it (its temporaries included), then one eager step at the
config's accum_steps. It starts at --fit-start (near the expected answer), doubles or halves, then
bisects to 64, at most --fit-probes full steps; every probe is logged with its peak memory.

FLOPs are counted, not assumed: torch.utils.flop_counter counts the matmuls, convolutions and
attention of one train_step on the meta device (no memory, no time), at the same batch. ViT-B/32
counts 14.78 GFLOP per image-text pair forward (open_clip's docs/model_profile.csv, row ViT-B-32)
and 44.1 per pair for a step without accumulation; accumulation adds its cached forward (58.9 at
accum > 1). MFU counts the step's FLOPs without checkpointing (what the algorithm needs); HFU counts
what the GPU runs, including checkpointing's recomputation (about 2/3 of a forward: torch's
non-reentrant checkpoint stops recomputing once the saved tensors are back). RN50 counts 17.55 GFLOP
a pair forward where open_clip's docs/model_profile.csv lists 18.18: open_clip's attention pool runs
all 50 grid tokens as queries and keeps the first, the kit's runs that one query only (the same
output); the 0.64 GFLOP of the 49 dropped queries make up the difference exactly
(tests/test_gpu_bench.py). Peak: the GPU's dense bf16 TFLOP/s from its datasheet (PEAK_TFLOPS,
matched on the device name; H100 / H200 SXM 989: NVIDIA's H100 and H200 datasheets, dense, without
sparsity), or --peak-tflops; MFU is also given against the measured matmul ceiling
(mfu_vs_measured_matmul), the practical ceiling of a real step.
"""
import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import training
import train_clip
from stage2 import contrastive  # noqa: E402
from stage2.augment import TrainTransform  # noqa: E402
from model import create_model, model_config

EOT = 49407
# Dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets (SXM parts; PCIe / NVL ones are
# lower: pass --peak-tflops). Matched in this order against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "4090": 165.0}


def synthetic_batch(n, config, device):
    """n image-text pairs with the shapes and dtypes the loader delivers, made on `device`
    (a host-made batch of 6,144 images takes ~20 s of CPU randn and a copy per probe): normalised
    images, token ids with one end-of-text token each (its position varies, as real captions'
    lengths do)."""
    g = torch.Generator(device).manual_seed(0)
    images = torch.randn(n, 3, config.image_size, config.image_size, generator=g, device=device)
    tokens = torch.randint(1, EOT - 1, (n, config.context_length), generator=g, device=device)
    ends = torch.randint(5, config.context_length, (n,), generator=g, device=device)
    tokens[torch.arange(n, device=device), ends] = EOT
    return images, tokens


def synthetic_loader_batch(n, config, device):
    """What the training loop holds of a batch before its step, made on `device`: uint8 images as
    the loader delivers them and augmentation params with every op switched on for some samples
    (drawn by TrainTransform.draw, tiled), plus the tokens."""
    g = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (n, 3, config.image_size, config.image_size), generator=g,
                           device=device, dtype=torch.uint8)
    drawn = torch.stack([TrainTransform(config.image_size, "moco").draw(256, 256, seed)[1]
                         for seed in range(64)])
    params = drawn.to(device).repeat(-(-n // len(drawn)), 1)[:n]
    return images, params, synthetic_batch(n, config, device)[1]


def matmul_ceiling(device, size=8192, repeats=10):
    """The device's measured bf16 matmul TFLOP/s: a size^3 product, 3 warm-ups, the mean of
    `repeats` (the practical ceiling MFU can be read against beside the datasheet's peak)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c[0, 0].item()  # waits for the device
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def step_flops(model_name, batch, accum_steps, checkpointing):
    """FLOPs of one train_step's forward and backward passes at this batch, counted on the meta
    device (the optimiser's elementwise work is not counted: it is memory-bound and small)."""
    with torch.device("meta"):
        model = create_model(model_name)
    model.set_grad_checkpointing(checkpointing)
    images = torch.empty(batch, 3, model.config.image_size, model.config.image_size, device="meta")
    tokens = torch.zeros(batch, model.config.context_length, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        contrastive.accumulate_gradients(model, images, tokens, accum_steps,
                                         training.autocast("cpu", "fp32"),
                                         training.grad_scaler("cpu", "fp32"))
    return counter.get_total_flops()


def forward_flops(model_name, batch):
    """FLOPs of one forward of `batch` image-text pairs (the reference point: 14.78 GFLOP a pair
    for ViT-B/32)."""
    with torch.device("meta"):
        model = create_model(model_name)
    images = torch.empty(batch, 3, model.config.image_size, model.config.image_size, device="meta")
    tokens = torch.zeros(batch, model.config.context_length, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images, tokens)
    return counter.get_total_flops()


def build(cfg, device, precision, compiled, backend):
    """The trainer's model, optimiser, scaler and wrapping, as train_clip.train sets them up."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model).to(device).train()
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    forward, ddp = training.wrap_model(model, training.Ranks(device=torch.device(device)), compiled,
                                       backend)
    optimizer = training.make_optimizer(model, cfg, device)
    return (model, forward, ddp, optimizer, training.grad_scaler(device, precision),
            training.autocast(device, precision))


def time_steps(parts, cfg, images, tokens, steps, warmup=3):
    """Seconds a train_step takes, the mean of `steps` after `warmup`, and the peak memory (GiB)."""
    model, forward, ddp, optimizer, scaler, amp = parts
    device = images.device
    # one process: row i is position i (for the contrastive groups)
    slots = torch.arange(images.shape[0], device=device)

    def one():
        return train_clip.train_step(model, forward, ddp, optimizer, scaler, amp, images, tokens,
                                     cfg.lr, cfg, slots=slots)

    for _ in range(warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = one()
    loss.item()  # waits for the device
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return seconds, peak


def time_calls(call, device, repeats):
    """Seconds one call() takes, waiting for the device: the mean of `repeats` after a first
    untimed one."""
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def largest_fitting(fits, start, granularity, max_probes=12):
    """The largest multiple of `granularity` for which fits(n) holds, assuming fitting is monotone:
    from `start` (a guess near the answer) double up until it fails, or halve down until it fits,
    then bisect; at most `max_probes` calls of fits (the caller's log of them bounds the answer when
    they run out). None if nothing down to `granularity` fits."""
    low = high = None  # the largest size known to fit, the smallest known to fail
    n, probes = max(granularity, start // granularity * granularity), 0
    while probes < max_probes:
        if low is not None and high is not None:
            n = (low + high) // 2 // granularity * granularity
            if n <= low:
                break
        probes += 1
        if fits(n):
            low = n
            n = 2 * n if high is None else n
        else:
            high = n
            if low is None:
                if n <= granularity:
                    break
                n = max(granularity, n // 2 // granularity * granularity)
    return low


def fits_in_training(cfg, device, precision, checkpointing, log=print):
    """fits(n): what train_clip.py holds at micro-batch n and the config's accum_steps fits in
    memory. As the training loop holds them: the loader's uint8 batch of n * accum_steps images with
    their params and tokens, the augmented fp32 batch made from it by TrainTransform.device_half
    (its temporaries included), and one eager train_step (the cached no-grad forward of all
    micro-batches, then each micro-batch's forward and backward, the optimiser's step). Each probe
    starts from an empty cache and frees everything it made; its peak memory is logged."""
    transform = TrainTransform(model_config(cfg.model).image_size, cfg.augment)

    def fits(n):
        parts = batch = images = None
        step_cfg = dataclasses.replace(cfg, grad_checkpointing=checkpointing)
        cuda = torch.device(device).type == "cuda"
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            parts = build(step_cfg, device, precision, False, "inductor")
            model, forward, ddp, optimizer, scaler, amp = parts
            batch = synthetic_loader_batch(n * cfg.accum_steps, model.config, device)
            images = transform.device_half(batch[0], batch[1])
            loss = train_clip.train_step(model, forward, ddp, optimizer, scaler, amp, images,
                                         batch[2], cfg.lr, step_cfg,
                                         slots=torch.arange(images.shape[0], device=device))
            ok = bool(torch.isfinite(loss))
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            del parts, batch, images
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            if cuda:
                torch.cuda.empty_cache()
        log({"probe": "fit", "grad_checkpointing": checkpointing, "micro_batch": n,
             "accum_steps": cfg.accum_steps, "fits": ok, "peak_memory_gib": peak})
        return ok
    return fits


PARTS = ("ceiling", "eager", "compiled", "fit")


def main(argv=None):
    args, parts = parse_args(argv)
    run = set_up(args, parts)
    log(run, {k: v for k, v in run.results.items() if k not in ("runs", "largest_micro_batch")})
    if "ceiling" in parts:
        measure_ceiling(run)
    if "eager" in parts:
        for checkpointing in (False, True):
            measure(run, checkpointing, False, run.accums)
        augmentation(run, False)
    if "compiled" in parts:  # compiled once: the step the config trains with
        measure(run, run.cfg.grad_checkpointing, True, [run.cfg.accum_steps])
        augmentation(run, True)
    if "fit" in parts:
        find_largest_micro_batches(run)
    print(f"wrote {run.out} and {run.jsonl} ({time.perf_counter() - run.started:.0f} s)")
    return run.results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "yfcc15m.yaml"),
                        help="train_clip config: model, batch, accum_steps")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="pairs per micro-batch (default: batch_size / accum_steps)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the GPU's dense bf16 peak, TFLOP/s (default: PEAK_TFLOPS by name)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="what to measure, comma-separated: ceiling (bf16 matmul), eager "
                             "(checkpointing off / on x accum 1 / the config's), compiled (the "
                             "config's step, compiled once), fit (largest micro-batch)")
    parser.add_argument("--fit-start", default="3072,4096",
                        help="first micro-batch probed without / with checkpointing")
    parser.add_argument("--fit-probes", type=int, default=7,
                        help="most probes per search (each a full step at accum_steps)")
    parser.add_argument("--out", default="gpu_bench.json",
                        help="the summary; every result is also appended to OUT's .jsonl as it "
                             "comes")
    parser.add_argument("--model", default="",
                        help="a model.py preset instead of the config's (e.g. RN50)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model, micro-batch 4, 2 steps, no compile, one fit probe")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}; "
                     f"choose from {', '.join(PARTS)}")
    return args, parts


def set_up(args, parts):
    """The config, device and precision of the runs, and the summary they fill -> a namespace
    (args, cfg, device, precision, steps, warmup, micro, accums, results, out, jsonl, started).
    A dry run measures a tiny model on the CPU, without compiling (`parts` loses "compiled")."""
    cfg = cli.load_config(train_clip.Config, [args.config])
    cfg = dataclasses.replace(cfg, model=args.model or cfg.model)
    if args.dry_run:
        device, precision, steps, warmup = "cpu", "fp32", 2, 1
        # a CPU has no bf16 tensor-core peak: MFU is a placeholder
        args.peak_tflops = args.peak_tflops or 1.0
        # the same kind of tower, in miniature
        tiny = "tiny-rn" if model_config(cfg.model).resnet else "tiny"
        cfg = dataclasses.replace(cfg, model=tiny, batch_size=8, accum_steps=2)
        parts.discard("compiled")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible: use --dry-run to check the script on the CPU")
        training.setup_distributed("cuda")  # what the trainer sets on CUDA (TF32)
        device, precision, steps, warmup = "cuda", "bf16", args.steps, 3
        name = torch.cuda.get_device_name()
        args.peak_tflops = (args.peak_tflops
                            or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0))
        if not args.peak_tflops:
            raise SystemExit(f"no bf16 peak known for {name}: pass --peak-tflops (its datasheet's "
                             "dense bf16 TFLOP/s)")
    micro = args.micro_batch or (4 if args.dry_run else cfg.batch_size // cfg.accum_steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"device": (torch.cuda.get_device_name() if device == "cuda"
                          else "cpu (dry run: numbers mean nothing)"),
               "model": cfg.model, "precision": precision, "micro_batch": micro,
               "peak_tflops": args.peak_tflops, "torch": torch.__version__,
               "forward_gflop_per_pair": forward_flops(cfg.model, micro) / micro / 1e9,
               "runs": [], "largest_micro_batch": {}}
    return types.SimpleNamespace(
        args=args, cfg=cfg, device=device, precision=precision, steps=steps, warmup=warmup,
        micro=micro, accums=sorted({1, cfg.accum_steps}), results=results, out=out,
        jsonl=out.with_suffix(".jsonl"), started=time.perf_counter())


def log(run, record):
    """One result: printed, appended to the .jsonl at once (a timeout loses nothing before it),
    and the summary rewritten."""
    print(json.dumps(record), flush=True)
    with open(run.jsonl, "a") as f:
        f.write(json.dumps(record) + "\n")
    run.results["seconds"] = time.perf_counter() - run.started
    partial = run.out.with_name(run.out.name + ".partial")
    partial.write_text(json.dumps(run.results, indent=1) + "\n")
    os.replace(partial, run.out)  # a kill mid-write leaves the previous summary whole


def measure_ceiling(run):
    measured = matmul_ceiling(run.device, 8192 if run.device == "cuda" else 256)
    run.results["measured_tflops"] = measured
    log(run, {"matmul_ceiling_tflops": round(measured, 1),
              "datasheet_tflops": run.args.peak_tflops,
              "share_of_datasheet": round(measured / run.args.peak_tflops, 3),
              "what": ("bf16 8192^3 matmul, mean of 10 after 3 warm-ups" if run.device == "cuda"
                       else "cpu fp32 256^3 (dry run)")})


def measure(run, checkpointing, compiled, accums_here):
    cfg, peak_flops = run.cfg, run.args.peak_tflops * 1e12
    step_cfg = dataclasses.replace(cfg, grad_checkpointing=checkpointing)
    built = build(step_cfg, run.device, run.precision, compiled, cfg.compile_backend)
    for accum in accums_here:
        run_cfg = dataclasses.replace(step_cfg, accum_steps=accum)
        batch = run.micro * accum
        images, tokens = synthetic_batch(batch, built[0].config, run.device)
        n_steps, begun = max(2, -(-run.steps // accum)), time.perf_counter()
        seconds, peak = time_steps(built, run_cfg, images, tokens, n_steps, run.warmup)
        model_flops = step_flops(cfg.model, batch, accum, False)  # what the algorithm needs
        # with checkpointing's recomputation
        hardware_flops = step_flops(cfg.model, batch, accum, checkpointing)
        record = {"grad_checkpointing": checkpointing, "compile": compiled, "accum_steps": accum,
                  "batch": batch, "step_s": seconds, "samples_per_s": batch / seconds,
                  "gflop_per_pair": model_flops / batch / 1e9,
                  "mfu": model_flops / seconds / peak_flops,
                  "hfu": hardware_flops / seconds / peak_flops,
                  "peak_memory_gib": peak,
                  # with compile: the compile time
                  "warmup_s": time.perf_counter() - begun - seconds * n_steps}
        if "measured_tflops" in run.results:
            record["mfu_vs_measured_matmul"] = (model_flops / seconds
                                                / (run.results["measured_tflops"] * 1e12))
        run.results["runs"].append(record)
        log(run, record)
        del images, tokens
    del built
    if run.device == "cuda":
        torch.cuda.empty_cache()


def augmentation(run, compiled):
    """TrainTransform.device_half on one step's batch (micro-batch x the config's accum_steps): ms
    per batch, eager or compiled (its torch.where form has no data-dependent shapes: one graph)."""
    cfg = run.cfg
    image_size = model_config(cfg.model).image_size
    images, params, _ = synthetic_loader_batch(run.micro * cfg.accum_steps,
                                               model_config(cfg.model), run.device)
    transform = TrainTransform(image_size, cfg.augment)
    call = torch.compile(transform.device_half) if compiled else transform.device_half
    begun = time.perf_counter()
    call(images, params)
    calls = max(2, run.steps // 2)
    seconds = time_calls(lambda: call(images, params), run.device, calls)
    log(run, {"augmentation": cfg.augment, "compile": compiled, "batch": len(images),
              "ms_per_batch": seconds * 1e3,
              "warmup_s": time.perf_counter() - begun - seconds * calls})


def find_largest_micro_batches(run):
    """The largest micro-batch that trains, without and with checkpointing (on the CPU of a dry
    run: that one probe runs, a CPU has no memory limit to find)."""
    cfg, record = run.cfg, functools.partial(log, run)
    starts = [int(x) for x in run.args.fit_start.split(",")]
    for checkpointing, start in zip((False, True), starts):
        fits = fits_in_training(cfg, run.device, run.precision, checkpointing, record)
        if run.device == "cuda":
            largest = largest_fitting(fits, start, 64, run.args.fit_probes)
        else:
            largest = run.micro if fits(run.micro) else None
        key = "checkpointing" if checkpointing else "plain"
        run.results["largest_micro_batch"][key] = largest
        log(run, {"largest_micro_batch": largest, "grad_checkpointing": checkpointing,
                  "accum_steps": cfg.accum_steps,
                  "measured": "train_clip's step at the config's accum_steps with the uint8 "
                              "batch, its params and the augmented fp32 batch "
                              "(TrainTransform.device_half) held, as the training loop holds "
                              "them"})


if __name__ == "__main__":
    main()
