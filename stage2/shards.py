"""Stage 2's streaming engine: units of image-text data -> one rank's batches, epoch by epoch.

  units = formats.list_units("/data/yfcc15m/{00000..01499}.tar")        # or parquet files
  loader = Loader(units, TrainTransform(224, "moco"), batch_size=6144, streams=64, workers=8)
  for batch in loader.epoch_batches(epoch, first_step):   # augmented images, tokens, on the device
      ...

  python -m stage2.shards SPEC [--batch_size N] [--image_size S] [--augment KIND] [--workers W]
                          [--batches K] [--device D]   # reads K batches as the trainer would; the
                                                       # last line is JSON (check(), at the end)

The order of an epoch is a function of (seed, epoch) and the units' sample counts alone, never of
the number of ranks or workers (the idea of MosaicML streaming's elastic determinism):
  - the units are shuffled by (seed, epoch) and laid end to end: sample indices 0 .. N - 1;
  - S canonical streams (`streams`) each own a contiguous range of L = N // S indices; inside a
    stream, indices are permuted in buffers of B (`shuffle_buffer`) by (seed, epoch, stream,
    buffer), a permutation known without reading any data;
  - global batch g takes the stream's reads [g*p, (g+1)*p) of every stream, p = batch_size / S, in
    stream order; an epoch has L // p steps. The N - S*L indices left over and each stream's short
    last batch are dropped (EpochPlan.dropped counts them);
  - rank r serves streams r, r + world, ...; each of its DataLoader workers serves some of those
    streams and hands over parcels of at most one micro-batch; the rank's batch is put together in
    stream order, so the number of workers cannot change it;
  - each sample's augmentation is seeded by (seed, epoch, sample index).
So the data position is (epoch, step): a resumed run, with any workers, or any ranks that divide S,
continues the same sample sequence, and skips whole consumed units without opening them (a partly
consumed one is entered at its first needed sample, formats.read_unit(unit, start)).

One sample's way, in the order the code runs it: a worker's WorkerParcels reads its stream's buffer
(StreamReader.take -> formats.read_unit), decodes it (decode_sample: formats.caption_tokens and the
augmentation's host half) into a shared-memory parcel; Loader.delivered_batches puts the parcels of
a step together in stream order on the device; Loader.epoch_batches applies the device half.

Bad samples are skipped and counted by reason (formats.SKIP_REASONS): a batch is then smaller, and
is padded to its nominal size with `valid` False rows (the loss masks them). A stream of mostly bad
samples stops with an error naming the files.
"""
import argparse
import bisect
import hashlib
import json
import math
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from stage2 import formats
from stage2.augment import NUM_PARAMS, TrainTransform
from stage2.formats import SKIP_REASONS

MIN_SAMPLES_BEFORE_FAILING = 50  # a rank stops once more than half of at least this many failed


