"""Makes data in the kit's real formats, for runs without the real datasets.

  python -m world.make_data --out data/demo            # the embedded demo's whole data set
  python -m world.make_data --nights data/nights_tiny --triplets 1500 --size 32  # only the triplets
  python -m world.make_data --out data/demo --studies  # and the studies' stimuli, which
                                                       # `demo.py --study` also writes

Writers (one per real format, so that made data goes through the same loaders as real data):
  NIGHTS        data.csv + ref/ + distort/ in DreamSim's layout
  tar shards    image-text shards in the webdataset / img2dataset format
  benchmark     zero-shot task folders in CLIP_benchmark's on-disk format
  THINGS        triplet_dataset/*.txt + unique_id.txt + images/ in THINGS-data's layout
  RDM           rdms/<name>.npy (N x N) + images.txt, an fMRI-style dissimilarity matrix per "area"
and the embedded demo's data set, fed from the generated world in world/scenes.py, with the studies'
stimuli: one image per concept, odd-one-out trials, and two simulated brain areas (early, late).
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

from cli import UserError, progress, run_cli
from world.scenes import (demo_concepts, demo_odd_one_out, demo_pairs, demo_probe_scenes,
                          demo_tasks, demo_triplets, perceptual_distance, render_many)


# --------------------------------------------------------------------------------------------------
# NIGHTS writer
# --------------------------------------------------------------------------------------------------

NIGHTS_CSV_COLUMNS = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path",
                      "right_path", "split", "is_imagenet", "prompt"]


def write_nights(root, triplets):
    """Write triplets in NIGHTS' layout (DreamSim's, github ssundaram21/dreamsim): data.csv +
    ref/NNN/III.png + distort/NNN/III_0.png (left) and III_1.png (right). Each triplet is a dict
    with PIL images ref, left, right, ints left_vote, right_vote (how many observers chose each
    side), str split, bool is_imagenet, str prompt. The csv holds them as DreamSim's data.csv does:
    left_vote / right_vote the SHARE of observers who chose each side (1.0 / 0.0 when unanimous,
    floats written as pandas writes them), votes the number of observers. The csv module quotes
    prompts that hold commas or quotes. Returns the path of data.csv."""
    root = Path(root)
    rows = []
    for i, t in enumerate(triplets):
        folder, name = f"{i // 100:03d}", f"{i % 100:03d}"
        paths = {"ref_path": f"ref/{folder}/{name}.png",
                 "left_path": f"distort/{folder}/{name}_0.png",
                 "right_path": f"distort/{folder}/{name}_1.png"}
        for column, image in zip(paths, (t["ref"], t["left"], t["right"])):
            (root / paths[column]).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / paths[column])
        votes = t["left_vote"] + t["right_vote"]
        rows.append({"id": i, "left_vote": t["left_vote"] / votes,
                     "right_vote": t["right_vote"] / votes, "votes": votes, **paths,
                     "split": t["split"], "is_imagenet": bool(t["is_imagenet"]),
                     "prompt": t["prompt"]})
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as f:
        # Line ends as pandas writes them ("\n"; the csv module's default is "\r\n").
        writer = csv.DictWriter(f, fieldnames=NIGHTS_CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return root / "data.csv"


# --------------------------------------------------------------------------------------------------
# Tar shard writer
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# CLIP_benchmark task writer
# --------------------------------------------------------------------------------------------------

_SAVE_OPTIONS = {"png": dict(format="PNG"), "webp": dict(format="WEBP", lossless=True),
                 "jpg": dict(format="JPEG", quality=95)}


def _add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed mtime: same samples, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_benchmark_task(root, samples, classnames=None, templates=None, task_type="classification",
                         image_format="png", per_shard=10_000, split="test"):
    """Write one split (test, or train for linear probes) of a task folder in CLIP_benchmark's
    published format (see data.BenchmarkTask): root/<split>/nshards.txt and 0.tar ..., beside
    classnames.txt.

    samples: (PIL image, int label) for classification, (PIL image, [captions]) for retrieval,
    (PIL image, 0/1 sequence per class) for multilabel. Keys are s0000000, s0000001, ... as in
    clip_benchmark's converter; images are lossless png (or webp / jpg). Returns the shard paths.
    """
    if task_type not in ("classification", "retrieval", "multilabel"):
        raise ValueError("task_type must be classification, retrieval or multilabel, "
                         f"got {task_type!r}")
    if task_type != "retrieval" and not (classnames and templates):
        raise ValueError(f"a {task_type} task needs classnames and templates")
    if image_format not in _SAVE_OPTIONS:
        raise ValueError(f"image_format must be one of {sorted(_SAVE_OPTIONS)}, "
                         f"got {image_format!r}")
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    if task_type != "retrieval":
        (root / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames))
        (root / "zeroshot_classification_templates.txt").write_text(
            "".join(f"{t}\n" for t in templates))
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
                raise ValueError(f"sample {index}: a retrieval sample needs a non-empty list of "
                                 f"captions, got {label!r}")
            _add_member(tar, f"{key}.txt",
                        "\n".join(c.replace("\n", " ") for c in label).encode("utf-8"))
    if tar is None:
        raise ValueError(f"no samples given for {root}")
    tar.close()
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")
    return [str(s) for s in shards]


# --------------------------------------------------------------------------------------------------
# THINGS odd-one-out writer, and the RDM writer
# --------------------------------------------------------------------------------------------------

THINGS_SPLITS = ("trainset", "validationset", "testset1")


def write_things(root, unique_ids, images, trials):
    """Write odd-one-out trials in THINGS-data's layout (Hebart et al. 2023, OSF f5rn6: folder
    triplet_dataset/ and variables/unique_id.txt): root/triplet_dataset/<split>.txt, three 0-based
    concept indices a line, whitespace-separated, the odd one out LAST; root/unique_id.txt, the
    concept ids in the files' index order (not alphabetical in THINGS, nor here);
    root/images/<id>.png, one image per concept as the behavioural task showed.
    trials: {split: [(i, j, odd), ...]}."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "triplet_dataset").mkdir(exist_ok=True)
    for unique_id, image in zip(unique_ids, images):
        image.save(root / "images" / f"{unique_id}.png")
    (root / "unique_id.txt").write_text("".join(f"{u}\n" for u in unique_ids))
    for split, rows in trials.items():
        (root / "triplet_dataset" / f"{split}.txt").write_text(
            "".join(f"{i} {j} {odd}\n" for i, j, odd in rows))


