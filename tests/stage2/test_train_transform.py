"""augment.TrainTransform as train_clip.py runs it: what draw() chooses, what host_half() and
device_half() do with it, each against its source.

The recipe is the PI authors' stage-2 augmentation (github cheesepuff90/Brain_Initialization,
src/dataset.py get_transform, is_train), MoCo v2's (Chen et al. 2020, "Improved Baselines with
Momentum Contrastive Learning", arXiv 2003.04297; github facebookresearch/moco, main_moco.py
--aug-plus):
  RandomResizedCrop(scale=(0.2, 1.)), ratio (3/4, 4/3) (torchvision's default);
  RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8): brightness, contrast and saturation factors
    uniform in [0.6, 1.4], a hue shift uniform in [-0.1, 0.1], the four ops in a random order
    (torchvision's ColorJitter.get_params: torch.randperm(4));
  RandomGrayscale(p=0.2); RandomApply([GaussianBlur([.1, 2.])], p=0.5): sigma uniform in [0.1, 2.0];
  RandomHorizontalFlip() (p=0.5); then ToTensor and CLIP's Normalize.
"train" is open_clip's training transform (open_clip/transform.py image_transform, is_train: a
RandomResizedCrop of scale (0.9, 1.0), nothing else).

Proves: over N draws (seeds made as the loader makes them), every probability is met within 5
standard errors, sqrt(p (1 - p) / N), and the four coin flips are independent; every factor, the
hue shift, sigma and the jitter order follow their uniform distributions (Kolmogorov-Smirnov
distance under its 1e-6 critical value for the sample size), within their ranges; crop boxes have
the distribution of torchvision's RandomResizedCrop.get_params (two-sample Kolmogorov-Smirnov).
The seeds are fixed, so the answer is the same on every run; the bounds are those a correct
sampler keeps to, so a changed probability or range fails. On the same drawn parameters,
device_half() equals torchvision.transforms.v2.functional's ops applied one sample at a time
(jitter in the sample's order, grayscale, a Gaussian blur, normalisation), and host_half() equals
torchvision's resized_crop + horizontal_flip. host_half()'s fast JPEG path (libjpeg-turbo and
torch's resize) stays within the documented bound of the PIL path it replaces (host_half_pil: PIL's
decode, draft and bicubic resize from the crop box), on 400-500 px photos, grey and progressive
JPEGs, and leaves to PIL, bit for bit, what it would otherwise change (DCT-scaled crops, CMYK,
PNG, a truncated JPEG's error); without simplejpeg, PIL decodes everything.
Not here: the batched ops one at a time (tests/stage2/test_augment.py).
"""
import hashlib
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from skimage import data as skdata

from stage2 import augment
from stage2.augment import TrainTransform

N = 20_000  # draws: ~3 s
WIDTH, HEIGHT = 500, 375  # a YFCC-like 4:3 photo
# OpenAI CLIP's normalisation (github openai/CLIP, clip/clip.py _transform).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# significance of each distribution test: a correct sampler fails one with this probability
ALPHA = 1e-6


def loader_like_seed(i):
    """64-bit seeds from a hash, as stage2/shards.py derives each sample's seed (not consecutive
    integers)."""
    return int.from_bytes(hashlib.blake2b(f"test sample {i}".encode(), digest_size=8).digest(),
                          "little")


