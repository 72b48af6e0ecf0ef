"""The embedded default: the paper's whole experiment in miniature, on a CPU, in minutes.

  python demo.py                      # one seed, ~5 minutes on 2 idle CPU cores (measured: 288 s)
  python demo.py --seeds 0,1,2        # mean and spread over seeds, wins, and a verdict (~22 minutes)
  python demo.py --quick              # the smallest end-to-end run (~1-2 minutes; what the tests run)

It runs the same scripts a GPU user runs, pointed at a generated world (world.py, written by make_data.py):
  1. data      make_data.make_demo_data: NIGHTS-format triplets judged by simulated observers,
               image-caption shards, zero-shot tasks (shape, colour, size, position, count, retrieval,
               and real MNIST digits)                                        -> data/demo
  2. stage 1   train_triplet.py configs/demo_nights.yaml: the vision tower learns the observers'
               2AFC judgments                                               -> OUT/seed<S>/stage1
               and the control with the votes shuffled among triplets        -> OUT/seed<S>/stage1_shuffled
  3. stage 2   train_clip.py configs/demo_clip.yaml twice, same seed and data: from the stage-1 vision
               tower (pi) and from random weights (baseline), evaluating zero-shot and NIGHTS 2AFC as
               it goes                                                      -> OUT/seed<S>/{pi,baseline}
  4. evaluate  evaluate.py on both final checkpoints                        -> OUT/seed<S>/results.json
  5. report    the comparison table (OUT/results.md, OUT/summary.json) and a plot (OUT/demo.png)

Rerunning is cheap: data that exists is reused, a finished run (its summary.json exists) is not
retrained, and a run cut short resumes from its checkpoint (the trainers do that by themselves).
Delete OUT (and data/demo) to start afresh.
"""
import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

import evaluate
import make_data
import nights
from model import create_model

ROOT = Path(__file__).resolve().parent

# The two demo sizes. `full` is tuned so that stage 1 clearly learns (val 2AFC well above 0.5, while
# pixel distance scores 0.55 on this world) and stage 2 is in the few-data regime where an
# initialisation can matter; `quick` only proves the pipeline end to end.
PLANS = {
    "full": dict(
        data=dict(size=64, triplets=6000, pairs=3000, per_class=40, retrieval=200),
        stage1=[], stage2=[],  # the config files hold the full settings
    ),
    "quick": dict(
        data=dict(size=32, triplets=300, pairs=256, per_class=6, retrieval=30),
        stage1=["--epochs", "2", "--batch_size", "32", "--warmup_steps", "2"],
        stage2=["--epochs", "1", "--max_steps", "6", "--batch_size", "32", "--warmup_steps", "2", "--eval_every", "3",
                "--save_every", "3"],
    ),
}


def run_step(title, command, done_file):
    """Run one script as a subprocess unless its output says it already finished."""
    if done_file.exists():
        print(f"== {title}: finished earlier ({done_file}), reused")
        return 0.0
    print(f"== {title}\n   {' '.join(command)}", flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, *command], cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: {title} failed (exit code {result.returncode}); command:\n  {' '.join(command)}\n"
                         "Rerun demo.py to resume where it stopped.")
    return time.time() - start


def shard_spec(shard_dir):
    """{00000..000NN}.tar brace spec of the shards make_data wrote (names from sizes.json)."""
    names = sorted(json.loads((shard_dir / "sizes.json").read_text()))
    first, last = Path(names[0]).stem, Path(names[-1]).stem
    return str(shard_dir / (f"{{{first}..{last}}}.tar" if first != last else f"{first}.tar"))


