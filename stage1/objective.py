"""Stage 1's objective, for every source of triplets: the distance, the hinge that trains it and
the 2AFC score that grades it.

  d0, d1 = triplet_distances(model.visual, ref, left, right)   # d = 1 - cos, each (B,)
  loss = hinge_loss(d0, d1, p, margin=0.05)                    # what train_triplet.py minimises
  score = two_afc(model, dataset, device)                      # share of observers agreed with

A triplet is a reference and two images, with p the share of judges who chose the RIGHT one as
closer (NIGHTS, BAPPS, THINGS odd-one-out, an RDM: stage1/ reads each into that form). The distance
and the hinge are the PI authors' (github cheesepuff90/Brain_Initialization src/loss.py) and
DreamSim's; the 2AFC score is DreamSim's.
"""
import torch
import torch.nn.functional as F

from cli import progress
from stage1.triplets import model_input
from training import autocast, ignore_stop_signals


def triplet_distances(visual, ref, left, right):
    """Perceptual distances d = 1 - cos of the projected image embeddings: (d(ref, left), d(ref,
    right)), each (B,). One forward over the 3B images, so that under DDP each step is one forward
    and one backward; `visual` maps (B, 3, S, S) -> (B, E)."""
    features = F.normalize(visual(torch.cat([ref, left, right])).float(), dim=-1)  # (3B, E)
    f_ref, f_left, f_right = features.chunk(3)  # 3 x (B, E)
    return 1 - (f_ref * f_left).sum(-1), 1 - (f_ref * f_right).sum(-1)


def hinge_loss(d0, d1, p, margin):
    """y = +1 when most observers chose right (p > 0.5), else -1; logit = d(ref,left) - d(ref,right)
    is positive when the model finds right closer. mean(relu(margin - y * logit))."""
    y = torch.where(p > 0.5, 1.0, -1.0)
    return torch.relu(margin - y * (d0 - d1)).mean()


def two_afc_score(d0, d1, p):
    """DreamSim's 2AFC score per triplet: the share of observers the metric agrees with.
    d0 = d(ref, left), d1 = d(ref, right), p = share of observers who chose right. A tie scores
    0.5."""
    return (d0 < d1) * (1 - p) + (d1 < d0) * p + (d0 == d1) * 0.5


@torch.no_grad()
def two_afc_by_triplet(model, dataset, device, batch_size=64, precision="fp32", workers=0):
    """Mean 2AFC score of a CLIP's image embeddings on a stage-1 split (nights.NightsDataset or any
    triplets.TripletDataset), triplet by triplet (0.5 = chance, 1 = agrees with every observer)."""
    # Workers leave SIGTERM / SIGINT to the main process (a trainer evaluating stops after it).
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         worker_init_fn=ignore_stop_signals)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ref, left, right, p in progress(loader, desc=f"2afc {dataset.split}", leave=False):
        # uint8 -> the model's normalised input, on the device
        ref, left, right = (model_input(t, device) for t in (ref, left, right))
        p = p.to(device)
        with autocast(device, precision):
            d0, d1 = triplet_distances(model.visual, ref, left, right)
        total += two_afc_score(d0, d1, p).sum().item()
        count += len(p)
    model.train(was_training)
    return total / max(count, 1)


# ---- Any stage-1 source (triplets.TripletDataset) ----
# Sources whose rows share images (THINGS: 1,854 concepts in 4.7M trials; an RDM's N images) are
# scored by embedding each image once: the same distances as two_afc_by_triplet computes triplet by
# triplet (tests/stage1/test_other_sources.py checks the two agree), thousands of times fewer
# forwards.


@torch.no_grad()
def embed_images(model, dataset, device, batch_size=256, precision="fp32"):
    """Every image of a TripletDataset (dataset.images, from its cache) -> (M, E) float32 unit
    vectors."""
    was_training = model.training
    model.eval()
    features = []
    for start in progress(range(0, len(dataset.images), batch_size), desc=f"embed {dataset.split}",
                          leave=False):
        batch = torch.stack([dataset.image(k)
                             for k in range(start, min(start + batch_size, len(dataset.images)))])
        with autocast(device, precision):
            x = model.visual(model_input(batch, device))
        features.append(F.normalize(x.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(features) if features else torch.zeros(0, 0)


def two_afc_from_embeddings(features, rows, p, chunk=2**18):
    """Mean 2AFC score of rows (N, 3) = (ref, left, right) image indices into unit vectors
    features (M, E), `chunk` rows at a time (THINGS' 8M training rows would need ~50 GB of gathered
    vectors at once)."""
    total = 0.0
    for start in range(0, len(rows), chunk):
        ref, left, right = (features[rows[start:start + chunk, c]] for c in range(3))
        d0, d1 = 1 - (ref * left).sum(-1), 1 - (ref * right).sum(-1)
        total += two_afc_score(d0, d1, p[start:start + chunk]).double().sum().item()
    return total / max(len(rows), 1)


def two_afc(model, dataset, device, batch_size=64, precision="fp32", workers=0):
    """Mean 2AFC score on any stage-1 split: triplet by triplet (two_afc_by_triplet) when each row
    has its own images (NIGHTS, BAPPS), else from one embedding per image."""
    if len(dataset.images) >= 3 * len(dataset):
        return two_afc_by_triplet(model, dataset, device, batch_size, precision, workers)
    return two_afc_from_embeddings(embed_images(model, dataset, device, batch_size, precision),
                                   dataset.rows, dataset.p)
