"""Stage 2's data split and its held-out score: which units train, which are held out, and how
the held-out pairs score during training.

  train_units, held_out = split_units(units, data_fraction=0.2, max_samples=0, val_samples=10_000)
  pairs = HeldOutPairs(held_out, 10_000, image_size=224)    # read once, kept undecoded
  metrics = pairs.score(model, device, precision)           # {"val/contrastive_loss": ..., ...}

The split is a function of the units' names and counts alone (not of ranks, workers, seed or the
order the files were listed in), so every rank, every resume and every run on the same data (the
PI run and its baseline) gets the same one. Units are ordered by a hash of (file name, row group);
the held-out units come first in that order, then the training subset. Whole units are held out:
the training stream never sees a held-out sample, and what the held-out units hold beyond
val_samples (at most one unit's worth) is used by neither.

The PI authors hold out 10,000 pairs of YFCC15M (github cheesepuff90/Brain_Initialization
src/dataset.py create_dataloaders, val_split_size) and log their contrastive loss; the kit adds
image-to-text and text-to-image recall@1/5/10 (analysis/zero_shot.py's retrieval_metrics, proved
against CLIP_benchmark in tests/test_evaluate.py).
"""
import functools
import hashlib
import os

import torch
import torch.nn.functional as F

from analysis import zero_shot
from stage2 import formats
from stage2.augment import NUM_PARAMS, TrainTransform

RECALL_KS = (1, 5, 10)


def _unit_key(unit):
    """A unit's place in the split order: a hash of its file's name and row group (not the folder,
    so moving the data keeps the split)."""
    name = f"{os.path.basename(unit.path)}:{unit.row_group}"
    return hashlib.blake2b(name.encode(), digest_size=8).digest()


def split_units(units, data_fraction=1.0, max_samples=0, val_samples=0):
    """-> (training units, held-out units). Held out: the first units in hash order holding at
    least val_samples samples. Training: the next units in hash order until they hold data_fraction
    of the remaining samples and, with max_samples, at least max_samples (all of them by default);
    kept in the order given (the loader shuffles them each epoch)."""
    if not 0 < data_fraction <= 1:
        raise ValueError(f"data_fraction must be in (0, 1], got {data_fraction}")
    ordered = sorted(range(len(units)), key=lambda i: _unit_key(units[i]))
    held, count = [], 0
    while count < val_samples and len(held) < len(ordered):
        held.append(ordered[len(held)])
        count += units[held[-1]].samples
    if count < val_samples:
        raise ValueError(f"val_samples={val_samples}: the data holds only {count} samples")
    rest = ordered[len(held):]
    target = data_fraction * sum(units[i].samples for i in rest)
    if max_samples:
        target = min(target, max_samples)
    chosen, count = set(), 0
    for i in rest:
        # the default keeps every unit, empty ones too
        if count >= target and (data_fraction < 1 or max_samples):
            break
        chosen.add(i)
        count += units[i].samples
    return [u for i, u in enumerate(units) if i in chosen], [units[i] for i in held]


def _decode_rows(transform, images, rows):
    """A DataLoader's collate_fn (a module-level function: picklable where workers are spawned)."""
    return torch.stack([transform.host_half(images[i], 0)[0] for i in rows])


class HeldOutPairs:
    """The first `count` good pairs of the held-out units, read once and kept undecoded (JPEG bytes
    and tokens: ~20 kB a pair), decoded with the evaluation transform (centre crop) at each
    score."""

    def __init__(self, units, count, image_size, context_length=77, image_column="images",
                 text_column="texts"):
        self.images, self.tokens = [], []
        for unit in units:
            for sample in formats.read_unit(unit, 0, image_column=image_column,
                                            text_column=text_column):
                if len(self.images) == count:
                    break
                if "problem" in sample or sample.get("image") is None:
                    continue
                tokens = formats.caption_tokens(sample, context_length)
                if isinstance(tokens, str):  # a skip reason
                    continue
                self.images.append(bytes(sample["image"]))
                self.tokens.append(tokens)
        if not self.images:
            raise ValueError(f"val_samples: the held-out units ({', '.join(u.path for u in units)})"
                             " hold no good pair")
        self.transform = TrainTransform(image_size, "eval")

    def __len__(self):
        return len(self.images)

    @torch.no_grad()
    def score(self, model, device, amp, batch_size=256, workers=0):
        """-> {"val/contrastive_loss", "val/image_to_text_recall@k", "val/text_to_image_recall@k"}:
        the CLIP loss over all held-out pairs at once (so its value depends on their number: ln N
        at chance) and retrieval among them. The model is left in the mode it came in."""
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(
            range(len(self)), batch_size=batch_size, num_workers=workers,
            collate_fn=functools.partial(_decode_rows, self.transform, self.images))
        image_features, text_features, first = [], [], 0
        for images in loader:
            images = self.transform.device_half(images.to(device),
                                                torch.zeros(len(images), NUM_PARAMS, device=device))
            tokens = torch.stack(self.tokens[first:first + len(images)]).to(device)
            first += len(images)
            with amp:
                image, text, logit_scale = model(images, tokens)
            image_features.append(image.float())
            text_features.append(text.float())
        model.train(was_training)
        image, text = torch.cat(image_features), torch.cat(text_features)  # (N, E), normalised
        logits = logit_scale.float() * image @ text.T  # (N images, N texts)
        labels = torch.arange(len(image), device=image.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        recalls = zero_shot.retrieval_metrics((text @ image.T).cpu(), torch.arange(len(image)),
                                              ks=RECALL_KS)
        metrics = {"val/contrastive_loss": loss.item()}
        # analysis/zero_shot.py's names: image retrieval = text -> image,
        # text retrieval = image -> text
        for k in RECALL_KS:
            metrics[f"val/image_to_text_recall@{k}"] = recalls[f"text_retrieval_recall@{k}"]
            metrics[f"val/text_to_image_recall@{k}"] = recalls[f"image_retrieval_recall@{k}"]
        return metrics