def draws(kind, n=N):
    """n draws of TrainTransform.draw -> (boxes (n, 4) array, params (n, P) tensor, flips (n,)
    bool array)."""
    transform = TrainTransform(224, kind)
    boxes, params, flips = [], [], []
    for i in range(n):
        box, p, flip = transform.draw(WIDTH, HEIGHT, loader_like_seed(i))
        boxes.append(box), params.append(p), flips.append(flip)
    return np.array(boxes, dtype=float), torch.stack(params), np.array(flips)


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: more threads only contend on a shared machine (measured 9 s with 2, 0.9 s
    with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moco():
    return draws("moco")


def assert_frequency(hits, p, what):
    hits = np.asarray(hits, dtype=float)
    bound = 5 * math.sqrt(p * (1 - p) / len(hits))
    assert abs(hits.mean() - p) < bound, f"{what}: {hits.mean():.4f}, expected {p} +- {bound:.4f}"


def ks_uniform(values, low, high, what):
    """Kolmogorov-Smirnov distance of `values` from U(low, high) under its critical value, all in
    range."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    assert low <= x[0] and x[-1] <= high, (
        f"{what}: range [{x[0]}, {x[-1]}], expected within [{low}, {high}]")
    cdf = (x - low) / (high - low)
    distance = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    critical = math.sqrt(-math.log(ALPHA / 2) / (2 * n))
    assert distance < critical, (
        f"{what}: KS distance {distance:.4f} from U({low}, {high}), critical {critical:.4f}")


def ks_two_sample(a, b, what):
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    distance = np.abs(np.searchsorted(a, grid, side="right") / len(a)
                      - np.searchsorted(b, grid, side="right") / len(b)).max()
    critical = (math.sqrt(-math.log(ALPHA / 2) / 2)
                * math.sqrt((len(a) + len(b)) / (len(a) * len(b))))
    assert distance < critical, (
        f"{what}: two-sample KS distance {distance:.4f}, critical {critical:.4f}")


# --------------------------------------------------------------------------------------------------
# draw(): the probabilities and ranges of the recipe
# --------------------------------------------------------------------------------------------------


def test_moco_coin_flips_have_the_recipes_probabilities_and_are_independent(moco):
    _, params, flips = moco
    coins = {"jitter": params[:, augment.JITTER].numpy() > 0,
             "grayscale": params[:, augment.GRAY].numpy() > 0,
             "blur": params[:, augment.SIGMA].numpy() > 0, "flip": flips}
    probability = {"jitter": 0.8, "grayscale": 0.2, "blur": 0.5, "flip": 0.5}
    for name, hits in coins.items():
        assert_frequency(hits, probability[name], name)
    names = list(coins)
    for i, a in enumerate(names):  # one random number reused for two choices would couple them
        for b in names[i + 1:]:
            assert_frequency(coins[a] & coins[b], probability[a] * probability[b], f"{a} and {b}")


def test_moco_jitter_factors_sigma_and_order_are_uniform_in_their_ranges(moco):
    _, params, _ = moco
    on = params[params[:, augment.JITTER] > 0]  # the samples whose factors are used
    for column, name in ((augment.BRIGHTNESS, "brightness"), (augment.CONTRAST, "contrast"),
                         (augment.SATURATION, "saturation")):
        ks_uniform(on[:, column], 0.6, 1.4, name)  # ColorJitter(0.4): [max(0, 1 - 0.4), 1 + 0.4]
    ks_uniform(on[:, augment.HUE], -0.1, 0.1, "hue")
    sigma = params[:, augment.SIGMA]
    ks_uniform(sigma[sigma > 0], 0.1, 2.0, "blur sigma")
    # (n, 4): the ops in the order they run
    orders = augment.ORDERS[on[:, augment.ORDER].long()].numpy()
    # each a permutation of the 4 ops
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders[:100])
    permutations = {tuple(o) for o in augment.ORDERS.tolist()}
    assert len(permutations) == 24
    # torch.randperm(4): each of the 24 orders with probability 1/24
    for permutation in permutations:
        assert_frequency((orders == permutation).all(1), 1 / 24, f"jitter order {permutation}")


def test_moco_crops_follow_torchvisions_random_resized_crop(moco):
    boxes, _, _ = moco
    left, top, right, bottom = boxes.T
    torch.manual_seed(0)
    image = Image.new("RGB", (WIDTH, HEIGHT))
    theirs = np.array([T.RandomResizedCrop.get_params(image, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
                       for _ in range(N)], dtype=float)  # (top, left, height, width)
    area = (right - left) * (bottom - top) / (WIDTH * HEIGHT)
    their_area = theirs[:, 2] * theirs[:, 3] / (WIDTH * HEIGHT)
    # Whole pixels: a box's area may miss the scale range by its rounding, under 1% at these sizes.
    assert 0.2 * 0.99 < area.min() and area.max() <= 1.0
    assert area.min() < 0.21 and area.max() > 0.95  # the whole range is used
    ks_two_sample(area, their_area, "crop area")
    ks_two_sample(np.log((right - left) / (bottom - top)), np.log(theirs[:, 3] / theirs[:, 2]),
                  "crop aspect")
    ks_two_sample(left, theirs[:, 1], "crop left")
    ks_two_sample(top, theirs[:, 0], "crop top")
    assert ((left >= 0).all() and (top >= 0).all() and (right <= WIDTH).all()
            and (bottom <= HEIGHT).all())


def test_train_kind_crops_only_and_eval_takes_the_centre():
    boxes, params, flips = draws("train", 2000)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (WIDTH * HEIGHT)
    assert 0.9 * 0.99 < area.min() and area.max() <= 1.0 and area.min() < 0.91
    assert not params.any() and not flips.any()  # no jitter, grayscale, blur or flip
    box, params, flip = TrainTransform(224, "eval").draw(WIDTH, HEIGHT, 0)
    # the centred 375 x 375 square
    assert box == (62, 0, 437, 375) and not params.any() and not flip


# --------------------------------------------------------------------------------------------------
# host_half() and device_half(): torchvision's ops on the same drawn parameters
# --------------------------------------------------------------------------------------------------


def jpeg(photo, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(photo).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


PHOTOS = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
SIZE = 40


def reference_device(image, params):
    """One sample through torchvision.transforms.v2.functional with the drawn parameters: uint8
    (3, S, S) -> float (3, S, S), as the authors' pipeline orders the ops (jitter, grayscale, blur,
    normalise)."""
    x = image.float() / 255
    if params[augment.JITTER] > 0:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in augment.ORDERS[int(params[augment.ORDER])].tolist():
            x = ops[op](x, float(params[augment.BRIGHTNESS + op]))
    if params[augment.GRAY] > 0:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    sigma = float(params[augment.SIGMA])
    if sigma > 0:
        # A 13-tap Gaussian (3 sigma at the largest sigma, 2.0) with the edges extended as PIL's
        # GaussianBlur (MoCo v2's) extends them: pad by replication, blur, cut the padding off.
        padded = F.pad(x[None], (6, 6, 6, 6), mode="replicate")[0]
        x = TF.gaussian_blur(padded, [13, 13], [sigma, sigma])[:, 6:-6, 6:-6]
    return TF.normalize(x, list(CLIP_MEAN), list(CLIP_STD))


def test_device_equals_torchvisions_ops_on_the_drawn_parameters():
    transform = TrainTransform(SIZE, "moco")
    jpegs = [jpeg(photo) for photo in PHOTOS]
    samples = [transform.host_half(jpegs[i % len(jpegs)], loader_like_seed(i)) for i in range(64)]
    images, params = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    # every op runs on some samples, not all
    for column in (augment.JITTER, augment.GRAY, augment.SIGMA):
        assert 0 < int((params[:, column] > 0).sum()) < len(params)
    ours = transform.device_half(images, params)  # the batch, as the trainer calls it
    assert ours.dtype == torch.float32 and ours.shape == (64, 3, SIZE, SIZE)
    for i in range(len(images)):
        # fp32 rounding of the same sums in another order (measured: at most 2.9e-6), over CLIP's
        # std (~0.27)
        torch.testing.assert_close(ours[i], reference_device(images[i], params[i]), atol=2e-5,
                                   rtol=0, msg=f"sample {i}")


def test_host_equals_torchvisions_resized_crop_and_flip_on_the_drawn_box():
    transform = TrainTransform(SIZE, "moco", draft=False)
    flipped = 0
    for i in range(24):
        photo = Image.fromarray(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        ours, _ = transform.host_half(photo, loader_like_seed(i))
        (left, top, right, bottom), _, flip = transform.draw(*photo.size, loader_like_seed(i))
        expected = TF.pil_to_tensor(photo)
        expected = TF.resized_crop(expected, top, left, bottom - top, right - left, [SIZE, SIZE],
                                   interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        if flip:
            expected = TF.horizontal_flip(expected)
            flipped += 1
        # PIL resizes from the crop box inside the whole image (its filter reads past the box's
        # edge); torchvision crops first: the edges differ. Measured: 0.02-0.24 grey levels on
        # average per sample; a box 2 px off gives 1.2-11, bilinear instead of bicubic 0.4-3.7, a
        # missed flip 10-94.
        difference = (ours.float() - expected.float()).abs().mean().item()
        assert difference < 0.35, (i, difference)
    assert 0 < flipped < 24


# --------------------------------------------------------------------------------------------------
# host_half()'s fast JPEG path against the PIL path it replaces (host_half_pil, the reference)
# --------------------------------------------------------------------------------------------------


def web_photo_jpegs(n, mode="RGB", progressive=False):
    """n JPEGs (quality 90) of the photos with a long side of 400-500 px, as YFCC15M's are."""
    out = []
    for i in range(n):
        photo = Image.fromarray(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        long_side = 400 + 100 * i // n
        photo = photo.resize((long_side, long_side * photo.height // photo.width), Image.BICUBIC)
        buffer = io.BytesIO()
        photo.convert(mode).save(buffer, "JPEG", quality=90, progressive=progressive)
        out.append(buffer.getvalue())
    return out


# The documented bound: a sample differs from PIL's by under 0.1 grey levels on average (measured
# on bench_loader's 300 photos: 0.008 mean, 0.031 at most), and by at most 2 levels inside a
# 2-pixel border (7 at the border: PIL's filter reads pixels past the crop box, the tensor crop
# extends its edge; at most 13 in the outermost pixels).
MEAN_BOUND, INSIDE_BOUND = 0.1, 2


def assert_close_to_pil(transform, data, seed):
    ours, params = transform.host_half(data, seed)
    reference, reference_params = transform.host_half_pil(io.BytesIO(data), seed)
    assert torch.equal(params, reference_params) and ours.shape == reference.shape
    difference = (ours.int() - reference.int()).abs()
    assert difference.float().mean() < MEAN_BOUND, (seed, difference.float().mean())
    assert difference[:, 2:-2, 2:-2].max() <= INSIDE_BOUND, seed
    return ours


def test_fast_jpeg_path_gives_pils_pixels_within_the_bound():
    transform = TrainTransform(224, "moco")
    for i, data in enumerate(web_photo_jpegs(16)):
        assert_close_to_pil(transform, data, loader_like_seed(i))
    grey = web_photo_jpegs(1, mode="L")[0]
    assert Image.open(io.BytesIO(grey)).mode == "L"
    progressive = web_photo_jpegs(1, progressive=True)[0]
    for i, data in enumerate((grey, progressive)):
        assert_close_to_pil(transform, data, loader_like_seed(100 + i))


def test_fast_jpeg_path_leaves_to_pil_what_it_would_change():
    """A DCT-scaled decode (the crop has 2S pixels or more each way) resizes from the exact box as
    PIL's draft path does: bit for bit. CMYK JPEGs (libjpeg-turbo's conversion differs from PIL's by
    ~1 level), PNGs, and JPEGs libjpeg-turbo rejects go to PIL: the same pixels, or PIL's error."""
    large = jpeg(PHOTOS[0])  # 512 x 512: "train" crops of >= 90% at 64 px decode at 1/4
    transform = TrainTransform(64, "train")
    for seed in range(4):
        ours, _ = transform.host_half(large, seed)
        assert torch.equal(ours, transform.host_half_pil(io.BytesIO(large), seed)[0])
    transform = TrainTransform(SIZE, "moco")
    cmyk = web_photo_jpegs(1, mode="CMYK")[0]
    png = io.BytesIO()
    Image.fromarray(PHOTOS[1]).save(png, "PNG")
    for data in (cmyk, png.getvalue()):
        ours, _ = transform.host_half(data, 5)
        assert torch.equal(ours, transform.host_half_pil(io.BytesIO(data), 5)[0])
    truncated = large[:len(large) // 2]
    for take in (transform.host_half, lambda data, seed: transform.host_half_pil(
            io.BytesIO(data), seed)):
        with pytest.raises(OSError):
            take(truncated, 5)


def test_without_simplejpeg_every_image_takes_the_pil_path(monkeypatch):
    """A GPU image's own Python may lack simplejpeg: the kit still imports, and trains on PIL's
    pixels."""
    monkeypatch.setattr(augment, "simplejpeg", None)
    transform = TrainTransform(224, "moco")
    data = web_photo_jpegs(1)[0]
    ours, _ = transform.host_half(data, 3)
    assert torch.equal(ours, transform.host_half_pil(io.BytesIO(data), 3)[0])
