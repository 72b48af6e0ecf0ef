"""The embedded default: the paper's whole experiment in miniature, on a CPU, in minutes.

  python demo.py                      # one seed, four arms, probes: under 5 minutes on 2 idle CPU
                                      # cores (measured)
  python demo.py --seeds 0,1,2        # mean and spread over seeds, wins, a verdict per comparison
  python demo.py --quick              # the smallest end-to-end run, a few minutes; the tests run it
  python demo.py --study efficiency   # follow-up studies (world/studies.py): how many triplets PI
  python demo.py --study sources      # needs, and whether odd-one-out trials or "brain area" RDMs
                                      # do as well as votes
  python demo.py --authors            # also PI and baseline with the PI authors' model
                                      # (docs/authors-model.md)

It runs the same scripts a GPU user runs, pointed at a generated world (world/scenes.py, written out
by world/make_data.py):
  1. data      make_data.make_demo_data: NIGHTS-format triplets judged by simulated observers,
               image-caption shards, zero-shot tasks (shape, colour, size, position, count,
               retrieval, and real MNIST digits; train splits for the linear probe), the probe
               scenes                                             -> data/demo
  2. stage 1   train_triplet.py configs/demo_nights.yaml: the vision tower learns the observers'
               2AFC judgments                                     -> OUT/seed<S>/stage1
               and the control, its votes shuffled among triplets -> OUT/seed<S>/stage1_shuffled
  3. stage 2   train_clip.py configs/demo_clip.yaml three times, same seed, data and text tower:
               from the stage-1 vision tower (pi), from random weights (baseline) and from the
               shuffled-vote tower (shuffled), evaluating zero-shot and NIGHTS 2AFC as it goes
                                                               -> OUT/seed<S>/{pi,baseline,shuffled}
               and the post-hoc arm: train_triplet.py configs/demo_posthoc.yaml tunes the
               baseline's final CLIP on the same triplets, vision qkv weights only
                                                                  -> OUT/seed<S>/posthoc
  4. evaluate  evaluate.py on the four arms' checkpoints at once  -> OUT/seed<S>/results.json
               evaluate.py --probe on every tower (untrained, both stage 1s, the four arms): CKA
               per layer, Spearman with the observers' distance, linear probes
                                                                  -> OUT/seed<S>/probes.json
  5. report    world/report.py: the tables (OUT/results.md), the numbers (OUT/summary.json) and
               the plots (OUT/demo.png, OUT/probes.png)

Rerunning is cheap: data that exists is reused, a finished run (its summary.json exists) is not
retrained, and a run cut short resumes from its checkpoint (the trainers do that by themselves).
Delete OUT (and data/demo) to start afresh.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from analysis import zero_shot
from cli import run_cli
from world import make_data, studies
from world.report import (ARMS, PROBED, mean_sd, signed, collect, main_metrics, plot, plot_probes,
                          read_results, report)
from world.pipeline import (PLANS, cpu_seconds, drop_if_stale, run_step, shard_spec,
                            start_step_server, untrained)


def run_seed(seed, plan, data_root, out, control, authors=False):
    """Stages 1-4 and the probes for one seed -> {step: seconds}. control=False skips the shuffled
    and post-hoc arms; authors=True adds the PI and baseline arms with the PI authors' model
    (run_authors_arms)."""
    seed_dir = out / f"seed{seed}"
    tasks_root, nights_root = data_root / "tasks", data_root / "nights"
    tasks = ",".join((tasks_root / "tasks.txt").read_text().split())
    stage1 = ["train_triplet.py", "configs/demo_nights.yaml", "--data_root", str(nights_root),
              "--seed", str(seed), *plan["stage1"]]
    stage2 = ["train_clip.py", "configs/demo_clip.yaml",
              "--train_data", shard_spec(data_root / "shards"), "--seed", str(seed),
              "--eval_tasks", tasks, "--eval_data_root", str(tasks_root),
              "--nights_root", str(nights_root), *plan["stage2"]]
    runs = {name: seed_dir / name for name in PROBED}
    arms = ARMS if control else ("pi", "baseline")
    seconds = {}

    def step(key, title, command, run):
        seconds[key] = run_step(f"seed {seed}: {title}", command + ["--out_dir", str(runs[run])],
                                runs[run] / "summary.json")

    untrained(seed, nights_root, runs["untrained"])
    step("stage 1", "stage 1, perceptual training on the observers' votes", stage1, "stage1")
    if control:
        step("stage 1 control", "stage 1 control, the same triplets with their votes shuffled",
             stage1 + ["--shuffle_labels", "true"], "stage1_shuffled")
    step("stage 2 pi", "stage 2 from the perceptual vision tower (PI)",
         stage2 + ["--init", str(runs["stage1"] / "ckpt.pt")], "pi")
    step("stage 2 baseline", "stage 2 from random weights (baseline)", stage2, "baseline")
    if control:
        step("stage 2 shuffled", "stage 2 from the shuffled-vote vision tower (control)",
             stage2 + ["--init", str(runs["stage1_shuffled"] / "ckpt.pt")], "shuffled")
        step("posthoc", "post-hoc control: the baseline's CLIP fine-tuned on the votes "
                        "(vision qkv only)",
             ["train_triplet.py", "configs/demo_posthoc.yaml", "--data_root", str(nights_root),
              "--seed", str(seed), "--init", str(runs["baseline"] / "ckpt.pt"), *plan["posthoc"]],
             "posthoc")
    checkpoints = [runs[a] / "ckpt.pt" for a in arms]
    results = seed_dir / "results.json"
    drop_if_stale(results, checkpoints)
    evaluation = ["evaluate.py", "--suite", "demo", "--data-root", str(tasks_root),
                  "--out", str(results), "--workers", "0"]
    seconds["evaluate"] = run_step(
        f"seed {seed}: zero-shot evaluation of the {len(arms)} arms",
        evaluation + [a for c in checkpoints for a in ("--ckpt", str(c))], results)
    if authors:
        seconds.update(run_authors_arms(seed_dir, stage1, stage2, evaluation))
    probed = [runs[name] / "ckpt.pt" for name in PROBED if (runs[name] / "ckpt.pt").exists()]
    probes = seed_dir / "probes.json"
    drop_if_stale(probes, probed)
    seconds["probes"] = run_step(
        f"seed {seed}: probes of the feature space "
        "(CKA, similarity to the observers, linear probes)",
        ["evaluate.py", "--probe", *map(str, probed), "--images", str(data_root / "probe"),
         "--linear-probe", plan["linear_probe"], "--data-root", str(tasks_root),
         "--out", str(probes)], probes)
    return seconds


# The PI authors' model in the demo's world: preset tiny-authors (bidirectional attention, mean
# pooling, their init) with two settings scaled to it. As the preset stands, it does not learn here:
# its stage-2 loss sits at ln(128), every caption's features the same, whatever the lr, clipping or
# length tried. Two of its settings hold it there, each alone (measured, docs/authors-model.md):
# the demo's captions fill ~8 of 77 positions, so in a tower whose attention has no mask the ~69
# identical padding tokens can swamp every position; and a starting logit scale of 100 (OpenAI's:
# 14.3) makes the first updates large enough to collapse the tiny model's features. A context of
# 16 and OpenAI's starting scale let it train; the other three settings stay theirs.
AUTHORS_SETTINGS = "context_length=16,init_logit_scale=2.6593"


def run_authors_arms(seed_dir, stage1, stage2, evaluation):
    """PI and baseline again with the PI authors' model (tiny-authors with AUTHORS_SETTINGS;
    docs/authors-model.md), the same data, seed and settings: does PI's gain hold with either
    model? -> {step: seconds}; the two arms' zero-shot results in results_authors.json."""
    model = ["--model", "tiny-authors", "--model_settings", AUTHORS_SETTINGS]
    runs = {name: seed_dir / name for name in ("stage1_authors", "pi_authors", "baseline_authors")}
    seconds = {}
    for name, title, command in (
            ("stage1_authors", "stage 1 with the authors' model", stage1 + model),
            ("pi_authors", "stage 2 from that tower (PI, the authors' model)",
             stage2 + model + ["--init", str(runs["stage1_authors"] / "ckpt.pt")]),
            ("baseline_authors", "stage 2 from random weights (baseline, the authors' model)",
             stage2 + model)):
        seconds[name] = run_step(
            f"{seed_dir.name}: {title}", command + ["--out_dir", str(runs[name])],
            runs[name] / "summary.json")
    checkpoints = [runs[name] / "ckpt.pt" for name in ("pi_authors", "baseline_authors")]
    results = seed_dir / "results_authors.json"
    drop_if_stale(results, checkpoints)
    out = evaluation.index("--out") + 1  # the same evaluation, its results written elsewhere
    command = evaluation[:out] + [str(results)] + evaluation[out + 1:]
    seconds["evaluate authors"] = run_step(
        f"{seed_dir.name}: zero-shot evaluation of the authors' arms",
        command + [a for c in checkpoints for a in ("--ckpt", str(c))], results)
    return seconds


