"""The embedded demo: its generated world has the perceptual structure it claims, its data passes
the same loaders and format checks as real data, and `python demo.py --quick` runs the whole
experiment.

What is proved:
- the world is a pure function of the seed (same seed, same pixels, votes and captions);
- the simulated observers' votes follow NIGHTS' adaptive protocol, and they carry structure that
  pixel distance misses: the observers' own ideal distance scores far above chance on 2AFC, raw
  pixel distance barely above it, so stage 1 has something to learn that is not in the pixels' L2;
- captions only ever name attributes the scene has, and leave some out;
- renders put the object's colour where the object is and the background's elsewhere;
- the MNIST asset holds 500 real digits, 50 per class, white on black;
- make_demo_data writes data that the kit's readers accept with the expected counts
  (NightsDataset, the shard reader cross-checked against the webdataset library, BenchmarkTask),
  and reuses it;
- demo.py --quick runs every stage through the real scripts and leaves real results: stage-1
  summaries and checkpoints (and the shuffled control), the four stage-2 arms (pi, baseline and
  shuffled differ only in their vision initialisation; posthoc is the baseline's CLIP with only
  the vision qkv weights and biases changed), evaluation records for every arm and task, the probes,
  summary.json's schema, the tables and the plots; a rerun retrains nothing;
- the demo tasks have CLIP_benchmark's train split for the linear probe, and the probe set carries
  the observers' distance of its scenes;
- the real-scale control configs are nights.yaml's recipe with only the control changed.
"""
import csv
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import data
import demo
from world import pipeline, report
from world import make_data as M
from stage1 import nights
from stage2 import formats
from world import scenes
from checkpoints import load_checkpoint


def _two_afc(d0, d1, p):
    """The 2AFC score by hand (independent of stage1/objective.py), as LPIPS's score_2afc_dataset
    computes it (github richzhang/PerceptualSimilarity, lpips/trainer.py), with NIGHTS' share p in
    place of its judgments."""
    return (d0 < d1) * (1 - p) + (d1 < d0) * p + (d0 == d1) * 0.5


def test_world_is_a_function_of_the_seed():
    a = list(scenes.demo_triplets(20, seed=3, size=32))
    b = list(scenes.demo_triplets(20, seed=3, size=32))
    c = list(scenes.demo_triplets(20, seed=4, size=32))
    same = lambda x, y: (all(np.array_equal(np.asarray(x[k]), np.asarray(y[k]))
                             for k in ("ref", "left", "right"))
                         and (x["left_vote"], x["right_vote"], x["split"], x["prompt"])
                             == (y["left_vote"], y["right_vote"], y["split"], y["prompt"]))
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))
    assert ([t for _, t in scenes.demo_pairs(10, 1, 32)]
            == [t for _, t in scenes.demo_pairs(10, 1, 32)])


def test_votes_follow_the_adaptive_protocol():
    rows = list(scenes.demo_triplets(300, seed=0, size=32))
    votes = np.array([r["left_vote"] + r["right_vote"] for r in rows])
    assert set(votes) <= {3, 6, 7, 8, 9, 10}
    for r, v in zip(rows, votes):
        if v == 3:  # three observers disagreed, so no more were asked
            assert min(r["left_vote"], r["right_vote"]) >= 1
    assert 0.1 < (votes == 3).mean() < 0.5  # min_votes=6 has rows to drop
    dissent = [min(r["left_vote"], r["right_vote"]) > 0 for r, v in zip(rows, votes) if v >= 6]
    assert 0 < np.mean(dissent) < 0.5  # kept rows are mostly, not all, unanimous
    splits = [r["split"] for r in rows]
    assert {"train", "val", "test"} == set(splits) and splits.count("train") > 0.7 * len(rows)
    assert 0.3 < np.mean([r["is_imagenet"] for r in rows]) < 0.7


