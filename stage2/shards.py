"""Stage 2's streaming engine: units of image-text data -> one rank's batches, epoch by epoch.

  units = formats.list_units("/data/yfcc15m/{00000..01499}.tar")           # or parquet files
  loader = Loader(units, TrainTransform(224, "moco"), batch_size=6144, streams=64, workers=8)
  for batch in loader.epoch_batches(epoch, start_step):                    # uint8 images on the device
      images = loader.transform.device(batch["images"], batch["params"])   # augmented, normalised

  python shards.py SPEC [--batch_size N] [--image_size S] [--augment KIND] [--workers W] [--batches K]
                        [--device D]     # reads K batches as the trainer would; last line: JSON with the
                                         # workers' delivery rate apart from the device half's

The order of an epoch is a function of (seed, epoch) and the units' sample counts alone, never of
the number of ranks or workers (the idea of MosaicML streaming's elastic determinism):
  - the units are shuffled by (seed, epoch) and laid end to end: N raw positions;
  - S canonical streams (`streams`) each own a contiguous range of L = N // S positions; inside a
    stream, positions are permuted in windows of W (`window`, the shuffle buffer) by (seed, epoch,
    stream, window), a permutation known without reading any data;
  - global batch g takes positions [g*p, (g+1)*p) of every stream, p = batch_size / S, in stream
    order; an epoch has L // p steps. The N - S*L positions left over and each stream's short last
    batch are dropped (EpochPlan.dropped counts them);
  - rank r serves streams r, r + world, ...; each of its DataLoader workers serves some of those
    streams and hands over pieces of at most one micro-batch; the rank's batch is put together in
    stream order, so the number of workers cannot change it;
  - each sample's augmentation is seeded by (seed, epoch, raw position).
So the data position is (epoch, step): a resumed run, with any workers, or any ranks that divide S,
continues the same sample sequence, and skips whole consumed units without opening them (a partly
consumed one is entered at its first needed sample, formats.read_unit(unit, start)).

Bad samples are skipped and counted by reason (formats.SKIP_REASONS): a batch is then smaller, and
is padded to its nominal size with `valid` False rows (train_clip's loss masks them). A stream of
mostly bad samples stops with an error naming the files.

Why a file of its own: stage 2's engine (order, streams, workers, batching, resume, bad-data counts);
formats live in formats.py, the image pipeline in augment.py. Like data.py it knows nothing of the model.
"""
import argparse
import bisect
import hashlib
import json
import math
import random
import sys
import time

import torch

from stage2 import formats
from stage2.augment import NUM_PARAMS, TrainTransform
from stage2.formats import SKIP_REASONS

MIN_SAMPLES_BEFORE_FAILING = 50  # a rank stops once more than half of at least this many samples failed


