"""Shape-aware concept masks for Concept Conductor, pure torch (no ComfyUI).

A UNet self-attention layer gives, for a latent grid of ``h x w`` cells, a ``[T, T]`` probability matrix
(``T = h * w``, tokens in row-major order: token ``y * w + x``). Row ``t`` says where cell ``t`` looks. Cells
of one object look at much the same places, so clustering the rows (each a point in ``T`` dimensions) with
k-means splits the grid into object-shaped regions.

Sampling starts from the user's masks (boxes or SAM). Every few steps ``refine_masks`` replaces them:

* for each concept ``i``, its branch's self-attention is clustered with every ``k`` from ``N + 1`` to
  ``2N + 1`` (``N`` concepts; ``cluster_counts``). Of all those clusters, the one that best overlaps (IoU) the concept's previous *custom*
  mask becomes the new custom mask if the IoU reaches ``threshold``; otherwise the new custom mask is the
  bounding rectangle of the previous one (a failed clustering must not lose the concept);
* the same against the previous *base* mask, with the clusters of the base branch's self-attention (the
  branch without any concept), which are computed once and shared by all concepts;
* the concept's new *combined* mask is custom OR base. Where two or more new combined masks meet, every
  concept keeps its previous combined value, so a disputed cell stays with whoever had it.

``masks_at`` brings image-size masks to a grid, ``kmeans`` is batched over its restarts so that the 100
restarts of a 32x32 grid stay well under two seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cluster_counts(n_concepts: int) -> range:
    """The k-means cluster counts tried at each refinement: ``N + 1`` to ``2N + 1`` for ``N`` concepts.

    Official: Nihukat/Concept-Conductor, concept_conductor/pipelines/attention_processor.py, lines 497-500
    (``update_custom_masks``): ``num_clusters_min = len(self.all_token_ids)``, the branch count with the base
    branch (``N + 1``), and ``range(num_clusters_min, num_clusters_min * 2)``, i.e. up to ``2N + 1``.
    """
    return range(n_concepts + 1, 2 * n_concepts + 2)


def flat(masks: torch.Tensor) -> torch.Tensor:
    """``[N, h, w]`` -> ``[N, h * w]`` (row-major, the token order of an attention layer)."""
    return masks.reshape(masks.shape[0], -1)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform ``[0, 1)`` numbers drawn on the generator's own device (a CPU generator cannot fill a CUDA
    tensor), then moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _sample_rows(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights [R, P]`` (>= 0) with probability proportional to the weight, from the
    uniform numbers ``u [R]``. A row of zeros (every point already a centre) samples uniformly."""
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    cumulative = weights.cumsum(1)
    target = (u * cumulative[:, -1])[:, None]
    # right=True skips zero-weight points: the first index whose running sum exceeds the target
    return torch.searchsorted(cumulative, target, right=True)[:, 0].clamp_(max=weights.shape[1] - 1)


