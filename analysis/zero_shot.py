"""Zero-shot classification and retrieval in CLIP_benchmark's format: task folders, prompts,
metrics, several checkpoints in one pass over each task's images, and the comparison table of runs.

  results = run_suite([model_a, model_b], ["cifar10", "flickr30k"], "data/clip_benchmark", "cuda")
  print(comparison_table({"pi": results[0], "baseline": results[1]}))

Metric definitions follow CLIP_benchmark 1.6.2 (metrics/zeroshot_classification.py,
zeroshot_retrieval.py) and the main metric per task follows DataComp (github mlfoundations/datacomp,
tasklist.yml, main_metric). "In the top k" is decided the way CLIP_benchmark decides it: torch.topk
per query, on the same blocks of queries and the same device it uses. Where scores tie exactly (COCO
and Flickr30k repeat captions across images; a task may repeat an image), which of the tied
candidates makes the top k is topk's choice, so only the same calls give the same numbers: a
rank-based rule would differ there.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from analysis.probes import classification_metrics, top_k
from cli import progress as progress_bar
from cli import user_input
from data import (BenchmarkTask, ImageFolderTask, image_transform,
                  imagenet_classnames_and_templates, missing_task_message, task_dir, tokenize)
from training import autocast, ignore_stop_signals

# --------------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# --------------------------------------------------------------------------------------------------

# DataComp scores these by balanced accuracy (their classes are very unequal in size), the
# rest by acc1.
MEAN_PER_CLASS_RECALL_TASKS = {"vtab/caltech101", "fgvc_aircraft", "vtab/flowers", "vtab/pets"}
RECALL_KS = (1, 5, 10)
# A small task's decoded images are kept for the next evaluation in the same process (a trainer
# evaluates every eval_every steps: the demo 4 times a run, ~0.5 s of PNG decoding each), up to this
# many bytes of image tensors in all; a larger task (ImageNet) is decoded each time.
IMAGE_CACHE_BYTES = 512 * 2**20
_image_cache = {}  # (task folder, image size, batch size) -> [(images, labels or captions)]


def mean_average_precision(scores, targets):
    """Multi-label (voc2007-style): per class, images in torch.sort's descending order of score (as
    CLIP_benchmark; its order among ties is sort's), the precision at each positive averaged; mean
    over classes (a class with no positive counts 0). float32, as CLIP_benchmark."""
    ranks = torch.arange(1, len(scores) + 1, dtype=torch.float32)
    per_class = torch.zeros(scores.shape[1])
    for c in range(scores.shape[1]):
        order = torch.sort(scores[:, c], 0, True).indices
        positive = targets[order, c].bool()  # (N,) the k-th ranked image is a positive
        precision = positive.float().cumsum(0) / ranks
        per_class[c] = precision[positive].sum() / max(float(positive.sum()), 1)
    return {"mean_average_precision": per_class.mean().item()}


def retrieval_metrics(scores, text_to_image, ks=RECALL_KS, block=None, device="cpu"):
    """scores (T, I) = text_emb @ image_emb.T; text_to_image (T,) the image each caption belongs to.

    image_retrieval_recall@k: per caption, 1 if its image is among the top k images; mean over
    captions. text_retrieval_recall@k: per image, 1 if ANY of its captions is among the top k
    captions; mean over images. mean_recall@1 averages the two @1 values (DataComp's retrieval
    score). `block` and `device`: CLIP_benchmark runs topk on blocks of as many queries as its image
    batch, on the evaluation device.
    """
    metrics = {}
    # One topk per k, as CLIP_benchmark: the top 1 under ties need not be the top 5's first.
    for k in ks:
        best_images = top_k(scores, k, block, device)  # (T, k)
        best_texts = top_k(scores.t(), k, block, device)  # (I, k)
        image_hit = (best_images == text_to_image[:, None]).any(1)
        text_hit = (text_to_image[best_texts] == torch.arange(scores.shape[1])[:, None]).any(1)
        metrics[f"image_retrieval_recall@{k}"] = image_hit.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hit.float().mean().item()
    if 1 in ks:
        metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"]
                                    + metrics["text_retrieval_recall@1"]) / 2
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


# ---- Running models on a task ----
# Several checkpoints are evaluated in one pass: each batch of images is decoded once and every
# model encodes it. Class-prompt embeddings are kept per model and per (class name, templates), so
# the ImageNet variants that share ImageNet's classes and templates do not encode them again.


def _collate_captions(batch):  # retrieval: stack the images, keep each image's list of captions
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


PROMPT_PADDINGS = ("zeros", "eot")


def prompt_tokens(texts, context_length, padding="zeros"):
    """Token ids (N, T) of prompts or captions. "zeros" (the default): the kit's and open_clip's
    ids, 0 after the end-of-text token, as CLIP_benchmark tokenizes for open_clip models and as the
    PI authors' training captions are padded. "eot": every position after it holds the end-of-text
    id 49407 too, as Hugging Face's CLIPTokenizer pads with padding="max_length" (its pad token is
    <|endoftext|>), which the PI authors' zero-shot evaluation uses
    (github cheesepuff90/Brain_Initialization src/model.py CLIP.tokenize). A mean-pooled text tower
    (model text_pooling "mean", pad id 0) then averages all T positions of a prompt, where training
    averaged a caption's own tokens; their CIFAR numbers were measured so. An EOT-pooled (OpenAI)
    model gives the same features either way: argmax finds the first EOT, and causal attention
    keeps the positions after it out. evaluate.py's --prompt-padding sets it per model
    (model.prompt_padding)."""
    if padding not in PROMPT_PADDINGS:
        raise ValueError(f"prompt padding {padding!r} is not one of {PROMPT_PADDINGS}")
    tokens = tokenize(texts, context_length=context_length)  # (N, T)
    if padding == "eot":
        # The end-of-text position: 49407 is the largest id.
        end = tokens.argmax(dim=-1, keepdim=True)
        tokens = tokens.masked_fill(torch.arange(tokens.shape[1]) > end, 49407)
    return tokens


@torch.no_grad()
def _encode_texts(model, texts, device, precision, batch_size, desc, show):
    """list of str -> (N, E) float32 unit vectors on the CPU, encoded in batches."""
    tokens = prompt_tokens(texts, model.config.context_length,
                           getattr(model, "prompt_padding", "zeros"))  # (N, T)
    features = []
    for start in progress_bar(range(0, len(tokens), batch_size), desc=desc, leave=False,
                              disable=not show):
        with autocast(device, precision):
            x = model.encode_text(tokens[start:start + batch_size].to(device))
        features.append(F.normalize(x.float(), dim=-1).cpu())
    return torch.cat(features)


def zero_shot_classifier(model, classnames, templates, device, precision="fp32", batch_size=256,
                         progress=False, cache=None):
    """(E, C): per class, every template filled with the class name, encoded, L2-normalised,
    averaged and renormalised (CLIP / CLIP_benchmark). `cache`: a dict kept across tasks for this
    model, keyed by (class name, templates); only the classes it lacks are encoded."""
    cache = {} if cache is None else cache
    key = lambda name: (name, tuple(templates))  # noqa: E731
    todo = list(dict.fromkeys(name for name in classnames if key(name) not in cache))
    if todo:
        texts = [template.format(c=name) for name in todo for template in templates]
        features = _encode_texts(model, texts, device, precision, batch_size, "class texts",
                                 progress)
        # (C', E): the mean over templates, renormalised
        per_class = F.normalize(features.view(len(todo), len(templates), -1).mean(1), dim=-1)
        cache.update((key(name), vector) for name, vector in zip(todo, per_class))
    return torch.stack([cache[key(name)] for name in classnames], dim=1)  # (E, C)


def open_task(task_dir, image_size):
    """A task folder (CLIP_benchmark format, or ImageNet's val in ImageFolder layout) -> dataset."""
    transform = image_transform(image_size, "eval")
    task_dir = Path(task_dir)
    if task_dir.name.startswith("wds_") or (task_dir / "test").exists() or not task_dir.is_dir():
        return BenchmarkTask(task_dir, transform)
    return ImageFolderTask(task_dir, *imagenet_classnames_and_templates(), transform=transform)


@torch.no_grad()
def evaluate_models(models, task_dir, device, batch_size=64, workers=0, precision="fp32",
                    progress=True, prompt_caches=None):
    """Zero-shot metrics of each model on one task folder, in one pass over its images -> a list of
    dicts (CLIP_benchmark's metric names), one per model. The models must share an image size.
    prompt_caches: one dict per model, reused across tasks (see zero_shot_classifier)."""
    sizes = {m.config.image_size for m in models}
    if len(sizes) > 1:
        raise ValueError(f"models of different image sizes {sorted(sizes)} "
                         f"cannot share one pass over {task_dir}")
    image_size = sizes.pop()
    with user_input():  # a task folder that does not hold together is the user's to fix
        task = open_task(task_dir, image_size)
    name = Path(task_dir).name
    retrieval = task.task_type == "retrieval"
    loader = DataLoader(task, batch_size=batch_size, num_workers=workers, shuffle=False,
                        pin_memory=torch.device(device).type == "cuda",
                        worker_init_fn=ignore_stop_signals,
                        collate_fn=_collate_captions if retrieval else None)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    caches = prompt_caches or [{} for _ in models]
    classifiers = [] if retrieval else [
        zero_shot_classifier(m, task.classnames, task.templates, device, precision,
                             progress=progress, cache=c).to(device)
        for m, c in zip(models, caches)]
    # Per model: image features (retrieval) or logits (classification).
    outputs = [[] for _ in models]
    labels, captions = [], []
    batches = _decoded_batches(loader, task_dir, image_size, batch_size)
    for batch_images, batch_labels in progress_bar(batches, desc=name, leave=False,
                                                   disable=not progress):
        batch_images = batch_images.to(device, non_blocking=True)
        for i, m in enumerate(models):
            with autocast(device, precision):
                features = m.encode_image(batch_images)
            features = F.normalize(features.float(), dim=-1)  # (B, E)
            outputs[i].append(features.cpu() if retrieval
                              else (100.0 * features @ classifiers[i]).cpu())  # logits (B, C)
        if retrieval:
            captions.extend(batch_labels)
        else:
            labels.append(batch_labels)
    results = []
    for m, output in zip(models, outputs):
        if retrieval:
            text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps],
                                         dtype=torch.long)
            texts = _encode_texts(m, [c for caps in captions for c in caps], device, precision,
                                  batch_size, f"{name} captions", progress)
            images = torch.cat(output)
            results.append(retrieval_metrics(texts @ images.t(), text_to_image,
                                             block=min(batch_size, len(images)), device=device))
        elif task.task_type == "multilabel":
            results.append(mean_average_precision(torch.cat(output), torch.cat(labels)))
        else:
            results.append(classification_metrics(torch.cat(output), torch.cat(labels)))
    for m, mode in zip(models, was_training):
        m.train(mode)
    return results


