"""NIGHTS data and metric: what stage 1 reads and how it is scored.

Proves that
  - the 2AFC score equals DreamSim's formula (written here independently, one triplet at a time) and
    hand-computed values, ties included, and the hinge loss equals hand-computed values for both
    label directions;
  - data.NightsDataset reads make_data.write_nights' layout by column name, whatever the column order,
    with quoted prompts holding commas and quotes; drops rows with < min_votes votes; splits test on
    is_imagenet written as True/False/1/0; gives p = right_vote / votes;
  - each bad input gets an error naming what is wrong (missing column, missing image + csv line,
    unreadable image + csv line), and skip_missing drops and counts instead;
  - make_nights (the demo world's triplets in this layout) is deterministic and produces the rows
    the filter is for (few votes, split votes).
"""
import csv
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import NightsDataset, image_transform
from evaluate import two_afc_score
from make_data import make_nights, write_nights
from train_triplet import hinge_loss

TRANSFORM = image_transform(8, "nights")


# ---- metric and loss --------------------------------------------------------------------------------


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
    p = torch.tensor([1.0, 1.0, 0.8, 0.2, 1.0, 0.5])  # y = +1, +1, +1, -1, +1, -1 (p = 0.5 counts as left)
    # logit = d0 - d1 = 0.2, -0.2, 0.02, -0.02, 0, 0; relu(0.05 - y * logit):
    per_triplet = [0.0, 0.25, 0.03, 0.03, 0.05, 0.05]
    assert hinge_loss(d0, d1, p, margin).item() == pytest.approx(sum(per_triplet) / 6)
    assert hinge_loss(d0[:1], d1[:1], p[:1], margin).item() == 0.0


# ---- loader on a hand-made fixture -------------------------------------------------------------------

PROMPTS = ['An image of a "red" fox, sitting', 'a, b, "c"', "plain", 'quote " inside', "x,y"]


def _triplet(i, left_vote, right_vote, split, is_imagenet):
    colours = [(i * 20 % 256, 0, 0), (0, i * 30 % 256, 0), (0, 0, i * 40 % 256)]
    ref, left, right = (Image.new("RGB", (8, 8), c) for c in colours)
    return {"ref": ref, "left": left, "right": right, "left_vote": left_vote, "right_vote": right_vote,
            "split": split, "is_imagenet": is_imagenet, "prompt": PROMPTS[i % len(PROMPTS)]}


# (left_vote, right_vote, split, is_imagenet): 4 train rows kept + 1 with 5 votes; val 2 + 1 dropped;
# test: imagenet 2 kept + 1 dropped, non-imagenet 3 kept.
ROWS = [(6, 0, "train", True), (0, 7, "train", False), (4, 2, "train", True), (1, 9, "train", False),
        (3, 2, "train", True), (0, 6, "val", False), (8, 0, "val", True), (2, 2, "val", False),
        (6, 0, "test", True), (3, 3, "test", True), (1, 2, "test", True), (0, 6, "test", False),
        (10, 0, "test", False), (5, 1, "test", False)]


