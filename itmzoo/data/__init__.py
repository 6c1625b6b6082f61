"""Data: the split contract, readers of every on-disk format, vocabularies, collate, synthetic data."""

from .split import RetrievalSplit, load_pil

__all__ = ["RetrievalSplit", "load_pil"]
