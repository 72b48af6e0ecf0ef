"""Stage 1 from any similarity signal: a short reader per source, each producing the rows of
stage1/triplets.py.

Each reader reads a data set as its producer ships it and returns {split: TripletDataset}, rows of
(reference, left, right, p = share of judges who chose RIGHT as closer). Everything after that
(decode cache, batch order, loader, hinge, 2AFC score) is shared.
`open_splits(data_format, data_root, ...)` picks the reader; train_triplet.py's `data_format` /
`data_root` keys name it.

  nights      DreamSim's NIGHTS (stage1/nights.py): data_root/data.csv, ref/, distort/
  bapps       LPIPS' BAPPS 2AFC: data_root = the 2afc folder,
              {train,val}/<subset>/{ref,p0,p1}/<stem>.png and judge/<stem>.npy (the share who
              preferred p1); rows ref, left p0, right p1, p = judge. Splits train, val and
              val_<subset> per val subset; BAPPS ships no test split
  things      THINGS-data's odd-one-out trials:
              data_root/triplet_dataset/{trainset,validationset,testset1}.txt (0-based concept
              indices, the odd one LAST), data_root/unique_id.txt (the concepts in the files' index
              order, NOT alphabetical), data_root/images/<unique_id>.<jpg|png>. A trial (i, j, odd
              k) gives two rows: ref i, j closer than k; ref j, i closer than k. Splits train, val,
              test
  triplets    triplet tables: data_root/{train,val,test}_triplets.csv with anchor_idx, positive_idx,
              negative_idx + data_root/index_to_image_mapping.csv (index, image_name) - the PI
              authors' THINGS files - or with anchor, positive, negative paths; images under
              image_dir (default data_root/Things1854 when it exists, as the authors' code reads
              them, else data_root); an optional `share` column = the share of judges who chose
              positive (default 1)
  categories  class-folder triplets (the authors' NOD path): data_root/{train,val,test}_triplets.csv
              with anchor_cat, positive_cat, negative_cat = class folders under image_dir (default
              data_root/images; point it at ImageNet's train folder); images_per_class images drawn
              per class from the seed, once, so runs repeat and the cache stays bounded
  rdm         dissimilarity matrices: data_root/rdms/<name>.npy (N x N, symmetric, no NaN) over the
              images listed in data_root/images.txt (one path per line, relative to data_root), else
              the sorted files of data_root/images/; triplets drawn from the seed per reference
              image, kept where the dissimilarity gap exceeds rdm_min_gap (ties skipped); images
              split into train / val / test parts (rdm_holdout each for val and test) so held-out
              triplets use unseen images
"""
import csv
import zlib
from pathlib import Path

import numpy as np

from stage1.nights import NIGHTS_SPLITS, read_splits, root_key
from stage1.triplets import LineOf, TripletDataset

DATA_FORMATS = ("nights", "bapps", "things", "triplets", "categories", "rdm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")
# The settings readers take, by their train_triplet.py names (open_splits passes each reader its
# own).
OPTIONS = ("min_votes", "bapps_subsets", "odd_column", "image_dir", "images_per_class", "rdm",
           "rdm_triplets_per_image", "rdm_min_gap", "rdm_holdout", "seed")
# THINGS odd-one-out: chance 1/3; the between-subject noise ceiling 0.6767 (Hebart et al. 2023,
# THINGS-data; brain-score's hebart2023 benchmark normalises by it).
THINGS_CEILING = 0.6767


class _Places:
    """where(i) for rows that come from several sources: segments (first row, text) -> "text,
    triplet k"."""

    def __init__(self, segments):
        self.starts, self.texts = [s for s, _ in segments], [t for _, t in segments]

    def __call__(self, i):
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f"{self.texts[s]}, triplet {i - self.starts[s]}"


def _empty(split, image_size, root):
    """A split the data set does not ship: no rows (its score is not computed)."""
    return TripletDataset([], np.zeros((0, 3)), [], LineOf("-"), split, image_size, root, "none",
                          cache=False)


