"""Everything between files on disk and tensors, with no model inside.

Sections, in the order a sample meets them:
  tokenizer     CLIP's byte-pair encoding, id-for-id equal to OpenAI CLIP / open_clip
  transforms    image preprocessing for training and evaluation (CLIP's mean / std)
  benchmark     the zero-shot tasks by name, where their folders sit, and the folders in
                CLIP_benchmark's on-disk format (evaluation)
Stage 2's streaming loader is stage2/shards.py (formats: stage2/formats.py; its augmentation:
stage2/augment.py). Stage 1's triplets (decode cache, batch order) are stage1/triplets.py, read
from NIGHTS by stage1/nights.py and from every other source by stage1/other_sources.py.

model.py never imports this file and this file never imports model.py: the data side and the model
side meet only where a model runs on data (the trainers, evaluate.py, analysis/probes.py,
world/pipeline.py).
"""
import gzip
import html
import io
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import regex
import torch
from PIL import Image, ImageFilter

ASSETS = Path(__file__).resolve().parent / "assets"


# --------------------------------------------------------------------------------------------------
# Tokenizer (CLIP BPE)
# --------------------------------------------------------------------------------------------------

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


def fix_text(text):
    """ftfy.fix_text, imported where it is first needed: a machine without ftfy (such as a GPU image
    with its own preinstalled software) can still import the kit and train on pre-tokenised or
    synthetic data; text that needs cleaning then fails here with the way out."""
    try:
        import ftfy
    except ImportError:
        raise ImportError("CLIP's text cleaning needs ftfy (requirements.txt): "
                          "`pip install ftfy==6.3.1`, or offline carry its wheel and wcwidth's as "
                          "docs/gpu-session.md shows") from None
    return ftfy.fix_text(text)


