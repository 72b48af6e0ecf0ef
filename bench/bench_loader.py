"""Stage-2 loader throughput: shards.Loader vs webdataset + torchvision, same shards, same workers,
same batch, the PI fork's MoCo v2 at 224 px (PIL's blur, as MoCo v2), alternating in one run (best
of the rounds each), on two sets of shards: web photos, and the same photos repacked at 256 px.

  python bench/bench_loader.py [--samples 1200] [--workers 2] [--batch 64] [--image-size 224]
                               [--device cpu] [--rounds 2]

Shards: JPEG photos of 400-500 px (scikit-image's astronaut, coffee, chelsea, rocket, ... resized
and cropped; quality 90), as YFCC15M's are; then the same shards through stage2/repack.py
(shortest side 256, quality 90), timed: its CPU time per image and bytes per image give the
estimate for a million images on 16 cores. On each set:
  kit          shards.Loader (decode, crop and resize in the workers, uint8 out) +
               TrainTransform.device_half on --device (jitter, grayscale, blur, normalisation,
               batched): what train_clip.py runs;
  kit, loader  the same without the device half: what the workers deliver, the host side of a GPU
               run (the goals: >= 1,000 samples per CPU-second on the photos, >= 2,000 on the
               repacked shards, >= 5x webdataset's);
  webdataset   wds.WebDataset -> shuffle -> decode("pil") -> data.image_transform(224, "moco")
               (torchvision with PIL's blur) -> tokenize -> batched, DataLoader with the same
               workers.
Where a sample's time goes: each stage timed alone in this process (one thread, the kit's own
functions, best of 3 passes): read (formats.read_unit: tar parsing, member bytes), decode
(augment.decode_jpeg; PIL's decode for the PIL path), crop and resize (the rest of host_half:
header, draw, resize_crop, flip), tokenise (formats.caption_tokens), collate (a parcel's copies in
the worker and the batch's concatenation in the main process); the loader's measured cost per
sample less their sum is the hand-over between processes and the loader's bookkeeping.
Host memory: the peak over the run of the summed PSS (proportional set size: shared pages counted
once) of the main process and its workers, above the same sum just after the first batch (both
pipelines hold --shuffle undecoded samples), in units of one batch of uint8 images (batch x 3 x S x
S bytes). Samples per CPU-second (all processes' user + system time, less the measuring thread's)
is the measure that survives a shared machine: wall rates there depend on the others' load.
Prints the ratios and goals last.
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
import simplejpeg
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from stage2 import augment  # noqa: E402
from stage2 import formats  # noqa: E402
from stage2 import repack  # noqa: E402
from stage2 import shards  # noqa: E402
from stage2.augment import TrainTransform  # noqa: E402
from world.make_data import write_shards  # noqa: E402

GOALS = {"photos": 1000, "repacked": 2000}  # kit, loader: samples per CPU-second
RATIO_GOAL = 5  # kit, loader / webdataset, per CPU-second


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
    exit keep their count), minus this thread's own, and their summed PSS every 0.1 s (peak).
    Only this thread reads PSS: reading a process's smaps walks its page tables, milliseconds of
    system time that would otherwise count against the pipeline measured."""

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
            self.sample(memory=ticks % 5 == 0)
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
        watch.sample()  # CPU times, before the workers exit with the last batch
    seconds = time.perf_counter() - start
    watch.running = False
    watch.join()
    return n / seconds, n / watch.cpu_used(), max(0, watch.peak - watch.base)



# --------------------------------------------------------------------------------------------------
# Where a sample's time goes: each stage alone, in this process, one thread
# --------------------------------------------------------------------------------------------------


def best_of(passes, run, samples):
    """ms per sample of run(samples), CPU time, the best of `passes` passes."""
    best = float("inf")
    for _ in range(passes):
        start = time.process_time()
        run(samples)
        best = min(best, time.process_time() - start)
    return 1000 * best / len(samples)


