"""Concept Conductor's shape-aware masks on small tensors: k-means finds planted clusters (and the best
partition of a tiny set), self-attention clusters recover object shapes, the refine rule picks the right
cluster, falls back to rectangles and leaves disputed cells alone; masks_at thresholds and checks sizes."""

from __future__ import annotations

import itertools

import pytest
import torch

from multiconcept.samplers.concept_conductor.masks import (
    attention_clusters,
    best_match,
    bounding_rect,
    cluster_counts,
    flat,
    iou,
    kmeans,
    masks_at,
    refine_masks,
)

H, W = 16, 16


def _disk(cy, cx, r):
    y = torch.arange(H, dtype=torch.float32)[:, None]
    x = torch.arange(W, dtype=torch.float32)[None, :]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r**2


def _blobs():
    """Two disjoint disks (not rectangles, so a cluster and a box differ) on a 16x16 grid."""
    return torch.stack([_disk(4.5, 4.5, 3.2), _disk(10.5, 11, 3.7)])


def _synthetic_attention(regions, gen, noise=1e-3):
    """Self-attention [T, T] where each cell of region j attends uniformly to region j, plus seeded noise;
    ``regions`` [R, h, w] must partition the grid."""
    region_rows = flat(regions).float()
    uniform = region_rows / region_rows.sum(1, keepdim=True)  # [R, T]
    owner = flat(regions).float().argmax(0)  # region of each token
    attn = uniform[owner] + noise * torch.rand(H * W, H * W, generator=gen)
    return attn / attn.sum(1, keepdim=True)


def _box(mask, margin=1):
    """A user's box around ``mask``: its bounding rectangle grown by ``margin`` cells."""
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    out = torch.zeros_like(mask)
    out[
        max(0, int(rows[0]) - margin) : int(rows[-1]) + 1 + margin,
        max(0, int(cols[0]) - margin) : int(cols[-1]) + 1 + margin,
    ] = True
    return out


def _same_partition(labels, truth):
    """Labels equal ``truth`` up to renaming the clusters."""
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(truth.tolist())) == len({a for a, _ in pairs})


def test_kmeans_recovers_three_gaussian_clouds():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 0.0, 0.0], [6.0, 0.0, 0.0, 0.0], [0.0, 6.0, 6.0, 0.0]])
    truth = torch.randint(0, 3, (300,), generator=gen)
    points = means[truth] + torch.randn(300, 4, generator=gen)
    labels = kmeans(points, 3, n_init=5, generator=torch.Generator().manual_seed(1))
    assert labels.shape == (300,) and labels.dtype == torch.long
    assert _same_partition(labels, truth)
    # more clusters than clouds: every cloud is split, never merged with another
    labels = kmeans(points, 5, n_init=5, generator=torch.Generator().manual_seed(1))
    assert set(labels.tolist()) == set(range(5))
    for c in range(3):
        for other in range(3):
            if other != c:
                assert not set(labels[truth == c].tolist()) & set(labels[truth == other].tolist())


def _inertia(points, labels):
    return sum(float((points[labels == c] - points[labels == c].mean(0)).square().sum()) for c in labels.unique())


def test_kmeans_finds_the_optimal_two_way_split_of_a_small_set():
    # 9 points: checking every 2-partition shows the restarts keep the lowest-inertia one
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(9, 3, generator=gen)
    best = min(_inertia(points, torch.tensor((0,) + bits)) for bits in itertools.product((0, 1), repeat=8) if any(bits))
    labels = kmeans(points, 2, n_init=20, generator=torch.Generator().manual_seed(3))
    assert _inertia(points, labels) == pytest.approx(best, rel=1e-5)


