"""stage2/contrastive.py: the loss over groups of the global batch (`contrastive_batch`), the PI
authors' objective, against open_clip.

Proves: with groups, the loss equals open_clip's ClipLoss computed on each group of consecutive
positions and averaged, whatever order the rows arrive in (groups are named by position, `slots`);
groups as large as the batch give the whole-batch loss; through train_clip.train_step, the
gradients of one step equal those of the open_clip reference by autograd, at once and with
cached-feature accumulation in micro-batches smaller than a group; on 2 DDP ranks (torchrun, gloo)
holding the rows as stage2/shards.py's Loader deals them (stream r, r + 2, ...), the averaged loss
and the gradients equal the same reference, with and without accumulation; and the Loader gives
each row the same position (slot) on 1 and on 2 ranks, padding included. fp32 on the CPU, tiny
preset.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import training  # noqa: E402
from stage2 import contrastive  # noqa: E402
import train_clip  # noqa: E402
from tests.test_train_clip import global_batch, tiny_model  # noqa: E402

FP32 = training.autocast("cpu", "fp32")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def reference(image, text, scale, group_size):
    """open_clip's ClipLoss on each group of consecutive rows (rows in position order), averaged."""
    from open_clip.loss import ClipLoss

    groups = range(0, len(image), group_size)
    return sum(ClipLoss()(image[g:g + group_size], text[g:g + group_size], scale)
               for g in groups) / len(groups)


def features(n=12, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g), dim=-1),
            F.normalize(torch.randn(n, dim, generator=g), dim=-1), torch.tensor(14.3))


def test_groups_equal_open_clip_per_group_averaged_in_any_row_order():
    image, text, scale = features(12)
    expected = reference(image, text, scale, 4)
    # rows arrive shuffled, slots say where they belong
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    got = contrastive.contrastive_loss(image[order], text[order], scale, slots=order, group_size=4)
    assert torch.allclose(got, expected, atol=1e-6)
    # one group of all: the large-batch loss
    whole = contrastive.contrastive_loss(image, text, scale)
    assert torch.allclose(
        contrastive.contrastive_loss(image[order], text[order], scale, slots=order, group_size=12),
        whole, atol=1e-6)
    assert not torch.allclose(got, whole, atol=1e-3)  # groups are another objective


def step_gradients(images, tokens, accum_steps, contrastive_batch, slots=None):
    """One train_clip.train_step (the loop's) on a fresh tiny model -> (loss, {name: grad})."""
    model = tiny_model()
    cfg = train_clip.Config(batch_size=len(images), accum_steps=accum_steps,
                            contrastive_batch=contrastive_batch, lr=1e-3)
    optimizer = training.make_optimizer(model, cfg, "cpu")
    slots = torch.arange(len(images)) if slots is None else slots
    loss = train_clip.train_step(model, model, None, optimizer, training.grad_scaler("cpu", "fp32"),
                                 FP32, images, tokens, cfg.lr, cfg, None, slots)
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def reference_gradients(images, tokens, group_size):
    model = tiny_model()
    loss = reference(*model(images, tokens), group_size)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(got, expected):
    assert abs(got[0] - expected[0]) < 1e-5
    for name, grad in expected[1].items():
        assert torch.allclose(got[1][name], grad, atol=1e-6, rtol=1e-4), name


def test_a_step_with_groups_has_the_reference_gradients_at_once_and_accumulated():
    torch.set_num_threads(1)
    images, tokens = global_batch(8)
    expected = reference_gradients(images, tokens, 4)
    assert_same(step_gradients(images, tokens, 1, 4), expected)
    # micro-batches of 2 inside groups of 4: cached features
    assert_same(step_gradients(images, tokens, 4, 4), expected)
    # contrastive_batch 0: the whole batch, as before groups existed
    whole = step_gradients(images, tokens, 1, 0)
    assert abs(whole[0] - expected[0]) > 1e-3


def test_the_loader_places_rows_by_position_the_same_on_one_and_two_ranks(tmp_path):
    """stage2/shards.py's Loader's `slots`: the rows of rank 0 and rank 1 of 2, put at their slots,
    are the rows of one rank's batch at its slots; padding rows (bad samples) take the slots their
    stream left empty."""
    from tests.stage2.test_shards import corrupt_shards, loader

    spec, _ = corrupt_shards(tmp_path / "bad")  # 24 samples, 15 bad: batches are padded
    one = list(loader(spec, batch_size=8, streams=4).delivered_batches(0))
    two = [list(loader(spec, batch_size=8, streams=4, rank=r, world_size=2).delivered_batches(0))
           for r in (0, 1)]
    assert any(not b["valid"].all() for b in one)
    for step, batch in enumerate(one):
        placed = torch.full((8,), -2)
        placed[batch["slots"]] = batch["indices"]
        assert sorted(batch["slots"].tolist()) == list(range(8))
        for rank in (0, 1):
            assert torch.equal(placed[two[rank][step]["slots"]],
                               two[rank][step]["indices"]), (step, rank)


def ddp_worker(out):
    """Run by torchrun: rank r holds streams r and r + 2 of 4 (2 rows each), as stage2/shards.py's
    Loader deals them."""
    torch.set_num_threads(1)
    ranks = training.setup_distributed("cpu")
    images, tokens = global_batch(8)  # rows in position order
    slots = torch.tensor([p for stream in (ranks.rank, ranks.rank + 2)
                          for p in (2 * stream, 2 * stream + 1)])
    results = {}
    for accum_steps in (1, 2):
        model = tiny_model()
        forward, ddp = training.wrap_model(model, ranks)
        cfg = train_clip.Config(batch_size=8, accum_steps=accum_steps, contrastive_batch=4, lr=1e-3)
        optimizer = training.make_optimizer(model, cfg, "cpu")
        loss = train_clip.train_step(model, forward, ddp, optimizer,
                                     training.grad_scaler("cpu", "fp32"), FP32, images[slots],
                                     tokens[slots], cfg.lr, cfg, None, slots)
        results[accum_steps] = (training.all_reduce_sum([loss.item()], "cpu")[0] / ranks.world_size,
                                {name: p.grad.clone() for name, p in model.named_parameters()})
    if ranks.is_main:
        torch.save(results, out)
    training.cleanup_distributed()


@pytest.mark.slow
def test_two_ranks_with_groups_equal_the_reference(tmp_path):
    out = tmp_path / "groups.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", __file__, str(out)],
                   check=True, env=ENV, cwd=ROOT, timeout=180)
    results = torch.load(out, weights_only=True)
    torch.set_num_threads(1)
    images, tokens = global_batch(8)
    expected = reference_gradients(images, tokens, 4)
    for accum_steps in (1, 2):
        assert_same(results[accum_steps], expected)


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
