"""stage2/augment.py: stage 2's MoCo v2 split between host (crop, uint8) and device (batched,
per-sample params).

Proves, against independent references on real photos (scikit-image's): each batched device op
with one factor per image equals torchvision.transforms.functional's op on that image alone
(brightness, contrast, saturation, hue, grayscale, and the jitter in each sample's own order); the
blur is a Gaussian of the sigma PIL's ImageFilter.GaussianBlur (MoCo v2's blur) uses, close to
PIL's own output; crop boxes are drawn with the distribution of torchvision's RandomResizedCrop;
JPEG draft decoding changes a crop by little; the same seed gives the same sample.
"""
import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from skimage import data as skdata

from stage2 import augment


def photos(size=48):
    return [Image.fromarray(p).convert("RGB").resize((size, size))
            for p in (skdata.astronaut(), skdata.coffee(), skdata.chelsea())]


def batch():
    return torch.stack([TF.to_tensor(p) for p in photos()])  # (3, 3, 48, 48) in [0, 1]


@pytest.mark.parametrize("op, reference, factors", [
    (0, TF.adjust_brightness, (0.6, 1.0, 1.4)),
    (1, TF.adjust_contrast, (0.65, 1.2, 1.39)),
    (2, TF.adjust_saturation, (0.6, 0.9, 1.4)),
    (3, TF.adjust_hue, (-0.1, 0.03, 0.1)),
])
def test_each_jitter_op_equals_torchvision_per_image(op, reference, factors):
    x = batch()
    ours = augment._apply_op(op, x, torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(ours[i], reference(x[i], f), atol=2e-6, rtol=0)


def test_jitter_runs_each_samples_own_order_and_grayscale_equals_torchvision():
    x = batch()
    params = torch.zeros(3, augment.NUM_PARAMS)
    params[:, augment.JITTER] = torch.tensor([1.0, 1.0, 0.0])
    params[:, augment.ORDER] = torch.tensor([0.0, 23.0, 5.0])
    params[:, augment.BRIGHTNESS:augment.HUE + 1] = torch.tensor(
        [[1.3, 0.7, 1.2, 0.05], [0.8, 1.3, 0.6, -0.08], [1.1, 1.1, 1.1, 0.1]])
    ours = augment.color_jitter(x, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(2):
        expected = x[i]
        for op in augment.ORDERS[int(params[i, augment.ORDER])].tolist():
            expected = ops[op](expected, float(params[i, augment.BRIGHTNESS + op]))
        torch.testing.assert_close(ours[i], expected, atol=5e-6, rtol=0)
    assert torch.equal(ours[2], x[2])  # jitter off for this one
    torch.testing.assert_close(augment.grayscale(x)[1], TF.rgb_to_grayscale(x[1]), atol=1e-6,
                               rtol=0)


def test_blur_is_pils_gaussian():
    """The same Gaussian as torchvision's 23-px kernel (13 taps hold it to 3 sigma), and as close to
    PIL's box-filter approximation of it as torchvision's is (PIL's output is rounded to uint8)."""
    photo = Image.fromarray(skdata.astronaut()).resize((224, 224))
    x = TF.to_tensor(photo)[None] * 255
    for sigma in (0.5, 1.0, 2.0):
        ours = augment.gaussian_blur(x, torch.tensor([sigma]))[0].round()
        torchvision_23px = TF.gaussian_blur(x[0], 23, sigma).round()
        pil = TF.to_tensor(photo.filter(ImageFilter.GaussianBlur(sigma))) * 255
        assert (ours - torchvision_23px).abs().mean() < 0.2, sigma
        # in grey levels
        assert (ours - pil).abs().mean() < min(0.5, 0.25 * (x[0] - pil).abs().mean()), sigma


def test_crop_boxes_follow_torchvisions_distribution():
    rng = __import__("random").Random(0)
    torch.manual_seed(0)  # torchvision's get_params draws from torch's global generator
    image = Image.new("RGB", (500, 375))
    ours = [augment.random_resized_crop_box(500, 375, (0.2, 1.0), (3 / 4, 4 / 3), rng)
            for _ in range(3000)]
    theirs = [T.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
              for _ in range(3000)]
    area = np.array([(r - l) * (b - t) for l, t, r, b in ours]) / (500 * 375)
    area_tv = np.array([h * w for _, _, h, w in theirs]) / (500 * 375)
    aspect = np.log([(r - l) / (b - t) for l, t, r, b in ours])
    aspect_tv = np.log([w / h for _, _, h, w in theirs])
    assert abs(area.mean() - area_tv.mean()) < 0.02 and abs(area.std() - area_tv.std()) < 0.02
    assert (abs(aspect.mean() - aspect_tv.mean()) < 0.02
            and abs(aspect.std() - aspect_tv.std()) < 0.02)
    # Every box inside the image and within the scale range (whole pixels: its area may miss it by
    # < 1%).
    assert (area.min() > 0.2 * 0.99 and area.max() <= 1.0
            and (np.array(ours)[:, 2:] <= (500, 375)).all())


def test_host_half_is_seeded_and_draft_decoding_changes_little():
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, "JPEG", quality=90)  # 512 x 512
    jpeg = buffer.getvalue()
    transform = augment.TrainTransform(64, "train")  # crops of >= 90% area: 1/4-scale drafts
    a, pa = transform.host_half(jpeg, 7)
    b, pb = transform.host_half(jpeg, 7)
    assert (a.dtype == torch.uint8 and a.shape == (3, 64, 64) and torch.equal(a, b)
            and torch.equal(pa, pb))
    assert not torch.equal(a, transform.host_half(jpeg, 8)[0])
    full, _ = augment.TrainTransform(64, "train", draft=False).host_half(jpeg, 7)
    assert (a.float() - full.float()).abs().mean() < 3  # grey levels of 255
    images = torch.stack([augment.TrainTransform(64, "moco").host_half(jpeg, s)[0]
                          for s in range(4)])
    params = torch.stack([augment.TrainTransform(64, "moco").host_half(jpeg, s)[1]
                          for s in range(4)])
    out = augment.TrainTransform(64, "moco").device_half(images, params)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 64, 64) and torch.isfinite(out).all()
