"""Stage 2's streaming loader: image-text tar shards in the webdataset / img2dataset format.

  loader = ShardLoader(expand_shards("/data/{00000..01499}.tar"), transform, batch_size=256, workers=8)

Why a file of its own: it is one self-contained engine that only stage 2 uses (shard lists, tar
streaming, shuffling, splitting over DDP ranks and DataLoader workers, exact mid-epoch positions,
counting bad data), and beside data.py's other readers it would make data.py too long to hold in one's
head. Like data.py it knows nothing of the model.
"""
import hashlib
import io
import random
import sys
import tarfile
import zlib

import regex
import torch
from PIL import Image

from data import split_member_name, tokenize

# A shard is a tar whose consecutive members sharing a key form one sample (000123.jpg + 000123.txt).
# The pipeline, per (rank, worker) stream:
#   shard list -> this stream's shards (shuffled per epoch, or drawn with replacement) -> tar members
#   -> samples grouped by key -> shuffle buffer -> [skip samples already consumed] -> decode, augment,
#   tokenise -> batch.
# Everything random is drawn from generators seeded by (seed, epoch, rank, stream), and each sample's
# augmentation by its position in the stream, so (seed, epoch, samples consumed per stream) fixes the
# rest of an epoch exactly: a resumed run skips the consumed samples without decoding one image.

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Why a sample or a shard was skipped. Counted in the workers, sent with every batch, summed over ranks.
SKIP_REASONS = ("no_image", "no_caption", "bad_image", "bad_caption", "truncated_tar", "unreadable_shard")
# A stream stops with an error once more than half of at least this many samples failed.
MIN_SAMPLES_BEFORE_FAILING = 50


def expand_shards(spec):
    """'/d/{000..002}.tar::/e/x-{a,b}.tar.gz' -> ['/d/000.tar', '/d/001.tar', '/d/002.tar', '/e/x-a.tar.gz',
    '/e/x-b.tar.gz']. Specs are joined by '::'; each may hold several braces, each a zero-padded
    numeric range {lo..hi} or a list {a,b,c} (bash / braceexpand semantics)."""
    if isinstance(spec, (list, tuple)):
        return [path for s in spec for path in expand_shards(s)]
    paths = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        match = regex.search(r"\{([^{}]*)\}", part)
        if match is None:
            paths.append(part)
            continue
        body, head, tail = match.group(1), part[: match.start()], part[match.end():]
        if regex.fullmatch(r"-?\d+\.\.-?\d+", body):
            lo, hi = body.split("..")
            padded = lo.lstrip("-").startswith("0") or hi.lstrip("-").startswith("0")
            width = max(len(lo), len(hi)) if padded else 0
            step = 1 if int(hi) >= int(lo) else -1
            choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
        else:
            choices = body.split(",")
        for choice in choices:
            paths.extend(expand_shards(head + choice + tail))
    return paths


