"""NIGHTS for stage 1: DreamSim's data.csv read as DreamSim wrote it, and each image decoded only once.

Why a file of its own: reading the real NIGHTS is three jobs that only stage 1 and its 2AFC metric
need (the table with its label convention, a decode cache for ~58 GB of large PNGs, stage 1's batch
order), about half of what data.py held once they were done right; data.py keeps the tokenizer,
transforms and benchmark folders.

  table         data.csv -> rows; p = right_vote / (left_vote + right_vote): right for the real file's
                vote shares and for counts; a bad value names its csv line and column
  NightsDataset one split -> (ref, left, right, p) with uint8 images (3, S, S) at the model's size
  cache         each image decoded and resized once into a memory-mapped uint8 array, reused by later
                runs and rebuilt when a source file changes (~7 GB for the train split at 224 px)
  model_input   uint8 batch -> the model's float input on the device, equal bit for bit to
                data.image_transform(S, "nights") (Resize((S, S), bicubic) -> ToTensor -> Normalize)
  batches       stage 1's batch order (a pure function of seed and epoch) and a loader built once,
                whose workers live across epochs

Imports nothing of the model.
"""
import contextlib
import csv
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
from torchvision import transforms as T

from data import CLIP_MEAN, CLIP_STD
from progress import progress

# ---------------------------------------------------------------------------------------------------
# The table (DreamSim's layout, REFERENCE.md section 3)
# ---------------------------------------------------------------------------------------------------

# NIGHTS (DreamSim, Fu et al. 2023): triplets of Stable Diffusion images, a reference and two
# variations, with the votes of human observers on which variation looks closer to the reference.
#   nights/data.csv                         one row per triplet (columns read by name, any order)
#   nights/ref/000/000.png                  the reference
#   nights/distort/000/000_0.png, _1.png    the "left" (_0) and "right" (_1) variations
# Paths in the csv are relative to the root. In the real file left_vote / right_vote are the SHARES of
# observers who chose each side (0 / 1 for the unanimous triplets) and votes is how many observers
# judged (DreamSim's dataset.py reads right_vote itself as p; the PI fork divides by their sum).

NIGHTS_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
NIGHTS_COLUMNS = ("left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split", "is_imagenet")
DOWNLOAD_HINT = ("NIGHTS comes from DreamSim (github.com/ssundaram21/dreamsim): dataset/download_dataset.sh fetches "
                 "nights.zip, which unpacks into dataset/nights (data.csv, ref/, distort/); point data_root there. "
                 "The chunked download (download_chunked_dataset.sh) unpacks only ref/ and distort/ into dataset/, "
                 "without data.csv: that file comes with nights.zip")


def _csv_bool(value):
    """is_imagenet is written True / False by pandas, 1 / 0 by other tools: accept each."""
    text = value.strip().lower()
    if text in ("true", "1", "1.0", "yes"):
        return True
    if text in ("false", "0", "0.0", "no"):
        return False
    raise ValueError(f"expected True/False/1/0, got {value!r}")


def _csv_number(row, column, where):
    """A finite number >= 0 ("1", "1.0", "0.8333333333333334" all occur), else an error naming the column."""
    try:
        number = float(row[column])
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}, column {column}: expected a number >= 0, got {row[column]!r}")
    return number


def _check_root(root):
    """The folder must hold data.csv; say which file is missing and where it comes from."""
    csv_path = root / "data.csv"
    if csv_path.is_file():
        return csv_path
    if (root / "nights" / "data.csv").is_file():
        raise FileNotFoundError(f"{csv_path} does not exist, but {root / 'nights' / 'data.csv'} does: "
                                f"set data_root to {root / 'nights'}")
    found = [name for name in ("ref", "distort") if (root / name).is_dir()]
    what = (f"the folder has {' and '.join(n + '/' for n in found)} but no data.csv (the chunked download?)" if found
            else "the folder does not exist" if not root.exists() else "the folder holds no NIGHTS files")
    raise FileNotFoundError(f"NIGHTS table {csv_path} is missing: {what}. {DOWNLOAD_HINT}.")