def _squared_distances(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``x [P, D]``, ``centres [R, k, D]`` -> squared distances ``[R, P, k]`` (one matmul, clamped at 0
    because the expansion can dip below it by rounding)."""
    cross = torch.matmul(x, centres.transpose(1, 2))
    return (x_sq[None, :, None] - 2 * cross + centres.square().sum(2)[:, None, :]).clamp_(min=0)


def _kmeans_pp(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, restarts: int, generator: torch.Generator | None
) -> torch.Tensor:
    """k-means++ seeding for all restarts at once: ``[R, k, D]`` centres picked among the points."""
    p = x.shape[0]
    u = _uniform((restarts, k), generator, x.device)
    chosen = (u[:, 0] * p).long().clamp_(max=p - 1)
    centres = [x[chosen]]
    closest = (x_sq[None] - 2 * centres[0] @ x.T + x_sq[chosen][:, None]).clamp_(min=0)  # [R, P]
    for j in range(1, k):
        chosen = _sample_rows(closest, u[:, j])
        centres.append(x[chosen])
        new = (x_sq[None] - 2 * centres[-1] @ x.T + x_sq[chosen][:, None]).clamp_(min=0)
        closest = torch.minimum(closest, new)
    return torch.stack(centres, 1)


def kmeans(
    points: torch.Tensor,
    k: int,
    n_init: int = 10,
    iters: int = 30,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cluster ``points [P, D]`` into ``k`` groups; returns the labels ``[P]`` (long, 0..k-1).

    All ``n_init`` restarts run together: k-means++ seeding from ``generator`` (same seed, same labels), then
    Lloyd iterations. A restart stops as soon as its labels no longer change, and only the restarts still
    moving are computed. An empty cluster gets the point farthest from its centre; with fewer distinct
    points than ``k`` some clusters stay empty, and their labels are simply unused. The restart with the
    lowest inertia (sum of squared distances to the centres) wins. ``k`` is clamped to ``1..P``.
    """
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"kmeans needs points [P, D] with P >= 1, got shape {tuple(points.shape)}")
    if n_init < 1 or iters < 0:
        raise ValueError(f"kmeans needs n_init >= 1 and iters >= 0, got {n_init} and {iters}")
    p = points.shape[0]
    k = max(1, min(int(k), p))
    x = points.float()
    x = x - x.mean(0)  # centring keeps the |x|^2 - 2xc + |c|^2 expansion accurate in float32
    x_sq = x.square().sum(1)
    if k == 1:
        return torch.zeros(p, dtype=torch.long, device=x.device)

    centres = _kmeans_pp(x, x_sq, k, n_init, generator)
    dist = _squared_distances(x, x_sq, centres)
    best_dist, labels = dist.min(2)  # [R, P]
    active = torch.arange(n_init, device=x.device)
    for _ in range(iters):
        # centres = means of the current labels, for the restarts still moving
        one_hot = F.one_hot(labels[active], k).to(x.dtype).transpose(1, 2)  # [A, k, P]
        counts = one_hot.sum(2)
        moved = (one_hot @ x) / counts.clamp(min=1)[..., None]
        empty = (counts == 0).nonzero().tolist()
        if empty:
            far = best_dist[active].clone()
            for a, j in empty:  # rare: reseed one by one so two empties never take the same point
                i = int(far[a].argmax())
                moved[a, j] = x[i]
                far[a, i] = 0
        new_dist, new_labels = _squared_distances(x, x_sq, moved).min(2)
        changed = (new_labels != labels[active]).any(1)
        labels[active] = new_labels
        best_dist[active] = new_dist
        active = active[changed]
        if active.numel() == 0:
            break
    inertia = best_dist.sum(1)
    return labels[int(inertia.argmin())].clone()


