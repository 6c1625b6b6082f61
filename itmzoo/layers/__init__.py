"""Shared building blocks: cross attention, graph reasoning, pooling."""
