"""The embedded demo's studies (`python demo.py --study efficiency | sources`): their data is what
it claims and in the real formats, and the studies run end to end.

What is proved:
- odd-one-out trials are judged as THINGS' participants judged them (the odd one is the item outside
  the most alike pair: an obvious trial gets the obvious answer), by the demo's own observers, and
  carry their structure (the observers' ideal distance agrees with the recorded odd one far above
  chance, pixel distance much less);
- the THINGS-format files are laid out as THINGS-data documents them (triplet_dataset/*.txt:
  three 0-based indices a line, the odd one last; unique_id.txt in index order, not alphabetical;
  one image per concept at images/<unique_id>.png) and read back with numpy as THINGS-data's users
  read them;
- the simulated areas are what their names claim: the early area's RDM follows pixel distance and
  barely the observers' distance, the late area's the other way round; each is square, symmetric,
  finite, zero on the diagonal, with one image per row listed in images.txt; the rank correlation
  that says so equals scipy's;
- the studies' data passes the readers a user's real data goes through (other_sources.open_splits,
  as train_triplet.py calls it): THINGS gives two rows per trial, the odd one always the farther
  side, over images/<unique_id>.png in unique_id order; the RDM reader's rows follow the written RDM
  (the side with the smaller dissimilarity is the closer one) over images.txt's images;
- every arm's stage-1 command (quick and full) is one train_triplet.py's typed config accepts, and
  trains on the data format, data, fraction or matched budget the arm names;
- `python demo.py --study efficiency --quick` and `--study sources --quick` run through the real
  scripts (on a subset of arms, one per code path, for CI's time): the fraction and the budget reach
  the trainer, summary.json holds every score of every arm run, results.md and the plot are written;
  a rerun retrains and rescores nothing; the report and the plot name every arm of each study.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from PIL import Image

import demo
from world import pipeline
from world import studies
from world import make_data as M
from stage1 import other_sources
from world import scenes

QUICK_STIMULI = dict(concepts=40, trials=(60, 30, 60), heldout=30)


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    M.make_study_data(root, seed=0, size=32, **QUICK_STIMULI)
    return root


def test_the_odd_one_out_is_the_item_outside_the_most_alike_pair():
    rng = __import__("random").Random(0)
    a = scenes.sample_scene(rng, n_objects=1, shape="star", colour="red")
    near = scenes.vary_scene(a, rng, 0)  # the same scene
    far = scenes.sample_scene(rng, n_objects=2, shape="circle", colour="blue")
    observer = {"weights": scenes.PERCEPTUAL_WEIGHTS, "noise": 0.0}
    for order, odd in (((a, near, far), 2), ((far, a, near), 0), ((a, far, near), 1)):
        assert scenes.odd_one_out(list(order), observer, rng) == odd


def test_trials_carry_the_observers_structure():
    ids, drawn = scenes.demo_concepts(200, seed=0)
    trials = scenes.demo_odd_one_out(drawn, {"testset1": 800}, seed=0)["testset1"]
    pixels = [np.asarray(scenes.render_scene(s, 32), dtype=float) for s in drawn]

    def agreement(distance):
        hits = 0
        for i, j, odd in trials:  # the odd one is written last: i and j are the pair judged alike
            pairs = {odd: distance(i, j), i: distance(j, odd), j: distance(i, odd)}
            hits += min(pairs, key=pairs.get) == odd
        return hits / len(trials)

    ideal = agreement(lambda x, y: scenes.perceptual_distance(drawn[x], drawn[y]))
    pixel = agreement(lambda x, y: np.linalg.norm(pixels[x] - pixels[y]))
    assert ideal > 0.7 and pixel < ideal - 0.2, (ideal, pixel)


@pytest.mark.slow
def test_things_files_are_laid_out_as_things_data_documents(stimuli):
    root = stimuli / "stimuli"
    unique_ids = (root / "unique_id.txt").read_text().split("\n")[:-1]
    assert len(unique_ids) == len(set(unique_ids)) == QUICK_STIMULI["concepts"]
    assert unique_ids != sorted(unique_ids)  # index order is not alphabetical, as in THINGS-data
    for unique_id in unique_ids:
        assert Image.open(root / "images" / f"{unique_id}.png").size == (32, 32)
    for split, count in zip(M.THINGS_SPLITS, QUICK_STIMULI["trials"]):
        # Read as THINGS-data's users read it.
        trials = np.loadtxt(root / "triplet_dataset" / f"{split}.txt", dtype=int)
        assert trials.shape == (count, 3) and trials.min() >= 0 and trials.max() < len(unique_ids)
        assert all(len(set(t)) == 3 for t in trials.tolist())
    # The odd one is last: the world's judgment, replayed with the same seed, says so.
    _, drawn = scenes.demo_concepts(QUICK_STIMULI["concepts"], seed=0)
    replayed = scenes.demo_odd_one_out(drawn, dict(zip(M.THINGS_SPLITS, QUICK_STIMULI["trials"])),
                                       seed=0)
    assert (np.loadtxt(root / "triplet_dataset" / "trainset.txt", dtype=int).tolist()
            == [list(t) for t in replayed["trainset"]])


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["stimuli", "stimuli_test"])
def test_areas_are_what_their_names_claim(stimuli, folder):
    root = stimuli / folder
    paths = (root / "images.txt").read_text().split("\n")[:-1]
    drawn = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    images = [Image.open(root / p) for p in paths]
    pixel, observers = M.early_area_distance(images), M.late_area_distance(drawn)
    rdms = {area: np.load(root / "rdms" / f"{area}.npy") for area in M.AREAS}
    upper = np.triu_indices(len(paths), 1)
    rho = lambda a, b: scipy.stats.spearmanr(a[upper], b[upper])[0]
    for area, rdm in rdms.items():
        assert rdm.shape == (len(paths), len(paths)) and np.isfinite(rdm).all()
        assert np.array_equal(rdm, rdm.T) and not rdm.diagonal().any()
        assert M.rdm_spearman(rdm, pixel) == pytest.approx(rho(rdm, pixel), abs=1e-9)
    assert rho(rdms["early"], pixel) > 0.7 and rho(rdms["early"], observers) < 0.4
    assert rho(rdms["late"], observers) > 0.7 and rho(rdms["late"], pixel) < 0.4
    # Noise was measured in: neither area is its noise-free distance.
    assert rho(rdms["early"], pixel) < 0.99 and rho(rdms["late"], observers) < 0.99
    areas = json.loads((root / "areas.json").read_text())
    assert (areas["early"]["spearman_with_pixel_distance"]
            == pytest.approx(rho(rdms["early"], pixel)))


# The end-to-end runs take a subset of each study's arms, one per code path (CI's time: every arm
# would double it): efficiency a fraction and the baseline; sources a THINGS source, an RDM source
# and the baseline. Every arm's stage-1 command is checked without running it
# (test_every_arm_trains_on_the_source_it_names), and the report and plot with every arm on
# synthetic numbers (test_report_and_plot_name_every_arm).
RUN_ARMS = {"efficiency": ("10%", "baseline"), "sources": ("odd-one-out", "late", "baseline")}


@pytest.fixture(scope="module")
def quick_studies(tmp_path_factory):
    """Both studies' --quick runs on one shared data folder, as a user runs them (on RUN_ARMS)."""
    root = tmp_path_factory.mktemp("study_runs")
    out, data_root = root / "runs", root / "data"
    with pytest.MonkeyPatch.context() as patch:
        for study in studies.STUDIES:
            patch.setitem(studies.ARMS, study, {a: studies.ARMS[study][a] for a in RUN_ARMS[study]})
            demo.main(["--study", study, "--quick", "--out", str(out), "--data", str(data_root)])
    return out / "studies", data_root


