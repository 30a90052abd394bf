"""The mini DINO's training pieces (nola_core/mini/train.py): teacher targets, the KoLeo term and
the renderings that take the background shortcut away. Controlled inputs, no Debian package."""

import numpy as np
import torch

from nola_core.mini.domains import random_rendering
from nola_core.mini.train import koleo_loss, sinkhorn_knopp


def _flat_teacher_logits(batch: int = 64, prototypes: int = 32, spread: float = 0.02) -> torch.Tensor:
    """What the mini teacher emits early on: one direction shared by every image (the same best
    prototype for all) plus small per-image differences that carry the information."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(1, prototypes, generator=generator) * 0.3
    return shared + spread * torch.randn(batch, prototypes, generator=generator)


def test_sinkhorn_targets_are_balanced_over_prototypes_and_follow_each_image():
    logits = _flat_teacher_logits()
    targets = sinkhorn_knopp(logits, temperature=0.015)
    assert torch.allclose(targets.sum(dim=1), torch.ones(64), atol=1e-5)  # a distribution per image
    use = targets.sum(dim=0)
    # The shared direction would send every image to one prototype; balanced use spreads them out
    # (without the column step of the iteration, one prototype takes almost the whole batch).
    assert use.max() < 3 * use.mean(), use
    winners = targets.argmax(dim=1)
    assert len(winners.unique()) >= 16, winners
    # What decides an image's target is its own difference from the others, not the shared part.
    shifted = logits + 0.05 * torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sinkhorn_knopp(shifted, 0.015).argmax(1), winners)
    # Cosine logits span [-1, 1]: a prototype at -1 for every image underflows exp(·/0.015) to 0
    # and must not turn the targets into NaN.
    extreme = torch.ones(8, 4)
    extreme[:, 0] = -1.0
    assert torch.isfinite(sinkhorn_knopp(extreme, 0.015)).all()


def test_koleo_is_lower_for_spread_features_and_pushes_neighbours_apart():
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(32, 16, generator=generator)
    clustered = torch.randn(1, 16, generator=generator) + 0.05 * torch.randn(32, 16, generator=generator)
    assert koleo_loss(spread) < koleo_loss(clustered) - 1.0

    features = clustered.clone().requires_grad_(True)
    koleo_loss(features).backward()
    with torch.no_grad():
        stepped = features - 0.5 * features.grad
        before = torch.nn.functional.normalize(clustered, dim=1)
        after = torch.nn.functional.normalize(stepped, dim=1)
        nearest = lambda x: (x @ x.T).fill_diagonal_(-2).max(dim=1).values  # noqa: E731
        assert (nearest(after) < nearest(before)).float().mean() > 0.9  # neighbours moved apart


def test_two_renderings_of_a_garment_share_its_shape_not_its_background():
    garment = np.zeros((28, 28), np.uint8)
    garment[6:22, 9:19] = 220  # a bright block on black: the mask is known
    renderings = [random_rendering(garment, np.random.default_rng([0, 1, r])) for r in range(12)]
    assert all(r.shape == (28, 28, 3) and r.dtype == np.uint8 for r in renderings)
    again = random_rendering(garment, np.random.default_rng([0, 1, 3]))
    assert np.array_equal(again, renderings[3])  # seeded: the bank is reproducible
    styles = {r.tobytes() for r in renderings}
    assert len(styles) >= len(renderings) - 4  # its own style per view (the plain one repeats)
    inside = garment > 0
    outside = np.ones_like(inside)
    outside[4:24, 7:21] = False  # two pixels clear of the garment
    edge = np.zeros_like(inside)
    edge[5:23, 8:20] = True
    edge[7:21, 10:18] = False  # a ring on the garment's outline
    contrasts = [max(abs(float(r[region].mean()) - float(r[outside].mean())) for region in (inside, edge))
                 for r in renderings]
    # The garment (or, drawn, its outline) shows; a random garment colour now and then matches
    # the ground's, as in the textured domain itself.
    assert sum(c > 20 for c in contrasts) >= 10, contrasts
    backgrounds = np.stack([r[outside].astype(float).mean(axis=0) for r in renderings])
    assert backgrounds.std(axis=0).max() > 20  # the backgrounds (colour, pattern) differ
