"""Implementations of the ``owl-lab`` subcommands (one module each)."""
