"""Probes of a vision tower's feature space: what an initialisation changed, not only that a score
moved.

  python evaluate.py --probe A.pt B.pt [C.pt ...] --images FOLDER_OR_TASK
                     [--linear-probe SUITE --data-root DIR]

Sections (every checkpoint frozen; the images are decoded once and shared by all checkpoints):
  CKA            linear CKA (Kornblith et al. 2019) between two towers, per layer: a ViT's class
                 token after each residual block (block1 ...), a ResNet's stage outputs averaged
                 over the grid (stage1 ... stage4), and the final embedding, on the same images
  RSA            representational similarity: Spearman correlation between a model's pairwise image
                 distances (1 - cos) and a reference distance (e.g. the demo's observer distance)
  linear probe   L2-regularised multinomial logistic regression on frozen, normalised image
                 features: CLIP_benchmark's linear-probe protocol (train split fitted, test split
                 scored), fitted by full-batch L-BFGS as scikit-learn's LogisticRegression does
                 (no sklearn at run time)
  CLI            `python evaluate.py --probe ...` lands in main() here
"""
import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from checkpoints import load_checkpoint
from cli import progress as progress_bar
from cli import user_input
from data import BenchmarkTask, image_transform, resolve_tasks, task_dir

# Letters: N images, D features (block width or embedding size), K classes.

# --------------------------------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------------------------------


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019, eq. 5) of two representations of the same N inputs:
    x (N, Dx), y (N, Dy) -> ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred.
    1 for representations equal up to rotation and isotropic scaling, near 0 for unrelated ones."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.t() @ x).square().sum()  # ||Y^T X||_F^2
    return (cross / ((x.t() @ x).norm() * (y.t() @ y).norm())).item()


# --------------------------------------------------------------------------------------------------
# Representational similarity
# --------------------------------------------------------------------------------------------------


def average_ranks(values):
    """(M,) -> (M,) float64 ranks 1..M, tied values sharing the mean of their ranks (scipy's
    'average')."""
    values = torch.as_tensor(values).double()
    order = values.argsort(stable=True)
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()  # the last rank of each run of equal values
    ranks = torch.empty_like(values)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return ranks


