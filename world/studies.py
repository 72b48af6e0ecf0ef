"""The embedded demo's follow-up studies, each one command on a CPU: the questions the PI authors
ask next.

  python demo.py --study efficiency [--seeds 0,1,2] [--quick]   # how many triplets does PI need?
  python demo.py --study sources    [--seeds 0,1,2] [--quick]   # which signal initialises best?

efficiency  stage 1 on nested subsets of the demo's NIGHTS-format triplets (10, 25, 50, 100% by
            `triplet_fraction`: the 10% set lies inside the 25% set, ...; the same epochs, so
            fewer steps), each followed by the same stage 2 as the demo, and the baseline.
sources     stage 1 from four signals at one matched budget (`max_triplets`: the same number of
            training triplets, hence the same steps, for every source), each followed by the same
            stage 2:
              votes        the observers' NIGHTS-format votes (data_format=nights), as the demo
              odd-one-out  THINGS-format odd-one-out trials judged by the same observers
                           (data_format=things)
              early        the "early area" RDM (low-level: block-averaged pixels + noise;
                           data_format=rdm)
              late         the "late area" RDM (the observers' perceptual distance + noise;
                           data_format=rdm)
              shuffled     the votes shuffled among triplets (the demo's control)
            and the baseline. make_data.make_study_data (world/make_data.py) writes the stimuli,
            trials and RDMs (how the areas are made: the comment above make_data.AREAS).

Every arm is scored the same way: zero-shot per task (evaluate.py, one call for all arms), 2AFC on
the NIGHTS-format test triplets, odd-one-out accuracy on the THINGS-format test trials, and the RSA
of the final tower with each area on held-out stimuli; the stage-1 towers are scored too. Outputs
in runs/demo/studies/<study>/ (runs/demo_quick/... with --quick): results.md, summary.json,
<study>.png, and seed<S>/ with every run. Reruns reuse finished runs, as the demo does.
"""
import json
import math
import statistics
import sys
import time

import numpy as np

from analysis import alignment
from analysis.probes import representational_similarity
from checkpoints import load_checkpoint
from stage1 import objective, other_sources
from world import make_data
from world.pipeline import (PLANS, cpu_seconds, drop_if_stale, run_step, shard_spec,
                            start_step_server, untrained)
from world.report import mean_sd, percent, pyplot, signed, main_metrics, read_results

STUDIES = ("efficiency", "sources")
# Arm label (as results.md names it) -> run folder under seed<S>/ (stage 1 in stage1_<folder>).
ARMS = {
    "efficiency": {"10%": "pct10", "25%": "pct25", "50%": "pct50", "100%": "pct100",
                   "baseline": "baseline"},
    "sources": {"votes": "votes", "odd-one-out": "odd_one_out", "early": "early", "late": "late",
                "shuffled": "shuffled", "baseline": "baseline"},
}
FRACTIONS = {"10%": 0.1, "25%": 0.25, "50%": 0.5, "100%": 1.0}
# The sources study's sizes. budget: training triplets for every source, below what each holds
# (the demo's votes keep ~3,400 after min_votes=6; 750 odd-one-out trials give 1,500, two per
# trial); 1,500 rather than all 3,400 keeps the study (five stage-1 and six stage-2 runs) within
# 15 minutes on 2 cores: measured 326 s for one seed from a fresh clone, data included
# (efficiency: 275 s). stimuli: concepts, odd-one-out trials (train, validation, test) and
# held-out images for the RSA.
STUDY_PLANS = {
    "full": dict(budget=1500, stimuli=dict(concepts=400, trials=(750, 300, 600), heldout=200),
                 stage1=[]),
    # quick: the demo's quick settings; stage-1 batches small enough for 10% of its ~180 triplets
    "quick": dict(budget=100, stimuli=dict(concepts=40, trials=(60, 30, 60), heldout=30),
                  stage1=["--batch_size", "8"]),
}
# Scores of each model besides zero-shot, as results.md names them (a fraction each).
ALIGNMENT = {"2afc": "2AFC", "odd_one_out": "odd-one-out", "rsa_early": "RSA early",
             "rsa_late": "RSA late"}


