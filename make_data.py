"""Makes data in the kit's three real formats, for runs without the real datasets.

  python make_data.py --out data/demo            # the embedded demo's whole data set
  python make_data.py --nights data/nights_tiny --triplets 1500 --size 32   # NIGHTS triplets only

Writers (one per real format, so that made data goes through the same loaders as real data):
  NIGHTS        data.csv + ref/ + distort/ in DreamSim's layout
  tar shards    image-text shards in the webdataset / img2dataset format
  benchmark     zero-shot task folders in CLIP_benchmark's on-disk format
and the embedded demo's data set, fed from the generated world in world.py.
Imports nothing of the model.
"""
import argparse
import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from progress import progress
from world import demo_pairs, demo_probe_scenes, demo_tasks, demo_triplets, perceptual_distance, render_scene


# ---------------------------------------------------------------------------------------------------
# NIGHTS writer
# ---------------------------------------------------------------------------------------------------

NIGHTS_CSV_COLUMNS = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split",
                      "is_imagenet", "prompt"]


def write_nights(root, triplets):
    """Write triplets in NIGHTS' layout (DreamSim's, github ssundaram21/dreamsim): data.csv + ref/NNN/III.png +
    distort/NNN/III_0.png (left) and III_1.png (right). Each triplet is a dict with PIL images ref,
    left, right, ints left_vote, right_vote (how many observers chose each side), str split, bool
    is_imagenet, str prompt. The csv holds them as DreamSim's data.csv does: left_vote / right_vote the
    SHARE of observers who chose each side (1.0 / 0.0 when unanimous, floats written as pandas writes
    them), votes the number of observers. The csv module quotes prompts that hold commas or quotes.
    Returns the path of data.csv."""
    root = Path(root)
    rows = []
    for i, t in enumerate(triplets):
        folder, name = f"{i // 100:03d}", f"{i % 100:03d}"
        paths = {"ref_path": f"ref/{folder}/{name}.png", "left_path": f"distort/{folder}/{name}_0.png",
                 "right_path": f"distort/{folder}/{name}_1.png"}
        for column, image in zip(paths, (t["ref"], t["left"], t["right"])):
            (root / paths[column]).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / paths[column])
        votes = t["left_vote"] + t["right_vote"]
        rows.append({"id": i, "left_vote": t["left_vote"] / votes, "right_vote": t["right_vote"] / votes,
                     "votes": votes, **paths, "split": t["split"],
                     "is_imagenet": bool(t["is_imagenet"]), "prompt": t["prompt"]})
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=NIGHTS_CSV_COLUMNS, lineterminator="\n")  # as pandas writes it
        writer.writeheader()
        writer.writerows(rows)
    return root / "data.csv"


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
                         image_format="png", per_shard=10_000, split="test"):
    """Write one split (test, or train for linear probes) of a task folder in CLIP_benchmark's published
    format (see data.BenchmarkTask): root/<split>/nshards.txt and 0.tar ..., beside classnames.txt.

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
    (root / split).mkdir(parents=True, exist_ok=True)
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
            shards.append(root / split / f"{len(shards)}.tar")
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
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")
    return [str(s) for s in shards]


# ---------------------------------------------------------------------------------------------------
# The demo's data set (its world: world.py)
# ---------------------------------------------------------------------------------------------------


def make_nights(root, n, seed, image_size=32):
    """Write n demo triplets (demo_triplets) under root in NIGHTS' layout and return the path of
    data.csv: stage 1's data alone, e.g. for configs/nights_tiny.yaml and the tests."""
    return write_nights(root, progress(demo_triplets(n, seed, image_size), total=n, desc="demo NIGHTS triplets",
                                   disable=n < 1000))


