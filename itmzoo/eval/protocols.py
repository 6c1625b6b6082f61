"""Evaluation protocols (Flickr30K 1K, COCO 1K 5-fold, COCO 5K, full split) and ensembles.

* ``f30k-1k``: the whole 1,000-image Flickr30K test split in one pass.
* ``coco-5k``: the whole 5,000-image COCO ``testall`` split in one pass.
* ``coco-1k-5fold``: ``testall`` cut into 5 contiguous folds of 1,000 images (and their captions);
  every metric, medr and meanr included, is the mean over folds, so ``rsum`` is the mean of the
  per-fold rsums (SCAN/SGRAF print a different, wrong "rsum" for this protocol).
* ``5fold``: the same fold scheme for a split of any size divisible by 5.
* ``full``: the whole split, whatever its size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .options import PROTOCOLS, EvalOptions, Protocol, ResolvedSettings, eval_options, get_protocol, resolve_settings
from .recall import METRIC_KEYS, DirectionalScores, TieMode, recall_metrics, retrieval_ranks

__all__ = ["PROTOCOLS", "FoldRanks", "Protocol", "direction_matrices", "ensemble_similarity", "evaluate",
           "evaluate_ensemble", "fold_ranks", "metrics_from_sims", "protocol_folds"]


def protocol_folds(protocol: str, caption_to_image: np.ndarray, n_images: int) -> list[tuple[slice, np.ndarray]]:
    """For each fold: the image slice and the caption indices (in caption order) whose image is in it."""
    p = get_protocol(protocol)
    if p.n_images is not None and n_images != p.n_images:
        alt = "5fold" if p.n_folds == 5 else "full"
        raise ValueError(f"protocol {protocol!r} expects a split of {p.n_images} images, got {n_images}; "
                         f"use protocol='{alt}' for a split of another size")
    if n_images % p.n_folds:
        raise ValueError(f"protocol {protocol!r} needs the number of images ({n_images}) "
                         f"to be divisible by {p.n_folds}")
    size = n_images // p.n_folds
    c2i = np.asarray(caption_to_image)
    folds = []
    for k in range(p.n_folds):
        caps = np.flatnonzero((c2i >= k * size) & (c2i < (k + 1) * size))
        folds.append((slice(k * size, (k + 1) * size), caps))
    return folds


def direction_matrices(sims: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per fold of ``evaluate(..., return_sims=True)["sims"]`` (a matrix, a `DirectionalScores`, or a list
    of them per fold): the ``(i2t, t2i)`` matrices; one matrix serves both unless the model re-ranks."""
    out = []
    for s in sims if isinstance(sims, list) else [sims]:
        if isinstance(s, DirectionalScores):
            out.append((torch.as_tensor(s.i2t), torch.as_tensor(s.t2i)))
        else:
            m = torch.as_tensor(s)
            out.append((m, m))
    return out


@dataclasses.dataclass
class FoldRanks:
    """0-based ranks of one fold's queries: `i2t` per image from `first_image` on, `t2i` per caption of
    `captions` (their positions in the split)."""

    first_image: int
    captions: np.ndarray
    i2t: torch.Tensor
    t2i: torch.Tensor


def fold_ranks(sims: Any, split: Any, protocol: str = "full") -> list[FoldRanks]:
    """The ranks behind the metrics of ``evaluate(..., return_sims=True)``, per fold of `protocol`
    (`sims`: a full matrix, which is cut into the folds, or the list of per-fold matrices)."""
    c2i = np.asarray(split.caption_to_image)
    folds, fold_sims, _ = _per_fold(sims, c2i, protocol)
    out = []
    for (f_img, caps), (i2t, t2i) in zip(folds, direction_matrices(fold_sims)):
        sub = c2i[caps] - f_img.start
        out.append(FoldRanks(f_img.start, caps, retrieval_ranks(i2t, sub)[0], retrieval_ranks(t2i, sub)[1]))
    return out


def _summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS}


def _slice_fold(S: Any, f_img: slice, caps: np.ndarray) -> Any:
    if isinstance(S, DirectionalScores):
        return DirectionalScores(_slice_fold(S.i2t, f_img, caps), _slice_fold(S.t2i, f_img, caps))
    return S[f_img][:, torch.as_tensor(caps)]


def _per_fold(sims: Any, c2i: np.ndarray, protocol: str) -> tuple[list[tuple[slice, np.ndarray]], list[Any], int]:
    """The protocol's folds, each fold's scores (a matrix or a `DirectionalScores`) and the number of
    images, from a full matrix (cut into folds here) or from the list of per-fold matrices."""
    if isinstance(sims, (list, tuple)):
        n_images = sum(s.shape[0] for s in sims)
        return protocol_folds(protocol, c2i, n_images), list(sims), n_images
    n_images = sims.shape[0]
    folds = protocol_folds(protocol, c2i, n_images)
    S = torch.as_tensor(np.asarray(sims)) if isinstance(sims, np.ndarray) else sims
    if len(folds) == 1:
        return folds, [S], n_images
    return folds, [_slice_fold(S, f_img, caps) for f_img, caps in folds], n_images


