"""Stage 1's other sources (stage1/other_sources.py) and what all sources share
(stage1/triplets.py).

Every fixture is laid out as its producer ships it, written here (not by the kit):
  - BAPPS: LPIPS' layout (github richzhang/PerceptualSimilarity, scripts/download_dataset.sh and
    data/dataset/twoafc_dataset.py): 2afc/{train,val}/<subset>/{ref,p0,p1}/<stem>.png,
    judge/<stem>.npy holding one number, the share of observers who preferred p1, saved with shape
    (1,);
  - THINGS: THINGS-data's files (Hebart et al. 2023, OSF f5rn6): triplet_dataset/{trainset,
    validationset,testset1}.txt with three 0-based indices a line, the odd one LAST, and
    unique_id.txt in an order that is NOT alphabetical (the trap Hebart's analysis fixes with a sort
    index);
  - triplet tables: the PI authors' CSVs as their src/dataset.py THINGSDataset reads them (pandas;
    train_triplets.csv with anchor_idx, positive_idx, negative_idx; index_to_image_mapping.csv with
    index, image_name; images in Things1854/);
  - class folders: the authors' ImageNetCategoryTripletDataset CSVs (anchor_cat, positive_cat,
    negative_cat) over one folder per class;
  - RDMs: an N x N .npy (numpy.save) and images.txt.

Proves that
  - per source, on judgments whose answer is obvious (a light blur of a photo is closer to it than a
    heavy blur + rotation, or than an unrelated photo), a barely trained tiny tower scores >= 0.8
    through stage 1's training loader, and the same data with its labels read backwards scores
    <= 0.2 (a reader that swapped p0/p1, read the odd one from the wrong column, sorted THINGS'
    concepts, swapped positive/negative or read an RDM as a similarity would fail it);
  - THINGS' rows are cblearn's triplets_from_oddoneout of the same trials; the odd-one-out accuracy
    equals a by-hand loop; BAPPS' 2AFC equals LPIPS' own scoring (lpips.trainer.score_2afc_dataset)
    on files read independently; RSA per layer equals rsatoolbox's Spearman comparison of scipy's
    cosine distances; per-image scoring (objective.two_afc) equals triplet-by-triplet scoring
    (objective.two_afc_by_triplet);
  - bad input is named with its file and line (or column / folder): a missing image, an index out of
    range, an unknown class folder, a judge file that is not one number in [0, 1], a triplet with
    the same image twice, a malformed THINGS line, an RDM that is not square / symmetric / finite /
    sized like its images, a BAPPS stem missing from one folder;
  - max_triplets / triplet_fraction are nested subsets by seed; every source reads from the decode
    cache;
  - `python train_triplet.py --data_format=things ...` (a subprocess) writes n_triplets, 2afc and
    odd_one_out per split to summary.json.
"""
import contextlib
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image, ImageFilter

from analysis import alignment
from stage1 import objective
import train_triplet
from stage1 import other_sources
from stage1 import triplets
from training import grad_scaler
from data import image_transform
from model import create_model
from stage1.objective import triplet_distances

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina",
          "hubble_deep_field", "camera")