def _seed(*parts):
    """A 64-bit seed from a tuple, the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class EpochPlan:
    """Where every raw position of one epoch goes; computed from counts alone, reads no data."""

    def __init__(self, units, seed, epoch, streams, batch_size, window):
        self.seed, self.epoch, self.streams, self.window = seed, epoch, streams, window
        order = list(range(len(units)))
        random.Random(_seed("units", seed, epoch)).shuffle(order)
        self.units = [units[i] for i in order]
        self.starts = [0]  # raw position of each unit's first sample; the last entry is N
        for unit in self.units:
            self.starts.append(self.starts[-1] + unit.samples)
        self.total = self.starts[-1]
        self.stream_length = self.total // streams  # L
        self.per_stream = batch_size // streams  # p: each stream's share of a global batch
        self.steps = self.stream_length // self.per_stream
        self.used = self.steps * self.per_stream  # positions of a stream that are read
        self.dropped = self.total - streams * self.used

    def locate(self, raw):
        """raw position -> (index into self.units, sample index inside it)."""
        u = bisect.bisect_right(self.starts, raw) - 1
        return u, raw - self.starts[u]

    def window_order(self, stream, w):
        """The permutation of window w of a stream: positions w*W + order[i], i = 0, 1, ..."""
        order = list(range(min(self.window, self.used - w * self.window)))
        random.Random(_seed("window", self.seed, self.epoch, stream, w)).shuffle(order)
        return order

    def raw_position(self, stream, j):
        """The raw position a stream reads j-th (j < self.used)."""
        w, i = divmod(j, self.window)
        return stream * self.stream_length + w * self.window + self.window_order(stream, w)[i]


class _Stream:
    """One stream's reader, inside a worker: holds the current window's raw (undecoded) samples."""

    def __init__(self, plan, stream, read_kwargs):
        self.plan, self.stream, self.read_kwargs = plan, stream, read_kwargs
        self.window_index, self.buffer, self.order = None, [], []
        self.raw, self.next_raw = None, None
        self.opened = []  # (unit, start) of every formats.read_unit call, for tests and logs

    def _raw_samples(self, raw):
        """One item per raw position from `raw` on: the sample dict, or the skip reason of a sample
        its unit failed to deliver (a unit that breaks off counts each missing sample)."""
        u, offset = self.plan.locate(raw)
        for unit in self.plan.units[u:]:
            delivered, reason = 0, "truncated_shard"
            if unit.samples > offset:
                self.opened.append((unit, offset))
                for sample in formats.read_unit(unit, offset, **self.read_kwargs):
                    if "problem" in sample:
                        reason = sample["problem"]
                        print(f"warning: {sample['source']}: {reason} ({sample['error']}); its remaining "
                              f"{unit.samples - offset - delivered} sample(s) are skipped", file=sys.stderr)
                        break
                    if offset + delivered >= unit.samples:
                        print(f"warning: {unit.path} holds more samples than its count {unit.samples} "
                              "(sizes.json / stats); the extra ones are not used", file=sys.stderr)
                        break
                    delivered += 1
                    yield sample
            for _ in range(unit.samples - offset - delivered):
                yield reason
            offset = 0

    def take(self, j0, j1):
        """(raw position, sample or skip reason) for the stream's positions j0 <= j < j1."""
        plan, W = self.plan, self.plan.window
        for j in range(j0, j1):
            w, i = divmod(j, W)
            if w != self.window_index:
                first = self.stream * plan.stream_length + w * W  # the window's raw range, read in order
                if self.next_raw != first:
                    self.raw = self._raw_samples(first)
                self.order = plan.window_order(self.stream, w)
                self.buffer = [next(self.raw) for _ in self.order]
                self.window_index, self.next_raw = w, first + len(self.order)
            local = self.order[i]
            sample, self.buffer[local] = self.buffer[local], None  # hand it over, free it here
            yield self.stream * plan.stream_length + w * W + local, sample