@pytest.mark.slow
def test_study_data_passes_the_readers_users_run(quick_studies):
    _, data_root = quick_studies
    stimuli = data_root / "stimuli"
    unique_ids = (stimuli / "unique_id.txt").read_text().split()
    things = other_sources.open_splits("things", stimuli, 32)
    trials = np.loadtxt(stimuli / "triplet_dataset" / "trainset.txt", dtype=int)
    train = things["train"]
    assert [Path(p).name for p in train.images] == [f"{u}.png" for u in unique_ids]
    assert len(train) == 2 * len(trials)
    rows, p = np.asarray(train.rows), np.asarray(train.p)
    i, j, odd = trials.T
    assert (np.array_equal(rows[0::2], np.stack([i, j, odd], 1))
            and np.array_equal(rows[1::2], np.stack([j, i, odd], 1)))
    assert not p.any()  # the odd one (right) is never the closer side
    for area in M.AREAS:
        rdm = np.load(stimuli / "rdms" / f"{area}.npy")
        split = other_sources.open_splits("rdm", stimuli, 32, rdm=area)["train"]
        # The images in images.txt's order.
        assert [Path(x).name for x in split.images] == [f"{u}.png" for u in unique_ids]
        rows, p = np.asarray(split.rows), np.asarray(split.p)
        ref, left, right = rows.T
        assert len(rows) >= studies.STUDY_PLANS["quick"]["budget"]
        assert np.array_equal(p == 1, rdm[ref, right] < rdm[ref, left])