def read_table(root, split):
    """The rows of one base split (train / val / test) of root/data.csv, in file order, each a dict:
    line, votes, p (share of observers who chose right), paths (ref, left, right), is_imagenet."""
    csv_path = _check_root(root)
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)  # quoted fields may hold commas, quotes and newlines
        absent = [c for c in NIGHTS_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{csv_path} lacks column(s) {', '.join(absent)} (found: {', '.join(reader.fieldnames or [])})")
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            if (row["split"] or "").strip() != split:
                continue
            try:
                is_imagenet = _csv_bool(row["is_imagenet"] or "")
            except ValueError as e:
                raise ValueError(f"{where}, column is_imagenet: {e}") from None
            votes = _csv_number(row, "votes", where)
            if not votes.is_integer():
                raise ValueError(f"{where}, column votes: expected a whole number of observers, got {row['votes']!r}")
            left, right = _csv_number(row, "left_vote", where), _csv_number(row, "right_vote", where)
            if left + right == 0:
                raise ValueError(f"{where}: left_vote and right_vote are both 0, so no observer chose either side")
            rows.append({"line": reader.line_num, "votes": int(votes), "p": right / (left + right),
                         "paths": tuple(root / row[c].strip() for c in ("ref_path", "left_path", "right_path")),
                         "is_imagenet": is_imagenet})
    return rows


# ---------------------------------------------------------------------------------------------------
# Decoding, the cache and the model's input
# ---------------------------------------------------------------------------------------------------

# PIL's errors for truncated, foreign or absurdly large files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
CACHE_VERSION = 1  # bump when the cached bytes would change for the same sources


def decode(path, image_size):
    """One image file -> uint8 array (3, S, S): RGB, Resize((S, S), bicubic), the first step of
    data.image_transform(S, "nights"); PIL's resize returns uint8, so caching this loses nothing."""
    with Image.open(path) as image:
        resized = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)(image.convert("RGB"))
    return np.asarray(resized).transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)


_DEVICE_CONSTANTS = {}


def model_input(images, device):
    """uint8 images (B, 3, S, S) -> the model's float32 input on `device`: ToTensor's / 255, then
    Normalize's - mean, / std, the same operations in the same order as data.image_transform(S,
    "nights"), so the numbers are the same bit for bit. The divisors are tensors on the device: CUDA
    turns a division by a Python number into a multiplication by its reciprocal, which can differ in
    the last bit. Only 1 byte per value crosses to the device instead of 4."""
    if images.dtype != torch.uint8:
        raise TypeError(f"model_input expects uint8 images (NightsDataset's), got {images.dtype}")
    device = torch.device(device)
    if device not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[device] = (torch.tensor(255.0, device=device),
                                     torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1),
                                     torch.tensor(CLIP_STD, device=device).view(3, 1, 1))
    scale, mean, std = _DEVICE_CONSTANTS[device]
    return images.to(device, non_blocking=True).float().div_(scale).sub_(mean).div_(std)


def default_cache_dir(root):
    """Beside the images it is made from, on the disk that already holds them; set cache_dir for a
    read-only data set."""
    return Path(root) / "cache"


@contextlib.contextmanager
def _exclusive(lock_path):
    """Hold an exclusive lock on lock_path: DDP ranks, or two runs on one data set, build a cache once
    and the others wait and then read it. Without fcntl (Windows) there is no lock."""
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
    """Item c decodes triplets [c * chunk, (c + 1) * chunk) straight into the cache file (each worker
    maps it itself) and returns (triplets done, [(index, reason)] for unreadable ones)."""

    def __init__(self, path, rows, image_size, chunk):
        self.path, self.rows, self.image_size, self.chunk = path, rows, image_size, chunk
        self._array = None

    def __len__(self):
        return math.ceil(len(self.rows) / self.chunk)

    def __getitem__(self, c):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r+")
        done = range(c * self.chunk, min((c + 1) * self.chunk, len(self.rows)))
        unreadable = []
        for i in done:
            for k, path in enumerate(self.rows[i]["paths"]):
                try:
                    self._array[i, k] = decode(path, self.image_size)
                except DECODE_ERRORS as e:
                    unreadable.append((i, f"cannot read image {path}: {e}"))
                    break
        return len(done), unreadable

    def __getstate__(self):  # each worker maps the file itself
        return {**self.__dict__, "_array": None}


def _keep(item):
    return item