def test_observers_see_structure_that_pixel_distance_misses():
    rng = random.Random(0)
    observers = scenes.make_observers(rng)
    ideal, pixel = [], []
    for _ in range(400):
        ref = scenes.sample_scene(rng)
        left, right = (scenes.vary_scene(ref, rng, rng.randint(1, 3)),
                       scenes.vary_scene(ref, rng, rng.randint(1, 3)))
        left_vote, right_vote = scenes.observer_votes(ref, left, right, observers, rng)
        if left_vote + right_vote < 6:
            continue
        p = right_vote / (left_vote + right_vote)
        ideal.append(_two_afc(scenes.perceptual_distance(ref, left),
                              scenes.perceptual_distance(ref, right), p))
        images = [np.asarray(scenes.render_scene(s, 32), dtype=np.float64)
                  for s in (ref, left, right)]
        pixel.append(_two_afc(((images[0] - images[1]) ** 2).mean(),
                              ((images[0] - images[2]) ** 2).mean(), p))
    assert np.mean(ideal) > 0.85, np.mean(ideal)
    assert np.mean(pixel) < 0.7, np.mean(pixel)


def test_distance_weights_identity_over_placement():
    obj = dict(shape="star", colour="red", size="small", position="top left", texture="plain",
               jitter=[0, 0, 0])
    ref = {"background": "grey", "objects": [obj]}
    moved = {"background": "grey", "objects": [dict(obj, position="bottom right", size="large")]}
    reshaped = {"background": "grey", "objects": [dict(obj, shape="circle")]}
    assert scenes.perceptual_distance(ref, moved) < scenes.perceptual_distance(ref, reshaped)
    assert scenes.perceptual_distance(ref, ref) == 0
    two = {"background": "grey", "objects": [obj, dict(obj, position="center", colour="blue")]}
    swapped = {"background": "grey", "objects": two["objects"][::-1]}
    # Objects are matched, not compared in list order.
    assert scenes.perceptual_distance(two, swapped) == 0
    assert (scenes.perceptual_distance(ref, two)
            == pytest.approx(scenes.PERCEPTUAL_WEIGHTS["object"]))


def test_captions_name_only_what_the_scene_has():
    rng = random.Random(1)
    mentioned = {"colour": 0, "size": 0}
    for _ in range(300):
        scene = scenes.sample_scene(rng, n_objects=1)
        obj = scene["objects"][0]
        text = scenes.caption(scene, rng)
        words = set(re.findall(r"[a-z]+", text))
        assert words & set(scenes.COLOURS) <= {obj["colour"], scene["background"]}, text
        assert words & set(scenes.SHAPES) <= {obj["shape"]}, text
        assert words & set(scenes.SIZES) <= {obj["size"]}, text
        if obj["shape"] in scenes.DIGITS and re.search(r"\d", text):
            assert re.findall(r"\d", text) == [obj["shape"]], text
        mentioned["colour"] += obj["colour"] in words
        mentioned["size"] += obj["size"] in words
    # Colour and size are named in some captions, not in all.
    assert 100 < mentioned["colour"] < 300 and 50 < mentioned["size"] < 250


def test_render_puts_colours_where_they_belong():
    obj = dict(shape="square", colour="red", size="large", position="center", texture="plain",
               jitter=[0, 0, 0])
    image = (np.asarray(scenes.render_scene({"background": "teal", "objects": [obj]}, 64))
             .astype(int))
    assert np.abs(image[32, 32] - scenes.COLOURS["red"]).max() <= 2
    assert np.abs(image[2, 2] - scenes.BACKGROUNDS["teal"]).max() <= 2
    striped = np.asarray(scenes.render_scene({"background": "grey",
                                              "objects": [dict(obj, texture="striped")]}, 64))
    assert len(np.unique(striped[24:40, 24:40].reshape(-1, 3), axis=0)) > 2  # two paints, not one


def test_mnist_asset_is_500_real_digits():
    digits = scenes._mnist_digits()
    assert len(digits) == 500 and np.bincount([d for _, d in digits]).tolist() == [50] * 10
    pixels = np.stack([np.asarray(im.convert("L")) for im, _ in digits])
    assert pixels.shape == (500, 28, 28)
    assert pixels[:, :3, :].mean() < 2 and pixels.mean() > 20  # white strokes on a black border
    assert len({p.tobytes() for p in pixels}) == 500


