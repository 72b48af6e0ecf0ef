"""Stage 2's training step on one GPU as the trainer runs it: samples/s, MFU / HFU, peak memory, and the
largest micro-batch that fits, for ViT-B/32 (or the config's / --model's tower, e.g. RN50) in bf16 (under
5 minutes on an H100 / H200).

  python bench/gpu_bench.py [--config configs/yfcc15m.yaml] [--micro-batch 1024] [--steps 10] [--out gpu_bench.json]
  python bench/gpu_bench.py --config configs/rn50_yfcc15m.yaml     # the ResNet-50 CLIP (or --model RN50)
  python bench/gpu_bench.py --dry-run [--model RN50]   # CPU, tiny model (tiny-rn for a ResNet): the tests run it

What is timed is train_clip.train_step itself (lr set, zero_grad, accumulate_gradients with the
config's accum_steps and its cached no-grad forward, clipping, the scaler's step, the logit clamp),
with train_clip.make_optimizer's fused AdamW, TF32 from common.setup_distributed and common.wrap_model's
compile, on synthetic data already on the GPU (the loader is benched in bench/bench_loader.py). For each
of grad checkpointing off / on x compile off / on, at accum_steps 1 and the config's, one micro-batch
of --micro-batch (default: the config's per-GPU micro-batch, batch_size / accum_steps): 3 warm-up steps,
then --steps timed steps.

FLOPs are counted, not assumed: torch.utils.flop_counter counts the matmuls, convolutions and
attention of one train_step on the meta device (no memory, no time), at the same batch. ViT-B/32
counts 14.78 GFLOP per image-text pair forward (REFERENCE.md section 5) and 44.1 per pair for a step
without accumulation; accumulation adds its cached forward (58.9 at accum > 1). MFU counts the step's
FLOPs without checkpointing (what the algorithm needs); HFU counts what the GPU runs, including
checkpointing's recomputation (about 2/3 of a forward: torch's non-reentrant checkpoint stops
recomputing once the saved tensors are back). RN50 counts 17.55 GFLOP a pair forward where open_clip's
docs/model_profile.csv lists 18.18: open_clip's attention pool runs all 50 grid tokens as queries and
keeps the first, the kit's runs that one query only (the same output); the 0.64 GFLOP of the 49 dropped
queries make up the difference exactly (tests/test_gpu_bench.py). Peak: the GPU's dense bf16 TFLOP/s from its datasheet
(PEAK_TFLOPS, matched on the device name; H100 / H200 SXM 989, REFERENCE.md section 11 quotes ~790
measured on a matmul), or --peak-tflops.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import train_clip  # noqa: E402
from model import create_model, model_config  # noqa: E402

EOT = 49407
# Dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets (SXM parts; PCIe / NVL ones are lower:
# pass --peak-tflops). Matched in this order against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def synthetic_batch(n, config, device):
    """n image-text pairs with the shapes and dtypes the loader delivers: normalised images, token ids
    with one end-of-text token each (its position varies, as real captions' lengths do)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, config.image_size, config.image_size, generator=g)
    tokens = torch.randint(1, EOT - 1, (n, config.context_length), generator=g)
    tokens[torch.arange(n), torch.randint(5, config.context_length, (n,), generator=g)] = EOT
    return images.to(device), tokens.to(device)


def step_flops(model_name, batch, accum_steps, checkpointing):
    """FLOPs of one train_step's forward and backward passes at this batch, counted on the meta device
    (the optimiser's elementwise work is not counted: it is memory-bound and small)."""
    with torch.device("meta"):
        model = create_model(model_name)
    model.set_grad_checkpointing(checkpointing)
    images = torch.empty(batch, 3, model.config.image_size, model.config.image_size, device="meta")
    tokens = torch.zeros(batch, model.config.context_length, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        train_clip.accumulate_gradients(model, images, tokens, accum_steps, common.autocast("cpu", "fp32"),
                                        common.grad_scaler("cpu", "fp32"))
    return counter.get_total_flops()


def forward_flops(model_name, batch):
    """FLOPs of one forward of `batch` image-text pairs (the reference point: 14.78 GFLOP a pair for ViT-B/32)."""
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
    forward, ddp = common.wrap_model(model, common.Dist(device=torch.device(device)), compiled, backend)
    optimizer = train_clip.make_optimizer(model, cfg, device)
    return model, forward, ddp, optimizer, common.grad_scaler(device, precision), common.autocast(device, precision)


def time_steps(parts, cfg, images, tokens, steps, warmup=3):
    """Seconds a train_step takes, averaged over `steps` after `warmup`, and the peak memory (GiB)."""
    model, forward, ddp, optimizer, scaler, amp = parts
    device = images.device

    def one():
        return train_clip.train_step(model, forward, ddp, optimizer, scaler, amp, images, tokens, cfg.lr, cfg)

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


def largest_fitting(fits, start, granularity):
    """The largest multiple of `granularity` for which fits(n) holds, assuming it holds for `start` and
    that fitting is monotone: double until it fails, then bisect. None if `start` itself fails."""
    if not fits(start):
        return None
    low, high = start, None
    while high is None:
        if fits(2 * low):
            low *= 2
        else:
            high = 2 * low
    while high - low > granularity:
        middle = (low + high) // 2 // granularity * granularity
        if middle <= low:
            break
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fits_on_gpu(cfg, device, precision, checkpointing):
    """fits(n): one eager train_step at micro-batch n (accum_steps 1) runs without running out of memory."""
    def fits(n):
        parts = None
        try:
            step_cfg = dataclasses.replace(cfg, accum_steps=1, grad_checkpointing=checkpointing)
            parts = build(step_cfg, device, precision, False, "inductor")
            images, tokens = synthetic_batch(n, parts[0].config, device)
            model, forward, ddp, optimizer, scaler, amp = parts
            train_clip.train_step(model, forward, ddp, optimizer, scaler, amp, images, tokens, cfg.lr, step_cfg).item()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del parts
            torch.cuda.empty_cache()
    return fits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "yfcc15m.yaml"), help="train_clip config: model, batch, accum_steps")
    parser.add_argument("--micro-batch", type=int, default=0, help="pairs per micro-batch (default: batch_size / accum_steps)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak, TFLOP/s (default: PEAK_TFLOPS by name)")
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--model", default="", help="a model.py preset instead of the config's (e.g. RN50)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, micro-batch 4, 2 steps, no compile, no fit search")
    args = parser.parse_args(argv)
    cfg = common.load_config(train_clip.Config, [args.config])
    cfg = dataclasses.replace(cfg, model=args.model or cfg.model)
    if args.dry_run:
        device, precision, compiles, steps, warmup = "cpu", "fp32", (False,), 2, 1
        args.peak_tflops = args.peak_tflops or 1.0  # a CPU has no bf16 tensor-core peak: MFU is a placeholder
        tiny = "tiny-rn" if model_config(cfg.model).resnet else "tiny"  # the same kind of tower, in miniature
        cfg = dataclasses.replace(cfg, model=tiny, batch_size=8, accum_steps=2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible: use --dry-run to check the script on the CPU")
        common.setup_distributed("cuda")  # what the trainer sets on CUDA (TF32)
        device, precision, compiles, steps, warmup = "cuda", "bf16", (False, True), args.steps, 3
        name = torch.cuda.get_device_name()
        args.peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
        if not args.peak_tflops:
            raise SystemExit(f"no bf16 peak known for {name}: pass --peak-tflops (its datasheet's dense bf16 TFLOP/s)")
    micro = args.micro_batch or (4 if args.dry_run else cfg.batch_size // cfg.accum_steps)
    accums = sorted({1, cfg.accum_steps})
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: numbers mean nothing)",
               "model": cfg.model, "precision": precision, "micro_batch": micro, "peak_tflops": args.peak_tflops,
               "torch": torch.__version__, "forward_gflop_per_pair": forward_flops(cfg.model, micro) / micro / 1e9,
               "runs": [], "largest_micro_batch": {}}
    print(json.dumps({k: v for k, v in results.items() if k not in ("runs", "largest_micro_batch")}), flush=True)
    started = time.perf_counter()
    for checkpointing in (False, True):
        for compiled in compiles:
            step_cfg = dataclasses.replace(cfg, grad_checkpointing=checkpointing)
            parts = build(step_cfg, device, precision, compiled, cfg.compile_backend)
            for accum in accums:
                run_cfg = dataclasses.replace(step_cfg, accum_steps=accum)
                batch = micro * accum
                images, tokens = synthetic_batch(batch, parts[0].config, device)
                seconds, peak = time_steps(parts, run_cfg, images, tokens, max(2, -(-steps // accum)), warmup)
                model_flops = step_flops(cfg.model, batch, accum, False)  # what the algorithm needs
                hardware_flops = step_flops(cfg.model, batch, accum, checkpointing)  # with recomputation
                run = {"grad_checkpointing": checkpointing, "compile": compiled, "accum_steps": accum, "batch": batch,
                       "step_s": seconds, "samples_per_s": batch / seconds, "gflop_per_pair": model_flops / batch / 1e9,
                       "mfu": model_flops / seconds / (args.peak_tflops * 1e12),
                       "hfu": hardware_flops / seconds / (args.peak_tflops * 1e12), "peak_memory_gib": peak}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # partial results survive a crash
            del parts
            if device == "cuda":
                torch.cuda.empty_cache()
    if device == "cuda":
        for checkpointing in (False, True):
            largest = largest_fitting(fits_on_gpu(cfg, device, precision, checkpointing), 256, 64)
            results["largest_micro_batch"]["checkpointing" if checkpointing else "plain"] = largest
            print(json.dumps({"grad_checkpointing": checkpointing, "largest_micro_batch": largest}), flush=True)
    results["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