def build_cache(root, split, rows, image_size, cache_dir, workers=0):
    """The cache of these rows' images -> (path of the .npy, {index: reason} for unreadable rows).

    The .npy holds uint8 (N, 3 images, 3, S, S). Its name carries a hash of the image size and every
    source file's path, size and modification time, so a changed file means a new build; a .json
    beside it marks it complete and records the unreadable rows. Older builds for the same data root,
    split and size are deleted once a new one is complete."""
    cache_dir = Path(cache_dir)
    stats = [[str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p), *_stat(p)]
             for row in rows for p in row["paths"]]
    csv_path = Path(root) / "data.csv"
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "image_size": image_size, "files": stats})
                         .encode()).hexdigest()[:16]
    stem = f"nights-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]}-{split}-{image_size}px"
    npy, meta = cache_dir / f"{stem}-{key}.npy", cache_dir / f"{stem}-{key}.json"
    shape = (len(rows), 3, 3, image_size, image_size)
    if not (meta.exists() and npy.exists()):  # both appear only once a build is complete (os.replace)
        lock = cache_dir / f"{stem}.lock"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            open(lock, "a").close()
        except OSError as e:
            raise OSError(f"cannot write the NIGHTS decode cache in {cache_dir} ({e}): set cache_dir to a writable "
                          "folder (the data set itself may stay read-only), or cache: false to decode every epoch") from None
        with _exclusive(lock):
            if not (meta.exists() and npy.exists()):  # no one else built it while we waited
                _write_cache(npy, meta, rows, shape, image_size, workers, csv_path,
                             f"NIGHTS {split}: decoding into {cache_dir}")
                for old in cache_dir.glob(f"{stem}-*"):
                    if old not in (npy, meta):
                        old.unlink(missing_ok=True)
    info = json.loads(meta.read_text())
    return npy, {int(i): reason for i, reason in info["unreadable"].items()}


def _stat(path):
    s = os.stat(path)
    return s.st_size, s.st_mtime_ns


