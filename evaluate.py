"""Evaluation: the one command for every metric of the kit.

  python evaluate.py --suite all                    # the paper's 31 zero-shot tasks
  python evaluate.py --ckpt pi.pt --ckpt base.pt --ckpt ~/.cache/clip/ViT-B-32.pt --suite vtab \
      --data-root DIR                               # several checkpoints, one pass over the images
  python evaluate.py --alignment --ckpt A.pt --ckpt B.pt \
      --things DIR --rdm-root DIR                   # alignment with people, brains
  python evaluate.py --probe A.pt B.pt --images FOLDER_OR_TASK    # feature-space probes
  python evaluate.py --curves runs/pi runs/baseline  # logged evaluations against samples seen

The zero-shot suite is analysis/zero_shot.py; --alignment, --probe and --curves hand over to
analysis/alignment.py, analysis/probes.py and analysis/curves.py. Checkpoint formats:
checkpoints.load_checkpoint.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

from analysis import curves, probes
from analysis.alignment import alignment_main
from analysis.zero_shot import PROMPT_PADDINGS, comparison_table, plot_comparison, run_suite
from checkpoints import load_checkpoint, run_labels
from cli import run_cli, user_input, writable_folder
from data import GROUPS, missing_task_message, resolve_tasks, task_dir
from training import default_precision

DEFAULT_CHECKPOINTS = ["runs/pi/ckpt.pt", "runs/baseline/ckpt.pt"]
DEFAULT_DATA_ROOT = os.environ.get("PI_BENCHMARK_ROOT", "data/clip_benchmark")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # --probe, --curves and --alignment hand over to their own commands: analysis/probes.py,
    # analysis/curves.py (training curves of runs) and analysis/alignment.py (alignment scores).
    if "--probe" in argv:
        return probes.main(argv)
    if "--curves" in argv:
        return curves.main(argv)
    if "--alignment" in argv:
        return alignment_main(argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    checkpoints = args.ckpt or [p for p in DEFAULT_CHECKPOINTS if Path(p).exists()]
    if not checkpoints:
        parser.error("no checkpoint given and none of the defaults exist "
                     f"({', '.join(DEFAULT_CHECKPOINTS)}); pass --ckpt PATH")
    unknown = [p for p in args.quickgelu or [] if p not in checkpoints]
    if unknown:
        parser.error(f"--quickgelu names {unknown}, "
                     f"which are not among the --ckpt paths {checkpoints}")
    writable_folder(Path(args.out).parent, "--out")  # before minutes of evaluation
    precision = args.precision or default_precision(args.device)
    tasks = resolve_tasks(args.suite, args.data_root)
    missing = [t for t in tasks if task_dir(args.data_root, t) is None]
    for t in missing:
        print(f"missing: {missing_task_message(args.data_root, t)}")
    if len(missing) == len(tasks):
        parser.error(f"no task of suite {args.suite!r} has data under {args.data_root} "
                     "(see --help for the layout)")
    tasks = [t for t in tasks if t not in missing]
    labels = run_labels(checkpoints)
    models = load_models(checkpoints, labels, args)
    print(f"{len(tasks)} tasks, {precision}, "
          f"{len(models)} checkpoint(s) in one pass over each task's images")
    # One pass per image size: models that share it share the decoded images.
    results_by_run = {}
    for size in dict.fromkeys(m.config.image_size for m in models):
        group = [i for i, m in enumerate(models) if m.config.image_size == size]
        for i, results in zip(group, run_suite([models[i] for i in group], tasks, args.data_root,
                                               args.device, args.batch_size, args.workers,
                                               precision)):
            results_by_run[labels[i]] = results
    results_by_run = {label: results_by_run[label] for label in labels}
    print(comparison_table(results_by_run, tasks))
    write_results(args.out, results_by_run, labels, checkpoints, tasks)


def make_parser():
    parser = argparse.ArgumentParser(
        description="Zero-shot evaluation on CLIP_benchmark task folders, "
                    "with a comparison table of the runs.")
    parser.add_argument("--ckpt", action="append", default=None,
                        help="checkpoint: the kit's, open_clip's (training checkpoint, hub .bin or "
                             ".safetensors), OpenAI's TorchScript archive or any safetensors / "
                             "state dict file with their keys; repeat for several (one pass over "
                             "the images for all). Default: those of "
                             f"{' and '.join(DEFAULT_CHECKPOINTS)} that exist. "
                             "The first two are compared.")
    parser.add_argument("--suite", default="all",
                        help=f"a group ({', '.join(GROUPS)}, demo = the tasks in "
                             "DATA_ROOT/tasks.txt or its wds_* folders) or comma-separated task "
                             "names, e.g. cifar10,vtab/pets (default: all, the paper's 31)")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                        help="folder of task folders, each wds_<task> (CLIP_benchmark's hub name, "
                             "'/' -> '-') or wds_<task>_test (DataComp's download name), and "
                             "imagenet1k/val; "
                             "default: $PI_BENCHMARK_ROOT when set, else data/clip_benchmark")
    parser.add_argument("--out", default="results.json",
                        help="JSON records, one per (checkpoint, task), and a PNG chart beside it "
                             "(default: results.json)")
    parser.add_argument("--quickgelu", nargs="*", default=None, metavar="CKPT",
                        help="QuickGELU activation (OpenAI-trained weights) for every --ckpt, or "
                             "for the CKPTs named; needed only for files that record no activation "
                             "(a checkpoint that records GELU is an error)")
    parser.add_argument("--prompt-padding", choices=PROMPT_PADDINGS, default="zeros",
                        help="zeros: CLIP_benchmark's protocol, ids zero-padded (default; with the "
                             "PI authors' mean-pooled model, prompts are pooled as their training "
                             "pooled captions). eot: pad with the end-of-text id as the PI "
                             "authors' evaluation does (Hugging Face's CLIPTokenizer), so their "
                             "model averages all 77 positions: reproduces their CIFAR numbers. "
                             "Same features for OpenAI-style (EOT-pooled) models. "
                             "See docs/authors-model.md")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per forward (default: 64)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers (default: up to 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when present")
    parser.add_argument("--precision", default=None,
                        help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    return parser


def load_models(checkpoints, labels, args):
    """The checkpoints as CLIPs on args.device, each saying what it is."""
    models = []
    for label, path in zip(labels, checkpoints):
        named = args.quickgelu is not None and (not args.quickgelu or path in args.quickgelu)
        quickgelu = True if named else None  # None: what the file records
        # A missing or foreign file, a contradicted activation: the user's to fix.
        with user_input():
            models.append(load_checkpoint(path, quickgelu=quickgelu).to(args.device))
        models[-1].prompt_padding = args.prompt_padding  # read by _encode_texts (prompt_tokens)
        print(f"{label}: {path}, {models[-1].num_params() / 1e6:.1f}M parameters, "
              f"{'QuickGELU' if models[-1].config.quickgelu else 'GELU'}, "
              f"{models[-1].config.image_size} px")
    return models


def write_results(out, results_by_run, labels, checkpoints, tasks):
    """CLIP_benchmark's records, one per (checkpoint, task), in `out`, and a chart beside it."""
    records = [{"dataset": task, "model": label, "pretrained": str(path),
                "task": ("zeroshot_retrieval" if "mean_recall@1" in metrics
                         else "zeroshot_classification"),
                "metrics": metrics, "language": "en"}
               for label, path in zip(labels, checkpoints)
               for task, metrics in results_by_run[label].items()]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(records, f, indent=1)
    chart = plot_comparison(results_by_run, Path(out).with_suffix(".png"), tasks)
    print(f"wrote {out} and {chart}")


if __name__ == "__main__":
    run_cli(main)  # a wrong file or setting prints one line naming it, not a traceback
