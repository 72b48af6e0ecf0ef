"""Loader throughput: shards.ShardLoader vs the webdataset library, same shards, transforms, tokenizer,
batch size and worker count, measured side by side in one run (best of 2 epochs each).

  python bench/bench_loader.py [--samples 1200] [--workers 2] [--image-size 64]

Prints samples/s for both and the ratio (goal >= 1.0). Images: 192x192 JPEG crops of real photos.
"""
import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import shards  # noqa: E402
from make_data import write_shards  # noqa: E402


def photos(n, size=192):
    from skimage import data as skdata

    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    for i in range(n):
        photo = sources[i % 3]
        y, x = (17 * i) % (photo.shape[0] - size), (31 * i) % (photo.shape[1] - size)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(photo[y : y + size, x : x + size])).save(buffer, "JPEG", quality=90)
        yield f"{i:06d}", {"jpg": buffer.getvalue(), "txt": f"a photo of thing number {i} on a table"}


def time_epoch(batches):
    start, n = time.perf_counter(), 0
    for images, _ in batches:
        n += images.shape[0]
    return n, n / (time.perf_counter() - start)


def ours(spec, transform, batch, workers, n):
    dataset = shards.ShardDataset(spec, transform, shuffle_buffer=1000)
    loader = shards.ShardLoader(dataset, batch, n // batch, workers)
    return ((b["images"], b["tokens"]) for b in loader.epoch_batches(0))


def theirs(spec, transform, batch, workers, n):
    import webdataset as wds

    pipeline = (wds.WebDataset(spec, shardshuffle=False, empty_check=False).shuffle(1000).decode("pil")
                .to_tuple("jpg", "txt").map_tuple(transform, lambda t: data.tokenize([t])[0]).batched(batch))
    return iter(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(tmp, photos(args.samples), per_shard=args.samples // 8)
        spec = f"{tmp}/{{00000..{len(shards) - 1:05d}}}.tar"
        transform = data.image_transform(args.image_size, "train")
        rates = {"kit": [], "webdataset": []}
        for _ in range(2):  # alternate, keep the best of each (the CPU is shared)
            for name, make in (("kit", ours), ("webdataset", theirs)):
                n, rate = time_epoch(make(spec, transform, args.batch, args.workers, args.samples))
                rates[name].append(rate)
    kit, ref = max(rates["kit"]), max(rates["webdataset"])
    print(f"{args.samples} samples ({n} per epoch), {args.workers} workers, batch {args.batch}, {args.image_size} px, 'train' transform + tokenize")
    print(f"kit ShardLoader:   {kit:8.1f} samples/s   (runs: {', '.join(f'{r:.1f}' for r in rates['kit'])})")
    print(f"webdataset 1.0.2:  {ref:8.1f} samples/s   (runs: {', '.join(f'{r:.1f}' for r in rates['webdataset'])})")
    print(f"ratio kit / webdataset: {kit / ref:.2f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