def _crop(name, rng, side=64):
    photo = getattr(skimage.data, name)()
    photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
    h, w = photo.shape[:2]
    edge = rng.randint(min(h, w) // 3, min(h, w))
    y, x = rng.randint(0, h - edge), rng.randint(0, w - edge)
    return Image.fromarray(photo[y:y + edge, x:x + edge]).resize((side, side), Image.BICUBIC)


def _light(image):
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _heavy(image, rng):
    return image.filter(ImageFilter.GaussianBlur(4)).rotate(
        rng.choice([-1, 1]) * rng.uniform(30, 60), resample=Image.BICUBIC)


def score_through_training_loader(dataset, steps=2):
    """A tiny tower trained `steps` steps (lr 1e-5: barely) through stage 1's training loader, then
    the mean 2AFC of the next epoch's batches through the same loader."""
    torch.manual_seed(0)
    model = create_model("tiny", image_size=SIZE)
    cfg = train_triplet.Config(margin=0.05)
    optimizer = torch.optim.AdamW([p for p in model.visual.parameters()], lr=1e-5)
    loader = triplets.train_loader(dataset, batch_size=8, seed=0)  # what train_triplet.py trains on
    loader.batch_sampler.set_epoch(0)
    for step, (ref, left, right, p) in zip(range(steps), loader):
        ref, left, right = (triplets.model_input(t, "cpu") for t in (ref, left, right))
        train_triplet.train_step(model.visual, optimizer, grad_scaler("cpu", "fp32"),
                                 contextlib.nullcontext(), ref, left, right, p, 1e-5, cfg)
    scores = []
    loader.batch_sampler.set_epoch(1)
    with torch.no_grad():
        for ref, left, right, p in loader:
            d0, d1 = triplet_distances(model.visual, *(triplets.model_input(t, "cpu")
                                                       for t in (ref, left, right)))
            scores.append(objective.two_afc_score(d0, d1, p))
    return torch.cat(scores).mean().item()


# ---- BAPPS ---------------------------------------------------------------------------------------


def write_bapps(root, n, seed=0, backwards=False, subsets=("traditional", "cnn"),
                splits=("train", "val")):
    """LPIPS' 2afc layout; p1 is the light blur in half the stems, and 4 of 5 observers (val) or 2
    of 2 (train) chose the light one. backwards: the judge stores the share that preferred p0
    instead."""
    rng = random.Random(seed)
    for split in splits:
        for subset in subsets:
            folder = root / split / subset
            for kind in ("ref", "p0", "p1", "judge"):
                (folder / kind).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                stem = f"{i:06d}"
                ref = _crop(PHOTOS[i % len(PHOTOS)], rng)
                light, heavy = _light(ref), _heavy(ref, rng)
                light_is_p1 = i % 2 == 0
                ref.save(folder / "ref" / f"{stem}.png")
                (light if not light_is_p1 else heavy).save(folder / "p0" / f"{stem}.png")
                (light if light_is_p1 else heavy).save(folder / "p1" / f"{stem}.png")
                agree = 1.0 if split == "train" else 0.8
                share_p1 = agree if light_is_p1 else 1 - agree
                np.save(folder / "judge" / f"{stem}.npy",
                        np.array([1 - share_p1 if backwards else share_p1]))
    return root


def test_bapps_labels_the_right_way_round(tmp_path):
    splits = other_sources.open_splits("bapps", write_bapps(tmp_path / "2afc", 16), SIZE)
    # BAPPS ships no test split.
    assert sorted(splits) == ["train", "val", "val_cnn", "val_traditional"]
    assert len(splits["train"]) == 32 and len(splits["val_cnn"]) == 16
    assert sorted(set(splits["val"].p.tolist())) == pytest.approx([0.2, 0.8])
    assert score_through_training_loader(splits["train"]) >= 0.8  # measured 1.0
    backwards = other_sources.open_splits(
        "bapps", write_bapps(tmp_path / "back", 16, backwards=True), SIZE)
    assert score_through_training_loader(backwards["train"]) <= 0.2
    only = other_sources.open_splits("bapps", tmp_path / "2afc", SIZE, bapps_subsets="cnn")
    assert sorted(only) == ["train", "val", "val_cnn"] and len(only["train"]) == 16


def test_bapps_2afc_equals_lpips_scoring(tmp_path):
    """lpips.trainer.score_2afc_dataset on the val files read independently (PIL, numpy; pairing by
    sorted position per folder, as LPIPS' loader does) equals objective.two_afc on the kit's
    reader."""
    from lpips.trainer import score_2afc_dataset
    root = write_bapps(tmp_path / "2afc", 12, splits=("val",))
    torch.manual_seed(1)
    model = create_model("tiny", image_size=SIZE).eval()
    transform = image_transform(SIZE, "nights")

    class Loader:  # LPIPS' CustomDatasetDataLoader interface: load_data() yields dicts of batches
        def __init__(self, folder):
            self.folder = folder

        def load_data(self):
            files = {k: sorted((self.folder / k).iterdir()) for k in ("ref", "p0", "p1", "judge")}
            for i in range(0, len(files["ref"]), 5):
                batch = {k: torch.stack([transform(Image.open(f)) for f in files[k][i:i + 5]])
                         for k in ("ref", "p0", "p1")}
                batch["judge"] = torch.tensor([np.load(f).reshape(1, 1, 1)
                                               for f in files["judge"][i:i + 5]])
                yield batch

    def distance(a, b):
        with torch.no_grad():
            fa, fb = (torch.nn.functional.normalize(model.visual(x), dim=-1) for x in (a, b))
        return 1 - (fa * fb).sum(-1)

    splits = other_sources.open_splits("bapps", root, SIZE)
    for subset in ("traditional", "cnn"):
        reference, _ = score_2afc_dataset(Loader(root / "val" / subset), distance)
        assert (objective.two_afc(model, splits[f"val_{subset}"], "cpu")
                == pytest.approx(reference, abs=1e-6))


def test_bapps_bad_input_is_named(tmp_path):
    root = write_bapps(tmp_path / "2afc", 3, subsets=("cnn",), splits=("val",))
    np.save(root / "val/cnn/judge/000001.npy", np.array([1.7]))
    with pytest.raises(ValueError, match=r"judge/000001.npy: expected one number in \[0, 1\]"):
        other_sources.open_splits("bapps", root, SIZE)
    np.save(root / "val/cnn/judge/000001.npy", np.array([0.2, 0.8]))
    with pytest.raises(ValueError, match=r"judge/000001.npy: expected one number"):
        other_sources.open_splits("bapps", root, SIZE)
    np.save(root / "val/cnn/judge/000001.npy", np.array([0.4]))
    (root / "val/cnn/p1/000002.png").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"val/cnn/p1/000002.png does not exist, but 000002 is in the other"):
        other_sources.open_splits("bapps", root, SIZE)
    with pytest.raises(ValueError, match=r"bapps_subsets names mix, not under"):
        other_sources.open_splits("bapps", root, SIZE, bapps_subsets="mix")
    with pytest.raises(FileNotFoundError, match=r"set data_root to its 2afc folder"):
        other_sources.open_splits("bapps", tmp_path, SIZE)