def write_probe_set(root, scenes, size):
    """The probes' image set: root/00000.png ... (the order of the images), scenes.jsonl (one scene a
    line, same order) and reference_distance.npy, the observers' distance (world.perceptual_distance)
    between every two of them (N x N, float64): the reference `evaluate.py --probe --images root`
    compares a model's image distances with."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        render_scene(scene, size).save(root / f"{i:05d}.png")
    (root / "scenes.jsonl").write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in scenes))
    reference = np.zeros((len(scenes), len(scenes)))
    for i in range(len(scenes)):
        for j in range(i + 1, len(scenes)):
            reference[i, j] = reference[j, i] = perceptual_distance(scenes[i], scenes[j])
    np.save(root / "reference_distance.npy", reference)


def make_demo_data(root, seed=0, size=64, triplets=6000, pairs=3000, per_class=40, retrieval=200, probe=200):
    """Write the demo's whole data set under root, each piece with the writer of its real format:
      root/nights/                  NIGHTS layout (data.csv, ref/, distort/)   <- write_nights
      root/shards/                  image-text tar shards                       <- write_shards
      root/tasks/wds_<task>/        CLIP_benchmark task folders: test/ split, and train/ for the
                                    generated classification tasks (the linear probe) <- write_benchmark_task
      root/tasks/tasks.txt          the task names, one a line: the `demo` suite of
                                    `evaluate.py --suite demo --data-root root/tasks`
      root/probe/                   `probe` scenes, their images and observer distances <- write_probe_set
    A piece whose `done` file records the same settings is kept, so reruns cost nothing; a piece made
    with other settings, or cut short, is made again."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def piece(name, settings, build):
        folder, wanted = root / name, json.dumps({"seed": seed, "size": size, **settings}, sort_keys=True)
        done = folder / "done"
        if done.exists() and done.read_text() == wanted:
            print(f"{folder}: exists, reused")
            return
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build(folder)
        done.write_text(wanted)

    piece("nights", {"triplets": triplets}, lambda folder: write_nights(
        folder, progress(demo_triplets(triplets, seed, size), total=triplets, desc="demo NIGHTS triplets")))
    piece("shards", {"pairs": pairs}, lambda folder: write_shards(
        folder, progress(demo_pairs(pairs, seed, size), total=pairs, desc="demo image-text pairs"), per_shard=500))

    def build_tasks(folder):
        tasks = demo_tasks(seed, size, per_class, retrieval)
        for name, task in progress(tasks.items(), desc="demo zero-shot tasks"):
            write_benchmark_task(folder / f"wds_{name}", task["samples"], classnames=task["classnames"],
                                 templates=task["templates"], task_type=task["task_type"])
        (folder / "tasks.txt").write_text("".join(f"{name}\n" for name in tasks))
        for name, task in demo_tasks(seed, size, per_class, retrieval, split="train").items():
            write_benchmark_task(folder / f"wds_{name}", task["samples"], classnames=task["classnames"],
                                 templates=task["templates"], task_type=task["task_type"], split="train")

    piece("tasks", {"per_class": per_class, "retrieval": retrieval, "train_per_class": per_class}, build_tasks)
    piece("probe", {"probe": probe}, lambda folder: write_probe_set(folder, demo_probe_scenes(probe, seed), size))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the embedded demo's data set (NIGHTS triplets, image-text shards, zero-shot tasks), "
                    "or with --nights only the NIGHTS triplets.")
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--nights", metavar="FOLDER", help="write only --triplets NIGHTS triplets to FOLDER")
    parser.add_argument("--seed", type=int, default=0, help="fixes every scene, vote and caption")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--triplets", type=int, default=6000, help="NIGHTS-style triplets (stage 1)")
    parser.add_argument("--pairs", type=int, default=3000, help="image-caption pairs (stage 2)")
    parser.add_argument("--per-class", type=int, default=40, help="test images per class in each classification task")
    parser.add_argument("--retrieval", type=int, default=200, help="scenes in the retrieval task (5 captions each)")
    parser.add_argument("--probe", type=int, default=200, help="scenes in the probes' image set (with observer distances)")
    args = parser.parse_args(argv)
    if args.nights:
        print(make_nights(args.nights, args.triplets, args.seed, args.size))
    else:
        make_demo_data(args.out, args.seed, args.size, args.triplets, args.pairs, args.per_class, args.retrieval, args.probe)


if __name__ == "__main__":
    main()