def write_rdm(root, name, matrix, image_paths=None):
    """An RDM as the kit reads it (data_format=rdm): root/rdms/<name>.npy, N x N float64, and, when
    given, root/images.txt with the N image paths (relative to root) in the matrix's row order."""
    root = Path(root)
    (root / "rdms").mkdir(parents=True, exist_ok=True)
    np.save(root / "rdms" / f"{name}.npy", np.asarray(matrix, dtype=np.float64))
    if image_paths is not None:
        (root / "images.txt").write_text("".join(f"{p}\n" for p in image_paths))


# --------------------------------------------------------------------------------------------------
# The demo's data set (its world: world/scenes.py)
# --------------------------------------------------------------------------------------------------


def make_nights(root, n, seed, image_size=32, overwrite=False):
    """Write n demo triplets (demo_triplets) under root in NIGHTS' layout and return the path of
    data.csv: stage 1's data alone, e.g. for configs/nights_tiny.yaml and the tests. A folder that
    already holds a data.csv is replaced (data.csv, ref/, distort/, cache/) only with
    `overwrite`: a smaller set written over a larger one would leave its images orphaned."""
    root = Path(root)
    if (root / "data.csv").exists():
        if not overwrite:
            raise UserError(f"{root} already holds a NIGHTS data set (data.csv): write elsewhere, "
                            "or replace it with --overwrite")
        for old in ("ref", "distort", "cache"):
            shutil.rmtree(root / old, ignore_errors=True)
        (root / "data.csv").unlink()
    return write_nights(root, progress(demo_triplets(n, seed, image_size), total=n,
                                       desc="demo NIGHTS triplets", disable=n < 1000))