def iter_tar_samples(path, problems=None):
    """Samples of one (plain or gzipped) tar shard, in file order: dicts {"__key__", "__shard__",
    ext: bytes}, extensions lower-cased. A shard that cannot be opened or ends early raises an error
    naming it; with `problems=True` a marker {"__problem__": reason, "__shard__", "__error__"} is
    yielded instead and the shard ends there (the loader counts it and goes on)."""
    sample, started = None, False
    try:
        with open(path, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as tar:
            for member in tar:
                started = True
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key is None or regex.match(r"__[^/]*__($|/)", member.name):
                    continue  # webdataset skips names without extension and __meta__ members too
                # A new key, or an extension the sample already has, starts the next sample. The
                # finished one goes out before this member is read, so a tar cut inside it keeps it.
                if sample is not None and (key != sample["__key__"] or ext in sample):
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__shard__": str(path)}
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # The sample being read when the tar broke may lack members: it is dropped with the rest.
        reason = "truncated_tar" if started else "unreadable_shard"
        if not problems:
            raise RuntimeError(f"shard {path}: {reason} ({type(e).__name__}: {e})") from e
        yield {"__problem__": reason, "__shard__": str(path), "__error__": f"{type(e).__name__}: {e}"}
        return
    if sample is not None:
        yield sample


def _rng(*parts):
    """A random.Random seeded by a tuple (string seeds hash deterministically across processes)."""
    return random.Random(" ".join(map(str, parts)))


def _seed(*parts):
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _shuffled(items, buffer_size, rng):
    """Stream shuffle: keep `buffer_size` items, emit a random one as each new one arrives.
    Problem markers pass straight through (they carry no data and draw no random number)."""
    buffer = []
    for item in items:
        if "__problem__" in item:
            yield item
            continue
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(torch.utils.data.IterableDataset):
    """Image-text pairs from tar shards: yields (image (3, S, S) float, tokens (T,) long).

    Iterated directly (e.g. by a DataLoader with workers), it reads each sample of the epoch once,
    split over DDP ranks and DataLoader workers by shard: non-resampled mode needs at least
    world_size * workers shards. `resampled=True` draws shards with replacement, without end (set an
    epoch length with samples_per_epoch in the trainer). `set_epoch(e)` reshuffles shards and buffer.
    Bad samples are skipped and counted in `self.skipped` (per process; ShardLoader sends worker
    counts to the main process with every batch).
    """

    def __init__(self, shards, transform, tokenize_fn=None, context_length=77, seed=0, epoch=0,
                 shuffle_buffer=1000, resampled=False, rank=None, world_size=None):
        super().__init__()
        self.shards = expand_shards(shards) if isinstance(shards, str) else list(shards)
        if not self.shards:
            raise ValueError(f"no shards in {shards!r}")
        self.transform = transform
        self.tokenize_fn = tokenize_fn or tokenize
        self.context_length = context_length
        self.seed, self.epoch = seed, epoch
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if distributed else 1)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def shards_of(self, stream, num_streams, pass_index=0):
        """This rank's `stream`-th share of the shards in one pass. Non-resampled: one shuffle per
        (seed, epoch, pass), dealt to ranks then streams, so the shares partition the list.
        Resampled: each stream draws its share's worth of shards with replacement."""
        if self.resampled:
            rng = _rng("resample", self.seed, self.epoch, self.rank, stream, pass_index)
            return [rng.choice(self.shards) for _ in range(max(1, len(self.shards) // (self.world_size * num_streams)))]
        order = list(self.shards)
        _rng("shards", self.seed, self.epoch, pass_index).shuffle(order)
        return order[self.rank :: self.world_size][stream::num_streams]

    def _raw_samples(self, stream, num_streams, passes):
        """Undecoded samples (and problem markers) of `passes` passes over the share (None: endless)."""
        pass_index = 0
        while passes is None or pass_index < passes:
            found = 0
            for path in self.shards_of(stream, num_streams, pass_index):
                for sample in iter_tar_samples(path, problems=True):
                    found += "__problem__" not in sample
                    yield sample
            if passes is None and found == 0:
                raise RuntimeError(f"stream {stream} of rank {self.rank} found no sample in its shards "
                                   f"{self.shards_of(stream, num_streams, pass_index)[:5]} ({self.skipped})")
            pass_index += 1

    def samples(self, stream=0, num_streams=1, start=0, passes=1):
        """Yields (index, image, tokens): the stream's samples after the shuffle buffer, numbered
        from 0; the first `start` are skipped without decoding (how a resumed run catches up)."""
        if not self.resampled and len(self.shards) < self.world_size * num_streams and passes is None:
            raise ValueError(f"{len(self.shards)} shard(s) cannot be split over {self.world_size} rank(s) x "
                             f"{num_streams} worker(s): use fewer workers, more shards, or resampled=true")
        buffered = _shuffled(self._raw_samples(stream, num_streams, passes), self.shuffle_buffer, _rng("buffer", self.seed, self.epoch, self.rank, stream))
        index, good, bad = 0, 0, 0
        for sample in buffered:
            if "__problem__" in sample:
                if index >= start:  # problems before `start` were counted by the run that read them
                    self.skipped[sample["__problem__"]] += 1
                    print(f"warning: skipping the rest of shard {sample['__shard__']} "
                          f"({sample['__problem__']}: {sample['__error__']})", file=sys.stderr)
                continue
            index += 1
            if index <= start:
                continue
            item = self._decode(sample, _seed(self.seed, self.epoch, self.rank, stream, index - 1))
            if isinstance(item, str):
                self.skipped[item] += 1
                bad += 1
                if bad >= MIN_SAMPLES_BEFORE_FAILING and bad > good:
                    raise RuntimeError(
                        f"most samples fail to load ({bad} bad, {good} good in one stream; {self.skipped}); "
                        f"last bad: {sample['__key__']} in {sample['__shard__']}. Check the shards: images "
                        f"({'/'.join(IMAGE_EXTENSIONS)}) and captions (txt) are expected")
                continue
            good += 1
            yield (index - 1, *item)

    def _decode(self, sample, seed):
        """-> (image, tokens), or the skip reason as a string."""
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            return "no_image"
        if "txt" not in sample:
            return "no_caption"
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return "bad_caption"
        try:
            image = Image.open(io.BytesIO(sample[image_ext]))
            image.load()
            # Each sample's augmentation has its own seed, so skipping samples on resume does not
            # shift the augmentation of the ones after; fork_rng leaves the caller's RNG untouched.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed costs ~1.5 ms
                image = self.transform(image)
        except Exception:  # PIL raises many types for corrupt data; the sample is counted and skipped
            return "bad_image"
        return image, self.tokenize_fn([caption], self.context_length)[0]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream, num_streams = (info.id, info.num_workers) if info else (0, 1)
        for _, image, tokens in self.samples(stream, num_streams, passes=None if self.resampled else 1):
            yield image, tokens


class _StreamBatches(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs for ShardLoader: batches of one stream, with the stream's id,
    its position and the skips since the last batch. Reads (epoch, first batch, positions) from a
    tensor in shared memory, so persistent workers follow the main process from epoch to epoch."""

    def __init__(self, dataset, batch_size, batches_per_epoch, num_streams):
        super().__init__()
        self.dataset, self.batch_size = dataset, batch_size
        self.batches_per_epoch, self.num_streams = batches_per_epoch, num_streams
        self.state = torch.zeros(2 + num_streams, dtype=torch.long).share_memory_()  # epoch, batch, consumed...

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        epoch, first_batch, consumed = self.state[0].item(), self.state[1].item(), self.state[2:].tolist()
        # The DataLoader takes batches from its workers in turn. Batch b of the epoch belongs to
        # stream b % num_streams; after resuming at batch n, worker w plays stream (w + n) % num_streams.
        stream = (worker + first_batch) % self.num_streams
        todo = len(range(stream, self.batches_per_epoch, self.num_streams)) - len(range(stream, first_batch, self.num_streams))
        self.dataset.set_epoch(epoch)
        reported = dict(self.dataset.skipped)
        samples = self.dataset.samples(stream, self.num_streams, start=consumed[stream], passes=None)
        for _ in range(todo):
            chunk = [next(samples) for _ in range(self.batch_size)]
            skipped = torch.tensor([self.dataset.skipped[r] - reported[r] for r in SKIP_REASONS])
            reported = dict(self.dataset.skipped)
            yield {
                "images": torch.stack([c[1] for c in chunk]),  # (B, 3, S, S)
                "tokens": torch.stack([c[2] for c in chunk]),  # (B, T)
                "stream": stream,
                "consumed": chunk[-1][0] + 1,
                "skipped": skipped,  # (len(SKIP_REASONS),)
            }


class ShardLoader:
    """One rank's batches for training, epoch by epoch, resumable mid-epoch.

    Each epoch is `batches_per_epoch` batches of `batch_size` (this rank's share). The position is
    (epoch, batches consumed, samples consumed per stream), a few integers: `epoch_batches(epoch,
    position)` continues exactly where a run with the same seed, ranks and workers stopped.
    Non-resampled streams that run out mid-epoch continue with a fresh shuffle of their shards.
    """

    def __init__(self, dataset, batch_size, batches_per_epoch, workers=0, pin_memory=False, worker_init_fn=None):
        self.num_streams = max(1, workers)
        self.batches = _StreamBatches(dataset, batch_size, batches_per_epoch, self.num_streams)
        self.batches_per_epoch = batches_per_epoch
        self.loader = torch.utils.data.DataLoader(
            self.batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, worker_init_fn=worker_init_fn)
        self.epoch, self.batch, self.consumed = 0, 0, [0] * self.num_streams

    def state(self):
        return {"epoch": self.epoch, "batch": self.batch, "consumed": list(self.consumed)}

    def epoch_batches(self, epoch, state=None):
        """Yields batch dicts (images, tokens, skipped) for the rest of `epoch`; `state` from
        state() of an earlier run resumes inside it."""
        resume = state is not None and state["epoch"] == epoch
        if resume and len(state["consumed"]) != self.num_streams:
            raise ValueError(f"the saved data position has {len(state['consumed'])} worker streams; resume with "
                             f"workers={len(state['consumed'])} (or start a fresh out_dir)")
        self.epoch = epoch
        self.batch = state["batch"] if resume else 0
        self.consumed = list(state["consumed"]) if resume else [0] * self.num_streams
        self.batches.state.copy_(torch.tensor([epoch, self.batch, *self.consumed]))
        for batch in self.loader:
            self.batch += 1
            self.consumed[batch["stream"]] = batch["consumed"]
            yield batch
