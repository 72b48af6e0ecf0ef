"""What a stage-2 shard is: a spec -> files -> units with sample counts -> raw samples.

  units = list_units("/data/yfcc15m/data/train-{00001..01507}-of-01507.parquet")
  for sample in read_unit(units[0], start=0, image_column="images", text_column="texts"): ...

Formats, as users download or make them:
- tar shards in the webdataset / img2dataset layout, plain or gzipped: consecutive members sharing
  a key form one sample (000123.jpg + 000123.txt), the grouping rules of the webdataset library; a
  caption given as CLIP token ids is a `.ids` member (decimal text, as stage2/repack.py writes it);
- parquet files, one unit per row group: an image column (binary, or a struct with a `bytes` field
  as the Hugging Face hub's Image feature stores it) and a text column (strings, or a list of
  numbers taken as CLIP token ids, as Kaichengalex/YFCC15M stores them).
Sample counts (what an exact epoch needs) come from sizes.json beside the shards, else
img2dataset's NNNNN_stats.json, else parquet metadata, else one counting pass that reads tar
headers (no image is decoded) and is saved for the next start.

VOCAB_SIZE and END_OF_TEXT are those of CLIP's BPE vocabulary (github openai/CLIP,
clip/simple_tokenizer.py).
"""
import collections
import functools
import glob
import gzip
import hashlib
import json
import os
import sys
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import regex
import torch
from tqdm import tqdm

from data import split_member_name, tokenize

# Why a sample or a unit was skipped: the engine counts them, sends them with every batch and sums
# them over ranks.
SKIP_REASONS = ("no_image", "bad_image", "no_caption", "bad_caption", "truncated_shard",
                "unreadable_file")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first present is the sample's image
VOCAB_SIZE, END_OF_TEXT = 49408, 49407  # CLIP's BPE vocabulary
COUNTS_FILE = ".pi_counts.json"  # the counting pass's result, beside the shards or in cache_dir
COUNTING_THREADS = 8
PARQUET_BATCH_ROWS = 256  # rows decoded from parquet at a time: bounds a reader's memory
META_MEMBER = regex.compile(r"__[^/]*__($|/)")  # webdataset's __meta__ members, skipped
CAPTION_CACHE = 2**14  # captions whose tokens a process keeps (a small data set: all of them)


@dataclass(frozen=True)
class Unit:
    """The smallest piece of data the engine deals out."""
    path: str  # a tar (plain or gzipped) or a .parquet file
    row_group: int  # parquet row-group index; -1 for a tar (the whole file)
    samples: int  # raw samples in it (tar: key groups; parquet: rows of the row group)


def is_parquet(path):
    return str(path).lower().endswith(".parquet")


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------

def expand_spec(spec):
    """'/d/{000..002}.tar::/e/x-{a,b}.parquet' -> ['/d/000.tar', '/d/001.tar', '/d/002.tar',
    '/e/x-a.parquet', '/e/x-b.parquet']. Specs are joined by '::' (open_clip's separator); each may
    hold several braces, each a numeric range {lo..hi} (zero-padded when an end is) or a list
    {a,b,c}, expanded left to right, then wildcards (* ? [...]), as bash does. A list or tuple of
    specs is expanded one by one."""
    if isinstance(spec, (list, tuple)):
        return [path for s in spec for path in expand_spec(s)]
    paths = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        match = regex.search(r"\{([^{}]*)\}", part)
        if match is None:
            part = os.path.expanduser(part)
            # Then wildcards, as bash does after braces: sorted matches, or the pattern itself when
            # nothing matches (so the missing-file error names it).
            matches = sorted(glob.glob(part)) if glob.has_magic(part) else []
            paths.extend(matches or [part])
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
            paths.extend(expand_spec(head + choice + tail))
    return paths


# --------------------------------------------------------------------------------------------------
# Units and their sample counts
# --------------------------------------------------------------------------------------------------

