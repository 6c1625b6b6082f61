"""Turning items into model batches: padding regions, stacking pixels, tokenising captions."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .split import RetrievalSplit, load_pil

__all__ = [
    "CaptionDataset",
    "ImageCollate",
    "ImageDataset",
    "ImagePairDataset",
    "PairCollate",
    "PairDataset",
    "TextCollate",
    "collate_images",
    "eval_loaders",
    "pad_sequences",
]


def pad_sequences(seqs: Sequence[torch.Tensor], pad_value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D/2-D tensors along dim 0 into ``[B, Lmax, ...]``; returns (padded, lengths)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if len(seqs) and bool((lengths == lengths[0]).all()):
        return torch.stack(list(seqs)), lengths  # nothing to pad (eval-time regions): one copy
    out = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0, *seqs[0].shape[1:]), pad_value,
                     dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


def collate_images(images: Sequence[torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Regions ``[R_i, D]`` -> zero-padded ``regions`` + ``region_lengths``; pixels -> stacked ``pixels``."""
    if kind == "regions":
        regions, lengths = pad_sequences(images, 0.0)
        return {"regions": regions, "region_lengths": lengths}
    if kind == "pixels":
        return {"pixels": torch.stack(list(images))}
    raise ValueError(f"unknown input kind {kind!r}")


def _load(split: RetrievalSplit, i: int) -> Any:
    item = split.images[i]
    if split.kind == "regions":
        arr = np.asarray(item, dtype=np.float32)
        if not arr.flags.writeable:  # a row of a read-only memmap: read it into memory once (torch
            arr = arr.copy()         # warns on, and cannot safely share, non-writable arrays)
        if arr.ndim != 2:
            raise ValueError(f"split '{split.name}': image {i} has region features of shape {arr.shape}, "
                             "expected [R, D]")
        return arr
    return load_pil(item)


def _check_kind(split: RetrievalSplit, model: Any) -> None:
    if split.kind != model.input_kind:
        raise ValueError(f"model {type(model).__name__} takes {model.input_kind} "
                         f"but split '{split.name}' holds {split.kind}")


class ImageDataset(Dataset):
    """Each unique image once, transformed for evaluation."""

    def __init__(self, split: RetrievalSplit, transform: Callable[[Any], torch.Tensor]) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(_load(self.split, i))


class CaptionDataset(Dataset):
    def __init__(self, split: RetrievalSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, j: int) -> str:
        return self.split.captions[j]


class PairDataset(Dataset):
    """One item per caption: (transformed image, caption, image index) for training."""

    def __init__(self, split: RetrievalSplit, transform: Callable[[Any], torch.Tensor]) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, j: int) -> tuple[torch.Tensor, str, int]:
        i = int(self.split.caption_to_image[j])
        return self.transform(_load(self.split, i)), self.split.captions[j], i


class ImagePairDataset(Dataset):
    """One item per image: (transformed image, one of its captions drawn at random, image index).

    An epoch over images, as ALBEF/BLIP-style recipes (Multi-SEA) train: every image once per epoch
    with one random caption. The caption is drawn with torch's global generator at load time; the
    training loader seeds that generator per batch from ``(seed, epoch, batch, rank)``, so the draw
    is reproducible, differs between epochs, and does not depend on the worker that loads it.
    """

    def __init__(self, split: RetrievalSplit, transform: Callable[[Any], torch.Tensor]) -> None:
        self.split, self.transform = split, transform
        order = np.argsort(split.caption_to_image, kind="stable")
        counts = split.captions_per_image()
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._counts, self._order = counts, order

    def __len__(self) -> int:
        return self.split.num_images

    def caption_indices(self, i: int) -> np.ndarray:
        """Indices (into the split's captions) of image `i`'s captions, in split order."""
        return self._order[self._starts[i]:self._starts[i] + self._counts[i]]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        caps = self.caption_indices(i)
        j = int(caps[int(torch.randint(len(caps), ()))]) if len(caps) > 1 else int(caps[0])
        return self.transform(_load(self.split, i)), self.split.captions[j], i


class ImageCollate:
    """Picklable image collate: it holds the input kind only, so worker processes get no model copy."""

    def __init__(self, kind: str) -> None:
        if kind not in ("regions", "pixels"):
            raise ValueError(f"unknown input kind {kind!r}; expected 'regions' or 'pixels'")
        self.kind = kind

    def __call__(self, images: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return collate_images(images, self.kind)


class PairCollate:
    """Picklable training collate: images by input kind, text by the tokenizer (never the model)."""

    def __init__(self, kind: str, tokenizer: Callable[..., dict], train: bool) -> None:
        self.images = ImageCollate(kind)
        self.tokenizer = tokenizer
        self.train = train

    def __call__(self, items: list[tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor]:
        images, caps, idx = zip(*items)
        batch = dict(self.images(list(images)))
        batch.update(self.tokenizer(list(caps), train=self.train))
        batch["image_index"] = torch.tensor(idx, dtype=torch.long)
        return batch


class TextCollate:
    """Picklable caption collate (a lambda cannot go to spawned worker processes)."""

    def __init__(self, tokenizer: Callable[..., dict], train: bool = False) -> None:
        self.tokenizer, self.train = tokenizer, train

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(captions), train=self.train)


def eval_loaders(split: RetrievalSplit, model: Any, batch_size: int = 128,
                 num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Loaders of unique images and of all captions, in split order, with evaluation transforms."""
    _check_kind(split, model)
    images = DataLoader(ImageDataset(split, model.image_transform_for(False)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=ImageCollate(model.input_kind))
    captions = DataLoader(CaptionDataset(split), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=TextCollate(model.tokenizer, train=False))
    return images, captions
