"""Datasets, converters, synthetic scenes and dual-resolution batches."""
