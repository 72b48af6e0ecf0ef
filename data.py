"""Everything between files on disk and tensors, with no model inside.

Sections, in the order a sample meets them:
  tokenizer     CLIP's byte-pair encoding, id-for-id equal to OpenAI CLIP / open_clip
  transforms    image preprocessing for training and evaluation (CLIP's mean / std)
  tar shards    image-text shards in the webdataset / img2dataset format (stage 2)
  NIGHTS        2AFC triplets with human votes in DreamSim's layout (stage 1)
  benchmark     zero-shot task folders in CLIP_benchmark's on-disk format (evaluation)

model.py never imports this file and this file never imports model.py: the data side and the model
side meet only in the three scripts.
"""
import csv
import functools
import gzip
import hashlib
import html
import io
import json
import math
import os
import random
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
from PIL import Image
from torchvision import transforms as T

ASSETS = Path(__file__).resolve().parent / "assets"


# ---------------------------------------------------------------------------------------------------
# Tokenizer (CLIP BPE)
# ---------------------------------------------------------------------------------------------------

# CLIP's tokenizer: clean the text, split it into words with a regex, turn each word into UTF-8
# bytes shown as printable characters, then merge adjacent symbols by the learned merge ranks
# (byte-pair encoding). Every step matches OpenAI CLIP / open_clip exactly, because a pretrained
# text tower only understands the ids it was trained on.

CONTEXT_LENGTH = 77  # every CLIP text tower has 77 positions (SOT + up to 75 tokens + EOT)
END_OF_WORD = "</w>"  # marks a word's last symbol: "a" inside a word and "a" ending one differ
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

# Words are split first so that merges never cross a word; contractions stay their own words.
WORD_PATTERN = regex.compile(
    "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode():
    """GPT-2's table byte -> printable character; the vocabulary's first 256 entries, in this order.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) move to
    characters 256, 257, ... so that no vocabulary entry holds whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return table


def clean_text(text):
    """CLIP's cleaning: fix mojibake, undo double HTML escaping, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()  # str.split(): the whitespace set open_clip collapses


class Tokenizer:
    """CLIP BPE: text -> token ids (encode) and back (decode); 49,408 ids, SOT 49406, EOT 49407."""

    def __init__(self, vocab_path=ASSETS / "bpe_simple_vocab_16e6.txt.gz", word_cache_size=10**6):
        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        # Line 0 is a header; CLIP keeps the first 48,894 merges so the vocabulary totals 49,408.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
        vocab += ["".join(merge) for merge in merges] + list(SPECIAL_TOKENS)
        self.encoder = {symbol: index for index, symbol in enumerate(vocab)}
        self.decoder = {index: symbol for symbol, index in self.encoder.items()}
        self.merge_rank = {merge: rank for rank, merge in enumerate(merges)}  # lowest merges first
        # {byte: symbol}: UTF-8 bytes read as Latin-1 are code points 0-255, so one str.translate
        # maps a whole word to its printable symbols (and symbol_to_byte maps them back in decode).
        self.byte_to_symbol = bytes_to_unicode()
        self.symbol_to_byte = {ord(symbol): byte for byte, symbol in self.byte_to_symbol.items()}
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder["<start_of_text>"]
        # EOT is the largest id: the text tower pools at argmax(ids), which relies on that.
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.word_cache_size = word_cache_size
        self.word_cache = {special: [self.encoder[special]] for special in SPECIAL_TOKENS}

    def bpe(self, word):
        """Word in printable symbols -> vocabulary symbols, merging the lowest-ranked pair first."""
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = zip(symbols[:-1], symbols[1:])
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, math.inf))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode_word(self, word):
        """One pre-token -> ids, cached: captions repeat words, so BPE runs once per new word."""
        ids = self.word_cache.get(word)
        if ids is None:
            symbols = word.encode("utf-8").decode("latin-1").translate(self.byte_to_symbol)
            ids = [self.encoder[symbol] for symbol in self.bpe(symbols)]
            if len(self.word_cache) >= self.word_cache_size:  # bound memory on endless web captions
                self.word_cache = {special: [self.encoder[special]] for special in SPECIAL_TOKENS}
            self.word_cache[word] = ids
        return ids

    def encode(self, text):
        """Text -> token ids, no SOT / EOT. A literal '<start_of_text>' in the text becomes SOT."""
        words = WORD_PATTERN.findall(clean_text(text))
        return [token_id for word in words for token_id in self.encode_word(word)]

    def decode(self, ids):
        """Token ids -> text as open_clip: each word ends in a space ('</w>'), specials by name."""
        symbols = "".join(self.decoder[int(token_id)] for token_id in ids)
        utf8 = symbols.translate(self.symbol_to_byte).encode("latin-1")
        return utf8.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")


