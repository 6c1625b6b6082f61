"""Two-stage scoring: a cheap first stage over every pair, a second stage over each query's top k.

This follows the re-ranked protocol of ALBEF, BLIP and Multi-SEA (``salesforce/ALBEF @ b9727e4``,
``salesforce/BLIP @ 056a169``, ``jim4399266/Multi-SEA @ 3941a49``, their ``evaluation`` functions):

1. the first stage scores every image x caption pair (`model.similarity`, block by block);
2. each image takes its top k captions and each caption its top k images, over the whole gallery;
3. the second stage (`model.score_pairs`) scores those pairs, per direction: ``"i2t"`` pairs have the
   image as the query, ``"t2i"`` pairs the caption;
4. two matrices are filled with -100 everywhere except the top-k entries of their direction, which hold
   the second-stage scores; i2t ranks come from the first matrix and t2i ranks from the second.

A ground truth outside the top k ties at -100 with every other unselected item. Upstream's numpy
argsort puts it anywhere among those ties; itmzoo's default optimistic ranks put it right after the k
candidates (rank k + 1) and ``tie_mode="pessimistic"`` after every tie. R@K for K <= k is exact
either way; for K > k the two modes bound it from above and below, and medr/meanr depend on the
mode. Second-stage scores at or below -100 would be ranked wrongly, as upstream would; the evaluator
refuses them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..features import Features, features_len, features_to, slice_features
from ..threads import run_blocks
from .similarity import _comm_device, autocast_context, scoring_threads, similarity_matrix

__all__ = ["FILL", "TwoStageScores", "fill_matrix", "score_candidates", "topk_candidates", "two_stage_scores"]

FILL = -100.0  # ALBEF/BLIP/Multi-SEA's value outside the top k


@dataclasses.dataclass
class TwoStageScores:
    """The matrices of a two-stage evaluation, all ``[n_images, n_captions]`` (image-major)."""

    first: torch.Tensor  # first-stage scores of every pair
    i2t: torch.Tensor  # second-stage scores of each image's top k captions, FILL elsewhere
    t2i: torch.Tensor  # second-stage scores of each caption's top k images, FILL elsewhere
    k_i2t: int  # candidates per image query (min(k, n_captions))
    k_t2i: int  # candidates per caption query (min(k, n_images))
    seconds: dict[str, float]  # wall time of each stage


def topk_candidates(first: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(captions of each image [n_img, k_i2t], images of each caption [n_txt, k_t2i])``, best first."""
    n_img, n_txt = first.shape
    i2t = first.topk(min(k, n_txt), dim=1).indices
    t2i = first.topk(min(k, n_img), dim=0).indices.t().contiguous()
    return i2t, t2i