def clean_text(text):
    """CLIP's cleaning: fix mojibake, undo double HTML escaping, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
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


# --------------------------------------------------------------------------------------------------
# Image transforms
# --------------------------------------------------------------------------------------------------

# CLIP's normalisation statistics (OpenAI CLIP: github openai/CLIP, clip/clip.py _transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB") if image.mode != "RGB" else image


def _pil_gaussian_blur(image):
    """MoCo v2's blur: PIL's Gaussian (a standard deviation in pixels) with sigma uniform in
    [0.1, 2.0], drawn from torch's generator like torchvision's transforms."""
    sigma = 0.1 + 1.9 * torch.rand(()).item()
    return image.filter(ImageFilter.GaussianBlur(sigma))


def image_transform(image_size, kind="eval"):
    """PIL image -> normalised float tensor (3, image_size, image_size).

    kind:
      "eval"    Resize shorter side (bicubic) + CenterCrop: CLIP / CLIP_benchmark evaluation.
      "train"   RandomResizedCrop(scale 0.9-1, bicubic): open_clip's training default.
      "nights"  Resize to a square (bicubic), no crop, no augmentation: the PI fork's stage-1
                recipe, so that reference and distortions are seen whole and aligned.
      "moco"    the PI fork's stage-2 augmentation (MoCo v2): RandomResizedCrop(scale 0.2-1),
                ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5, flip.
    """
    # Imported here, not at the top: torchvision's import takes ~1.2 s (its models pull in
    # torch._dynamo), which every command, and its --help, would otherwise wait for.
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    normalize = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if kind == "eval":
        steps = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    elif kind == "train":
        steps = [T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)]
    elif kind == "nights":
        steps = [T.Resize((image_size, image_size), interpolation=bicubic)]
    elif kind == "moco":
        # MoCo v2 blurs with PIL (moco/loader.py GaussianBlur: ImageFilter.GaussianBlur(sigma)), ~5x
        # faster than torchvision's 23-px kernel. Stage 2 itself runs stage2/augment.py's
        # TrainTransform, the same augmentation split between the loader's workers (host_half) and
        # the device (device_half).
        steps = [
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([_pil_gaussian_blur], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    else:
        raise ValueError(f"unknown transform kind {kind!r}: expected eval, train, nights or moco")
    return T.Compose([T.Lambda(_to_rgb), *steps, *normalize])


# --------------------------------------------------------------------------------------------------
# CLIP_benchmark task folders
# --------------------------------------------------------------------------------------------------

# A task folder, as CLIP_benchmark publishes every task (github LAION-AI/CLIP_benchmark,
# clip_benchmark/datasets/builder.py build_wds_dataset; its clip-benchmark/wds_* sets on the
# Hugging Face hub):
#   <root>/test/nshards.txt, <root>/test/0.tar ... (N-1).tar, classnames.txt,
#   zeroshot_classification_templates.txt, dataset_type.txt (absent = classification).
# Samples are grouped the way webdataset groups them: the key is a member's path up to the first dot
# of its file name, the extension (lowercased) is the rest. Images come as webp / png / jpg / jpeg
# (the first present wins, in that order, as in CLIP_benchmark), labels as cls (an integer), npy
# (a multi-hot vector) or txt (captions, one per line).
# The reader indexes each shard's members once (name -> byte offset) and then reads samples by
# index, so a DataLoader can spread one shard over many workers and the order stays the tar order.

# The tasks by name: the PI paper's 31 (CLIP_benchmark's names), the groups evaluate.py's --suite
# takes, and where each task's folder may sit under a data root (evaluate.py and analysis/probes.py
# both look them up).
CLASSIFICATION_TASKS = [
    "imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-o", "imagenet-r",
    "objectnet", "cifar10", "vtab/cifar100", "vtab/caltech101", "vtab/dtd", "vtab/eurosat",
    "vtab/flowers", "vtab/pets", "vtab/pcam", "vtab/resisc45", "vtab/svhn", "vtab/clevr_count_all",
    "vtab/clevr_closest_object_distance", "vtab/kitti_closest_vehicle_distance", "cars",
    "fgvc_aircraft", "food101", "country211", "gtsrb", "mnist", "stl10", "renderedsst2", "voc2007",
]
RETRIEVAL_TASKS = ["flickr30k", "mscoco_captions"]
GROUPS = {
    "all": CLASSIFICATION_TASKS + RETRIEVAL_TASKS,  # the 31 tasks of the PI paper's table
    "imagenet": CLASSIFICATION_TASKS[:7],  # ImageNet and its six distribution shifts
    "vtab": [t for t in CLASSIFICATION_TASKS if t.startswith("vtab/")],
    "retrieval": RETRIEVAL_TASKS,
}


def task_dir_candidates(data_root, task):
    """The folders `task` may live in under data_root, in the order tried: CLIP_benchmark's hub name
    wds_<task> ('/' -> '-'), DataComp's download name wds_<task>_test, and for ImageNet
    imagenet1k/val."""
    name = "wds_" + task.replace("/", "-")
    candidates = [Path(data_root) / name, Path(data_root) / (name + "_test")]
    return candidates + ([Path(data_root) / "imagenet1k" / "val"] if task == "imagenet1k" else [])


def task_dir(data_root, task):
    """The first of task_dir_candidates that exists, else None."""
    return next((p for p in task_dir_candidates(data_root, task) if p.is_dir()), None)


def missing_task_message(data_root, task):
    return f"{task} (tried {' and '.join(map(str, task_dir_candidates(data_root, task)))})"


def resolve_tasks(suite, data_root):
    """A group name (all, imagenet, vtab, retrieval, demo) or comma-separated task names -> task
    list. demo: the tasks listed in <data_root>/tasks.txt (one name a line), else every wds_* folder
    there."""
    if suite in GROUPS:
        return list(GROUPS[suite])
    if suite == "demo":
        listing = Path(data_root) / "tasks.txt"
        if listing.exists():
            names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        else:
            names = sorted(p.name for p in Path(data_root).glob("wds_*") if p.is_dir())
        return list(dict.fromkeys(n.removeprefix("wds_").removesuffix("_test") for n in names))
    return [t.strip() for t in suite.split(",") if t.strip()]


BENCHMARK_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
BENCHMARK_TASK_TYPES = ("classification", "retrieval", "multilabel")
_LABEL_EXT = {"classification": "cls", "multilabel": "npy", "retrieval": "txt"}


def split_member_name(name):
    """'dir/000123.JPG' -> ('dir/000123', 'jpg'); the key ends at the first dot of the file name
    (webdataset's rule), so '0001.seg.png' has extension 'seg.png'. No dot -> (None, None)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


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
                key, ext = split_member_name(member.name)
                if key is None or key.rpartition("/")[2].startswith("__"):
                    continue  # no extension, or webdataset's __meta__ members
                if key not in by_key:
                    by_key[key] = {}
                    samples.append((key, by_key[key]))
                by_key[key][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable (uncompressed) tar shard: {e}") from None
    return samples


class BenchmarkTask(torch.utils.data.Dataset):
    """One zero-shot task folder in CLIP_benchmark's format, as a map-style dataset.

    Attributes: root, task_type ("classification" | "retrieval" | "multilabel"), classnames,
    templates (lists of str; empty for retrieval). Items: (image, label) with label an int
    (classification), a float tensor of 0/1 per class (multilabel) or a list of captions
    (retrieval). `transform` maps the PIL image (None keeps it). Any file at fault is named in the
    error.
    """

    def __init__(self, root, transform=None, split="test"):
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"benchmark task folder {self.root} does not exist")
        type_file = self.root / "dataset_type.txt"
        self.task_type = (type_file.read_text().strip().lower() if type_file.exists()
                          else "classification")
        if self.task_type not in BENCHMARK_TASK_TYPES:
            raise ValueError(f"{type_file}: unknown dataset type {self.task_type!r}; "
                             f"expected one of {BENCHMARK_TASK_TYPES}")
        self.classnames, self.templates = [], []
        if self.task_type != "retrieval":
            for attr, name in (("classnames", "classnames.txt"),
                               ("templates", "zeroshot_classification_templates.txt")):
                if not (self.root / name).exists():
                    raise FileNotFoundError(f"{self.root / name} is missing "
                                            "(needed for zero-shot classification)")
                setattr(self, attr, _read_lines(self.root / name))
                if not getattr(self, attr):
                    raise ValueError(f"{self.root / name} is empty")
            bad = [t for t in self.templates if "{c}" not in t]
            if bad:
                raise ValueError(f"{self.root / 'zeroshot_classification_templates.txt'}: "
                                 f"template(s) without '{{c}}': {bad[:3]}")
        nshards_file = self.root / split / "nshards.txt"
        try:
            nshards = int(nshards_file.read_text().strip())
        except FileNotFoundError:
            raise FileNotFoundError(f"{nshards_file} is missing "
                                    "(it holds the number of tar shards)") from None
        except ValueError:
            raise ValueError(f"{nshards_file}: expected one integer, "
                             f"got {nshards_file.read_text()[:40]!r}") from None
        self.shards = [self.root / split / f"{i}.tar" for i in range(nshards)]
        self._items = []  # (shard index, key, image (offset, size), label (offset, size))
        label_ext = _LABEL_EXT[self.task_type]
        for shard_index, shard in enumerate(self.shards):
            if not shard.exists():
                raise FileNotFoundError(f"{shard} is missing "
                                        f"({nshards_file} says {nshards} shards)")
            for key, parts in _index_tar(shard):
                image_ext = next((e for e in BENCHMARK_IMAGE_EXTS if e in parts), None)
                if image_ext is None or label_ext not in parts:
                    raise ValueError(f"{shard}: sample {key!r} has {sorted(parts)}; a "
                                     f"{self.task_type} sample needs an image "
                                     f"({'|'.join(BENCHMARK_IMAGE_EXTS)}) and a .{label_ext}")
                self._items.append((shard_index, key, parts[image_ext], parts[label_ext]))
        if not self._items:
            raise ValueError(f"{self.root / split}: the shards hold no samples")
        self._files = {}  # open shard files, per process (DataLoader workers each open their own)
        if self.task_type == "classification":
            self._check_labels()

    def _check_labels(self):
        """Every label names a class of classnames.txt: a label past its end would be scored
        against a class that has no prompt (silently, by chance)."""
        for shard_index, key, _, label_at in self._items:
            text = self._read(shard_index, *label_at).decode("utf-8", "replace").strip()
            if not text.lstrip("-").isdigit() or not 0 <= int(text) < len(self.classnames):
                raise ValueError(
                    f"{self.shards[shard_index]}: sample {key!r} has label {text!r}, but "
                    f"{self.root / 'classnames.txt'} lists {len(self.classnames)} classes "
                    f"(labels 0 .. {len(self.classnames) - 1}): the two files do not belong "
                    "together")
        for handle in self._files.values():
            handle.close()
        self._files.clear()

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
            raise ValueError(f"{self.shards[shard_index]}: "
                             f"cannot decode sample {key!r}: {e}") from e
        return (self.transform(image) if self.transform else image), label

    def __getstate__(self):  # open files do not travel to DataLoader workers
        return {**self.__dict__, "_files": {}}


class ImageFolderTask(BenchmarkTask):
    """ImageNet's validation set in ImageFolder layout (root/<class folder>/*.JPEG) as a
    classification task. Class folders are sorted (numerically when every name is a number) to give
    labels 0..C-1, which is ImageNet's label order for WordNet-id folder names."""

    def __init__(self, root, classnames, templates, transform=None):
        self.root, self.transform = Path(root), transform
        self.task_type, self.classnames, self.templates = (
            "classification", list(classnames), list(templates))
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        folders = [d.name for d in self.root.iterdir() if d.is_dir()]
        folders.sort(key=(lambda n: int(n)) if all(n.isdigit() for n in folders) else None)
        if len(folders) != len(self.classnames):
            raise ValueError(f"{self.root}: {len(folders)} class folders, "
                             f"but {len(self.classnames)} class names")
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
    """OpenAI's 1000 ImageNet class names and 80 templates (shipped in assets/, from
    CLIP_benchmark)."""
    return (_read_lines(ASSETS / "imagenet1k_classnames.txt"),
            _read_lines(ASSETS / "imagenet1k_templates.txt"))