def _decoded_batches(loader, task_dir, image_size, batch_size):
    """The loader's batches, from _image_cache when this task was decoded before and its files are
    unchanged (names, sizes, modification times); a task whose images fit what is left of
    IMAGE_CACHE_BYTES is kept for the next call (evaluate_models reads batches, never writes)."""
    dataset = loader.dataset
    first = dataset[0][0] if len(dataset) else None
    used = sum(images.numel() * images.element_size() for batches in _image_cache.values()
               for images, _ in batches)
    if first is None or len(dataset) * first.numel() * first.element_size() > (
            IMAGE_CACHE_BYTES - used):
        return loader
    folder = Path(task_dir).resolve()
    stats = [(str(path), path.stat()) for path in sorted(folder.rglob("*")) if path.is_file()]
    key = (str(folder), image_size, batch_size,
           tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats))
    if key not in _image_cache:
        for old in [k for k in _image_cache if k[:3] == key[:3]]:  # the same task, changed
            del _image_cache[old]
        _image_cache[key] = list(loader)
    return _image_cache[key]


def evaluate_task(model, task_dir, device, batch_size=64, workers=0, precision="fp32",
                  progress=True):
    """Zero-shot metrics of `model` on one task folder -> dict (CLIP_benchmark's metric names)."""
    return evaluate_models([model], task_dir, device, batch_size, workers, precision, progress)[0]


