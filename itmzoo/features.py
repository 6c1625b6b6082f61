"""Feature sets: what `encode_image` / `encode_text` return, and the helpers every layer uses on them.

A feature set is one vector per item (``Tensor[N, D]``) or token sets with masks
(``{"tokens": Tensor[N, L, D], "mask": Tensor[N, L]}``): a dict whose tensors all have N rows.
The evaluator, the trainer and the distributed gathers only slice, move and concatenate them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

__all__ = ["Features", "cat_features", "features_len", "features_to", "sequence_mask", "slice_features"]

# One vector per item (Tensor[N, D]) or token sets with masks ({"tokens": [N, L, D], "mask": [N, L]}).
Features = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def features_len(feats: Features) -> int:
    """Number of items (rows) in a feature set."""
    if isinstance(feats, torch.Tensor):
        return feats.shape[0]
    if not feats:
        raise ValueError("empty feature dict")
    return next(iter(feats.values())).shape[0]


def slice_features(feats: Features, index: slice | torch.Tensor) -> Features:
    """Rows `index` of a feature set, keeping its form."""
    if isinstance(feats, torch.Tensor):
        return feats[index]
    return {k: v[index] for k, v in feats.items()}


def features_to(feats: Features, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Features:
    """Move a feature set or a batch dict; `dtype` applies to floating tensors only (masks and ids keep
    theirs); non-tensor values of a dict pass through."""

    def mv(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None,
                    non_blocking=True)

    if isinstance(feats, torch.Tensor):
        return mv(feats)
    return {k: mv(v) for k, v in feats.items()}


def sequence_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Boolean ``[B, max_len]``: True where ``t < lengths[b]`` (real tokens or regions)."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths.long()[:, None]


def cat_features(parts: Sequence[Features]) -> Features:
    """Concatenate feature sets along rows; token sets of different lengths are right-padded with 0."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return _cat_padded(list(parts))
    return {k: _cat_padded([p[k] for p in parts]) for k in first}


def _cat_padded(ts: list[torch.Tensor]) -> torch.Tensor:
    if ts[0].dim() >= 2 and len({t.shape[1:] for t in ts}) > 1:
        # token sets from batches padded to different lengths: pad every dim to the max
        shape = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
        padded = []
        for t in ts:
            pad: list[int] = []
            for d in reversed(range(1, t.dim())):
                pad += [0, shape[d - 1] - t.shape[d]]
            padded.append(nn.functional.pad(t, pad))
        ts = padded
    return torch.cat(ts, 0)
