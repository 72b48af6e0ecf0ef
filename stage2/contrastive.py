"""Stage 2's objective: the CLIP contrastive loss over the global batch, or over fixed groups of
it, and one optimiser step's gradients by cached-feature accumulation.

  loss = contrastive_loss(image_features, text_features, logit_scale)    # all N pairs
  loss = contrastive_loss(..., slots=slots, group_size=1024)             # groups of 1,024
  loss = accumulate_gradients(forward, images, tokens, accum_steps, amp, scaler, ddp, valid, slots,
                              group_size)

Two objectives, both exact:
  - the large batch (group_size 0, the default): every pair's negatives are the other N - 1 pairs
    of the global batch (open_clip with --accum-freq, cached features);
  - groups (`contrastive_batch` in train_clip.py): the global batch is cut into groups of
    `group_size` consecutive positions; each loss contrasts a group's pairs among themselves and
    the losses of the groups are averaged. This is what the PI authors' run computes: Lightning's
    accumulate_grad_batches averages the gradients of micro-batches whose ClipLoss contrasts the
    micro-batch gathered over all GPUs (github cheesepuff90/Brain_Initialization src/loss.py
    ClipLoss, gather_with_grad forced True in src/lightning_module.py).
A group is named by position in the global batch (`slots`, from stage2/shards.py's Loader: stream
s's share of the batch holds positions s * p ... s * p + p - 1), never by rank or micro-batch, so
the result is the same on any number of ranks, workers or micro-batches; where a group spans
several micro-batches, cached features carry it (the gradient is still exact).
"""
import torch
import torch.distributed as dist
# torch.distributed.nn.functional.all_gather: an all-gather with gradients
import torch.distributed.nn  # noqa: F401
import torch.nn.functional as F

import training
from model import running_statistics_kept

# -1e4 is far below any logit (|logit| <= 100): its exp is exactly 0, as -inf's would be, yet a row
# of padding alone stays finite (its loss and gradient are then dropped by cross_entropy's
# ignore_index).
HIDDEN = -1e4


def _distributed():
    return dist.is_available() and dist.is_initialized()


