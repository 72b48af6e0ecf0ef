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

# (written by the evaluation issue)


# ---------------------------------------------------------------------------------------------------
# The demo world
# ---------------------------------------------------------------------------------------------------

# (written by the embedded-default issue)
