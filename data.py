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
import html
import io
import json
import math
import os
import random
import tarfile
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

# (tokenizer: written by the foundation issue)


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

# (tar shards: written by the stage-2 issue)


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

# (benchmark folders: written by the evaluation issue)