def list_units(paths, cache_dir=None, progress=True, image_column=None, text_column=None):
    """Units of `paths` (a spec or a list of paths), in their order, each with its sample count.

    Tar counts: sizes.json beside the shards, else img2dataset's NNNNN_stats.json ("successes"),
    else a saved counting pass, else one counting pass now (headers only; saved beside the shards if
    the folder is writable, else in cache_dir). Parquet: one unit per row group, rows from the
    metadata (no data read); with image_column / text_column given, their presence is checked too.
    Files that exist but cannot be opened get a unit of 0 samples (read_unit reports them).
    """
    spec = paths if isinstance(paths, str) else None
    paths = expand_spec(paths) if isinstance(paths, (str, list, tuple)) else list(paths)
    if not paths:
        raise FileNotFoundError(f"the data spec {spec or paths!r} names no file")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} file(s) of {spec or 'the data list'!r} not found: "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    tar_counts = _tar_counts([p for p in paths if not is_parquet(p)], cache_dir, progress)
    units = []
    for path in paths:
        if not is_parquet(path):
            units.append(Unit(path, -1, tar_counts[path]))
            continue
        try:
            with pq.ParquetFile(path) as parquet:  # reads the footer only
                schema, meta = parquet.schema_arrow, parquet.metadata
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a broken footer
            print(f"warning: {path}: unreadable parquet file ({type(e).__name__}: {e})",
                  file=sys.stderr)
            units.append(Unit(path, -1, 0))
            continue
        if image_column or text_column:
            _parquet_columns(path, schema, image_column or "images", text_column or "texts")
        units += [Unit(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
                  if meta.row_group(i).num_rows > 0]
    _check_unreadable([u.path for u in units if u.samples == 0 and not is_parquet(u.path)],
                      len(paths))
    return units


def _check_unreadable(empty, total):
    """Tar files that hold no sample: those that are no tar at all are an error when every file
    is one (a wrong spec: nothing would train), else a warning naming them (a few broken files
    in a large data set are skipped and counted)."""
    foreign = [path for path in empty if not _looks_like_tar(path)]
    if not foreign:
        return
    names = f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
    if len(foreign) == total:
        raise ValueError(f"{names}: not a tar archive (tar shards in the webdataset / img2dataset "
                         "layout, plain or gzipped, or .parquet files are expected)")
    print(f"warning: {len(foreign)} of {total} file(s) are not tar archives and hold no sample: "
          f"{names}", file=sys.stderr)


def _looks_like_tar(path):
    """A gzip stream, or a tar header ("ustar" at byte 257): read from the file's first block."""
    with open(path, "rb") as f:
        head = f.read(512)
    return head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar"


def _tar_counts(paths, cache_dir, progress):
    """{path: samples} for tar shards, from the cheapest source that has each."""
    counts, to_count = {}, []
    for folder, names in _by_folder(paths).items():
        sizes_path = os.path.join(folder, "sizes.json")
        sizes = _read_json(sizes_path) if os.path.exists(sizes_path) else {}
        saved = _saved_counts(folder, cache_dir)
        for name, path in names.items():
            # img2dataset's NNNNN_stats.json
            stats_path = os.path.join(folder, name.split(".", 1)[0] + "_stats.json")
            if name in sizes:
                counts[path] = int(sizes[name])
            elif os.path.exists(stats_path) and "successes" in (stats := _read_json(stats_path)):
                counts[path] = int(stats["successes"])
            elif name in saved and saved[name]["stamp"] == _stamp(path):
                counts[path] = int(saved[name]["samples"])
            else:
                to_count.append(path)
    found, saved_at = {}, time.monotonic()

    def save():  # what has been counted so far, so a killed count resumes where it stopped
        for folder, names in _by_folder(found).items():
            _save_counts(folder, cache_dir, {name: found[path] for name, path in names.items()})

    # Threads: on network or cold disks the pass waits on reads, which release the GIL.
    pool = ThreadPoolExecutor(COUNTING_THREADS)
    try:
        for path, samples in zip(to_count, tqdm(
                pool.map(count_tar_samples, to_count), total=len(to_count),
                desc="counting samples (once; the result is saved)", unit="shard",
                disable=not progress or not to_count, file=sys.stderr)):
            found[path] = samples
            if time.monotonic() - saved_at > 30:
                save()
                saved_at = time.monotonic()
    finally:  # also on Ctrl-C: keep what was counted, drop the queue
        pool.shutdown(wait=False, cancel_futures=True)
        save()
    counts.update(found)
    return {p: counts[p] for p in paths}


def _by_folder(paths):
    """{folder: {file name: path as given}}; "" for the current folder."""
    folders = {}
    for path in paths:
        folder, name = os.path.split(path)
        folders.setdefault(folder, {})[name] = path
    return folders


def write_json(path, value, **dump_options):
    """`value` as JSON in `path`, atomically: a temporary file, then a rename, so a kill mid-write
    leaves the old file or none, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, **dump_options)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); fix or delete it") from None


def _stamp(path):
    """What must not change for a saved count to stay valid: the file's size and mtime."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _cache_file(folder, cache_dir):
    cache_dir = cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pi-kit")
    digest = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"counts-{digest}.json")


