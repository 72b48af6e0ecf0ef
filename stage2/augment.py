"""Stage 2's image augmentation, split between loader workers (host) and the training device.

  transform = TrainTransform(224, "moco")
  # in a worker: uint8 (3, 224, 224), params (P,)
  image, params = transform.host_half(jpeg_bytes, seed)
  # on the GPU, batched: float, CLIP-normalised
  images = transform.device_half(images, params)

The host half (decode, crop, resize, flip -> uint8) and the device half (colour jitter, grayscale,
blur, normalisation, batched with per-sample parameters) are one augmentation that must stay in
step. Every random choice of a sample is drawn in `host_half` from random.Random(seed), the
sample's own seed (the loader derives it from seed, epoch and the sample index), and travels as
numbers in `params`: the device half draws nothing, so the result is the same whatever the number
of workers or ranks, and a resumed run is exact.

Kinds: "moco" is the PI fork's stage-2 recipe, MoCo v2 (Chen et al. 2020, moco/main_moco.py
--aug-plus): RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 (each
factor and the order of the four as torchvision draws them), RandomGrayscale p=0.2, Gaussian blur
with sigma uniform in [0.1, 2.0] and p=0.5 (MoCo v2 blurs with PIL's
ImageFilter.GaussianBlur(sigma); here an exact Gaussian of that sigma, 13 taps, on the device),
horizontal flip. "train" is open_clip's RandomResizedCrop(scale 0.9-1); "eval" a centre square
crop. Images are not bit-identical to torchvision's (JPEG draft decoding, one resize from the crop
box): they are the same augmentation. JPEGs are decoded by libjpeg-turbo (simplejpeg) and resized
by torch's uint8 antialiased bicubic, about twice PIL's speed, within 0.1 grey levels on average of
PIL's decode and resize (host_half_pil, the reference; tests/stage2/test_train_transform.py).
"""
import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import CLIP_MEAN, CLIP_STD

try:
    import simplejpeg
except ImportError:  # a GPU image's own Python may lack it (docs/gpu-session.md carries its wheel)
    simplejpeg = None  # then PIL decodes every image: the same augmentation, ~2x the host's time

# params columns, drawn in host_half(), read in device_half()
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, SIGMA = range(8)
NUM_PARAMS = 8
# (24, 4): the 4! orders of the jitter ops
ORDERS = torch.tensor([[a, b, c, d] for a in range(4) for b in range(4) for c in range(4)
                       for d in range(4) if len({a, b, c, d}) == 4])
BLUR_RADIUS = 6  # taps each side: 3 sigma at MoCo's largest sigma, 2.0
KINDS = ("moco", "train", "eval")
JPEG_START = b"\xff\xd8\xff"  # SOI marker, then the next marker's 0xFF