def write_probe_set(root, scenes, size):
    """The probes' image set: root/00000.png ... (the order of the images), scenes.jsonl (one scene
    a line, same order) and reference_distance.npy, the observers' distance
    (scenes.perceptual_distance) between every two of them (N x N, float64): the reference
    `evaluate.py --probe --images root` compares a model's image distances with."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(render_many(scenes, size)):
        image.save(root / f"{i:05d}.png")
    (root / "scenes.jsonl").write_text(
        "".join(json.dumps(s, sort_keys=True) + "\n" for s in scenes))
    reference = np.zeros((len(scenes), len(scenes)))
    for i in range(len(scenes)):
        for j in range(i + 1, len(scenes)):
            reference[i, j] = reference[j, i] = perceptual_distance(scenes[i], scenes[j])
    np.save(root / "reference_distance.npy", reference)


def _piece(folder, settings, build, overwrite=False):
    """Build one piece of a data set in `folder` unless its `done` file records the same settings.
    A piece this writer started and did not finish (its `.writing` mark) is made again; a folder
    made with other settings, or holding anything else, is replaced only with `overwrite`: a writer
    never deletes data it was not asked to."""
    wanted = json.dumps(settings, sort_keys=True)
    done, mark = folder / "done", folder / ".writing"
    if done.exists() and done.read_text() == wanted:
        print(f"{folder}: exists, reused")
        return
    if folder.exists() and any(folder.iterdir()) and not mark.exists() and not overwrite:
        made_with = f"made with {done.read_text()}" if done.exists() else "not made by this writer"
        raise UserError(f"{folder} holds data {made_with}, not {wanted}: write elsewhere (--out), "
                        "delete the folder, or replace it with --overwrite")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    mark.touch()
    build(folder)
    done.write_text(wanted)
    mark.unlink()


def make_demo_data(root, seed=0, size=64, triplets=6000, pairs=3000, per_class=40, retrieval=200,
                   probe=200, overwrite=False):
    """Write the demo's whole data set under root, each piece with the writer of its real format:
      root/nights/            NIGHTS layout (data.csv, ref/, distort/)       <- write_nights
      root/shards/            image-text tar shards                          <- write_shards
      root/tasks/wds_<task>/  CLIP_benchmark task folders: test/ split, and train/ for the
                              generated classification tasks (the linear probe)
                                                                             <- write_benchmark_task
      root/tasks/tasks.txt    the task names, one a line: the `demo` suite of
                              `evaluate.py --suite demo --data-root root/tasks`
      root/probe/             `probe` scenes, their images and observer distances
                                                                             <- write_probe_set
    A piece whose `done` file records the same settings is kept, so reruns cost nothing; one cut
    short is made again; one made with other settings only with `overwrite` (_piece)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    piece = lambda name, settings, build: _piece(
        root / name, {"seed": seed, "size": size, **settings}, build, overwrite)
    piece("nights", {"triplets": triplets}, lambda folder: write_nights(
        folder, progress(demo_triplets(triplets, seed, size), total=triplets,
                         desc="demo NIGHTS triplets")))
    piece("shards", {"pairs": pairs}, lambda folder: write_shards(
        folder, progress(demo_pairs(pairs, seed, size), total=pairs, desc="demo image-text pairs"),
        per_shard=500))

    def build_tasks(folder):
        tasks = demo_tasks(seed, size, per_class, retrieval)
        for name, task in progress(tasks.items(), desc="demo zero-shot tasks"):
            write_benchmark_task(folder / f"wds_{name}", task["samples"],
                                 classnames=task["classnames"], templates=task["templates"],
                                 task_type=task["task_type"])
        (folder / "tasks.txt").write_text("".join(f"{name}\n" for name in tasks))
        for name, task in demo_tasks(seed, size, per_class, retrieval, split="train").items():
            write_benchmark_task(folder / f"wds_{name}", task["samples"],
                                 classnames=task["classnames"], templates=task["templates"],
                                 task_type=task["task_type"], split="train")

    piece("tasks", {"per_class": per_class, "retrieval": retrieval, "train_per_class": per_class},
          build_tasks)
    piece("probe", {"probe": probe},
          lambda folder: write_probe_set(folder, demo_probe_scenes(probe, seed), size))
    return root