def untrained_2afc(seed, nights_root, path):
    """2AFC of the stage-1 model before any training (same preset, same seed): the floor that the
    shuffled-vote control should stay near. A random network is not at 0.5: like pixel distance, it
    already sees some of what the observers see."""
    if path.exists():
        return
    preset = yaml.safe_load((ROOT / "configs" / "demo_nights.yaml").read_text())["model"]
    torch.manual_seed(seed)
    model = create_model(preset)
    test = nights.NightsDataset(nights_root, "test", model.config.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test": evaluate.evaluate_nights(model, test, "cpu")}) + "\n")


def run_seed(seed, plan, data_root, out, control):
    """Stages 1-4 for one seed -> {step: seconds}."""
    seed_dir = out / f"seed{seed}"
    tasks_root, nights_root = data_root / "tasks", data_root / "nights"
    tasks = ",".join((tasks_root / "tasks.txt").read_text().split())
    stage1 = ["train_triplet.py", "configs/demo_nights.yaml", "--data_root", str(nights_root), "--seed", str(seed),
              *plan["stage1"]]
    stage2 = ["train_clip.py", "configs/demo_clip.yaml", "--train_data", shard_spec(data_root / "shards"),
              "--seed", str(seed), "--eval_tasks", tasks, "--eval_data_root", str(tasks_root),
              "--nights_root", str(nights_root), *plan["stage2"]]
    runs = {name: seed_dir / name for name in ("stage1", "stage1_shuffled", "pi", "baseline")}
    seconds = {}
    untrained_2afc(seed, nights_root, seed_dir / "untrained_2afc.json")
    seconds["stage 1"] = run_step(f"seed {seed}: stage 1, perceptual training on the observers' votes",
                                  stage1 + ["--out_dir", str(runs["stage1"])], runs["stage1"] / "summary.json")
    if control:
        seconds["stage 1 control"] = run_step(
            f"seed {seed}: stage 1 control, the same triplets with their votes shuffled",
            stage1 + ["--out_dir", str(runs["stage1_shuffled"]), "--shuffle_labels", "true"],
            runs["stage1_shuffled"] / "summary.json")
    seconds["stage 2 pi"] = run_step(
        f"seed {seed}: stage 2 from the perceptual vision tower (PI)",
        stage2 + ["--out_dir", str(runs["pi"]), "--init", str(runs["stage1"] / "ckpt.pt")], runs["pi"] / "summary.json")
    seconds["stage 2 baseline"] = run_step(
        f"seed {seed}: stage 2 from random weights (baseline)",
        stage2 + ["--out_dir", str(runs["baseline"])], runs["baseline"] / "summary.json")
    results = seed_dir / "results.json"
    newest_checkpoint = max((runs[r] / "ckpt.pt").stat().st_mtime for r in ("pi", "baseline"))
    if results.exists() and results.stat().st_mtime < newest_checkpoint:
        results.unlink()  # a stage-2 run changed after it was evaluated
    seconds["evaluate"] = run_step(
        f"seed {seed}: zero-shot evaluation of both",
        ["evaluate.py", "--ckpt", str(runs["pi"] / "ckpt.pt"), "--ckpt", str(runs["baseline"] / "ckpt.pt"),
         "--suite", "demo", "--data-root", str(tasks_root), "--out", str(results), "--workers", "0"], results)
    return seconds


# ---------------------------------------------------------------------------------------------------
# Collecting and reporting
# ---------------------------------------------------------------------------------------------------


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).exists() else []


def collect(seed_dir):
    """One seed's numbers: final zero-shot main metric per task and run, 2AFC of every model."""
    by_run = {}
    for record in json.loads((seed_dir / "results.json").read_text()):
        by_run.setdefault(record["model"], {})[record["dataset"]] = record["metrics"]
    zero_shot = {run: {task: evaluate.main_metric(task, m)[1] for task, m in tasks.items()} for run, tasks in by_run.items()}
    two_afc = {"untrained": json.loads((seed_dir / "untrained_2afc.json").read_text())}
    for name in ("stage1", "stage1_shuffled"):
        if (seed_dir / name / "summary.json").exists():
            two_afc[name] = json.loads((seed_dir / name / "summary.json").read_text())["2afc"]
    for run in ("pi", "baseline"):
        summary = json.loads((seed_dir / run / "summary.json").read_text())
        two_afc[run] = {"test": summary["metrics"].get("nights/2afc", math.nan)}
    curves = {run: [r for r in read_jsonl(seed_dir / run / "metrics.jsonl") if "nights/2afc" in r]
              for run in ("pi", "baseline")}
    return {"zero_shot": zero_shot, "2afc": two_afc, "curves": curves}


