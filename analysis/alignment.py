"""Alignment with people and brains: how a CLIP's image embeddings agree with human similarity
judgments and with brain (or behavioural) dissimilarity matrices. Stage 1's 2AFC score (DreamSim's,
on NIGHTS, BAPPS or any stage-1 source), THINGS odd-one-out accuracy, and representational
similarity per layer against a reference RDM, for several checkpoints in one table, JSON and plot:

  python evaluate.py --alignment --ckpt A.pt --ckpt B.pt
                     [--bapps 2afc/] [--nights nights/] [--things things/]
                     [--rdm-root DIR [--rdm V1,V4]] --out alignment.json

evaluate.py, the one entry point for every metric, hands `--alignment` to alignment_main; this file
imports nothing of it (the trainers' periodic 2AFC is stage1.objective.two_afc_by_triplet). Sources
are read by stage1/other_sources.py (docs/stage1-data.md).
"""
import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from analysis import probes
from stage1 import other_sources
from checkpoints import load_checkpoint, run_labels
from cli import user_input
from training import default_precision
from stage1.objective import embed_images, two_afc, two_afc_from_embeddings
from stage1.triplets import decode, model_input


def _percent(value):
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


# --------------------------------------------------------------------------------------------------
# THINGS odd-one-out (the 2AFC scores are stage1/objective.py's)
# --------------------------------------------------------------------------------------------------


def odd_one_out_choice(features, trials):
    """trials (T, 3) of image indices -> (T,) the column the model picks as the odd one out: the
    item outside the most similar pair (Hebart et al. 2020/2023; the same rule as cblearn's and
    gLocal's). Trials are gathered in chunks of 2**18: THINGS' 4M training trials gathered at once
    need ~25 GB."""
    choices = []
    for start in range(0, len(trials), 2**18):
        a, b, c = (features[trials[start:start + 2**18, k]] for k in range(3))
        # Column k: the pair without k.
        pair_similarity = torch.stack([(b * c).sum(-1), (a * c).sum(-1), (a * b).sum(-1)], 1)
        choices.append(pair_similarity.argmax(1))
    return torch.cat(choices) if choices else torch.zeros(0, dtype=torch.long)


def odd_one_out_accuracy(model, dataset, device, batch_size=256, precision="fp32", features=None):
    """THINGS split -> {"accuracy": share of trials whose odd one (the LAST column) the model picks,
    chance 1/3; "ceiling_normalised": (accuracy - 1/3) / (0.6767 - 1/3), 1 = as good as the between-
    subject noise ceiling (brain-score's hebart2023 normalisation)}."""
    trials = torch.as_tensor(other_sources.served_trials(dataset))
    if features is None:
        features = embed_images(model, dataset, device, batch_size, precision)
    accuracy = ((odd_one_out_choice(features, trials) == 2).double().mean().item() if len(trials)
                else float("nan"))
    return {"accuracy": accuracy,
            "ceiling_normalised": (accuracy - 1 / 3) / (other_sources.THINGS_CEILING - 1 / 3)}


# --------------------------------------------------------------------------------------------------
# Several checkpoints, one table, JSON and plot
# --------------------------------------------------------------------------------------------------
# python evaluate.py --alignment --ckpt A.pt --ckpt B.pt
#                    [--bapps 2afc/] [--nights nights/] [--things things/]
#                    [--rdm-root DIR [--rdm V1,V4]] --out alignment.json
# Every score is also a function: alignment_scores(models, ...) -> {label: {score: value}}.
# Sources are read by stage1/other_sources.py (docs/stage1-data.md); only the evaluation splits are
# decoded.

ALIGNMENT_SPLITS = {"bapps": ("val",),
                    "nights": ("val", "test", "test_imagenet", "test_no_imagenet"),
                    "things": ("val", "test")}


@torch.no_grad()
def rsa_per_layer(model, images, rdm, device="cpu", batch_size=256):
    """Representational similarity per layer: Spearman's rho between the upper triangle of a
    reference RDM (N, N) and the model's pairwise distances 1 - cos over the same N images, for the
    class token after each residual block and for the final embedding -> {"block1": rho, ...,
    "embedding": rho}. images: uint8 (N, 3, S, S) (triplets.decode's) or the model's float input."""
    if images.dtype == torch.uint8:
        images = model_input(images, "cpu")
    was_training = model.training
    features = probes.tower_features(model, images, device, batch_size)
    model.train(was_training)
    return {layer: probes.representational_similarity(x, rdm) for layer, x in features.items()}


def _source_splits(source, root, image_size, cache_dir, workers, skip_missing=False):
    with user_input():  # a missing file or a bad row is the user's to fix
        splits = other_sources.open_splits(source, root, image_size, skip_missing,
                                             cache_dir=cache_dir, workers=workers,
                                             splits=ALIGNMENT_SPLITS[source])
    return {name: split for name, split in splits.items()
            if len(split) and (source != "bapps" or name != "val")}


