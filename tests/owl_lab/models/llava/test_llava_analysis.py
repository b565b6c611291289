"""The lab's analyses run on a stock LLaVA unchanged: layer mass, FastV-style pruning, knockout sweep,
logit lens."""

from __future__ import annotations

import pytest
import torch

from hooks import capture
from owl_lab.analysis.knockout import knockout_sweep
from owl_lab.analysis.logit_lens import logit_lens
from owl_lab.analysis.mass import layer_mass
from owl_lab.analysis.pruning import prune_sweep
from owl_lab.models.llava import build_for_training
from owl_lab.synth.data import eval_set
from owl_lab.synth.tokenizer import build_tokenizer

CONFIG = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "initializer_range": 0.3,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
}  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    model, processor = build_for_training(CONFIG, build_tokenizer("llava"), seed=0)
    return model.eval(), processor, eval_set("color", 6, 1000, render_size=112)


def test_layer_mass_has_a_visual_share_per_layer(setup):
    model, processor, examples = setup
    batch = processor(text=[e.text for e in examples], images=[e.images for e in examples])
    with torch.no_grad(), capture(model) as rec:
        model(**batch)
    table = layer_mass(rec.attention_mass)  # [layers x groups]
    assert list(table.index) == [0, 1, 2] and {"visual", "text"} <= set(table.columns)
    assert ((table["visual"] > 0) & (table["visual"] < 1)).all()


def test_fastv_pruning_runs_and_drops_nothing_at_zero(setup):
    model, processor, examples = setup
    df = prune_sweep(model, processor, examples, layer=0, fractions=(0.0, 0.5, 1.0), progress=False)
    assert set(df.rule) == {"attention", "random"} and set(df.fraction) == {0.0, 0.5, 1.0}
    assert set(df[df.fraction == 0.5].dropped) == {8}  # half of the 16 patches of a 56 px image
    zero = df[df.fraction == 0.0]
    assert (zero.groupby("example").p.nunique() == 1).all()  # both rules agree when nothing is dropped


def test_knockout_sweep_and_logit_lens(setup):
    model, processor, examples = setup
    df = knockout_sweep(model, processor, examples[:4], window=1, progress=False)
    assert len(df) > 0
    batch = processor(text=[examples[0].text], images=[examples[0].images])
    lens = logit_lens(model, batch, top_k=3)
    final = lens[lens.layer == lens.layer.max()]
    assert len(final) > 0


def test_answer_visual_share_and_answer_to_pixels(setup):
    """The FastV comparison's measure and the answer → pixels path on the stock model."""
    from owl_lab.analysis.causal import last_positions, layouts
    from owl_lab.analysis.pixels import answer_to_pixels
    from owl_lab.analysis.pruning import answer_visual_share

    model, processor, examples = setup
    share, fraction = answer_visual_share(model, processor, examples[:3])
    assert share.shape == (3, 3) and ((share > 0) & (share < 1)).all().all()
    assert fraction.round(6).nunique() == 1 and 0.5 < fraction.iloc[0] < 1  # 16 patch rows of ~26 tokens
    path = answer_to_pixels(model, processor, examples[0], tokens="all")
    assert set(path.maps) == {"raw", "composed"} and path.maps["raw"].shape[1:] == (1, 4, 4)
    # the patch map is the decoder's attention on the 16 image rows, layer-mean, head-mean
    batch = processor(text=examples[0].text, images=examples[0].images)
    with (
        torch.no_grad(),
        layouts(model) as seen,
        capture(model, full_maps={i: None for i in range(3)}) as rec,
    ):
        model(**batch)
    last = int(last_positions(seen[0])[0])
    want = torch.stack(
        [
            fm.probs[0].mean(0)[(fm.query_index == last).nonzero()[0, 0]][fm.key_image[0] == 0]
            for (*_, kind), fm in sorted(rec.full_maps.items())
            if kind == "self"
        ]
    ).mean(0)
    assert torch.allclose(path.maps["raw"][0, 0].flatten(), want, atol=1e-6)
    with pytest.raises(ValueError, match="no hook points"):
        answer_to_pixels(model, processor, examples[0], rollout_encoder=True)
