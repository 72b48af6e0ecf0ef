"""Stage-2 loader throughput and host memory: shards.Loader vs webdataset + torchvision, same
shards, same workers, same batch, the PI fork's MoCo v2 at 224 px (PIL's blur, as MoCo v2),
alternating in one run (best of the rounds each).

  python bench/bench_loader.py [--samples 1200] [--workers 2] [--batch 64] [--image-size 224]
                               [--device cpu]

Images: JPEG photos of 400-500 px (scikit-image's astronaut, coffee, chelsea, rocket, ... resized
and cropped), as YFCC15M's are. Both pipelines decode, augment and tokenise every sample.
  kit          shards.Loader (crop + resize in the workers, uint8 out) + TrainTransform.device_half
               on --device (jitter, grayscale, blur, normalisation, batched): what train_clip.py
               runs;
  kit, loader  the same without the device half: what the workers deliver (on a GPU the device
               half costs little; on a CPU the main process pays it and shares the cores with the
               workers);
  webdataset   wds.WebDataset -> shuffle -> decode("pil") -> data.image_transform(224, "moco")
               (torchvision with PIL's blur) -> tokenize -> batched, DataLoader with the same
               workers.
Host memory: the peak over the run of the summed PSS (proportional set size: shared pages counted
once) of the main process and its workers, above the same sum just after the first batch (both
pipelines hold --shuffle undecoded samples), in units of one batch of uint8 images (batch x 3 x S x
S bytes). Samples per CPU-second (all processes' user + system time) is the measure that survives
a shared machine: wall rates there depend on the others' load. Prints the ratios last.
"""
import argparse
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from stage2 import shards  # noqa: E402
from stage2 import formats  # noqa: E402
from stage2.augment import TrainTransform  # noqa: E402
from world.make_data import write_shards  # noqa: E402


def photos(n, seed=0, quality=90):
    """JPEG photos with a long side of 400-500 px, different crops of scikit-image's pictures."""
    from skimage import data as skdata

    sources_ = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(),
                skdata.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = Image.fromarray(sources_[i % len(sources_)]).convert("RGB")
        long_side = int(rng.integers(400, 501))
        scale = long_side / max(photo.size) * 1.15
        photo = photo.resize((max(1, int(photo.width * scale)), max(1, int(photo.height * scale))),
                             Image.BICUBIC)
        w, h = (min(photo.width, long_side),
                min(photo.height, int(long_side * rng.uniform(0.66, 0.8))))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        buffer = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).save(buffer, "JPEG", quality=quality)
        yield f"{i:06d}", {"jpg": buffer.getvalue(),
                           "txt": f"a photo of thing number {i} on a table, seen from above"}


def pss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_seconds(path):
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except OSError:
        return None


