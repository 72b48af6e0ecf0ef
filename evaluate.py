"""Evaluation: every metric of the kit lives here, and both trainers call it for periodic evaluation.

  python evaluate.py --suite all                      # the paper's 31 zero-shot tasks
  python evaluate.py --ckpt pi.pt --ckpt base.pt --suite vtab --data-root DIR

Sections:
  NIGHTS 2AFC   DreamSim's two-alternative forced-choice score (stage 1's metric)
  zero-shot     CLIP_benchmark's classification and retrieval metrics, tasks, tables and the CLI
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import autocast


# ---------------------------------------------------------------------------------------------------
# NIGHTS 2AFC
# ---------------------------------------------------------------------------------------------------


def two_afc_score(d0, d1, p):
    """DreamSim's 2AFC score per triplet: the share of observers the metric agrees with.
    d0 = d(ref, left), d1 = d(ref, right), p = share of observers who chose right. A tie scores 0.5."""
    return (d0 < d1) * (1 - p) + (d1 < d0) * p + (d0 == d1) * 0.5


def nights_distances(visual, ref, left, right):
    """Perceptual distances d = 1 - cos of the projected image embeddings (PI fork, DreamSim):
    (d(ref, left), d(ref, right)), each (B,). One forward over the 3B images, so that under DDP
    each step is one forward and one backward; `visual` maps (B, 3, S, S) -> (B, E)."""
    features = F.normalize(visual(torch.cat([ref, left, right])).float(), dim=-1)  # (3B, E)
    f_ref, f_left, f_right = features.chunk(3)  # 3 x (B, E)
    return 1 - (f_ref * f_left).sum(-1), 1 - (f_ref * f_right).sum(-1)


@torch.no_grad()
def evaluate_nights(model, dataset, device, batch_size=64, precision="fp32", workers=0):
    """Mean 2AFC score of a CLIP's image embeddings on a NightsDataset (0.5 = chance, 1 = agrees
    with every observer)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ref, left, right, p in tqdm(loader, desc=f"2afc {dataset.split}", leave=False):
        ref, left, right, p = (t.to(device, non_blocking=True) for t in (ref, left, right, p))
        with autocast(device, precision):
            d0, d1 = nights_distances(model.visual, ref, left, right)
        total += two_afc_score(d0, d1, p).sum().item()
        count += len(p)
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------------

# (written by the evaluation issue)