# ---- THINGS --------------------------------------------------------------------------------------


def write_things(root, n_photos=8, seed=0, odd_first=False):
    """Concepts: each photo and a light blur of it (two concepts), listed in unique_id.txt in a
    shuffled, non-alphabetical order; trials (photo, its blur, odd: another photo), odd one last (or
    first)."""
    rng = random.Random(seed)
    concepts = {}
    for name in PHOTOS[:n_photos]:
        image = _crop(name, rng)
        concepts[f"{name}"], concepts[f"{name}_blurred"] = image, _light(image)
    order = list(concepts)
    rng.shuffle(order)
    assert order != sorted(order)
    (root / "images").mkdir(parents=True)
    (root / "triplet_dataset").mkdir()
    (root / "unique_id.txt").write_text("".join(f"{c}\n" for c in order))
    for concept, image in concepts.items():
        image.save(root / "images" / f"{concept}.jpg", quality=95)
    index = {c: k for k, c in enumerate(order)}
    names = list(PHOTOS[:n_photos])
    for file, count in (("trainset.txt", 24), ("validationset.txt", 12), ("testset1.txt", 12)):
        lines = []
        for t in range(count):
            a = names[t % len(names)]
            b = rng.choice([n for n in names if n != a])
            pair = [index[a], index[f"{a}_blurred"]]
            rng.shuffle(pair)
            trial = [index[b], *pair] if odd_first else [*pair, index[b]]
            lines.append(" ".join(map(str, trial)))
        (root / "triplet_dataset" / file).write_text("\n".join(lines) + "\n")
    return root, order


