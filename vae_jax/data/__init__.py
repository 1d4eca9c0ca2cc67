"""Corpora and batching: the text and synthetic datasets, the length-bucketed batchers."""