def authors_table(out, per_seed):
    """The authors' arm pair per seed (analysis/zero_shot.py's comparison table, as evaluate.py
    prints it), then PI's gain over the baseline with either model (mean zero-shot over the tasks,
    per seed and mean ± sd, the seeds it won) -> markdown. per_seed: collect()'s numbers, which
    hold the OpenAI arms'."""
    tables, gains = [], {"OpenAI's (tiny)": [], "the authors' (tiny-authors)": []}
    for seed, numbers in per_seed.items():
        by_run = read_results(out / f"seed{seed}" / "results_authors.json")
        tables.append(f"seed {seed}, the PI authors' model "
                      f"(preset tiny-authors, {AUTHORS_SETTINGS}):\n\n"
                      f"{zero_shot.comparison_table(by_run)}")
        average = {run: statistics.fmean(tasks.values())
                   for run, tasks in {**numbers["zero_shot"], **main_metrics(by_run)}.items()}
        gains["OpenAI's (tiny)"].append(average["pi"] - average["baseline"])
        gains["the authors' (tiny-authors)"].append(
            average["pi_authors"] - average["baseline_authors"])
    lines = ["PI - baseline, mean zero-shot over the tasks (points), with either model:", "",
             "| model | " + " | ".join(f"seed {s}" for s in per_seed)
             + " | mean ± sd | seeds won |",
             "|---|" + "---|" * (len(per_seed) + 2)]
    for model, values in gains.items():
        lines.append(f"| {model} | " + " | ".join(signed(v) for v in values)
                     + f" | {signed(*mean_sd(values))} | "
                     f"{sum(v > 0 for v in values)}/{len(values)} |")
    return "\n\n".join(tables + ["\n".join(lines)])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="The PI experiment in miniature on generated data (see the module docstring).")
    parser.add_argument("--seeds", default=[0], type=seed_list,
                        help="comma-separated training seeds (default: 0); "
                             "the data is the same for all")
    parser.add_argument("--quick", action="store_true",
                        help="smallest end-to-end run, a few steps per stage (a pipeline check, "
                             "not a result)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/demo, or runs/demo_quick with --quick)")
    parser.add_argument("--data", default=None,
                        help="demo data folder (default: data/demo, "
                             "or data/demo_quick with --quick)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the two control arms: the shuffled-vote stage 1 and its "
                             "stage 2, and the post-hoc tuning (saves ~2.5 minutes a seed on 2 "
                             "idle cores, estimated from the step times)")
    parser.add_argument("--study", choices=("efficiency", "sources"), default=None,
                        help="run a follow-up study instead of the demo (world/studies.py): "
                             "efficiency = PI from 10-100%% of the triplets; "
                             "sources = votes vs odd-one-out vs early / late area RDMs; "
                             "output in OUT/studies/<study>")
    parser.add_argument("--authors", action="store_true",
                        help="also run PI and baseline with the PI authors' model (preset "
                             "tiny-authors with a context of 16 and OpenAI's starting logit scale, "
                             "AUTHORS_SETTINGS; docs/authors-model.md), tabled in "
                             "OUT/results_authors.md")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    suffix = "_quick" if args.quick else ""
    out, data_root = Path(args.out or f"runs/demo{suffix}"), Path(args.data or f"data/demo{suffix}")
    seeds = args.seeds
    if args.study:
        return studies.main(args.study, seeds, args.quick, out / "studies" / args.study, data_root,
                            argv if argv is not None else sys.argv[1:])
    start = time.time()
    start_step_server()  # its imports overlap the data's making

    print(f"== data: {data_root}", flush=True)
    t = time.time()
    make_data.make_demo_data(data_root, seed=0, **plan["data"])
    timings = {"data": time.time() - t}
    for seed in seeds:
        for step, seconds in run_seed(seed, plan, data_root, out, control=not args.no_control,
                                      authors=args.authors).items():
            timings[f"seed {seed} {step}"] = seconds

    per_seed = {seed: collect(out / f"seed{seed}") for seed in seeds}
    table = report(per_seed)
    out.mkdir(parents=True, exist_ok=True)
    command = "python demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.md").write_text(f"`{command}`\n\n{table}\n")
    # CPU seconds of this process and every script it ran: on a busy machine wall time overstates
    # what the demo costs; cpu_s / cores is what it would take alone on `cores` cores.
    cpu = cpu_seconds()
    previous = (json.loads((out / "summary.json").read_text()).get("timings_s", {})
                if (out / "summary.json").exists() else {})
    # A step reused this call (0.5 s or less) keeps the time it took when it ran.
    timings_all = {k: v if v > 0.5 else previous.get(k, v) for k, v in timings.items()}
    (out / "summary.json").write_text(json.dumps(
        {"command": command, "seeds": seeds, "timings_s": timings_all,
         "wall_s_this_call": time.time() - start, "cpu_s_this_call": cpu,
         "per_seed": {s: {k: v for k, v in r.items() if k != "curves"}
                      for s, r in per_seed.items()}}, indent=1) + "\n")
    charts = [plot(per_seed, out / "demo.png"), plot_probes(per_seed, out / "probes.png")]
    print("\n" + table)
    if args.authors:
        authors = authors_table(out, per_seed)
        (out / "results_authors.md").write_text(f"`{command}`\n\n{authors}\n")
        print(f"\n{authors}\n(also in {out / 'results_authors.md'})")
    print(f"\nwrote {out / 'results.md'}, {out / 'summary.json'}, "
          + ", ".join(str(c) for c in charts if c))
    ran = (", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if v > 0.5)
           or "nothing, all reused")
    print(f"demo wall time this call: {time.time() - start:.0f} s, "
          f"CPU time {cpu:.0f} s (ran: {ran})")


def seed_list(text):
    """--seeds: "0,1,2" -> [0, 1, 2]; anything else is argparse's one-line error."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated whole numbers, "
                                         "e.g. 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0")
    return seeds


if __name__ == "__main__":
    run_cli(main)
