"""Makes data in the kit's three real formats, for runs without the real datasets.

  python make_data.py --out data/demo            # the embedded default's whole data set

Writers (one per real format, so that made data goes through the same loaders as real data):
  NIGHTS        data.csv + ref/ + distort/ in DreamSim's layout
  tar shards    image-text shards in the webdataset / img2dataset format
  benchmark     zero-shot task folders in CLIP_benchmark's on-disk format
and a small generated world of scenes with known perceptual structure (see DEMO section below).
Imports nothing of the model.
"""
import argparse
import csv
import io
import json
import math
import os
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


# ---------------------------------------------------------------------------------------------------
# NIGHTS writer
# ---------------------------------------------------------------------------------------------------

# (written by the stage-1 issue)


# ---------------------------------------------------------------------------------------------------
# Tar shard writer
# ---------------------------------------------------------------------------------------------------

def write_shards(out_dir, samples, per_shard, prefix=""):
    """Write (key, {ext: bytes or str}) samples into tar shards `{prefix}00000.tar, ...` of
    `per_shard` samples each, in the webdataset / img2dataset layout (key.ext members, one sample's
    members together), plus sizes.json {shard name: samples} as webdataset's tools write it (the
    trainer reads epoch lengths from it). Members get fixed metadata, so equal input gives equal
    bytes. Returns the shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, sizes, tar = [], {}, None
    for i, (key, members) in enumerate(samples):
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            paths.append(out_dir / f"{prefix}{len(paths):05d}.tar")
            tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            sizes[paths[-1].name] = 0
        for ext, value in members.items():
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        sizes[paths[-1].name] += 1
    if tar is not None:
        tar.close()
    sizes_path = out_dir / "sizes.json"
    if sizes_path.exists():  # shards with another prefix may share the folder
        sizes = {**json.loads(sizes_path.read_text()), **sizes}
    sizes_path.write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    return [str(p) for p in paths]


# ---------------------------------------------------------------------------------------------------
# CLIP_benchmark task writer
# ---------------------------------------------------------------------------------------------------

_SAVE_OPTIONS = {"png": dict(format="PNG"), "webp": dict(format="WEBP", lossless=True), "jpg": dict(format="JPEG", quality=95)}


def _add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed mtime: same samples, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_benchmark_task(root, samples, classnames=None, templates=None, task_type="classification",
                         image_format="png", per_shard=10_000):
    """Write one zero-shot task folder in CLIP_benchmark's published format (see data.BenchmarkTask).

    samples: (PIL image, int label) for classification, (PIL image, [captions]) for retrieval,
    (PIL image, 0/1 sequence per class) for multilabel. Keys are s0000000, s0000001, ... as in
    clip_benchmark's converter; images are lossless png (or webp / jpg). Returns the shard paths.
    """
    if task_type not in ("classification", "retrieval", "multilabel"):
        raise ValueError(f"task_type must be classification, retrieval or multilabel, got {task_type!r}")
    if task_type != "retrieval" and not (classnames and templates):
        raise ValueError(f"a {task_type} task needs classnames and templates")
    if image_format not in _SAVE_OPTIONS:
        raise ValueError(f"image_format must be one of {sorted(_SAVE_OPTIONS)}, got {image_format!r}")
    root = Path(root)
    (root / "test").mkdir(parents=True, exist_ok=True)
    if task_type != "retrieval":
        (root / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames))
        (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in templates))
    if task_type != "classification":  # clip_benchmark writes the file only for the other two types
        (root / "dataset_type.txt").write_text(task_type + "\n")
    shards, tar = [], None
    for index, (image, label) in enumerate(samples):
        if index % per_shard == 0:
            if tar is not None:
                tar.close()
            shards.append(root / "test" / f"{len(shards)}.tar")
            tar = tarfile.open(shards[-1], "w")
        key = f"s{index:07d}"
        buffer = io.BytesIO()
        image.save(buffer, **_SAVE_OPTIONS[image_format])
        _add_member(tar, f"{key}.{image_format}", buffer.getvalue())
        if task_type == "classification":
            _add_member(tar, f"{key}.cls", str(int(label)).encode())
        elif task_type == "multilabel":
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(label))
            _add_member(tar, f"{key}.npy", buffer.getvalue())
        else:
            if isinstance(label, str) or not label:
                raise ValueError(f"sample {index}: a retrieval sample needs a non-empty list of captions, got {label!r}")
            _add_member(tar, f"{key}.txt", "\n".join(c.replace("\n", " ") for c in label).encode("utf-8"))
    if tar is None:
        raise ValueError(f"no samples given for {root}")
    tar.close()
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    return [str(s) for s in shards]


# ---------------------------------------------------------------------------------------------------
# The demo world
# ---------------------------------------------------------------------------------------------------

# (written by the embedded-default issue)