def _query_batches(n_queries: int, k: int, pair_batch_size: int) -> list[range]:
    per = max(1, pair_batch_size // max(k, 1))
    return [range(a, min(a + per, n_queries)) for a in range(0, n_queries, per)]


@torch.no_grad()
def score_candidates(model: torch.nn.Module, image_feats: Features, text_feats: Features, cand: torch.Tensor,
                     direction: str, queries: list[range], device: torch.device, amp: str | None = None,
                     dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Second-stage scores ``[n_queries, k]`` of the queries in `queries` (batches of whole queries).

    Each call gives `model.score_pairs` only the images and captions its pairs use, on `device`.
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    k = cand.shape[1]
    rows = [q for b in queries for q in b]
    out = torch.empty(len(rows), k, dtype=torch.float32)
    offsets = [0]
    for b in queries:
        offsets.append(offsets[-1] + len(b))
    bar = tqdm(total=len(rows) * k, desc=f"second stage {direction}", unit="pair", disable=not progress, leave=False)
    lock = threading.Lock()

    def work(n: int, _state: None) -> None:
        b = queries[n]
        q = torch.arange(b.start, b.stop)
        c = cand[q]
        query_index = q[:, None].expand(-1, k).reshape(-1)
        img_idx, txt_idx = (query_index, c.reshape(-1)) if direction == "i2t" else (c.reshape(-1), query_index)
        u_img, ii = torch.unique(img_idx, return_inverse=True)
        u_txt, ti = torch.unique(txt_idx, return_inverse=True)
        im = features_to(slice_features(image_feats, u_img), device, dtype)
        tx = features_to(slice_features(text_feats, u_txt), device, dtype)
        with autocast_context(device, amp):
            s = model.score_pairs(im, tx, ii.to(device), ti.to(device), direction)
        if tuple(s.shape) != (len(q) * k,):
            raise RuntimeError(f"{type(model).__name__}.score_pairs returned shape {tuple(s.shape)} for "
                               f"{len(q) * k} pairs; expected one score per pair")
        out[offsets[n]:offsets[n + 1]] = s.detach().float().cpu().view(len(q), k)
        with lock:
            bar.update(len(q) * k)

    try:  # on the CPU, whole query batches on threads
        run_blocks(range(len(queries)), work, scoring_threads(model, device, len(queries)))
    finally:
        bar.close()
    if out.numel() and not bool((out > FILL).all()):
        bad = out[~(out > FILL)][:3].tolist()
        raise ValueError(f"{type(model).__name__}.score_pairs gave scores at or below {FILL} (e.g. {bad}) or NaN; "
                         f"the re-ranked protocol fills unselected pairs with {FILL}, so such scores cannot be ranked")
    return out


def fill_matrix(n_img: int, n_txt: int, cand: torch.Tensor, scores: torch.Tensor, direction: str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[n_img, n_txt]`` filled with FILL except each query's candidates, which get their scores."""
    if direction == "i2t":
        m = torch.full((n_img, n_txt), FILL, dtype=dtype)
        m.scatter_(1, cand, scores.to(dtype))
        return m
    m = torch.full((n_txt, n_img), FILL, dtype=dtype)
    m.scatter_(1, cand, scores.to(dtype))
    return m.t().contiguous()


def _shard_batches(batches: list[range], rank: int, world: int) -> list[range]:
    return batches[rank * len(batches) // world:(rank + 1) * len(batches) // world]


@torch.no_grad()
def two_stage_scores(model: torch.nn.Module, image_feats: Features, text_feats: Features, k: int, *,
                     block: tuple[int, int], pair_batch_size: int = 4096, device: str | torch.device | None = None,
                     amp: str | None = None, dtype: torch.dtype | None = None, progress: bool = True,
                     distributed: bool = False) -> TwoStageScores | None:
    """First stage in blocks, top k per image and per caption, second stage on those pairs (see module doc).

    With `distributed`, the ranks share the first-stage blocks and the second-stage query batches;
    rank 0 chooses the candidates from the whole first-stage matrix and returns the result, the other
    ranks return None.
    """
    device = torch.device(device) if device is not None else model.device
    out_dtype = dtype or torch.float32
    n_img, n_txt = features_len(image_feats), features_len(text_feats)
    rank, world = 0, 1
    if distributed:
        from .. import distributed as D

        rank, world = D.get_rank(), D.get_world_size()
    t0 = time.perf_counter()
    first = similarity_matrix(model, image_feats, text_feats, block=block, device=device, amp=amp, dtype=dtype,
                              progress=progress, distributed=distributed)
    t1 = time.perf_counter()
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    if rank == 0:
        cand_i2t, cand_t2i = topk_candidates(first, k)
    else:
        cand_i2t = torch.empty(n_img, k_i2t, dtype=torch.long)
        cand_t2i = torch.empty(n_txt, k_t2i, dtype=torch.long)
    if world > 1:
        comm = _comm_device(device)
        for c in (cand_i2t, cand_t2i):
            buf = c.to(comm)
            torch.distributed.broadcast(buf, src=0)
            c.copy_(buf.cpu())
    scores = {}
    was_training = model.training
    model.eval()
    try:
        for direction, cand, n_q in (("i2t", cand_i2t, n_img), ("t2i", cand_t2i, n_txt)):
            batches = _query_batches(n_q, cand.shape[1], pair_batch_size)
            mine = _shard_batches(batches, rank, world)
            local = score_candidates(model, image_feats, text_feats, cand, direction, mine, device, amp, dtype,
                                     progress)
            if world == 1:
                scores[direction] = local
                continue
            from .. import distributed as D

            pieces = D.gather_to_main(local.reshape(-1).to(_comm_device(device)))
            if pieces is not None:
                scores[direction] = torch.cat([p.cpu() for p in pieces]).view(n_q, cand.shape[1])
    finally:
        model.train(was_training)
    t2 = time.perf_counter()
    if rank != 0:
        return None
    return TwoStageScores(first=first, i2t=fill_matrix(n_img, n_txt, cand_i2t, scores["i2t"], "i2t", out_dtype),
                          t2i=fill_matrix(n_img, n_txt, cand_t2i, scores["t2i"], "t2i", out_dtype),
                          k_i2t=k_i2t, k_t2i=k_t2i, seconds={"first_stage": t1 - t0, "second_stage": t2 - t1})


def describe(result: TwoStageScores) -> dict[str, Any]:
    """What a metrics record says about a two-stage evaluation (k, pairs and time of each stage)."""
    n_img, n_txt = result.first.shape
    return {"k_i2t": result.k_i2t, "k_t2i": result.k_t2i,
            # R@K does not depend on how the -100 ties are ordered for K up to this
            "recall_exact_up_to": min(result.k_i2t, result.k_t2i),
            "first_stage_pairs": n_img * n_txt,
            "second_stage_pairs": n_img * result.k_i2t + n_txt * result.k_t2i,
            **{f"{k}_seconds": v for k, v in result.seconds.items()}}