def _saved_counts(folder, cache_dir):
    """Counts a counting pass saved, beside the shards or in cache_dir (the first that has a name
    wins)."""
    saved = {}
    for path in (_cache_file(folder, cache_dir), os.path.join(folder, COUNTS_FILE)):
        if os.path.exists(path):
            try:
                saved.update(_read_json(path).get("files", {}))
            except ValueError:
                pass  # a damaged cache only costs a recount
    return saved


def _save_counts(folder, cache_dir, counts):
    """Merge `counts` into the folder's counts file (written atomically), else into cache_dir."""
    entries = {n: {"samples": c, "stamp": _stamp(os.path.join(folder, n))}
               for n, c in counts.items()}
    for path in (os.path.join(folder, COUNTS_FILE), _cache_file(folder, cache_dir)):
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            old = _read_json(path).get("files", {}) if os.path.exists(path) else {}
            write_json(path, {"folder": os.path.abspath(folder), "files": {**old, **entries}},
                       sort_keys=True)
            return path
        except (OSError, ValueError):
            continue  # read-only folder: try the cache
    print(f"warning: could not save the sample counts of {folder} "
          "(read-only, and so is the cache)", file=sys.stderr)
    return None


def count_tar_samples(path):
    """Samples in one tar shard, from its headers (a plain tar's data is seeked over, never read).
    A shard that breaks off counts the samples before the break; an unreadable one counts 0."""
    return sum("problem" not in s for s in _tar_samples(path, start=None))


# --------------------------------------------------------------------------------------------------
# Reading a unit
# --------------------------------------------------------------------------------------------------

def read_unit(unit, start=0, image_column="images", text_column="texts"):
    """The unit's raw samples from index `start` on, as dicts {"key", "source", "image":
    bytes|None, "text": str|None, "tokens": list of numbers|None} (a caption that is not UTF-8 adds
    "bad": "bad_caption"); if the unit breaks off, a last {"problem":
    "truncated_shard"|"unreadable_file", "source", "error"}. Earlier samples are skipped as cheaply
    as the format allows: a plain tar seeks past their members, a parquet row group is sliced. The
    columns apply to parquet only."""
    if is_parquet(unit.path):
        return _parquet_samples(unit, start, image_column, text_column)
    return _tar_samples(unit.path, start)


# Where each sample's first header lies in the plain tars read last: a stream entering a tar in the
# middle then seeks there instead of parsing every header before it (the demo's 32 streams over 6
# shards parsed ~10 headers a sample). A few files only: real runs enter a tar mid-way rarely.
TAR_INDEX_FILES = 16
_tar_index = collections.OrderedDict()  # path -> (stamp, [header offset of sample 0, 1, ...])


def _tar_offsets(path):
    """The known header offsets of the samples of `path` (a list to extend); reset if it changed."""
    stamp = _stamp(path)
    if path not in _tar_index or _tar_index[path][0] != stamp:
        _tar_index[path] = (stamp, [])
    _tar_index.move_to_end(path)
    while len(_tar_index) > TAR_INDEX_FILES:
        _tar_index.popitem(last=False)
    return _tar_index[path][1]