def alignment_scores(models, labels, bapps=None, nights=None, things=None, rdm_root=None, rdm="",
                     device="cpu", batch_size=64, precision="fp32", workers=0, cache_dir=None,
                     skip_missing=False):
    """{label: {score: value}} for each model: "bapps/<val subset>" and "nights/<split>" 2AFC (0.5 =
    chance), "things/<split>/odd_one_out" accuracy (1/3 = chance) and ".../odd_one_out_normalised"
    by the noise ceiling, and "rsa/<rdm name>/<layer>" Spearman's rho. Sources left None are
    skipped."""
    results = {label: {} for label in labels}
    for size in dict.fromkeys(m.config.image_size for m in models):
        group = [(label, m) for label, m in zip(labels, models) if m.config.image_size == size]
        for source, root in (("bapps", bapps), ("nights", nights), ("things", things)):
            if not root:
                continue
            splits = _source_splits(source, root, size, cache_dir, workers, skip_missing)
            for name, split in splits.items():
                key = name.removeprefix("val_") if source == "bapps" else name
                for label, model in group:
                    if source == "things":
                        features = embed_images(model, split, device, batch_size, precision)
                        scores = odd_one_out_accuracy(model, split, device, features=features)
                        results[label][f"things/{key}/odd_one_out"] = scores["accuracy"]
                        results[label][f"things/{key}/odd_one_out_normalised"] = (
                            scores["ceiling_normalised"])
                        results[label][f"things/{key}/2afc"] = two_afc_from_embeddings(
                            features, split.rows, split.p)
                    else:
                        results[label][f"{source}/{key}"] = two_afc(model, split, device,
                                                                     batch_size, precision, workers)
        if rdm_root:
            with user_input():
                paths, _ = other_sources.rdm_images(rdm_root)
                names = other_sources.rdm_names(rdm_root, rdm)
                matrices = {n: other_sources.read_rdm(Path(rdm_root) / "rdms" / f"{n}.npy",
                                                      len(paths))
                            for n in names}
            images = torch.stack([torch.from_numpy(np.ascontiguousarray(decode(p, size)))
                                  for p in paths])
            for label, model in group:
                for name, matrix in matrices.items():
                    for layer, rho in rsa_per_layer(model, images, matrix, device,
                                                    batch_size).items():
                        results[label][f"rsa/{name}/{layer}"] = rho
    return results


def alignment_table(results):
    """Markdown table: one row per score, one column per checkpoint (2AFC and accuracies in %,
    rho x 100)."""
    labels = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    lines = ["| score | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for key in keys:
        lines.append(f"| {key} | "
                     + " | ".join(_percent(results[label].get(key)) for label in labels) + " |")
    return "\n".join(lines)


def plot_alignment(results, path):
    """Left: 2AFC and odd-one-out scores per checkpoint (bars); right: RSA per layer, one line per
    (checkpoint, RDM). Saved to `path` -> str(path)."""
    import matplotlib  # imported here: the trainers import this file and never plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(results)
    scores = [k for k in dict.fromkeys(k for r in results.values() for k in r)
              if not k.startswith("rsa/")]
    rdms = list(dict.fromkeys(k.split("/")[1] for r in results.values() for k in r
                              if k.startswith("rsa/")))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), squeeze=False)
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        axes[0, 0].bar([x + i * width for x in range(len(scores))],
                       [100 * results[label].get(k, math.nan) for k in scores], width, label=label)
        for name in rdms:
            layers = [k.split("/")[2] for k in results[label] if k.startswith(f"rsa/{name}/")]
            axes[0, 1].plot(layers, [results[label][f"rsa/{name}/{layer}"] for layer in layers],
                            marker="o", label=f"{label} vs {name}")
    axes[0, 0].set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(scores))], scores,
                          rotation=60, ha="right", fontsize=8)
    axes[0, 0].set_ylabel("score (%)")
    axes[0, 0].set_title("2AFC (chance 50) and THINGS odd-one-out (chance 33)")
    axes[0, 1].set_ylabel("Spearman rho")
    axes[0, 1].set_title("RSA per layer against each reference RDM")
    axes[0, 1].tick_params(axis="x", rotation=60)
    for ax in axes[0]:
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def alignment_main(argv):
    parser = argparse.ArgumentParser(
        prog="evaluate.py --alignment",
        description="Alignment with human and brain similarity: BAPPS / NIGHTS 2AFC, THINGS "
                    "odd-one-out, RSA per layer against reference RDMs (docs/stage1-data.md).")
    parser.add_argument("--alignment", action="store_true")
    parser.add_argument("--ckpt", action="append", required=True,
                        help="checkpoint (any format evaluate.py reads); repeat")
    parser.add_argument("--bapps", help="BAPPS' 2afc folder (its val subsets are scored)")
    parser.add_argument("--nights",
                        help="NIGHTS folder (data.csv, ref/, distort/): val and test splits")
    parser.add_argument("--things",
                        help="THINGS folder (triplet_dataset/, unique_id.txt, images/): "
                             "val and test")
    parser.add_argument("--rdm-root", help="folder with rdms/<name>.npy and images.txt or images/")
    parser.add_argument("--rdm", default="",
                        help="comma-separated RDM names (default: all in rdms/)")
    parser.add_argument("--cache-dir", default=None,
                        help="decode cache folder (default: <each source>/cache)")
    parser.add_argument("--out", default="alignment.json",
                        help="JSON {checkpoint: {score: value}}; a PNG beside it")
    parser.add_argument("--skip-missing", action="store_true",
                        help="drop (and count) rows whose images are missing or unreadable")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None,
                        help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    args = parser.parse_args(argv)
    if not (args.bapps or args.nights or args.things or args.rdm_root):
        parser.error("give at least one of --bapps, --nights, --things, --rdm-root")
    labels = run_labels(args.ckpt)
    with user_input():
        models = [load_checkpoint(path).to(args.device) for path in args.ckpt]
    results = alignment_scores(models, labels, args.bapps, args.nights, args.things, args.rdm_root,
                               args.rdm, args.device, args.batch_size,
                               args.precision or default_precision(args.device), args.workers,
                               args.cache_dir, args.skip_missing)
    print(alignment_table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} and {plot_alignment(results, Path(args.out).with_suffix('.png'))}")
    return results
