from __future__ import annotations

import pytest
import torch

from owl_lab import load_owl
from owl_lab.analysis.probe import ATTRIBUTES, cell_features, linear_probe, probe_cell_attributes


def _blobs(n: int, seed: int, noise: float):
    """Three classes at the corners of a simplex in 5-D, plus isotropic noise: [n, 5], [n]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.eye(5)[:3] * 4
    return centres[y] + noise * torch.randn(n, 5, generator=g), y


def test_linear_probe_reads_separable_classes_and_not_shuffled_ones():
    (x, y), (tx, ty) = _blobs(600, 0, 0.5), _blobs(300, 1, 0.5)
    assert linear_probe(x, y, tx, ty) > 97
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    assert linear_probe(x, shuffled, tx, ty) < 50  # chance is 33 %
    assert linear_probe(x, y, tx, ty, seed=3) == pytest.approx(linear_probe(x, y, tx, ty, seed=3))
    with pytest.raises(ValueError, match="at least one"):
        linear_probe(x[:0], y[:0], tx, ty)


@pytest.mark.parametrize("variant", ["owl2", "owl3"])
def test_cell_features_pair_every_patch_with_its_cell(variant, build_tiny_owl):
    model, processor = build_tiny_owl(variant)
    features, targets = cell_features(model, processor, 3, seed=0, batch_size=2)
    assert features.ndim == 2 and targets.shape == (features.shape[0], len(ATTRIBUTES))
    assert features.shape[0] % 3 == 0  # G² patches per scene
    assert ((targets[:, 0] > 0) == (targets > 0).all(-1)).all()  # an object has every attribute
    again, _ = cell_features(model, processor, 3, seed=0)
    assert torch.equal(features, again)
    with pytest.raises(ValueError, match="n_scenes"):
        cell_features(model, processor, 0)


def test_the_shipped_owl2_vit_carries_every_attribute(single_thread):
    """owl2-tiny freezes its ViT after vision pre-training, so its patches must still name
    shape, colour, size and pattern; a 1000-step vision stage left pattern at 68 %."""
    model, processor = load_owl("owl2-tiny")
    accuracy = probe_cell_attributes(model.eval(), processor, n_train=300, n_test=150)
    assert set(accuracy) == set(ATTRIBUTES)
    assert min(accuracy.values()) > 90, accuracy


def test_object_share_marks_object_pixels_per_patch():

    from owl_lab.analysis.probe import _object_share
    from owl_lab.synth.shapes import Obj, Scene, render

    empty = _object_share(render(Scene(()), 112), 8)
    assert empty.shape == (64,) and float(empty.max()) == 0.0
    big = Scene((Obj("square", "red", "large", "plain", 1, 1),))  # the centre cell, most of it covered
    share = _object_share(render(big, 112), 8).view(8, 8)
    assert float(share[3:5, 3:5].min()) > 0.8 and float(share[0].max()) == 0.0 and float(share.sum()) > 3


def test_the_shipped_owl3_encoder_has_the_frame_tag_only_in_background_patches(single_thread):
    """Issue 18's finding, as a check of the probe: owl3-tiny's encoder was never trained on frame tags;
    the tint is readable where the patch shows background and not where it shows an object."""
    from owl_lab.analysis.probe import probe_frame_tags

    model, processor = load_owl("owl3-tiny")
    accuracy = probe_frame_tags(model.eval(), processor, n_train=150, n_test=60)
    assert set(accuracy) == {"background", "object"}
    assert accuracy["background"] > 50 and accuracy["object"] < 20, accuracy
