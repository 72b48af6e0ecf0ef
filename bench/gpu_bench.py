"""GPU training throughput, MFU and peak memory of train_clip's step for ViT-B/32 (< 5 minutes).

  python bench/gpu_bench.py [--out gpu_bench.json] [--peak-tflops 790] [--steps 10]
  python bench/gpu_bench.py --dry-run        # CPU, tiny model, 2 steps: checks the script runs

For each of bf16 x {eager, torch.compile} x {no checkpointing, gradient checkpointing}: find the batch
that fills ~85% of GPU memory (one probe step at batch 256, memory taken as linear in the batch),
time `--steps` steps after 3 warm-up steps on synthetic data (the loader is benched separately),
and report samples/s, MFU (44 GFLOPs per sample per step, REFERENCE.md section 5; peak default:
H200 ~790 TFLOP/s dense bf16 measured on a matmul, section 11; pass --peak-tflops for other GPUs,
e.g. 989 for H100 SXM's datasheet figure, 312 for A100) and peak memory. Results go to a JSON file.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import train_clip  # noqa: E402
from model import create_model  # noqa: E402

FLOPS_PER_SAMPLE = 44e9  # ViT-B/32 forward + backward per image-text pair (REFERENCE.md section 5)


def make_step(model_name, device, precision, compiled, checkpointing):
    torch.manual_seed(0)
    model = create_model(model_name).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(common.param_groups(model, 0.1), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=device == "cuda")
    scaler, amp = common.grad_scaler(device, precision), common.autocast(device, precision)
    train_model = torch.compile(model) if compiled else model

    def step(images, tokens):
        optimizer.zero_grad(set_to_none=True)
        loss = train_clip.accumulate_gradients(train_model, images, tokens, 1, amp, scaler)
        scaler.step(optimizer)
        scaler.update()
        return loss

    return model, step


def batch_of(n, config, device):
    images = torch.randn(n, 3, config.image_size, config.image_size, device=device)
    tokens = torch.randint(1, 49000, (n, config.context_length), device=device)
    tokens[:, 20] = 49407  # EOT
    return images, tokens


def measure(step, config, device, batch, steps, warmup=3):
    images, tokens = batch_of(batch, config, device)
    for _ in range(warmup):
        step(images, tokens)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(images, tokens)
    loss.item()  # waits for the GPU
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return batch * steps / seconds, peak


def fill_batch(model_name, device, precision, checkpointing, probe=256, fill=0.85, multiple=128):
    """Batch that fills `fill` of GPU memory: peak memory of one eager probe step, assumed linear."""
    model, step = make_step(model_name, device, precision, False, checkpointing)
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(*batch_of(probe, model.config, device))
    torch.cuda.synchronize()
    per_sample = (torch.cuda.max_memory_allocated() - static) / probe
    total = torch.cuda.get_device_properties(0).total_memory
    del model, step
    torch.cuda.empty_cache()
    return max(multiple, int((fill * total - static) / per_sample) // multiple * multiple)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak of the GPU, TFLOP/s")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, batch 4, 2 steps, no compile")
    args = parser.parse_args()
    if args.dry_run:
        device, model_name, precision, variants = "cpu", "tiny", "fp32", [(False, False), (False, True)]
    else:
        assert torch.cuda.is_available(), "no GPU: use --dry-run to check the script on the CPU"
        device, model_name, precision = "cuda", "ViT-B-32", "bf16"
        variants = [(False, False), (False, True), (True, False), (True, True)]
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "model": model_name,
               "precision": precision, "peak_tflops": args.peak_tflops, "flops_per_sample": FLOPS_PER_SAMPLE, "runs": []}
    batches = {}
    for compiled, checkpointing in variants:
        if checkpointing not in batches:
            batches[checkpointing] = 4 if args.dry_run else fill_batch(model_name, device, precision, checkpointing)
        model, step = make_step(model_name, device, precision, compiled, checkpointing)
        start = time.perf_counter()
        rate, peak = measure(step, model.config, device, batches[checkpointing], 2 if args.dry_run else args.steps)
        run = {"compile": compiled, "grad_checkpointing": checkpointing, "batch": batches[checkpointing],
               "samples_per_s": rate, "mfu": rate * FLOPS_PER_SAMPLE / (args.peak_tflops * 1e12), "peak_memory_gib": peak,
               "seconds": time.perf_counter() - start}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        del model, step
        if device == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # after each run: partial results survive
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
