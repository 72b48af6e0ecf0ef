"""Image-text shards for timing the trainer's data path (bench/gpu_session.sh's training step):
enough samples that a timed run stays inside one epoch, made from numpy and PIL alone (no download,
nothing beyond what train_clip.py itself needs), in the webdataset / img2dataset layout
(write_shards of world/make_data.py).

  python bench/make_bench_shards.py OUT_DIR [--samples 215040] [--per-shard 5120] [--size 256]
                                    [--distinct 2048]

Images: `--distinct` JPEGs (quality 90) of smooth random colour fields with fine noise, about the
size and decoding cost of a web photo of that side, repeated under new keys; captions: 8-20 words,
different for every sample. Epoch length: an epoch of batch B over S streams has
floor(floor(N / S) / (B / S)) steps, so N >= steps * B (+ S * B / S for the rounding) keeps
`steps` steps inside one epoch; the default, 215,040, covers 200 steps of 1,024 (204,800) with
room.
Written once: an existing OUT_DIR/sizes.json with at least --samples samples is kept.
"""
import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from world.make_data import write_shards  # noqa: E402

WORDS = ("a photo of the red blue green small large old new wooden metal glass bright dark city "
         "street river mountain dog cat bird car bicycle house tree flower beach market table "
         "window garden").split()


def photo_like(rng, size):
    """A smooth random colour field (bicubic from 6x6) with fine noise: JPEG sizes and decode
    times of photos."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--samples", type=int, default=215040)
    parser.add_argument("--per-shard", type=int, default=5120)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--distinct", type=int, default=2048,
                        help="distinct JPEGs, repeated under new keys")
    args = parser.parse_args(argv)
    sizes = Path(args.out_dir) / "sizes.json"
    if sizes.exists() and sum(json.loads(sizes.read_text()).values()) >= args.samples:
        print(json.dumps({"shards": str(args.out_dir),
                          "samples": sum(json.loads(sizes.read_text()).values()), "kept": True}))
        return
    started, rng = time.perf_counter(), np.random.default_rng(0)
    jpegs = [photo_like(rng, args.size) for _ in range(args.distinct)]

    def samples():
        for i in range(args.samples):
            caption = " ".join(rng.choice(WORDS, int(rng.integers(8, 21)))) + f" {i}"
            yield f"{i:08d}", {"jpg": jpegs[i % len(jpegs)], "txt": caption}

    paths = write_shards(args.out_dir, samples(), args.per_shard)
    print(json.dumps({"shards": str(args.out_dir), "samples": args.samples, "files": len(paths),
                      "mean_jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