def test_kmeans_is_deterministic_for_a_seed_and_clamps_k():
    points = torch.rand(200, 16, generator=torch.Generator().manual_seed(4))
    a = kmeans(points, 6, n_init=8, generator=torch.Generator().manual_seed(5))
    b = kmeans(points, 6, n_init=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # k above the number of points: each point its own cluster
    few = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    assert sorted(kmeans(few, 10, generator=torch.Generator().manual_seed(0)).tolist()) == [0, 1, 2]
    assert torch.equal(kmeans(few, 1), torch.zeros(3, dtype=torch.long))
    # fewer distinct points than k: no crash, the duplicates stay together
    dup = torch.tensor([[0.0, 0.0]] * 5 + [[3.0, 3.0]] * 5)
    labels = kmeans(dup, 4, n_init=3, generator=torch.Generator().manual_seed(0))
    assert len(set(labels[:5].tolist())) == 1 and len(set(labels[5:].tolist())) == 1 and labels[0] != labels[5]
    with pytest.raises(ValueError, match=r"\[P, D\]"):
        kmeans(torch.rand(5), 2)


def test_attention_clusters_recover_the_blobs_exactly():
    gen = torch.Generator().manual_seed(6)
    blobs = _blobs()
    background = ~blobs.any(0)
    attn = _synthetic_attention(torch.cat([blobs, background[None]]), gen)
    clusters = attention_clusters(attn, (H, W), [3], n_init=10, generator=torch.Generator().manual_seed(7))
    assert clusters.shape == (3, H, W) and clusters.dtype == torch.bool
    found = {tuple(flat(c[None])[0].tolist()) for c in clusters}
    assert found == {tuple(flat(m[None])[0].tolist()) for m in (blobs[0], blobs[1], background)}
    # each k's clusters partition the grid
    clusters = attention_clusters(attn, (H, W), [3, 4], generator=torch.Generator().manual_seed(7))
    assert clusters.shape == (7, H, W)
    assert torch.equal(clusters[:3].sum(0), torch.ones(H, W, dtype=torch.long))
    assert torch.equal(clusters[3:].sum(0), torch.ones(H, W, dtype=torch.long))
    with pytest.raises(ValueError, match="8x8 grid"):
        attention_clusters(attn, (8, 8), [3])


def test_refine_from_boxes_gives_the_blob_shapes():
    gen = torch.Generator().manual_seed(8)
    blobs = _blobs()
    regions = torch.cat([blobs, (~blobs.any(0))[None]])
    custom_attn = [_synthetic_attention(regions, gen) for _ in range(2)]
    base_attn = _synthetic_attention(regions, gen)
    boxes = torch.stack([_box(b) for b in blobs])
    assert all(0.4 < iou(box, blob) < 0.8 for box, blob in zip(boxes, blobs, strict=True))
    combined, custom, base = refine_masks(
        custom_attn, base_attn, (H, W), boxes, boxes, boxes, threshold=0.4, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(custom, blobs)
    assert torch.equal(base, blobs)
    assert torch.equal(combined, blobs)
    # the same seed gives the same masks
    again = refine_masks(
        custom_attn, base_attn, (H, W), boxes, boxes, boxes, threshold=0.4, generator=torch.Generator().manual_seed(9)
    )
    assert all(torch.equal(a, b) for a, b in zip(again, (combined, custom, base), strict=True))


def test_best_match_takes_the_best_cluster_or_the_rectangle():
    previous = torch.zeros(H, W, dtype=torch.bool)
    previous[2:6, 2:6] = True
    previous[6:9, 2:4] = True  # an L shape: its rectangle is rows 2..8, columns 2..5
    rect = torch.zeros(H, W, dtype=torch.bool)
    rect[2:9, 2:6] = True
    assert torch.equal(bounding_rect(previous), rect)
    close = previous.clone()
    close[9, 2] = True  # IoU 22/23
    far = torch.zeros(H, W, dtype=torch.bool)
    far[2:6, 2:6] = True  # IoU 16/22
    candidates = torch.stack([far, close, ~previous])
    assert torch.equal(best_match(candidates, previous, threshold=0.9), close)
    # no candidate reaches the threshold: the previous mask's rectangle
    assert torch.equal(best_match(candidates, previous, threshold=0.99), rect)
    # a candidate that does not touch the previous mask is never taken, even with threshold 0
    assert torch.equal(best_match((~previous)[None], previous, threshold=0.0), rect)
    assert torch.equal(best_match(torch.zeros(0, H, W, dtype=torch.bool), previous, 0.0), rect)
    # an empty previous mask stays empty
    empty = torch.zeros(H, W, dtype=torch.bool)
    assert torch.equal(bounding_rect(empty), empty) and torch.equal(best_match(candidates, empty, 0.0), empty)


def test_iou():
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    assert iou(a, b) == 0.0
    a[:2] = True
    b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0


def test_overlap_cells_keep_their_previous_combined_value():
    # threshold above 1: every mask falls back to its previous rectangle, so the new masks are known
    gen = torch.Generator().manual_seed(10)
    attn = torch.softmax(torch.randn(H * W, H * W, generator=gen), 1)
    custom = torch.zeros(2, H, W, dtype=torch.bool)
    custom[0, 2:10, 2:8] = True
    custom[1, 6:14, 6:14] = True  # overlaps concept 0 in rows 6..9, columns 6..7
    base = torch.zeros(2, H, W, dtype=torch.bool)
    base[0, 0:2, 0:3] = True
    base[1, 14:16, 13:16] = True
    previous = torch.zeros(2, H, W, dtype=torch.bool)
    previous[0, :, :7] = True  # the old split: column 6 was concept 0's, column 7 concept 1's
    previous[1, :, 7:] = True
    combined, new_custom, new_base = refine_masks(
        [attn, attn], attn, (H, W), custom, base, previous, threshold=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(new_custom, custom) and torch.equal(new_base, base)
    disputed = torch.zeros(H, W, dtype=torch.bool)
    disputed[6:10, 6:8] = True
    assert torch.equal(combined[:, disputed], previous[:, disputed])
    assert combined[0, 6:10, 6].all() and not combined[0, 6:10, 7].any()
    assert combined[1, 6:10, 7].all() and not combined[1, 6:10, 6].any()
    assert torch.equal(combined[:, ~disputed], (custom | base)[:, ~disputed])
    with pytest.raises(ValueError, match="previous base"):
        refine_masks([attn, attn], attn, (H, W), custom, base[:1], previous, generator=gen)


def test_masks_at_area_threshold_bilinear_and_aspect_check():
    m = torch.zeros(2, 64, 48)
    m[0, :32, :24] = 1.0  # a quarter of the image
    m[1, :, :5] = 1.0  # 5 of the 8 pixel columns of grid column 0: more than half
    m[1, :, 8:11] = 1.0  # 3 of the 8 pixel columns of grid column 1: less than half
    small = masks_at(m, (8, 6))
    assert small.shape == (2, 8, 6) and small.dtype == torch.float32
    assert torch.equal(small[0, :4, :3], torch.ones(4, 3)) and small[0].sum() == 12
    assert torch.equal(small[1, :, 0], torch.ones(8)) and small[1, :, 1:].sum() == 0
    assert torch.equal(masks_at(m > 0.5, (8, 6)), small)  # bool masks too
    # growing: bilinear, then the same threshold
    tiny = torch.zeros(1, 2, 2)
    tiny[0, 0, 0] = 1.0
    big = masks_at(tiny, (4, 4))
    assert torch.equal(big[0, :2, :2], torch.ones(2, 2)) and big.sum() == 4
    # a rounded grid (1000x744 image, 125x93 latent) is fine; a different aspect ratio is not
    assert masks_at(torch.ones(1, 1000, 744), (125, 93)).shape == (1, 125, 93)
    with pytest.raises(ValueError, match="64x48.*8x8"):
        masks_at(m, (8, 8))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        masks_at(m[0], (8, 6))


def test_cluster_counts_are_the_official_n_plus_1_to_2n_plus_1(monkeypatch):
    # Official: Nihukat/Concept-Conductor, concept_conductor/pipelines/attention_processor.py:497-500 —
    # num_clusters_min = len(all_token_ids) (N concepts + the base branch), range(min, 2 * min).
    assert list(cluster_counts(1)) == [2, 3]
    assert list(cluster_counts(2)) == [3, 4, 5]
    assert list(cluster_counts(3)) == [4, 5, 6, 7]
    # and refine_masks clusters every branch (the base branch once) with exactly those counts
    import multiconcept.samplers.concept_conductor.masks as masks_module

    seen = []
    real = masks_module.attention_clusters

    def recording(attn, grid, ks, **kw):
        seen.append(list(ks))
        return real(attn, grid, ks, **kw)

    monkeypatch.setattr(masks_module, "attention_clusters", recording)
    gen = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(H * W, H * W, generator=gen), dim=-1)
    boxes = torch.zeros(2, H, W, dtype=torch.bool)
    boxes[0, 2:8, 2:8] = True
    boxes[1, 8:14, 8:14] = True
    refine_masks([attn, attn], attn, (H, W), boxes, boxes, boxes, n_init=2, generator=gen)
    assert seen == [[3, 4, 5]] * 3  # the base branch, then each concept's branch