def _write_cache(npy, meta, rows, shape, image_size, workers, csv_path, description):
    need = math.prod(shape)
    free = shutil.disk_usage(npy.parent).free
    if need > free:
        raise OSError(f"the NIGHTS decode cache needs {need / 1e9:.1f} GB in {npy.parent}, which has {free / 1e9:.1f} GB "
                      "free: set cache_dir to a folder with room, or cache: false to decode every epoch")
    tmp = npy.with_name(f"{npy.name}.tmp-{os.getpid()}")
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)  # header; a sparse file
        with open(tmp, "r+b") as f:
            try:  # claim the disk now: running out of it while workers write a mapping kills them (SIGBUS)
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
            except (AttributeError, OSError) as e:  # no posix_fallocate here, or a file system without it
                if getattr(e, "errno", None) == errno.ENOSPC:
                    raise
        # Triplets per work item: 8 at 224 px (~0.5 s for 768-px PNGs), more for small images.
        chunk = max(1, 8 * 224 * 224 // (image_size * image_size))
        writer = _CacheWriter(tmp, rows, image_size, chunk)
        loader = torch.utils.data.DataLoader(writer, batch_size=None, num_workers=workers, collate_fn=_keep)
        unreadable = {}
        with progress(total=len(rows), desc=description, unit="triplet", disable=len(rows) < 1000) as bar:
            for done, bad in loader:
                for i, reason in bad:
                    unreadable[i] = reason
                    bar.write(f"{csv_path} line {rows[i]['line']}: {reason}")
                bar.update(done)
                bar.set_postfix(unreadable=len(unreadable))
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())  # the workers' writes are on disk before the cache is marked complete
        os.replace(tmp, npy)
        tmp_meta = meta.with_name(f"{meta.name}.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps({"shape": list(shape), "unreadable": unreadable}) + "\n")
        os.replace(tmp_meta, meta)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------


class NightsDataset(torch.utils.data.Dataset):
    """One split of NIGHTS -> items (ref, left, right, p): uint8 images (3, S, S) resized to
    image_size (model_input makes them the model's input), p the share of observers who judged the
    right image (`_1`) closer to the reference, as a float32 scalar.

    Rows with fewer than `min_votes` votes are dropped (6: the unanimous ~20k triplets DreamSim and the
    PI fork use). test_imagenet / test_no_imagenet are the test rows filtered on is_imagenet (they
    share test's cache). With `cache` (the default) every image is decoded once, at construction, into
    `cache_dir` (default data_root/cache), using `workers` processes; a corrupt image is found then and
    named with its csv line. A missing or unreadable image is an error naming the file and its csv line,
    unless skip_missing, which drops the row and counts it. `.counts` says how many rows of the split
    each filter removed.
    """

    def __init__(self, root, split, image_size, min_votes=6, skip_missing=False, cache=True, cache_dir=None,
                 workers=0):
        if split not in NIGHTS_SPLITS:
            raise ValueError(f"unknown NIGHTS split {split!r}; expected one of {', '.join(NIGHTS_SPLITS)}")
        self.root, self.split, self.image_size = Path(root), split, int(image_size)
        self.csv_path = self.root / "data.csv"
        base, imagenet = {"test_imagenet": ("test", True), "test_no_imagenet": ("test", False)}.get(split, (split, None))
        table = read_table(self.root, base)
        in_subset = lambda row: imagenet is None or row["is_imagenet"] == imagenet  # noqa: E731
        self.counts = {"in_split": sum(map(in_subset, table)), "few_votes": 0, "missing_images": 0,
                       "unreadable_images": 0, "triplets": 0}
        decodable = []  # rows of the base split whose images exist: the cache holds them all, whatever min_votes
        for row in table:
            row["kept"] = row["votes"] >= min_votes
            self.counts["few_votes"] += in_subset(row) and not row["kept"]
            missing = [str(p) for p in row["paths"] if not p.is_file()]
            if missing:
                if row["kept"] and not skip_missing:
                    raise FileNotFoundError(f"{self.csv_path} line {row['line']}: image {missing[0]} does not exist "
                                            "(use skip_missing to drop such rows)")
                self.counts["missing_images"] += in_subset(row) and row["kept"]
                continue
            decodable.append(row)
        unreadable, self.cache_path = {}, None
        if cache and decodable:
            self.cache_path, unreadable = build_cache(self.root, base, decodable, self.image_size,
                                                      cache_dir or default_cache_dir(self.root), workers)
        unreadable = {i: reason for i, reason in unreadable.items() if decodable[i]["kept"]}
        if unreadable and not skip_missing:
            first = min(unreadable)
            raise OSError(f"{self.csv_path} line {decodable[first]['line']}: {unreadable[first]} ({len(unreadable)} "
                          f"unreadable row(s) in {base}; use skip_missing to drop such rows)")
        self.rows = []  # (index in the cache, row)
        for index, row in enumerate(decodable):
            if row["kept"] and in_subset(row):
                if index in unreadable:
                    self.counts["unreadable_images"] += 1
                else:
                    self.rows.append((index, row))
        self.p = torch.tensor([row["p"] for _, row in self.rows], dtype=torch.float32)
        self.counts["triplets"] = len(self.rows)
        self._array = None  # the memory-mapped cache, opened in each process that reads it

    def __len__(self):
        return len(self.rows)

    def _decode(self, path, line):
        try:
            return torch.from_numpy(np.ascontiguousarray(decode(path, self.image_size)))
        except DECODE_ERRORS as e:
            raise OSError(f"{self.csv_path} line {line}: cannot read image {path}: {e}") from None

    def __getitem__(self, i):
        index, row = self.rows[i]
        if self.cache_path is None:
            ref, left, right = (self._decode(path, row["line"]) for path in row["paths"])
            return ref, left, right, self.p[i]
        if self._array is None:
            self._array = np.load(self.cache_path, mmap_mode="r")
        images = torch.from_numpy(np.array(self._array[index]))  # (3, 3, S, S): a copy, off the mapping
        return images[0], images[1], images[2], self.p[i]

    def __getstate__(self):  # DataLoader workers map the cache themselves (a pickled memmap is a full copy)
        return {**self.__dict__, "_array": None}


# ---------------------------------------------------------------------------------------------------
# Stage 1's batches
# ---------------------------------------------------------------------------------------------------


def epoch_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """This rank's batches (lists of indices) for one epoch: a pure function of seed and epoch.
    A fresh permutation is cut into global batches (a tail too short for one is dropped); rank r
    takes every world_size-th index of each, as DistributedSampler does, so the ranks together see
    exactly the global batch one process would."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[start + rank:start + batch_size:world_size] for start in range(0, n - batch_size + 1, batch_size)]


class EpochBatches(torch.utils.data.Sampler):
    """The batch sampler of a loader built once: set_epoch(epoch, start) before each pass, which then
    yields epoch_batches(...)[start:] (start > 0 resumes mid-epoch). It runs in the main process, so
    the workers, which live across epochs, only ever see indices."""

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return iter(epoch_batches(self.n, self.batch_size, self.seed, self.epoch, self.rank, self.world_size)[self.start:])

    def __len__(self):
        return max(0, self.n // self.batch_size - self.start)


def train_loader(dataset, batch_size, seed, workers=0, rank=0, world_size=1, pin_memory=False, worker_init_fn=None):
    """Stage 1's training loader: EpochBatches over `dataset`, built once for the whole run; set the
    epoch with loader.batch_sampler.set_epoch(epoch, start) before iterating it."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=EpochBatches(len(dataset), batch_size, seed, rank, world_size),
                                       num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                                       worker_init_fn=worker_init_fn)