class _RankPieces(torch.utils.data.IterableDataset):
    """What runs in each DataLoader worker (or in the main process without workers): for each step,
    the samples of the worker's own streams, packed into pieces of at most one micro-batch. Every
    worker yields the same number of pieces per step (empty ones where it has fewer), so the
    DataLoader's round robin stays aligned with steps. (epoch, first step) is read from shared
    memory at each iteration's start, so persistent workers follow the main process."""

    def __init__(self, work):
        super().__init__()
        self.work = work
        self.state = torch.zeros(2, dtype=torch.long).share_memory_()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = self.state.tolist()
        work = self.work
        plan = work.plan(epoch)
        groups = work.groups(worker, workers)
        per_step = max(len(work.groups(w, workers)) for w in range(workers))
        readers = {s: _Stream(plan, s, work.read_kwargs) for s in work.local_streams[worker::workers]}
        for step in range(start, plan.steps):
            for group in groups:
                yield self._piece(plan, readers, step, group)
            for _ in range(per_step - len(groups)):
                yield {"parts": [], "step": step}

    def _piece(self, plan, readers, step, group):
        """The samples of `group` [(stream, chunk), ...] at `step`, decoded; parts [(stream, chunk,
        good samples)] tell the main process where each stream's samples lie."""
        work, p = self.work, plan.per_stream
        size = work.transform.image_size
        # Crops are written straight into one uint8 tensor in shared memory: the DataLoader then sends
        # a handle, and no list of crops, stacked copy or copy into shared memory doubles the piece.
        capacity = sum(min(work.chunk_size, p - chunk * work.chunk_size) for _, chunk in group)
        images, kept = torch.empty((capacity, 3, size, size), dtype=torch.uint8), 0
        if torch.utils.data.get_worker_info() is not None:
            images.share_memory_()
        tokens, params, positions, parts = [], [], [], []
        jpegs, boxes, jpeg_rows = [], [], []  # decode_on_device: JPEGs still encoded, and their rows
        skipped, bad_sources = [0] * len(SKIP_REASONS), []
        for stream, chunk in group:
            j0, good = step * p + chunk * work.chunk_size, 0
            for raw, sample in readers[stream].take(j0, min(step * p + p, j0 + work.chunk_size)):
                item = work.decode(sample, _seed("sample", plan.seed, plan.epoch, raw))
                if isinstance(item, str):
                    skipped[SKIP_REASONS.index(item)] += 1
                    if isinstance(sample, dict) and sample.get("source") not in bad_sources:
                        bad_sources.append(sample.get("source"))
                    continue
                if len(item) == 4:  # (jpeg, box, tokens, params)
                    jpegs.append(item[0])
                    boxes.append(item[1])
                    jpeg_rows.append(len(positions))
                else:
                    images[kept] = item[0]
                    kept += 1
                tokens.append(item[-2])
                params.append(item[-1])
                positions.append(raw)
                good += 1
            parts.append((stream, chunk, good))
        return {
            "parts": parts, "step": step,
            "images": images[:kept],  # a view: bad samples leave rows unused, never a copy
            "tokens": torch.stack(tokens) if tokens else torch.zeros(0, work.context_length, dtype=torch.long),
            "params": torch.stack(params) if params else torch.zeros(0, NUM_PARAMS),
            "positions": torch.tensor(positions, dtype=torch.long),
            "skipped": torch.tensor(skipped), "bad_sources": bad_sources[:5], "jpeg_rows": jpeg_rows,
            "jpegs": torch.cat(jpegs) if jpegs else torch.zeros(0, dtype=torch.uint8),  # one buffer: one hand-over
            "jpeg_lengths": [len(j) for j in jpegs], "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 5),
        }


