"""Capture utilities for Owl models (attention mass, gates, abstractor maps)."""
