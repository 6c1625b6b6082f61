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

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np
import torch

from ..threads import block_threads, run_blocks

TieMode = Literal["optimistic", "pessimistic"]
RECALL_KS = (1, 5, 10)
METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum",
)

__all__ = ["METRIC_KEYS", "DirectionalScores", "rank_metrics", "recall_metrics", "retrieval_ranks"]


@dataclasses.dataclass
class DirectionalScores:
    """One score matrix per direction, both ``[n_images, n_captions]`` (two-stage models re-rank each
    direction separately): i2t ranks come from `i2t`, t2i ranks from `t2i`."""

    i2t: torch.Tensor
    t2i: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.i2t.shape


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


def _check_finite(block: torch.Tensor, row_offset: int) -> None:
    # a row sum is finite when every entry is (NaN and inf propagate); only a failing block, or one
    # whose finite values overflow the sum, pays for the element-wise test
    if torch.isfinite(block.sum(1)).all() or torch.isfinite(block).all():
        return
    bad = torch.nonzero(~torch.isfinite(block))[:3]
    bad[:, 0] += row_offset
    raise ValueError(
        f"similarity matrix has non-finite values (NaN/inf), e.g. at [image, caption] {bad.tolist()}; "
        "upstream's argsort would rank a NaN first, so itmzoo refuses to score it"
    )


def _positive_ties(c2i: torch.Tensor, pos: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Per image, how many of its own captions score >= its best one (>= 1): the pessimistic i2t count of
    ``block >= best`` includes them, but other ground-truth captions never count against an image."""
    return torch.bincount(c2i, weights=(pos >= best[c2i]).double(), minlength=best.numel()).long()


def _ranks_torch(S: torch.Tensor, pos: torch.Tensor, best: torch.Tensor, strict: bool, chunk: int,
                 i2t: torch.Tensor, t2i: torch.Tensor) -> None:
    """The rank pass as torch ops over row blocks (CUDA: a handful of kernels per large block)."""
    cmp = torch.gt if strict else torch.ge
    n_img, n_cap = S.shape
    buf = torch.empty(min(chunk, n_img), n_cap, dtype=torch.bool, device=S.device)
    for a in range(0, n_img, chunk):
        block = S[a:a + chunk]
        _check_finite(block, a)
        hit = buf[: block.shape[0]]
        cmp(block, pos, out=hit)
        t2i += hit.sum(0, dtype=torch.int32)
        cmp(block, best[a:a + chunk, None], out=hit)
        i2t[a:a + chunk] = torch.count_nonzero(hit, dim=1)


def _ranks_cpu(S: torch.Tensor, pos: torch.Tensor, best: torch.Tensor, strict: bool, chunk: int,
               i2t: torch.Tensor, t2i: torch.Tensor, n_threads: int) -> None:
    """The rank pass on the CPU: `n_threads` threads each take the next cache-sized row block and run
    numpy on it (`itmzoo.threads.run_blocks`), each with its own t2i vote counts."""
    if S.dtype not in (torch.float32, torch.float64):
        S = S.float()  # exact for fp16/bf16, so comparisons are unchanged
    A, p, b = S.numpy(), pos.to(S.dtype).numpy(), best.to(S.dtype).numpy()
    out_i2t = i2t.numpy()
    cmp = np.greater if strict else np.greater_equal
    n_img, n_cap = A.shape

    def scratch() -> tuple[np.ndarray, np.ndarray]:  # (votes, comparison buffer) of one thread
        return np.zeros(n_cap, dtype=np.int32), np.empty((min(chunk, n_img), n_cap), dtype=bool)

    def work(a: int, st: tuple[np.ndarray, np.ndarray]) -> None:
        votes, hit = st
        block = A[a:a + chunk]
        h = hit[: block.shape[0]]
        with np.errstate(all="ignore"):  # inf - inf in the row sums means "look closer", not a warning
            finite = np.isfinite(block.sum(1)).all() or np.isfinite(block).all()
        if not finite:
            _check_finite(torch.from_numpy(block), a)  # raises with the positions
        cmp(block, p, out=h)
        votes += h.sum(0, dtype=np.int32)
        cmp(block, b[a:a + chunk, None], out=h)
        out_i2t[a:a + chunk] = h.sum(1)

    states = run_blocks(range(0, n_img, chunk), work, n_threads, scratch)
    t2i += torch.from_numpy(sum(votes for votes, _ in states))


@torch.no_grad()
def retrieval_ranks(
    sims: torch.Tensor | np.ndarray,
    caption_to_image: torch.Tensor | np.ndarray | Sequence[int],
    tie_mode: TieMode = "optimistic",
    chunk: int | None = None,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks ``(i2t[n_images], t2i[n_captions])`` of a ``[n_images, n_captions]`` score matrix.

    Works for any number of captions per image. Memory beyond `sims` is bounded by `chunk` rows
    (by default, about 1 MB of scores per block on CPU and 256 MB on CUDA). On the CPU the blocks are
    shared by `num_threads` threads (default ``torch.get_num_threads()``, which follows
    ``OMP_NUM_THREADS`` and ``torch.set_num_threads``).
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

    # One pass over row blocks that fit in cache: each block gives its images' i2t ranks and adds its
    # rows' votes to every caption's t2i rank. The matrix is read once, in memory order.
    if chunk is None:
        budget = (1 << 28) if S.device.type == "cuda" else (1 << 20)
        chunk = max(1, budget // max(1, n_cap * S.element_size()))
    i2t = torch.empty(n_img, dtype=torch.long, device=S.device)
    t2i = torch.zeros(n_cap, dtype=torch.int32, device=S.device)
    strict = tie_mode == "optimistic"
    if S.device.type == "cpu" and n_img:
        threads = block_threads(-(-n_img // chunk), num_threads or None)
        _ranks_cpu(S.contiguous(), pos, best, strict, chunk, i2t, t2i, threads)
    else:
        _ranks_torch(S, pos, best, strict, chunk, i2t, t2i)
    if not strict:
        i2t -= _positive_ties(c2i, pos, best)  # own captions never rank above their image
        t2i -= 1  # each caption's own image was counted by >=
    t2i = t2i.long()
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
    sims: torch.Tensor | np.ndarray | DirectionalScores,
    caption_to_image: torch.Tensor | np.ndarray | Sequence[int],
    tie_mode: TieMode = "optimistic",
) -> dict[str, float]:
    """All standard metrics of one score matrix (or of one matrix per direction):
    ``i2t_r1 ... t2i_meanr, rsum`` (percent, 1-based ranks)."""
    if isinstance(sims, DirectionalScores):
        i2t = retrieval_ranks(sims.i2t, caption_to_image, tie_mode=tie_mode)[0]
        t2i = retrieval_ranks(sims.t2i, caption_to_image, tie_mode=tie_mode)[1]
    else:
        i2t, t2i = retrieval_ranks(sims, caption_to_image, tie_mode=tie_mode)
    out: dict[str, float] = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k, v in rank_metrics(ranks).items():
            out[f"{prefix}_{k}"] = v
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out
