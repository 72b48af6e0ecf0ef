"""NIGHTS for stage 1: DreamSim's data.csv read as DreamSim wrote it, into stage1/triplets.py's
rows.

NIGHTS (DreamSim, Fu et al. 2023) is stage 1's default source and the PI paper's. This file is its
reader; what every source shares (the decode cache, the dataset, model_input, the batch order and
the loader) is stage1/triplets.py, and the other sources' readers are stage1/other_sources.py.

  read_table    data.csv -> rows; p = right_vote / (left_vote + right_vote): right for the real
                file's vote shares and for counts; a bad value names its csv line and column
  NightsDataset one split -> (ref, left, right, p) with uint8 images (3, S, S) at the model's size,
                each image decoded once into the cache (~7 GB for the train split at 224 px)

Imports nothing of the model.
"""
import csv
import hashlib
import math
from pathlib import Path

from stage1.triplets import LineOf, TripletDataset

# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

# NIGHTS (DreamSim, Fu et al. 2023): triplets of Stable Diffusion images, a reference and two
# variations, with the votes of human observers on which variation looks closer to the reference.
# DreamSim's layout (github.com/ssundaram21/dreamsim: dataset/download_dataset.sh fetches it, its
# dataset.py reads it):
#   nights/data.csv                         one row per triplet (columns read by name, any order)
#   nights/ref/000/000.png                  the reference
#   nights/distort/000/000_0.png, _1.png    the "left" (_0) and "right" (_1) variations
# Paths in the csv are relative to the root. In the real file left_vote / right_vote are the SHARES
# of observers who chose each side (0 / 1 for the unanimous triplets) and votes is how many
# observers judged (DreamSim's dataset.py reads right_vote itself as p; the PI fork divides by their
# sum).

NIGHTS_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
NIGHTS_COLUMNS = ("left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path",
                  "split", "is_imagenet")
DOWNLOAD_HINT = ("NIGHTS comes from DreamSim (github.com/ssundaram21/dreamsim): "
                 "dataset/download_dataset.sh fetches nights.zip, which unpacks into "
                 "dataset/nights (data.csv, ref/, distort/); point data_root there. The chunked "
                 "download (download_chunked_dataset.sh) unpacks only ref/ and distort/ into "
                 "dataset/, without data.csv: that file comes with nights.zip")


def _csv_bool(value):
    """is_imagenet is written True / False by pandas, 1 / 0 by other tools: accept each."""
    text = value.strip().lower()
    if text in ("true", "1", "1.0", "yes"):
        return True
    if text in ("false", "0", "0.0", "no"):
        return False
    raise ValueError(f"expected True/False/1/0, got {value!r}")


def _csv_number(row, column, where):
    """A finite number >= 0 ("1", "1.0", "0.8333333333333334" all occur), else an error naming the
    column."""
    try:
        number = float(row[column])
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}, column {column}: expected a number >= 0, got {row[column]!r}")
    return number


def _check_root(root):
    """The folder must hold data.csv; say which file is missing and where it comes from."""
    csv_path = root / "data.csv"
    if csv_path.is_file():
        return csv_path
    if (root / "nights" / "data.csv").is_file():
        raise FileNotFoundError(f"{csv_path} does not exist, but {root / 'nights' / 'data.csv'} "
                                f"does: set data_root to {root / 'nights'}")
    found = [name for name in ("ref", "distort") if (root / name).is_dir()]
    what = (f"the folder has {' and '.join(n + '/' for n in found)} but no data.csv "
            "(the chunked download?)" if found
            else "the folder does not exist" if not root.exists()
            else "the folder holds no NIGHTS files")
    raise FileNotFoundError(f"NIGHTS table {csv_path} is missing: {what}. {DOWNLOAD_HINT}.")