@pytest.mark.parametrize("study", studies.STUDIES)
@pytest.mark.parametrize("size", ["quick", "full"])
def test_every_arm_trains_on_the_source_it_names(study, size, tmp_path):
    """Each arm's stage-1 command, as train_triplet.py parses it (its typed config: an unknown key
    or a bad value is an error): the data format, data and amount each arm claims."""
    import cli
    import train_triplet
    data_root = tmp_path / "data"
    budget = studies.STUDY_PLANS[size]["budget"]
    for arm in studies.ARMS[study]:
        command = studies.stage1_command(study, arm, 0, pipeline.PLANS[size],
                                         studies.STUDY_PLANS[size], data_root)
        if arm == "baseline":
            assert command is None
            continue
        assert command[:2] == ["train_triplet.py", "configs/demo_nights.yaml"]
        config = cli.load_config(train_triplet.Config, command[1:])
        got = (config.data_format, Path(config.data_root).name, config.rdm, config.shuffle_labels)
        if study == "efficiency":
            assert got == ("nights", "nights", "", False) and config.max_triplets == 0
            assert config.triplet_fraction == studies.FRACTIONS[arm]
        else:
            expected = {"votes": ("nights", "nights", "", False),
                        "shuffled": ("nights", "nights", "", True),
                        "odd-one-out": ("things", "stimuli", "", False),
                        "early": ("rdm", "stimuli", "early", False),
                        "late": ("rdm", "stimuli", "late", False)}[arm]
            assert (got == expected and config.max_triplets == budget
                    and config.triplet_fraction == 1.0)


