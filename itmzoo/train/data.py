"""The training loader: resumable, rank-sharded batches whose randomness depends only on their position.

* Order: `torch.utils.data.DistributedSampler`'s permutation (``seed + epoch``; with one process it is a
  plain shuffle), cut into batches; a resumed run starts at batch ``start`` of the same permutation.
  Rank r's batch k and the other ranks' batch k together are exactly batch k of a one-process run with
  the global batch size, so DDP sees the same data per step as a single device.
* Randomness of the data side (a model's training tokenizer or image transform: word masking, region
  dropping, crops) is seeded per batch from ``(seed, epoch, batch, rank)`` in whichever process loads
  it, and the main process's generators are put back afterwards. A batch is therefore the same whether
  it is loaded by worker 0 or 3, in the first run or after a resume, and the data never shifts the
  model's own random stream (dropout).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from ..data.collate import ImagePairDataset, PairCollate, PairDataset, _check_kind
from ..data.split import RetrievalSplit
from ..features import cat_features

__all__ = ["ResumableBatchSampler", "SeededBatches", "make_train_loader", "merge_batches", "resolve_epoch_over"]

BatchKey = tuple[int, int, list[int]]  # (epoch, batch index in the epoch, item indices)


class ResumableBatchSampler(Sampler[BatchKey]):
    """This rank's batches of one epoch, from `start` on, as ``(epoch, batch, indices)`` keys."""

    def __init__(self, n_items: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        # without drop_last, DistributedSampler pads the permutation so every rank holds as many items
        self.sampler = DistributedSampler(range(n_items), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        self.limit: int | None = None  # use only the first `limit` batches of an epoch (whole optimizer steps)

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.sampler) // self.batch_size if self.drop_last else -(-len(self.sampler) // self.batch_size)
        return n if self.limit is None else min(n, self.limit)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def __iter__(self) -> Iterator[BatchKey]:
        self.sampler.set_epoch(self.epoch)
        idx = list(iter(self.sampler))
        for b in range(self.start, self.batches_per_epoch):
            yield self.epoch, b, idx[b * self.batch_size:(b + 1) * self.batch_size]


def _batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededBatches(Dataset):
    """Loads a whole batch per key, with the data-side generators seeded from the key."""

    def __init__(self, items: Dataset, collate: Any, seed: int = 0, rank: int = 0) -> None:
        self.items, self.collate, self.seed, self.rank = items, collate, seed, rank

    def __len__(self) -> int:
        return len(self.items)

    def warm_up(self) -> None:
        """Load one item once, RNG untouched: lazy imports on the first batch (nltk draws from
        `random` when imported) then happen here, not inside the first seeded batch of one run only."""
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            self.collate([self.items[0]])
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])

    def __getitem__(self, key: BatchKey) -> dict[str, torch.Tensor]:
        epoch, b, idx = key
        s = _batch_seed(self.seed, epoch, b, self.rank)
        saved = None
        if get_worker_info() is None:  # main process: do not disturb the model's random stream
            saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            torch.random.default_generator.manual_seed(s)  # CPU only: CUDA streams stay the model's
            np.random.seed(s % 2**32)
            random.seed(s)
            return self.collate([self.items[i] for i in idx])
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])


def _passthrough(batch: Any) -> Any:
    return batch


def resolve_epoch_over(model: Any, epoch_over: str | None = None) -> str:
    """``"captions"`` or ``"images"``: the config's choice, else the model's ``train_epoch_over``, else captions."""
    unit = epoch_over or getattr(model, "train_epoch_over", None) or "captions"
    if unit not in ("captions", "images"):
        raise ValueError(f"epoch_over must be 'captions' or 'images', got {unit!r}")
    return unit


def make_train_loader(split: RetrievalSplit, model: Any, micro_batch: int, *, seed: int = 0, rank: int = 0,
                      world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                      drop_last: bool = True, epoch_over: str | None = None) -> DataLoader:
    """Training pairs with the model's training transform and tokenizer, in resumable batches.

    ``epoch_over="captions"``: one item per caption (its image); ``"images"``: one item per image with
    one of its captions drawn at random per epoch (seeded, see `ImagePairDataset`). ``None``: the
    model's ``train_epoch_over`` attribute, else captions.
    """
    _check_kind(split, model)
    unit = resolve_epoch_over(model, epoch_over)
    dataset = PairDataset if unit == "captions" else ImagePairDataset
    pairs = dataset(split, model.image_transform_for(True))
    sampler = ResumableBatchSampler(len(pairs), micro_batch, seed=seed, rank=rank, world_size=world_size,
                                    drop_last=drop_last)
    if sampler.batches_per_epoch == 0:
        raise ValueError(f"split '{split.name}' has {len(pairs)} {unit}: not one batch of {micro_batch} per rank "
                         f"({world_size} rank(s)); lower train.batch_size")
    gen = torch.Generator().manual_seed(seed)  # the loader's own seed draws never touch the global stream
    batches = SeededBatches(pairs, PairCollate(model.input_kind, model.tokenizer, train=True), seed, rank)
    batches.warm_up()
    return DataLoader(batches, sampler=sampler,
                      batch_size=None, collate_fn=_passthrough, num_workers=num_workers, pin_memory=pin_memory,
                      generator=gen, persistent_workers=num_workers > 0)


def merge_batches(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate micro-batches along dim 0 (padded dims are zero-padded to the longest)."""
    keys = list(batches[0])
    out: dict[str, Any] = {}
    for k in keys:
        vals = [b[k] for b in batches]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            raise TypeError(f"cannot merge batch key '{k}' of type {type(vals[0]).__name__}; batches must hold tensors")
        out[k] = cat_features(vals)
    return out
