"""Draw docs/lr_schedules.png: the lr over a whole run, the kit's cosine against the PI authors'
schedule as their code runs it, for stage 2 on one GPU and on 8 GPUs and for stage 1.

  python docs/plot_lr_schedules.py            # writes docs/lr_schedules.png, prints the end values

Both curves come from training.lr_function, the function the trainers call each step (not a copy),
so the picture is what `--lr_schedule=cosine` and `--lr_schedule=authors` run. The step counts are
COMPUTED, not measured: stage 2 takes ~15.0M YFCC15M pairs less the 10,000 held out, 32 epochs; one
GPU steps 6,144 pairs at a time (1,024 x 6 accumulated), 8 GPUs 49,152; stage 1 takes ~15.9k NIGHTS
triplets, 32 epochs of 768. Their schedule's length does not depend on them
(docs/stage2-recipes.md).
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import lr_function  # noqa: E402

# (title, warmup steps, epochs, optimiser steps of the whole run: computed, see the docstring)
RUNS = [("stage 2, one GPU (configs/yfcc15m.yaml)", 2500, 32, 78_100),
        ("stage 2, 8 GPUs (configs/yfcc15m_8gpu.yaml)", 2500, 32, 9_800),
        ("stage 1 (configs/nights.yaml)", 150, 32, 670)]


def curves(warmup_steps, epochs, steps):
    """-> (steps, the kit's cosine, the authors' schedule), as fractions of the peak lr."""
    schedule = {"lr": 1.0, "warmup_steps": warmup_steps, "epochs": epochs, "total_steps": steps}
    kit = lr_function({**schedule, "lr_schedule": "cosine"})
    theirs = lr_function({**schedule, "lr_schedule": "authors"})
    x = list(range(1, steps + 1))
    return x, [kit(k) for k in x], [theirs(k) for k in x]


def main(out=ROOT / "docs" / "lr_schedules.png"):
    figure, axes = plt.subplots(1, len(RUNS), figsize=(13, 4))
    for axis, (title, warmup_steps, epochs, steps) in zip(axes, RUNS):
        x, kit, theirs = curves(warmup_steps, epochs, steps)
        axis.plot(x, kit, label="kit: cosine (to 0 at the last step)")
        axis.plot(x, theirs, label="authors: their LambdaLR as it runs")
        axis.set_title(f"{title}\n{steps:,} steps, warmup {warmup_steps:,}", fontsize=9)
        axis.set_xlabel("optimiser step")
        axis.set_ylim(0, 1.05)
        axis.annotate(f"{theirs[-1]:.3f}", (x[-1], theirs[-1]), textcoords="offset points",
                      xytext=(-30, -14), fontsize=8)
        print(f"{title}: at the last of {steps:,} steps the kit's lr is {kit[-1]:.3f} of the "
              f"peak, the authors' {theirs[-1]:.4f}")
    axes[0].set_ylabel("lr / peak lr")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9)
    figure.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend below the panels
    figure.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
