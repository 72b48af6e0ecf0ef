"""Stage 1's data, the part every source shares: rows of (reference, left, right, p), each image
decoded once.

Every similarity signal stage 1 learns from (NIGHTS votes, BAPPS judgments, THINGS odd-one-out
trials, a triplet table, class-folder triplets, a dissimilarity matrix) is read by a short reader
(stage1/nights.py, stage1/other_sources.py) into the same form, and from there on one code path
serves them all:

  images + rows  a list of image files and an int array (N, 3) of indices into it (reference, left,
                 right), with p (N,) = the share of judges who chose RIGHT as closer to the
                 reference
  cache          each image decoded and resized once into a memory-mapped uint8 array
                 (M, 3, S, S), reused by later runs and rebuilt when a source file changes; images
                 shared by many rows (THINGS' 1,854 concepts in 4.7M trials) are stored once
  TripletDataset one split -> (ref, left, right, p) items, uint8 images (3, S, S); a missing image,
                 a triplet naming one image twice or an unreadable file is an error naming the row
                 (file and line), unless skip_missing drops and counts the rows
  model_input    uint8 batch -> the model's float input on the device, equal bit for bit to
                 data.image_transform(S, "nights") (Resize((S, S), bicubic) -> ToTensor ->
                 Normalize)
  nested_subset  max_triplets / triplet_fraction: the first k of one seeded permutation, so the 5%
                 set lies inside the 10% set inside the 25% set (a data-efficiency curve compares
                 like with like)
  batches        stage 1's batch order (a pure function of seed and epoch) and a loader built
                 once, whose workers live across epochs

Imports nothing of the model.
"""
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import CLIP_MEAN, CLIP_STD
from cli import UserError, UserFileNotFound, progress
from training import prefetch_to_device

# --------------------------------------------------------------------------------------------------
# Decoding and the model's input
# --------------------------------------------------------------------------------------------------

# PIL's errors for truncated, foreign or absurdly large files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SKIP_HINT = ("to drop such rows and count them: train_triplet.py --skip_missing=true, "
             "evaluate.py --alignment --skip-missing")
# Bump when the cached bytes would change for the same sources (2: one slot per image).
CACHE_VERSION = 2


def decode(path, image_size):
    """One image file -> uint8 array (3, S, S): RGB, Resize((S, S), bicubic), the first step of
    data.image_transform(S, "nights"); PIL's resize returns uint8, so caching this loses nothing."""
    from torchvision import transforms as T  # here: its import is ~1.2 s (data.image_transform)

    with Image.open(path) as image:
        resized = T.Resize((image_size, image_size),
                           interpolation=T.InterpolationMode.BICUBIC)(image.convert("RGB"))
    return np.asarray(resized).transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)


_DEVICE_CONSTANTS = {}


def model_input(images, device):
    """uint8 images (B, 3, S, S) -> the model's float32 input on `device`: ToTensor's / 255, then
    Normalize's - mean, / std, the same operations in the same order as data.image_transform(S,
    "nights"), so the numbers are the same bit for bit. The divisors are tensors on the device: CUDA
    turns a division by a Python number into a multiplication by its reciprocal, which can differ in
    the last bit. Only 1 byte per value crosses to the device instead of 4."""
    if images.dtype != torch.uint8:
        raise TypeError("model_input expects uint8 images (a TripletDataset's), "
                        f"got {images.dtype}")
    device = torch.device(device)
    if device not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[device] = (torch.tensor(255.0, device=device),
                                     torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1),
                                     torch.tensor(CLIP_STD, device=device).view(3, 1, 1))
    scale, mean, std = _DEVICE_CONSTANTS[device]
    return images.to(device, non_blocking=True).float().div_(scale).sub_(mean).div_(std)


# --------------------------------------------------------------------------------------------------
# The decode cache: one uint8 slot per image
# --------------------------------------------------------------------------------------------------


def default_cache_dir(root):
    """Beside the images it is made from, on the disk that already holds them; set cache_dir for a
    read-only data set."""
    return Path(root) / "cache"