# The studies' simulated brain areas. An fMRI RDM is a dissimilarity between the response patterns a
# brain area gives two images, measured with noise. The demo has no brain; it has two areas whose
# dissimilarity is, by construction, what their names claim:
#   early  a low-level, retinotopic area (as V1): the Euclidean distance between the two images'
#          colours averaged over a 16 x 16 grid of blocks (4 x 4 pixels at 64 px), so it sees where
#          colour is in the image, not what the object is;
#   late   a high-level area (as object-selective cortex): the observers' perceptual distance
#          (scenes.perceptual_distance), which weighs what the object is and its colour a lot and
#          where it sits little;
# each plus measurement noise: a symmetric Gaussian per pair of images, its sd AREA_NOISE times the
# sd of that area's noise-free dissimilarities (the same relative noise for both areas).
AREAS = ("early", "late")
AREA_NOISE = 0.5
AREA_GRID = 16


def early_area_distance(images):
    """N images -> (N, N) Euclidean distance of their block-averaged RGB (AREA_GRID x AREA_GRID
    blocks)."""
    pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255
                       for im in images])  # (N, H, W, 3)
    n, height, width, _ = pixels.shape
    by, bx = height // AREA_GRID, width // AREA_GRID
    pooled = (pixels[:, :by * AREA_GRID, :bx * AREA_GRID]
              .reshape(n, AREA_GRID, by, AREA_GRID, bx, 3).mean((2, 4)).reshape(n, -1))
    squared = (pooled ** 2).sum(1)
    return (np.sqrt(np.maximum(squared[:, None] + squared[None] - 2 * pooled @ pooled.T, 0))
            * (1 - np.eye(n)))


def late_area_distance(scenes):
    """N scenes -> (N, N) observers' perceptual distance (scenes.perceptual_distance with the
    mean weights)."""
    n = len(scenes)
    distance = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            distance[i, j] = distance[j, i] = perceptual_distance(scenes[i], scenes[j])
    return distance


def measured(rdm, rng, noise=AREA_NOISE):
    """`rdm` as a noisy measurement sees it: + symmetric Gaussian noise (sd = noise x the sd of the
    off-diagonal entries), zero diagonal."""
    n = len(rdm)
    upper = np.triu(rng.normal(0, noise * rdm[np.triu_indices(n, 1)].std(), (n, n)), 1)
    return rdm + upper + upper.T


def _ranks(values):
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def rdm_spearman(a, b):
    """Spearman correlation of the upper triangles of two N x N matrices."""
    upper = np.triu_indices(len(a), 1)
    return float(np.corrcoef(_ranks(a[upper]), _ranks(b[upper]))[0, 1])