def gather(x):
    """(n, E) on each rank -> (world * n, E), rank order; gradients flow back to every rank's
    rows."""
    if not _distributed():
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def gather_plain(x):
    """(n,) on each rank -> (world * n,), rank order, without gradient (masks, positions)."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def contrastive_loss(image_features, text_features, logit_scale, valid=None, slots=None,
                     group_size=0):
    """Symmetric InfoNCE, computing this rank's n rows only: its images against the texts they are
    contrasted with, and its texts against those images (open_clip's local loss). DDP averages
    gradients over ranks; the all-gather's backward sums them, so the result is the gradient of the
    global loss.

    Without groups: over the whole global batch of N pairs. With `group_size` (and `slots`, (n,)
    each row's position in the global batch): over groups of group_size consecutive positions, the
    mean of the groups' losses.

    `valid` (n,) bool marks real rows: the loader pads a batch that lost bad samples. Padded rows
    are neither anchors nor negatives, and the loss is the mean over the valid rows of ALL ranks
    (scaled by the world size, which DDP's average divides out): the gradient of the large batch of
    good samples, however the good ones fall over ranks. (With groups and padding, groups then
    weigh by their good rows; without padding every group weighs the same.)"""
    if group_size:
        if slots is None:  # silently contrasting the whole batch would be another objective
            raise ValueError("contrastive groups need each row's position in the global batch "
                             "(slots)")
        return _grouped_loss(image_features, text_features, logit_scale, valid, slots, group_size)
    n, rank = image_features.shape[0], dist.get_rank() if dist.is_initialized() else 0
    all_images, all_texts = gather(image_features), gather(text_features)  # (N, E)
    logits_per_image = logit_scale * image_features @ all_texts.T  # (n, N)
    logits_per_text = logit_scale * text_features @ all_images.T  # (n, N)
    # each row's pair in the global batch
    labels = torch.arange(n, device=image_features.device) + n * rank
    if valid is None:
        return (F.cross_entropy(logits_per_image, labels)
                + F.cross_entropy(logits_per_text, labels)) / 2
    all_valid = gather_plain(valid)  # (N,)
    hide = torch.zeros(all_valid.shape, dtype=logits_per_image.dtype,
                       device=valid.device).masked_fill(~all_valid, HIDDEN)
    labels = labels.masked_fill(~valid, -100)  # cross_entropy's ignore_index: no loss, no gradient
    total = (F.cross_entropy(logits_per_image + hide, labels, reduction="sum")
             + F.cross_entropy(logits_per_text + hide, labels, reduction="sum")) / 2
    world = dist.get_world_size() if dist.is_initialized() else 1
    return total * world / all_valid.sum().clamp(min=1)


def _grouped_loss(image_features, text_features, logit_scale, valid, slots, group_size):
    """The loss over groups of `group_size` positions; see contrastive_loss. Only the group blocks
    of the similarity matrix are computed: (n, group_size) logits in all, not (n, N)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    order = torch.argsort(gather_plain(slots))  # gathered (rank-order) row -> position order
    # (N, E), row k = position k
    all_images, all_texts = gather(image_features)[order], gather(text_features)[order]
    all_valid = gather_plain(valid)[order] if valid is not None else None
    groups = torch.div(slots, group_size, rounding_mode="floor")  # (n,) each row's group
    by_group = torch.argsort(groups, stable=True)
    # one host sync
    counts = torch.bincount(groups, minlength=all_images.shape[0] // group_size).tolist()
    total = image_features.new_zeros((), dtype=torch.float32)
    for g, rows in enumerate(by_group.split(counts)):
        if not len(rows):
            continue
        block = slice(g * group_size, (g + 1) * group_size)
        # (m, group_size)
        logits_per_image = logit_scale * image_features[rows] @ all_texts[block].T
        logits_per_text = logit_scale * text_features[rows] @ all_images[block].T
        labels = slots[rows] - g * group_size  # each row's pair inside its group
        if all_valid is not None:
            hide = torch.zeros(group_size, dtype=logits_per_image.dtype, device=slots.device)
            hide = hide.masked_fill(~all_valid[block], HIDDEN)
            logits_per_image, logits_per_text = logits_per_image + hide, logits_per_text + hide
            labels = labels.masked_fill(~valid[rows], -100)
        total = total + (F.cross_entropy(logits_per_image, labels, reduction="sum")
                         + F.cross_entropy(logits_per_text, labels, reduction="sum")) / 2
    count = all_valid.sum().clamp(min=1) if all_valid is not None else all_images.shape[0]
    return total * world / count


def accumulate_gradients(model, images, tokens, accum_steps, amp, scaler, ddp=None, valid=None,
                         slots=None, group_size=0):
    """Gradients of the contrastive loss of the whole batch (or of its groups), in `accum_steps`
    micro-batches.

    A contrastive loss cannot average micro-batch losses: every pair's negatives are the whole
    batch (or group). open_clip's scheme: embed every micro-batch without gradients and cache the
    features; then re-embed each micro-batch with gradients, put its fresh features among the
    cached ones, and backward the full loss. Micro-batch j's backward yields dL/df_j * df_j/dtheta;
    their sum is dL/dtheta exactly. logit_scale enters every re-forward, so it keeps its gradient
    in one of them only (the last, where DDP synchronises); open_clip lets it accumulate
    accum_steps times. A ResNet's BatchNorm normalises each micro-batch by its own statistics (so
    with a ResNet, accum_steps is part of the recipe); the cached pass leaves the running
    statistics alone, so they are updated once per micro-batch. `model` runs the forward (plain,
    DDP or compiled); `ddp` is the DistributedDataParallel under it, if any, whose no_sync() keeps
    the non-last micro-batches from all-reducing. `valid` (n,) marks the rows that hold a sample (a
    batch is padded after bad samples); `slots` and `group_size`: see contrastive_loss. Returns the
    loss (a tensor: no host sync).
    """
    loss_of = dict(valid=valid, slots=slots, group_size=group_size)
    if accum_steps == 1:
        with amp:
            loss = contrastive_loss(*model(images, tokens), **loss_of)
        scaler.scale(loss).backward()
        return loss.detach()
    # chunk sizes differ by at most 1
    image_chunks, token_chunks = images.tensor_split(accum_steps), tokens.tensor_split(accum_steps)
    with torch.no_grad(), amp, running_statistics_kept(model):
        cached = [model(i, t)[:2] for i, t in zip(image_chunks, token_chunks)]
    cached_images, cached_texts = [c[0] for c in cached], [c[1] for c in cached]
    for j in range(accum_steps):
        last = j == accum_steps - 1
        with training.no_sync(ddp, skip=not last):
            with amp:
                image_features, text_features, logit_scale = model(image_chunks[j], token_chunks[j])
                # (n, E): this micro-batch's fresh features among the cached ones
                all_images = torch.cat(cached_images[:j] + [image_features] + cached_images[j + 1:])
                all_texts = torch.cat(cached_texts[:j] + [text_features] + cached_texts[j + 1:])
                loss = contrastive_loss(all_images, all_texts,
                                        logit_scale if last else logit_scale.detach(), **loss_of)
            scaler.scale(loss).backward()
    return loss.detach()
