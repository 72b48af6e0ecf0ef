"""The embedded demo: its generated world has the perceptual structure it claims, and its data passes
the same loaders and format checks as real data.

What is proved:
- the world is a pure function of the seed (same seed, same pixels, votes and captions);
- the simulated observers' votes follow NIGHTS' adaptive protocol, and they carry structure that pixel
  distance misses: the observers' own ideal distance scores far above chance on 2AFC, raw pixel
  distance barely above it, so stage 1 has something to learn that is not in the pixels' L2;
- captions only ever name attributes the scene has, and leave some out;
- renders put the object's colour where the object is and the background's elsewhere;
- the MNIST asset holds 500 real digits, 50 per class, white on black.
"""
import random
import re

import numpy as np
import pytest

import make_data as M


def _two_afc(d0, d1, p):
    """REFERENCE.md section 3, by hand (independent of evaluate.py)."""
    return (d0 < d1) * (1 - p) + (d1 < d0) * p + (d0 == d1) * 0.5


def test_world_is_a_function_of_the_seed():
    a = list(M.demo_triplets(20, seed=3, size=32))
    b = list(M.demo_triplets(20, seed=3, size=32))
    c = list(M.demo_triplets(20, seed=4, size=32))
    same = lambda x, y: all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in ("ref", "left", "right")) and \
        (x["left_vote"], x["right_vote"], x["split"], x["prompt"]) == (y["left_vote"], y["right_vote"], y["split"], y["prompt"])
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))
    assert [t for _, t in M.demo_pairs(10, 1, 32)] == [t for _, t in M.demo_pairs(10, 1, 32)]


def test_votes_follow_the_adaptive_protocol():
    rows = list(M.demo_triplets(300, seed=0, size=32))
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
    observers = M.make_observers(rng)
    ideal, pixel = [], []
    for _ in range(400):
        ref = M.sample_scene(rng)
        left, right = M.vary_scene(ref, rng, rng.randint(1, 3)), M.vary_scene(ref, rng, rng.randint(1, 3))
        left_vote, right_vote = M.observer_votes(ref, left, right, observers, rng)
        if left_vote + right_vote < 6:
            continue
        p = right_vote / (left_vote + right_vote)
        ideal.append(_two_afc(M.perceptual_distance(ref, left), M.perceptual_distance(ref, right), p))
        images = [np.asarray(M.render_scene(s, 32), dtype=np.float64) for s in (ref, left, right)]
        pixel.append(_two_afc(((images[0] - images[1]) ** 2).mean(), ((images[0] - images[2]) ** 2).mean(), p))
    assert np.mean(ideal) > 0.85, np.mean(ideal)
    assert np.mean(pixel) < 0.7, np.mean(pixel)


def test_distance_weights_identity_over_placement():
    obj = dict(shape="star", colour="red", size="small", position="top left", texture="plain", jitter=[0, 0, 0])
    ref = {"background": "grey", "objects": [obj]}
    moved = {"background": "grey", "objects": [dict(obj, position="bottom right", size="large")]}
    reshaped = {"background": "grey", "objects": [dict(obj, shape="circle")]}
    assert M.perceptual_distance(ref, moved) < M.perceptual_distance(ref, reshaped)
    assert M.perceptual_distance(ref, ref) == 0
    two = {"background": "grey", "objects": [obj, dict(obj, position="center", colour="blue")]}
    swapped = {"background": "grey", "objects": two["objects"][::-1]}
    assert M.perceptual_distance(two, swapped) == 0  # objects are matched, not compared in list order
    assert M.perceptual_distance(ref, two) == pytest.approx(M.PERCEPTUAL_WEIGHTS["object"])


def test_captions_name_only_what_the_scene_has():
    rng = random.Random(1)
    mentioned = {"colour": 0, "size": 0}
    for _ in range(300):
        scene = M.sample_scene(rng, n_objects=1)
        obj = scene["objects"][0]
        text = M.caption(scene, rng)
        words = set(re.findall(r"[a-z]+", text))
        assert words & set(M.COLOURS) <= {obj["colour"], scene["background"]}, text
        assert words & set(M.SHAPES) <= {obj["shape"]}, text
        assert words & set(M.SIZES) <= {obj["size"]}, text
        if obj["shape"] in M.DIGITS and re.search(r"\d", text):
            assert re.findall(r"\d", text) == [obj["shape"]], text
        mentioned["colour"] += obj["colour"] in words
        mentioned["size"] += obj["size"] in words
    assert 100 < mentioned["colour"] < 300 and 50 < mentioned["size"] < 250  # some attributes omitted


def test_render_puts_colours_where_they_belong():
    obj = dict(shape="square", colour="red", size="large", position="center", texture="plain", jitter=[0, 0, 0])
    image = np.asarray(M.render_scene({"background": "teal", "objects": [obj]}, 64)).astype(int)
    assert np.abs(image[32, 32] - M.COLOURS["red"]).max() <= 2
    assert np.abs(image[2, 2] - M.BACKGROUNDS["teal"]).max() <= 2
    striped = np.asarray(M.render_scene({"background": "grey", "objects": [dict(obj, texture="striped")]}, 64))
    assert len(np.unique(striped[24:40, 24:40].reshape(-1, 3), axis=0)) > 2  # two paints, not one


def test_mnist_asset_is_500_real_digits():
    digits = M._mnist_digits()
    assert len(digits) == 500 and np.bincount([d for _, d in digits]).tolist() == [50] * 10
    pixels = np.stack([np.asarray(im.convert("L")) for im, _ in digits])
    assert pixels.shape == (500, 28, 28)
    assert pixels[:, :3, :].mean() < 2 and pixels.mean() > 20  # white strokes on a black border
    assert len({p.tobytes() for p in pixels}) == 500
