"""Interventions change outputs on purpose and restore every weight exactly."""

from __future__ import annotations

import pytest
import torch

from owl_lab.analysis.interventions import branch_divergence, multiway_modules, text_branch_for_images
from owl_lab.models.owl2 import Owl2ForCausalLM


@pytest.fixture
def make_model(small_owl2_config):
    """A fresh model per call (the tests change weights in place)."""

    def make(modality_adaptive=True):
        torch.manual_seed(0)
        cfg = small_owl2_config(vocab_size=50, initializer_range=0.1, modality_adaptive=modality_adaptive)
        model = Owl2ForCausalLM(cfg).eval()
        with torch.no_grad():  # independent branches, as after training
            for _, m in multiway_modules(model):
                for p in m.multiway[1].parameters():
                    p.add_(0.3 * torch.randn_like(p))
        return model

    return make


def _inputs():
    ids = torch.tensor([[1, 5, -200, 7, 9, 11]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28))


def test_text_branch_changes_image_positions_and_restores_exactly(make_model):
    model, batch = make_model(), _inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**batch).logits
        with text_branch_for_images(model):
            ablated = model(**batch).logits
        after = model(**batch).logits
    assert (ablated - ref).abs().max() > 1e-3  # the vision branch mattered
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_restores_on_exception_and_rejects_models_without_mam(make_model):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with text_branch_for_images(model):
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no modality-adaptive"):
        with text_branch_for_images(make_model(modality_adaptive=False)):
            pass


def test_branch_divergence_reports_every_multiway_module(make_model):
    rows = branch_divergence(make_model())
    assert {r["module"] for r in rows} == {"k_proj", "v_proj", "input_layernorm", "post_attention_layernorm"}
    assert len(rows) == 8 and all(r["relative_distance"] > 0 for r in rows)