# ---- the demo's data through the kit's readers, and demo.py end to end ---------------------------

QUICK = pipeline.PLANS["quick"]["data"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `demo.py --quick` run shared by the tests below (~1-2 minutes on 2 cores)."""
    root = tmp_path_factory.mktemp("demo")
    out, data_root = root / "runs", root / "data"
    demo.main(["--quick", "--out", str(out), "--data", str(data_root)])
    return out, data_root


@pytest.mark.slow
def test_demo_data_passes_the_real_readers(quick_run):
    _, root = quick_run
    # NIGHTS: the loader keeps exactly the rows with >= 6 votes of each split, as data.csv says.
    with open(root / "nights" / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == QUICK["triplets"]
    for split in ("train", "val", "test"):
        dataset = nights.NightsDataset(root / "nights", split, 32, min_votes=6)
        in_split = [r for r in rows if r["split"] == split]
        kept = [r for r in in_split if int(r["votes"]) >= 6]
        assert dataset.counts["in_split"] == len(in_split) and len(dataset) == len(kept) > 0
        ref, left, right, p = dataset[0]
        assert ref.shape == left.shape == right.shape == (3, 32, 32)
        # The real convention: vote shares in left_vote / right_vote, the observer count in votes.
        assert float(kept[0]["left_vote"]) + float(kept[0]["right_vote"]) == pytest.approx(1.0)
        assert p == pytest.approx(float(kept[0]["right_vote"]))
    imagenet = nights.NightsDataset(root / "nights", "test_imagenet", 32)
    other = nights.NightsDataset(root / "nights", "test_no_imagenet", 32)
    assert len(imagenet) > 0 and len(other) > 0
    assert len(imagenet) + len(other) == len(nights.NightsDataset(root / "nights", "test", 32))

    # Shards: the kit's reader and the webdataset library see the same samples, equal to the stream.
    import webdataset as wds

    shard_paths = formats.expand_spec(pipeline.shard_spec(root / "shards"))
    ours = [s for unit in formats.list_units(shard_paths, progress=False)
            for s in formats.read_unit(unit)]
    theirs = list(wds.WebDataset(shard_paths, shardshuffle=False))
    expected = list(scenes.demo_pairs(QUICK["pairs"], 0, QUICK["size"]))
    assert [s["key"] for s in ours] == [s["__key__"] for s in theirs] == [k for k, _ in expected]
    assert ([s["text"].encode() for s in ours] == [s["txt"] for s in theirs]
            == [f["txt"].encode() for _, f in expected])
    assert ours[0]["image"] == expected[0][1]["png"]
    assert (json.loads((root / "shards" / "sizes.json").read_text())
            == {Path(p).name: len(ours) for p in shard_paths})

    # Zero-shot tasks: every listed task opens as a CLIP_benchmark folder with the expected size.
    names = (root / "tasks" / "tasks.txt").read_text().split()
    assert names == ["demo_shape", "demo_colour", "demo_size", "demo_position", "demo_count",
                     "demo_retrieval", "demo_mnist"]
    sizes = {"demo_shape": 8, "demo_colour": 10, "demo_size": 2, "demo_position": 9,
             "demo_count": 2}
    for name in names:
        task = data.BenchmarkTask(root / "tasks" / f"wds_{name}", data.image_transform(32, "eval"))
        if name in sizes:
            assert task.task_type == "classification" and len(task.classnames) == sizes[name]
            assert len(task) == sizes[name] * QUICK["per_class"]
        elif name == "demo_retrieval":
            assert task.task_type == "retrieval" and len(task) == QUICK["retrieval"]
            assert all(len(task[i][1]) == 5 for i in range(3))
        else:
            assert task.classnames == list("0123456789") and len(task) == 500
    # The linear probe's train split (CLIP_benchmark's layout <task>/train/): the generated
    # classification tasks have one of the same size as their test split, with other scenes;
    # retrieval and MNIST none.
    for name in names:
        folder = root / "tasks" / f"wds_{name}"
        assert (folder / "train" / "nshards.txt").exists() == (name in sizes)
        if name in sizes:
            train = data.BenchmarkTask(folder, None, split="train")
            test = data.BenchmarkTask(folder, None)
            assert len(train) == len(test) and train.classnames == test.classnames
            assert (sorted(train[i][1] for i in range(len(train)))
                    == sorted(test[i][1] for i in range(len(test))))
            assert train[0][0].tobytes() != test[0][0].tobytes()
    # The probe set: QUICK["probe"] images, their scenes, and the observers' distance between them.
    drawn = [json.loads(line)
             for line in (root / "probe" / "scenes.jsonl").read_text().splitlines()]
    reference = np.load(root / "probe" / "reference_distance.npy")
    assert (len(drawn) == len(list((root / "probe").glob("*.png"))) == QUICK["probe"]
            == len(reference))
    assert reference[0, 1] == pytest.approx(scenes.perceptual_distance(drawn[0], drawn[1]))
    assert (np.asarray(Image.open(root / "probe" / "00003.png").convert("RGB")).tobytes()
            == np.asarray(scenes.render_scene(drawn[3], QUICK["size"])).tobytes())


@pytest.mark.slow
def test_demo_data_is_reused(quick_run, capsys):
    _, root = quick_run
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    M.make_demo_data(root, seed=0, **QUICK)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    assert capsys.readouterr().out.count("reused") == 4


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports(quick_run):
    out, data_root = quick_run
    seed = out / "seed0"
    # Stage 1 and its control: summaries with 2AFC on every split, loadable checkpoints of the tiny
    # model.
    for name, shuffled in (("stage1", False), ("stage1_shuffled", True)):
        summary = json.loads((seed / name / "summary.json").read_text())
        assert (set(summary["2afc"]) >= {"train", "val", "test"}
                and all(0 <= v <= 1 for v in summary["2afc"].values()))
        header = json.loads((seed / name / "metrics.jsonl").read_text().splitlines()[0])
        assert (header["config"]["shuffle_labels"] is shuffled
                and header["config"]["model"] == "tiny")
        assert load_checkpoint(seed / name / "ckpt.pt").config.image_size == 32
    # Stage 2: three runs of the same length, same seed and data, differing only in the vision init.
    configs = {r: json.loads((seed / r / "metrics.jsonl").read_text().splitlines()[0])["config"]
               for r in ("pi", "baseline", "shuffled")}
    assert (configs["pi"]["init"] == str(seed / "stage1" / "ckpt.pt")
            and configs["baseline"]["init"] == "")
    assert configs["shuffled"]["init"] == str(seed / "stage1_shuffled" / "ckpt.pt")
    same = lambda c: {k: v for k, v in c.items() if k not in ("init", "out_dir")}
    assert same(configs["pi"]) == same(configs["baseline"]) == same(configs["shuffled"])
    for run in ("pi", "baseline", "shuffled"):
        summary = json.loads((seed / run / "summary.json").read_text())
        assert summary["steps"] == 6 and 0 <= summary["metrics"]["nights/2afc"] <= 1
        evals = [json.loads(l) for l in (seed / run / "metrics.jsonl").read_text().splitlines()[1:]]
        assert [e["step"] for e in evals if "nights/2afc" in e] == [6]
    pi, baseline = (load_checkpoint(seed / "pi" / "ckpt.pt"),
                    load_checkpoint(seed / "baseline" / "ckpt.pt"))
    assert not torch.equal(pi.visual.conv1.weight, baseline.visual.conv1.weight)
    # Post-hoc: the baseline's final CLIP, tuned on the same triplets with only the vision qkv
    # (weights and biases) moving.
    header = json.loads((seed / "posthoc" / "metrics.jsonl").read_text().splitlines()[0])["config"]
    assert header["posthoc"] is True and header["init"] == str(seed / "baseline" / "ckpt.pt")
    assert header["data_root"] == str(data_root / "nights")
    tuned, start = (torch.load(seed / r / "ckpt.pt", weights_only=True)["state_dict"]
                    for r in ("posthoc", "baseline"))
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    qkv = {k for k in start if k.startswith("visual.transformer.resblocks.")
           and k.endswith(("attn.in_proj_weight", "attn.in_proj_bias"))}
    assert changed == qkv and len(qkv) == 4
    # Evaluation: one record per (arm, task), and the demo's summary holds the same main metrics.
    records = json.loads((seed / "results.json").read_text())
    tasks = (data_root / "tasks" / "tasks.txt").read_text().split()
    assert (sorted((r["model"], r["dataset"]) for r in records)
            == sorted((m, t) for m in report.ARMS for t in tasks))
    summary = json.loads((out / "summary.json").read_text())
    per_seed = summary["per_seed"]["0"]
    for r in records:
        value = per_seed["zero_shot"][r["model"]][r["dataset"]]
        assert value == pytest.approx(next(v for k, v in r["metrics"].items()
                                           if k in ("acc1", "mean_recall@1")))
    # summary.json: today's schema, extended to four arms and the probes.
    assert (set(per_seed["zero_shot"]) == set(report.ARMS)
            and all(set(per_seed["zero_shot"][a]) == set(tasks) for a in report.ARMS))
    assert (set(per_seed["2afc"]) == set(report.PROBED)
            and all(0 <= per_seed["2afc"][m]["test"] <= 1 for m in report.PROBED))
    stage2 = {r: json.loads((seed / r / "summary.json").read_text())["metrics"]["nights/2afc"]
              for r in ("pi", "baseline", "shuffled")}
    assert {r: per_seed["2afc"][r]["test"] for r in stage2} == stage2
    assert (per_seed["2afc"]["posthoc"]
            == json.loads((seed / "posthoc" / "summary.json").read_text())["2afc"])
    probed = json.loads((seed / "probes.json").read_text())
    assert probed["checkpoints"] == [str(seed / m / "ckpt.pt") for m in report.PROBED]
    # 21 CKA pairs: every pair of the 7 towers.
    assert per_seed["probes"]["cka"] == probed["cka"] and len(probed["cka"]) == 21
    assert per_seed["probes"]["rsa"] == probed["rsa"] and set(probed["rsa"]) == set(report.PROBED)
    # The quick plan's linear-probe tasks (the full demo's: every task with a train split).
    linear = pipeline.PLANS["quick"]["linear_probe"].split(",")
    assert ({m: set(v) for m, v in per_seed["probes"]["linear_probe"].items()}
            == {m: set(linear) for m in report.PROBED})
    assert (per_seed["probes"]["linear_probe"]["pi"]["demo_size"]
            == probed["linear_probe"]["pi"]["demo_size"]["lp_acc1"])
    assert per_seed["probes"]["n_images"] == QUICK["probe"]
    table = (out / "results.md").read_text()
    assert (all(f"| {t} |" in table for t in tasks) and "Verdict:" in table
            and "shuffled votes" in table)
    assert all(f"PI - {a}" in table and f"PI vs {a}:" in table
               for a in ("baseline", "shuffled", "posthoc"))
    assert "observer-distance rho" in table and "Linear CKA" in table and "post-hoc" in table
    assert ((out / "demo.png").stat().st_size > 10_000
            and (out / "probes.png").stat().st_size > 10_000)
    # A rerun retrains and re-evaluates nothing.
    stamps = {p: p.stat().st_mtime_ns for p in seed.rglob("*") if p.is_file()}
    demo.main(["--quick", "--out", str(out), "--data", str(data_root)])
    assert {p: p.stat().st_mtime_ns for p in seed.rglob("*") if p.is_file()} == stamps


@pytest.mark.slow
def test_authors_arm_pair_runs_their_model_as_the_demo_sets_it(quick_run):
    """demo.py --authors: PI and baseline again with tiny-authors under AUTHORS_SETTINGS, differing
    only in the vision initialisation, and a table of PI's gain with either model whose numbers are
    the records'."""
    import math
    import statistics

    out, data_root = quick_run
    demo.main(["--quick", "--authors", "--out", str(out), "--data", str(data_root)])
    seed = out / "seed0"
    for run in ("stage1_authors", "pi_authors", "baseline_authors"):
        config = load_checkpoint(seed / run / "ckpt.pt").config
        assert ((config.text_attention, config.text_pooling, config.init)
                == ("bidirectional", "mean", "authors"))
        assert (config.context_length == 16
                and config.init_logit_scale == pytest.approx(math.log(1 / 0.07), abs=1e-4))
    configs = {r: json.loads((seed / r / "metrics.jsonl").read_text().splitlines()[0])["config"]
               for r in ("pi_authors", "baseline_authors")}
    assert (configs["pi_authors"]["init"] == str(seed / "stage1_authors" / "ckpt.pt")
            and configs["baseline_authors"]["init"] == "")
    same = lambda c: {k: v for k, v in c.items() if k not in ("init", "out_dir")}  # noqa: E731
    assert same(configs["pi_authors"]) == same(configs["baseline_authors"])
    assert configs["pi_authors"]["model_settings"] == demo.AUTHORS_SETTINGS
    average = {}
    for name in ("results.json", "results_authors.json"):
        for r in json.loads((seed / name).read_text()):
            value = next(v for k, v in r["metrics"].items() if k in ("acc1", "mean_recall@1"))
            average.setdefault(r["model"], []).append(100 * value)
    gain = lambda a, b: statistics.fmean(average[a]) - statistics.fmean(average[b])  # noqa: E731
    table = (out / "results_authors.md").read_text()
    assert f"| OpenAI's (tiny) | {gain('pi', 'baseline'):+.1f} |" in table
    assert (f"| the authors' (tiny-authors) | {gain('pi_authors', 'baseline_authors'):+.1f} |"
            in table)


def test_real_scale_control_configs_change_only_the_control(tmp_path):
    from cli import load_config
    from train_triplet import Config

    root = Path(demo.__file__).parent / "configs"
    read = lambda name: yaml.safe_load((root / name).read_text())
    nights, shuffled = read("nights.yaml"), read("nights_shuffled.yaml")
    recipe = lambda cfg: {k: v for k, v in cfg.items() if k not in ("shuffle_labels", "out_dir")}
    assert recipe(shuffled) == recipe(nights) and "shuffle_labels" not in nights
    assert shuffled["shuffle_labels"] is True and shuffled["out_dir"] != nights["out_dir"]
    # The controls' --init names a run not made yet in a fresh clone: stand one in.
    (tmp_path / "ckpt.pt").touch()
    for name in ("nights_shuffled.yaml", "nights_posthoc.yaml", "demo_posthoc.yaml"):
        # Every key is one train_triplet.py knows, of the right type.
        load_config(Config, [str(root / name), f"--init={tmp_path / 'ckpt.pt'}"])
    # The paper's post-hoc control: qkv only, Adam, the same hinge.
    for name in ("nights_posthoc.yaml", "demo_posthoc.yaml"):
        cfg = read(name)
        assert (cfg["posthoc"] is True and cfg["weight_decay"] == 0
                and cfg["margin"] == nights["margin"])


def test_render_many_gives_render_scenes_images_forked_or_not(monkeypatch):
    """The render pool (forked, Linux) and the one-by-one path (elsewhere: macOS is not fork-safe
    after torch is imported) give the images render_scene gives, in order."""
    rng = random.Random(5)
    drawn = [scenes.sample_scene(rng) for _ in range(130)]  # more than one chunk of 64
    expected = [np.asarray(scenes.render_scene(s, 32)).tobytes() for s in drawn]
    forked = [np.asarray(image).tobytes() for image in scenes.render_many(drawn, 32)]
    monkeypatch.setattr(scenes, "FORK_SAFE", False)
    monkeypatch.setattr(scenes.multiprocessing, "get_context", None)  # no pool may be made
    alone = [np.asarray(image).tobytes() for image in scenes.render_many(drawn, 32)]
    assert forked == expected == alone