def _tar_samples(path, start):
    """Samples of a tar from index `start` on. start=None counts: one {"key"} per sample, no data
    read."""
    source, count_only = str(path), start is None
    started, sample, index, offsets = False, None, -1, None
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if not count_only and not gzipped:
                offsets = _tar_offsets(str(path))
                if start > 0 and offsets:  # enter at the last known sample at or before `start`
                    index = min(start, len(offsets) - 1) - 1
                    raw.seek(offsets[index + 1])
            # Random-access mode over a seekable file: members whose data is not needed are seeked
            # over (gzip: decompressed and dropped), and nothing is ever read backwards.
            fileobj = gzip.GzipFile(fileobj=raw) if gzipped else raw
            with tarfile.open(fileobj=fileobj, mode="r:") as tar:
                while (member := tar.next()) is not None:
                    started = True
                    # tarfile keeps every header it reads; a shard's worth is not needed
                    tar.members.clear()
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    # webdataset skips names without an extension, and __meta__ members too
                    if key is None or META_MEMBER.match(member.name):
                        continue
                    # A new key, or an extension the sample already has, starts the next sample
                    # (webdataset's group_by_keys). The finished one goes out before this member is
                    # read, so a tar cut inside the new sample keeps the finished one.
                    if sample is None or key != sample["key"] or ext in sample["members"]:
                        if sample is not None and (count_only or sample["wanted"]):
                            yield _tar_sample(sample, source, count_only)
                        index += 1
                        # (a pax global header would apply to what follows: no index then)
                        if offsets is not None and index == len(offsets) and not tar.pax_headers:
                            offsets.append(member.offset)
                        sample = {"key": key, "members": {},
                                  "wanted": not count_only and index >= start}
                    sample["members"][ext] = (tar.extractfile(member).read() if sample["wanted"]
                                              else None)
                # tarfile ends quietly at a cut or a garbage header; a whole tar ends in a zero
                # block. Cut there, the last sample's members are whole: it is kept, then the cut
                # reported.
                fileobj.seek(tar.offset)
                end = fileobj.read(tarfile.BLOCKSIZE)
                if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                    if sample is not None and (count_only or sample["wanted"]):
                        yield _tar_sample(sample, source, count_only)
                    sample = None
                    raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}: "
                                            "the tar is cut or damaged")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # The sample being read when the tar broke may lack members: it is dropped with the rest.
        yield {"problem": "truncated_shard" if started else "unreadable_file", "source": source,
               "error": f"{type(e).__name__}: {e}"}
        return
    if sample is not None and (count_only or sample["wanted"]):
        yield _tar_sample(sample, source, count_only)


def _tar_sample(sample, source, count_only):
    if count_only:
        return {"key": sample["key"]}
    members = sample["members"]
    out = {"key": sample["key"], "source": source, "tokens": None, "text": None,
           "image": next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)}
    if "txt" in members:
        try:
            out["text"] = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            out["bad"] = "bad_caption"
    elif "ids" in members:  # a caption of CLIP token ids, as stage2/repack.py writes one
        try:
            out["tokens"] = [int(i) for i in members["ids"].split()]
        except ValueError:
            out["bad"] = "bad_caption"
    return out


def _parquet_columns(path, schema, image_column, text_column):
    """(image kind, text kind) of the two columns, or an error naming the file and its columns."""
    kinds = []
    for role, name in (("image_column", image_column), ("text_column", text_column)):
        if name not in schema.names:
            raise ValueError(f"{path}: no column {name!r} (the {role}); its columns are "
                             f"{schema.names}. Set --{role}=<one of them>")
        kind = schema.field(name).type
        if role == "image_column":
            if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
                kinds.append("binary")
                continue
            if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
                # the hub's Image feature: struct<bytes: binary, path: string>
                kinds.append("struct")
                continue
        else:
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                kinds.append("string")
                continue
            if ((pa.types.is_list(kind) or pa.types.is_large_list(kind)
                 or pa.types.is_fixed_size_list(kind))
                    and (pa.types.is_integer(kind.value_type)
                         or pa.types.is_floating(kind.value_type))):
                kinds.append("token_ids")  # e.g. Kaichengalex/YFCC15M's list<float32> of CLIP ids
                continue
        expected = ("binary, or a struct with a 'bytes' field" if role == "image_column"
                    else "string, or a list of token ids")
        raise ValueError(f"{path}: column {name!r} (the {role}) has type {kind}; "
                         f"expected {expected}")
    return kinds