def stage1_command(study, arm, seed, plan, study_plan, data_root):
    """The train_triplet.py command of one arm's stage 1 (None: the baseline has none)."""
    nights = ["--data_format", "nights", "--data_root", str(data_root / "nights")]
    stimuli = str(data_root / "stimuli")
    if arm == "baseline":
        return None
    if study == "efficiency":
        source = nights + ["--triplet_fraction", str(FRACTIONS[arm])]
    else:
        source = {"votes": nights, "shuffled": nights + ["--shuffle_labels", "true"],
                  "odd-one-out": ["--data_format", "things", "--data_root", stimuli],
                  "early": ["--data_format", "rdm", "--data_root", stimuli, "--rdm", "early"],
                  "late": ["--data_format", "rdm", "--data_root", stimuli, "--rdm", "late"]}[arm]
        source = source + ["--max_triplets", str(study_plan["budget"])]
    return ["train_triplet.py", "configs/demo_nights.yaml", *source, "--seed", str(seed),
            *plan["stage1"], *study_plan["stage1"]]


def run_seed(study, seed, plan, study_plan, data_root, out):
    """Every arm's stage 1 and stage 2 for one seed, then the scores -> {step: seconds}."""
    seed_dir = out / f"seed{seed}"
    tasks_root = data_root / "tasks"
    # Stage 2 as the demo runs it, except that it is not evaluated while it trains (the demo
    # does, for its curves): evaluate.py scores the final models once.
    stage2 = ["train_clip.py", "configs/demo_clip.yaml",
              "--train_data", shard_spec(data_root / "shards"), "--seed", str(seed),
              *plan["stage2"], "--eval_every", "0", "--eval_tasks=", "--nights_root="]
    seconds = {}
    for arm, folder in ARMS[study].items():
        command = stage1_command(study, arm, seed, plan, study_plan, data_root)
        init = []
        if command:
            run = seed_dir / f"stage1_{folder}"
            seconds[f"stage 1 {arm}"] = run_step(
                f"{study}, seed {seed}: stage 1, {arm}", command + ["--out_dir", str(run)],
                run / "summary.json")
            init = ["--init", str(run / "ckpt.pt")]
        run = seed_dir / folder
        seconds[f"stage 2 {arm}"] = run_step(
            f"{study}, seed {seed}: stage 2 from {arm}", stage2 + init + ["--out_dir", str(run)],
            run / "summary.json")
    # The baseline's row among the stage-1 towers: the network before any training (same preset
    # and seed).
    untrained(seed, data_root / "nights", seed_dir / "stage1_baseline")
    finals = [seed_dir / folder / "ckpt.pt" for folder in ARMS[study].values()]
    results = seed_dir / "results.json"
    drop_if_stale(results, finals)
    seconds["evaluate"] = run_step(
        f"{study}, seed {seed}: zero-shot evaluation of the {len(finals)} arms",
        ["evaluate.py", "--suite", "demo", "--data-root", str(tasks_root), "--out", str(results),
         "--workers", "0", *[a for c in finals for a in ("--ckpt", str(c))]], results)
    towers = finals + sorted(seed_dir.glob("stage1_*/ckpt.pt"))
    scores = seed_dir / "scores.json"
    drop_if_stale(scores, towers)
    if scores.exists():
        print(f"== {study}, seed {seed}: alignment scores: finished earlier ({scores}), reused")
    else:
        print(f"== {study}, seed {seed}: alignment of the {len(towers)} towers "
              "(2AFC, odd-one-out, RSA with each area)", flush=True)
        start = time.time()
        write_json(scores, alignment_scores(towers, data_root))
        seconds["alignment"] = time.time() - start
    return seconds


def alignment_scores(checkpoints, data_root):
    """{run folder: {"2afc", "odd_one_out", "rsa_early", "rsa_late"}} for each checkpoint: 2AFC on
    the NIGHTS-format test triplets, odd-one-out accuracy on the THINGS-format test trials
    (testset1), and the Spearman correlation of the tower's image distances (1 - cos) with each
    area's RDM over the held-out stimuli. The data is read by the readers train_triplet.py uses
    (stage1/other_sources.py), the scores by the functions evaluate.py scores with
    (stage1/objective.py, analysis/alignment.py, analysis/probes.py)."""
    scores, splits = {}, {}
    for path in checkpoints:
        model = load_checkpoint(path)
        size = model.config.image_size
        if size not in splits:
            splits[size] = {
                "nights": other_sources.open_splits("nights", data_root / "nights", size)["test"],
                "things": other_sources.open_splits("things", data_root / "stimuli", size)["test"],
                # the RDM reader's image list: every held-out image, in images.txt's order (the
                # RDM's rows)
                "heldout": other_sources.open_splits("rdm", data_root / "stimuli_test", size,
                                                     rdm=make_data.AREAS[0])["train"]}
        data = splits[size]
        heldout = objective.embed_images(model, data["heldout"], "cpu")
        scores[path.parent.name] = {
            "2afc": objective.two_afc_by_triplet(model, data["nights"], "cpu"),
            "odd_one_out": alignment.odd_one_out_accuracy(model, data["things"], "cpu")["accuracy"],
            **{f"rsa_{area}": representational_similarity(
                   heldout, np.load(data_root / "stimuli_test" / "rdms" / f"{area}.npy"))
               for area in make_data.AREAS}}
    return scores