def _read_csv(path, required):
    """-> (list of (line, row dict)) of a CSV with these columns, else an error naming the file."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = [c for c in required if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{path} lacks column(s) {', '.join(absent)} "
                             f"(found: {', '.join(reader.fieldnames or [])})")
        return [(reader.line_num, row) for row in reader]


def _dataset(images, rows, p, where, split, image_size, root, group, options, serve=None,
             label="stage 1"):
    name = label.split()[0].lower()
    return TripletDataset(images, rows, p, where, split, image_size, root,
                          f"{name}-{root_key(root)}-{group}-{int(image_size)}px", serve=serve,
                          label=label, skip_missing=options["skip_missing"],
                          cache=options["cache"], cache_dir=options["cache_dir"],
                          workers=options["workers"])


# --------------------------------------------------------------------------------------------------
# BAPPS 2AFC (LPIPS: github.com/richzhang/PerceptualSimilarity, scripts/download_dataset.sh)
# --------------------------------------------------------------------------------------------------


def read_judge(path):
    """judge/<stem>.npy: one number, the share of observers who preferred p1 (lpips/trainer.py:
    "0.6 means 60pct people preferred right patch"); LPIPS stores it with shape (1,) and its loader
    reshapes it."""
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the judge file ({e})") from None
    if (value.size != 1 or not np.issubdtype(value.dtype, np.number)
            or not 0 <= float(value.reshape(-1)[0]) <= 1):
        raise ValueError(f"{path}: expected one number in [0, 1] (the share who preferred p1), "
                         f"got shape {value.shape} {value.reshape(-1)[:3].tolist()}")
    return float(value.reshape(-1)[0])


def read_bapps(root, image_size, options):
    root = Path(root)
    if not (root / "train").is_dir() and not (root / "val").is_dir():
        hint = " (set data_root to its 2afc folder)" if (root / "2afc").is_dir() else ""
        raise FileNotFoundError(f"{root} holds no BAPPS train/ or val/ folder{hint}: LPIPS' "
                                "scripts/download_dataset.sh unpacks "
                                "dataset/2afc/{train,val}/<subset>/{ref,p0,p1,judge}; "
                                "point data_root at 2afc")
    wanted = [s.strip() for s in (options["bapps_subsets"] or "").split(",") if s.strip()]
    found = {split: (sorted(p.name for p in (root / split).iterdir() if p.is_dir())
                     if (root / split).is_dir() else [])
             for split in ("train", "val")}
    unknown = [s for s in wanted if not any(s in names for names in found.values())]
    if unknown:
        raise ValueError(f"bapps_subsets names {', '.join(unknown)}, not under {root}/train or "
                         f"{root}/val (found: train {', '.join(found['train']) or '-'}; "
                         f"val {', '.join(found['val']) or '-'})")
    splits = {}
    for split in [s for s in ("train", "val")
                  if options["splits"] is None or s in options["splits"]]:
        images, rows, p, places, subset_of = [], [], [], [], []
        for subset in [s for s in found[split] if not wanted or s in wanted]:
            folder = root / split / subset
            stems = {kind: {f.stem for f in (folder / kind).glob("*.png")}
                     for kind in ("ref", "p0", "p1")}
            stems["judge"] = {f.stem for f in (folder / "judge").glob("*.npy")}
            everything = set().union(*stems.values())
            # Files are paired by stem: each must be in all four folders.
            for kind, have in stems.items():
                lacking = sorted(everything - have)
                if lacking:
                    suffix = ".npy" if kind == "judge" else ".png"
                    raise FileNotFoundError(
                        f"{folder / kind / (lacking[0] + suffix)} does not exist, but "
                        f"{lacking[0]} is in the other folders ({len(lacking)} stem(s) lack "
                        f"{kind}/)")
            places.append((len(rows), f"{folder}"))
            for stem in sorted(everything):
                rows.append([len(images), len(images) + 1, len(images) + 2])
                images += [folder / kind / f"{stem}.png" for kind in ("ref", "p0", "p1")]
                p.append(read_judge(folder / "judge" / f"{stem}.npy"))
                subset_of.append(subset)
        if not rows:
            continue
        where = _Places(places)
        splits[split] = _dataset(images, rows, p, where, split, image_size, root, split, options,
                                 label="BAPPS")
        # One view per val subset, sharing val's cache (LPIPS reports each subset).
        if split == "val":
            for subset in dict.fromkeys(subset_of):
                splits[f"val_{subset}"] = _dataset(
                    images, rows, p, where, f"val_{subset}", image_size, root, split, options,
                    serve=[s == subset for s in subset_of], label="BAPPS")
    return splits


# --------------------------------------------------------------------------------------------------
# THINGS odd-one-out (THINGS-data, Hebart et al. 2023: OSF f5rn6, triplet_dataset/ and
# variables/unique_id.txt)
# --------------------------------------------------------------------------------------------------

THINGS_FILES = {"train": "trainset.txt", "val": "validationset.txt", "test": "testset1.txt"}


def read_trials(path, n_concepts, odd_column=2):
    """A THINGS-data triplet file -> int array (T, 3): (i, j, odd k), whatever column held the odd
    one. Whitespace-separated 0-based indices, three per line; a bad line is an error naming it."""
    text = Path(path).read_text()
    lines, tokens = text.splitlines(), text.split()
    # Three tokens on EVERY line: a short line and a long one would add up to the right total
    # and be reshaped into wrong trials.
    good = all(len(line.split()) in (0, 3) for line in lines)
    try:
        trials = np.array(tokens, dtype=np.int64).reshape(-1, 3) if good else None
    except ValueError:  # a token that is not a whole number
        good = False
    if not good or trials.min(initial=0) < 0 or trials.max(initial=0) >= n_concepts:
        for line, content in enumerate(lines, 1):  # the slow path, only to name the line
            fields = content.split()
            if not fields:
                continue
            if len(fields) != 3 or not all(f.isdigit() for f in fields):
                raise ValueError(f"{path} line {line}: expected three 0-based concept indices, "
                                 f"got {content!r}")
            if max(map(int, fields)) >= n_concepts:
                raise ValueError(f"{path} line {line}: concept index {max(map(int, fields))} "
                                 f"out of range: unique_id.txt lists {n_concepts} concepts "
                                 f"(0 .. {n_concepts - 1})")
    others = [c for c in range(3) if c != odd_column]
    return trials[:, [others[0], others[1], odd_column]]


def things_images(root):
    """unique_id.txt, in the files' index order (not alphabetical: Hebart's analysis remaps with a
    sort index) -> the image of each concept, images/<unique_id>.jpg or .png."""
    ids = [line.strip() for line in (Path(root) / "unique_id.txt").read_text().splitlines()
           if line.strip()]
    images = []
    for concept in ids:
        candidates = [Path(root) / "images" / f"{concept}{suffix}"
                      for suffix in (".jpg", ".png", ".jpeg")]
        images.append(next((c for c in candidates if c.is_file()), candidates[0]))
    return images


def read_things(root, image_size, options):
    root = Path(root)
    for need in ("unique_id.txt", "triplet_dataset/" + THINGS_FILES["train"]):
        if not (root / need).exists():
            raise FileNotFoundError(f"THINGS: {root / need} is missing. THINGS-data (OSF f5rn6) "
                                    "ships triplet_dataset/ and variables/unique_id.txt; put "
                                    "unique_id.txt, triplet_dataset/ and images/ (one image per "
                                    "concept, named <unique_id>.jpg) under data_root")
    odd = options["odd_column"]
    if odd not in (0, 1, 2):
        raise ValueError(f"odd_column must be 0, 1 or 2 (the column of the odd one out), got {odd}")
    images = things_images(root)
    splits = {}
    for split, name in THINGS_FILES.items():
        if options["splits"] is not None and split not in options["splits"]:
            continue
        path = root / "triplet_dataset" / name
        if not path.exists():
            splits[split] = _empty(split, image_size, root)
            continue
        trials = read_trials(path, len(images), odd)
        i, j, k = trials.T
        # Trial t -> rows 2t, 2t+1.
        rows = np.stack([np.stack([i, j, k], 1), np.stack([j, i, k], 1)], 1).reshape(-1, 3)
        # Left (the pair's other member) is closer: no one chose right.
        p = np.zeros(len(rows), dtype=np.float32)
        dataset = _dataset(images, rows, p, LineOf(path, rows_per_line=2), split, image_size, root,
                           "images", options, label="THINGS")
        dataset.trials = trials  # (T, 3), the odd one last: the odd-one-out score reads them
        splits[split] = dataset
    return splits


def served_trials(dataset):
    """A THINGS split's trials (T, 3) that still have a row after skip_missing / a subset."""
    return dataset.trials[np.unique(dataset.index.numpy() // 2)]


# --------------------------------------------------------------------------------------------------
# Triplet tables (the PI authors' THINGS CSVs) and class-folder triplets (their NOD path), as
# github cheesepuff90/Brain_Initialization's src/dataset.py reads them (THINGSDataset,
# ImageNetCategoryTripletDataset)
# --------------------------------------------------------------------------------------------------

TABLE_FILES = {"train": "train_triplets.csv", "val": "val_triplets.csv",
               "test": "test_triplets.csv"}


def _share(row, path, line):
    try:
        share = float(row.get("share") or 1)
    except ValueError:
        share = float("nan")
    if not 0 <= share <= 1:
        raise ValueError(f"{path} line {line}, column share: expected a share in [0, 1], "
                         f"got {row.get('share')!r}")
    return share


def read_tables(root, image_size, options):
    root = Path(root)
    image_dir = Path(options["image_dir"]) if options["image_dir"] else (
        root / "Things1854" if (root / "Things1854").is_dir() else root)
    if not (root / TABLE_FILES["train"]).exists():
        raise FileNotFoundError(f"{root / TABLE_FILES['train']} is missing: a triplet table has "
                                "anchor_idx, positive_idx, negative_idx (+ "
                                "index_to_image_mapping.csv) or anchor, positive, negative columns")
    mapping = root / "index_to_image_mapping.csv"
    names = {}
    if mapping.exists():
        for line, row in _read_csv(mapping, ("index", "image_name")):
            try:
                names[int(row["index"])] = image_dir / row["image_name"].strip()
            except ValueError:
                raise ValueError(f"{mapping} line {line}, column index: expected a whole number, "
                                 f"got {row['index']!r}") from None
    images = list(dict.fromkeys(names.values()))
    number = {path: k for k, path in enumerate(images)}
    splits = {}
    for split, name in TABLE_FILES.items():
        path = root / name
        if not path.exists():
            splits[split] = _empty(split, image_size, root)
            continue
        with open(path, newline="", encoding="utf-8") as f:
            by_index = "anchor_idx" in next(csv.reader(f), [])
        if by_index and not names:
            raise FileNotFoundError(f"{path} names images by index (anchor_idx, ...) but "
                                    f"{mapping} does not exist")
        columns = (("anchor_idx", "positive_idx", "negative_idx") if by_index
                   else ("anchor", "positive", "negative"))
        rows, p, lines = [], [], []
        for line, row in _read_csv(path, columns):
            triplet = []
            for column in columns:
                if by_index:
                    value = row[column].strip()
                    if not value.lstrip("-").isdigit() or int(value) not in names:
                        raise ValueError(f"{path} line {line}, column {column}: index {value!r} "
                                         f"is not in {mapping} "
                                         f"(indices {min(names)} .. {max(names)})")
                    triplet.append(number[names[int(value)]])
                else:
                    image = image_dir / row[column].strip()
                    if image not in number:
                        number[image] = len(images)
                        images.append(image)
                    triplet.append(number[image])
            anchor, positive, negative = triplet
            # Right = positive, so p = the share who chose positive.
            rows.append([anchor, negative, positive])
            p.append(_share(row, path, line))
            lines.append(line)
        splits[split] = (rows, p, LineOf(path, lines))
    return {split: value if isinstance(value, TripletDataset) else
            _dataset(images, *value, split, image_size, root, "images", options,
                     label="triplet table")
            for split, value in splits.items()}


def read_categories(root, image_size, options):
    root = Path(root)
    image_dir = Path(options["image_dir"]) if options["image_dir"] else root / "images"
    per_class, seed = options["images_per_class"], options["seed"]
    if per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {per_class}")
    if not (root / TABLE_FILES["train"]).exists():
        raise FileNotFoundError(f"{root / TABLE_FILES['train']} is missing: class-folder triplets "
                                "are CSVs with anchor_cat, positive_cat, negative_cat (the PI "
                                "authors' NOD triplets)")
    columns = ("anchor_cat", "positive_cat", "negative_cat")
    tables = {split: _read_csv(root / name, columns) for split, name in TABLE_FILES.items()
              if (root / name).exists()}
    # The pool: images_per_class files of each class used anywhere, drawn once from the seed
    # (sorted listing, then a permutation keyed by seed and class name), so every split and run
    # sees the same.
    pool = {}
    for split, table in tables.items():
        for line, row in table:
            for column in columns:
                name = row[column].strip()
                if name in pool:
                    continue
                folder = image_dir / name
                files = (sorted(f for f in folder.iterdir() if f.suffix in IMAGE_SUFFIXES)
                         if folder.is_dir() else [])
                if not files:
                    raise FileNotFoundError(
                        f"{root / TABLE_FILES[split]} line {line}, column {column}: no class "
                        f"folder {folder} with images (image_dir holds one folder per class)")
                order = (np.random.default_rng([seed, zlib.crc32(name.encode())])
                         .permutation(len(files)))
                pool[name] = [files[k] for k in sorted(order[:per_class])]
    images = [f for files in pool.values() for f in files]
    start, offset = {}, 0
    for name, files in pool.items():
        start[name], offset = offset, offset + len(files)
    splits = {}
    for split in TABLE_FILES:
        if split not in tables:
            splits[split] = _empty(split, image_size, root)
            continue
        # Which pooled image of each class a row shows.
        pick = np.random.default_rng([seed, zlib.crc32(split.encode())])
        rows, lines = [], []
        for line, row in tables[split]:
            anchor, positive, negative = (row[c].strip() for c in columns)
            rows.append([start[c] + int(pick.integers(len(pool[c])))
                         for c in (anchor, negative, positive)])
            lines.append(line)
        splits[split] = _dataset(images, rows, np.ones(len(rows)),
                                 LineOf(root / TABLE_FILES[split], lines), split, image_size, root,
                                 f"pool-seed{seed}-{per_class}", options, label="categories")
    return splits


# --------------------------------------------------------------------------------------------------
# Dissimilarity matrices (an fMRI ROI's RDM, a behavioural or model RDM)
# --------------------------------------------------------------------------------------------------


def rdm_images(root):
    """The N images an RDM's rows stand for: images.txt (one path per line, relative to
    data_root), else the sorted image files of images/ -> (paths, where each came from)."""
    root = Path(root)
    listing = root / "images.txt"
    if listing.exists():
        lines = [(n, line.strip()) for n, line in enumerate(listing.read_text().splitlines(), 1)
                 if line.strip()]
        return [root / name for _, name in lines], [f"{listing} line {n}" for n, _ in lines]
    files = (sorted(f for f in (root / "images").iterdir() if f.suffix in IMAGE_SUFFIXES)
             if (root / "images").is_dir() else [])
    if not files:
        raise FileNotFoundError(f"{root} has neither images.txt nor image files in images/: "
                                "an RDM's N rows need N images")
    return files, [str(f) for f in files]


def read_rdm(path, n_images):
    """An N x N .npy -> float64 array, else an error saying what is wrong with it."""
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as a .npy array ({e})") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{path}: an RDM must be square (N x N), got shape {matrix.shape}")
    if len(matrix) != n_images:
        raise ValueError(f"{path}: the matrix is {len(matrix)} x {len(matrix)} but there are "
                         f"{n_images} images (images.txt or images/): one row per image, "
                         "in that order")
    matrix = matrix.astype(np.float64)
    if not np.isfinite(matrix).all():
        i, j = np.argwhere(~np.isfinite(matrix))[0]
        raise ValueError(f"{path}: entry ({i}, {j}) is {matrix[i, j]}: "
                         "an RDM may hold no NaN or infinity")
    if not np.allclose(matrix, matrix.T, rtol=1e-5, atol=1e-8):
        i, j = np.unravel_index(np.abs(matrix - matrix.T).argmax(), matrix.shape)
        raise ValueError(f"{path}: not symmetric: entry ({i}, {j}) = {matrix[i, j]} "
                         f"but ({j}, {i}) = {matrix[j, i]}")
    return matrix


def rdm_names(root, chosen=""):
    available = sorted(f.stem for f in (Path(root) / "rdms").glob("*.npy"))
    names = [n.strip() for n in chosen.split(",") if n.strip()] or available
    unknown = [n for n in names if n not in available]
    if not names or unknown:
        raise FileNotFoundError(f"{Path(root) / 'rdms'}: "
                                f"no RDM {', '.join(unknown) or '(none found)'}.npy "
                                f"(available: {', '.join(available) or 'none'})")
    return names


def rdm_triplets(matrix, part, count, min_gap, rng):
    """For each reference i in `part` (image indices), `count` draws of two other images j != k of
    the part, kept where |D[i, j] - D[i, k]| > min_gap (ties skipped) -> rows (i, j, k) and p = 1
    where k is closer."""
    rows, p = [], []
    if len(part) < 3:
        return rows, p
    for i in part:
        others = part[part != i]
        for _ in range(count):
            j, k = rng.choice(others, 2, replace=False)
            # > 0: k is closer ("smaller RDM distance = more similar").
            gap = matrix[i, j] - matrix[i, k]
            if abs(gap) > min_gap:
                rows.append([i, j, k])
                p.append(1.0 if gap > 0 else 0.0)
    return rows, p


def read_rdms(root, image_size, options):
    root = Path(root)
    images, places = rdm_images(root)
    holdout, seed = options["rdm_holdout"], options["seed"]
    if not 0 <= holdout < 0.5:
        raise ValueError("rdm_holdout must lie in [0, 0.5) (the share of images held out for val "
                         f"and for test), got {holdout}")
    order = np.random.default_rng([seed, 1]).permutation(len(images))
    n_hold = round(holdout * len(images))
    parts = {"val": np.sort(order[:n_hold]), "test": np.sort(order[n_hold:2 * n_hold]),
             "train": np.sort(order[2 * n_hold:])}
    names = rdm_names(root, options["rdm"] or "")
    matrices = {name: read_rdm(root / "rdms" / f"{name}.npy", len(images)) for name in names}
    splits = {}
    for split in ("train", "val", "test"):
        rows, p, segments = [], [], []
        for number, (name, matrix) in enumerate(matrices.items()):
            rng = np.random.default_rng([seed, number, zlib.crc32(split.encode())])
            segments.append((len(rows), f"{root / 'rdms' / name}.npy ({split})"))
            more_rows, more_p = rdm_triplets(matrix, parts[split],
                                             options["rdm_triplets_per_image"],
                                             options["rdm_min_gap"], rng)
            rows += more_rows
            p += more_p
        splits[split] = _dataset(images, np.array(rows).reshape(-1, 3), p, _Places(segments),
                                 split, image_size, root, "images", options, label="RDM")
    return splits


# --------------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------------

READERS = {"bapps": read_bapps, "things": read_things, "triplets": read_tables,
           "categories": read_categories, "rdm": read_rdms}
DEFAULTS = {"min_votes": 6, "bapps_subsets": "", "odd_column": 2, "image_dir": "",
            "images_per_class": 1, "rdm": "", "rdm_triplets_per_image": 20, "rdm_min_gap": 0.0,
            "rdm_holdout": 0.1, "seed": 0}


def open_splits(data_format, data_root, image_size, skip_missing=False, cache=True,
                cache_dir=None, workers=0, splits=None, **settings):
    """{split: TripletDataset} of a source laid out as its producer ships it (module docstring).
    `splits`: read only these (evaluation need not decode the train split); `settings`: any of
    OPTIONS (train_triplet.py's keys of the same names); the rest keep DEFAULTS."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; "
                         f"expected one of {', '.join(DATA_FORMATS)}")
    unknown = [k for k in settings if k not in OPTIONS]
    if unknown:
        raise TypeError(f"open_splits got unknown setting(s) {', '.join(unknown)}; "
                        f"known: {', '.join(OPTIONS)}")
    options = {**DEFAULTS, **settings, "skip_missing": skip_missing, "cache": cache,
               "cache_dir": cache_dir, "workers": workers, "splits": splits}
    if data_format == "nights":
        return read_splits(data_root, image_size, options["min_votes"], skip_missing, cache,
                           cache_dir, workers,
                           [s for s in NIGHTS_SPLITS if splits is None or s in splits])
    return READERS[data_format](data_root, image_size, options)