class Watch(threading.Thread):
    """Samples the CPU time of this process and its children every 20 ms (last seen: workers that
    exit keep their count), minus this thread's own, and their summed PSS every 0.25 s (peak)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.base, self.running, self.cpu, self.cpu_base, self.tid = (
            0, None, True, {}, {}, None)

    def pids(self):
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        return [os.getpid(), *map(int, children)]

    def sample(self, memory=False):
        pids = self.pids()
        if memory:
            self.peak = max(self.peak, pss_bytes(pids))
        for pid in pids:
            seconds = cpu_seconds(f"/proc/{pid}/stat")
            if seconds is not None:
                self.cpu[pid] = seconds
        if self.tid is not None:
            self.cpu["watch"] = -(cpu_seconds(f"/proc/{os.getpid()}/task/{self.tid}/stat") or 0)

    def run(self):
        self.tid = threading.get_native_id()
        ticks = 0
        while self.running:
            self.sample(memory=ticks % 12 == 0)
            ticks += 1
            time.sleep(0.02)

    def mark(self):  # the baseline: workers started and the first batch made
        self.sample()
        self.base, self.peak, self.cpu_base = pss_bytes(self.pids()), 0, dict(self.cpu)

    def cpu_used(self):
        return sum(t - self.cpu_base.get(pid, 0) for pid, t in self.cpu.items())


def run_kit(spec, args, device_half):
    transform = TrainTransform(args.image_size, "moco")
    loader = shards.Loader(formats.list_units(spec, progress=False), transform, args.batch,
                           args.streams, workers=args.workers,
                           shuffle_buffer=max(1, args.shuffle // args.streams), device=args.device)
    return ((transform.device_half(b["images"], b["params"]) if device_half else b["images"],
             b["tokens"]) for b in loader.delivered_batches(0))


def run_webdataset(spec, args):
    import webdataset as wds

    transform = data.image_transform(args.image_size, "moco")
    pipeline = (wds.WebDataset(formats.expand_spec(spec), shardshuffle=False, empty_check=False)
                .shuffle(max(1, args.shuffle // args.workers))
                .decode("pil").to_tuple("jpg", "txt")
                .map_tuple(transform, lambda t: data.tokenize([t])[0])
                .batched(args.batch, partial=False))
    return iter(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=args.workers))


def measure(make):
    """-> (samples/s, samples per CPU-second of all processes, peak PSS above start), after the
    first batch."""
    watch = Watch()
    batches = make()
    next(batches)  # workers started and the first batch made: measuring starts here
    watch.mark()
    watch.start()
    n, start = 0, time.perf_counter()
    for images, _ in batches:
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        n += images.shape[0]
        watch.sample(memory=True)  # before the workers exit with the last batch
    seconds = time.perf_counter() - start
    watch.running = False
    watch.join()
    return n / seconds, n / watch.cpu_used(), max(0, watch.peak - watch.base)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shuffle", type=int, default=400,
                        help="undecoded samples held for shuffling, in all (kit: streams x "
                             "window; webdataset: workers x its buffer), so memory compares "
                             "batches")
    args = parser.parse_args()
    # The main process only receives batches (and runs the kit's device half when --device cpu). Its
    # copies in several threads spin-wait on a loaded machine: one thread for both pipelines.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(tmp, photos(args.samples), per_shard=max(1, args.samples // 16))
        spec = f"{tmp}/{{00000..{len(paths) - 1:05d}}}.tar"
        mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
        runs = {"kit": lambda: run_kit(spec, args, True),
                "kit, loader": lambda: run_kit(spec, args, False),
                "webdataset": lambda: run_webdataset(spec, args)}
        results = {name: [] for name in runs}
        for _ in range(args.rounds):  # alternate, keep the best of each (the CPU is shared)
            for name, make in runs.items():
                results[name].append(measure(make))
    batch_bytes = args.batch * 3 * args.image_size ** 2
    print(f"{args.samples} samples ({len(paths)} shards of {mb:.1f} MB), {args.workers} workers, "
          f"batch {args.batch}, {args.image_size} px, MoCo v2 + tokenize; kit device half on "
          f"{args.device}; torch threads {torch.get_num_threads()}")
    best = {}
    for name, rows in results.items():
        rate, per_cpu, memory = (max(r[i] for r in rows) for i in range(3))
        best[name] = rate, per_cpu
        print(f"{name:12s} {rate:7.1f} samples/s, {per_cpu:6.1f} samples per CPU-second (runs: "
              f"{', '.join(f'{r[0]:.1f}/{r[1]:.1f}' for r in rows)});  host memory above start, "
              f"peak: {memory / batch_bytes:5.1f} uint8 batches (runs: "
              f"{', '.join(f'{r[2] / batch_bytes:.1f}' for r in rows)})")
    for name in ("kit", "kit, loader"):
        print(f"ratio {name} / webdataset: samples/s {best[name][0] / best['webdataset'][0]:.2f}, "
              f"per CPU-second {best[name][1] / best['webdataset'][1]:.2f} (goal >= 2, moonshot 3)")


if __name__ == "__main__":
    main()
