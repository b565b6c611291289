"""Reductions of captured recordings into the small tables notebooks print and plot."""
from owl_lab.analysis.mass import layer_mass, modality_share, query_mass

__all__ = ["layer_mass", "modality_share", "query_mass"]