def run_suite(models, tasks, data_root, device, batch_size=64, workers=0, precision="fp32",
              progress=True):
    """-> one {task: metrics} per model, for the tasks whose folder exists (a missing one is
    skipped with a note naming the folders tried). Each task's images are decoded once for all the
    models."""
    results = [{} for _ in models]
    caches = [{} for _ in models]
    for task in tasks:
        folder = task_dir(data_root, task)
        if folder is None:
            tqdm.write(f"zero-shot: {missing_task_message(data_root, task)}: "
                       "skipped, its data is missing")
            continue
        for result, metrics in zip(results, evaluate_models(models, folder, device, batch_size,
                                                            workers, precision, progress, caches)):
            result[task] = metrics
    return results


def run_tasks(model, tasks, data_root, device, batch_size=64, workers=0, precision="fp32",
              progress=True):
    """-> {task: metrics} of one model (the trainers' periodic evaluation); see run_suite."""
    return run_suite([model], tasks, data_root, device, batch_size, workers, precision, progress)[0]


# ---- Reporting ----


def _fmt(value):
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def comparison_table(results_by_run, tasks=None):
    """Markdown table of each task's main metric (%) per run, the first run minus the second, the
    first run's win count and the average over tasks every run has.
    results_by_run: {run label: {task: metrics}}."""
    runs = list(results_by_run)
    if tasks is None:
        tasks = list(dict.fromkeys(t for r in runs for t in results_by_run[r]))
    header = ["task", "metric", *runs] + ([f"{runs[0]} - {runs[1]}"] if len(runs) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    complete, wins = [], 0
    for task in tasks:
        values = [main_metric(task, results_by_run[r][task])[1] if task in results_by_run[r]
                  else None for r in runs]
        metric = next(main_metric(task, results_by_run[r][task])[0]
                      for r in runs if task in results_by_run[r])
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
        lines.append("| " + " | ".join(row + ([f"{100 * (means[0] - means[1]):+.2f}"]
                                              if len(runs) > 1 else [])) + " |")
        if len(runs) > 1:
            lines.append(f"\n{runs[0]} better than {runs[1]} on {wins}/{len(complete)} tasks")
    return "\n".join(lines)


def plot_comparison(results_by_run, path, tasks=None):
    """Bar chart of the main metric per task and run, saved to `path` -> str(path)."""
    import matplotlib  # imported here: the trainers import this file and never plot

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    runs = list(results_by_run)
    tasks = [t for t in (tasks or dict.fromkeys(t for r in runs for t in results_by_run[r]))
             if all(t in results_by_run[r] for r in runs)]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tasks) + 2), 4.5))
    for i, run in enumerate(runs):
        values = [100 * main_metric(t, results_by_run[run][t])[1] for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=run)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(tasks))], tasks,
                  rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("main metric (%)")
    ax.set_title("Zero-shot comparison (DataComp main metric per task)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
