"""The embedded demo's report: its runs' outputs -> the tables (results.md), summary.json's per-seed
numbers, and the figures (demo.png, probes.png). demo.py runs the experiment and calls these.
"""
import json
import math
import statistics
from pathlib import Path

from analysis import zero_shot

# The four stage-2 arms, each a CLIP scored on every task and on 2AFC: the vision tower starts from
# stage 1 (pi), from random weights (baseline), from the shuffled-vote control of stage 1 (shuffled:
# does any stage-1 training on these images help, or the observers' structure?), or the baseline's
# final CLIP is fine-tuned perceptually afterwards (posthoc: the paper's alternative to PI).
ARMS = ("pi", "baseline", "shuffled", "posthoc")
# Every checkpoint the probes compare (folder names under OUT/seed<S>, the labels in the results).
PROBED = ("untrained", "stage1", "stage1_shuffled", *ARMS)


def read_jsonl(path):
    return ([json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            if Path(path).exists() else [])


def read_results(path):
    """evaluate.py's records (results.json) -> {run: {task: metrics}}."""
    by_run = {}
    for record in json.loads(Path(path).read_text()):
        by_run.setdefault(record["model"], {})[record["dataset"]] = record["metrics"]
    return by_run


def main_metrics(by_run):
    """{run: {task: metrics}} -> {run: {task: the task's main metric}} (zero_shot.main_metric)."""
    return {run: {task: zero_shot.main_metric(task, m)[1] for task, m in tasks.items()}
            for run, tasks in by_run.items()}


def collect(seed_dir):
    """One seed's numbers: final zero-shot main metric per task and arm, 2AFC of every model, the
    probes (CKA per layer, similarity to the observers, linear-probe acc1) and the stage-2
    curves."""
    scores = main_metrics(read_results(seed_dir / "results.json"))
    summaries = {name: json.loads((seed_dir / name / "summary.json").read_text())
                 for name in PROBED if (seed_dir / name / "summary.json").exists()}
    two_afc = {"untrained": json.loads((seed_dir / "untrained_2afc.json").read_text())}
    # train_triplet.py's runs hold 2AFC on every split, train_clip.py's on the test split alone.
    for name, summary in summaries.items():
        two_afc[name] = (summary["2afc"] if "2afc" in summary
                         else {"test": summary["metrics"].get("nights/2afc", math.nan)})
    curves = {run: [r for r in read_jsonl(seed_dir / run / "metrics.jsonl") if "nights/2afc" in r]
              for run in ("pi", "baseline", "shuffled") if run in summaries}
    probes = json.loads((seed_dir / "probes.json").read_text())
    probes = {"n_images": probes["n_images"], "cka": probes["cka"], "rsa": probes.get("rsa", {}),
              "linear_probe": {m: {t: r["lp_acc1"] for t, r in by_task.items()}
                               for m, by_task in probes["linear_probe"].items()}}
    return {"zero_shot": scores, "2afc": two_afc, "probes": probes, "curves": curves}


def mean_sd(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def percent(mean, sd=math.nan):
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}")


def signed(mean, sd=math.nan):
    return ("+" if mean >= 0 else "") + percent(mean, sd)


LABELS = {"untrained": "untrained network (random init)", "stage1": "stage 1 (perceptual)",
          "stage1_shuffled": "stage 1 control (shuffled votes)", "pi": "after stage 2, PI",
          "baseline": "after stage 2, baseline",
          "shuffled": "after stage 2, from the shuffled tower",
          "posthoc": "baseline + post-hoc perceptual tuning"}
# CKA pairs worth a row, and what each asks.
CKA_ROWS = (("pi", "stage1", "PI vs its stage-1 tower: what stage 2 kept"),
            ("shuffled", "stage1_shuffled", "shuffled arm vs its stage-1 tower"),
            ("baseline", "untrained", "baseline vs random init: what stage 2 alone learns"),
            ("pi", "baseline", "PI vs baseline"), ("pi", "shuffled", "PI vs shuffled arm"),
            ("posthoc", "baseline", "post-hoc vs the baseline it tuned"))


def _cka(probes, a, b):
    return probes["cka"].get(f"{a}~{b}") or probes["cka"].get(f"{b}~{a}")


def report(per_seed):
    """Markdown tables over seeds (mean ± sd): zero-shot per arm; PI against each other arm
    (difference, wins over seeds, a verdict that says how sure it can be); 2AFC beside the probes;
    CKA."""
    return "\n".join(zero_shot_lines(per_seed) + probe_lines(per_seed))


def zero_shot_lines(per_seed):
    """The zero-shot tables and the verdicts of report(), as lines."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    tasks = list(first["zero_shot"]["pi"])
    arms = [a for a in ARMS if all(a in per_seed[s]["zero_shot"] for s in seeds)]
    others = arms[1:]
    n = len(seeds)
    score = lambda arm, task, s: (statistics.fmean(per_seed[s]["zero_shot"][arm].values())
                                  if task is None else per_seed[s]["zero_shot"][arm][task])
    rows = [*tasks, None]  # None: the average over tasks
    name = lambda task: f"average ({len(tasks)} tasks)" if task is None else task
    lines = [f"Zero-shot main metric (%), {n} seed{'s' * (n > 1)} ({', '.join(map(str, seeds))}); "
             f"mean ± sd over seeds" + ("" if n > 1 else " (one seed: no spread)"), "",
             "| task | metric | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for task in rows:
        metric = "" if task is None else "mean_recall@1" if "retrieval" in task else "acc1"
        lines.append(f"| {name(task)} | {metric} | " + " | ".join(
            percent(*mean_sd([score(a, task, s) for s in seeds])) for a in arms) + " |")
    lines += ["", "PI against each other arm: difference in points (mean ± sd over seeds) and the "
                  "seeds PI won", "",
              "| task | " + " | ".join(f"PI - {a} | wins" for a in others) + " |",
              "|---|" + "---|---|" * len(others)]
    verdicts = {a: {"ahead": 0, "clear": [], "behind": []} for a in others}
    for task in rows:
        cells = []
        for other in others:
            diff = [score("pi", task, s) - score(other, task, s) for s in seeds]
            d_mean, d_sd = mean_sd(diff)
            cells += [signed(d_mean, d_sd), f"{sum(d > 0 for d in diff)}/{n}"]
            if task is not None:
                verdicts[other]["ahead"] += d_mean > 0
                # "clear": the mean difference is more than two standard errors from zero (needs
                # 3 seeds or more)
                if n >= 3 and d_sd > 0 and abs(d_mean) > 2 * d_sd / math.sqrt(n):
                    verdicts[other]["clear" if d_mean > 0 else "behind"].append(task)
        lines.append(f"| {name(task)} | " + " | ".join(cells) + " |")
    lines += ["", "Verdict:"]
    for other, v in verdicts.items():
        if n < 3:
            lines.append(f"- PI vs {other}: PI is ahead on {v['ahead']} of {len(tasks)} tasks, "
                         f"but with {n} seed{'s' * (n > 1)} a difference of a few points can be "
                         "noise: run with --seeds 0,1,2 (or more) for a verdict.")
        else:
            lines.append(f"- PI vs {other}: PI is ahead on average on {v['ahead']} of {len(tasks)} "
                         f"tasks; clearly ahead (mean difference > 2 standard errors over {n} "
                         f"seeds) on {', '.join(v['clear']) or 'none'}; "
                         f"clearly behind on {', '.join(v['behind']) or 'none'}.")
    return lines


def probe_lines(per_seed):
    """2AFC beside the probes that ask the same question of the whole feature space, the linear
    probe per task and CKA between towers: report()'s second half, as lines."""
    seeds, lines = list(per_seed), []
    first = per_seed[seeds[0]]
    models = [m for m in PROBED if any(m in per_seed[s]["2afc"] for s in seeds)]
    probe_tasks = list(first["probes"]["linear_probe"].get("pi", {}))
    stat = lambda get: percent(*mean_sd([get(per_seed[s]) for s in seeds]))
    lp_mean = lambda r, m: (statistics.fmean(r["probes"]["linear_probe"][m].values())
                            if m in r["probes"]["linear_probe"] else math.nan)
    lines += ["", f"Perceptual alignment and probes of the feature space (%, except Spearman's rho "
                  f"x 100; {first['probes']['n_images']} probe scenes): 2AFC on the demo's "
                  "NIGHTS-format test triplets (chance 50), the Spearman correlation of the "
                  "model's image distances (1 - cos) with the observers' distance, and the mean "
                  f"linear-probe acc1 over {len(probe_tasks)} tasks (frozen features, train split "
                  "fitted, test split scored)",
              "", "| model | 2AFC | observer-distance rho | linear probe |", "|---|---|---|---|"]
    for m in models:
        lines.append(f"| {LABELS[m]} | "
                     f"{stat(lambda r: r['2afc'].get(m, {}).get('test', math.nan))} | "
                     f"{stat(lambda r: r['probes']['rsa'].get(m, math.nan))} | "
                     f"{stat(lambda r: lp_mean(r, m))} |")
    lines += ["", "Linear probe acc1 per task (%)", "",
              "| task | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for task in probe_tasks:
        lines.append(f"| {task} | " + " | ".join(
            stat(lambda r: r["probes"]["linear_probe"].get(m, {}).get(task, math.nan))
            for m in models) + " |")
    layers = list(_cka(first["probes"], "pi", "baseline") or {})
    lines += ["", "Linear CKA between vision towers on the probe scenes (class token after each "
                  "block; the final embedding); 1 = the same representation up to rotation and "
                  "scale", "",
              "| towers | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for a, b, label in CKA_ROWS:
        if all(_cka(per_seed[s]["probes"], a, b) for s in seeds):
            lines.append(f"| {label} | " + " | ".join(
                f"{mean_sd([_cka(per_seed[s]['probes'], a, b)[k] for s in seeds])[0]:.2f}"
                for k in layers) + " |")
    return lines


COLOURS = {"pi": "tab:orange", "baseline": "tab:blue", "shuffled": "tab:green",
           "posthoc": "tab:purple", "untrained": "tab:grey", "stage1": "tab:red",
           "stage1_shuffled": "tab:olive"}


def pyplot():
    """matplotlib's pyplot, drawing to files (the Agg backend). matplotlib is a runtime requirement
    (requirements.txt), imported here so that only drawing a plot needs it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(per_seed, path):
    """Final zero-shot results per task for every arm, and mean zero-shot and NIGHTS 2AFC over
    stage 2 (one line per stage-2 run and seed; the post-hoc arm as a point after the baseline's
    last step)."""
    plt = pyplot()
    seeds = list(per_seed)
    tasks = list(per_seed[seeds[0]]["zero_shot"]["pi"])
    arms = [a for a in ARMS if all(a in per_seed[s]["zero_shot"] for s in seeds)]
    width = 0.8 / len(arms)
    fig, (bars, zero_shot_axes, curves) = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, run in enumerate(arms):
        stats = [mean_sd([100 * per_seed[s]["zero_shot"][run][t] for s in seeds]) for t in tasks]
        bars.bar([x + width * i for x in range(len(tasks))], [m for m, _ in stats], width,
                 label=run, color=COLOURS[run],
                 yerr=[0 if math.isnan(sd) else sd for _, sd in stats])
        for s in seeds:
            label = run if s == seeds[0] else None
            if run == "posthoc":  # after the baseline's stage 2: one point, at its last step
                step = per_seed[s]["curves"]["baseline"][-1]["step"]
                zero_shot_axes.plot(
                    [step], [100 * statistics.fmean(per_seed[s]["zero_shot"]["posthoc"].values())],
                    "*", ms=12, color=COLOURS[run],
                    label=label and "posthoc (baseline, then tuned)")
                curves.plot([step], [100 * per_seed[s]["2afc"]["posthoc"]["test"]], "*", ms=12,
                            color=COLOURS[run], label=label and "posthoc (baseline, then tuned)")
                continue
            points = per_seed[s]["curves"][run]
            steps = [p["step"] for p in points]
            mean_zero_shot = [
                100 * statistics.fmean(v for k, v in p.items() if k.startswith("zeroshot/"))
                for p in points]
            zero_shot_axes.plot(steps, mean_zero_shot, color=COLOURS[run], alpha=0.8, marker="o",
                                label=label)
            curves.plot(steps, [100 * p["nights/2afc"] for p in points], color=COLOURS[run],
                        alpha=0.8, marker="o", label=label)
    bars.set_xticks([x + width * (len(arms) - 1) / 2 for x in range(len(tasks))],
                    [t.removeprefix("demo_") for t in tasks], rotation=30)
    bars.set_ylabel("zero-shot main metric (%)")
    bars.set_title(f"Zero-shot after stage 2 ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    bars.legend(fontsize=8)
    zero_shot_axes.set_xlabel("stage-2 step")
    zero_shot_axes.set_ylabel(f"mean zero-shot main metric over {len(tasks)} tasks (%)")
    zero_shot_axes.set_title("Zero-shot during stage 2")
    zero_shot_axes.legend(fontsize=8)
    curves.axhline(50, color="grey", lw=0.8, ls="--")
    curves.set_xlabel("stage-2 step")
    curves.set_ylabel("NIGHTS-format 2AFC, test (%)")
    curves.set_title("Perceptual alignment during stage 2")
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probes(per_seed, path):
    """The probes over seeds: CKA per layer for the pairs of the table, 2AFC against the
    observer-distance correlation per model (one point per seed), mean linear-probe acc1 per
    model."""
    plt = pyplot()
    seeds = list(per_seed)
    models = [m for m in PROBED if all(m in per_seed[s]["probes"]["linear_probe"] for s in seeds)]
    fig, (cka, rsa, probe) = plt.subplots(1, 3, figsize=(17, 4.8))
    for a, b, label in CKA_ROWS:
        if all(_cka(per_seed[s]["probes"], a, b) for s in seeds):
            layers = list(_cka(per_seed[seeds[0]]["probes"], a, b))
            cka.plot(layers, [statistics.fmean(_cka(per_seed[s]["probes"], a, b)[k] for s in seeds)
                              for k in layers], marker="o", label=label)
    cka.set(ylim=(0, 1.02), ylabel="linear CKA (mean over seeds)",
            title="How alike two towers represent the probe scenes")
    cka.legend(fontsize=7)
    for m in models:
        rsa.scatter([100 * per_seed[s]["probes"]["rsa"].get(m, math.nan) for s in seeds],
                    [100 * per_seed[s]["2afc"].get(m, {}).get("test", math.nan) for s in seeds],
                    color=COLOURS[m], label=m)
    rsa.set(xlabel="Spearman rho x 100: image distances vs the observers' distance",
            ylabel="2AFC, test (%)",
            title="Perceptual alignment: whole distance matrix vs triplets")
    rsa.legend(fontsize=7)
    stats = [mean_sd([100 * statistics.fmean(per_seed[s]["probes"]["linear_probe"][m].values())
                      for s in seeds]) for m in models]
    probe.bar(models, [m for m, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd in stats],
              color=[COLOURS[m] for m in models])
    probe.tick_params(axis="x", rotation=30)
    probe.set(ylabel="mean linear-probe acc1 (%)",
              title="Linear probe on frozen features (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
