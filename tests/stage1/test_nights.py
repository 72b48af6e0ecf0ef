"""NIGHTS data and metric: what stage 1 reads, how it is decoded once, and how it is scored.

Proves that
  - the 2AFC score equals DreamSim's formula (written here independently, one triplet at a time)
    and hand-computed values, ties included, and the hinge loss equals hand-computed values for
    both label directions;
  - stage1/nights.py's NightsDataset reads data.csv as DreamSim's real file is (a pandas
    DataFrame's to_csv, written here with pandas, not with world/make_data.py): columns in the real
    order, left_vote / right_vote the SHARES of observers, votes the count, is_imagenet True/False;
    p = right_vote / (left_vote + right_vote) whether the votes are shares, counts, "1" or "1.0";
    on photos with obvious variations an untrained tower scores >= 0.8 through stage 1's training
    loader (a left/right or share/count mix-up scores 0.5-0.6);
  - each bad input gets an error naming what is wrong (missing data.csv and where it comes from,
    missing column, bad value + csv line + column, missing or unreadable image + csv line, the
    latter found while the cache is built), and skip_missing drops and counts instead;
  - the decode cache gives exactly the plain decode path's numbers (which equal
    data.image_transform(S, "nights") bit for bit), is reused, is rebuilt when a source file
    changes, can live outside data_root, and builds the same with worker processes;
  - stage 1's loader keeps its workers across epochs and yields batch_order's order (resume too);
  - world/make_data.py's write_nights writes the real convention and make_nights is
    deterministic.
"""
import csv
import os
import random
import re

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image, ImageFilter

from data import image_transform
from stage1.objective import two_afc_by_triplet, triplet_distances, two_afc_score
from world.make_data import make_nights, write_nights
from model import create_model
from cli import UserError
from stage1.nights import NightsDataset
from stage1.triplets import batch_order, model_input, train_loader
from stage1.objective import hinge_loss

SIZE = 8

# ---- metric and loss -----------------------------------------------------------------------------


def test_two_afc_hand_values_and_ties():
    d0 = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.5])
    d1 = torch.tensor([0.3, 0.1, 0.2, 0.2, 0.4])
    p = torch.tensor([0.25, 0.25, 1.0, 0.0, 0.5])
    # left closer -> 1 - p; right closer -> p; tie -> 0.5 whatever the votes.
    assert two_afc_score(d0, d1, p).tolist() == pytest.approx([0.75, 0.25, 0.5, 0.5, 0.5])


def test_two_afc_equals_dreamsim_formula_written_independently():
    generator = torch.Generator().manual_seed(0)
    d0 = torch.rand(500, generator=generator).round(decimals=1)  # coarse values: many exact ties
    d1 = torch.rand(500, generator=generator).round(decimals=1)
    p = torch.randint(0, 11, (500,), generator=generator) / 10
    expected = []
    for a, b, share_right in zip(d0.tolist(), d1.tolist(), p.tolist()):
        if a < b:  # metric says left is closer: agrees with the observers who chose left
            expected.append(1 - share_right)
        elif b < a:
            expected.append(share_right)
        else:
            expected.append(0.5)
    assert (d0 == d1).sum() > 20
    assert two_afc_score(d0, d1, p).tolist() == pytest.approx(expected)


def test_hinge_loss_hand_values():
    margin = 0.05
    d0 = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.20, 0.20])
    d1 = torch.tensor([0.10, 0.30, 0.28, 0.12, 0.20, 0.20])
    # y = +1, +1, +1, -1, +1, -1 (p = 0.5 counts as left)
    p = torch.tensor([1.0, 1.0, 0.8, 0.2, 1.0, 0.5])
    # logit = d0 - d1 = 0.2, -0.2, 0.02, -0.02, 0, 0; relu(0.05 - y * logit):
    per_triplet = [0.0, 0.25, 0.03, 0.03, 0.05, 0.05]
    assert hinge_loss(d0, d1, p, margin).item() == pytest.approx(sum(per_triplet) / 6)
    assert hinge_loss(d0[:1], d1[:1], p[:1], margin).item() == 0.0


# ---- a data.csv as DreamSim's real one is --------------------------------------------------------

# The real file's columns in their real order (DreamSim's NIGHTS, github ssundaram21/dreamsim; its
# dataset/dataset.py reads it with pandas.read_csv and takes positions 0, 2, 4, 5, 6: id,
# right_vote, ref_path, left_path, right_path). left_vote / right_vote are shares of observers,
# votes their number.
REAL_COLUMNS = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path",
                "split", "is_imagenet", "prompt"]
