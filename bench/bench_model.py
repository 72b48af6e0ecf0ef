"""One CLIP training step (forward, backward, AdamW) of the kit's ViT-B-32 against open_clip's.

    python bench/bench_model.py [--batch 8] [--rounds 5] [--precision bf16] [--threads 2]

Same batch, same threads, same precision, the two models alternating step by step in one run so that
machine noise hits both alike. Prints median seconds per step and the ratio kit / open_clip
(goal: <= 1.0, i.e. the kit is not slower). open_clip is a test/bench-only dependency.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
from data import tokenize  # noqa: E402


def make_step(clip, images, tokens, precision):
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-5)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    labels = torch.arange(images.shape[0])

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            image_features = F.normalize(clip.encode_image(images), dim=-1)
            text_features = F.normalize(clip.encode_text(tokens), dim=-1)
            logits = clip.logit_scale.exp() * image_features @ text_features.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    import open_clip

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = M.create_model(args.model).train()
    reference = open_clip.create_model(args.model, pretrained=None).train()
    reference.load_state_dict(ours.state_dict())
    size = ours.config.image_size
    images = torch.randn(args.batch, 3, size, size)
    tokens = tokenize([f"a photo of object number {i}, seen from the side"
                       for i in range(args.batch)])
    steps = {"kit": make_step(ours, images, tokens, args.precision),
             "open_clip": make_step(reference, images, tokens, args.precision)}
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up, not timed
        step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model}, batch {args.batch}, {args.precision}, {args.threads} threads, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    for name in steps:
        print(f"  {name:10s} {median[name]:.3f} s/step  ({args.batch / median[name]:.2f} img/s)")
    print(f"ratio kit / open_clip (time per step): {median['kit'] / median['open_clip']:.3f}  "
          "(goal <= 1.0)")


if __name__ == "__main__":
    main()
