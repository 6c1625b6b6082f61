"""Recall@K, median and mean rank for image-text retrieval, vectorised in torch.

Definitions follow VSE++ / SCAN / VSE-infinity (`i2t`, `t2i` in their `evaluation.py`):

* **i2t** (image query, caption gallery): the rank of image *i* is the 0-based position of its
  *best-scoring* ground-truth caption among all captions.
* **t2i** (caption query, image gallery): the rank of caption *j* is the position of its image.
* ``R@K = 100 * mean(rank < K)`` (percent), ``medr = floor(median(rank)) + 1``,
  ``meanr = mean(rank) + 1``, ``rsum = sum of the six recalls``.

Ranks are counts of gallery items scoring strictly higher ("optimistic" ties; upstream's order among
equal scores comes from numpy's unstable sort and cannot be reproduced). On tie-free matrices this
equals the reference exactly. ``tie_mode="pessimistic"`` ranks gallery items that tie with the
positive above it (for i2t: negatives tying with the best ground-truth caption; other ground-truth
captions never count against an image).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch

TieMode = Literal["optimistic", "pessimistic"]
RECALL_KS = (1, 5, 10)
METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum",
)

__all__ = ["METRIC_KEYS", "rank_metrics", "recall_metrics", "retrieval_ranks"]


def _as_tensor(x: torch.Tensor | np.ndarray | Sequence, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _check(sims: torch.Tensor, caption_to_image: torch.Tensor) -> None:
    if sims.dim() != 2:
        raise ValueError(f"similarity matrix must be 2-D [n_images, n_captions], got shape {tuple(sims.shape)}")
    n_img, n_cap = sims.shape
    if caption_to_image.dim() != 1 or caption_to_image.numel() != n_cap:
        raise ValueError(
            f"caption_to_image must have one entry per caption (column): expected {n_cap}, "
            f"got shape {tuple(caption_to_image.shape)}"
        )
    if n_cap and (int(caption_to_image.min()) < 0 or int(caption_to_image.max()) >= n_img):
        raise ValueError(f"caption_to_image values must lie in [0, {n_img}), got range "
                         f"[{int(caption_to_image.min())}, {int(caption_to_image.max())}]")
    if n_cap and torch.bincount(caption_to_image, minlength=n_img).min() == 0:
        missing = torch.nonzero(torch.bincount(caption_to_image, minlength=n_img) == 0).flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one caption; images without one include {missing}")
    if not torch.isfinite(sims).all():
        bad = torch.nonzero(~torch.isfinite(sims))[:3].tolist()
        raise ValueError(
            f"similarity matrix has non-finite values (NaN/inf), e.g. at [image, caption] {bad}; "
            "upstream's argsort would rank a NaN first, so itmzoo refuses to score it"
        )


@torch.no_grad()
def retrieval_ranks(
    sims: torch.Tensor | np.ndarray,
    caption_to_image: torch.Tensor | np.ndarray | Sequence[int],
    tie_mode: TieMode = "optimistic",
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks ``(i2t[n_images], t2i[n_captions])`` of a ``[n_images, n_captions]`` score matrix.

    Works for any number of captions per image. Memory beyond `sims` is bounded by `chunk` rows.
    """
    if tie_mode not in ("optimistic", "pessimistic"):
        raise ValueError(f"tie_mode must be 'optimistic' or 'pessimistic', got {tie_mode!r}")
    S = _as_tensor(sims)
    if not S.is_floating_point():
        S = S.double()
    c2i = _as_tensor(caption_to_image, torch.long).to(S.device)
    _check(S, c2i)
    n_img, n_cap = S.shape
    cols = torch.arange(n_cap, device=S.device)

    # score of each caption with its own image, and the best ground-truth score of each image
    pos = S[c2i, cols]  # [n_cap]
    best = torch.full((n_img,), -math.inf, dtype=S.dtype, device=S.device)
    best.scatter_reduce_(0, c2i, pos, reduce="amax")

    i2t = torch.empty(n_img, dtype=torch.long, device=S.device)
    for a in range(0, n_img, chunk):
        block = S[a:a + chunk]
        b = best[a:a + chunk, None]
        if tie_mode == "optimistic":
            i2t[a:a + chunk] = (block > b).sum(1)
        else:
            # captions tying with the best GT caption count as ranked above it, except GT ones
            is_gt = c2i[None, :] == torch.arange(a, a + block.shape[0], device=S.device)[:, None]
            i2t[a:a + chunk] = ((block > b) | ((block == b) & ~is_gt)).sum(1)

    t2i = torch.zeros(n_cap, dtype=torch.long, device=S.device)
    col_chunk = max(1, chunk * 16)
    for a in range(0, n_cap, col_chunk):
        block = S[:, a:a + col_chunk]
        p = pos[a:a + col_chunk][None, :]
        if tie_mode == "optimistic":
            t2i[a:a + col_chunk] = (block > p).sum(0)
        else:
            t2i[a:a + col_chunk] = (block >= p).sum(0) - 1  # minus the caption's own image
    return i2t, t2i


def rank_metrics(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """``{"r1", "r5", "r10", "medr", "meanr"}`` of 0-based ranks, as the reference computes them."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to summarise")
    out = {f"r{k}": float(100.0 * np.count_nonzero(r < k) / r.size) for k in ks}
    out["medr"] = float(np.floor(np.median(r)) + 1)
    out["meanr"] = float(r.mean() + 1)
    return out


def recall_metrics(
    sims: torch.Tensor | np.ndarray,
    caption_to_image: torch.Tensor | np.ndarray | Sequence[int],
    tie_mode: TieMode = "optimistic",
) -> dict[str, float]:
    """All standard metrics of one score matrix: ``i2t_r1 ... t2i_meanr, rsum`` (percent, 1-based ranks)."""
    i2t, t2i = retrieval_ranks(sims, caption_to_image, tie_mode=tie_mode)
    out: dict[str, float] = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k, v in rank_metrics(ranks).items():
            out[f"{prefix}_{k}"] = v
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out
