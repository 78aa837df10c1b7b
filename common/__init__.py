"""Shared library of the training toolkit: one engine, one checkpoint format, one CLI."""
