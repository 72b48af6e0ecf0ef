"""Evaluation: every metric of the kit lives here, and both trainers call it for periodic evaluation.

  python evaluate.py --suite all                      # the paper's 31 zero-shot tasks
  python evaluate.py --ckpt pi.pt --ckpt base.pt --suite vtab --data-root DIR

Sections:
  NIGHTS 2AFC   DreamSim's two-alternative forced-choice score (stage 1's metric)
  zero-shot     CLIP_benchmark's classification and retrieval metrics, tasks, tables and the CLI
"""
import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from common import autocast, default_precision, ignore_stop_signals
from data import BenchmarkTask, ImageFolderTask, image_transform, imagenet_classnames_and_templates, tokenize
from model import load_checkpoint, nights_distances


# ---------------------------------------------------------------------------------------------------
# NIGHTS 2AFC
# ---------------------------------------------------------------------------------------------------


def two_afc_score(d0, d1, p):
    """DreamSim's 2AFC score per triplet: the share of observers the metric agrees with.
    d0 = d(ref, left), d1 = d(ref, right), p = share of observers who chose right. A tie scores 0.5."""
    return (d0 < d1) * (1 - p) + (d1 < d0) * p + (d0 == d1) * 0.5


@torch.no_grad()
def evaluate_nights(model, dataset, device, batch_size=64, precision="fp32", workers=0):
    """Mean 2AFC score of a CLIP's image embeddings on a NightsDataset (0.5 = chance, 1 = agrees
    with every observer)."""
    # Workers leave SIGTERM / SIGINT to the main process (a trainer evaluating stops after it).
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=ignore_stop_signals)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ref, left, right, p in tqdm(loader, desc=f"2afc {dataset.split}", leave=False):
        ref, left, right, p = (t.to(device, non_blocking=True) for t in (ref, left, right, p))
        with autocast(device, precision):
            d0, d1 = nights_distances(model.visual, ref, left, right)
        total += two_afc_score(d0, d1, p).sum().item()
        count += len(p)
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------------

# Metric definitions follow CLIP_benchmark 1.6.2 (metrics/zeroshot_classification.py,
# zeroshot_retrieval.py) and the main metric per task follows DataComp (REFERENCE.md section 10).
# Ranks: a candidate's rank is the number of candidates scored strictly higher plus the number of
# equal-scored candidates with a lower index; "in the top k" means rank < k. Without exact ties this is
# what torch.topk gives CLIP_benchmark; with ties, torch.topk's order is unspecified and this rule
# makes the numbers deterministic (and acc1 agrees with argmax, which takes the first maximum).

CLASSIFICATION_TASKS = [
    "imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet",
    "cifar10", "vtab/cifar100", "vtab/caltech101", "vtab/dtd", "vtab/eurosat", "vtab/flowers", "vtab/pets",
    "vtab/pcam", "vtab/resisc45", "vtab/svhn", "vtab/clevr_count_all", "vtab/clevr_closest_object_distance",
    "vtab/kitti_closest_vehicle_distance", "cars", "fgvc_aircraft", "food101", "country211", "gtsrb", "mnist",
    "stl10", "renderedsst2", "voc2007",
]
RETRIEVAL_TASKS = ["flickr30k", "mscoco_captions"]
GROUPS = {
    "all": CLASSIFICATION_TASKS + RETRIEVAL_TASKS,  # the 31 tasks of the PI paper's table
    "imagenet": CLASSIFICATION_TASKS[:7],  # ImageNet and its six distribution shifts
    "vtab": [t for t in CLASSIFICATION_TASKS if t.startswith("vtab/")],
    "retrieval": RETRIEVAL_TASKS,
}
# DataComp scores these by balanced accuracy (their classes are very unequal in size), the rest by acc1.
MEAN_PER_CLASS_RECALL_TASKS = {"vtab/caltech101", "fgvc_aircraft", "vtab/flowers", "vtab/pets"}
RECALL_KS = (1, 5, 10)
DEFAULT_CHECKPOINTS = ["runs/pi/ckpt.pt", "runs/baseline/ckpt.pt"]
DEFAULT_DATA_ROOT = os.environ.get("PI_BENCHMARK_ROOT", "data/clip_benchmark")


def target_ranks(scores, targets):
    """scores (N, C), targets (N,) column indices -> (N,) rank of each row's target (0 = best)."""
    target_scores = scores.gather(1, targets[:, None])  # (N, 1)
    columns = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > target_scores) | ((scores == target_scores) & (columns < targets[:, None]))
    return ahead.sum(1)