def _seed(*parts):
    """A 64-bit seed from a tuple, the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class EpochPlan:
    """Where every sample index of one epoch goes; computed from counts alone, reads no data."""

    def __init__(self, units, seed, epoch, streams, batch_size, shuffle_buffer):
        self.seed, self.epoch, self.streams, self.buffer = seed, epoch, streams, shuffle_buffer
        order = list(range(len(units)))
        random.Random(_seed("units", seed, epoch)).shuffle(order)
        self.units = [units[i] for i in order]
        self.starts = [0]  # sample index of each unit's first sample; the last entry is N
        for unit in self.units:
            self.starts.append(self.starts[-1] + unit.samples)
        self.total = self.starts[-1]
        self.stream_length = self.total // streams  # L
        self.per_stream = batch_size // streams  # p: each stream's share of a global batch
        self.steps = self.stream_length // self.per_stream
        self.used = self.steps * self.per_stream  # the reads of a stream that go into batches
        self.dropped = self.total - streams * self.used

    def locate(self, index):
        """sample index -> (index into self.units, sample number inside that unit)."""
        u = bisect.bisect_right(self.starts, index) - 1
        return u, index - self.starts[u]

    def buffer_order(self, stream, b):
        """The permutation of buffer b of a stream: its read i is index b*B + order[i] of it."""
        order = list(range(min(self.buffer, self.used - b * self.buffer)))
        # "window": the name the seed was first drawn with; kept, so every order stays the same
        random.Random(_seed("window", self.seed, self.epoch, stream, b)).shuffle(order)
        return order

    def sample_index(self, stream, j):
        """The sample index a stream reads j-th (j < self.used)."""
        b, i = divmod(j, self.buffer)
        return stream * self.stream_length + b * self.buffer + self.buffer_order(stream, b)[i]


class StreamReader:
    """One stream's reader, inside a worker: holds the current buffer's raw (undecoded) samples."""

    def __init__(self, plan, stream, read_kwargs):
        self.plan, self.stream, self.read_kwargs = plan, stream, read_kwargs
        self.buffer_number, self.buffer, self.order = None, [], []
        self.samples, self.next_index = None, None
        self.opened = []  # (unit, start) of every formats.read_unit call, for tests and logs

    def take(self, j0, j1):
        """(sample index, raw sample or skip reason) for the stream's reads j0 <= j < j1."""
        plan, size = self.plan, self.plan.buffer
        for j in range(j0, j1):
            b, i = divmod(j, size)
            if b != self.buffer_number:
                first = self.stream * plan.stream_length + b * size  # the buffer, read in order
                if self.next_index != first:
                    self.samples = self._read_from(first)
                self.order = plan.buffer_order(self.stream, b)
                self.buffer = [next(self.samples) for _ in self.order]
                self.buffer_number, self.next_index = b, first + len(self.order)
            local = self.order[i]
            sample, self.buffer[local] = self.buffer[local], None  # hand it over, free it here
            yield self.stream * plan.stream_length + b * size + local, sample

    def _read_from(self, index):
        """One item per sample index from `index` on: the raw sample, or the skip reason of a
        sample its unit failed to deliver (a unit that breaks off counts each missing sample)."""
        u, offset = self.plan.locate(index)
        for unit in self.plan.units[u:]:
            delivered, reason = 0, "truncated_shard"
            if unit.samples > offset:
                self.opened.append((unit, offset))
                for sample in formats.read_unit(unit, offset, **self.read_kwargs):
                    if "problem" in sample:
                        reason = sample["problem"]
                        print(f"warning: {sample['source']}: {reason} ({sample['error']}); its "
                              f"remaining {unit.samples - offset - delivered} sample(s) are "
                              "skipped", file=sys.stderr)
                        break
                    if offset + delivered >= unit.samples:
                        print(f"warning: {unit.path} holds more samples than its count "
                              f"{unit.samples} (sizes.json / stats); the extra ones are not used",
                              file=sys.stderr)
                        break
                    delivered += 1
                    yield sample
            for _ in range(unit.samples - offset - delivered):
                yield reason
            offset = 0


def decode_sample(sample, transform, context_length, seed, decode_on_device=False):
    """A raw sample -> (uint8 image, tokens, params), or (JPEG bytes, crop box, tokens, params) when
    the JPEG is decoded on the device, or the skip reason (a str)."""
    if isinstance(sample, str):
        return sample  # a sample its unit did not deliver
    if sample.get("image") is None:
        return "no_image"
    tokens = formats.caption_tokens(sample, context_length)
    if isinstance(tokens, str):
        return tokens
    try:
        if decode_on_device:
            encoded = transform.host_half_encoded(sample["image"], seed)
            if len(encoded) == 3:  # a JPEG, still encoded, with its crop box
                return encoded[0], encoded[1], tokens, encoded[2]
            return encoded[0], tokens, encoded[1]
        image, params = transform.host_half(sample["image"], seed)
    except Exception:  # PIL raises many types for corrupt data; the sample is counted and skipped
        return "bad_image"
    return image, tokens, params