def random_resized_crop_box(width, height, scale, ratio, rng):
    """(left, top, right, bottom) as torchvision's RandomResizedCrop.get_params draws it (10 tries,
    else the centre crop at the nearest allowed ratio), from a random.Random."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    w, h = (width, int(round(width / min(ratio)))) if in_ratio < min(ratio) else (
        (int(round(height * max(ratio))), height) if in_ratio > max(ratio) else (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class TrainTransform:
    """host_half(image, seed) -> (uint8 (3, S, S), float params (NUM_PARAMS,));
    device_half(images, params) -> normalised float (B, 3, S, S). `draft`: let libjpeg decode at
    1/2, 1/4 or 1/8 scale when the crop still has at least S pixels each way there (most of the
    decode time of large photos)."""

    def __init__(self, image_size, kind="moco", draft=True):
        if kind not in KINDS:
            raise ValueError(f"unknown augment kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.image_size, self.kind, self.draft = image_size, kind, draft

    def draw(self, width, height, seed):
        """A sample's random choices: (crop box in pixels, params, flip). The order of the draws is
        part of the format: a resumed run must draw the same numbers."""
        rng = random.Random(seed)
        if self.kind == "eval":
            side = min(width, height)
            box = ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side,
                   (height - side) // 2 + side)
        else:
            scale = (0.2, 1.0) if self.kind == "moco" else (0.9, 1.0)
            box = random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), rng)
        values, flip = [0.0] * NUM_PARAMS, False
        if self.kind == "moco":
            values[JITTER] = rng.random() < 0.8
            values[ORDER] = rng.randrange(24)
            values[BRIGHTNESS], values[CONTRAST], values[SATURATION] = (
                rng.uniform(0.6, 1.4) for _ in range(3))
            values[HUE] = rng.uniform(-0.1, 0.1)
            values[GRAY] = rng.random() < 0.2
            values[SIGMA] = rng.uniform(0.1, 2.0) if rng.random() < 0.5 else 0.0
            flip = rng.random() < 0.5
        # one tensor made from the list: 8 scalar writes into a tensor cost 0.03 ms a sample
        return box, torch.tensor(values, dtype=torch.float), flip

    def host_half(self, image, seed):
        """JPEG bytes take the fast path (host_half_jpeg); other images, and JPEGs it declines,
        PIL's (host_half_pil). -> (uint8 (3, S, S), maybe a strided view: the loader's copy into
        its batch makes it contiguous; params (NUM_PARAMS,))."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            jpeg = simplejpeg is not None and bytes(image[:3]) == JPEG_START
            fast = self.host_half_jpeg(image, seed) if jpeg else None
            if fast is not None:
                return fast
            image = Image.open(io.BytesIO(image))
        return self.host_half_pil(image, seed)

    def host_half_pil(self, image, seed):
        """The reference: a PIL image (or a file-like object) decoded by PIL (draft-scaled where
        allowed), cropped and resized in one bicubic resize from the crop box, flipped."""
        if not isinstance(image, Image.Image):
            image = Image.open(image)
        width, height = image.size
        box, params, flip = self.draw(width, height, seed)
        size = self.image_size
        if self.draft and image.format == "JPEG":
            shrink = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
            if shrink >= 2:
                image.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
                sx, sy = image.size[0] / width, image.size[1] / height
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        # (converting an RGB image would only copy it)
        crop = (image if image.mode == "RGB" else image.convert("RGB")).resize(
            (size, size), Image.BICUBIC, box=box)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        # one copy, (S, S, 3) -> a (3, S, S) view: the loader's copy into its batch transposes it
        return torch.from_numpy(np.array(crop)).permute(2, 0, 1), params

    def host_half_jpeg(self, data, seed):
        """The fast path (bench/bench_loader.py measures it against the PIL path): libjpeg-turbo
        through simplejpeg, at 1/2, 1/4 or 1/8 scale where the crop still has S pixels each way
        there (the scale PIL's draft takes), then torch's uint8 antialiased bicubic resize of the
        crop, PIL's filter (Keys' cubic, a = -0.5, stretched when shrinking). Same decoded pixels
        as PIL for YCbCr and grey JPEGs; the crop's edge pixels are extended rather than read past
        the box as PIL does: tests/stage2/test_train_transform.py bounds the difference from
        host_half_pil. None for what PIL should decide: CMYK / YCCK colour (PIL converts them
        otherwise), or data libjpeg-turbo rejects (PIL then decodes or counts it as bad)."""
        try:
            height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        if colour not in ("YCbCr", "Gray", "RGB"):
            return None
        box, params, flip = self.draw(width, height, seed)
        size = self.image_size
        shrink = min((box[2] - box[0]) / size, (box[3] - box[1]) / size) if self.draft else 1
        scale = 8 if shrink >= 8 else 4 if shrink >= 4 else 2 if shrink >= 2 else 1
        try:
            pixels = decode_jpeg(data, width, height, scale)
        except ValueError:
            return None
        out = resize_crop(pixels, box, (width, height), size)
        return (out.flip(-1) if flip else out), params

    def host_half_encoded(self, image_bytes, seed):
        """For decoding on the device: a JPEG's header only is read here; -> (bytes as a uint8
        tensor, (left, top, right, bottom, flip) float tensor, params), or host_half()'s result for
        other images."""
        image = Image.open(io.BytesIO(image_bytes))
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return self.host_half(image, seed)
        box, params, flip = self.draw(*image.size, seed)
        return (torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8),
                torch.tensor([*box, flip], dtype=torch.float), params)

    def decode_jpegs_on_device(self, jpegs, boxes, device):
        """JPEGs (uint8 tensors of their bytes) decoded on `device` (torchvision.io.decode_jpeg:
        nvjpeg on CUDA), cropped to boxes (n, 5) = (left, top, right, bottom, flip), a CPU tensor,
        resized and flipped -> (uint8 (k, 3, S, S) of those that decode, in order; the indices of
        those that do not). One corrupt JPEG fails the batched decode: the batch is then decoded one
        by one, so only that one is lost (the loader counts it as bad_image). Close to host_half(),
        not bit-equal."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for jpeg in jpegs:
                try:
                    decoded.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        failed = [i for i, image in enumerate(decoded) if image is None]
        kept = [(image, box) for image, box in zip(decoded, boxes.tolist()) if image is not None]
        if not kept:
            return torch.zeros((0, 3, self.image_size, self.image_size), dtype=torch.uint8,
                               device=device), failed
        return resize_crops([image for image, _ in kept], [box for _, box in kept],
                            self.image_size), failed

    def device_half(self, images, params, sync_free=None):
        """uint8 (B, 3, S, S) and params (B, NUM_PARAMS), both on the device -> float (B, 3, S, S).
        Two forms with bit-identical outputs (tests/stage2/test_augment_device.py):
        - sync-free (the default off the CPU): every per-sample choice is a torch.where mask, not
          a Python `if` on a device value or a boolean-mask index (each of those makes the host
          wait for the step in flight), and constants come from a per-device cache, not a fresh
          host-to-device copy each call (the test counts them). The price: each jitter slot runs
          all four ops on the whole batch;
        - masked (the default on the CPU, where nothing runs ahead of the host to be waited for):
          each op runs on the samples that drew it only, ~5x less arithmetic and memory.
        Samples an op skips pass through it unchanged, bit for bit."""
        x = images.float() / 255
        if self.kind == "moco":
            params = params.to(x.device, non_blocking=True)
            if sync_free is None:
                sync_free = x.device.type != "cpu"
            x = moco_device_ops(x, params) if sync_free else moco_device_ops_masked(x, params)
        constants = device_constants(x.device)
        return (x - constants["mean"]) / constants["std"]


def moco_device_ops(x, params):
    """MoCo v2's device ops in the authors' order (jitter, grayscale, blur), sync-free: float
    (B, 3, S, S) in [0, 1] -> the same."""
    x = color_jitter(x, params)
    gray = (params[:, GRAY] > 0).view(-1, 1, 1, 1)
    x = torch.where(gray, grayscale(x).expand_as(x), x)
    sigma = params[:, SIGMA]
    blurred = (sigma > 0).view(-1, 1, 1, 1)
    # 1.0 where there is no blur: any sigma > 0 would do, the result is unused
    return torch.where(blurred, gaussian_blur(x, torch.where(sigma > 0, sigma, 1.0)), x)


def moco_device_ops_masked(x, params):
    """moco_device_ops with each op on the rows that drew it only (boolean-mask indexing, which
    syncs on CUDA): the same arithmetic per sample, so the same bits. Writes into x."""
    on = params[:, JITTER] > 0
    orders = device_constants(x.device)["orders"][params[:, ORDER].long()]  # (B, 4)
    factors = params[:, BRIGHTNESS:HUE + 1].to(x.dtype)
    for slot in range(4):
        op = torch.where(on, orders[:, slot], -1)
        for kind in range(4):
            rows = (op == kind).nonzero().flatten()
            if len(rows):
                x[rows] = jitter_op(x[rows], kind, factors[rows])
    rows = (params[:, GRAY] > 0).nonzero().flatten()
    if len(rows):
        x[rows] = grayscale(x[rows]).expand(-1, 3, -1, -1)
    rows = (params[:, SIGMA] > 0).nonzero().flatten()
    if len(rows):
        x[rows] = gaussian_blur(x[rows], params[rows, SIGMA])
    return x


def decode_jpeg(data, width, height, scale=1):
    """A JPEG (width x height) -> uint8 (H, W, 3) RGB, decoded by libjpeg-turbo at 1/scale (1, 2,
    4 or 8; DCT scaling, as PIL's draft). min_factor with the size it gives forces that scale
    (min_factor alone does not); simplejpeg on its own would also pick M/8 scales, which are slower
    than a full decode and move pixels."""
    return simplejpeg.decode_jpeg(data, "RGB", min_factor=scale, min_width=math.ceil(width / scale),
                                  min_height=math.ceil(height / scale))


def resize_crop(pixels, box, full_size, size):
    """The crop box (left, top, right, bottom), in pixels of the full image (full_size = (width,
    height)), of its decoded pixels (H, W, 3), maybe DCT-scaled -> uint8 (3, size, size), PIL's
    bicubic: torch's uint8 antialiased resize of the crop, a channels-last view (no copy). On a
    DCT-scaled image the box falls between pixels, which a tensor crop would round (measured: 1-3
    grey levels on average from PIL): PIL resizes there from the exact box, as its draft path."""
    if pixels.shape[1] != full_size[0] or pixels.shape[0] != full_size[1]:
        sx, sy = pixels.shape[1] / full_size[0], pixels.shape[0] / full_size[1]
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        out = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC, box=box))
        return torch.from_numpy(out.copy()).permute(2, 0, 1)
    left, top, right, bottom = box
    # (1, 3, h, w), a channels-last view of the decoded (H, W, 3) array
    crop = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, top:bottom, left:right]
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


def resize_crops(images, boxes, size, chunk=128):
    """Crops of uint8 images (a list of (3, H_i, W_i) on one device) at boxes [(left, top, right,
    bottom, flip)], resized to (size, size) as F.interpolate(mode="bicubic", antialias=True) resizes
    each (and PIL's bicubic resize: Keys' cubic, a = -0.5, stretched over the input pixels a output
    pixel covers), flipped where asked -> uint8 (n, 3, size, size). Batched: the crops of a chunk
    are copied into one zero-padded tensor (one copy each) and resized by two batched matmuls with
    per-crop weight matrices (zero outside a crop), instead of ~5 kernel launches per image. On CUDA
    the matmuls follow the TF32 setting: a pixel may then differ from the fp32 result by one level
    of 255."""
    out = []
    for start in range(0, len(images), chunk):
        crops = [image[:, int(top):int(bottom), int(left):int(right)]
                 for image, (left, top, right, bottom, _)
                 in zip(images[start:start + chunk], boxes[start:start + chunk])]
        heights, widths = [c.shape[1] for c in crops], [c.shape[2] for c in crops]
        padded = crops[0].new_zeros((len(crops), 3, max(heights), max(widths)))
        for i, crop in enumerate(crops):
            padded[i, :, :crop.shape[1], :crop.shape[2]] = crop
        device = padded.device
        flips = [bool(box[4]) for box in boxes[start:start + chunk]]
        rows = resample_weights(heights, padded.shape[2], size, device)  # (n, S, H)
        columns = resample_weights(widths, padded.shape[3], size, device)  # (n, S, W)
        flip = _to_device(flips, torch.bool, device).view(-1, 1, 1)
        # flipped: output column j reads the weights of crop column S-1-j
        columns = torch.where(flip, columns.flip(1), columns)
        # (n, 1, S, H) @ (n, 3, H, W) @ (n, 1, W, S) -> (n, 3, S, S)
        resized = rows.unsqueeze(1) @ padded.float() @ columns.unsqueeze(1).transpose(-1, -2)
        out.append(resized.clamp(0, 255).round().to(torch.uint8))
    return torch.cat(out)


def resample_weights(lengths, padded_length, size, device):
    """(n, size, padded_length): row i of sample k holds the weights F.interpolate(mode="bicubic",
    antialias=True) gives input pixels 0 .. lengths[k] - 1 for output pixel i (ATen's
    _compute_weights_aa: support 2 pixels, stretched by the scale when shrinking; normalised to sum
    1); zero beyond the sample's length."""
    length = _to_device(lengths, torch.float, device).view(-1, 1, 1)  # (n, 1, 1)
    scale = length / size
    support = torch.where(scale >= 1, 2 * scale, 2.0)
    inverse = torch.where(scale >= 1, 1 / scale, 1.0)
    # (n, S, 1): each output pixel's centre, in input pixels
    center = scale * (torch.arange(size, device=device, dtype=torch.float).view(1, -1, 1) + 0.5)
    first = torch.floor(center - support + 0.5).clamp(min=0)
    last = torch.minimum(torch.floor(center + support + 0.5), length)  # exclusive
    # (1, 1, L)
    pixel = torch.arange(padded_length, device=device, dtype=torch.float).view(1, 1, -1)
    t = ((pixel - center + 0.5) * inverse).abs()
    a = -0.5  # Keys' cubic as PIL and ATen's antialiased bicubic use it
    cubic = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))
    weights = torch.where((pixel >= first) & (pixel < last), cubic, 0.0)
    return weights / weights.sum(-1, keepdim=True)


