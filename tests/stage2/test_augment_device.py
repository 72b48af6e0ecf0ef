"""augment.TrainTransform.device_half, the augmentation's GPU half, as the training loop calls it on
a batch.

Proves (on the CPU, with real photos from scikit-image):
- each sample's output equals torchvision.transforms.functional's ops applied to that image alone
  with the parameters TrainTransform.draw drew for it: the jitter in its own order (TF.adjust_*),
  the grayscale (TF.rgb_to_grayscale), the blur (TF.gaussian_blur with 13 taps after replicate
  padding, PIL's edge rule) and CLIP's normalisation (TF.normalize); a sample an op skips is
  unchanged bit for bit;
- the batched call makes no host sync: no `.item()` / `bool()` / `.tolist()` of a device value, no
  boolean-mask indexing (a nonzero on CUDA) and no fresh constant tensor (a host-to-device copy on
  CUDA), each of which makes the host wait for the step in flight. A TorchDispatchMode sees every
  aten call and records those that sync on CUDA; the check itself is shown to catch each kind;
- the masked form a CPU device takes (each op on the samples that drew it) gives the sync-free
  form's output bit for bit, at 224 px and 40, one thread or two, batches of 1 to 64.
"""
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from skimage import data as skdata
from torch.utils._python_dispatch import TorchDispatchMode

from stage2 import augment
from data import CLIP_MEAN, CLIP_STD
# torchvision's ops on one sample, with its drawn parameters
from tests.stage2.test_train_transform import reference_device

SIZE = 40


def photo_batch(n):
    """n uint8 (3, SIZE, SIZE) crops of real photos."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    crops = []
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        left = 17 * i % (photo.width - 4 * SIZE)
        crops.append(TF.pil_to_tensor(
            photo.crop((left, 0, left + 4 * SIZE, 4 * SIZE)).resize((SIZE, SIZE))))
    return torch.stack(crops)


def drawn_params(n):
    """The params TrainTransform.draw gives n samples (the seeds are chosen so that every case
    occurs)."""
    transform = augment.TrainTransform(SIZE, "moco")
    params = torch.stack([transform.draw(100, 100, seed)[1] for seed in range(n)])
    for column in (augment.JITTER, augment.GRAY, augment.SIGMA):
        assert 0 < int((params[:, column] > 0).sum()) < n, column
    return params


def test_batched_device_half_equals_torchvision_per_sample():
    images, params = photo_batch(24), drawn_params(24)
    ours = augment.TrainTransform(SIZE, "moco").device_half(images, params)
    for i in range(len(images)):
        torch.testing.assert_close(ours[i], reference_device(images[i], params[i]), atol=2e-5,
                                   rtol=0, msg=f"sample {i}")
    untouched = ((params[:, augment.JITTER] == 0) & (params[:, augment.GRAY] == 0)
                 & (params[:, augment.SIGMA] == 0))
    assert untouched.any()
    plain = TF.normalize(images[untouched].float() / 255, CLIP_MEAN, CLIP_STD)
    assert torch.equal(ours[untouched], plain)  # skipped ops leave a sample bit for bit as it was


# On CUDA each of these makes the host wait for the device: reading a value (item, bool, tolist),
# a data-dependent size (nonzero, boolean-mask index / select), or a fresh constant made from host
# data.
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "lift_fresh_copy"}


class HostSyncs(TorchDispatchMode):
    """Records the aten calls, made inside it, that synchronise with a CUDA device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        boolean_index = name.startswith("index") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for arg in args if isinstance(arg, (list, tuple)) for a in arg)
        if name in SYNCING or boolean_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_the_sync_check_catches_each_kind():
    x, mask = torch.rand(4, 3), torch.tensor([True, False, True, False])
    for syncing in (lambda: bool((x > 0.5).any()), lambda: x.sum().item(), lambda: x[mask],
                    lambda: x.__setitem__(mask, 0.0), lambda: torch.tensor([1.0, 2.0])):
        with HostSyncs() as check:
            syncing()
        assert check.calls, syncing


@pytest.mark.parametrize("kind", ["moco", "train"])
def test_device_half_makes_no_host_sync(kind):
    images, params = photo_batch(8), drawn_params(8)
    transform = augment.TrainTransform(SIZE, kind)
    # the first call on a device makes its constants, once
    transform.device_half(images, params, sync_free=True)
    with HostSyncs() as check:
        transform.device_half(images, params, sync_free=True)
    assert check.calls == []


def test_a_cpu_takes_the_masked_form_and_it_gives_the_same_bits():
    transform = augment.TrainTransform(SIZE, "moco")
    images, params = photo_batch(8), drawn_params(8)
    with HostSyncs() as check:
        transform.device_half(images, params)  # on the CPU: the masked form
    assert "nonzero" in check.calls
    threads_before = torch.get_num_threads()
    for threads in (1, 2):  # a reduction split over threads must not round another way
        torch.set_num_threads(threads)
        for n, size in ((1, 224), (5, 224), (24, SIZE), (64, SIZE)):
            g = torch.Generator().manual_seed(n)
            images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
            params = torch.stack([augment.TrainTransform(size, "moco").draw(300, 300, 17 * n + i)[1]
                                  for i in range(n)])
            masked = transform.device_half(images, params, sync_free=False)
            assert torch.equal(masked, transform.device_half(images, params, sync_free=True)), (
                threads, n, size)
    torch.set_num_threads(threads_before)
