"""decode_on_device (shards.Loader + augment.TrainTransform.decode_jpegs_on_device), with
torchvision's CPU JPEG decoder standing in for nvjpeg (the same torchvision.io.decode_jpeg call,
device="cpu").

Proves:
- the batched crop resize equals F.interpolate(mode="bicubic", antialias=True) run on each crop
  alone (the per-image path it replaces), flips included, bit for bit after rounding to uint8 (CPU,
  fp32);
- a truncated JPEG (header intact, so the worker's header read passes and only the decode fails),
  planted in a shard, is counted as bad_image and its sample dropped, as the host path (PIL) drops
  it: the batches' sample indices, tokens, params, validity and skip counts equal the host path's,
  and the decoded images are close to the host path's (another resize).
"""
import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stage2 import augment  # noqa: E402
from stage2 import shards  # noqa: E402
from stage2 import formats  # noqa: E402
from world.make_data import write_shards  # noqa: E402
from tests.stage2.test_formats import caption, photo_jpeg  # noqa: E402


def test_batched_resize_equals_interpolate_per_crop():
    g = torch.Generator().manual_seed(0)
    sizes = [(50, 60), (300, 200), (224, 224), (100, 400), (30, 30)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    boxes = [(3, 5, 45, 50, 0), (10, 20, 190, 290, 1), (0, 0, 224, 224, 0), (50, 10, 390, 95, 1),
             (2, 2, 20, 29, 0)]
    ours = augment.resize_crops(images, boxes, 64, chunk=3)  # two chunks
    for image, (left, top, right, bottom, flip), out in zip(images, boxes, ours):
        crop = image[:, top:bottom, left:right].unsqueeze(0).float()
        expected = F.interpolate(crop, size=(64, 64), mode="bicubic", antialias=True,
                                 align_corners=False)
        expected = expected.clamp(0, 255).round().to(torch.uint8)[0]
        assert torch.equal(out, expected.flip(-1) if flip else expected)


def test_a_truncated_jpeg_is_counted_as_bad_image_as_on_the_host(tmp_path):
    truncated = photo_jpeg(7, size=120)
    truncated = truncated[: len(truncated) * 2 // 3]
    # the header reads: only decoding fails
    assert Image.open(io.BytesIO(truncated)).size == (120, 120)

    def pairs():
        for i in range(40):
            yield f"{i:05d}", {"jpg": truncated if i == 7 else photo_jpeg(i, size=120),
                               "txt": caption(i)}

    write_shards(tmp_path, pairs(), per_shard=10)
    units = formats.list_units(str(tmp_path / "{00000..00003}.tar"), progress=False)
    transform = augment.TrainTransform(48, "moco", draft=False)

    def epoch(**kwargs):
        loader = shards.Loader(units, transform, 8, 4, shuffle_buffer=5, **kwargs)
        return list(loader.delivered_batches(0))

    plain, on_device = epoch(), epoch(workers=2, decode_on_device=True)
    bad_image = formats.SKIP_REASONS.index("bad_image")
    assert sum(int(b["skipped"][bad_image]) for b in plain) == 1  # the host path drops it too (PIL)
    assert len(plain) == len(on_device) == 5
    for a, b in zip(plain, on_device):
        for key in ("indices", "params", "tokens", "valid", "skipped"):
            assert torch.equal(a[key], b[key]), key
        # grey levels: another resize
        assert (a["images"].float() - b["images"].float()).abs().mean() < 3