def test_things_labels_rows_and_odd_one_out(tmp_path):
    from cblearn.preprocessing import triplets_from_oddoneout
    root, order = write_things(tmp_path / "things")
    splits = other_sources.open_splits("things", root, SIZE)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [48, 24, 24]  # two rows per trial
    # The rows are cblearn's triplets from the same odd-one-out trials (odd one in column 2).
    trials = np.loadtxt(root / "triplet_dataset/trainset.txt", dtype=int)
    reference = triplets_from_oddoneout(trials, np.full(len(trials), 2))  # (anchor, closer, odd)
    ours = splits["train"].rows.numpy()
    assert sorted(map(tuple, ours)) == sorted(map(tuple, reference))
    # Left (the pair's other member) is the closer: no one chose right.
    assert (splits["train"].p == 0).all()
    # The images are unique_id.txt's order, not sorted names.
    assert [p.stem for p in splits["train"].images] == order
    assert score_through_training_loader(splits["train"]) >= 0.8  # measured 1.0
    # Read from the wrong column, the same file fails: of each trial's two rows, the one whose
    # reference is the photo's blur is judged backwards (score ~0) and the other has an unrelated
    # reference (~0.5).
    wrong = other_sources.open_splits("things", root, SIZE, odd_column=0)
    assert score_through_training_loader(wrong["train"]) <= 0.4  # measured 0.31
    torch.manual_seed(0)
    model = create_model("tiny", image_size=SIZE)
    assert alignment.odd_one_out_accuracy(model, splits["val"], "cpu")["accuracy"] >= 0.8
    assert alignment.odd_one_out_accuracy(model, wrong["val"], "cpu")["accuracy"] <= 0.2
    # A reader that sorted the concept names would pair the wrong images: near chance, not >= 0.8.
    (root / "unique_id.txt").write_text("".join(f"{c}\n" for c in sorted(order)))
    assert score_through_training_loader(
        other_sources.open_splits("things", root, SIZE)["train"]) < 0.8
    # The older SPoSE layout (odd one FIRST, as cblearn documents it): odd_column=0 reads it right.
    first, _ = write_things(tmp_path / "first", odd_first=True)
    assert score_through_training_loader(
        other_sources.open_splits("things", first, SIZE, odd_column=0)["train"]) >= 0.8


def test_odd_one_out_accuracy_equals_a_hand_loop_and_per_image_2afc_equals_per_triplet(tmp_path):
    root, _ = write_things(tmp_path / "things")
    val = other_sources.open_splits("things", root, SIZE)["val"]
    torch.manual_seed(3)
    model = create_model("tiny", image_size=SIZE).eval()
    transform = image_transform(SIZE, "nights")
    with torch.no_grad():
        features = [
            torch.nn.functional.normalize(model.visual(transform(Image.open(p))[None]), dim=-1)[0]
            for p in val.images]
    hits = 0
    for i, j, k in np.loadtxt(root / "triplet_dataset/validationset.txt", dtype=int):
        similarity = {"k": features[i] @ features[j], "j": features[i] @ features[k],
                      "i": features[j] @ features[k]}
        hits += max(similarity, key=similarity.get) == "k"  # the most similar pair leaves k out
    scores = alignment.odd_one_out_accuracy(model, val, "cpu")
    assert scores["accuracy"] == pytest.approx(hits / 12)
    assert scores["ceiling_normalised"] == pytest.approx((hits / 12 - 1 / 3) / (0.6767 - 1 / 3))
    assert objective.two_afc(model, val, "cpu") == pytest.approx(
        objective.two_afc_by_triplet(model, val, "cpu"), abs=1e-6)