def write_json(path, value):
    """Written whole or not at all: a kill leaves the previous file or none."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    partial.replace(path)


# --------------------------------------------------------------------------------------------------
# Reading back and reporting
# --------------------------------------------------------------------------------------------------


def collect(study, seed_dir):
    """One seed's numbers: zero-shot main metric per arm and task, the alignment scores of each
    arm's final tower and stage-1 tower, and each stage 1's number of training triplets."""
    zero_shot = main_metrics(read_results(seed_dir / "results.json"))
    scores = json.loads((seed_dir / "scores.json").read_text())
    label = {folder: arm for arm, folder in ARMS[study].items()}
    triplets = {}
    for arm, folder in ARMS[study].items():
        summary = seed_dir / f"stage1_{folder}" / "summary.json"
        triplets[arm] = (json.loads(summary.read_text())["n_triplets"]["train"]
                         if summary.exists() else 0)
    return {"zero_shot": {label[f]: v for f, v in zero_shot.items()},
            "final": {label[f]: v for f, v in scores.items() if f in label},
            "stage1": {label[f.removeprefix("stage1_")]: v
                       for f, v in scores.items() if f.startswith("stage1_")},
            "n_triplets": triplets}


def _verdict(diffs, n):
    """"ahead" or "behind" by the demo's rule (the mean difference is more than 2 standard errors
    from zero, with 3 seeds or more), else None."""
    mean, sd = mean_sd(diffs)
    if n >= 3 and sd > 0 and abs(mean) > 2 * sd / math.sqrt(n):
        return "ahead" if mean > 0 else "behind"
    return None


def report(study, per_seed, areas):
    """results.md's tables: zero-shot per task (a column per arm), each arm against the baseline
    (difference, wins, the demo's verdict), and the alignment scores of the stage-1 and final
    towers."""
    seeds, arms = list(per_seed), list(ARMS[study])
    n = len(seeds)
    tasks = list(per_seed[seeds[0]]["zero_shot"]["baseline"])
    score = lambda arm, task, s: (statistics.fmean(per_seed[s]["zero_shot"][arm].values())
                                  if task is None else per_seed[s]["zero_shot"][arm][task])
    name = lambda task: f"average ({len(tasks)} tasks)" if task is None else task
    lines = [f"Zero-shot main metric (%), {n} seed{'s' * (n > 1)} ({', '.join(map(str, seeds))}); "
             "mean ± sd over seeds", "",
             "| task | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for task in [*tasks, None]:
        lines.append(f"| {name(task)} | " + " | ".join(
            percent(*mean_sd([score(a, task, s) for s in seeds])) for a in arms) + " |")
    others = [a for a in arms if a != "baseline"]
    lines += ["", "Each arm against the baseline: difference in points (mean ± sd over seeds) and "
                  "the seeds it won", "",
              "| task | " + " | ".join(f"{a} - baseline | wins" for a in others) + " |",
              "|---|" + "---|---|" * len(others)]
    verdicts = {a: {"ahead": [], "behind": []} for a in others}
    for task in [*tasks, None]:
        cells = []
        for arm in others:
            diffs = [score(arm, task, s) - score("baseline", task, s) for s in seeds]
            cells += [signed(*mean_sd(diffs)), f"{sum(d > 0 for d in diffs)}/{n}"]
            if (v := _verdict(diffs, n)) and task is not None:
                verdicts[arm][v].append(task)
        lines.append(f"| {name(task)} | " + " | ".join(cells) + " |")
    lines += ["", "Verdict (the demo's rule: clearly ahead or behind = the mean difference is more "
                  "than two standard errors from zero, with 3 or more seeds):"]
    for arm, v in verdicts.items():
        average = [score(arm, None, s) - score("baseline", None, s) for s in seeds]
        if n < 3:
            lines.append(f"- {arm} vs baseline: {signed(statistics.fmean(average))} points on "
                         f"average; with {n} seed{'s' * (n > 1)} no verdict: "
                         "run with --seeds 0,1,2.")
        else:
            verdict = {"ahead": "clearly ahead", "behind": "clearly behind"}.get(
                _verdict(average, n), "not clear")
            lines.append(f"- {arm} vs baseline: {signed(*mean_sd(average))} on average "
                         f"({verdict}); clearly ahead on {', '.join(v['ahead']) or 'none'}; "
                         f"clearly behind on {', '.join(v['behind']) or 'none'}.")
    stat = lambda get: percent(*mean_sd([get(per_seed[s]) for s in seeds]))
    lines += ["", "Alignment (%; RSA as Spearman's rho x 100): 2AFC on the NIGHTS-format test "
                  "triplets (chance 50), odd-one-out accuracy on the THINGS-format test trials "
                  "(chance 33.3), RSA of the tower's image distances with each area's RDM on "
                  "held-out stimuli"]
    for tower, title in (("stage1", "the stage-1 tower"),
                         ("final", "the final tower, after stage 2")):
        lines += ["", f"Of {title}", "",
                  "| arm | training triplets | " + " | ".join(ALIGNMENT.values()) + " |",
                  "|---|---|" + "---|" * len(ALIGNMENT)]
        for arm in arms:
            if arm not in per_seed[seeds[0]][tower]:
                continue
            counts = sorted({per_seed[s]["n_triplets"][arm] for s in seeds})
            label = ("baseline (the untrained network)" if tower == "stage1" and arm == "baseline"
                     else arm)
            lines.append(f"| {label} | {'/'.join(map(str, counts))} | "
                         + " | ".join(stat(lambda r: r[tower][arm][k]) for k in ALIGNMENT) + " |")
    if areas:
        lines += ["", "What each simulated area's RDM is (Spearman's rho of its upper triangle "
                      "over the training stimuli)", "",
                  "| area | with pixel distance | with the observers' distance |", "|---|---|---|"]
        for area in make_data.AREAS:
            lines.append(f"| {area} | {areas[area]['spearman_with_pixel_distance']:.2f} | "
                         f"{areas[area]['spearman_with_observer_distance']:.2f} |")
    return "\n".join(lines)


def plot(study, per_seed, path):
    """efficiency: PI's gain over the baseline (mean zero-shot over tasks) and final 2AFC against
    the number of training triplets, one faint point per seed, mean ± sd; sources: per arm, the
    gain and each alignment score of the final tower."""
    plt = pyplot()
    seeds, arms = list(per_seed), list(ARMS[study])
    gain = lambda arm, s: 100 * (statistics.fmean(per_seed[s]["zero_shot"][arm].values())
                                 - statistics.fmean(per_seed[s]["zero_shot"]["baseline"].values()))
    final = lambda arm, key, s: 100 * per_seed[s]["final"][arm][key]
    if study == "efficiency":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        pis = [a for a in arms if a != "baseline"]
        for ax, get, label, base in (
                (axes[0], gain, "PI - baseline, mean zero-shot over tasks (points)", 0),
                (axes[1], lambda a, s: final(a, "2afc", s), "2AFC of the final tower (%)", None)):
            xs = [statistics.fmean(per_seed[s]["n_triplets"][a] for s in seeds) for a in pis]
            stats = [mean_sd([get(a, s) for s in seeds]) for a in pis]
            for s in seeds:
                ax.scatter([per_seed[s]["n_triplets"][a] for a in pis], [get(a, s) for a in pis],
                           color="tab:orange", alpha=0.35, s=14)
            ax.errorbar(xs, [m for m, _ in stats],
                        yerr=[0 if math.isnan(sd) else sd for _, sd in stats], marker="o",
                        color="tab:orange", capsize=3, label="PI (mean ± sd over seeds)")
            for x, a in zip(xs, pis):
                ax.annotate(a, (x, stats[pis.index(a)][0]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8)
            if base is not None:
                ax.axhline(base, color="tab:blue", lw=1, ls="--", label="baseline")
            else:
                ax.axhline(statistics.fmean(final("baseline", "2afc", s) for s in seeds),
                           color="tab:blue", lw=1, ls="--", label="baseline")
            ax.set(xscale="log", xlabel="stage-1 training triplets", ylabel=label)
            ax.set_xticks(xs, [f"{x:.0f}" for x in xs])
            ax.minorticks_off()
            ax.legend(fontsize=8)
        axes[0].set_title("How many triplets PI needs")
        axes[1].set_title("Perceptual alignment after stage 2")
    else:
        colours = {"votes": "tab:orange", "odd-one-out": "tab:red", "early": "tab:cyan",
                   "late": "tab:purple", "shuffled": "tab:grey", "baseline": "tab:blue"}
        panels = ([("gain", "PI - baseline, mean zero-shot (points)")]
                  + [(k, f"{v}, final tower (%)") for k, v in ALIGNMENT.items()])
        fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
        for ax, (key, label) in zip(axes.flat, panels):
            get = gain if key == "gain" else (lambda a, s, k=key: final(a, k, s))
            stats = [mean_sd([get(a, s) for s in seeds]) for a in arms]
            ax.bar(arms, [m for m, _ in stats],
                   yerr=[0 if math.isnan(sd) else sd for _, sd in stats],
                   color=[colours[a] for a in arms])
            ax.tick_params(axis="x", rotation=35)
            ax.set_title(label, fontsize=10)
        # The stage-1 towers: which area each source's tower resembles before stage 2 (the
        # baseline's stage-1 tower: the untrained network).
        ax, sources = axes.flat[-1], [a for a in arms if a in per_seed[seeds[0]]["stage1"]]
        for k, area in enumerate(make_data.AREAS):
            stats = [mean_sd([100 * per_seed[s]["stage1"][a][f"rsa_{area}"] for s in seeds])
                     for a in sources]
            ax.bar([i + 0.4 * k for i in range(len(sources))], [m for m, _ in stats], 0.4,
                   label=f"RSA {area}", yerr=[0 if math.isnan(sd) else sd for _, sd in stats])
        ax.set_xticks([i + 0.2 for i in range(len(sources))], sources, rotation=35)
        ax.set_title("RSA with each area, stage-1 tower (rho x 100)", fontsize=10)
        ax.legend(fontsize=8)
        fig.suptitle("Which signal initialises best "
                     "(the same number of training triplets for every source)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(study, seeds, quick, out, data_root, argv):
    plan, study_plan = (PLANS["quick" if quick else "full"],
                        STUDY_PLANS["quick" if quick else "full"])
    start = time.time()
    start_step_server()  # its imports overlap the data's making
    print(f"== data: {data_root}", flush=True)
    t = time.time()
    make_data.make_demo_data(data_root, seed=0, **plan["data"])
    make_data.make_study_data(data_root, seed=0, size=plan["data"]["size"], **study_plan["stimuli"])
    timings = {"data": time.time() - t}
    for seed in seeds:
        for step, seconds in run_seed(study, seed, plan, study_plan, data_root, out).items():
            timings[f"seed {seed} {step}"] = seconds
    per_seed = {seed: collect(study, out / f"seed{seed}") for seed in seeds}
    areas = (json.loads((data_root / "stimuli" / "areas.json").read_text())
             if study == "sources" else None)
    table = report(study, per_seed, areas)
    command = "python demo.py " + " ".join(argv)
    (out / "results.md").write_text(f"`{command}`\n\n{table}\n")
    cpu = cpu_seconds()
    previous = (json.loads((out / "summary.json").read_text()).get("timings_s", {})
                if (out / "summary.json").exists() else {})
    write_json(out / "summary.json", {
        "study": study, "command": command, "seeds": seeds, "arms": list(ARMS[study]),
        "timings_s": {k: v if v > 0.5 else previous.get(k, v) for k, v in timings.items()},
        "wall_s_this_call": time.time() - start, "cpu_s_this_call": cpu, "areas": areas,
        "per_seed": per_seed})
    chart = plot(study, per_seed, out / f"{study}.png")
    print("\n" + table)
    print(f"\nwrote {out / 'results.md'}, {out / 'summary.json'}, {chart}")
    ran = (", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if v > 0.5)
           or "nothing, all reused")
    print(f"study wall time this call: {time.time() - start:.0f} s, "
          f"CPU time {cpu:.0f} s (ran: {ran})")


if __name__ == "__main__":
    sys.exit("run the studies through demo.py: python demo.py --study efficiency | sources")