def metrics_from_sims(sims: Any, caption_to_image: np.ndarray, protocol: str = "full",
                      tie_mode: TieMode = "optimistic") -> dict[str, Any]:
    """Metrics of a full score matrix (or of the list of per-fold matrices) under `protocol`.

    A matrix may be a `DirectionalScores` (one matrix per direction, as two-stage models give).
    """
    c2i = np.asarray(caption_to_image, dtype=np.int64)
    p = get_protocol(protocol)
    folds, fold_sims, n_images = _per_fold(sims, c2i, protocol)
    rows = []
    for (f_img, caps), S in zip(folds, fold_sims):
        rows.append(recall_metrics(S, c2i[caps] - f_img.start, tie_mode=tie_mode))
    out: dict[str, Any] = _summarise(rows)
    out.update(protocol=protocol, n_images=n_images, n_captions=int(len(c2i)), n_folds=p.n_folds,
               tie_mode=tie_mode, recall_unit="percent", rank_base=1)
    if p.n_folds > 1:
        out["folds"] = rows
    return out


def _model_name(m: torch.nn.Module) -> str:
    return getattr(m, "registry_name", None) or type(m).__name__


def _provenance(split: Any, models: Sequence[torch.nn.Module]) -> dict[str, Any]:
    from .._version import __version__

    return {"split": getattr(split, "name", ""), "itmzoo_version": __version__,
            "model": [_model_name(m) for m in models] if len(models) > 1 else _model_name(models[0])}


def dedup_for_eval(split: Any, models: Sequence[torch.nn.Module], opts: EvalOptions, distributed: bool) -> Any:
    """`split` without repeated captions of an image when ``eval.dedup_captions`` (else the models) ask for it.

    Under a process group rank 0's ``hash_order`` is used by every rank (string hashes differ per process).
    """
    mode = opts.dedup_captions
    if mode is None:
        asked = {getattr(m.eval_settings(), "dedup_captions", None) or "none" for m in models}
        if len(asked) > 1:
            raise ValueError(f"the models ask for different caption de-duplication {sorted(asked)}; "
                             "set eval.dedup_captions")
        mode = asked.pop()
    if mode == "none":
        return split
    out = split.dedup_captions(mode)
    if distributed and mode == "hash_order":
        from .. import distributed as D

        captions, c2i = D.broadcast_object((out.captions, out.caption_to_image))
        out = dataclasses.replace(out, captions=captions, caption_to_image=c2i)
    return out


