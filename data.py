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

# (NIGHTS: written by the stage-1 issue)


# ---------------------------------------------------------------------------------------------------
# CLIP_benchmark task folders
# ---------------------------------------------------------------------------------------------------

# (benchmark folders: written by the evaluation issue)