_tokenizer = None  # built on first use (~0.1 s to read the merges): importing data.py stays cheap


def tokenize(texts, context_length=CONTEXT_LENGTH):
    """str or list of str -> LongTensor (N, context_length): SOT, ids, EOT, then zero padding.

    Text that does not fit is cut to context_length and its last id set to EOT (open_clip's rule;
    OpenAI's clip.tokenize raises unless truncate=True), so every row keeps an EOT to pool at.
    """
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = Tokenizer()
    if isinstance(texts, str):
        texts = [texts]
    sot, eot = _tokenizer.sot_token_id, _tokenizer.eot_token_id
    rows = []
    for text in texts:
        ids = [sot, *_tokenizer.encode(text), eot]
        if len(ids) > context_length:
            ids = ids[: context_length - 1] + [eot]
        rows.append(ids + [0] * (context_length - len(ids)))  # pad with 0
    return torch.tensor(rows, dtype=torch.long).view(len(rows), context_length)  # one copy, not N


# ---------------------------------------------------------------------------------------------------
# Image transforms
# ---------------------------------------------------------------------------------------------------

# CLIP's normalisation statistics (OpenAI CLIP, REFERENCE.md section 7).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB") if image.mode != "RGB" else image


def image_transform(image_size, kind="eval"):
    """PIL image -> normalised float tensor (3, image_size, image_size).

    kind:
      "eval"    Resize shorter side (bicubic) + CenterCrop: CLIP / CLIP_benchmark evaluation.
      "train"   RandomResizedCrop(scale 0.9-1, bicubic): open_clip's training default.
      "nights"  Resize to a square (bicubic), no crop, no augmentation: the PI fork's stage-1 recipe,
                so that reference and distortions are seen whole and aligned.
      "moco"    the PI fork's stage-2 augmentation (MoCo v2): RandomResizedCrop(scale 0.2-1),
                ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5, flip.
    """
    bicubic = T.InterpolationMode.BICUBIC
    normalize = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if kind == "eval":
        steps = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    elif kind == "train":
        steps = [T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)]
    elif kind == "nights":
        steps = [T.Resize((image_size, image_size), interpolation=bicubic)]
    elif kind == "moco":
        # blur kernel ~10% of the image, odd, as in MoCo v2 (23 px at 224).
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        steps = [
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    else:
        raise ValueError(f"unknown transform kind {kind!r}: expected eval, train, nights or moco")
    return T.Compose([T.Lambda(_to_rgb), *steps, *normalize])


# ---------------------------------------------------------------------------------------------------
# Tar shards (webdataset / img2dataset format)
# ---------------------------------------------------------------------------------------------------

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


def _split_name(name):
    """'dir/000123.JPG' -> ('dir/000123', 'jpg'); the key ends at the first dot of the file name
    (webdataset's rule), so '0001.seg.png' has extension 'seg.png'. No dot -> (None, None)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


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
                key, ext = _split_name(member.name)
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

    def __init__(self, dataset, batch_size, batches_per_epoch, workers=0, pin_memory=False):
        self.num_streams = max(1, workers)
        self.batches = _StreamBatches(dataset, batch_size, batches_per_epoch, self.num_streams)
        self.batches_per_epoch = batches_per_epoch
        self.loader = torch.utils.data.DataLoader(
            self.batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
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


# ---------------------------------------------------------------------------------------------------
# NIGHTS triplets (DreamSim's layout)
# ---------------------------------------------------------------------------------------------------

# NIGHTS (DreamSim, Fu et al. 2023): triplets of Stable Diffusion images, a reference and two
# variations, with the votes of human observers on which variation looks closer to the reference.
#   nights/data.csv                         one row per triplet (columns read by name, any order)
#   nights/ref/000/000.png                  the reference
#   nights/distort/000/000_0.png, _1.png    the "left" (_0) and "right" (_1) variations
# Paths in the csv are relative to the root. REFERENCE.md section 3.

NIGHTS_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
NIGHTS_COLUMNS = ("left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split", "is_imagenet")


def _csv_bool(value):
    """is_imagenet is written True / False by pandas, 1 / 0 by other tools: accept each."""
    text = value.strip().lower()
    if text in ("true", "1", "1.0", "yes"):
        return True
    if text in ("false", "0", "0.0", "no"):
        return False
    raise ValueError(f"expected True/False/1/0, got {value!r}")


def _csv_int(value):
    number = float(value)  # "6" and "6.0" both occur in csv files written from dataframes
    if not number.is_integer():
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


class NightsDataset(torch.utils.data.Dataset):
    """One split of NIGHTS -> items (ref, left, right, p), p = right_vote / votes: the share of
    observers who judged the right image (`_1`) closer to the reference.

    Rows with fewer than `min_votes` votes are dropped (6: the unanimous ~20k triplets the PI fork
    trains on). test_imagenet / test_no_imagenet are the test rows filtered on is_imagenet.
    A missing image is an error naming the file and its csv line, unless skip_missing, which drops
    the row and counts it. `.counts` says how many rows of the split each filter removed.
    """

    def __init__(self, root, split, transform, min_votes=6, skip_missing=False):
        if split not in NIGHTS_SPLITS:
            raise ValueError(f"unknown NIGHTS split {split!r}; expected one of {', '.join(NIGHTS_SPLITS)}")
        self.root, self.split, self.transform = Path(root), split, transform
        csv_path = self.root / "data.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"no NIGHTS table at {csv_path} (expected data.csv in data_root)")
        base_split, imagenet = {"test_imagenet": ("test", True), "test_no_imagenet": ("test", False)}.get(split, (split, None))
        self.rows, self.p = [], []  # rows: (csv line, ref path, left path, right path)
        self.counts = {"in_split": 0, "few_votes": 0, "missing_images": 0, "triplets": 0}
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)  # quoted fields may hold commas, quotes and newlines
            absent = [c for c in NIGHTS_COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{csv_path} lacks column(s) {', '.join(absent)} (found: {', '.join(reader.fieldnames or [])})")
            for row in reader:
                where = f"{csv_path} line {reader.line_num}"
                try:
                    if row["split"].strip() != base_split or (imagenet is not None and _csv_bool(row["is_imagenet"]) != imagenet):
                        continue
                    votes, right_vote = _csv_int(row["votes"]), _csv_int(row["right_vote"])
                except (ValueError, AttributeError) as e:
                    raise ValueError(f"{where}: {e}") from None
                self.counts["in_split"] += 1
                if votes < min_votes:
                    self.counts["few_votes"] += 1
                    continue
                paths = [self.root / row[c].strip() for c in ("ref_path", "left_path", "right_path")]
                missing = [str(p) for p in paths if not p.is_file()]
                if missing:
                    if not skip_missing:
                        raise FileNotFoundError(f"{where}: image {missing[0]} does not exist (use skip_missing to drop such rows)")
                    self.counts["missing_images"] += 1
                    continue
                self.rows.append((reader.line_num, *paths))
                self.p.append(right_vote / votes)
        self.p = torch.tensor(self.p, dtype=torch.float32)
        self.counts["triplets"] = len(self.rows)

    def __len__(self):
        return len(self.rows)

    def _image(self, path, line):
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated / foreign files
            raise OSError(f"{self.root / 'data.csv'} line {line}: cannot read image {path}: {e}") from None

    def __getitem__(self, i):
        line, ref, left, right = self.rows[i]
        return self._image(ref, line), self._image(left, line), self._image(right, line), self.p[i]


# ---------------------------------------------------------------------------------------------------
# CLIP_benchmark task folders
# ---------------------------------------------------------------------------------------------------

# A task folder, as CLIP_benchmark publishes every task (REFERENCE.md section 10):
#   <root>/test/nshards.txt, <root>/test/0.tar ... (N-1).tar, classnames.txt,
#   zeroshot_classification_templates.txt, dataset_type.txt (absent = classification).
# Samples are grouped the way webdataset groups them: the key is a member's path up to the first dot
# of its file name, the extension (lowercased) is the rest. Images come as webp / png / jpg / jpeg
# (the first present wins, in that order, as in CLIP_benchmark), labels as cls (an integer), npy
# (a multi-hot vector) or txt (captions, one per line).
# The reader indexes each shard's members once (name -> byte offset) and then reads samples by
# index, so a DataLoader can spread one shard over many workers and the order stays the tar order.

BENCHMARK_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
BENCHMARK_TASK_TYPES = ("classification", "retrieval", "multilabel")
_LABEL_EXT = {"classification": "cls", "multilabel": "npy", "retrieval": "txt"}


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def _index_tar(path):
    """[(key, {ext: (offset, size)})] in tar order, for the plain files of one shard."""
    samples, by_key = [], {}
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: members must be seekable
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot or stem.startswith("__"):
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if key not in by_key:
                    by_key[key] = {}
                    samples.append((key, by_key[key]))
                by_key[key][ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable (uncompressed) tar shard: {e}") from None
    return samples


class BenchmarkTask(torch.utils.data.Dataset):
    """One zero-shot task folder in CLIP_benchmark's format, as a map-style dataset.

    Attributes: root, task_type ("classification" | "retrieval" | "multilabel"), classnames,
    templates (lists of str; empty for retrieval). Items: (image, label) with label an int
    (classification), a float tensor of 0/1 per class (multilabel) or a list of captions (retrieval).
    `transform` maps the PIL image (None keeps it). Any file at fault is named in the error.
    """

    def __init__(self, root, transform=None, split="test"):
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"benchmark task folder {self.root} does not exist")
        type_file = self.root / "dataset_type.txt"
        self.task_type = type_file.read_text().strip().lower() if type_file.exists() else "classification"
        if self.task_type not in BENCHMARK_TASK_TYPES:
            raise ValueError(f"{type_file}: unknown dataset type {self.task_type!r}; expected one of {BENCHMARK_TASK_TYPES}")
        self.classnames, self.templates = [], []
        if self.task_type != "retrieval":
            for attr, name in (("classnames", "classnames.txt"), ("templates", "zeroshot_classification_templates.txt")):
                if not (self.root / name).exists():
                    raise FileNotFoundError(f"{self.root / name} is missing (needed for zero-shot classification)")
                setattr(self, attr, _read_lines(self.root / name))
                if not getattr(self, attr):
                    raise ValueError(f"{self.root / name} is empty")
            bad = [t for t in self.templates if "{c}" not in t]
            if bad:
                raise ValueError(f"{self.root / 'zeroshot_classification_templates.txt'}: template(s) without '{{c}}': {bad[:3]}")
        nshards_file = self.root / split / "nshards.txt"
        try:
            nshards = int(nshards_file.read_text().strip())
        except FileNotFoundError:
            raise FileNotFoundError(f"{nshards_file} is missing (it holds the number of tar shards)") from None
        except ValueError:
            raise ValueError(f"{nshards_file}: expected one integer, got {nshards_file.read_text()[:40]!r}") from None
        self.shards = [self.root / split / f"{i}.tar" for i in range(nshards)]
        self._items = []  # (shard index, key, image (offset, size), label (offset, size))
        label_ext = _LABEL_EXT[self.task_type]
        for shard_index, shard in enumerate(self.shards):
            if not shard.exists():
                raise FileNotFoundError(f"{shard} is missing ({nshards_file} says {nshards} shards)")
            for key, parts in _index_tar(shard):
                image_ext = next((e for e in BENCHMARK_IMAGE_EXTS if e in parts), None)
                if image_ext is None or label_ext not in parts:
                    raise ValueError(f"{shard}: sample {key!r} has {sorted(parts)}; a {self.task_type} sample needs "
                                     f"an image ({'|'.join(BENCHMARK_IMAGE_EXTS)}) and a .{label_ext}")
                self._items.append((shard_index, key, parts[image_ext], parts[label_ext]))
        if not self._items:
            raise ValueError(f"{self.root / split}: the shards hold no samples")
        self._files = {}  # open shard files, per process (DataLoader workers each open their own)

    def __len__(self):
        return len(self._items)

    def _read(self, shard_index, offset, size):
        handle = self._files.get((os.getpid(), shard_index))
        if handle is None:
            handle = self._files[(os.getpid(), shard_index)] = open(self.shards[shard_index], "rb")
        handle.seek(offset)
        return handle.read(size)

    def __getitem__(self, index):
        shard_index, key, image_at, label_at = self._items[index]
        raw_label = self._read(shard_index, *label_at)
        try:
            image = Image.open(io.BytesIO(self._read(shard_index, *image_at)))
            image.load()
            if self.task_type == "classification":
                label = int(raw_label.decode("utf-8").strip())
            elif self.task_type == "multilabel":
                label = torch.as_tensor(np.load(io.BytesIO(raw_label)), dtype=torch.float32)
            else:
                label = raw_label.decode("utf-8").splitlines()
        except Exception as e:
            raise ValueError(f"{self.shards[shard_index]}: cannot decode sample {key!r}: {e}") from e
        return (self.transform(image) if self.transform else image), label

    def __getstate__(self):  # open files do not travel to DataLoader workers
        return {**self.__dict__, "_files": {}}


class ImageFolderTask(BenchmarkTask):
    """ImageNet's validation set in ImageFolder layout (root/<class folder>/*.JPEG) as a classification
    task. Class folders are sorted (numerically when every name is a number) to give labels 0..C-1,
    which is ImageNet's label order for WordNet-id folder names."""

    def __init__(self, root, classnames, templates, transform=None):
        self.root, self.transform = Path(root), transform
        self.task_type, self.classnames, self.templates = "classification", list(classnames), list(templates)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        folders = [d.name for d in self.root.iterdir() if d.is_dir()]
        folders.sort(key=(lambda n: int(n)) if all(n.isdigit() for n in folders) else None)
        if len(folders) != len(self.classnames):
            raise ValueError(f"{self.root}: {len(folders)} class folders, but {len(self.classnames)} class names")
        exts = (".jpeg", ".jpg", ".png", ".webp")
        self._paths = [(str(p), label) for label, name in enumerate(folders)
                       for p in sorted((self.root / name).iterdir()) if p.suffix.lower() in exts]
        if not self._paths:
            raise ValueError(f"{self.root}: no images found in the class folders")

    def __len__(self):
        return len(self._paths)

    def __getitem__(self, index):
        path, label = self._paths[index]
        with Image.open(path) as image:
            image.load()
            return (self.transform(image) if self.transform else image), label

    def __getstate__(self):
        return dict(self.__dict__)


def imagenet_classnames_and_templates():
    """OpenAI's 1000 ImageNet class names and 80 templates (shipped in assets/, from CLIP_benchmark)."""
    return _read_lines(ASSETS / "imagenet1k_classnames.txt"), _read_lines(ASSETS / "imagenet1k_templates.txt")