def _mean_sd(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _pct(mean, sd=math.nan):
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}")


def report(per_seed):
    """Markdown table over seeds (mean ± sd), PI's wins, and a verdict that says how sure it can be."""
    seeds = list(per_seed)
    tasks = list(next(iter(per_seed.values()))["zero_shot"]["pi"])
    n = len(seeds)
    lines = [f"Zero-shot main metric (%), {n} seed{'s' * (n > 1)} ({', '.join(map(str, seeds))}); "
             f"mean ± sd over seeds" + ("" if n > 1 else " (one seed: no spread)"), "",
             "| task | metric | PI | baseline | PI - baseline | PI wins |", "|---|---|---|---|---|---|"]
    ahead, behind, wins_total = [], [], 0
    for task in tasks:
        pi = [per_seed[s]["zero_shot"]["pi"][task] for s in seeds]
        base = [per_seed[s]["zero_shot"]["baseline"][task] for s in seeds]
        diff = [a - b for a, b in zip(pi, base)]
        wins = sum(d > 0 for d in diff)
        d_mean, d_sd = _mean_sd(diff)
        wins_total += d_mean > 0
        # "clear": the mean difference is more than two standard errors from zero (needs >= 3 seeds)
        if n >= 3 and d_sd > 0 and abs(d_mean) > 2 * d_sd / math.sqrt(n):
            (ahead if d_mean > 0 else behind).append(task)
        metric = "mean_recall@1" if "retrieval" in task else "acc1"
        lines.append(f"| {task} | {metric} | {_pct(*_mean_sd(pi))} | {_pct(*_mean_sd(base))} | "
                     f"{'+' if d_mean >= 0 else ''}{_pct(d_mean, d_sd)} | {wins}/{n} |")
    avg = lambda run: [statistics.fmean(per_seed[s]["zero_shot"][run].values()) for s in seeds]
    diff = [a - b for a, b in zip(avg("pi"), avg("baseline"))]
    lines.append(f"| average ({len(tasks)} tasks) | | {_pct(*_mean_sd(avg('pi')))} | {_pct(*_mean_sd(avg('baseline')))} | "
                 f"{'+' if _mean_sd(diff)[0] >= 0 else ''}{_pct(*_mean_sd(diff))} | {sum(d > 0 for d in diff)}/{n} |")
    lines += ["", "NIGHTS-format 2AFC on the demo's test triplets (%; chance 50)", "",
              "| model | 2AFC |", "|---|---|"]
    rows = (("untrained", "untrained network (random init)"), ("stage1", "stage 1 (perceptual)"),
            ("stage1_shuffled", "stage 1 control (shuffled votes)"), ("pi", "after stage 2, PI"),
            ("baseline", "after stage 2, baseline"))
    for name, label in rows:
        values = [per_seed[s]["2afc"].get(name, {}).get("test", math.nan) for s in seeds]
        if not all(math.isnan(v) for v in values):
            lines.append(f"| {label} | {_pct(*_mean_sd(values))} |")
    if n < 3:
        verdict = (f"PI is ahead on {wins_total} of {len(tasks)} tasks, but with {n} seed{'s' * (n > 1)} a difference "
                   "of a few points can be noise: run with --seeds 0,1,2 (or more) for a verdict.")
    else:
        verdict = (f"PI is ahead on average on {wins_total} of {len(tasks)} tasks; clearly ahead (mean difference > 2 "
                   f"standard errors over {n} seeds) on {', '.join(ahead) or 'none'}; clearly behind on "
                   f"{', '.join(behind) or 'none'}.")
    lines += ["", "Verdict: " + verdict]
    return "\n".join(lines)


