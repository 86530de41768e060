"""Floors: the same framing and codec as sshrpc over plain TCP between two Trio processes."""
