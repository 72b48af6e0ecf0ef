"""The demo world: generated scenes whose perceptual structure is known by construction.

Used by world/make_data.py to make the embedded demo's data in the kit's real formats
(docs/demo.md):
  demo_triplets   NIGHTS-style triplets (a scene and two variations) judged by simulated observers
  demo_pairs      captioned scenes for image-text shards
  demo_tasks      zero-shot tasks: shape, colour, size, position, count, retrieval, real MNIST
                  digits
  demo_concepts   one scene per "concept", and odd-one-out trials on them judged by the same
                  observers (THINGS-style, for `python demo.py --study sources`)
It imports nothing of the kit.
"""
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

# A world of generated scenes whose perceptual structure is known by construction, so that the
# paper's whole experiment runs in miniature on a CPU (docs/demo.md): stage-1 triplets judged by
# simulated observers, stage-2 captioned scenes and zero-shot tasks, each written by the writer of
# its real format (world/make_data.py), so the demo's data goes through exactly the loaders real
# data goes through.
#
# A scene is a plain JSON-able dict; a seed fixes every pixel, vote and caption:
#   {"background": "grey", "objects": [{"shape": "star", "colour": "red", "size": "small",
#     "position": "top left", "texture": "plain", "jitter": [dx, dy, degrees]}, ...]}

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
# Digits drawn as pen strokes are objects too: they give the zero-shot MNIST task (real handwritten
# digits) something in the training world to transfer from.
DIGITS = tuple("0123456789")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (140, 60, 190),
    "pink": (240, 130, 180), "brown": (130, 80, 40),
    "white": (250, 250, 250), "black": (10, 10, 10),
}
BACKGROUNDS = {
    "grey": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15),
    "beige": (225, 210, 175), "teal": (30, 130, 130),
}
POSITIONS = {  # name -> (column, row) on a 3 x 3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
SIZES = {"small": 0.13, "large": 0.22}  # object radius as a share of the image side
TEXTURES = ("plain", "striped")
# The NIGHTS column is_imagenet splits its test set in two; here a fixed half of the object kinds
# plays that role, so test_imagenet / test_no_imagenet exist and differ in content.
IMAGENET_HALF = frozenset(SHAPES[::2] + DIGITS[::2])

# How much a change of each attribute moves a scene perceptually: what the object is and its colour
# matter a lot, an object appearing or vanishing most, where it sits and how big it is little. This
# is the demo's assumption about people (docs/demo.md), not a measurement; its point is that it
# differs from pixel distance, which a moved or resized object changes a lot. Colour and position
# gaps are graded (red is nearer orange than blue), the rest all-or-nothing.
PERCEPTUAL_WEIGHTS = {
    "object": 3.5, "shape": 3.0, "colour": 2.0, "background": 1.2,
    "texture": 1.0, "size": 0.5, "position": 0.4,
}


def _colour_gap(a, b):
    """RGB distance scaled to [0, 1]: red-orange ~0.35, red-blue ~0.85."""
    return min(1.0, math.dist(a, b) / 300)


def _legible(colour, background):
    return _colour_gap(COLOURS[colour], BACKGROUNDS[background]) > 0.3


def _sample_object(rng, background, taken, **fixed):
    shape = rng.choice(SHAPES) if rng.random() < 0.75 else rng.choice(DIGITS)
    obj = {
        "shape": shape,
        "colour": rng.choice([c for c in COLOURS if _legible(c, background)]),
        "size": rng.choice(list(SIZES)),
        "position": rng.choice([p for p in POSITIONS if p not in taken]),
        "texture": "plain" if shape in DIGITS else rng.choice(TEXTURES),
        "jitter": [round(rng.uniform(-0.03, 0.03), 4), round(rng.uniform(-0.03, 0.03), 4),
                   round(rng.uniform(-15, 15), 2)],
    }
    obj.update(fixed)
    if obj["shape"] in DIGITS:
        obj["texture"] = "plain"  # stripes on a pen stroke would be invisible
    return obj


def sample_scene(rng, n_objects=None, background=None, **fixed):
    """A random scene of one or two objects; `fixed` pins attributes of the first object (e.g.
    shape="star"), which the zero-shot tasks use to draw scenes of a known class."""
    n_objects = n_objects or (1 if rng.random() < 0.6 else 2)
    colour = fixed.get("colour")
    background = background or rng.choice([b for b in BACKGROUNDS
                                           if colour is None or _legible(colour, b)])
    objects = []
    for i in range(n_objects):
        obj = _sample_object(rng, background, {o["position"] for o in objects},
                             **(fixed if i == 0 else {}))
        objects.append(obj)
    return {"background": background, "objects": objects}


def vary_scene(scene, rng, n_changes):
    """A copy of `scene` with n_changes attributes changed (an object's shape, colour, size,
    position or texture; the background; or an object added or removed)."""
    scene = json.loads(json.dumps(scene))
    kinds = ["shape", "colour", "size", "position", "texture", "background", "count"]
    for kind in rng.sample(kinds, n_changes):
        objects, background = scene["objects"], scene["background"]
        obj = rng.choice(objects)
        if kind == "count":
            if len(objects) == 2:
                objects.remove(obj)
            else:
                objects.append(_sample_object(rng, background, {obj["position"]}))
        elif kind == "background":
            options = [b for b in BACKGROUNDS
                       if b != background and all(_legible(o["colour"], b) for o in objects)]
            scene["background"] = rng.choice(options or [background])
        elif kind == "shape":
            obj["shape"] = rng.choice([s for s in SHAPES + DIGITS if s != obj["shape"]])
            obj["texture"] = "plain" if obj["shape"] in DIGITS else obj["texture"]
        elif kind == "colour":
            obj["colour"] = rng.choice([c for c in COLOURS
                                        if c != obj["colour"] and _legible(c, background)])
        elif kind == "size":
            obj["size"] = "small" if obj["size"] == "large" else "large"
        elif kind == "position":
            taken = {o["position"] for o in objects}
            obj["position"] = rng.choice([p for p in POSITIONS if p not in taken])
        elif kind == "texture" and obj["shape"] not in DIGITS:
            obj["texture"] = "plain" if obj["texture"] == "striped" else "striped"
    return scene


def _object_distance(a, b, w):
    (ax, ay), (bx, by) = POSITIONS[a["position"]], POSITIONS[b["position"]]
    return (
        w["shape"] * (a["shape"] != b["shape"])
        + w["colour"] * _colour_gap(COLOURS[a["colour"]], COLOURS[b["colour"]])
        + w["size"] * (a["size"] != b["size"])
        + w["position"] * max(abs(ax - bx), abs(ay - by)) / 2
        + w["texture"] * (a["texture"] != b["texture"])
    )


def perceptual_distance(a, b, weights=PERCEPTUAL_WEIGHTS):
    """How different two scenes look to the demo's idealised observer. Objects are matched to each
    other in the cheapest way; an object without a partner costs weights["object"]."""
    small, large = sorted((a["objects"], b["objects"]), key=len)
    best = min(
        sum(_object_distance(x, y, weights) for x, y in zip(small, order))
        + weights["object"] * (len(large) - len(small))
        for order in itertools.permutations(large, len(small))
    )
    return best + weights["background"] * _colour_gap(BACKGROUNDS[a["background"]],
                                                      BACKGROUNDS[b["background"]])


def make_observers(rng, n=24):
    """A pool of simulated observers. Each weighs the attributes a little differently (a log-normal
    factor per attribute) and judges with its own amount of noise, so panels disagree on close
    calls."""
    return [
        {"weights": {k: w * math.exp(rng.gauss(0, 0.3)) for k, w in PERCEPTUAL_WEIGHTS.items()},
         "noise": rng.uniform(0.3, 0.9)}
        for _ in range(n)
    ]


def observer_votes(ref, left, right, observers, rng):
    """Votes collected the way NIGHTS collected them (adaptively): three observers first, and only
    if they agree, 3-7 more. So rows with fewer than 6 votes are the split ones (min_votes drops
    them) and rows with 6+ may still hold a dissenting vote. Each observer picks the variation that
    looks closer to the reference to them -> (left_vote, right_vote)."""

    def judge(o):
        d_left = perceptual_distance(ref, left, o["weights"]) + rng.gauss(0, o["noise"])
        d_right = perceptual_distance(ref, right, o["weights"]) + rng.gauss(0, o["noise"])
        return d_right < d_left

    panel = rng.sample(observers, 10)
    said_right = [judge(o) for o in panel[:3]]
    if len(set(said_right)) == 1:
        said_right += [judge(o) for o in panel[3:3 + rng.randint(3, 7)]]
    return len(said_right) - sum(said_right), sum(said_right)


def odd_one_out(scenes, observer, rng):
    """Which of three scenes `observer` calls the odd one out (0, 1 or 2), as THINGS' participants
    did: the item outside the pair that looks most alike to them. Each of the three pair distances
    is seen with the observer's own noise, as in observer_votes."""
    pairs = ((0, 1), (1, 2), (0, 2))
    seen = [perceptual_distance(scenes[a], scenes[b], observer["weights"])
            + rng.gauss(0, observer["noise"]) for a, b in pairs]
    closest = pairs[min(range(3), key=seen.__getitem__)]
    return 3 - sum(closest)


def concept_name(scene, taken):
    """A THINGS-style unique id for a scene, from its first object ("red_star", "blue_digit7"); a
    repeated name gets a number, as THINGS numbers its homonyms ("bat1", "bat2")."""
    obj = scene["objects"][0]
    base = f"{obj['colour']}_{'digit' + obj['shape'] if obj['shape'] in DIGITS else obj['shape']}"
    taken[base] = taken.get(base, 0) + 1
    return base if taken[base] == 1 else f"{base}{taken[base]}"


def demo_concepts(n, seed=0, stream="concepts"):
    """n scenes of their own random stream, one image per "concept" as in the THINGS odd-one-out
    task, with their unique ids in generation order (which is not alphabetical, as THINGS' is not).
    Another `stream` gives other scenes (the held-out stimuli of the studies' RSA)."""
    rng = random.Random(f"{stream}-{seed}")
    scenes, taken = [sample_scene(rng) for _ in range(n)], {}
    return [concept_name(s, taken) for s in scenes], scenes


def demo_odd_one_out(scenes, counts, seed=0):
    """Odd-one-out trials on `scenes` -> {split: [(i, j, odd), ...]} with `counts[split]` trials
    each: three distinct concepts drawn at random (as THINGS drew its triplets), judged by one
    observer of the same pool that votes on the NIGHTS-style triplets (make_observers on
    demo_triplets' stream), the odd one written LAST as THINGS-data's triplet files do."""
    observers = make_observers(random.Random(f"nights-{seed}"))
    rng = random.Random(f"oddoneout-{seed}")
    trials = {}
    for split, count in counts.items():
        trials[split] = []
        for _ in range(count):
            chosen = rng.sample(range(len(scenes)), 3)
            odd = odd_one_out([scenes[c] for c in chosen], rng.choice(observers), rng)
            pair = [c for k, c in enumerate(chosen) if k != odd]
            trials[split].append((*pair, chosen[odd]))
    return trials


# Rendering: shapes are drawn as masks at 4x the output size and downsampled, for smooth edges.

_SUPERSAMPLE = 4


def _polygon(n, radius=1.0, start=-90.0):
    angles = [math.radians(start + 360 * i / n) for i in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star():
    outer, inner = _polygon(5), _polygon(5, 0.45, -54)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart():
    points = []
    for i in range(40):  # the classic parametric heart, scaled into the unit circle
        t = 2 * math.pi * i / 40
        x, y = (16 * math.sin(t) ** 3,
                13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        points.append((x / 17, -y / 17 - 0.05))
    return points


_OUTLINES = {  # unit-radius outlines, y pointing down
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _polygon(3),
    "star": _star(),
    "cross": [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3),
              (0.3, 0.9), (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)],
    "diamond": [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)],
    "hexagon": _polygon(6, 1.0, 0),
    "heart": _heart(),
}
# Digits as pen strokes in a box x in [-0.6, 0.6], y in [-1, 1]; each stroke a polyline.
_STROKES = {
    "1": [[(-0.25, -0.6), (0.05, -1), (0.05, 1)]],
    "2": [[(-0.5, -0.5), (-0.2, -0.95), (0.3, -0.95), (0.5, -0.55), (0.4, -0.15), (-0.55, 1),
           (0.6, 1)]],
    "3": [[(-0.5, -0.95), (0.5, -0.95), (-0.05, -0.1), (0.45, 0.15), (0.55, 0.6), (0.2, 1),
           (-0.55, 0.85)]],
    "4": [[(0.3, 1), (0.3, -1), (-0.6, 0.4), (0.6, 0.4)]],
    "5": [[(0.55, -1), (-0.4, -1), (-0.5, -0.1), (0.2, -0.2), (0.55, 0.2), (0.5, 0.75), (0.05, 1),
           (-0.55, 0.85)]],
    "6": [[(0.4, -1), (-0.2, -0.4), (-0.5, 0.3), (-0.35, 0.9), (0.2, 1), (0.5, 0.55), (0.3, 0.05),
           (-0.2, 0.1), (-0.45, 0.4)]],
    "7": [[(-0.6, -1), (0.6, -1), (-0.15, 1)]],
    "9": [[(0.5, -0.35), (0.2, -0.05), (-0.35, -0.1), (-0.5, -0.55), (-0.2, -1), (0.3, -0.95),
           (0.5, -0.4), (0.3, 1)]],
}
# 0 and 8 are rings instead: ellipses (cx, cy, rx, ry) in the same box.
_RINGS = {"0": [(0, 0, 0.55, 1)], "8": [(0, -0.5, 0.4, 0.48), (0, 0.5, 0.5, 0.52)]}


def _draw_mask(obj, side):
    """A white-on-black mask (side x side) of one object."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    col, row = POSITIONS[obj["position"]]
    dx, dy, degrees = obj["jitter"]
    cx, cy = (0.24 + 0.26 * col + dx) * side, (0.24 + 0.26 * row + dy) * side
    r = SIZES[obj["size"]] * side
    angle = math.radians(degrees)

    def place(points):  # rotate by the jitter angle, scale by the radius, move to the centre
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]

    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape in _OUTLINES:
        draw.polygon(place(_OUTLINES[shape]), fill=255)
    else:  # a digit: pen strokes about a third of the radius wide, like MNIST
        width = max(1, round(0.35 * r))
        for stroke in _STROKES.get(shape, []):
            draw.line(place(stroke), fill=255, width=width, joint="curve")
        for ex, ey, rx, ry in _RINGS.get(shape, []):
            steps = [(ex + rx * math.cos(2 * math.pi * i / 32),
                      ey + ry * math.sin(2 * math.pi * i / 32)) for i in range(33)]
            draw.line(place(steps), fill=255, width=width, joint="curve")
    return mask


def render_scene(scene, size=64):
    """Draw a scene -> PIL RGB image (size x size). Pure function of the scene dict."""
    side = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene["background"]])
    for obj in scene["objects"]:
        colour = COLOURS[obj["colour"]]
        paint = Image.new("RGB", (side, side), colour)
        if obj["texture"] == "striped":  # diagonal bands of the colour and a contrasting shade
            shade = tuple(int(c * 0.45) if sum(colour) > 200 else min(255, c + 140) for c in colour)
            band = max(2, side // 16)
            draw = ImageDraw.Draw(paint)
            for k in range(-side, side, 2 * band):
                draw.polygon([(k, 0), (k + band, 0), (k + band + side, side), (k + side, side)],
                             fill=shade)
        canvas.paste(paint, (0, 0), _draw_mask(obj, side))
    return canvas.resize((size, size), Image.LANCZOS)


# Forking a process that may have imported torch is safe on Linux. macOS's system frameworks are
# not fork-safe (Python starts processes by spawning there), so the world's render pool and the
# demo's step server (world/pipeline.py) fork on Linux only; elsewhere they run one by one.
FORK_SAFE = sys.platform.startswith("linux")


def render_many(scenes, size=64, chunk=64):
    """Scenes -> an iterator of their images, in order, rendered by a pool of one process per core:
    render_scene is a pure function of its scene, so the images are those one process renders
    (rendering is most of the demo's data step). Forked workers: they start in milliseconds and
    touch no thread pool of the parent's."""
    scenes = list(scenes)
    processes = min(os.cpu_count() or 1, math.ceil(len(scenes) / chunk))
    if processes < 2 or not FORK_SAFE:
        yield from (render_scene(scene, size) for scene in scenes)
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield from pool.imap(functools.partial(render_scene, size=size), scenes, chunksize=chunk)


# Captions: several styles, with attributes left out at random, so the text tower has to learn what
# each word means rather than one fixed sentence per scene.


def _noun(obj, rng, keep_shape):
    if obj["shape"] in DIGITS:
        d = obj["shape"]
        return (rng.choice([f'number "{d}"', f"number {d}", f"digit {d}", f'"{d}"'])
                if keep_shape else "symbol")
    return obj["shape"] if keep_shape else rng.choice(["shape", "object"])


def _object_phrase(obj, rng):
    keep_shape = rng.random() < 0.9
    keep_colour = rng.random() < 0.85 or not keep_shape
    words = []
    if rng.random() < 0.5:
        words.append(obj["size"])
    if obj["texture"] == "striped" and rng.random() < 0.6:
        words.append("striped")
    if keep_colour:
        words.append(obj["colour"])
    phrase = " ".join(words + [_noun(obj, rng, keep_shape)])
    if rng.random() < 0.4:
        phrase += f" at the {obj['position']}"
    return phrase


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene, rng):
    """One caption of a scene, e.g. "a small red star at the top left on a grey background",
    "red star", "a photo of a striped blue circle", "two objects: a red star and a blue "7"."."""
    phrases = [_object_phrase(o, rng) for o in scene["objects"]]
    background = f" on a {scene['background']} background" if rng.random() < 0.35 else ""
    if len(phrases) == 1:
        p = phrases[0]
        styles = [_a(p) + background, p, f"a photo of {_a(p)}{background}.",
                  f"a picture of {_a(p)}.", f"one object: {_a(p)}"]
    else:
        both = f"{_a(phrases[0])} and {_a(phrases[1])}"
        styles = [both + background, f"two objects: {both}", f"a photo of {both}{background}.",
                  f"two objects{background or ' together'}",
                  f"{_a(phrases[0])} next to {_a(phrases[1])}"]
    return rng.choice(styles)


# The three pieces of demo data, each a stream the matching writer consumes.


def demo_triplets(n, seed=0, size=64):
    """n NIGHTS-style triplets: a reference scene and two variations (1-3 attributes changed each),
    judged by simulated observers (see observer_votes). Splits 80/10/10 train/val/test."""
    rng = random.Random(f"nights-{seed}")
    observers = make_observers(rng)
    drawn = []  # every random draw first (rendering draws none), then the images in a pool
    for _ in range(n):
        ref = sample_scene(rng)
        left, right = (vary_scene(ref, rng, rng.randint(1, 3)),
                       vary_scene(ref, rng, rng.randint(1, 3)))
        drawn.append((ref, left, right, *observer_votes(ref, left, right, observers, rng),
                      rng.random()))
    images = render_many((scene for triplet in drawn for scene in triplet[:3]), size)
    for ref, left, right, left_vote, right_vote, u in drawn:
        shape = ref["objects"][0]["shape"]
        yield {
            "ref": next(images), "left": next(images), "right": next(images),
            "left_vote": left_vote, "right_vote": right_vote,
            "split": "train" if u < 0.8 else "val" if u < 0.9 else "test",
            "is_imagenet": shape in IMAGENET_HALF,
            "prompt": f"An image of a {'digit ' + shape if shape in DIGITS else shape}",
        }


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def demo_pairs(n, seed=0, size=64):
    """n (key, {"png", "txt", "json"}) image-caption samples for stage-2 shards; json holds the
    scene."""
    rng = random.Random(f"pairs-{seed}")
    drawn = []
    for _ in range(n):
        scene = sample_scene(rng)
        drawn.append((scene, caption(scene, rng)))
    for i, ((scene, text), image) in enumerate(zip(drawn, render_many((s for s, _ in drawn),
                                                                       size))):
        yield f"{i:08d}", {"png": _png(image), "txt": text, "json": json.dumps(scene)}


def _mnist_digits():
    """The 500 real MNIST digits of assets/mnist_500.png (row d = 50 digits of class d)."""
    sheet = (Image.open(Path(__file__).resolve().parents[1] / "assets" / "mnist_500.png")
             .convert("RGB"))
    return [(sheet.crop((28 * i, 28 * d, 28 * i + 28, 28 * d + 28)), d)
            for d in range(10) for i in range(sheet.width // 28)]


def demo_tasks(seed=0, size=64, per_class=40, retrieval=200, split="test"):
    """The zero-shot tasks -> {name: dict(samples, classnames, templates, task_type)}. Scenes come
    from their own random stream, so none of them is a training image. split="train" gives the
    train split of the classification tasks the linear probe fits (another stream: the test scenes
    stay the same); retrieval and the 500 real MNIST digits have no train split."""
    rng = random.Random(f"tasks-{seed}" if split == "test" else f"tasks-{split}-{seed}")

    def rendered(scenes_and_labels):
        scenes, labels = zip(*scenes_and_labels)
        return list(zip(render_many(scenes, size), labels))

    def classify(attribute, classes, templates, **extra):
        samples = rendered([(sample_scene(rng, **extra, **{attribute: c}), label)
                            for label, c in enumerate(classes) for _ in range(per_class)])
        return dict(samples=samples, classnames=list(classes), templates=templates,
                    task_type="classification")

    def count(templates):
        samples = rendered([(sample_scene(rng, n_objects=label + 1), label)
                            for label in (0, 1) for _ in range(per_class)])
        return dict(samples=samples, classnames=["one object", "two objects"], templates=templates,
                    task_type="classification")

    tasks = {
        "demo_shape": classify("shape", SHAPES,
                               ["a photo of a {c}.", "a {c}.", "a picture of a {c}."], n_objects=1),
        "demo_colour": classify("colour", COLOURS,
                                ["a {c} shape.", "a photo of a {c} object.", "something {c}."],
                                n_objects=1),
        "demo_size": classify("size", SIZES, ["a {c} shape.", "a photo of a {c} object."],
                              n_objects=1),
        "demo_position": classify("position", POSITIONS,
                                  ["a shape at the {c}.", "a photo of an object at the {c}."],
                                  n_objects=1),
        "demo_count": count(["a photo of {c}.", "{c}."]),
    }
    if split != "test":
        return tasks
    scenes = [sample_scene(rng) for _ in range(retrieval)]
    tasks["demo_retrieval"] = dict(
        samples=rendered([(s, [caption(s, rng) for _ in range(5)]) for s in scenes]),
        classnames=None, templates=None, task_type="retrieval")
    # The one task on real pixels; CLIP_benchmark's own MNIST template.
    tasks["demo_mnist"] = dict(samples=_mnist_digits(), classnames=list(DIGITS),
                               templates=['a photo of the number: "{c}".'],
                               task_type="classification")
    return tasks


def demo_probe_scenes(n=200, seed=0):
    """n scenes of their own random stream for the feature-space probes (analysis/probes.py),
    whose pairwise observer distance (perceptual_distance) is the reference the models' distances
    are compared with."""
    rng = random.Random(f"probe-{seed}")
    return [sample_scene(rng) for _ in range(n)]
