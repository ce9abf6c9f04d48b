"""Checkpoints: loading models, exporting, converting official weights."""