def stage_times(spec, args, passes=3):
    """{path: {stage: ms per sample}} for the kit's fast path and the PIL path (host_half_pil)."""
    units = formats.list_units(spec, progress=False)
    samples = [s for u in units for s in formats.read_unit(u)]
    transform, size = TrainTransform(args.image_size, "moco"), args.image_size
    seeds = range(len(samples))
    boxes = []
    for sample, seed in zip(samples, seeds):
        height, width = simplejpeg.decode_jpeg_header(sample["image"])[:2]
        box = transform.draw(width, height, seed)[0]
        shrink = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
        boxes.append((width, height, 8 if shrink >= 8 else 4 if shrink >= 4 else
                      2 if shrink >= 2 else 1))

    def read(_):
        for unit in units:
            for _ in formats.read_unit(unit):
                pass

    def decode(samples):
        for sample, (width, height, scale) in zip(samples, boxes):
            augment.decode_jpeg(sample["image"], width, height, scale)

    def decode_pil(samples):
        for sample in samples:
            Image.open(io.BytesIO(sample["image"])).convert("RGB")

    def host(samples):
        for sample, seed in zip(samples, seeds):
            transform.host_half(sample["image"], seed)

    def host_pil(samples):
        for sample, seed in zip(samples, seeds):
            transform.host_half_pil(io.BytesIO(sample["image"]), seed)

    def tokenise(samples):
        for sample in samples:
            formats.caption_tokens(sample)

    crops = [transform.host_half(s["image"], seed) for s, seed in zip(samples, seeds)]
    tokens = [formats.caption_tokens(s).numpy() for s in samples]

    def collate(_):  # as WorkerParcels._pack and Loader._batch do it, per batch of args.batch
        for first in range(0, len(crops), args.batch):
            batch = crops[first:first + args.batch]
            images = torch.empty((len(batch), 3, size, size), dtype=torch.uint8)
            for row, (image, _) in enumerate(batch):
                images[row] = image
            np.stack(tokens[first:first + args.batch])
            np.stack([params.numpy() for _, params in batch])
            torch.cat([images[:len(batch) // 2], images[len(batch) // 2:]])

    shared = {stage: best_of(passes, run, samples) for stage, run in
              (("read", read), ("tokenise", tokenise), ("collate", collate))}
    fast = {"decode": best_of(passes, decode, samples)}
    fast["crop and resize"] = best_of(passes, host, samples) - fast["decode"]
    pil = {"decode": best_of(passes, decode_pil, samples)}
    pil["crop and resize"] = best_of(passes, host_pil, samples) - pil["decode"]
    return {name: {"read": shared["read"], **image, "tokenise": shared["tokenise"],
                   "collate": shared["collate"]} for name, image in
            (("kit (libjpeg-turbo + torch resize)", fast), ("PIL path (host_half_pil)", pil))}


def print_stages(stages, loader_per_cpu_second, workers):
    names = list(next(iter(stages.values())))
    print(f"  where a sample's time goes, ms (one process, one thread): {' | '.join(names)} | sum")
    for path, times in stages.items():
        total = sum(times.values())
        print(f"    {path:36s} {' | '.join(f'{times[n]:.3f}' for n in names)} | {total:.3f} "
              f"({1000 / total:,.0f} samples per CPU-second)")
    fast = sum(next(iter(stages.values())).values())
    loader_ms = 1000 / loader_per_cpu_second
    print(f"    kit, loader with {workers} workers: {loader_ms:.3f} ms a sample; less the "
          f"stages: {loader_ms - fast:.3f} ms of hand-over between processes and bookkeeping")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def make_sets(tmp, args):
    """{set name: spec}: the photos as shards, and the same repacked (timed) -> (sets, repack
    summary)."""
    paths = write_shards(f"{tmp}/photos", photos(args.samples),
                         per_shard=max(1, args.samples // 16))
    spec = f"{tmp}/photos/{{00000..{len(paths) - 1:05d}}}.tar"
    summary = repack.repack(spec, f"{tmp}/repacked", 256, 90, workers=1, progress=False)
    return {"photos": spec, "repacked": summary["spec"]}, summary


def compare(spec, args):
    """{pipeline: [(samples/s, samples per CPU-second, peak memory) per round]}."""
    runs = {"kit": lambda: run_kit(spec, args, True),
            "kit, loader": lambda: run_kit(spec, args, False),
            "webdataset": lambda: run_webdataset(spec, args)}
    results = {name: [] for name in runs}
    for _ in range(args.rounds):  # alternate, keep the best of each (the CPU is shared)
        for name, make in runs.items():
            results[name].append(measure(make))
    return results


def report(name, spec, results, stages, args):
    batch_bytes = args.batch * 3 * args.image_size ** 2
    mb = np.mean([os.path.getsize(p) for p in formats.expand_spec(spec)]) / 2**20
    print(f"{name}: {len(formats.expand_spec(spec))} shards of {mb:.1f} MB")
    best = {}
    for pipeline, rows in results.items():
        rate, per_cpu, memory = (max(r[i] for r in rows) for i in range(3))
        best[pipeline] = rate, per_cpu
        print(f"  {pipeline:12s} {rate:7.1f} samples/s, {per_cpu:7.1f} samples per CPU-second "
              f"(runs: {', '.join(f'{r[0]:.1f}/{r[1]:.1f}' for r in rows)}); host memory above "
              f"start, peak: {memory / batch_bytes:5.1f} uint8 batches (runs: "
              f"{', '.join(f'{r[2] / batch_bytes:.1f}' for r in rows)})")
    print_stages(stages, best["kit, loader"][1], args.workers)
    return best


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
                             "shuffle buffer; webdataset: workers x its buffer), so memory "
                             "compares batches")
    args = parser.parse_args()
    # The main process only receives batches (and runs the kit's device half when --device cpu). Its
    # copies in several threads spin-wait on a loaded machine: one thread for both pipelines.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sets, packed = make_sets(tmp, args)
        measured = {name: (compare(spec, args), stage_times(spec, args))
                    for name, spec in sets.items()}
        print(f"{args.samples} samples, {args.workers} workers, batch {args.batch}, "
              f"{args.image_size} px, MoCo v2 + tokenize; kit device half on {args.device}; "
              f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
        best = {name: report(name, sets[name], *measured[name], args) for name in sets}
    print_repack(packed)
    for name, rates in best.items():
        for pipeline in ("kit", "kit, loader"):
            print(f"ratio {pipeline} / webdataset, {name}: samples/s "
                  f"{rates[pipeline][0] / rates['webdataset'][0]:.2f}, per CPU-second "
                  f"{rates[pipeline][1] / rates['webdataset'][1]:.2f}"
                  + (f" (goal >= {RATIO_GOAL})" if pipeline == "kit, loader" else ""))
    for name, goal in GOALS.items():
        rate = best[name]["kit, loader"][1]
        print(f"goal, {name}: kit, loader >= {goal:,} samples per CPU-second: {rate:,.0f} "
              f"({'met' if rate >= goal else 'not met'}); {args.workers} workers: "
              f"{best[name]['kit, loader'][0]:,.0f} samples/s")


def print_repack(summary):
    """stage2/repack.py's cost from this run, scaled to a million images on 16 cores."""
    per_image = summary["cpu_seconds"] / max(1, summary["samples"])
    print(f"repack (photos -> 256 px, quality 90, one process): {1000 * per_image:.2f} ms of CPU "
          f"an image; a million images on 16 cores: ~{1e6 * per_image / 16 / 60:.0f} minutes; "
          f"{summary['bytes_out'] / summary['samples'] / 1024:.1f} KiB an image (from "
          f"{summary['bytes_in'] / summary['samples'] / 1024:.1f}): "
          f"{summary['bytes_out'] / summary['samples'] * 1e6 / 2**30:.1f} GiB a million")



if __name__ == "__main__":
    main()
