"""The embedded demo's studies (`python demo.py --study efficiency | sources`): their data is what it
claims and in the real formats, and the studies run end to end.

What is proved:
- odd-one-out trials are judged as THINGS' participants judged them (the odd one is the item outside
  the most alike pair: an obvious trial gets the obvious answer), by the demo's own observers, and
  carry their structure (the observers' ideal distance agrees with the recorded odd one far above
  chance, pixel distance much less);
- the THINGS-format files are laid out as THINGS-data documents them (triplet_dataset/*.txt: three
  0-based indices a line, the odd one last; unique_id.txt in index order, not alphabetical; one image
  per concept at images/<unique_id>.png) and read back with numpy as THINGS-data's users read them;
- the simulated areas are what their names claim: the early area's RDM follows pixel distance and
  barely the observers' distance, the late area's the other way round; each is square, symmetric,
  finite, zero on the diagonal, with one image per row listed in images.txt; the rank correlation
  that says so equals scipy's;
"""
import json

import numpy as np
import pytest
import scipy.stats
from PIL import Image

import make_data as M
import world

QUICK_STIMULI = dict(concepts=40, trials=(60, 30, 60), heldout=30)


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    M.make_study_data(root, seed=0, size=32, **QUICK_STIMULI)
    return root


def test_the_odd_one_out_is_the_item_outside_the_most_alike_pair():
    rng = __import__("random").Random(0)
    a = world.sample_scene(rng, n_objects=1, shape="star", colour="red")
    near = world.vary_scene(a, rng, 0)  # the same scene
    far = world.sample_scene(rng, n_objects=2, shape="circle", colour="blue")
    observer = {"weights": world.PERCEPTUAL_WEIGHTS, "noise": 0.0}
    for order, odd in (((a, near, far), 2), ((far, a, near), 0), ((a, far, near), 1)):
        assert world.odd_one_out(list(order), observer, rng) == odd


def test_trials_carry_the_observers_structure():
    ids, scenes = world.demo_concepts(200, seed=0)
    trials = world.demo_odd_one_out(scenes, {"testset1": 800}, seed=0)["testset1"]
    pixels = [np.asarray(world.render_scene(s, 32), dtype=float) for s in scenes]

    def agreement(distance):
        hits = 0
        for i, j, odd in trials:  # the odd one is written last: i and j are the pair judged alike
            pairs = {odd: distance(i, j), i: distance(j, odd), j: distance(i, odd)}
            hits += min(pairs, key=pairs.get) == odd
        return hits / len(trials)

    ideal = agreement(lambda x, y: world.perceptual_distance(scenes[x], scenes[y]))
    pixel = agreement(lambda x, y: np.linalg.norm(pixels[x] - pixels[y]))
    assert ideal > 0.7 and pixel < ideal - 0.2, (ideal, pixel)


def test_things_files_are_laid_out_as_things_data_documents(stimuli):
    root = stimuli / "stimuli"
    unique_ids = (root / "unique_id.txt").read_text().split("\n")[:-1]
    assert len(unique_ids) == len(set(unique_ids)) == QUICK_STIMULI["concepts"]
    assert unique_ids != sorted(unique_ids)  # index order is not alphabetical, as in THINGS-data
    for unique_id in unique_ids:
        assert Image.open(root / "images" / f"{unique_id}.png").size == (32, 32)
    for split, count in zip(M.THINGS_SPLITS, QUICK_STIMULI["trials"]):
        trials = np.loadtxt(root / "triplet_dataset" / f"{split}.txt", dtype=int)  # as THINGS-data's users read it
        assert trials.shape == (count, 3) and trials.min() >= 0 and trials.max() < len(unique_ids)
        assert all(len(set(t)) == 3 for t in trials.tolist())
    # The odd one is last: the world's judgment, replayed with the same seed, says so.
    _, scenes = world.demo_concepts(QUICK_STIMULI["concepts"], seed=0)
    replayed = world.demo_odd_one_out(scenes, dict(zip(M.THINGS_SPLITS, QUICK_STIMULI["trials"])), seed=0)
    assert np.loadtxt(root / "triplet_dataset" / "trainset.txt", dtype=int).tolist() == [list(t) for t in replayed["trainset"]]


@pytest.mark.parametrize("folder", ["stimuli", "stimuli_test"])
def test_areas_are_what_their_names_claim(stimuli, folder):
    root = stimuli / folder
    paths = (root / "images.txt").read_text().split("\n")[:-1]
    scenes = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    images = [Image.open(root / p) for p in paths]
    pixel, observers = M.early_area_distance(images), M.late_area_distance(scenes)
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
    assert areas["early"]["spearman_with_pixel_distance"] == pytest.approx(rho(rdms["early"], pixel))
