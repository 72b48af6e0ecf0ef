"""Stage 1's data path on NIGHTS-sized images: the decode cache against decoding every epoch.

  python bench/bench_nights.py                   # 120 triplets of 768-px PNGs -> 224 px, 2 workers
  python bench/bench_nights.py --triplets 300 --workers 8 --epochs 5

Makes `--triplets` triplets of 768-px PNGs like NIGHTS' (crops of skimage's real photos, upscaled,
with noise so that PNG compression is as poor as on real images: NIGHTS holds ~58 GB in ~60k PNGs,
~1 MB each), once, in --dir. Then times epochs of stage 1's training loader exactly as
train_triplet.py builds it (triplets.train_loader, built once, workers kept; each batch through
triplets.model_input) over two datasets on the same files: cache=False (decode + resize every image
every epoch, the path before the cache) and cache=True (stage1/nights.py's uint8 cache). Epochs
alternate between the two after one warm-up epoch each (worker start-up), so load from other jobs
hits both alike. Prints the time per epoch of each, their ratio (goal: >= 10x), the one-off cost of
building the cache, and an ESTIMATE (arithmetic, not a measurement) of what the paper's stage-1
recipe then costs per epoch on a GPU. The PNGs sit in the page cache while timed, which favours
decoding every epoch (no disk reads).

The paper's recipe (PAPER): 16,000 train triplets, ~80% of NIGHTS' 20,019 triplets with >= 6 votes
(the split column decides); 32 epochs of batch 768, as the PI authors' nights_init_vitb32.json sets
them (github cheesepuff90/Brain_Initialization at commit 38f3395: 128 per device x "devices": 6, :13
and :66). That is the json's intent only: their src/train.py:525 puts the command line's devices
over it, and their launch_ddp.sh:8 passes 1, so a run of their stored code would step 128 at a time.
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from world.make_data import write_nights  # noqa: E402
from stage1.nights import NightsDataset  # noqa: E402
from stage1.triplets import model_input, train_loader  # noqa: E402

# NIGHTS' images are Stable Diffusion 2.1 PNGs (DreamSim: Fu et al. 2023, arXiv 2306.09344); 768 px
# is SD 2.1's output size (stabilityai/stable-diffusion-2-1's model card), assumed here: the dataset
# does not state it.
SOURCE_SIZE = 768
PAPER = {"train_triplets": 16_000,  # NIGHTS' train split (module docstring)
         "epochs": 32, "batch_size": 768}  # the PI authors' stage-1 recipe
# FLOP/s: an assumed achievable ceiling, 80% of NVIDIA's datasheet peak (H200 SXM: 989e12 dense
# bf16, as in bench/gpu_bench.py's PEAK_TFLOPS); not measured by this script.
H200_BF16_PEAK = 790e12


def make_images(root, n, seed=0):
    """n triplets of 768-px PNGs in NIGHTS' layout (the kit's writer): a crop of a real photo,
    upscaled, and two variations (blur, contrast, shift), each with its own noise."""
    import skimage.data

    photos = [getattr(skimage.data, name)()
              for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                           "retina", "hubble_deep_field")]
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)

    def noisy(image):
        pixels = (np.asarray(image, dtype=np.float32)
                  + noise.normal(0, 4, (SOURCE_SIZE, SOURCE_SIZE, 3)))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    def triplets():
        for i in range(n):
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            side = rng.randint(min(h, w) // 2, min(h, w))
            y, x = rng.randint(0, h - side), rng.randint(0, w - side)
            ref = Image.fromarray(photo[y:y + side, x:x + side]).resize((SOURCE_SIZE, SOURCE_SIZE),
                                                                        Image.BICUBIC)
            left = ref.filter(ImageFilter.GaussianBlur(rng.uniform(1, 4)))
            right = (ImageEnhance.Contrast(ref).enhance(rng.uniform(0.5, 1.5))
                     .rotate(rng.uniform(-10, 10)))
            yield {"ref": noisy(ref), "left": noisy(left), "right": noisy(right),
                   "left_vote": rng.randint(0, 6), "right_vote": 0, "split": "train",
                   "is_imagenet": False, "prompt": "An image of a photo"}

    rows = list(triplets())
    for row in rows:  # every row kept (6 votes), either side chosen
        row["right_vote"] = 6 - row["left_vote"]
    write_nights(root, rows)


def time_epoch(loader, epoch):
    """-> (seconds for the epoch, triplets, of those seconds the ones spent in model_input)."""
    start, normalising, count = time.perf_counter(), 0.0, 0
    loader.batch_sampler.set_epoch(epoch)
    for ref, left, right, p in loader:
        began = time.perf_counter()
        for images in (ref, left, right):
            # What the trainer does next (on the GPU there, where it is ~free).
            model_input(images, "cpu")
        normalising += time.perf_counter() - began
        count += len(p)
    return time.perf_counter() - start, count, normalising


def vit_b32_forward_flops(image_size=224, patch=32, width=768, layers=12, embed=512):
    """FLOPs (2 per multiply-add) of one ViT-B/32 vision-tower forward: patch embedding, per block
    qkv + out projection (4 d^2 per token), MLP (8 d^2), attention scores and mixing (2 T^2 d), the
    final projection. ~8.8 GFLOP, matching open_clip's 4.4 GMACs for the ViT-B-32 image tower."""
    tokens = (image_size // patch) ** 2 + 1
    macs = (tokens - 1) * 3 * patch * patch * width
    macs += layers * (tokens * 12 * width * width + 2 * tokens * tokens * width)
    return 2 * (macs + width * embed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triplets", type=int, default=120)
    parser.add_argument("--size", type=int, default=224, help="the model's input size")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3,
                        help="timed epochs of each, after a warm-up epoch")
    parser.add_argument("--dir", default="/tmp/bench_nights_768",
                        help="where the PNGs (and their cache) go; reused")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the main process only collates and normalises; workers decode

    root = Path(args.dir)
    prepare_images(root, args.triplets)
    plain, cached, build = build_cache(root, args.size, args.workers)
    per_epoch, loader_only, count = time_loaders(plain, cached, args, build)
    print_paper_estimate(per_epoch, loader_only, count, build, len(cached), args.workers)


def prepare_images(root, triplets):
    """The PNGs in `root` (made unless they are there for this many triplets), and their sizes."""
    if (not (root / "data.csv").exists()
            or len((root / "data.csv").read_text().splitlines()) != triplets + 1):
        start = time.perf_counter()
        make_images(root, triplets)
        print(f"made {triplets} triplets of {SOURCE_SIZE}-px PNGs "
              f"in {time.perf_counter() - start:.0f} s")
    pngs = sorted(root.glob("*/*/*.png"))
    print(f"{len(pngs)} PNGs, "
          f"{sum(p.stat().st_size for p in pngs) / len(pngs) / 1e6:.2f} MB each on average "
          f"(real NIGHTS: ~58 GB / ~60k images, ~1 MB)")


def build_cache(root, size, workers):
    """-> (the dataset that decodes every time, the cached one built from scratch, build seconds);
    checks that both give the same tensors."""
    for old in (root / "cache").glob("*"):
        old.unlink()  # time a build from scratch
    start = time.perf_counter()
    cached = NightsDataset(root, "train", size, workers=workers)
    build = time.perf_counter() - start
    plain = NightsDataset(root, "train", size, cache=False)
    print(f"cache built in {build:.1f} s with {workers} workers ({len(cached)} triplets, "
          f"{cached.cache_path.stat().st_size / 1e6:.0f} MB at {size} px)")
    assert all(torch.equal(a, b) for i in range(0, len(plain), 17)
               for a, b in zip(plain[i][:3], cached[i][:3]))
    return plain, cached, build


def time_loaders(plain, cached, args, build):
    """Epochs of both, alternating after a warm-up, printed -> (median seconds per epoch, the same
    less model_input, triplets per epoch), each {name: value} but the count."""
    loaders = {"decode every epoch": train_loader(plain, args.batch_size, 0, args.workers),
               "cache": train_loader(cached, args.batch_size, 0, args.workers)}
    for loader in loaders.values():
        time_epoch(loader, 0)  # warm-up: starts the workers (they then live across epochs)
    seconds, normalising = {name: [] for name in loaders}, {name: [] for name in loaders}
    for epoch in range(1, args.epochs + 1):
        for name, loader in loaders.items():
            elapsed, count, normalise = time_epoch(loader, epoch)
            seconds[name].append(elapsed)
            normalising[name].append(normalise)
    per_epoch = {name: statistics.median(s) for name, s in seconds.items()}
    loader_only = {name: statistics.median(a - b for a, b in zip(seconds[name], normalising[name]))
                   for name in loaders}
    ratio = per_epoch["decode every epoch"] / per_epoch["cache"]
    for name, s in seconds.items():
        print(f"{name:>20}: {per_epoch[name]:.3f} s per epoch of {count} triplets (median of "
              f"{', '.join(f'{x:.3f}' for x in s)}), {count / per_epoch[name]:.0f} triplets/s")
    print(f"cache / decode every epoch: {ratio:.1f}x faster per epoch (goal >= 10x), "
          f"with {args.workers} workers; "
          f"the build costs {build / per_epoch['decode every epoch']:.1f} decoding epochs, once")
    print(f"of the cached epoch, {per_epoch['cache'] - loader_only['cache']:.3f} s is model_input "
          f"on the CPU (on the device in training); "
          f"the loader alone: {loader_only['cache']:.3f} s")
    return per_epoch, loader_only, count


def print_paper_estimate(per_epoch, loader_only, count, build, cached_triplets, workers):
    """What the paper's recipe costs per epoch on one GPU (ESTIMATE: no GPU was measured)."""
    flops_per_triplet = 3 * 3 * vit_b32_forward_flops()  # 3 images; backward ~2x forward
    epoch_flops = PAPER["train_triplets"] * flops_per_triplet
    decode_per_triplet = per_epoch["decode every epoch"] * workers / count  # CPU-seconds
    cached_per_triplet = loader_only["cache"] * workers / count
    build_per_triplet = build * workers / cached_triplets
    print(f"\nESTIMATE for the paper's recipe (ViT-B/32, {PAPER['train_triplets']:,} train "
          f"triplets, {PAPER['epochs']} epochs, batch {PAPER['batch_size']}), "
          "not measured on a GPU:")
    print(f"  compute: {flops_per_triplet / 1e9:.0f} GFLOP per triplet (fwd + bwd of 3 images), "
          f"{epoch_flops / 1e15:.2f} PFLOP per epoch")
    for mfu in (0.3, 0.5):
        gpu = epoch_flops / (mfu * H200_BF16_PEAK)
        print(f"  one H200 at {mfu:.0%} of its {H200_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak: "
              f"{gpu:.1f} s per epoch, "
              f"{gpu * PAPER['epochs'] / 60:.1f} min for {PAPER['epochs']} epochs; it eats "
              f"{PAPER['train_triplets'] / gpu:,.0f} triplets/s")
    for cores in (16, 32):
        print(f"  data on {cores} cores at this machine's per-core rates (slower when it is "
              "shared): decoding every epoch "
              f"{PAPER['train_triplets'] * decode_per_triplet / cores:.0f} s per epoch; "
              "from the cache "
              f"{PAPER['train_triplets'] * cached_per_triplet / cores:.1f} s per epoch "
              "(+ a one-off build of "
              f"~{PAPER['train_triplets'] * build_per_triplet / cores:.0f} s)")


if __name__ == "__main__":
    main()