PROMPTS = ['An image of a "red" fox, sitting', 'a, b, "c"', "plain", 'quote " inside', "x,y"]
# (observers who chose left, who chose right, split, is_imagenet): 4 train rows kept + 1 with 5
# votes; val 2 + 1 dropped; test: imagenet 2 kept + 1 dropped, non-imagenet 3 kept.
ROWS = [(6, 0, "train", True), (0, 7, "train", False), (4, 2, "train", True),
        (1, 9, "train", False), (3, 2, "train", True),
        (0, 6, "val", False), (8, 0, "val", True), (2, 2, "val", False),
        (6, 0, "test", True), (3, 3, "test", True), (1, 2, "test", True),
        (0, 6, "test", False), (10, 0, "test", False), (5, 1, "test", False)]


def _paths(i):
    folder, name = f"{i // 100:03d}", f"{i % 100:03d}"
    return (f"ref/{folder}/{name}.png", f"distort/{folder}/{name}_0.png",
            f"distort/{folder}/{name}_1.png")


def write_real_nights(root, triplets):
    """data.csv exactly as pandas writes it (DataFrame.to_csv(index=False): floats 1.0 / 0.0 /
    0.8571428571428571, booleans True / False, prompts quoted where needed) and the PNGs with PIL.
    triplets: (ref, left, right images, observers for left, for right, split, is_imagenet,
    prompt)."""
    records = []
    for i, (ref, left, right, n_left, n_right, split, is_imagenet, prompt) in enumerate(triplets):
        for path, image in zip(_paths(i), (ref, left, right)):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / path)
        votes = n_left + n_right
        records.append([i, n_left / votes, n_right / votes, votes, *_paths(i), split, is_imagenet,
                        prompt])
    pd.DataFrame(records, columns=REAL_COLUMNS).to_csv(root / "data.csv", index=False)
    return root


def _colours(i):
    colours = [(i * 20 % 256, 0, 0), (0, i * 30 % 256, 0), (0, 0, i * 40 % 256)]
    return [Image.new("RGB", (12, 10), c) for c in colours]  # not square: the resize really resizes


def _fixture(root):
    return write_real_nights(root, [(*_colours(i), *row, PROMPTS[i % len(PROMPTS)])
                                    for i, row in enumerate(ROWS)])