def attention_clusters(
    attn: torch.Tensor,
    grid: tuple[int, int],
    ks: Sequence[int],
    n_init: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Every cluster of every ``k`` in ``ks`` of the self-attention rows ``attn [T, T]`` as a mask on the
    ``grid`` (``T = h * w``, row-major): ``[M, h, w]`` bool, the clusters of each ``k`` in label order. Empty
    clusters (fewer distinct rows than ``k``) are left out, so each ``k`` contributes a partition of the grid.
    """
    h, w = int(grid[0]), int(grid[1])
    t = h * w
    if attn.ndim != 2 or tuple(attn.shape) != (t, t):
        raise ValueError(f"attention_clusters: attention {tuple(attn.shape)} does not fit a {h}x{w} grid ({t} tokens)")
    masks = []
    for k in ks:
        labels = kmeans(attn, k, n_init=n_init, generator=generator)
        members = labels[None, :] == torch.arange(int(labels.max()) + 1, device=labels.device)[:, None]
        masks.append(members[members.any(1)])
    if not masks:
        return torch.zeros(0, h, w, dtype=torch.bool, device=attn.device)
    return torch.cat(masks).reshape(-1, h, w)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of one shape; 0 when both are empty."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def bounding_rect(mask: torch.Tensor) -> torch.Tensor:
    """The smallest axis-aligned rectangle ``[h, w]`` (bool) holding ``mask``; an empty mask stays empty."""
    rows = mask.any(1).nonzero()
    if rows.numel() == 0:
        return mask.clone()
    cols = mask.any(0).nonzero()
    rect = torch.zeros_like(mask, dtype=torch.bool)
    rect[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1] = True
    return rect


def best_match(candidates: torch.Tensor, previous: torch.Tensor, threshold: float) -> torch.Tensor:
    """The candidate ``[M, h, w]`` with the highest IoU against ``previous [h, w]`` (the first one on a tie)
    if that IoU reaches ``threshold``, else the bounding rectangle of ``previous``.

    A candidate that does not touch ``previous`` at all (IoU 0) is never taken, even with ``threshold`` 0:
    it is another object, and the rectangle is the safer guess.
    """
    if candidates.shape[0]:
        inter = (candidates & previous).flatten(1).sum(1)
        union = (candidates | previous).flatten(1).sum(1)
        scores = inter.float() / union.clamp(min=1).float()
        best = int(scores.argmax())
        if scores[best] > 0 and scores[best] >= threshold:
            return candidates[best].clone()
    return bounding_rect(previous)


def refine_masks(
    custom_attn: Sequence[torch.Tensor],
    base_attn: torch.Tensor,
    grid: tuple[int, int],
    previous_custom: torch.Tensor,
    previous_base: torch.Tensor,
    previous_combined: torch.Tensor,
    threshold: float = 0.0,
    n_init: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mask update (see the module docstring): ``(combined, custom, base)``, each ``[N, h, w]`` bool.

    ``custom_attn`` holds one ``[T, T]`` self-attention per concept (its own branch), ``base_attn`` the base
    branch's. The previous masks are ``[N, h, w]`` bool on ``grid``, on any device; the results are on the
    attention's device.
    """
    n = len(custom_attn)
    h, w = int(grid[0]), int(grid[1])
    for name, prev in (("custom", previous_custom), ("base", previous_base), ("combined", previous_combined)):
        if tuple(prev.shape) != (n, h, w):
            raise ValueError(f"refine_masks: previous {name} masks {tuple(prev.shape)}, expected ({n}, {h}, {w})")
    # the masks may live elsewhere (CPU) than the attention (GPU); work where the attention is
    device = base_attn.device
    previous_custom, previous_base = previous_custom.to(device).bool(), previous_base.to(device).bool()
    previous_combined = previous_combined.to(device).bool()
    ks = cluster_counts(n)
    base_clusters = attention_clusters(base_attn, grid, ks, n_init=n_init, generator=generator)
    custom, base = [], []
    for i, attn in enumerate(custom_attn):
        own_clusters = attention_clusters(attn, grid, ks, n_init=n_init, generator=generator)
        custom.append(best_match(own_clusters.to(device), previous_custom[i], threshold))
        base.append(best_match(base_clusters, previous_base[i], threshold))
    custom_masks = torch.stack(custom) if n else previous_custom.clone()
    base_masks = torch.stack(base) if n else previous_base.clone()
    combined = custom_masks | base_masks
    disputed = combined.sum(0) >= 2
    combined = torch.where(disputed, previous_combined, combined)
    return combined, custom_masks, base_masks


def masks_at(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Masks ``[N, H, W]`` (0..1 float or bool) -> ``[N, h, w]`` float of 0. and 1. on ``grid``.

    Shrinking averages each grid cell's area, growing interpolates bilinearly; a cell is in the mask when
    more than half of it is. A ValueError is raised when the aspect ratios differ by more than one grid cell:
    such a mask was drawn for another picture.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks_at needs masks [N, H, W], got shape {tuple(masks.shape)}")
    big_h, big_w = int(masks.shape[1]), int(masks.shape[2])
    h, w = int(grid[0]), int(grid[1])
    if min(big_h, big_w, h, w) < 1:
        raise ValueError(f"masks_at: empty size, masks {big_h}x{big_w} -> grid {h}x{w}")
    if abs(big_w * h / big_h - w) > 1 or abs(big_h * w / big_w - h) > 1:
        raise ValueError(
            f"masks of {big_h}x{big_w} (HxW) do not fit a {h}x{w} grid: the aspect ratios differ by more than "
            "one grid cell (were the masks made for another image size?)"
        )
    m = masks.float()[:, None]
    if (big_h, big_w) == (h, w):
        resized = m
    elif h <= big_h and w <= big_w:
        resized = F.adaptive_avg_pool2d(m, (h, w))
    else:
        resized = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    return (resized[:, 0] > 0.5).float()
