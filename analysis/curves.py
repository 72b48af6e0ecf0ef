"""Training curves: the evaluations train_clip.py logged (zero-shot, NIGHTS 2AFC, held-out loss and
recall) against samples seen, one line per run: the paper's "gains after ~15 epochs" picture.

  python evaluate.py --curves runs/pi runs/baseline [--out curves.png]

evaluate.py hands `--curves` to main() here; it reads metrics.jsonl only, so it needs no model.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from cli import run_cli, user_input

# --------------------------------------------------------------------------------------------------
# Training curves: zero-shot, NIGHTS and held-out metrics against samples seen, for several runs
# --------------------------------------------------------------------------------------------------

CURVE_PREFIXES = ("zeroshot/", "val/", "nights/")  # the evaluation keys train_clip.py logs


def read_curves(run_dir):
    """run_dir/metrics.jsonl -> {metric: [(samples_seen, value), ...]} sorted by samples seen; an
    evaluation logged twice at the same point (a resumed run) keeps its last value."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: "
                                "--curves takes train_clip.py output folders (out_dir)")
    series = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the rest of the file is still good
            print(f"warning: {path}:{number} is not JSON; skipped", file=sys.stderr)
            continue
        if "samples_seen" not in record:
            continue
        for key, value in record.items():
            if key.startswith(CURVE_PREFIXES) and isinstance(value, (int, float)):
                series.setdefault(key, {})[record["samples_seen"]] = value
    return {key: sorted(points.items()) for key, points in series.items()}


def plot_curves(curves_by_run, path):
    """One panel per metric, one line per run, x = samples seen -> str(path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = list(dict.fromkeys(m for curves in curves_by_run.values() for m in curves))
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for run, curves in curves_by_run.items():
            if metric in curves:
                x, y = zip(*curves[metric])
                ax.plot(x, y, marker="o", markersize=3, label=run)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("samples seen")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Plot the evaluations train_clip.py logged (zero-shot, NIGHTS 2AFC, held-out "
                    "loss and recall) against samples seen, one line per run: "
                    "python evaluate.py --curves runs/pi runs/baseline")
    parser.add_argument("--curves", nargs="+", required=True, metavar="RUN_DIR",
                        help="train_clip.py out_dir folders")
    parser.add_argument("--out", default="curves.png", help="the chart (PNG; default: curves.png)")
    args = parser.parse_args(argv)
    labels = [Path(r).resolve().name for r in args.curves]
    labels = labels if len(set(labels)) == len(labels) else list(args.curves)
    with user_input():
        curves_by_run = {label: read_curves(r) for label, r in zip(labels, args.curves)}
    if not any(curves_by_run.values()):
        raise FileNotFoundError(f"no evaluation in {', '.join(args.curves)}: set eval_every / "
                                "eval_every_epochs, eval_tasks, val_samples or nights_root in the "
                                "run's config")
    for label, curves in curves_by_run.items():
        for metric, points in curves.items():
            print(f"{label:>16}  {metric:<36} {len(points):>3} points, "
                  f"last {points[-1][1]:.4g} at {points[-1][0]:,} samples")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {plot_curves(curves_by_run, args.out)}")


if __name__ == "__main__":
    run_cli(main)
