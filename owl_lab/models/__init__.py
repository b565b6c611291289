"""Checkpoint-faithful implementations of the Owl families (one sub-package per family)."""