def _to_device(values, dtype, device):
    """A small host list on `device` without a blocking copy (pinned, non_blocking) on CUDA."""
    return torch.tensor(values, dtype=dtype, pin_memory=torch.device(device).type == "cuda").to(
        device, non_blocking=True)


_CONSTANTS = {}


def device_constants(device):
    """The augmentation's constant tensors on `device`, made once per device (a host-to-device copy
    each call would wait for the step in flight)."""
    if device not in _CONSTANTS:
        _CONSTANTS[device] = {
            "mean": torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1),
            "std": torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1),
            "orders": ORDERS.to(device),
            "hue_offsets": torch.tensor([5.0, 3.0, 1.0], device=device).view(1, 3, 1, 1),
            "taps": torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=device, dtype=torch.float),
        }
    return _CONSTANTS[device]


# --------------------------------------------------------------------------------------------------
# Batched ops with one parameter per sample; each equals torchvision.transforms.functional's on
# float images in [0, 1] (tests/stage2/test_augment.py holds them side by side).
# --------------------------------------------------------------------------------------------------


def grayscale(x):
    """(n, 3, H, W) -> (n, 1, H, W), ITU-R 601 weights as torchvision."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x, other, factor):
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate the hue of each image by shift[i] (a fraction of the circle): RGB -> HSV, shift H,
    back. HSV -> RGB in closed form: channel n in (R, G, B) = V - V*S*clamp(min(k, 4 - k), 0, 1)
    with k = (n' + 6H) mod 6, n' = (5, 3, 1); V*S is max - min."""
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc  # (n, H, W)
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = ((maxc - x[:, c]) / d for c in range(3))
    h = torch.where(maxc == x[:, 0], b - g, torch.where(maxc == x[:, 1], 2 + r - b, 4 + g - r))
    # h is in (-1, 2): no % needed
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) + shift.view(-1, 1, 1)
    h6 = (h - torch.floor(h)) * 6
    k = device_constants(x.device)["hue_offsets"].to(x.dtype) + h6.unsqueeze(1)
    k = torch.where(k >= 6, k - 6, k)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def jitter_slot(x, op, factors):
    """One slot of every sample's jitter order: sample i gets op[i] (0 brightness, 1 contrast,
    2 saturation, 3 hue, -1 none) with factor factors[i, op[i]],
    factors = params[:, BRIGHTNESS:HUE + 1]. The three linear ops are one blend,
    factor * x + (1 - factor) * other, as torchvision writes each (other: 0 for brightness, the
    image's mean gray for contrast, its gray for saturation); a sample with another op gets factor 1
    and other 0, which leaves it bit for bit unchanged. Hue goes through torch.where (its
    RGB -> HSV -> RGB round trip is not exact). All of it on the whole batch: no boolean-mask
    indexing, so no host sync."""
    linear = (op >= 0) & (op < 3)
    factor = torch.where(linear, factors.gather(1, op.clamp(0, 2).unsqueeze(1)).squeeze(1), 1.0)
    gray = grayscale(x)  # (B, 1, H, W)
    other = torch.where((op == 1).view(-1, 1, 1, 1), _mean_gray(gray),
                        torch.where((op == 2).view(-1, 1, 1, 1), gray, 0.0))
    x = _blend(x, other, factor)
    return torch.where((op == 3).view(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)


def jitter_op(x, op, factors):
    """One op (0 brightness, 1 contrast, 2 saturation, 3 hue) on every image of x, each with its
    factor factors[:, op]: the arithmetic jitter_slot does for the samples that drew it."""
    if op == 3:
        return adjust_hue(x, factors[:, 3])
    other = (x.new_zeros(()) if op == 0 else
             _mean_gray(grayscale(x)) if op == 1 else grayscale(x))
    return _blend(x, other, factors[:, op])


def _mean_gray(gray):
    """(n, 1, H, W) -> (n, 1, 1, 1): each image's mean gray, contrast's `other`, as the mean of its
    rows' means. In two steps so that every image's sum runs in one thread whatever n is: torch
    splits a reduction to a single number (n = 1, as the masked form meets it) over threads, and
    rounds it another way (measured: masked != sync-free at 2 threads)."""
    return gray.mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True)


def _apply_op(op, x, factor):
    """One op, one factor per image, on every image of the batch (what jitter_slot does per
    sample)."""
    factors = factor.view(-1, 1).expand(-1, 4)
    return jitter_slot(x, torch.full((len(x),), op, device=x.device), factors)


def color_jitter(x, params):
    """torchvision's ColorJitter: brightness, contrast, saturation, hue in each sample's own order
    (a sample with the jitter off passes through unchanged)."""
    on = params[:, JITTER] > 0
    orders = device_constants(x.device)["orders"][params[:, ORDER].long()]  # (B, 4)
    factors = params[:, BRIGHTNESS:HUE + 1].to(x.dtype)
    for slot in range(4):
        x = jitter_slot(x, torch.where(on, orders[:, slot], -1), factors)
    return x


def gaussian_blur(x, sigma):
    """Separable Gaussian blur, one sigma per image; edges replicated as PIL's blur does."""
    n, c, h, w = x.shape
    taps = device_constants(x.device)["taps"].to(x.dtype)
    kernel = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, 13)
    y = F.pad(x.reshape(1, n * c, h, w), (BLUR_RADIUS,) * 4, mode="replicate")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)