def _parquet_samples(unit, start, image_column, text_column):
    source = f"{unit.path}#{unit.row_group}"
    try:
        parquet = pq.ParquetFile(unit.path)
    except Exception as e:
        yield {"problem": "unreadable_file", "source": source, "error": f"{type(e).__name__}: {e}"}
        return
    with parquet:
        yield from _row_group_samples(parquet, unit, source, start, image_column, text_column)


def _row_group_samples(parquet, unit, source, start, image_column, text_column):
    # Memory: pyarrow holds about twice the row group's column chunks while it is read. The hub's
    # datasets library writes image datasets in 100-row groups (~7.5 MB for YFCC15M).
    image_kind, text_kind = _parquet_columns(unit.path, parquet.schema_arrow, image_column,
                                             text_column)
    has_key = "key" in parquet.schema_arrow.names  # img2dataset's parquet output has one
    columns = ([image_column, text_column]
               + ["key"] * (has_key and "key" not in (image_column, text_column)))
    meta = parquet.metadata
    first_row = sum(meta.row_group(i).num_rows for i in range(max(unit.row_group, 0)))
    name = os.path.basename(unit.path)
    index, started = 0, False
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                          row_groups=[max(unit.row_group, 0)],
                                          columns=columns, use_threads=False):
            started = True
            if index + batch.num_rows <= start:  # a whole batch before `start`: nothing converted
                index += batch.num_rows
                continue
            batch = batch.slice(max(0, start - index))
            index = max(index, start)
            images = batch.column(image_column)
            if image_kind == "struct":
                images = pa.compute.struct_field(images, "bytes")  # a null struct gives a null here
            texts = batch.column(text_column).to_pylist()
            keys = batch.column("key").to_pylist() if has_key else None
            for i, image in enumerate(images.to_pylist()):
                text = texts[i]
                yield {"key": str(keys[i]) if has_key else f"{name}/{first_row + index + i}",
                       "source": source, "image": image,
                       "text": text if text_kind == "string" else None,
                       "tokens": text if text_kind == "token_ids" else None}
            index += batch.num_rows
    except (OSError, pa.ArrowException) as e:
        yield {"problem": "truncated_shard" if started else "unreadable_file", "source": source,
               "error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=CAPTION_CACHE)
def _text_tokens(text, context_length):
    """tokenize's row for one caption, kept: the demo's 3,000 captions come back every epoch, and
    CLIP's cleaning (ftfy) is most of a caption's cost. Callers copy it, never write to it."""
    return tokenize([text], context_length)[0]


def caption_tokens(sample, context_length=77):
    """A raw sample's caption as token ids, LongTensor (context_length,), or the skip reason.

    A str caption is tokenised as CLIP does (data.tokenize). A list of numbers is taken as CLIP
    token ids, its first context_length (Kaichengalex/YFCC15M's `texts` holds three 77-id blocks:
    raw caption, synthetic caption, generated caption; the PI fork trains on the first); ids that
    are not whole numbers inside the vocabulary, or a block without an end-of-text id, are
    "bad_caption".
    No caption (or only whitespace) is "no_caption".
    """
    if sample.get("bad"):
        return sample["bad"]
    text, ids = sample.get("text"), sample.get("tokens")
    if text is not None:
        return _text_tokens(text, context_length) if text.strip() else "no_caption"
    if ids is None or len(ids) == 0:
        return "no_caption"
    block = list(ids[:context_length])
    try:
        whole = [int(i) for i in block]
    except (TypeError, ValueError, OverflowError):  # None inside the list, NaN, inf
        return "bad_caption"
    if (any(w != i or not 0 <= w < VOCAB_SIZE for w, i in zip(whole, block))
            or END_OF_TEXT not in whole):
        return "bad_caption"
    return torch.tensor(whole + [0] * (context_length - len(whole)), dtype=torch.long)