@contextlib.contextmanager
def _exclusive(lock_path):
    """Hold an exclusive lock on lock_path: DDP ranks, or two runs on one data set, build a cache
    once and the others wait and then read it. Without fcntl (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _CacheWriter(torch.utils.data.Dataset):
    """Item c decodes images [c * chunk, (c + 1) * chunk) straight into the cache file (each worker
    maps it itself) and returns (images done, [(index, reason)] for unreadable ones)."""

    def __init__(self, path, images, image_size, chunk):
        self.path, self.images, self.image_size, self.chunk = path, images, image_size, chunk
        self._array = None

    def __len__(self):
        return math.ceil(len(self.images) / self.chunk)

    def __getitem__(self, c):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r+")
        done = range(c * self.chunk, min((c + 1) * self.chunk, len(self.images)))
        unreadable = []
        for i in done:
            try:
                self._array[i] = decode(self.images[i], self.image_size)
            except DECODE_ERRORS as e:
                unreadable.append((i, f"cannot read image {self.images[i]}: {e}"))
        return len(done), unreadable

    def __getstate__(self):  # each worker maps the file itself
        return {**self.__dict__, "_array": None}


def _keep(item):
    return item


def _stat(path):
    s = os.stat(path)
    return s.st_size, s.st_mtime_ns


def build_cache(root, stem, images, image_size, cache_dir, workers=0, label="stage 1",
                description=None):
    """The cache of these image files -> (path of the .npy, {image index: reason} for unreadable
    ones).

    The .npy holds uint8 (M, 3, S, S), one slot per image in the order given. Its name is `stem`
    (source, data root and group, e.g. "nights-1a2b3c4d-train-224px") plus a hash of the image size
    and every file's path, size and modification time, so a changed file means a new build; a .json
    beside it marks it complete and records the unreadable images. Older builds of the same stem are
    deleted once a new one is complete."""
    cache_dir, root = Path(cache_dir), Path(root)
    stats = [[str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p), *_stat(p)]
             for p in images]
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "image_size": image_size,
                                     "files": stats}).encode()).hexdigest()[:16]
    npy, meta = cache_dir / f"{stem}-{key}.npy", cache_dir / f"{stem}-{key}.json"
    # Both files appear only once a build is complete (os.replace).
    if not (meta.exists() and npy.exists()):
        lock = cache_dir / f"{stem}.lock"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            open(lock, "a").close()
        except OSError as e:
            raise UserError(f"cannot write the {label} decode cache in {cache_dir} ({e}): set "
                          "cache_dir to a writable folder (the data set itself may stay "
                          "read-only), or cache: false to decode every epoch") from None
        with _exclusive(lock):
            if not (meta.exists() and npy.exists()):  # no one else built it while we waited
                _write_cache(npy, meta, images, image_size, workers, label,
                             f"{description or label}: decoding into {cache_dir}")
                for old in cache_dir.glob(f"{stem}-*"):
                    if old not in (npy, meta):
                        old.unlink(missing_ok=True)
    info = json.loads(meta.read_text())
    return npy, {int(i): reason for i, reason in info["unreadable"].items()}


def _write_cache(npy, meta, images, image_size, workers, label, description):
    shape = (len(images), 3, image_size, image_size)
    need, free = math.prod(shape), shutil.disk_usage(npy.parent).free
    if need > free:
        raise UserError(f"the {label} decode cache needs {need / 1e9:.1f} GB in {npy.parent}, "
                      f"which has {free / 1e9:.1f} GB free: set cache_dir to a folder with room, "
                      "or cache: false to decode every epoch")
    tmp = npy.with_name(f"{npy.name}.tmp-{os.getpid()}")
    try:
        # The .npy header; the rest of the file is sparse until claimed below.
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        with open(tmp, "r+b") as f:
            # Claim the disk now: running out of it while workers write a mapping kills them
            # (SIGBUS).
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
            except (AttributeError, OSError) as e:  # posix_fallocate missing or unsupported here
                if getattr(e, "errno", None) == errno.ENOSPC:
                    raise
        # Images per work item: 24 at 224 px (~0.5 s for NIGHTS' 768-px PNGs), more for small
        # images.
        chunk = max(1, 24 * 224 * 224 // (image_size * image_size))
        # A build is a one-off job over every image: one process per core, whatever `workers`
        # says training should use (the demo's 18,000 PNGs: ~4 s on one core of 2).
        loader = torch.utils.data.DataLoader(_CacheWriter(tmp, images, image_size, chunk),
                                             batch_size=None, collate_fn=_keep,
                                             num_workers=max(workers, os.cpu_count() or 1))
        unreadable = {}
        with progress(total=len(images), desc=description, unit="image",
                      disable=len(images) < 3000) as bar:
            for done, bad in loader:
                for i, reason in bad:
                    unreadable[i] = reason
                    bar.write(reason)
                bar.update(done)
                bar.set_postfix(unreadable=len(unreadable))
        with open(tmp, "r+b") as f:
            # The workers' writes are on disk before the cache is marked complete.
            os.fsync(f.fileno())
        os.replace(tmp, npy)
        tmp_meta = meta.with_name(f"{meta.name}.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps({"shape": list(shape), "unreadable": unreadable}) + "\n")
        os.replace(tmp_meta, meta)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


class LineOf:
    """where(i) for rows read from a text file -> "FILE line N": N = lines[i], or without `lines`
    i // rows_per_line + first (a file whose line k gives rows_per_line rows). A class, not a
    lambda, so that a dataset pickles into worker processes started by spawn."""

    def __init__(self, path, lines=None, rows_per_line=1, first=1):
        self.path, self.lines, self.rows_per_line, self.first = path, lines, rows_per_line, first

    def __call__(self, i):
        return (
            f"{self.path} line "
            f"{self.lines[i] if self.lines is not None else i // self.rows_per_line + self.first}")


class TripletDataset(torch.utils.data.Dataset):
    """One split of any source -> items (ref, left, right, p): uint8 images (3, S, S) at image_size
    (model_input makes them the model's input), p a float32 scalar, the share of judges who chose
    the right image as closer to the reference.

    images: the image files (M); rows: int array (N, 3) of indices into images (ref, left, right);
    p: (N,) shares in [0, 1]; where(i): the place row i came from ("FILE line 12"), named in errors;
    serve: (N,) bool, False for rows whose images belong in the cache but which this split does not
    serve (a view such as NIGHTS' test_imagenet shares test's cache); cache_stem: the cache's name
    (source, data root, group): splits with the same stem and images share one build.

    With `cache` (the default) every image is decoded once, at construction, into cache_dir
    (default <cache_root>/cache) using `workers` processes, and an unreadable file is found then. A
    missing or unreadable image is an error naming the file and the first row that uses it, unless
    skip_missing, which drops the rows and counts them. `.counts` says how many served rows each
    check removed.
    """

    def __init__(self, images, rows, p, where, split, image_size, cache_root, cache_stem,
                 serve=None, skip_missing=False, cache=True, cache_dir=None, workers=0,
                 label="stage 1", counts=None):
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64).reshape(-1, 3))
        p = torch.as_tensor(np.asarray(p, dtype=np.float32).reshape(-1))
        serve = (torch.ones(len(rows), dtype=torch.bool) if serve is None
                 else torch.as_tensor(np.asarray(serve, dtype=bool)))
        self.images, self.split, self.image_size, self.where, self.label = (
            list(map(Path, images)), split, int(image_size), where, label)
        self.counts = {**(counts or {}), "missing_images": 0, "unreadable_images": 0, "triplets": 0}
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.images)):
            raise ValueError(
                f"{where(int(((rows < 0) | (rows >= len(self.images))).any(1).nonzero()[0]))}: "
                f"image index out of range (0 .. {len(self.images) - 1})")
        twice = serve & ((rows[:, 0] == rows[:, 1]) | (rows[:, 0] == rows[:, 2])
                         | (rows[:, 1] == rows[:, 2]))
        if twice.any():
            i = int(twice.nonzero()[0])
            ref, left, right = rows[i].tolist()
            same = self.images[ref if ref in (left, right) else left]
            raise ValueError(f"{where(i)}: the triplet names image {same} twice; "
                             "a triplet needs three different images")
        if ((p < 0) | (p > 1) | p.isnan()).any():
            raise ValueError(f"{where(int(((p < 0) | (p > 1) | p.isnan()).nonzero()[0]))}: "
                             "the share p must lie in [0, 1]")
        # Missing images (checked once per file, not once per row), then the rows they spoil.
        missing = torch.tensor([not path.is_file() for path in self.images], dtype=torch.bool)
        self.unusable = self._check(rows, serve, missing, skip_missing, "missing_images",
                                    lambda i, k: f"{where(i)}: image {self.images[k]} does not "
                                                 f"exist ({SKIP_HINT})",
                                    UserFileNotFound)
        self.cache_path = None
        if cache and (serve & ~self.unusable).any():
            # The cache holds the images that exist.
            readable = [k for k in range(len(self.images)) if not missing[k]]
            slot = torch.full((len(self.images),), -1, dtype=torch.long)
            slot[readable] = torch.arange(len(readable))
            self.cache_path, bad = build_cache(cache_root, cache_stem,
                                               [self.images[k] for k in readable], self.image_size,
                                               cache_dir or default_cache_dir(cache_root), workers,
                                               label, f"{label} {split}")
            unreadable = torch.zeros(len(self.images), dtype=torch.bool)
            unreadable[[readable[k] for k in bad]] = True
            reasons = {readable[k]: reason for k, reason in bad.items()}
            n_bad = int((serve & ~self.unusable & unreadable[rows].any(1)).sum())
            self.unusable |= self._check(
                rows, serve & ~self.unusable, unreadable, skip_missing, "unreadable_images",
                lambda i, k: f"{where(i)}: {reasons[k]} ({n_bad} unreadable row(s) in {split}; "
                             f"{SKIP_HINT})", UserError)
            self.slot = slot
        keep = (serve & ~self.unusable).nonzero().flatten()
        # index: each item's row in the reader's order.
        self.index, self.rows, self.p = keep, rows[keep], p[keep]
        self.counts["triplets"] = len(self.rows)
        self._array = None  # the memory-mapped cache, opened in each process that reads it

    def _check(self, rows, serve, bad_image, skip_missing, count, message, error):
        """Rows (served or not) that use a bad image; the first served one is an error unless
        skip_missing."""
        spoiled = bad_image[rows].any(1)
        served = serve & spoiled
        if served.any() and not skip_missing:
            i = int(served.nonzero()[0])
            raise error(message(i, int(next(k for k in rows[i].tolist() if bad_image[k]))))
        self.counts[count] += int(served.sum())
        return spoiled

    def __len__(self):
        return len(self.rows)

    def keep(self, items):
        """Serve only these items (positions in the current order), e.g. a nested_subset."""
        items = torch.as_tensor(items, dtype=torch.long)
        self.index, self.rows, self.p = self.index[items], self.rows[items], self.p[items]
        self.counts["triplets"] = len(self.rows)

    def image(self, k):
        """Image k of self.images -> uint8 (3, S, S), from the cache when there is one."""
        if self.cache_path is None:
            try:
                return torch.from_numpy(
                    np.ascontiguousarray(decode(self.images[k], self.image_size)))
            except DECODE_ERRORS as e:
                raise OSError(f"cannot read image {self.images[k]}: {e}") from None
        if self._array is None:
            self._array = np.load(self.cache_path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[int(self.slot[k])]))  # a copy, off the mapping

    def __getitem__(self, i):
        if self.cache_path is None:
            try:
                ref, left, right = (self.image(k) for k in self.rows[i].tolist())
            except OSError as e:
                raise OSError(f"{self.where(int(self.index[i]))}: {e}") from None
            return ref, left, right, self.p[i]
        if self._array is None:
            self._array = np.load(self.cache_path, mmap_mode="r")
        # (3, 3, S, S): a copy, off the mapping (fancy indexing copies).
        images = torch.from_numpy(self._array[self.slot[self.rows[i]].numpy()])
        return images[0], images[1], images[2], self.p[i]

    def __getstate__(self):
        """DataLoader workers map the cache themselves (a pickled memmap is a full copy)."""
        return {**self.__dict__, "_array": None}


def digest(dataset):
    """A fingerprint of a split as served: its rows (which images, named inside the data set, so a
    data set that moved keeps it) and their shares p. Other triplets, or the same ones with other
    votes, change it; train_triplet.py refuses to resume on such data."""
    served = sorted({k for row in dataset.rows.tolist() for k in row})
    paths = [str(dataset.images[k]) for k in served]
    base = os.path.commonpath(paths) if paths else ""
    names = {k: os.path.relpath(path, base) for k, path in zip(served, paths)}
    h = hashlib.sha256()
    for row, p in zip(dataset.rows.tolist(), dataset.p.tolist()):
        h.update(f"{names[row[0]]}|{names[row[1]]}|{names[row[2]]}|{p:.6f}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# How much: nested subsets of the training rows
# --------------------------------------------------------------------------------------------------


def nested_subset(n, max_triplets=0, fraction=1.0, seed=0):
    """Which of n rows to keep -> sorted indices: the first k of one permutation drawn from `seed`,
    k = the smaller of max_triplets (0 = all) and round(fraction * n). For one seed the sets are
    nested (k = 5% of n lies inside k = 10%), so a data-efficiency curve compares like with like."""
    if not 0 < fraction <= 1:
        raise ValueError(f"triplet_fraction must lie in (0, 1], got {fraction}")
    if max_triplets < 0:
        raise ValueError(f"max_triplets must be >= 0 (0 = all), got {max_triplets}")
    k = min(n, round(fraction * n), max_triplets or n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + 17))
    return order[:k].sort().values


# --------------------------------------------------------------------------------------------------
# Stage 1's batches
# --------------------------------------------------------------------------------------------------


def batch_order(n, batch_size, seed, epoch, rank=0, world_size=1):
    """This rank's batches (lists of indices) for one epoch: a pure function of seed and epoch.
    A fresh permutation is cut into global batches (a tail too short for one is dropped); rank r
    takes every world_size-th index of each, as DistributedSampler does, so the ranks together see
    exactly the global batch one process would."""
    order = torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[start + rank:start + batch_size:world_size]
            for start in range(0, n - batch_size + 1, batch_size)]


class BatchOrder(torch.utils.data.Sampler):
    """The batch sampler of a loader built once: set_epoch(epoch, start) before each pass, which
    then yields batch_order(...)[start:] (start > 0 resumes mid-epoch). It runs in the main process,
    so the workers, which live across epochs, only ever see indices."""

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = (
            n, batch_size, seed, rank, world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return iter(batch_order(self.n, self.batch_size, self.seed, self.epoch, self.rank,
                                self.world_size)[self.start:])

    def __len__(self):
        return max(0, self.n // self.batch_size - self.start)


def train_loader(dataset, batch_size, seed, workers=0, rank=0, world_size=1, pin_memory=False,
                 worker_init_fn=None):
    """Stage 1's training DataLoader: BatchOrder over `dataset`, built once for the whole run; set
    the epoch with loader.batch_sampler.set_epoch(epoch, start) before iterating it."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=BatchOrder(len(dataset), batch_size, seed, rank, world_size),
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn)


class Loader:
    """Stage 1's training batches, as stage2/shards.py's Loader gives stage 2's:
    epoch_batches(epoch, first step) yields (ref, left, right, p) on `device`, each image batch the
    model's float input (model_input). Built once, so its workers live across epochs; the batches
    stay a pure function of seed and epoch (batch_order)."""

    def __init__(self, dataset, batch_size, seed, workers=0, rank=0, world_size=1, device="cpu",
                 worker_init_fn=None):
        self.device = torch.device(device)
        self.dataloader = train_loader(dataset, batch_size, seed, workers, rank, world_size,
                                       pin_memory=self.device.type == "cuda",
                                       worker_init_fn=worker_init_fn)

    def epoch_batches(self, epoch, start_step=0):
        self.dataloader.batch_sampler.set_epoch(epoch, start_step)
        for ref, left, right, p in prefetch_to_device(self.dataloader, self.device):
            yield (*(model_input(images, self.device) for images in (ref, left, right)), p)