def classification_metrics(logits, targets):
    """logits (N, C), int targets (N,) -> acc1, acc5 (NaN under 5 classes, as CLIP_benchmark) and
    mean_per_class_recall: the mean over classes present in targets of the fraction of their samples
    predicted right (sklearn's balanced_accuracy_score)."""
    ranks = target_ranks(logits, targets)
    acc1 = (ranks < 1).double().mean().item()
    acc5 = (ranks < 5).double().mean().item() if logits.shape[1] >= 5 else float("nan")
    present = targets.unique()
    recalls = [(ranks[targets == c] == 0).double().mean().item() for c in present.tolist()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


def mean_average_precision(scores, targets):
    """Multi-label (voc2007-style): per class, rank images by score (ties: lower index first) and
    average the precision at each positive; mean over classes (classes with no positive count 0)."""
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices  # (N, C)
    hits = targets.gather(0, order).double()  # (N, C) 1 where the k-th ranked image is a positive
    precision = hits.cumsum(0) / torch.arange(1, len(scores) + 1, dtype=torch.float64)[:, None]
    ap = (precision * hits).sum(0) / hits.sum(0).clamp(min=1)
    return {"mean_average_precision": ap.mean().item()}


def retrieval_metrics(scores, text_to_image, ks=RECALL_KS, chunk=1024):
    """scores (T, I) = text_emb @ image_emb.T; text_to_image (T,) the image each caption belongs to.

    image_retrieval_recall@k: per caption, 1 if its image ranks in the top k images; mean over captions.
    text_retrieval_recall@k: per image, 1 if ANY of its captions ranks in the top k captions; mean over
    images. mean_recall@1 averages the two @1 values (DataComp's retrieval score).
    """
    image_ranks = target_ranks(scores, text_to_image)  # (T,)
    by_image = scores.t()  # (I, T)
    text_ranks = torch.cat([target_ranks(by_image[text_to_image[s:s + chunk]], torch.arange(s, min(s + chunk, len(scores))))
                            for s in range(0, len(scores), chunk)])  # (T,) rank of each caption for its own image
    best_caption_rank = torch.full((scores.shape[1],), len(scores)).scatter_reduce(0, text_to_image, text_ranks, "amin")
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (image_ranks < k).double().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (best_caption_rank < k).double().mean().item()
    if 1 in ks:
        metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2
    return metrics


def main_metric(task, metrics):
    """-> (name, value) of the number DataComp reports for `task`."""
    if "mean_recall@1" in metrics:
        name = "mean_recall@1"
    elif "acc1" not in metrics:
        name = "mean_average_precision"
    else:
        name = "mean_per_class_recall" if task in MEAN_PER_CLASS_RECALL_TASKS else "acc1"
    return name, metrics[name]


# ---- Running a model on a task ----


def _collate_captions(batch):  # retrieval: stack the images, keep each image's list of captions
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


@torch.no_grad()
def _encode_texts(model, texts, device, precision, batch_size, desc, progress):
    """list of str -> (N, E) float32 unit vectors on the CPU, encoded in batches."""
    tokens = tokenize(texts, context_length=model.config.context_length)  # (N, T)
    features = []
    for start in tqdm(range(0, len(tokens), batch_size), desc=desc, leave=False, disable=not progress):
        with autocast(device, precision):
            x = model.encode_text(tokens[start:start + batch_size].to(device))
        features.append(F.normalize(x.float(), dim=-1).cpu())
    return torch.cat(features)


def zero_shot_classifier(model, classnames, templates, device, precision="fp32", batch_size=256, progress=False):
    """(E, C): per class, every template filled with the class name, encoded, L2-normalised, averaged
    and renormalised (CLIP / CLIP_benchmark). Computed once per task."""
    texts = [template.format(c=name) for name in classnames for template in templates]
    features = _encode_texts(model, texts, device, precision, batch_size, "class texts", progress)
    per_class = features.view(len(classnames), len(templates), -1).mean(1)  # (C, E)
    return F.normalize(per_class, dim=-1).t()  # (E, C)


def open_task(task_dir, image_size):
    """A task folder (CLIP_benchmark format, or ImageNet's val in ImageFolder layout) -> dataset."""
    transform = image_transform(image_size, "eval")
    task_dir = Path(task_dir)
    if task_dir.name.startswith("wds_") or (task_dir / "test").exists() or not task_dir.is_dir():
        return BenchmarkTask(task_dir, transform)
    return ImageFolderTask(task_dir, *imagenet_classnames_and_templates(), transform=transform)


@torch.no_grad()
def evaluate_task(model, task_dir, device, batch_size=64, workers=0, precision="fp32", progress=True):
    """Zero-shot metrics of `model` on one task folder -> dict (CLIP_benchmark's metric names)."""
    task = open_task(task_dir, model.config.image_size)
    was_training = model.training
    model.eval()
    name = Path(task_dir).name
    retrieval = task.task_type == "retrieval"
    loader = DataLoader(task, batch_size=batch_size, num_workers=workers, shuffle=False,
                        pin_memory=torch.device(device).type == "cuda", worker_init_fn=ignore_stop_signals,
                        collate_fn=_collate_captions if retrieval else None)
    if not retrieval:
        classifier = zero_shot_classifier(model, task.classnames, task.templates, device, precision, progress=progress)
        classifier = classifier.to(device)
    images, labels, captions = [], [], []
    for batch_images, batch_labels in tqdm(loader, desc=name, leave=False, disable=not progress):
        with autocast(device, precision):
            features = model.encode_image(batch_images.to(device, non_blocking=True))
        features = F.normalize(features.float(), dim=-1)  # (B, E)
        if retrieval:
            images.append(features.cpu())
            captions.extend(batch_labels)
        else:
            images.append((100.0 * features @ classifier).cpu())  # logits (B, C), as CLIP_benchmark
            labels.append(batch_labels)
    model.train(was_training)
    if retrieval:
        text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        texts = _encode_texts(model, [c for caps in captions for c in caps], device, precision, batch_size,
                              f"{name} captions", progress)
        return retrieval_metrics(texts @ torch.cat(images).t(), text_to_image)
    logits, targets = torch.cat(images), torch.cat(labels)
    if task.task_type == "multilabel":
        return mean_average_precision(logits, targets)
    return classification_metrics(logits, targets)


def task_dir(data_root, task):
    """Where `task` lives under data_root: wds_<task with / as ->, or imagenet1k/val for ImageNet."""
    folder = Path(data_root) / ("wds_" + task.replace("/", "-"))
    if task == "imagenet1k" and not folder.exists() and (Path(data_root) / "imagenet1k" / "val").is_dir():
        return Path(data_root) / "imagenet1k" / "val"
    return folder


def resolve_tasks(suite, data_root):
    """A group name (all, imagenet, vtab, retrieval, demo) or comma-separated task names -> task list.
    demo: the tasks listed in <data_root>/tasks.txt (one name a line), else every wds_* folder there."""
    if suite in GROUPS:
        return list(GROUPS[suite])
    if suite == "demo":
        listing = Path(data_root) / "tasks.txt"
        if listing.exists():
            names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        else:
            names = sorted(p.name for p in Path(data_root).glob("wds_*") if p.is_dir())
        return [n.removeprefix("wds_") for n in names]
    return [t.strip() for t in suite.split(",") if t.strip()]


def run_tasks(model, tasks, data_root, device, batch_size=64, workers=0, precision="fp32", progress=True):
    """-> {task: metrics} for the tasks whose folder exists; a missing one is skipped with a note."""
    results = {}
    for task in tasks:
        folder = task_dir(data_root, task)
        if not folder.exists():
            tqdm.write(f"zero-shot: {task} skipped, its data is missing (expected {folder})")
            continue
        results[task] = evaluate_task(model, folder, device, batch_size, workers, precision, progress)
    return results


# ---- Reporting ----


def _fmt(value):
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def comparison_table(results_by_run, tasks=None):
    """Markdown table of each task's main metric (%) per run, the first run minus the second, the first
    run's win count and the average over tasks every run has. results_by_run: {run label: {task: metrics}}."""
    runs = list(results_by_run)
    if tasks is None:
        tasks = list(dict.fromkeys(t for r in runs for t in results_by_run[r]))
    header = ["task", "metric", *runs] + ([f"{runs[0]} - {runs[1]}"] if len(runs) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    complete, wins = [], 0
    for task in tasks:
        values = [main_metric(task, results_by_run[r][task])[1] if task in results_by_run[r] else None for r in runs]
        metric = next(main_metric(task, results_by_run[r][task])[0] for r in runs if task in results_by_run[r])
        row = [task, metric, *map(_fmt, values)]
        if all(v is not None and not math.isnan(v) for v in values):
            complete.append(values)
            if len(runs) > 1:
                wins += values[0] > values[1]
                row.append(f"{100 * (values[0] - values[1]):+.2f}")
        elif len(runs) > 1:
            row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    if complete:
        means = [sum(col) / len(complete) for col in zip(*complete)]
        row = [f"average ({len(complete)} tasks)", "", *map(_fmt, means)]
        lines.append("| " + " | ".join(row + ([f"{100 * (means[0] - means[1]):+.2f}"] if len(runs) > 1 else [])) + " |")
        if len(runs) > 1:
            lines.append(f"\n{runs[0]} better than {runs[1]} on {wins}/{len(complete)} tasks")
    return "\n".join(lines)


def plot_comparison(results_by_run, path, tasks=None):
    """Bar chart of the main metric per task and run, saved to `path`; None when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = list(results_by_run)
    tasks = [t for t in (tasks or dict.fromkeys(t for r in runs for t in results_by_run[r]))
             if all(t in results_by_run[r] for r in runs)]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tasks) + 2), 4.5))
    for i, run in enumerate(runs):
        values = [100 * main_metric(t, results_by_run[run][t])[1] for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=run)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("main metric (%)")
    ax.set_title("Zero-shot comparison (DataComp main metric per task)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _run_labels(paths):
    """Run names from checkpoint paths: the parent folder (runs/pi/ckpt.pt -> pi), else the path."""
    labels = [Path(p).resolve().parent.name if Path(p).name == "ckpt.pt" else Path(p).stem for p in paths]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in paths]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Zero-shot evaluation on CLIP_benchmark task folders, with a comparison table of the runs.")
    parser.add_argument("--ckpt", action="append", default=None,
                        help="checkpoint (kit, open_clip or OpenAI state dict); repeat for several. Default: those of "
                             f"{' and '.join(DEFAULT_CHECKPOINTS)} that exist. The first two are compared.")
    parser.add_argument("--suite", default="all",
                        help=f"a group ({', '.join(GROUPS)}, demo = the tasks in DATA_ROOT/tasks.txt or its wds_* "
                             "folders) or comma-separated task names, e.g. cifar10,vtab/pets (default: all, the paper's 31)")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                        help="folder of wds_<task> folders (CLIP_benchmark's published format) and imagenet1k/val; "
                             "default: $PI_BENCHMARK_ROOT when set, else data/clip_benchmark")
    parser.add_argument("--out", default="results.json", help="JSON records, one per (checkpoint, task), and a PNG chart beside it (default: results.json)")
    parser.add_argument("--quickgelu", action="store_true", help="QuickGELU activation (needed for OpenAI-trained weights)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers (default: up to 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda when present")
    parser.add_argument("--precision", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    args = parser.parse_args(argv)
    checkpoints = args.ckpt or [p for p in DEFAULT_CHECKPOINTS if Path(p).exists()]
    if not checkpoints:
        parser.error(f"no checkpoint given and none of the defaults exist ({', '.join(DEFAULT_CHECKPOINTS)}); "
                     "pass --ckpt PATH")
    precision = args.precision or default_precision(args.device)
    tasks = resolve_tasks(args.suite, args.data_root)
    missing = [t for t in tasks if not task_dir(args.data_root, t).exists()]
    for t in missing:
        print(f"missing: {t} (expected {task_dir(args.data_root, t)})")
    if len(missing) == len(tasks):
        parser.error(f"no task of suite {args.suite!r} has data under {args.data_root} (see --help for the layout)")
    tasks = [t for t in tasks if t not in missing]
    labels = _run_labels(checkpoints)
    results_by_run, records = {}, []
    for label, path in zip(labels, checkpoints):
        model = load_checkpoint(path, quickgelu=True if args.quickgelu else None).to(args.device)
        print(f"{label}: {path}, {model.num_params() / 1e6:.1f}M parameters, {len(tasks)} tasks, {precision}")
        results_by_run[label] = run_tasks(model, tasks, args.data_root, args.device, args.batch_size, args.workers, precision)
        for task, metrics in results_by_run[label].items():
            records.append({"dataset": task, "model": label, "pretrained": str(path),
                            "task": "zeroshot_retrieval" if "mean_recall@1" in metrics else "zeroshot_classification",
                            "metrics": metrics, "language": "en"})
        del model
    print(comparison_table(results_by_run, tasks))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    chart = plot_comparison(results_by_run, Path(args.out).with_suffix(".png"), tasks)
    print(f"wrote {args.out}" + (f" and {chart}" if chart else " (install matplotlib for a chart)"))


if __name__ == "__main__":
    main()