def read_table(root, split):
    """The rows of one base split (train / val / test) of root/data.csv, in file order, each a dict:
    line, votes, p (share of observers who chose right), paths (ref, left, right), is_imagenet."""
    csv_path = _check_root(root)
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)  # quoted fields may hold commas, quotes and newlines
        absent = [c for c in NIGHTS_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{csv_path} lacks column(s) {', '.join(absent)} "
                             f"(found: {', '.join(reader.fieldnames or [])})")
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            if (row["split"] or "").strip() != split:
                continue
            try:
                is_imagenet = _csv_bool(row["is_imagenet"] or "")
            except ValueError as e:
                raise ValueError(f"{where}, column is_imagenet: {e}") from None
            votes = _csv_number(row, "votes", where)
            if not votes.is_integer():
                raise ValueError(f"{where}, column votes: expected a whole number of observers, "
                                 f"got {row['votes']!r}")
            left, right = (_csv_number(row, "left_vote", where),
                           _csv_number(row, "right_vote", where))
            if left + right == 0:
                raise ValueError(f"{where}: left_vote and right_vote are both 0, so no observer "
                                 "chose either side")
            rows.append({"line": reader.line_num, "votes": int(votes), "p": right / (left + right),
                         "paths": tuple(root / row[c].strip()
                                        for c in ("ref_path", "left_path", "right_path")),
                         "is_imagenet": is_imagenet})
    return rows


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def root_key(root):
    """8 hex digits naming a data root in cache file names (two data sets never share a cache)."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]


class NightsDataset(TripletDataset):
    """One split of NIGHTS -> items (ref, left, right, p): uint8 images (3, S, S) resized to
    image_size (model_input makes them the model's input), p the share of observers who judged the
    right image (`_1`) closer to the reference, as a float32 scalar.

    Rows with fewer than `min_votes` votes are dropped (6: the unanimous ~20k triplets DreamSim and
    the PI fork use). test_imagenet / test_no_imagenet are the test rows filtered on is_imagenet
    (they share test's cache). With `cache` (the default) every image is decoded once, at
    construction, into `cache_dir` (default data_root/cache), using `workers` processes; a corrupt
    image is found then and named with its csv line. A missing or unreadable image is an error
    naming the file and its csv line, unless skip_missing, which drops the row and counts it.
    `.counts` says how many rows of the split each filter removed.
    """

    def __init__(self, root, split, image_size, min_votes=6, skip_missing=False, cache=True,
                 cache_dir=None, workers=0):
        if split not in NIGHTS_SPLITS:
            raise ValueError(f"unknown NIGHTS split {split!r}; "
                             f"expected one of {', '.join(NIGHTS_SPLITS)}")
        self.root = Path(root)
        self.csv_path = self.root / "data.csv"
        base, imagenet = {"test_imagenet": ("test", True),
                          "test_no_imagenet": ("test", False)}.get(split, (split, None))
        table = read_table(self.root, base)
        in_subset = [imagenet is None or row["is_imagenet"] == imagenet for row in table]
        kept = [row["votes"] >= min_votes for row in table]
        # Every image of the base split, not only this subset's: test's views share its cache.
        images = list(dict.fromkeys(path for row in table for path in row["paths"]))
        number = {path: k for k, path in enumerate(images)}
        lines = [row["line"] for row in table]
        counts = {"in_split": sum(in_subset),
                  "few_votes": sum(s and not k for s, k in zip(in_subset, kept))}
        super().__init__(images, [[number[p] for p in row["paths"]] for row in table],
                         [row["p"] for row in table], LineOf(self.csv_path, lines), split,
                         image_size, self.root,
                         f"nights-{root_key(self.root)}-{base}-{int(image_size)}px",
                         serve=[s and k for s, k in zip(in_subset, kept)],
                         skip_missing=skip_missing, cache=cache, cache_dir=cache_dir,
                         workers=workers, label="NIGHTS", counts=counts)


def read_splits(root, image_size, min_votes=6, skip_missing=False, cache=True, cache_dir=None,
                workers=0, splits=NIGHTS_SPLITS):
    """{split: NightsDataset} of a NIGHTS folder: train, val, test and test's two subsets."""
    return {split: NightsDataset(root, split, image_size, min_votes, skip_missing, cache, cache_dir,
                                 workers) for split in splits}