class WorkerParcels(torch.utils.data.IterableDataset):
    """What runs in each DataLoader worker (or in the main process without workers): for each step,
    the samples of the worker's own streams, packed into parcels of at most one micro-batch. Every
    worker yields the same number of parcels per step (empty ones where it has fewer), so the
    DataLoader's round robin stays aligned with steps. (epoch, first step) is read from shared
    memory at each iteration's start, so persistent workers follow the main process."""

    def __init__(self, units, transform, batch_size, streams, rank, world_size, accum_steps, seed,
                 shuffle_buffer, context_length, image_column, text_column, decode_on_device=False,
                 prefetch=2):
        super().__init__()
        self.prefetch = prefetch  # the DataLoader's prefetch_factor: parcels made ahead
        self.units, self.transform, self.batch_size, self.streams = (
            list(units), transform, batch_size, streams)
        self.seed, self.shuffle_buffer = seed, max(1, shuffle_buffer)
        self.context_length, self.decode_on_device = context_length, decode_on_device
        self.read_kwargs = {"image_column": image_column, "text_column": text_column}
        self.local_streams = list(range(rank, streams, world_size))
        per_stream, micro = batch_size // streams, max(1, batch_size // world_size // accum_steps)
        self.chunks = math.ceil(per_stream / micro)  # pieces per stream and step, each <= micro
        self.chunk_size = math.ceil(per_stream / self.chunks)
        self.micro = micro
        self._plans = {}
        self.state = torch.zeros(2, dtype=torch.long).share_memory_()  # (epoch, first step)

    def plan(self, epoch):
        if epoch not in self._plans:
            self._plans = {epoch: EpochPlan(self.units, self.seed, epoch, self.streams,
                                            self.batch_size, self.shuffle_buffer)}
        return self._plans[epoch]

    def parcels(self, worker, workers):
        """A worker's (stream, chunk) pieces of one step, packed greedily, in stream order, into
        parcels of at most one micro-batch: fewer, larger hand-overs between processes."""
        parcels, size = [], self.micro
        for stream in self.local_streams[worker::workers]:
            for chunk in range(self.chunks):
                n = min(self.chunk_size, self.batch_size // self.streams - chunk * self.chunk_size)
                if size + n > self.micro:
                    parcels.append([])
                    size = 0
                parcels[-1].append((stream, chunk))
                size += n
        return parcels

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = self.state.tolist()
        plan = self.plan(epoch)
        mine = self.parcels(worker, workers)
        per_step = max(len(self.parcels(w, workers)) for w in range(workers))
        readers = {s: StreamReader(plan, s, self.read_kwargs)
                   for s in self.local_streams[worker::workers]}
        # Crops are written straight into a uint8 tensor in shared memory: the DataLoader then
        # sends a handle, and no list of crops, stacked copy or copy into shared memory doubles it.
        # The tensors are a ring, reused: a fresh one costs ~0.13 ms a sample (a shared-memory file,
        # page faults in both processes; measured with 2 workers). The DataLoader gives a worker
        # its next parcel to make only once the main process has taken the one `prefetch` parcels
        # back, and the main process copies a step's batch out (Loader._batch's torch.cat, or the
        # pinned copy on CUDA) before it takes the next step's parcels: so with per_step + prefetch
        # tensors, none is written while its crops are still to be copied.
        ring = [None] * (per_step + self.prefetch)
        capacity = max([self._capacity(plan, parcel) for parcel in mine] or [0])
        for step in range(start, plan.steps):
            for position, parcel in enumerate(mine):
                slot = ((step - start) * per_step + position) % len(ring)
                if ring[slot] is None:
                    ring[slot] = self._images(capacity)
                yield self._pack(plan, readers, step, parcel, ring[slot])
            for _ in range(per_step - len(mine)):
                yield {"parts": [], "step": step}

    def _capacity(self, plan, parcel):
        p = plan.per_stream
        return sum(min(self.chunk_size, p - chunk * self.chunk_size) for _, chunk in parcel)

    def _images(self, capacity):
        size = self.transform.image_size
        images = torch.empty((capacity, 3, size, size), dtype=torch.uint8)
        return images.share_memory_() if torch.utils.data.get_worker_info() is not None else images

    def _pack(self, plan, readers, step, parcel, images):
        """The samples of `parcel` [(stream, chunk), ...] at `step`, decoded, their crops written
        into `images`; parts [(stream, chunk, good samples)] tell the main process where each
        stream's samples lie."""
        p, kept = plan.per_stream, 0
        tokens, params, indices, parts = [], [], [], []
        jpegs, boxes, jpeg_rows = [], [], []  # decode_on_device: JPEGs still encoded, their rows
        skipped, bad_sources = [0] * len(SKIP_REASONS), []
        for stream, chunk in parcel:
            j0, good = step * p + chunk * self.chunk_size, 0
            for index, sample in readers[stream].take(j0, min(step * p + p, j0 + self.chunk_size)):
                item = decode_sample(sample, self.transform, self.context_length,
                                     _seed("sample", plan.seed, plan.epoch, index),
                                     self.decode_on_device)
                if isinstance(item, str):
                    skipped[SKIP_REASONS.index(item)] += 1
                    if isinstance(sample, dict) and sample.get("source") not in bad_sources:
                        bad_sources.append(sample.get("source"))
                    continue
                if len(item) == 4:  # (jpeg, box, tokens, params)
                    jpegs.append(item[0].numpy())
                    boxes.append(item[1].numpy())
                    jpeg_rows.append(len(indices))
                else:
                    images[kept] = item[0]  # the copy makes a strided crop contiguous
                    kept += 1
                tokens.append(item[-2].numpy())
                params.append(item[-1].numpy())
                indices.append(index)
                good += 1
            parts.append((stream, chunk, good))
        # Everything but the images goes as numpy arrays, pickled with the parcel: a tensor would
        # be moved to shared memory and its file descriptor passed over a socket of its own, ~0.3
        # ms in each process for each of the five (measured by cProfile of a 2-worker loader).
        return {
            "parts": parts, "step": step,
            "images": images[:kept],  # a view: bad samples leave rows unused, never a copy
            "tokens": (np.stack(tokens) if tokens
                       else np.zeros((0, self.context_length), dtype=np.int64)),
            "params": np.stack(params) if params else np.zeros((0, NUM_PARAMS), dtype=np.float32),
            "indices": np.array(indices, dtype=np.int64),
            "skipped": np.array(skipped, dtype=np.int64), "bad_sources": bad_sources[:5],
            "jpeg_rows": jpeg_rows,
            # decode_on_device: the JPEGs in one buffer, one hand-over
            "jpegs": np.concatenate(jpegs) if jpegs else np.zeros(0, dtype=np.uint8),
            "jpeg_lengths": [len(j) for j in jpegs],
            "boxes": np.stack(boxes) if boxes else np.zeros((0, 5), dtype=np.float32),
        }


def _as_is(parcel):
    """The DataLoader's collate_fn: a parcel goes to the main process as WorkerParcels made it."""
    return parcel


class Loader:
    """One rank's batches for training. batch_size is GLOBAL; n = batch_size / world_size rows
    always (padded after bad samples), on `device`:
      delivered_batches(epoch, first step): what the workers deliver, for each step {"images":
        uint8 (n, 3, S, S), "tokens": (n, T), "params": (n, NUM_PARAMS), "valid": bool (n,),
        "indices": (n,) sample indices (-1: padding), "slots": (n,) positions in the global batch,
        "skipped": (len(SKIP_REASONS),), "step": int, "good": the rows that hold a sample, int};
      epoch_batches(epoch, first step): the same with the images augmented and normalised (the
        augmentation's device half): what train_clip.py trains on.

    `decode_on_device`: workers send JPEGs undecoded (with their crop boxes) and
    torchvision.io.decode_jpeg decodes them on `device` (nvjpeg on CUDA); other images are decoded
    in the workers as usual.

    Host memory: workers hand over parcels of at most one micro-batch (batch_size / world_size /
    accum_steps) that go to the device one by one; at most `prefetch` parcels wait per worker. Each
    worker writes its parcels' crops into a ring of (its parcels a step + prefetch) shared tensors,
    made once and reused."""

    def __init__(self, units, transform, batch_size, streams=64, rank=0, world_size=1, workers=0,
                 accum_steps=1, seed=0, shuffle_buffer=1000, context_length=77, device="cpu",
                 image_column="images", text_column="texts", prefetch=2, decode_on_device=False,
                 worker_init_fn=None):
        if batch_size % streams or streams % world_size:
            raise ValueError(f"streams ({streams}) must divide batch_size ({batch_size}) and be "
                             f"divisible by the number of ranks ({world_size}): set streams to "
                             f"e.g. {math.gcd(batch_size, 64)}")
        self.parcels = WorkerParcels(units, transform, batch_size, streams, rank, world_size,
                                     accum_steps, seed, shuffle_buffer, context_length,
                                     image_column, text_column, decode_on_device, prefetch)
        self.transform, self.rank, self.workers = transform, rank, workers
        self.device, self.rank_batch = torch.device(device), batch_size // world_size
        self.dataloader = torch.utils.data.DataLoader(
            self.parcels, batch_size=None, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
            # as it is: the default would turn the parcel's numpy arrays into tensors in the worker
            collate_fn=_as_is,
            worker_init_fn=worker_init_fn)  # the trainer's: workers leave SIGTERM to its loop
        self.good, self.bad, self.bad_sources = 0, 0, []

    def plan(self, epoch):
        return self.parcels.plan(epoch)

    def epoch_batches(self, epoch, start_step=0):
        for batch in self.delivered_batches(epoch, start_step):
            batch["images"] = self.transform.device_half(batch["images"], batch["params"])
            yield batch

    def delivered_batches(self, epoch, start_step=0):
        plan, parcels = self.plan(epoch), self.parcels
        parcels.state.copy_(torch.tensor([epoch, start_step]))
        arriving = iter(self.dataloader) if self.workers > 0 else iter(parcels)
        workers = max(1, self.workers)
        per_step = workers * max(len(parcels.parcels(w, workers)) for w in range(workers))
        for step in range(start_step, plan.steps):
            got, skipped = {}, torch.zeros(len(SKIP_REASONS), dtype=torch.long)
            for _ in range(per_step):
                parcel = next(arriving)
                assert parcel["step"] == step, (parcel["step"], step)  # the round robin is in step
                if parcel["parts"]:
                    got.update(self._unpack(parcel))  # may count undecodable JPEGs in "skipped"
                    skipped += parcel["skipped"]
            yield self._batch(plan, step, got, skipped)

    def _unpack(self, parcel):
        """A parcel's rows on the device -> {(stream, chunk): {key: rows}}."""
        pin = self.device.type == "cuda"  # as the DataLoader pins tensors: copies that do not block
        for key, value in parcel.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
                parcel[key] = value.pin_memory() if pin else value
        self.bad_sources = (self.bad_sources + [s for s in parcel["bad_sources"]
                                                if s not in self.bad_sources])[-5:]
        images = self._decode_on_device(parcel) if parcel["jpeg_rows"] else None  # may drop rows
        rows = {k: parcel[k].to(self.device, non_blocking=True)
                for k in ("tokens", "params", "indices")}
        rows["images"] = (parcel["images"].to(self.device, non_blocking=True) if images is None
                          else images)
        unpacked, first = {}, 0
        for stream, chunk, n in parcel["parts"]:
            unpacked[stream, chunk] = {k: v[first:first + n] for k, v in rows.items()}
            first += n
        return unpacked

    def _batch(self, plan, step, got, skipped):
        """A step's pieces, in canonical stream order, padded to the rank's batch."""
        parcels = self.parcels
        ordered = [got[s, c] for s in parcels.local_streams for c in range(parcels.chunks)]
        batch = {k: torch.cat([o[k] for o in ordered]) for k in ordered[0]}
        good = {s: sum(len(got[s, c]["indices"]) for c in range(parcels.chunks))
                for s in parcels.local_streams}
        n, pad = len(batch["indices"]), self.rank_batch - len(batch["indices"])
        self.good, self.bad = self.good + n, self.bad + int(skipped.sum())
        if self.bad >= MIN_SAMPLES_BEFORE_FAILING and self.bad > self.good:
            raise RuntimeError(
                f"most samples fail to load ({self.bad} bad, {self.good} good on rank {self.rank}; "
                f"{dict(zip(SKIP_REASONS, skipped.tolist()))} in the last batch), e.g. in "
                f"{', '.join(map(str, self.bad_sources))}. Check the data: images and captions")
        if pad:
            batch = {k: torch.cat([v, v.new_full((pad, *v.shape[1:]), -1 if k == "indices" else 0)])
                     for k, v in batch.items()}
        batch["valid"] = batch["indices"] >= 0
        return {**batch, "slots": self._slots(plan, good), "skipped": skipped, "step": step,
                "good": n}

    def _slots(self, plan, good):
        """Each row's position in the GLOBAL batch, which names its contrastive group
        (stage2/contrastive.py): stream s's share is positions s * p ... s * p + p - 1; its
        `good[s]` samples take the first of them and the padding rows (at the batch's end) the
        rest, so no rank or worker count moves a row."""
        p = plan.per_stream
        filled = [torch.arange(s * p, s * p + good[s]) for s in self.parcels.local_streams]
        empty = [torch.arange(s * p + good[s], s * p + p) for s in self.parcels.local_streams]
        return torch.cat(filled + empty).to(self.device, non_blocking=True)

    def _decode_on_device(self, parcel):
        """A parcel's images on the device, in row order: those its worker decoded, and its JPEGs
        decoded here. A JPEG that does not decode is counted as bad_image and its row dropped from
        the parcel (its tokens, params, index and part), as a worker drops an image PIL cannot read.
        Rows are placed with index_copy_ and pinned, non-blocking index copies: nothing here waits
        for the step in flight."""
        jpegs = list(parcel["jpegs"].split(parcel["jpeg_lengths"]))
        decoded, failed = self.transform.decode_jpegs_on_device(jpegs, parcel["boxes"], self.device)
        rows, n = parcel["jpeg_rows"], len(parcel["indices"])
        if failed:
            dropped = {rows[i] for i in failed}
            keep = torch.tensor([r for r in range(n) if r not in dropped], dtype=torch.long)
            for key in ("tokens", "params", "indices"):
                parcel[key] = parcel[key][keep]
            parcel["skipped"][SKIP_REASONS.index("bad_image")] += len(dropped)
            parts, first = [], 0
            for stream, chunk, good in parcel["parts"]:
                parts.append((stream, chunk,
                              good - sum(first <= r < first + good for r in dropped)))
                first += good
            parcel["parts"] = parts
            new_row = {r: r - sum(d < r for d in dropped) for r in range(n) if r not in dropped}
            rows = [new_row[r] for r in rows if r not in dropped]
            n -= len(dropped)
        size = self.transform.image_size
        images = torch.empty((n, 3, size, size), dtype=torch.uint8, device=self.device)
        jpeg_rows = set(rows)
        host_rows = [r for r in range(n) if r not in jpeg_rows]
        pinned = self.device.type == "cuda"
        if host_rows:
            host_images = parcel["images"].to(self.device, non_blocking=True)
            index = torch.tensor(host_rows, dtype=torch.long, pin_memory=pinned)
            images.index_copy_(0, index.to(self.device, non_blocking=True), host_images)
        if rows:
            index = torch.tensor(rows, dtype=torch.long, pin_memory=pinned)
            images.index_copy_(0, index.to(self.device, non_blocking=True), decoded)
        return images


# --------------------------------------------------------------------------------------------------
# The check command: read batches as the trainer would, before renting GPUs
# --------------------------------------------------------------------------------------------------


def check(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m stage2.shards",
        description="Read batches of SPEC as train_clip.py would; the last line is JSON.")
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
    parser.add_argument("--decode_on_device", action="store_true",
                        help="JPEGs decoded on --device (nvjpeg on cuda)")
    args = parser.parse_args(argv)
    try:
        report = read_and_time(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"delivery: {report['delivery_samples_per_s']:.0f} samples/s from "
          f"{max(args.workers, 1)} worker(s) ({report['delivery_samples_per_s_per_worker']:.0f} "
          f"each); device half on {args.device}: {report['device_samples_per_s']:.0f} samples/s",
          file=sys.stderr)
    print(json.dumps(report))


def read_and_time(args):
    """Two halves, timed apart. Delivery: the workers decode, crop and tokenise, and the batch
    reaches --device: what a GPU would be fed (timed from the start, the workers' start-up
    included, so a short run reads low, never high). Device: augmentation and normalisation on
    --device, timed afterwards on the last batch. On a CPU-only machine the device half runs on the
    same cores and would otherwise hide the delivery rate."""
    units = formats.list_units(args.spec, image_column=args.image_column,
                               text_column=args.text_column)
    streams = math.gcd(args.streams, args.batch_size)
    loader = Loader(units, TrainTransform(args.image_size, args.augment), args.batch_size, streams,
                    workers=args.workers, seed=args.seed, shuffle_buffer=args.shuffle_buffer,
                    device=args.device, image_column=args.image_column,
                    text_column=args.text_column, decode_on_device=args.decode_on_device)
    plan = loader.plan(args.epoch)
    print(f"{len(units)} units, {plan.total} samples: {plan.steps} batches of {args.batch_size} an "
          f"epoch over {streams} streams ({plan.dropped} left over)", file=sys.stderr)
    if plan.steps == 0:
        raise ValueError(f"{args.spec}: {plan.total} samples do not fill one batch of "
                         f"{args.batch_size}")
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    batches, samples, start = 0, 0, time.perf_counter()
    bar = tqdm(total=min(args.batches, plan.steps), desc="batches", file=sys.stderr)
    for batch in loader.delivered_batches(args.epoch):
        batches, samples = batches + 1, samples + int(batch["valid"].sum())
        skipped += batch["skipped"]
        bar.update()
        bar.set_postfix({r: n for r, n in zip(SKIP_REASONS, skipped.tolist()) if n})
        if batches >= args.batches:
            break
    delivery_seconds = time.perf_counter() - start
    bar.close()
    repeats, device_start = min(args.batches, 5), time.perf_counter()
    for _ in range(repeats):
        images = loader.transform.device_half(batch["images"], batch["params"])
        if images.device.type == "cuda":
            torch.cuda.synchronize()
    device_rate = repeats * len(batch["images"]) / (time.perf_counter() - device_start)
    delivery_rate = samples / max(delivery_seconds, 1e-9)
    return {"batches": batches, "samples": samples,
            "delivery_samples_per_s": round(delivery_rate, 1),
            "delivery_samples_per_s_per_worker": round(delivery_rate / max(args.workers, 1), 1),
            "device_samples_per_s": round(device_rate, 1),
            # the two halves one after the other, as on a CPU
            "samples_per_s": round(1 / (1 / max(delivery_rate, 1e-9) + 1 / device_rate), 1),
            "seconds": round(delivery_seconds, 2),
            "skipped": dict(zip(SKIP_REASONS, skipped.tolist())), "units": len(units),
            "samples_per_epoch": plan.total, "steps_per_epoch": plan.steps,
            "dropped_per_epoch": plan.dropped, "image_mean": round(float(images.float().mean()), 4)}


if __name__ == "__main__":
    check()