@pytest.mark.parametrize("study", studies.STUDIES)
def test_report_and_plot_name_every_arm(study, tmp_path):
    tasks = ("demo_shape", "demo_retrieval")
    rng = np.random.default_rng(0)
    per_seed = {seed: {
        "zero_shot": {a: {t: rng.random() for t in tasks} for a in studies.ARMS[study]},
        "final": {a: {k: rng.random() for k in studies.ALIGNMENT} for a in studies.ARMS[study]},
        "stage1": {a: {k: rng.random() for k in studies.ALIGNMENT} for a in studies.ARMS[study]},
        "n_triplets": {a: 10 * (k + 1) for k, a in enumerate(studies.ARMS[study])},
    } for seed in (0, 1, 2)}
    areas = {a: {"spearman_with_pixel_distance": 0.5, "spearman_with_observer_distance": 0.5}
             for a in M.AREAS}
    table = studies.report(study, per_seed, areas)
    assert "| task | " + " | ".join(studies.ARMS[study]) + " |" in table
    for arm in studies.ARMS[study]:
        assert f"\n| {arm} | " in table  # a row of the final towers' alignment table
        if arm != "baseline":
            assert f"{arm} - baseline" in table and f"- {arm} vs baseline:" in table
    png = studies.plot(study, per_seed, tmp_path / f"{study}.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _summary(quick_studies, study):
    out, _ = quick_studies
    return (json.loads((out / study / "summary.json").read_text()),
            (out / study / "results.md").read_text())


def _stage1_config(quick_studies, study, folder):
    out, _ = quick_studies
    header = json.loads(
        (out / study / "seed0" / f"stage1_{folder}" / "metrics.jsonl").read_text().splitlines()[0])
    return header["config"]


@pytest.mark.slow
@pytest.mark.parametrize("study", studies.STUDIES)
def test_study_runs_and_reports_its_arms(quick_studies, study):
    summary, results = _summary(quick_studies, study)
    arms = list(RUN_ARMS[study])
    assert summary["arms"] == arms and summary["seeds"] == [0]
    assert "| task | " + " | ".join(arms) + " |" in results
    seed = summary["per_seed"]["0"]
    records = json.loads((quick_studies[0] / study / "seed0" / "results.json").read_text())
    assert set(seed["zero_shot"]) == set(arms) and all(len(seed["zero_shot"][a]) == 7 for a in arms)
    assert len(records) == 7 * len(arms)
    for tower in ("final", "stage1"):  # stage1's baseline: the untrained network
        assert set(seed[tower]) == set(arms)
        for scores in seed[tower].values():
            assert 0 <= scores["2afc"] <= 1 and 0 <= scores["odd_one_out"] <= 1
            assert -1 <= scores["rsa_early"] <= 1 and -1 <= scores["rsa_late"] <= 1
    assert (quick_studies[0] / study / f"{study}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_fractions_and_budgets_reach_the_trainer(quick_studies):
    from stage1 import triplets
    summary, _ = _summary(quick_studies, "efficiency")
    whole = len(other_sources.open_splits("nights", quick_studies[1] / "nights", 32)["train"])
    assert summary["per_seed"]["0"]["n_triplets"] == {
        "10%": len(triplets.nested_subset(whole, 0, 0.1, 0)), "baseline": 0}
    assert _stage1_config(quick_studies, "efficiency", "pct10")["triplet_fraction"] == 0.1
    summary, results = _summary(quick_studies, "sources")
    budget = studies.STUDY_PLANS["quick"]["budget"]
    assert (summary["per_seed"]["0"]["n_triplets"]
            == {"odd-one-out": budget, "late": budget, "baseline": 0})
    assert (_stage1_config(quick_studies, "sources", "late")["data_format"],
            _stage1_config(quick_studies, "sources", "late")["rdm"]) == ("rdm", "late")
    assert "| early | " in results and "| late | " in results  # what each area is


@pytest.mark.slow
def test_a_rerun_reuses_every_run(quick_studies, capsys):
    out, data_root = quick_studies
    before = {p: p.stat().st_mtime for p in (out / "sources" / "seed0").rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(studies.ARMS, "sources",
                      {a: studies.ARMS["sources"][a] for a in RUN_ARMS["sources"]})
        demo.main(["--study", "sources", "--quick", "--out", str(out.parent),
                   "--data", str(data_root)])
    steps = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("== sources, seed 0")]
    # 2 stage 1s, 3 stage 2s, the evaluation and the alignment scores, each reused.
    assert len(steps) == 2 + 3 + 2 and all("finished earlier" in line for line in steps)
    after = {p: p.stat().st_mtime for p in (out / "sources" / "seed0").rglob("*") if p.is_file()}
    assert after == before


def test_a_script_step_runs_as_python_runs_it(tmp_path):
    """A step that is a script runs in a process forked from the step server (torch imported once):
    as `python SCRIPT ARGS` would, as __main__ with its argv, in the kit's folder, the kit first on
    sys.path; its exit code comes back, and its CPU time counts in cpu_seconds."""
    script = tmp_path / "step.py"
    out = tmp_path / "seen.json"
    script.write_text(
        "import json, os, sys, time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        f"json.dump([__name__, sys.argv, os.getcwd(), sys.path[0]], open({str(out)!r}, 'w'))\n"
        "sys.exit(int(sys.argv[1]))\n")
    before = pipeline.cpu_seconds()
    assert pipeline.run_script([str(script), "3"]) == 3
    name, argv, cwd, first = json.loads(out.read_text())
    assert (name, argv, cwd, first) == ("__main__", [str(script), "3"], str(pipeline.ROOT),
                                        str(pipeline.ROOT))
    assert pipeline.cpu_seconds() - before >= 0.3
    assert pipeline.run_script([str(script), "0"]) == 0


def test_off_linux_a_script_step_is_a_plain_subprocess(tmp_path, monkeypatch):
    """Where forking after importing torch is not safe (macOS), steps run as `python SCRIPT ARGS`
    subprocesses: the same script, argv, folder and exit code, and no step server."""
    monkeypatch.setattr(pipeline, "STEP_SERVER", False)
    started = []
    monkeypatch.setattr(pipeline, "_server", lambda: started.append(1))
    script = tmp_path / "step.py"
    out = tmp_path / "seen.json"
    script.write_text("import json, os, sys\n"
                      f"json.dump([__name__, sys.argv, os.getcwd()], open({str(out)!r}, 'w'))\n"
                      "sys.exit(int(sys.argv[1]))\n")
    pipeline.start_step_server()
    assert pipeline.run_script([str(script), "4"]) == 4 and not started
    assert json.loads(out.read_text()) == ["__main__", [str(script), "4"], str(pipeline.ROOT)]


def test_a_step_that_exits_0_unfinished_stops_the_demo(tmp_path):
    """A trainer stopped by SIGTERM saves a checkpoint and exits 0 before it has finished: the demo
    and the studies (pipeline.run_step) must stop there, not train the next stage from a
    half-trained tower."""
    with pytest.raises(SystemExit, match="stopped before it finished"):
        pipeline.run_step("a step", ["-c", "pass"], tmp_path / "summary.json")
    (tmp_path / "summary.json").write_text("{}")
    # Finished earlier: reused, in no time.
    assert pipeline.run_step("a step", ["-c", "pass"], tmp_path / "summary.json") == 0.0
