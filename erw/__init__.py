"""Embedded Representation Warmup training pipeline."""
