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

NIGHTS_CSV_COLUMNS = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split",
                      "is_imagenet", "prompt"]


def write_nights(root, triplets):
    """Write triplets in NIGHTS' layout (REFERENCE.md section 3): data.csv + ref/NNN/III.png +
    distort/NNN/III_0.png (left) and III_1.png (right). Each triplet is a dict with PIL images ref,
    left, right, ints left_vote, right_vote, str split, bool is_imagenet, str prompt. The csv module
    quotes prompts that hold commas or quotes. Returns the path of data.csv."""
    root = Path(root)
    rows = []
    for i, t in enumerate(triplets):
        folder, name = f"{i // 100:03d}", f"{i % 100:03d}"
        paths = {"ref_path": f"ref/{folder}/{name}.png", "left_path": f"distort/{folder}/{name}_0.png",
                 "right_path": f"distort/{folder}/{name}_1.png"}
        for column, image in zip(paths, (t["ref"], t["left"], t["right"])):
            (root / paths[column]).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / paths[column])
        rows.append({"id": i, "left_vote": t["left_vote"], "right_vote": t["right_vote"],
                     "votes": t["left_vote"] + t["right_vote"], **paths, "split": t["split"],
                     "is_imagenet": bool(t["is_imagenet"]), "prompt": t["prompt"]})
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=NIGHTS_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root / "data.csv"


# A small generated NIGHTS: one coloured shape on a plain background per image. A variation of a
# reference jitters every attribute; simulated observers judge closeness by a weighted sum of
# attribute differences that weighs colour and shape heavily and position lightly, so the pixel
# difference (dominated by where the shape moved) is a poor guide: a model must learn what the
# observers care about. Each observer has its own weights and noise.
SHAPES = ("circle", "square", "triangle")
OBSERVER_WEIGHTS = {"colour": 4.0, "shape": 1.0, "size": 1.0, "background": 1.0, "position": 0.2}


def draw_scene(scene, image_size=32):
    """scene: dict(shape, colour, background (RGB in 0..1), x, y, size (fractions of the image))."""
    image = Image.new("RGB", (image_size, image_size), tuple(int(255 * c) for c in scene["background"]))
    cx, cy, r = scene["x"] * image_size, scene["y"] * image_size, scene["size"] * image_size / 2
    fill = tuple(int(255 * c) for c in scene["colour"])
    draw = ImageDraw.Draw(image)
    if scene["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene["shape"] == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def perceived_distance(a, b, weights=OBSERVER_WEIGHTS):
    """How different two scenes look to an observer with these attribute weights."""
    colour = float(np.linalg.norm(np.subtract(a["colour"], b["colour"])))
    background = float(np.linalg.norm(np.subtract(a["background"], b["background"])))
    position = math.hypot(a["x"] - b["x"], a["y"] - b["y"])
    return (weights["colour"] * colour + weights["shape"] * (a["shape"] != b["shape"])
            + weights["size"] * abs(a["size"] - b["size"]) + weights["background"] * background
            + weights["position"] * position)


def _random_scene(rng):
    size = rng.uniform(0.35, 0.6)
    return {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": rng.uniform(0, 1, 3).tolist(),
            "background": rng.uniform(0, 1, 3).tolist(), "size": size,
            "x": rng.uniform(size / 2, 1 - size / 2), "y": rng.uniform(size / 2, 1 - size / 2)}


def _vary(scene, rng):
    """A variation: the shape's colour shifted by a random amount and the shape moved anywhere (a
    large change in pixels, a small one to the observers); the shape is swapped now and then."""
    return {**scene, "shape": SHAPES[rng.integers(len(SHAPES))] if rng.random() < 0.1 else scene["shape"],
            "colour": np.clip(np.add(scene["colour"], rng.normal(0, rng.uniform(0.02, 0.35), 3)), 0, 1).tolist(),
            "x": rng.uniform(scene["size"] / 2, 1 - scene["size"] / 2),
            "y": rng.uniform(scene["size"] / 2, 1 - scene["size"] / 2)}


def _observer_votes_right(ref, left, right, rng):
    """One simulated observer: own attribute weights (log-normal around the shared ones) + noise."""
    weights = {k: w * math.exp(rng.normal(0, 0.3)) for k, w in OBSERVER_WEIGHTS.items()}
    noise = rng.normal(0, 0.05, 2)
    return perceived_distance(ref, right, weights) + noise[1] < perceived_distance(ref, left, weights) + noise[0]


def make_nights(root, n, seed, image_size=32):
    """Generate n NIGHTS-format triplets under root, deterministically from the seed.

    Votes are collected as NIGHTS did, adaptively: 3 observers first; only if they agree, 3 to 7
    more. So rows with < 6 votes exist (the hard, split ones: min_votes drops them) and rows with
    >= 6 votes may still hold a dissenting vote. Splits: 80% train, 10% val, 10% test;
    is_imagenet is a coin flip. Returns the path of data.csv."""
    rng = np.random.default_rng(seed)
    triplets = []
    for _ in range(n):
        ref = _random_scene(rng)
        left, right = _vary(ref, rng), _vary(ref, rng)
        votes = [_observer_votes_right(ref, left, right, rng) for _ in range(3)]
        if len(set(votes)) == 1:
            votes += [_observer_votes_right(ref, left, right, rng) for _ in range(rng.integers(3, 8))]
        triplets.append({
            "ref": draw_scene(ref, image_size), "left": draw_scene(left, image_size),
            "right": draw_scene(right, image_size), "right_vote": sum(votes), "left_vote": len(votes) - sum(votes),
            "split": rng.choice(["train", "val", "test"], p=[0.8, 0.1, 0.1]).item(),
            "is_imagenet": bool(rng.random() < 0.5),
            "prompt": f'An image of a {ref["shape"]}, "size" {ref["size"]:.2f}',
        })
    return write_nights(root, triplets)


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
