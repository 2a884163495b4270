"""Concept Conductor's injection and layout-alignment formulas on small tensors (no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

from multiconcept.samplers.concept_conductor.alignment import branch_loss, latent_step, layout_loss
from multiconcept.samplers.concept_conductor.injection import inject
from multiconcept.samplers.concept_conductor.settings import ConductorSettings


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_injection_is_the_concept_inside_its_mask_and_the_base_outside_exactly():
    base, a, b = _rand(2, 12, 5, seed=1), _rand(2, 12, 5, seed=2), _rand(2, 12, 5, seed=3)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, 0:4] = True
    masks[1, 8:12] = True
    out = inject(base, [a, b], masks)
    assert torch.equal(out[:, 0:4], a[:, 0:4])
    assert torch.equal(out[:, 8:12], b[:, 8:12])
    assert torch.equal(out[:, 4:8], base[:, 4:8])


def test_later_concepts_win_where_masks_overlap_and_rows_may_have_their_own_masks():
    base, a, b = _rand(2, 6, 3, seed=1), _rand(2, 6, 3, seed=2), _rand(2, 6, 3, seed=3)
    masks = torch.zeros(2, 2, 6)
    masks[:, 0, 0:4] = 1.0
    masks[:, 1, 2:6] = 1.0
    masks[1] = 0.0  # the second image's concepts are nowhere
    out = inject(base, [a, b], masks)
    assert torch.equal(out[0, 0:2], a[0, 0:2]) and torch.equal(out[0, 2:6], b[0, 2:6])
    assert torch.equal(out[1], base[1])
    with pytest.raises(ValueError):
        inject(base, [a], masks)


def test_branch_loss_sums_images_and_averages_tokens_and_channels():
    keys, ref = _rand(3, 4, 2, seed=1), _rand(1, 4, 2, seed=2)
    want = sum(((keys[i] - ref[0]) ** 2).mean() for i in range(3))
    assert torch.allclose(branch_loss(keys, ref), want)
    fg = torch.tensor([1.0, 0.0, 1.0, 0.0])
    want_fg = sum((((keys[i] - ref[0]) ** 2) * fg[:, None]).mean() for i in range(3))
    assert torch.allclose(branch_loss(keys, ref, fg), want_fg)


def test_layout_loss_is_base_plus_factor_times_mean_concept_loss_averaged_over_layers():
    ref = [_rand(1, 4, 2, seed=9), _rand(1, 8, 2, seed=10)]
    base = [_rand(1, 4, 2, seed=1), _rand(1, 8, 2, seed=2)]
    concepts = [[_rand(1, 4, 2, seed=3), _rand(1, 8, 2, seed=4)], [_rand(1, 4, 2, seed=5), _rand(1, 8, 2, seed=6)]]
    per_layer = [
        branch_loss(base[layer], ref[layer])
        + 0.5 * (branch_loss(concepts[0][layer], ref[layer]) + branch_loss(concepts[1][layer], ref[layer])) / 2
        for layer in range(2)
    ]
    assert torch.allclose(layout_loss(base, concepts, ref, 0.5), (per_layer[0] + per_layer[1]) / 2)
    assert torch.allclose(layout_loss(base, [], ref), (branch_loss(base[0], ref[0]) + branch_loss(base[1], ref[1])) / 2)
    assert float(layout_loss(ref, [ref], ref)) == 0.0


def test_the_latent_step_is_the_official_step_on_the_variance_preserving_latent():
    # official: z -= w * dL/dz with z = x / sqrt(s^2 + 1); check with a loss of z written out
    sigma, w = 3.0, 10.0
    x = _rand(1, 4, 2, 2, seed=1).requires_grad_(True)
    target = _rand(1, 4, 2, 2, seed=2)
    scale = (sigma**2 + 1) ** 0.5
    loss = ((x / scale - target) ** 2).sum()
    (grad_x,) = torch.autograd.grad(loss, x)
    z = (x / scale).detach().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(((z - target) ** 2).sum(), z)
    z_new = z.detach() - w * grad_z
    x_new = x.detach() + latent_step(grad_x, sigma, w)
    assert torch.allclose(x_new / scale, z_new, atol=1e-6)


def test_the_schedules_follow_the_official_step_numbers_as_fractions():
    s = ConductorSettings()
    assert s.alignment_steps(200) == list(range(0, 61))  # steps 0..60 of 200, every step
    assert s.refine_steps(200) == [50, 55, 60, 65, 70, 75, 80]  # 50..80 every 5
    assert ConductorSettings(alignment_weight=0).alignment_steps(20) == []
    assert ConductorSettings(shape_masks=False).refine_steps(20) == []
    assert ConductorSettings(alignment_every=5, alignment_end=0.25).alignment_steps(200)[-2:] == [45, 50]