def test_things_bad_input_is_named(tmp_path):
    root, order = write_things(tmp_path / "things")
    path = root / "triplet_dataset/validationset.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4] + ["3 4 99"] + lines[5:]) + "\n")
    with pytest.raises(ValueError, match=r"validationset.txt line 5: concept index 99 "
                                         r"out of range: unique_id.txt lists 16"):
        other_sources.open_splits("things", root, SIZE)
    path.write_text("\n".join(lines[:2] + ["3 4"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"validationset.txt line 3: "
                                         r"expected three 0-based concept indices, got '3 4'"):
        other_sources.open_splits("things", root, SIZE)
    path.write_text("\n".join(lines[:6] + ["3 3 5"] + lines[7:]) + "\n")
    with pytest.raises(ValueError,
                       match=r"validationset.txt line 7: the triplet names image .* twice"):
        other_sources.open_splits("things", root, SIZE)
    path.write_text("\n".join(lines) + "\n")
    (root / "images" / f"{order[0]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"trainset.txt line \d+: image "
                                                rf".*images/{order[0]}.jpg does not exist"):
        other_sources.open_splits("things", root, SIZE)
    assert (other_sources.open_splits("things", root, SIZE, skip_missing=True)["train"]
            .counts["missing_images"] > 0)


# ---- triplet tables and class folders ------------------------------------------------------------


def write_tables(root, seed=0, swap=False):
    """The PI authors' THINGS CSVs: Things1854/<image_name> (name with its extension), the mapping
    and train / val / test triplets, written with pandas as they read them. swap: the positive and
    negative columns exchanged (a reader that mixed them up)."""
    rng = random.Random(seed)
    (root / "Things1854").mkdir(parents=True)
    mapping, images = [], 0
    splits = {"train": [], "val": [], "test": []}
    for t in range(24):
        ref = _crop(PHOTOS[t % len(PHOTOS)], rng)
        for image in (ref, _light(ref), _heavy(ref, rng)):
            name = f"concept{images:04d}_01b.jpg"
            image.save(root / "Things1854" / name, quality=95)
            mapping.append((images, name))
            images += 1
        anchor, positive, negative = images - 3, images - 2, images - 1
        splits[("train", "train", "val", "test")[t % 4]].append(
            (anchor, negative, positive) if swap else (anchor, positive, negative))
    pd.DataFrame(mapping, columns=["index", "image_name"]).to_csv(
        root / "index_to_image_mapping.csv", index=False)
    for split, rows in splits.items():
        pd.DataFrame(rows, columns=["anchor_idx", "positive_idx", "negative_idx"]).to_csv(
            root / f"{split}_triplets.csv", index=False)
    return root


def test_triplet_tables(tmp_path):
    root = write_tables(tmp_path / "tables")
    splits = other_sources.open_splits("triplets", root, SIZE)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    assert score_through_training_loader(splits["train"]) >= 0.8
    swapped = other_sources.open_splits("triplets", write_tables(tmp_path / "swapped", swap=True),
                                        SIZE)
    assert score_through_training_loader(swapped["train"]) <= 0.2
    # The path form, with a share column: same images, same answer.
    with open(root / "train_triplets.csv") as f:
        rows = list(csv.DictReader(f))
    names = dict(pd.read_csv(root / "index_to_image_mapping.csv").itertuples(index=False))
    paths = tmp_path / "paths"
    paths.mkdir()
    pd.DataFrame(
        [(f"../tables/Things1854/{names[int(r['anchor_idx'])]}",
          f"../tables/Things1854/{names[int(r['positive_idx'])]}",
          f"../tables/Things1854/{names[int(r['negative_idx'])]}", 0.9) for r in rows],
        columns=["anchor", "positive", "negative", "share"],
    ).to_csv(paths / "train_triplets.csv", index=False)
    by_path = other_sources.open_splits("triplets", paths, SIZE)["train"]
    assert (len(by_path) == 12 and torch.allclose(by_path.p, torch.full((12,), 0.9))
            and len(other_sources.open_splits("triplets", paths, SIZE)["val"]) == 0)
    # Bad input: an index not in the mapping, a missing image, the same image twice.
    text = (root / "val_triplets.csv").read_text().splitlines()
    (root / "val_triplets.csv").write_text("\n".join(text[:3] + ["5,999,7"] + text[4:]) + "\n")
    with pytest.raises(ValueError, match=r"val_triplets.csv line 4, column positive_idx: "
                                         r"index '999' is not in"):
        other_sources.open_splits("triplets", root, SIZE)
    (root / "val_triplets.csv").write_text("\n".join(text[:2] + ["5,5,7"] + text[3:]) + "\n")
    with pytest.raises(ValueError, match=r"val_triplets.csv line 3: "
                                         r"the triplet names image .*concept0005_01b.jpg twice"):
        other_sources.open_splits("triplets", root, SIZE)
    (root / "val_triplets.csv").write_text("\n".join(text) + "\n")
    (root / "Things1854/concept0000_01b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_triplets.csv line 2: "
                                                r"image .*concept0000_01b.jpg does not exist"):
        other_sources.open_splits("triplets", root, SIZE)


def write_categories(root, seed=0, swap=False):
    """One folder per class, 3 images each (slight brightness changes); class <photo>_blurred holds
    light blurs of <photo>'s images. Triplets: anchor <photo>, positive <photo>_blurred, negative
    another photo."""
    rng = random.Random(seed)
    names = list(PHOTOS[:6])
    for name in names:
        base = _crop(name, rng)
        for k in range(3):
            image = base.point(lambda v, k=k: min(255, v + 6 * k))
            for cls, version in ((name, image), (f"{name}_blurred", _light(image))):
                (root / "images" / cls).mkdir(parents=True, exist_ok=True)
                version.save(root / "images" / cls / f"{cls}_{k}.JPEG", quality=95)
    for split, count in (("train", 24), ("val", 6)):
        rows = []
        for t in range(count):
            a, other = names[t % len(names)], names[(t + 1 + t // len(names)) % len(names)]
            rows.append((a, other, f"{a}_blurred") if swap else (a, f"{a}_blurred", other))
        pd.DataFrame(rows, columns=["anchor_cat", "positive_cat", "negative_cat"]).to_csv(
            root / f"{split}_triplets.csv", index=False)
    return root


def test_class_folder_triplets(tmp_path):
    root = write_categories(tmp_path / "nod")
    splits = other_sources.open_splits("categories", root, SIZE, images_per_class=2, seed=5)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 6, 0]
    assert len(splits["train"].images) == 12 * 2  # 12 classes x 2 drawn images: a bounded pool
    again = other_sources.open_splits("categories", root, SIZE, images_per_class=2, seed=5)["train"]
    # Runs repeat.
    assert again.images == splits["train"].images and torch.equal(again.rows, splits["train"].rows)
    assert score_through_training_loader(splits["train"]) >= 0.8
    swapped = other_sources.open_splits(
        "categories", write_categories(tmp_path / "swapped", swap=True), SIZE)
    assert score_through_training_loader(swapped["train"]) <= 0.2
    text = (root / "val_triplets.csv").read_text().splitlines()
    (root / "val_triplets.csv").write_text(
        "\n".join(text[:2] + ["coffee,n99999999,rocket"] + text[3:]) + "\n")
    with pytest.raises(FileNotFoundError, match=r"val_triplets.csv line 3, column positive_cat: "
                                                r"no class folder .*n99999999"):
        other_sources.open_splits("categories", root, SIZE)


# ---- RDMs ----------------------------------------------------------------------------------------


def write_rdm(root, seed=0, backwards=False):
    """16 crops (two of each photo) and a light blur of each (32 images in images.txt); V1.npy: 0.1
    within a crop's pair, 1.0 across (or, backwards, the similarity 1 - D stored as if it were a
    dissimilarity)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    (root / "rdms").mkdir()
    listed = []
    for k, name in enumerate(PHOTOS * 2):
        image = _crop(name, rng)
        for tag, version in (("a", image), ("b", _light(image))):
            version.save(root / "images" / f"{k:02d}{tag}.png")
            listed.append(f"images/{k:02d}{tag}.png")
    group = np.arange(len(listed)) // 2
    rdm = np.where(group[:, None] == group[None], 0.1, 1.0)
    np.fill_diagonal(rdm, 0)
    np.save(root / "rdms" / "V1.npy", 1 - rdm if backwards else rdm)
    (root / "images.txt").write_text("\n".join(listed) + "\n")
    return root, rdm


def test_rdm_triplets(tmp_path):
    root, rdm = write_rdm(tmp_path / "rdm")
    splits = other_sources.open_splits("rdm", root, SIZE, rdm_min_gap=0.5,
                                       rdm_triplets_per_image=20, seed=0)
    train = splits["train"]
    rows = train.rows.numpy()
    gaps = rdm[rows[:, 0], rows[:, 1]] - rdm[rows[:, 0], rows[:, 2]]
    # Only the pairs' obvious triplets pass the gap.
    assert len(train) > 8 and (np.abs(gaps) > 0.5).all()
    assert (train.p.numpy() == (gaps > 0)).all()  # p = 1 where the right image is the closer
    parts = [set(splits[s].rows.flatten().tolist()) for s in ("train", "val", "test")]
    # Held-out triplets use unseen images.
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2])
    assert score_through_training_loader(train) >= 0.8
    back, _ = write_rdm(tmp_path / "back", backwards=True)
    assert score_through_training_loader(
        other_sources.open_splits("rdm", back, SIZE, rdm_min_gap=0.5, seed=0)["train"]) <= 0.2
    # Several RDMs by name; a bad matrix is named with what is wrong with it.
    np.save(root / "rdms" / "V4.npy", rdm)
    both = other_sources.open_splits("rdm", root, SIZE, rdm="V1,V4", rdm_min_gap=0.5,
                                     seed=0)["train"]
    # V1's rows, then V4's.
    assert len(both) > len(train) and torch.equal(both.rows[:len(train)], train.rows)
    for bad, message in ((rdm[:, :-1], "must be square"),
                         (rdm[:-2, :-2], "the matrix is 30 x 30 but there are 32 images"),
                         (np.where(np.eye(32, k=3) > 0, np.nan, rdm), r"entry \(0, 3\) is nan"),
                         (rdm + np.eye(32, k=1), r"not symmetric: entry \(\d+, \d+\)")):
        np.save(root / "rdms" / "bad.npy", bad)
        with pytest.raises(ValueError, match=rf"rdms/bad.npy: .*{message}"):
            other_sources.open_splits("rdm", root, SIZE, rdm="bad")
    with pytest.raises(FileNotFoundError, match=r"no RDM IT.npy \(available: V1, V4, bad\)"):
        other_sources.open_splits("rdm", root, SIZE, rdm="IT")


def test_rsa_per_layer_equals_rsatoolbox(tmp_path):
    from rsatoolbox.rdm import RDMs, compare
    from scipy.spatial.distance import pdist
    root, rdm = write_rdm(tmp_path / "rdm")
    paths, _ = other_sources.rdm_images(root)
    torch.manual_seed(2)
    model = create_model("tiny", image_size=SIZE).eval()
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(triplets.decode(p, SIZE)))
                          for p in paths])
    ours = alignment.rsa_per_layer(model, images, rdm)
    assert list(ours) == ([f"block{k + 1}" for k in range(len(model.visual.transformer.resblocks))]
                          + ["embedding"])
    captured = []
    hooks = [b.register_forward_hook(
                 lambda m, a, out: captured.append(out[:, 0].detach().double().numpy()))
             for b in model.visual.transformer.resblocks]
    with torch.no_grad():
        embedding = model.encode_image(triplets.model_input(images, "cpu")).double().numpy()
    for hook in hooks:
        hook.remove()
    reference = RDMs(dissimilarities=rdm[np.triu_indices(32, 1)][None])
    for layer, features in zip(ours, captured + [embedding]):
        expected = compare(RDMs(dissimilarities=pdist(features, "cosine")[None]), reference,
                           method="spearman")[0, 0]
        assert ours[layer] == pytest.approx(expected, abs=1e-6)


# ---- what every source shares --------------------------------------------------------------------


def test_nested_subsets_by_seed():
    sets = [set(triplets.nested_subset(1000, 0, f, seed=7).tolist())
            for f in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)]
    assert [len(s) for s in sets] == [50, 100, 250, 500, 750, 1000]
    assert all(a < b for a, b in zip(sets, sets[1:]))  # each lies inside the next
    # The smaller of the two (max_triplets, triplet_fraction) wins.
    assert set(triplets.nested_subset(1000, 30, 0.1, seed=7).tolist()) < sets[1]
    # Another seed, another draw.
    assert set(triplets.nested_subset(1000, 0, 0.05, seed=8).tolist()) != sets[0]
    with pytest.raises(ValueError, match="triplet_fraction must lie in"):
        triplets.nested_subset(10, 0, 0.0)


def test_every_source_reads_from_the_decode_cache(tmp_path):
    """The same items with and without the cache, and with the cache no source file is opened
    again."""
    things, _ = write_things(tmp_path / "things")
    root, _ = write_rdm(tmp_path / "rdm")
    cases = {"bapps": write_bapps(tmp_path / "2afc", 4, subsets=("cnn",)), "things": things,
             "triplets": write_tables(tmp_path / "tables"),
             "categories": write_categories(tmp_path / "nod"), "rdm": root}
    for source, folder in cases.items():
        cached = other_sources.open_splits(source, folder, SIZE)["train"]
        plain = other_sources.open_splits(source, folder, SIZE, cache=False)["train"]
        assert (cached.cache_path is not None
                and cached.cache_path.parent == Path(folder) / "cache"), source
        for i in range(0, len(cached), 3):
            assert all(torch.equal(a, b) for a, b in zip(cached[i][:3], plain[i][:3])), source
        last = plain[len(plain) - 1]
        for image in cached.images:  # nothing left to read but the cache
            image.rename(image.with_name(image.name + ".gone"))
        assert all(torch.equal(a, b) for a, b in zip(cached[len(cached) - 1][:3], last[:3])), source


@pytest.mark.slow
def test_train_triplet_on_things_writes_every_split(tmp_path):
    root, _ = write_things(tmp_path / "things")
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(ROOT / "train_triplet.py"),
                    str(ROOT / "configs/nights_tiny.yaml"), "--data_format=things",
                    f"--data_root={root}", f"--out_dir={out}", "--batch_size=8", "--epochs=2",
                    "--warmup_steps=1", "--triplet_fraction=0.5"],
                   check=True, cwd=tmp_path, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_format"] == "things"
    # train: half of the 48 training rows (triplet_fraction=0.5).
    assert summary["n_triplets"] == {"train": 24, "val": 24, "test": 24}
    assert set(summary["2afc"]) == {"train", "val", "test"}
    assert set(summary["odd_one_out"]) == {"train", "val", "test"}
    assert 0 <= summary["odd_one_out"]["val"]["accuracy"] <= 1


@pytest.mark.slow
def test_alignment_command_scores_several_checkpoints(tmp_path):
    """`python evaluate.py --alignment` over two checkpoints: one JSON with every score, a table, a
    plot; its numbers are those of the functions it is built from."""
    import dataclasses
    things, _ = write_things(tmp_path / "things")
    rdm_root, rdm = write_rdm(tmp_path / "rdm")
    bapps = write_bapps(tmp_path / "2afc", 4, subsets=("cnn", "color"), splits=("val",))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("tiny", image_size=SIZE)
        paths.append(tmp_path / f"run{seed}" / "ckpt.pt")
        paths[-1].parent.mkdir()
        torch.save({"state_dict": model.state_dict(),
                    "model_config": dataclasses.asdict(model.config)}, paths[-1])
    out = tmp_path / "alignment.json"
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--alignment",
                             "--ckpt", str(paths[0]), "--ckpt", str(paths[1]),
                             "--things", str(things), "--rdm-root", str(rdm_root),
                             "--bapps", str(bapps), "--out", str(out), "--workers", "0",
                             "--device", "cpu"], check=True, capture_output=True, text=True)
    scores = json.loads(out.read_text())
    assert list(scores) == ["run0", "run1"] and out.with_suffix(".png").stat().st_size > 0
    assert {"bapps/cnn", "bapps/color", "things/val/odd_one_out",
            "things/test/odd_one_out_normalised", "rsa/V1/block1",
            "rsa/V1/embedding"} <= set(scores["run0"])
    assert "| rsa/V1/embedding |" in result.stdout
    torch.manual_seed(1)
    model = create_model("tiny", image_size=SIZE)
    val = other_sources.open_splits("things", things, SIZE)["val"]
    assert scores["run1"]["things/val/odd_one_out"] == pytest.approx(
        alignment.odd_one_out_accuracy(model, val, "cpu")["accuracy"])
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(triplets.decode(p, SIZE)))
                          for p in other_sources.rdm_images(rdm_root)[0]])
    assert scores["run1"]["rsa/V1/embedding"] == pytest.approx(
        alignment.rsa_per_layer(model, images, rdm)["embedding"])