def _rewrite(root, change):
    """Rewrite data.csv row by row (dicts of strings) with `change(i, row)`; returns the new
    header."""
    with open(root / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = change(None, list(rows[0])) or list(rows[0])
    for i, row in enumerate(rows):
        change(i, row)
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return columns


def test_reads_the_real_file_by_its_convention(tmp_path):
    root = _fixture(tmp_path)
    lines = (root / "data.csv").read_text().splitlines()
    assert lines[0] == ",".join(REAL_COLUMNS)
    assert lines[1].startswith("0,1.0,0.0,6,ref/000/000.png,") and ",train,True," in lines[1]
    assert lines[4].startswith("3,0.1,0.9,10,")
    counts = {s: len(NightsDataset(root, s, SIZE))
              for s in ("train", "val", "test", "test_imagenet", "test_no_imagenet")}
    assert counts == {"train": 4, "val": 2, "test": 5, "test_imagenet": 2, "test_no_imagenet": 3}
    train = NightsDataset(root, "train", SIZE)
    assert train.p.tolist() == pytest.approx([0 / 6, 7 / 7, 2 / 6, 9 / 10])
    # DreamSim reads right_vote itself as p: the same numbers on the real file.
    assert train.p.tolist() == pytest.approx([float(pd.read_csv(root / "data.csv").iloc[i, 2])
                                              for i in (0, 1, 2, 3)])
    assert train.counts == {"in_split": 5, "few_votes": 1, "missing_images": 0,
                            "unreadable_images": 0, "triplets": 4}
    assert len(NightsDataset(root, "train", SIZE, min_votes=5)) == 5
    ref, left, right, p = train[1]
    assert (ref.shape == left.shape == right.shape == (3, SIZE, SIZE) and ref.dtype == torch.uint8
            and p.item() == 1.0)
    # The images are the ones written for that row, and the model sees what the nights transform
    # gives.
    reference = image_transform(SIZE, "nights")
    for image, written in zip((ref, left, right), _colours(1)):
        assert torch.equal(model_input(image[None], "cpu")[0], reference(written))


def test_shares_counts_and_number_spellings_give_the_same_p(tmp_path):
    expected = [n_right / (n_left + n_right) for n_left, n_right, split, _ in ROWS
                if split == "test" and n_left + n_right >= 6]
    spellings = {
        "shares (pandas)": lambda i, row: None,
        "counts": lambda i, row: i is not None and row.update(left_vote=str(ROWS[i][0]),
                                                              right_vote=str(ROWS[i][1])),
        "0/1 and .0": lambda i, row: i is not None and row.update(
            {c: (row[c][:-2] if i % 2 == 0 else row[c]) for c in ("left_vote", "right_vote")
             if row[c] in ("0.0", "1.0")}),
        "shuffled columns": lambda i, row: (random.Random(0).sample(row, len(row)) if i is None
                                            else None),
    }
    for name, change in spellings.items():
        root = _fixture(tmp_path / name.replace(" ", "_").replace("/", "_"))
        header = _rewrite(root, change)
        if name == "shuffled columns":
            assert header[:3] != REAL_COLUMNS[:3]
        if name == "0/1 and .0":
            assert any(line.startswith("8,1,0,")
                       for line in (root / "data.csv").read_text().splitlines())
        test = NightsDataset(root, "test", SIZE)
        assert test.p.tolist() == pytest.approx(expected), name


def test_bad_values_name_the_line_and_column(tmp_path):
    root = _fixture(tmp_path)
    _rewrite(root, lambda i, row: i == 2 and row.update(right_vote="n/a"))  # row 2: csv line 4
    with pytest.raises(ValueError, match=r"data.csv line 4, column right_vote: "
                                         r"expected a number >= 0, got 'n/a'"):
        NightsDataset(root, "train", SIZE)
    root = _fixture(tmp_path / "zeros")
    # Row 5: val, csv line 7.
    _rewrite(root, lambda i, row: i == 5 and row.update(left_vote="0", right_vote="0.0"))
    with pytest.raises(ValueError, match=r"data.csv line 7: left_vote and right_vote are both 0"):
        NightsDataset(root, "val", SIZE)
    _rewrite(root, lambda i, row: i == 8 and row.update(is_imagenet="maybe"))  # test, line 10
    with pytest.raises(ValueError, match=r"data.csv line 10, column is_imagenet: .*'maybe'"):
        NightsDataset(root, "test_imagenet", SIZE)


def test_missing_column_is_named(tmp_path):
    root = _fixture(tmp_path)
    text = ((root / "data.csv").read_text().replace("right_vote", "rightvote", 1)
            .replace(",votes,", ",n,", 1))
    (root / "data.csv").write_text(text)
    with pytest.raises(ValueError, match=r"lacks column\(s\) right_vote, votes"):
        NightsDataset(root, "train", SIZE)


def test_missing_table_says_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.csv is missing: the folder does not exist\. "
                                                r".*nights\.zip.*dataset/nights"):
        NightsDataset(tmp_path / "nowhere", "train", SIZE)
    # What download_chunked_dataset.sh leaves: ref/ and distort/, no data.csv.
    chunked = tmp_path / "dataset"
    (chunked / "ref/000").mkdir(parents=True)
    (chunked / "distort/000").mkdir(parents=True)
    with pytest.raises(FileNotFoundError,
                       match=r"has ref/ and distort/ but no data.csv \(the chunked download\?\).*"
                             r"without data.csv: that file comes with nights.zip"):
        NightsDataset(chunked, "train", SIZE)
    _fixture(chunked / "nights")  # nights.zip unpacked beside it: dataset/nights/data.csv
    with pytest.raises(FileNotFoundError,
                       match=f"set data_root to {re.escape(str(chunked / 'nights'))}"):
        NightsDataset(chunked, "train", SIZE)


def test_missing_image_is_named_or_skipped_and_counted(tmp_path):
    root = _fixture(tmp_path)
    (root / "distort/000/001_1.png").unlink()  # row 1 (csv line 3), a kept train row
    with pytest.raises(FileNotFoundError,
                       match=r"data.csv line 3: image .*distort/000/001_1.png does not exist"):
        NightsDataset(root, "train", SIZE)
    train = NightsDataset(root, "train", SIZE, skip_missing=True)
    assert len(train) == 3 and train.counts["missing_images"] == 1
    assert len(NightsDataset(root, "val", SIZE)) == 2  # other splits are unaffected


