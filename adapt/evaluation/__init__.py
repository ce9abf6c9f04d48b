"""Evaluation: generation, scoring, metrics."""