class _Work:
    """What a worker needs to know (no DataLoader inside: workers are forked copies of it)."""

    def __init__(self, units, transform, batch_size, streams, rank, world_size, accum_steps, seed, window,
                 context_length, image_column, text_column, decode_on_device=False):
        self.units, self.transform, self.batch_size, self.streams = list(units), transform, batch_size, streams
        self.seed, self.window, self.context_length = seed, max(1, window), context_length
        self.decode_on_device = decode_on_device
        self.read_kwargs = {"image_column": image_column, "text_column": text_column}
        self.local_streams = list(range(rank, streams, world_size))
        per_stream, micro = batch_size // streams, max(1, batch_size // world_size // accum_steps)
        self.chunks = math.ceil(per_stream / micro)  # pieces per stream and step: each <= one micro-batch
        self.chunk_size = math.ceil(per_stream / self.chunks)
        self.micro = micro
        self._plans = {}

    def groups(self, worker, workers):
        """A worker's (stream, chunk) pieces of one step, packed greedily, in stream order, into
        groups of at most one micro-batch: fewer, larger hand-overs between processes."""
        groups, size = [], self.micro
        for stream in self.local_streams[worker::workers]:
            for chunk in range(self.chunks):
                n = min(self.chunk_size, self.batch_size // self.streams - chunk * self.chunk_size)
                if size + n > self.micro:
                    groups.append([])
                    size = 0
                groups[-1].append((stream, chunk))
                size += n
        return groups

    def plan(self, epoch):
        if epoch not in self._plans:
            self._plans = {epoch: EpochPlan(self.units, self.seed, epoch, self.streams, self.batch_size, self.window)}
        return self._plans[epoch]

    def decode(self, sample, seed):
        """A raw sample -> (uint8 image, tokens, params), or the skip reason (a str)."""
        if isinstance(sample, str):
            return sample  # a sample its unit did not deliver
        if sample.get("image") is None:
            return "no_image"
        tokens = formats.caption_tokens(sample, self.context_length)
        if isinstance(tokens, str):
            return tokens
        try:
            if self.decode_on_device:
                encoded = self.transform.host_encoded(sample["image"], seed)
                if len(encoded) == 3:  # a JPEG, still encoded, with its crop box: decoded on the device
                    return encoded[0], encoded[1], tokens, encoded[2]
                return encoded[0], tokens, encoded[1]
            image, params = self.transform.host(sample["image"], seed)
        except Exception:  # PIL raises many types for corrupt data; the sample is counted and skipped
            return "bad_image"
        return image, tokens, params


class Loader:
    """One rank's batches for training: `epoch_batches(epoch, start_step)` yields, for each step,
    {"images": uint8 (n, 3, S, S), "tokens": (n, T), "params": (n, NUM_PARAMS), "valid": bool (n,),
    "positions": (n,) raw positions (-1: padding), "skipped": (len(SKIP_REASONS),), "step": int}, on
    `device`, n = batch_size / world_size always (padded after bad samples). batch_size is GLOBAL.

    `decode_on_device`: workers send JPEGs undecoded (with their crop boxes) and torchvision.io.decode_jpeg
    decodes them on `device` (nvjpeg on CUDA); other images are decoded in the workers as usual.

    Host memory: workers hand over pieces of at most one micro-batch (batch_size / world_size /
    accum_steps) that go to the device one by one; at most `prefetch` pieces wait per worker."""

    def __init__(self, units, transform, batch_size, streams=64, rank=0, world_size=1, workers=0, accum_steps=1,
                 seed=0, window=1000, context_length=77, device="cpu", image_column="images", text_column="texts",
                 prefetch=2, decode_on_device=False, worker_init_fn=None):
        if batch_size % streams or streams % world_size:
            raise ValueError(f"streams ({streams}) must divide batch_size ({batch_size}) and be divisible by the "
                             f"number of ranks ({world_size}): set streams to e.g. {math.gcd(batch_size, 64)}")
        self.work = _Work(units, transform, batch_size, streams, rank, world_size, accum_steps, seed, window,
                          context_length, image_column, text_column, decode_on_device)
        self.transform, self.rank, self.workers = transform, rank, workers
        self.device, self.rank_batch = torch.device(device), batch_size // world_size
        self.pieces = _RankPieces(self.work)
        self.dataloader = torch.utils.data.DataLoader(
            self.pieces, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
            worker_init_fn=worker_init_fn)  # the trainer's: workers leave SIGTERM / SIGINT to its loop
        self.good, self.bad, self.bad_sources = 0, 0, []

    def plan(self, epoch):
        return self.work.plan(epoch)

    @property
    def steps_per_epoch(self):
        return self.plan(0).steps  # the same every epoch: it depends on the total count only

    def _decode_on_device(self, piece):
        """A piece's images on the device, in row order: those its worker decoded, and its JPEGs decoded
        here. A JPEG that does not decode is counted as bad_image and its row dropped from the piece (its
        tokens, params, position and part), as a worker drops an image PIL cannot read. Rows are placed
        with index_copy_ and pinned, non-blocking index copies: nothing here waits for the step in flight."""
        jpegs = list(piece["jpegs"].split(piece["jpeg_lengths"]))
        decoded, failed = self.transform.device_decode(jpegs, piece["boxes"], self.device)
        rows, n = piece["jpeg_rows"], len(piece["positions"])
        if failed:
            dropped = {rows[i] for i in failed}
            keep = torch.tensor([r for r in range(n) if r not in dropped], dtype=torch.long)
            for key in ("tokens", "params", "positions"):
                piece[key] = piece[key][keep]
            piece["skipped"][SKIP_REASONS.index("bad_image")] += len(dropped)
            parts, first = [], 0
            for stream, chunk, good in piece["parts"]:
                parts.append((stream, chunk, good - sum(first <= r < first + good for r in dropped)))
                first += good
            piece["parts"] = parts
            new_row = {r: r - sum(d < r for d in dropped) for r in range(n) if r not in dropped}
            rows = [new_row[r] for r in rows if r not in dropped]
            n -= len(dropped)
        size = self.transform.image_size
        images = torch.empty((n, 3, size, size), dtype=torch.uint8, device=self.device)
        jpeg_rows = set(rows)
        host_rows = [r for r in range(n) if r not in jpeg_rows]
        pinned = self.device.type == "cuda"
        if host_rows:
            host_images = piece["images"].to(self.device, non_blocking=True)
            index = torch.tensor(host_rows, dtype=torch.long, pin_memory=pinned).to(self.device, non_blocking=True)
            images.index_copy_(0, index, host_images)
        if rows:
            index = torch.tensor(rows, dtype=torch.long, pin_memory=pinned).to(self.device, non_blocking=True)
            images.index_copy_(0, index, decoded)
        return images

    def epoch_batches(self, epoch, start_step=0):
        plan = self.plan(epoch)
        self.pieces.state.copy_(torch.tensor([epoch, start_step]))
        pieces = iter(self.dataloader) if self.workers > 0 else iter(self.pieces)
        work, workers = self.work, max(1, self.workers)
        per_step = workers * max(len(work.groups(w, workers)) for w in range(workers))
        for step in range(start_step, plan.steps):
            got, skipped = {}, torch.zeros(len(SKIP_REASONS), dtype=torch.long)
            for _ in range(per_step):
                piece = next(pieces)
                assert piece["step"] == step, (piece["step"], step)  # the round robin is in step
                if not piece["parts"]:
                    continue
                self.bad_sources = (self.bad_sources + [s for s in piece["bad_sources"] if s not in self.bad_sources])[-5:]
                images = self._decode_on_device(piece) if piece["jpeg_rows"] else None  # may drop undecodable rows
                skipped += piece["skipped"]
                on_device = {k: piece[k].to(self.device, non_blocking=True) for k in ("tokens", "params", "positions")}
                on_device["images"] = piece["images"].to(self.device, non_blocking=True) if images is None else images
                first = 0
                for stream, chunk, n in piece["parts"]:
                    got[stream, chunk] = {k: v[first:first + n] for k, v in on_device.items()}
                    first += n
            ordered = [got[s, c] for s in work.local_streams for c in range(work.chunks)]  # canonical order
            batch = {k: torch.cat([o[k] for o in ordered]) for k in ordered[0]}
            slots = self._slots(plan, {s: sum(len(got[s, c]["positions"]) for c in range(work.chunks)) for s in work.local_streams})
            n, pad = len(batch["positions"]), self.rank_batch - len(batch["positions"])
            self.good, self.bad = self.good + n, self.bad + int(skipped.sum())
            if self.bad >= MIN_SAMPLES_BEFORE_FAILING and self.bad > self.good:
                raise RuntimeError(f"most samples fail to load ({self.bad} bad, {self.good} good on rank {self.rank}; "
                                   f"{dict(zip(SKIP_REASONS, skipped.tolist()))} in the last batch), e.g. in "
                                   f"{', '.join(map(str, self.bad_sources))}. Check the data: images and captions")
            if pad:
                batch = {k: torch.cat([v, v.new_full((pad, *v.shape[1:]), -1 if k == "positions" else 0)]) for k, v in batch.items()}
            batch["valid"] = batch["positions"] >= 0
            yield {**batch, "slots": slots, "skipped": skipped, "step": step}

    def _slots(self, plan, good):
        """Each row's position in the GLOBAL batch, which names its contrastive group (contrastive.py):
        stream s's share is positions s * p ... s * p + p - 1; its `good[s]` samples take the first of
        them and the padding rows (at the batch's end) the rest, so no rank or worker count moves a row."""
        p = plan.per_stream
        filled = [torch.arange(s * p, s * p + good[s]) for s in self.work.local_streams]
        empty = [torch.arange(s * p + good[s], s * p + p) for s in self.work.local_streams]
        return torch.cat(filled + empty).to(self.device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------
# The check command: read batches as the trainer would, before renting GPUs
# ---------------------------------------------------------------------------------------------------


def check(argv=None):
    parser = argparse.ArgumentParser(description="Read batches of SPEC as train_clip.py would; the last line is JSON.")
    parser.add_argument("spec", help="tar or parquet files: braces, several specs joined by '::'")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--augment", default="moco", choices=("moco", "train", "eval"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--shuffle_buffer", type=int, default=1000)
    parser.add_argument("--image_column", default="images")
    parser.add_argument("--text_column", default="texts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--decode_on_device", action="store_true", help="JPEGs decoded on --device (nvjpeg on cuda)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    try:
        units = formats.list_units(args.spec, image_column=args.image_column, text_column=args.text_column)
        streams = math.gcd(args.streams, args.batch_size)
        loader = Loader(units, TrainTransform(args.image_size, args.augment), args.batch_size, streams,
                        workers=args.workers, seed=args.seed, window=args.shuffle_buffer, device=args.device,
                        image_column=args.image_column, text_column=args.text_column,
                        decode_on_device=args.decode_on_device)
        plan = loader.plan(args.epoch)
        print(f"{len(units)} units, {plan.total} samples: {plan.steps} batches of {args.batch_size} an epoch over "
              f"{streams} streams ({plan.dropped} left over)", file=sys.stderr)
        if plan.steps == 0:
            raise ValueError(f"{args.spec}: {plan.total} samples do not fill one batch of {args.batch_size}")
        # Two halves, timed apart. Delivery: the workers decode, crop and tokenise, and the batch reaches
        # --device: what a GPU would be fed (timed from the start, the workers' start-up included, so a
        # short run reads low, never high). Device: augmentation and normalisation on --device, timed
        # afterwards on the last batch. On a CPU-only machine the device half runs on the same cores and
        # would otherwise hide the delivery rate.
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        batches, samples, start = 0, 0, time.perf_counter()
        bar = tqdm(total=min(args.batches, plan.steps), desc="batches", file=sys.stderr)
        for batch in loader.epoch_batches(args.epoch):
            batches, samples, skipped = batches + 1, samples + int(batch["valid"].sum()), skipped + batch["skipped"]
            bar.update()
            bar.set_postfix({r: n for r, n in zip(SKIP_REASONS, skipped.tolist()) if n})
            if batches >= args.batches:
                break
        delivery_seconds = time.perf_counter() - start
        bar.close()
        repeats, device_start = min(args.batches, 5), time.perf_counter()
        for _ in range(repeats):
            images = loader.transform.device(batch["images"], batch["params"])
            if images.device.type == "cuda":
                torch.cuda.synchronize()
        device_rate = repeats * len(batch["images"]) / (time.perf_counter() - device_start)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    delivery_rate = samples / max(delivery_seconds, 1e-9)
    print(f"delivery: {delivery_rate:.0f} samples/s from {max(args.workers, 1)} worker(s) ({delivery_rate / max(args.workers, 1):.0f} "
          f"each); device half on {args.device}: {device_rate:.0f} samples/s", file=sys.stderr)
    print(json.dumps({"batches": batches, "samples": samples,
                      "delivery_samples_per_s": round(delivery_rate, 1),
                      "delivery_samples_per_s_per_worker": round(delivery_rate / max(args.workers, 1), 1),
                      "device_samples_per_s": round(device_rate, 1),
                      "samples_per_s": round(1 / (1 / max(delivery_rate, 1e-9) + 1 / device_rate), 1),  # one after the other
                      "seconds": round(delivery_seconds, 2), "skipped": dict(zip(SKIP_REASONS, skipped.tolist())),
                      "units": len(units), "samples_per_epoch": plan.total, "steps_per_epoch": plan.steps,
                      "dropped_per_epoch": plan.dropped, "image_mean": round(float(images.float().mean()), 4)}))


if __name__ == "__main__":
    check()
