"""Reductions of captured recordings into the small tables notebooks print and plot."""

from owl_lab.analysis.attribution import Attribution, attribute
from owl_lab.analysis.compare import (
    AttentionComparison,
    TokenComparison,
    attention_patch_maps,
    attention_vs_attribution,
    attention_vs_token_attribution,
    compare_examples,
    spearman,
)
from owl_lab.analysis.logit_lens import logit_lens
from owl_lab.analysis.mass import depth_rise, layer_mass, modality_share, query_mass

__all__ = [
    "AttentionComparison",
    "Attribution",
    "TokenComparison",
    "attention_patch_maps",
    "attention_vs_attribution",
    "attention_vs_token_attribution",
    "attribute",
    "compare_examples",
    "depth_rise",
    "layer_mass",
    "logit_lens",
    "modality_share",
    "query_mass",
    "spearman",
]