def spearman(a, b):
    """Spearman's rank correlation of two (M,) vectors: Pearson's r of their average ranks."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def pairwise_distances(features):
    """(N, D) -> (N (N - 1) / 2,) cosine distances 1 - cos of every pair i < j, row-major."""
    unit = F.normalize(features.double(), dim=-1)
    i, j = torch.triu_indices(len(unit), len(unit), offset=1)
    return 1 - (unit[i] * unit[j]).sum(-1)


def representational_similarity(features, reference):
    """Spearman correlation between a model's pairwise distances on N images (features (N, D)) and a
    reference distance matrix (N, N) on the same images, over the pairs i < j."""
    reference = torch.as_tensor(np.asarray(reference)).double()
    if reference.shape != (len(features), len(features)):
        raise ValueError(f"reference distances are {tuple(reference.shape)} "
                         f"for {len(features)} images")
    i, j = torch.triu_indices(len(features), len(features), offset=1)
    return spearman(pairwise_distances(features), reference[i, j])


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------

# Classification metrics as CLIP_benchmark 1.6.2 defines them (metrics/zeroshot_classification.py);
# the linear probe scores with them, and analysis/zero_shot.py's classification imports them from
# here (as analysis/alignment.py imports this file's RSA and tower features).


def top_k(scores, k, block=None, device="cpu"):
    """scores (Q, C) -> (Q, k) column indices of each row's k best, best first, from torch.topk run
    on blocks of `block` rows moved to `device` (CLIP_benchmark's calls; block None = all rows at
    once)."""
    block = block or len(scores)
    k = min(k, scores.shape[1])  # fewer candidates than k: all of them are in the top k
    return torch.cat([torch.topk(scores[s:s + block].to(device), k, dim=1).indices.cpu()
                      for s in range(0, len(scores), block)])


def classification_metrics(logits, targets):
    """logits (N, C), int targets (N,) -> acc1, acc5 (NaN under 5 classes, as CLIP_benchmark) and
    mean_per_class_recall: the mean over classes present in targets of the fraction of their samples
    whose argmax is right (sklearn's balanced_accuracy_score, which CLIP_benchmark calls).
    acc1 and acc5 come from one topk(5) call, as CLIP_benchmark's `accuracy`: under a tie at the top
    acc1 follows topk's order and mean_per_class_recall argmax's (the first maximum)."""
    ks = (1, 5) if logits.shape[1] >= 5 else (1,)
    hits = top_k(logits, max(ks)) == targets[:, None]  # (N, k) True where the target sits
    acc = {f"acc{k}": float(hits[:, :k].sum()) / len(targets) for k in ks}
    predicted = logits.argmax(dim=1)
    recalls = [(predicted[targets == c] == c).double().mean().item()
               for c in targets.unique().tolist()]
    return {"acc1": acc["acc1"], "acc5": acc.get("acc5", float("nan")),
            "mean_per_class_recall": float(np.mean(recalls))}


# The L2 strengths tried on a held-out share of the train split (OpenAI's CLIP paper sweeps C on a
# validation set, CLIP_benchmark its weight decay); the best is refitted on the whole train split.
# Measured on the demo: 0.1 never won, 1e3 often did.
PROBE_C_GRID = (1.0, 10.0, 100.0, 1e3, 1e4)
PROBE_VAL_SHARE = 0.2


def fit_logistic_regression(x, y, num_classes, C=1.0, max_iter=100, start=None, tolerance=1e-6):
    """Multinomial logistic regression with an L2 penalty on the weights (not the bias), the
    objective of scikit-learn's LogisticRegression(C=C): minimise C * sum_i CE_i + ||W||^2 / 2, here
    divided by C N (same minimum). Full-batch L-BFGS in float64, at most max_iter iterations
    (sklearn's default 100) or until the gradient's largest entry is below `tolerance`.
    start: (W, b) to begin from (a warm start along a sweep of C), else zeros.
    x (N, D), int y (N,) -> (W (D, K), b (K,)).

    The loss and its gradient are written by hand: half the cost of autograd on problems this
    small. A small problem on the CPU runs on one thread: thread hand-offs cost more than they save
    (20x on a busy 2-core box)."""
    x = x.double()
    weight = (torch.zeros(x.shape[1], num_classes, dtype=torch.float64) if start is None
              else start[0].clone())
    bias = torch.zeros(num_classes, dtype=torch.float64) if start is None else start[1].clone()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tolerance, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    one_hot = F.one_hot(y, num_classes).double()  # (N, K)
    penalty = 1 / (C * len(x))

    def closure():  # the loss and its gradient, by hand (cheaper than autograd here)
        logits = x @ weight + bias  # (N, K)
        residual = (torch.softmax(logits, 1) - one_hot) / len(x)  # d(mean CE) / d logits
        weight.grad, bias.grad = x.t() @ residual + penalty * weight, residual.sum(0)
        return ((logits.logsumexp(1) - (logits * one_hot).sum(1)).mean()
                + penalty / 2 * weight.square().sum())

    threads = torch.get_num_threads()
    if x.device.type == "cpu" and x.numel() < 2**22:
        torch.set_num_threads(1)  # a small problem: thread hand-offs cost more than they save
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weight.detach(), bias.detach()


def linear_probe(train_x, train_y, test_x, test_y, grid=PROBE_C_GRID, val_share=PROBE_VAL_SHARE,
                 seed=0):
    """CLIP_benchmark's linear-probe protocol on frozen features: fit on the train split, score the
    test split (lp_acc1, lp_acc5, lp_mean_per_class_recall, as its keys). C is chosen on a seeded
    held-out `val_share` of the train split when the grid has several values, then refitted on all
    of it."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    best_c = grid[0]
    if len(grid) > 1:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(val_share * len(train_x)))
        val, fit = order[:n_val], order[n_val:]
        accuracies, solution = [], None
        # From the strongest penalty up, each fit starting from the last one's solution.
        for c in sorted(grid):
            solution = weight, bias = fit_logistic_regression(train_x[fit], train_y[fit],
                                                              num_classes, c, start=solution)
            accuracies.append(((train_x[val].double() @ weight + bias).argmax(1)
                               == train_y[val]).double().mean().item())
        grid = sorted(grid)
        # Ties: the stronger penalty.
        best_c = grid[max(range(len(grid)), key=lambda k: (accuracies[k], -k))]
    weight, bias = fit_logistic_regression(train_x, train_y, num_classes, best_c)
    metrics = classification_metrics(test_x.double() @ weight + bias, test_y)
    return {f"lp_{k}": v for k, v in metrics.items()} | {"C": best_c}


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def layers_of(visual):
    """-> (name prefix, modules, output -> (B, W) feature): where a vision tower's layers are read.
    A ViT: the class token after each residual block ("block1", ...). A ResNet has no class token
    and its blocks change width within a stage: each stage's output ("stage1" ... "stage4"), read at
    the stage's last block and averaged over its grid (the global average pool a ResNet's features
    are usually read with)."""
    if hasattr(visual, "transformer"):
        return "block", list(visual.transformer.resblocks), lambda out: out[:, 0]
    return "stage", [stage[-1] for stage in visual.stages()], lambda out: out.mean(dim=(2, 3))


@torch.no_grad()
def tower_features(model, images, device="cpu", batch_size=256, workers=0):
    """images: a tensor (N, 3, S, S), or a dataset of (image, label) items streamed in batches ->
    {"block1": (N, W), ..., "embedding": (N, E)}: each layer's feature (layers_of: a ViT's blocks, a
    ResNet's stages, read by forward hooks) and the normalised projected embedding."""
    model.eval()
    captured, outputs = [], {}
    prefix, layers, feature = layers_of(model.visual)
    hooks = [layer.register_forward_hook(lambda module, args, out:
                                         captured.append(feature(out).float().cpu()))
             for layer in layers]
    batches = (images.split(batch_size) if torch.is_tensor(images) else
               (x for x, _ in DataLoader(images, batch_size=batch_size, num_workers=workers)))
    try:
        for batch in batches:
            captured.clear()
            embedding = model.encode_image(batch.to(device)).float().cpu()
            for k, token in enumerate(captured):
                outputs.setdefault(f"{prefix}{k + 1}", []).append(token)
            outputs.setdefault("embedding", []).append(F.normalize(embedding, dim=-1))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in outputs.items()}


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# An image set up to this size (as float tensors) is decoded once for every checkpoint.
DECODE_ONCE_BYTES = 2**30