def write_stimuli(root, unique_ids, scenes, size, seed, trials=None):
    """One stimulus set: images/<id>.png and images.txt (in unique_id order), both areas' measured
    RDMs (rdms/early.npy, rdms/late.npy), and with `trials` THINGS' files for the same images.
    areas.json says what each area's RDM is: its Spearman correlation with the noise-free pixel
    distance and with the observers' distance, and with the other area."""
    images = list(render_many(scenes, size))
    if trials is not None:
        write_things(root, unique_ids, images, trials)
    else:
        (root / "images").mkdir(parents=True, exist_ok=True)
        for unique_id, image in zip(unique_ids, images):
            image.save(root / "images" / f"{unique_id}.png")
    (root / "scenes.jsonl").write_text(
        "".join(json.dumps(s, sort_keys=True) + "\n" for s in scenes))
    truth = {"early": early_area_distance(images), "late": late_area_distance(scenes)}
    rdms = {name: measured(truth[name], np.random.default_rng([seed, k]))
            for k, name in enumerate(AREAS)}
    paths = [f"images/{u}.png" for u in unique_ids]
    for name, rdm in rdms.items():
        write_rdm(root, name, rdm, paths)
    report = {name: {"spearman_with_pixel_distance": rdm_spearman(rdm, truth["early"]),
                     "spearman_with_observer_distance": rdm_spearman(rdm, truth["late"])}
              for name, rdm in rdms.items()}
    report["early_vs_late"] = rdm_spearman(rdms["early"], rdms["late"])
    (root / "areas.json").write_text(json.dumps(report, indent=1) + "\n")


def make_study_data(root, seed=0, size=64, concepts=400, trials=(1500, 300, 600), heldout=200):
    """The studies' stimuli beside the demo's data (make_demo_data), each piece reused as the
    demo's pieces are:
      root/stimuli/        `concepts` images, one per concept; THINGS-data's files with
                           odd-one-out trials (trainset, validationset, testset1 counts from
                           `trials`) judged by the demo's observers; images.txt and
                           rdms/{early,late}.npy over the same images
      root/stimuli_test/   `heldout` other scenes with their own area RDMs: where the final
                           towers' RSA with each area is scored, on images no stage-1 source
                           trained on"""
    root = Path(root)

    def stimuli(folder):
        unique_ids, scenes = demo_concepts(concepts, seed)
        write_stimuli(folder, unique_ids, scenes, size, seed,
                      trials=demo_odd_one_out(scenes, dict(zip(THINGS_SPLITS, trials)), seed))

    def stimuli_test(folder):
        unique_ids, scenes = demo_concepts(heldout, seed, stream="heldout")
        write_stimuli(folder, unique_ids, scenes, size, seed + 1)

    _piece(root / "stimuli",
           {"seed": seed, "size": size, "concepts": concepts, "trials": list(trials)}, stimuli)
    _piece(root / "stimuli_test", {"seed": seed, "size": size, "heldout": heldout}, stimuli_test)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the embedded demo's data set (NIGHTS triplets, image-text shards, "
                    "zero-shot tasks), or with --nights only the NIGHTS triplets.")
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--nights", metavar="FOLDER",
                        help="write only --triplets NIGHTS triplets to FOLDER")
    parser.add_argument("--seed", type=int, default=0, help="fixes every scene, vote and caption")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--triplets", type=int, default=6000,
                        help="NIGHTS-style triplets (stage 1)")
    parser.add_argument("--pairs", type=int, default=3000, help="image-caption pairs (stage 2)")
    parser.add_argument("--per-class", type=int, default=40,
                        help="test images per class in each classification task")
    parser.add_argument("--retrieval", type=int, default=200,
                        help="scenes in the retrieval task (5 captions each)")
    parser.add_argument("--probe", type=int, default=200,
                        help="scenes in the probes' image set (with observer distances)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace data made with other settings (by default it is refused)")
    parser.add_argument("--studies", action="store_true",
                        help="also the studies' stimuli: THINGS-format odd-one-out trials and "
                             "the early / late area RDMs")
    args = parser.parse_args(argv)
    if args.nights:
        print(make_nights(args.nights, args.triplets, args.seed, args.size, args.overwrite))
    else:
        make_demo_data(args.out, args.seed, args.size, args.triplets, args.pairs, args.per_class,
                       args.retrieval, args.probe, args.overwrite)
        if args.studies:
            make_study_data(args.out, args.seed, args.size)


if __name__ == "__main__":
    run_cli(main)