def plot(per_seed, path):
    """Final zero-shot results per task (PI vs baseline), and mean zero-shot and NIGHTS 2AFC over
    stage 2 (one line per run and seed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    seeds = list(per_seed)
    tasks = list(per_seed[seeds[0]]["zero_shot"]["pi"])
    fig, (bars, zero_shot, curves) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (run, colour) in enumerate((("pi", "tab:orange"), ("baseline", "tab:blue"))):
        stats = [_mean_sd([100 * per_seed[s]["zero_shot"][run][t] for s in seeds]) for t in tasks]
        bars.bar([x + 0.4 * i for x in range(len(tasks))], [m for m, _ in stats], 0.4, label=run, color=colour,
                 yerr=[0 if math.isnan(sd) else sd for _, sd in stats])
        for s in seeds:
            points = per_seed[s]["curves"][run]
            steps, label = [p["step"] for p in points], run if s == seeds[0] else None
            mean_zero_shot = [100 * statistics.fmean(v for k, v in p.items() if k.startswith("zeroshot/")) for p in points]
            zero_shot.plot(steps, mean_zero_shot, color=colour, alpha=0.8, marker="o", label=label)
            curves.plot(steps, [100 * p["nights/2afc"] for p in points], color=colour, alpha=0.8, marker="o", label=label)
    bars.set_xticks([x + 0.2 for x in range(len(tasks))], [t.removeprefix("demo_") for t in tasks], rotation=30)
    bars.set_ylabel("zero-shot main metric (%)")
    bars.set_title(f"Zero-shot after stage 2 ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    bars.legend()
    zero_shot.set_xlabel("stage-2 step")
    zero_shot.set_ylabel(f"mean zero-shot main metric over {len(tasks)} tasks (%)")
    zero_shot.set_title("Zero-shot during stage 2")
    zero_shot.legend()
    curves.axhline(50, color="grey", lw=0.8, ls="--")
    curves.set_xlabel("stage-2 step")
    curves.set_ylabel("NIGHTS-format 2AFC, test (%)")
    curves.set_title("Perceptual alignment during stage 2")
    curves.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="The PI experiment in miniature on generated data (see the module docstring).")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default: 0); the data is the same for all")
    parser.add_argument("--quick", action="store_true",
                        help="smallest end-to-end run, a few steps per stage (a pipeline check, not a result)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/demo, or runs/demo_quick with --quick)")
    parser.add_argument("--data", default=None, help="demo data folder (default: data/demo, or data/demo_quick with --quick)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the shuffled-vote control of stage 1 (saves ~2 minutes a seed)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    suffix = "_quick" if args.quick else ""
    out, data_root = Path(args.out or f"runs/demo{suffix}"), Path(args.data or f"data/demo{suffix}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    start = time.time()

    print(f"== data: {data_root}", flush=True)
    t = time.time()
    make_data.make_demo_data(data_root, seed=0, **plan["data"])
    timings = {"data": time.time() - t}
    for seed in seeds:
        for step, seconds in run_seed(seed, plan, data_root, out, control=not args.no_control).items():
            timings[f"seed {seed} {step}"] = seconds

    per_seed = {seed: collect(out / f"seed{seed}") for seed in seeds}
    table = report(per_seed)
    out.mkdir(parents=True, exist_ok=True)
    command = "python demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.md").write_text(f"`{command}`\n\n{table}\n")
    # CPU seconds of this process and every script it ran: on a busy machine wall time overstates
    # what the demo costs; cpu_s / cores is what it would take alone on `cores` cores.
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    previous = json.loads((out / "summary.json").read_text()).get("timings_s", {}) if (out / "summary.json").exists() else {}
    timings_all = {k: v if v > 0.5 else previous.get(k, v) for k, v in timings.items()}  # reused steps keep their time
    (out / "summary.json").write_text(json.dumps(
        {"command": command, "seeds": seeds, "timings_s": timings_all, "wall_s_this_call": time.time() - start, "cpu_s_this_call": cpu,
         "per_seed": {s: {k: v for k, v in r.items() if k != "curves"} for s, r in per_seed.items()}}, indent=1) + "\n")
    chart = plot(per_seed, out / "demo.png")
    print("\n" + table)
    print(f"\nwrote {out / 'results.md'}, {out / 'summary.json'}, {chart}")
    ran = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if v > 0.5) or "nothing, all reused"
    print(f"demo wall time this call: {time.time() - start:.0f} s, CPU time {cpu:.0f} s (ran: {ran})")

if __name__ == "__main__":
    main()
