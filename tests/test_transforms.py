"""data.image_transform gives the same tensors as open_clip's preprocessing on real photos.

Evaluation ("eval": resize the shorter side, bicubic, centre crop) must be exact: it decides every
zero-shot number. Training transforms are random, so they are checked for shape, statistics of the
normalisation and determinism under a fixed seed.
"""
import pytest
import torch
from PIL import Image

import data

open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data")


def real_photos():
    # CC0 / public-domain photos shipped inside scikit-image; one greyscale, one non-square.
    return [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.camera()),
            Image.fromarray(skimage_data.coffee())]


@pytest.mark.parametrize("size", [224, 64])
def test_eval_transform_equals_open_clip(size):
    reference = open_clip.image_transform(size, is_train=False)
    ours = data.image_transform(size, "eval")
    for photo in real_photos():
        torch.testing.assert_close(ours(photo), reference(photo), atol=0, rtol=0)


def test_train_transforms_are_seeded_and_shaped():
    photo = real_photos()[2]
    for kind in ["train", "moco", "nights"]:
        transform = data.image_transform(64, kind)
        torch.manual_seed(0)
        first = transform(photo)
        torch.manual_seed(0)
        assert torch.equal(first, transform(photo)), kind
        assert first.shape == (3, 64, 64), kind


def test_nights_transform_keeps_the_whole_image():
    """Stage 1 resizes to a square without cropping: reference and distortions stay aligned."""
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 40))  # a blue band at the far left
    tensor = data.image_transform(32, "nights")(image)
    assert tensor[2, 16, 0] > tensor[0, 16, 0]  # the band survives (a centre crop would cut it off)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown transform kind 'flip'"):
        data.image_transform(32, "flip")