def test_unreadable_image_is_found_while_building_the_cache(tmp_path):
    root = _fixture(tmp_path)
    (root / "ref/000/005.png").write_bytes(b"not a png at all")  # row 5 (csv line 7), val
    # Truncated: row 6 (csv line 8), val.
    (root / "distort/000/006_1.png").write_bytes((root / "distort/000/006_1.png").read_bytes()[:40])
    with pytest.raises(UserError, match=r"data.csv line 7: cannot read image .*ref/000/005.png"
                                        r".*2 unreadable row.*--skip_missing=true"):
        NightsDataset(root, "val", SIZE)  # at construction: before any item is read
    # Reuses the cache, which recorded both unreadable images.
    val = NightsDataset(root, "val", SIZE, skip_missing=True)
    assert len(val) == 0 and val.counts["unreadable_images"] == 2
    plain = NightsDataset(root, "val", SIZE, cache=False)  # without the cache: found when read
    with pytest.raises(OSError, match=r"data.csv line 7: cannot read image .*ref/000/005.png"):
        plain[0]


# ---- the decode cache ----------------------------------------------------------------------------


def _items(dataset):
    return [torch.stack(dataset[i][:3]) for i in range(len(dataset))]


def test_cache_gives_the_plain_numbers_is_reused_and_rebuilt(tmp_path):
    root = _fixture(tmp_path / "nights")
    plain = NightsDataset(root, "test", SIZE, cache=False)
    cached = NightsDataset(root, "test", SIZE)
    assert plain.cache_path is None and cached.cache_path.parent == root / "cache"
    assert all(torch.equal(a, b) for a, b in zip(_items(plain), _items(cached)))
    assert torch.equal(plain.p, cached.p)
    built = cached.cache_path.stat().st_mtime_ns
    # A view of test: the same cache, not rebuilt.
    again = NightsDataset(root, "test_imagenet", SIZE)
    assert again.cache_path == cached.cache_path and cached.cache_path.stat().st_mtime_ns == built
    # A source image changes: the next dataset decodes it anew (and drops the stale build).
    changed = root / "distort/000/011_0.png"  # row 11's left image: the 3rd kept test row
    Image.new("RGB", (12, 10), (255, 255, 0)).save(changed)
    rebuilt = NightsDataset(root, "test", SIZE)
    assert rebuilt.cache_path != cached.cache_path and not cached.cache_path.exists()
    assert (rebuilt[2][1] == torch.tensor([255, 255, 0], dtype=torch.uint8)[:, None, None]).all()
    assert all(torch.equal(a, b)
               for a, b in zip(_items(NightsDataset(root, "test", SIZE, cache=False)),
                               _items(rebuilt)))
    # Elsewhere: nothing is written into the data set; built by 2 worker processes, the same bytes.
    elsewhere = NightsDataset(root, "test", SIZE, cache_dir=tmp_path / "elsewhere", workers=2)
    assert elsewhere.cache_path.parent == tmp_path / "elsewhere"
    assert np.array_equal(np.load(elsewhere.cache_path), np.load(rebuilt.cache_path))
    assert sorted(p.name for p in root.iterdir()) == ["cache", "data.csv", "distort", "ref"]
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(UserError,
                       match=r"cannot write the NIGHTS decode cache in .*file.*: set cache_dir"):
        NightsDataset(root, "test", SIZE, cache_dir=not_a_folder)


def test_cached_inputs_equal_the_nights_transform_on_photos(tmp_path):
    """Real photos, large and not square, resized to 32 px: the cached uint8 through model_input
    equals data.image_transform(32, "nights") on the original file, bit for bit."""
    photos = [Image.fromarray(getattr(skimage.data, n)())
              for n in ("astronaut", "coffee", "rocket")]
    root = write_real_nights(tmp_path, [(photos[0], photos[1], photos[2], 6, 0, "val", False, "x"),
                                        (photos[2], photos[0], photos[1], 0, 7, "val", True, "y")])
    dataset, reference = NightsDataset(root, "val", 32), image_transform(32, "nights")
    for i in range(2):
        for image, path in zip(dataset[i][:3], _paths(i)):
            with Image.open(root / path) as original:
                assert torch.equal(model_input(image[None], "cpu")[0], reference(original))


# ---- labels the right way round: an untrained tower on obvious variations ------------------------