def _write_fixture(root, shuffle_columns=True):
    write_nights(root, [_triplet(i, *row) for i, row in enumerate(ROWS)])
    if shuffle_columns:  # real files need not keep DreamSim's column order; also vary the booleans
        with open(root / "data.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        columns = list(rows[0])
        random.Random(0).shuffle(columns)
        spellings = {"True": ["True", "1", "true"], "False": ["False", "0", "FALSE"]}
        for i, row in enumerate(rows):
            row["is_imagenet"] = spellings[row["is_imagenet"]][i % 3]
        with open(root / "data.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return root


def test_loader_counts_labels_and_quoting(tmp_path):
    root = _write_fixture(tmp_path)
    header = (root / "data.csv").read_text().splitlines()[0].split(",")
    assert header[:3] != ["id", "left_vote", "right_vote"]  # the order really was shuffled
    counts = {s: len(NightsDataset(root, s, TRANSFORM)) for s in
              ("train", "val", "test", "test_imagenet", "test_no_imagenet")}
    assert counts == {"train": 4, "val": 2, "test": 5, "test_imagenet": 2, "test_no_imagenet": 3}
    train = NightsDataset(root, "train", TRANSFORM)
    assert train.p.tolist() == pytest.approx([0 / 6, 7 / 7, 2 / 6, 9 / 10])
    assert train.counts == {"in_split": 5, "few_votes": 1, "missing_images": 0, "triplets": 4}
    assert len(NightsDataset(root, "train", TRANSFORM, min_votes=5)) == 5
    ref, left, right, p = train[1]
    assert ref.shape == left.shape == right.shape == (3, 8, 8) and p.item() == 1.0
    # The images are the ones written for that row (row 1: pure green left, via CLIP normalisation).
    assert torch.allclose(left, TRANSFORM(_triplet(1, *ROWS[1])["left"]))
    # The csv module kept the prompts intact through commas, quotes and the shuffled columns.
    with open(root / "data.csv", newline="") as f:
        assert [r["prompt"] for r in csv.DictReader(f)] == [PROMPTS[i % len(PROMPTS)] for i in range(len(ROWS))]


def test_missing_column_is_named(tmp_path):
    root = _write_fixture(tmp_path, shuffle_columns=False)
    text = (root / "data.csv").read_text().replace("right_vote", "rightvote", 1).replace(",votes,", ",n,", 1)
    (root / "data.csv").write_text(text)
    with pytest.raises(ValueError, match=r"lacks column\(s\) right_vote, votes"):
        NightsDataset(root, "train", TRANSFORM)


def test_bad_is_imagenet_names_the_line(tmp_path):
    root = _write_fixture(tmp_path, shuffle_columns=False)
    lines = (root / "data.csv").read_text().splitlines()
    lines[9] = lines[9].replace(",True,", ",maybe,")  # line 10: row 8, a test row
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"data.csv line 10: .*'maybe'"):
        NightsDataset(root, "test_imagenet", TRANSFORM)


def test_missing_image_is_named_or_skipped_and_counted(tmp_path):
    root = _write_fixture(tmp_path)
    (root / "distort/000/001_1.png").unlink()  # row 1 (csv line 3), a kept train row
    with pytest.raises(FileNotFoundError, match=r"data.csv line 3: image .*distort/000/001_1.png does not exist"):
        NightsDataset(root, "train", TRANSFORM)
    train = NightsDataset(root, "train", TRANSFORM, skip_missing=True)
    assert len(train) == 3 and train.counts["missing_images"] == 1
    assert len(NightsDataset(root, "val", TRANSFORM)) == 2  # other splits are unaffected


def test_unreadable_image_is_named(tmp_path):
    root = _write_fixture(tmp_path)
    (root / "ref/000/005.png").write_bytes(b"not a png at all")  # row 5 (csv line 7), val
    val = NightsDataset(root, "val", TRANSFORM)
    with pytest.raises(OSError, match=r"data.csv line 7: cannot read image .*ref/000/005.png"):
        val[0]


# ---- the generator ----------------------------------------------------------------------------------


def test_make_nights_is_deterministic_and_exercises_the_filter(tmp_path):
    make_nights(tmp_path / "a", 200, seed=3, image_size=16)
    make_nights(tmp_path / "b", 200, seed=3, image_size=16)
    make_nights(tmp_path / "c", 200, seed=4, image_size=16)
    text_a = (tmp_path / "a/data.csv").read_text()
    assert text_a == (tmp_path / "b/data.csv").read_text() != (tmp_path / "c/data.csv").read_text()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a/distort/001/042_1.png")),
                          np.asarray(Image.open(tmp_path / "b/distort/001/042_1.png")))
    with open(tmp_path / "a/data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    votes = [(int(r["left_vote"]), int(r["right_vote"])) for r in rows]
    assert any(left + right < 6 for left, right in votes)  # min_votes drops some rows
    assert any(left + right >= 6 and left and right for left, right in votes)  # kept rows with dissent
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["is_imagenet"] for r in rows} == {"True", "False"}