def evaluate(model: torch.nn.Module, split: Any, protocol: str | None = None, *,
             options: EvalOptions | Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Encode `split` with `model`, score it under `protocol` and return metrics plus provenance.

    Keywords are the fields of `itmzoo.eval.EvalOptions` (``batch_size``, ``device``, ``amp``, ``block``,
    ``rerank_k``, ``progress``, ...), given one by one or as ``options=``; ``None`` fields follow the
    model's ``eval_settings()``. Only the blocks a protocol needs are scored (for ``coco-1k-5fold`` the 5
    diagonal folds). Two-stage models are re-ranked (`itmzoo.eval.rerank`) and the result records k and
    both stages. Inside an initialised process group (``torchrun``) every rank takes a share of the
    encoding and scoring, and every rank returns the same metrics (score matrices on rank 0 only).
    """
    return evaluate_ensemble([model], split, protocol, options=options, **overrides)


def ensemble_similarity(sims: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """Weighted mean of score matrices (upstream ``eval_ensemble``: the plain mean of two).

    With any `DirectionalScores` among them, each direction is averaged on its own (a single matrix
    stands for both directions).
    """
    if not sims:
        raise ValueError("ensemble needs at least one similarity matrix")
    if any(isinstance(s, DirectionalScores) for s in sims):
        as_pair = [s if isinstance(s, DirectionalScores) else DirectionalScores(s, s) for s in sims]
        return DirectionalScores(ensemble_similarity([s.i2t for s in as_pair], weights),
                                 ensemble_similarity([s.t2i for s in as_pair], weights))
    mats = [torch.as_tensor(np.asarray(s)) if isinstance(s, np.ndarray) else s for s in sims]
    if len({tuple(m.shape) for m in mats}) != 1:
        raise ValueError(f"ensemble members have different shapes: {[tuple(m.shape) for m in mats]}")
    w = [1.0 / len(mats)] * len(mats) if weights is None else [float(x) / sum(weights) for x in weights]
    if len(w) != len(mats):
        raise ValueError(f"{len(w)} weights for {len(mats)} matrices")
    out = mats[0] * w[0]
    for m, wi in zip(mats[1:], w[1:]):
        out = out + m * wi
    return out


def _score_model(model: torch.nn.Module, img: Any, txt: Any, folds: list[tuple[slice, np.ndarray]], n_folds: int,
                 opts: EvalOptions, settings: ResolvedSettings, device: torch.device | None,
                 dist_on: bool) -> tuple[list[Any], list[Any]] | None:
    """Per fold: the scores to rank (a matrix or `DirectionalScores`) and, for two-stage models, the
    `TwoStageScores`. None on ranks other than 0 of a distributed evaluation."""
    from ..features import slice_features
    from .rerank import two_stage_scores
    from .similarity import similarity_matrix

    dtype = torch.float64 if opts.sims_dtype == "float64" else None
    parts = [(img, txt)] if n_folds == 1 else [(slice_features(img, f_img), slice_features(txt, torch.as_tensor(caps)))
                                               for f_img, caps in folds]
    scores, stages = [], []
    for im, tx in parts:
        if model.scoring == "two-stage":
            r = two_stage_scores(model, im, tx, settings.rerank_k, block=settings.block,
                                 pair_batch_size=opts.pair_batch_size, device=device, amp=opts.amp, dtype=dtype,
                                 progress=opts.progress, distributed=dist_on)
            scores.append(None if r is None else DirectionalScores(r.i2t, r.t2i))
            stages.append(r)
        else:
            scores.append(similarity_matrix(model, im, tx, block=settings.block, device=device, amp=opts.amp,
                                            dtype=dtype, progress=opts.progress, distributed=dist_on))
            stages.append(None)
    if scores and scores[0] is None:
        return None
    return scores, stages


def evaluate_ensemble(models: Sequence[torch.nn.Module], split: Any, protocol: str | None = None, *,
                      weights: Sequence[float] | None = None, options: EvalOptions | Mapping[str, Any] | None = None,
                      **overrides: Any) -> dict[str, Any]:
    """Average the score matrices of several models (fold by fold) and evaluate the mean.

    Keywords as for `evaluate`; each model is encoded and scored with its own ``eval_settings()``.
    """
    from .. import distributed as D
    from .rerank import describe
    from .similarity import encode_split

    if not models:
        raise ValueError("evaluate_ensemble needs at least one model")
    opts = eval_options(options, **overrides)
    protocol = protocol or opts.protocol
    p = get_protocol(protocol)
    dist_on = D.is_distributed() if opts.distributed is None else (opts.distributed and D.is_distributed())
    main = not dist_on or D.is_main_process()
    n_captions = split.num_captions
    split = dedup_for_eval(split, models, opts, dist_on)
    folds = protocol_folds(protocol, split.caption_to_image, split.num_images)
    progress = opts.progress and main
    opts = dataclasses.replace(opts, progress=progress)
    per_model, stage_info, seconds = [], [], {"encode": 0.0, "score": 0.0}
    for m in models:
        settings = resolve_settings(m, opts)
        device = torch.device(opts.device) if opts.device is not None else None
        t0 = time.perf_counter()
        img, txt = encode_split(m, split, batch_size=opts.batch_size, device=device, amp=opts.amp,
                                num_workers=opts.num_workers, progress=progress,
                                image_batch_size=settings.image_batch_size,
                                text_batch_size=settings.text_batch_size, distributed=dist_on)
        t1 = time.perf_counter()
        rng = contextlib.nullcontext() if settings.seed is None else torch.random.fork_rng(
            devices=[device] if device is not None and device.type == "cuda" else [])
        with rng:
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            got = _score_model(m, img, txt, folds, p.n_folds, opts, settings, device, dist_on)
        seconds["encode"] += t1 - t0
        seconds["score"] += time.perf_counter() - t1
        del img, txt
        if got is None:
            continue
        per_model.append(got[0])
        if m.scoring == "two-stage":
            info: dict[str, Any] = {"model": _model_name(m), "rerank_k": settings.rerank_k}
            info.update(describe(got[1][0]) if len(got[1]) == 1 else {
                "folds": [describe(r) for r in got[1]]})
            first = [r.first for r in got[1]]
            info["first_stage"] = {k: v for k, v in metrics_from_sims(
                first, split.caption_to_image, protocol, tie_mode=opts.tie_mode).items() if k in METRIC_KEYS}
            stage_info.append(info)
    out: dict[str, Any] | None = None
    fold_sims: list[Any] = []
    if main:
        fold_sims = [ensemble_similarity([pm[k] for pm in per_model], weights) for k in range(len(folds))]
        out = metrics_from_sims(fold_sims, split.caption_to_image, protocol, tie_mode=opts.tie_mode)
        out.update(_provenance(split, models))
        if split.num_captions != n_captions or opts.dedup_captions not in (None, "none"):
            out["dedup_captions"] = {"captions_before": n_captions, "captions": split.num_captions}
        out["seconds"] = seconds
        if dist_on:
            out["world_size"] = D.get_world_size()
        if stage_info:
            out["two_stage"] = stage_info[0] if len(models) == 1 else stage_info
        if weights is not None:
            out["ensemble_weights"] = list(weights)
    if dist_on:
        out = D.broadcast_object(out)
    if main and opts.return_sims:
        out["sims"] = fold_sims if p.n_folds > 1 else fold_sims[0]
    return out