class ImageFiles(torch.utils.data.Dataset):
    """A folder's image files, sorted by name -> (image, -1) items."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i])), -1


def read_images(path, image_size, split="test"):
    """A folder of image files (sorted by name) or a CLIP_benchmark task folder (its `split`) ->
    (images, labels or None): images a tensor (N, 3, S, S) after the eval transform when they fit in
    DECODE_ONCE_BYTES (decoded once, reused for every checkpoint), else the dataset, streamed."""
    path, transform = Path(path), image_transform(image_size, "eval")
    if (path / split / "nshards.txt").exists():
        dataset = BenchmarkTask(path, transform, split=split)
        labels = dataset.task_type == "classification"
    else:
        files = (sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                 if path.is_dir() else [])
        if not files:
            raise FileNotFoundError(f"{path}: neither a CLIP_benchmark task folder "
                                    f"({split}/nshards.txt) nor a folder of images "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        dataset, labels = ImageFiles(files, transform), False
    # Streamed; the labels read in one pass.
    if len(dataset) * 3 * image_size**2 * 4 > DECODE_ONCE_BYTES:
        return dataset, (torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
                         if labels else None)
    items = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([image for image, _ in items]),
            torch.tensor([label for _, label in items]) if labels else None)


# --------------------------------------------------------------------------------------------------
# CLI: python evaluate.py --probe CKPT [CKPT ...] --images FOLDER_OR_TASK
# --------------------------------------------------------------------------------------------------


def run_probes(checkpoints, images, reference=None, probe_tasks=(), data_root=".", device="cpu",
               batch_size=256, quickgelu=None, labels=None, progress=True):
    """-> {"n_images", "cka": {"A~B": {layer: value}}, "rsa": {label: rho} (with a reference),
    "linear_probe": {label: {task: metrics}}}. Images are decoded once per image size."""
    if labels is None:  # runs/pi/ckpt.pt -> pi; the paths themselves when those names repeat
        labels = [Path(p).parent.name if Path(p).name == "ckpt.pt" else Path(p).stem
                  for p in checkpoints]
        labels = (labels if len(set(labels)) == len(labels)
                  else [f"{i}:{p}" for i, p in enumerate(checkpoints)])
    cache = {}  # (what, image size) -> decoded tensors

    def decoded(key, size, read):
        if (key, size) not in cache:
            cache[key, size] = read(size)
        return cache[key, size]

    features, results = {}, {"n_images": None, "cka": {}, "linear_probe": {}}
    if reference is not None:
        results["rsa"] = {}
    for label, path in progress_bar(list(zip(labels, checkpoints)), desc="probes",
                                    disable=not progress):
        with user_input():  # a missing or foreign file: the user's to fix
            model = load_checkpoint(path, quickgelu=quickgelu).to(device)
        size = model.config.image_size
        probe_images, _ = decoded(str(images), size, lambda s: read_images(images, s))
        results["n_images"] = len(probe_images)
        features[label] = tower_features(model, probe_images, device, batch_size)
        if reference is not None:
            results["rsa"][label] = representational_similarity(features[label]["embedding"],
                                                                reference)
        for task in probe_tasks:
            folder = task_dir(data_root, task)
            train_x, train_y = decoded(f"{task}/train", size,
                                       lambda s: read_images(folder, s, "train"))
            test_x, test_y = decoded(f"{task}/test", size, lambda s: read_images(folder, s, "test"))
            train_f = tower_features(model, train_x, device, batch_size)["embedding"]
            test_f = tower_features(model, test_x, device, batch_size)["embedding"]
            results["linear_probe"].setdefault(label, {})[task] = linear_probe(train_f, train_y,
                                                                               test_f, test_y)
        del model
    for a, b in itertools.combinations(labels, 2):
        # Towers of unequal depth: the shared blocks.
        layers = [k for k in features[a] if k in features[b]]
        results["cka"][f"{a}~{b}"] = {k: linear_cka(features[a][k], features[b][k]) for k in layers}
    return results


def probe_tasks_with_train_split(suite, data_root):
    """The classification tasks of `suite` whose folder has a train split (CLIP_benchmark's
    layout)."""
    if not suite:
        return []
    tasks = [t for t in resolve_tasks(suite, data_root)
             if (task_dir(data_root, t) / "train" / "nshards.txt").exists()]
    return [t for t in tasks if BenchmarkTask(task_dir(data_root, t)).task_type == "classification"]


def plot_probes(results, path):
    """CKA per layer for every pair, RSA per model and mean linear-probe accuracy per model -> the
    PNG's path."""
    import matplotlib  # a runtime requirement; imported only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("cka", "rsa", "linear_probe") if results.get(p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "cka":
            for pair, layers in results["cka"].items():
                ax.plot(list(layers), list(layers.values()), marker="o", label=pair)
            ax.set(ylim=(0, 1.02), ylabel="linear CKA", title="CKA between towers, per layer")
            ax.legend(fontsize=7)
        else:
            values = results[panel] if panel == "rsa" else \
                {m: sum(t["lp_acc1"] for t in tasks.values()) / len(tasks)
                 for m, tasks in results[panel].items()}
            ax.bar(list(values), list(values.values()))
            ax.tick_params(axis="x", rotation=30)
            ax.set(ylabel="Spearman rho" if panel == "rsa" else "mean linear-probe acc1",
                   title=("Distances vs the reference" if panel == "rsa"
                          else "Linear probe (test split)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="evaluate.py --probe",
        description="Feature-space probes of frozen vision towers: CKA per layer between every "
                    "pair of checkpoints, Spearman correlation of their image distances with a "
                    "reference, linear probes.")
    parser.add_argument("--probe", nargs="+", required=True, metavar="CKPT",
                        help="checkpoints (kit, open_clip or OpenAI)")
    parser.add_argument("--images", required=True,
                        help="images for CKA and RSA: a folder of image files (sorted by name) or "
                             "a CLIP_benchmark task folder (its test split)")
    parser.add_argument("--reference", default=None,
                        help="N x N reference distances (.npy) on those images, in their order; "
                             "default: IMAGES/reference_distance.npy when it exists (the demo "
                             "writes one: its observers' distance)")
    parser.add_argument("--linear-probe", default="", metavar="SUITE",
                        help="tasks for the linear probe (a group, demo, or comma-separated "
                             "names); those with a train split under --data-root are used")
    parser.add_argument("--data-root",
                        default=os.environ.get("PI_BENCHMARK_ROOT", "data/clip_benchmark"))
    parser.add_argument("--out", default="probes.json",
                        help="results (JSON) and a PNG figure beside it")
    parser.add_argument("--quickgelu", action="store_true",
                        help="QuickGELU activation (OpenAI-trained weights)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    reference_path = (Path(args.reference) if args.reference
                      else Path(args.images) / "reference_distance.npy")
    if args.reference and not reference_path.exists():
        parser.error(f"--reference {reference_path} does not exist")
    reference = np.load(reference_path) if reference_path.exists() else None
    tasks = probe_tasks_with_train_split(args.linear_probe, args.data_root)
    if args.linear_probe and not tasks:
        parser.error(f"no classification task of {args.linear_probe!r} has a train split under "
                     f"{args.data_root} (expected <task folder>/train/nshards.txt)")
    results = run_probes(args.probe, args.images, reference, tasks, args.data_root, args.device,
                         args.batch_size, True if args.quickgelu else None)
    results = {"checkpoints": args.probe, "images": str(args.images),
               "reference": str(reference_path) if reference is not None else None, **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for pair, layers in results["cka"].items():
        print(f"CKA {pair}: " + ", ".join(f"{k} {v:.3f}" for k, v in layers.items()))
    for label, rho in results.get("rsa", {}).items():
        print(f"RSA {label}: Spearman {rho:.3f} with {reference_path.name}")
    for label, by_task in results["linear_probe"].items():
        print(f"linear probe {label}: "
              + ", ".join(f"{t} {100 * m['lp_acc1']:.1f}%" for t, m in by_task.items()))
    chart = plot_probes(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {chart}")
    return results