def _photo_triplets(n, seed=0):
    """A crop of a real photo, a light blur of it, and a heavy blur + rotation of it; the light one
    is on the left in half of the triplets, and every observer chose it."""
    photos = [getattr(skimage.data, name)()
              for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                           "retina", "hubble_deep_field")]
    rng = random.Random(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = rng.randint(min(h, w) // 3, min(h, w))
        y, x = rng.randint(0, h - side), rng.randint(0, w - side)
        ref = Image.fromarray(photo[y:y + side, x:x + side]).resize((64, 64), Image.BICUBIC)
        light = ref.filter(ImageFilter.GaussianBlur(0.6))
        heavy = ref.filter(ImageFilter.GaussianBlur(4)).rotate(
            rng.choice([-1, 1]) * rng.uniform(30, 60), resample=Image.BICUBIC)
        observers = rng.randint(6, 10)
        yield ((ref, light, heavy, observers, 0, "train", i % 3 == 0, "An image of a photo")
               if i % 2 else
               (ref, heavy, light, 0, observers, "train", i % 3 == 0, "An image of a photo"))


def test_untrained_tower_agrees_with_obvious_votes_through_the_training_loader(tmp_path):
    """On photos with obvious variations an untrained tiny tower scores >= 0.8 through stage 1's
    training loader: measured 1.0; reading the shares as right_vote / votes would give ~0.58."""
    root = write_real_nights(tmp_path, _photo_triplets(64))
    dataset = NightsDataset(root, "train", 32)
    assert sorted(set(dataset.p.tolist())) == [0.0, 1.0] and dataset.p.mean() == 0.5
    torch.manual_seed(0)
    model = create_model("tiny", image_size=32).eval()
    loader = train_loader(dataset, batch_size=16, seed=0)  # what train_triplet.py trains on
    scores = []
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        with torch.no_grad():
            for ref, left, right, p in loader:
                d0, d1 = triplet_distances(model.visual,
                                           *(model_input(t, "cpu") for t in (ref, left, right)))
                scores.append(two_afc_score(d0, d1, p))
    score = torch.cat(scores).mean().item()
    assert score >= 0.8, score
    assert two_afc_by_triplet(model, dataset, "cpu") == pytest.approx(score)


# ---- stage 1's loader ----------------------------------------------------------------------------


class _WhoServes(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.tensor([i, os.getpid()])


def test_loader_keeps_its_workers_and_the_batch_order(tmp_path):
    loader = train_loader(_WhoServes(), batch_size=8, seed=3, workers=2)
    served = {}
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader)
        assert [b[:, 0].tolist() for b in batches] == batch_order(40, 8, 3, epoch)
        served[epoch] = {pid for b in batches for pid in b[:, 1].tolist()}
    # The same 2 worker processes in both epochs, none of them this one.
    assert served[0] == served[1] and os.getpid() not in served[0] and len(served[0]) == 2
    loader.batch_sampler.set_epoch(1, 3)  # resume after 3 batches of epoch 1
    assert [b[:, 0].tolist() for b in loader] == batch_order(40, 8, 3, 1)[3:] and len(loader) == 2
    # Two ranks together see each global batch of one process.
    halves = [batch_order(40, 8, 3, 2, rank, 2) for rank in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*halves)] == [sorted(b) for b in batch_order(40, 8, 3, 2)]


# ---- the kit's writer ----------------------------------------------------------------------------


def test_write_nights_writes_the_real_convention(tmp_path):
    write_nights(tmp_path, [{"ref": ref, "left": left, "right": right, "left_vote": n_left,
                             "right_vote": n_right, "split": split, "is_imagenet": is_imagenet,
                             "prompt": PROMPTS[i % len(PROMPTS)]}
                            for i, ((ref, left, right), (n_left, n_right, split, is_imagenet))
                            in enumerate(zip(map(_colours, range(len(ROWS))), ROWS))])
    ours, real = ((tmp_path / "data.csv").read_text(),
                  (_fixture(tmp_path / "real") / "data.csv").read_text())
    assert ours == real  # byte for byte what pandas writes for the same triplets
    assert len(NightsDataset(tmp_path, "train", SIZE)) == 4


def test_make_nights_is_deterministic_and_exercises_the_filter(tmp_path):
    make_nights(tmp_path / "a", 200, seed=3, image_size=16)
    make_nights(tmp_path / "b", 200, seed=3, image_size=16)
    make_nights(tmp_path / "c", 200, seed=4, image_size=16)
    text_a = (tmp_path / "a/data.csv").read_text()
    assert text_a == (tmp_path / "b/data.csv").read_text() != (tmp_path / "c/data.csv").read_text()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a/distort/001/042_1.png")),
                          np.asarray(Image.open(tmp_path / "b/distort/001/042_1.png")))
    rows = pd.read_csv(tmp_path / "a/data.csv")
    assert list(rows.columns) == REAL_COLUMNS
    assert np.allclose(rows.left_vote + rows.right_vote, 1.0)  # shares, as in the real file
    assert (rows.votes < 6).any()  # min_votes drops some rows
    # Kept rows with dissent.
    assert ((rows.votes >= 6) & (rows.right_vote > 0) & (rows.right_vote < 1)).any()
    assert set(rows.split) == {"train", "val", "test"}
    assert set(rows.is_imagenet) == {True, False}
