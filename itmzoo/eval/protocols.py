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

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from .recall import METRIC_KEYS, TieMode, recall_metrics

__all__ = ["PROTOCOLS", "Protocol", "ensemble_similarity", "evaluate", "evaluate_ensemble", "metrics_from_sims",
           "protocol_folds"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    n_folds: int
    n_images: int | None  # required split size, None = any
    description: str


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol("f30k-1k", 1, 1000, "Flickr30K test, 1,000 images, one pass"),
        Protocol("coco-5k", 1, 5000, "COCO Karpathy test (testall), 5,000 images, one pass"),
        Protocol("coco-1k-5fold", 5, 5000, "COCO testall, mean over 5 contiguous folds of 1,000 images"),
        Protocol("5fold", 5, None, "mean over 5 contiguous folds of equal size"),
        Protocol("full", 1, None, "the whole split, one pass"),
    ]
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def protocol_folds(protocol: str, caption_to_image: np.ndarray, n_images: int) -> list[tuple[slice, np.ndarray]]:
    """For each fold: the image slice and the caption indices (in caption order) whose image is in it."""
    p = get_protocol(protocol)
    if p.n_images is not None and n_images != p.n_images:
        alt = "5fold" if p.n_folds == 5 else "full"
        raise ValueError(f"protocol {protocol!r} expects a split of {p.n_images} images, got {n_images}; "
                         f"use protocol='{alt}' for a split of another size")
    if n_images % p.n_folds:
        raise ValueError(f"protocol {protocol!r} needs the number of images ({n_images}) to be divisible by {p.n_folds}")
    size = n_images // p.n_folds
    c2i = np.asarray(caption_to_image)
    folds = []
    for k in range(p.n_folds):
        caps = np.flatnonzero((c2i >= k * size) & (c2i < (k + 1) * size))
        folds.append((slice(k * size, (k + 1) * size), caps))
    return folds


def _summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS}


def metrics_from_sims(sims: torch.Tensor | np.ndarray | Sequence[torch.Tensor], caption_to_image: np.ndarray,
                      protocol: str = "full", tie_mode: TieMode = "optimistic") -> dict[str, Any]:
    """Metrics of a full score matrix (or of the list of per-fold matrices) under `protocol`."""
    c2i = np.asarray(caption_to_image, dtype=np.int64)
    p = get_protocol(protocol)
    if isinstance(sims, (list, tuple)):
        n_images = sum(s.shape[0] for s in sims)
        fold_sims = list(sims)
        folds = protocol_folds(protocol, c2i, n_images)
    else:
        n_images = sims.shape[0]
        folds = protocol_folds(protocol, c2i, n_images)
        S = torch.as_tensor(np.asarray(sims)) if isinstance(sims, np.ndarray) else sims
        fold_sims = [S[f_img][:, torch.as_tensor(caps)] if p.n_folds > 1 else S for f_img, caps in folds]
    rows = []
    for (f_img, caps), S in zip(folds, fold_sims):
        rows.append(recall_metrics(S, c2i[caps] - f_img.start, tie_mode=tie_mode))
    out: dict[str, Any] = _summarise(rows)
    out.update(protocol=protocol, n_images=n_images, n_captions=int(len(c2i)), n_folds=p.n_folds,
               tie_mode=tie_mode, recall_unit="percent", rank_base=1)
    if p.n_folds > 1:
        out["folds"] = rows
    return out


def _fold_sims(model: torch.nn.Module, img: Any, txt: Any, folds: list[tuple[slice, np.ndarray]], n_folds: int,
               **kw: Any) -> list[torch.Tensor]:
    from ..features import slice_features
    from .similarity import similarity_matrix

    if n_folds == 1:
        return [similarity_matrix(model, img, txt, **kw)]
    return [similarity_matrix(model, slice_features(img, f_img), slice_features(txt, torch.as_tensor(caps)), **kw)
            for f_img, caps in folds]


def _provenance(split: Any, models: Sequence[torch.nn.Module]) -> dict[str, Any]:
    from .._version import __version__

    return {"split": getattr(split, "name", ""), "itmzoo_version": __version__,
            "model": [getattr(m, "registry_name", type(m).__name__) for m in models]
            if len(models) > 1 else getattr(models[0], "registry_name", type(models[0]).__name__)}


def evaluate(model: torch.nn.Module, split: Any, protocol: str = "full", *, batch_size: int = 128,
             device: str | torch.device | None = None, amp: str | None = None,
             block: tuple[int, int] = (256, 1024), dtype: torch.dtype | None = None,
             tie_mode: TieMode = "optimistic", num_workers: int = 0, progress: bool = True,
             return_sims: bool = False) -> dict[str, Any]:
    """Encode `split` with `model`, score it under `protocol` and return metrics plus provenance.

    Only the blocks a protocol needs are scored (for ``coco-1k-5fold`` the 5 diagonal folds, a fifth of
    the full matrix), which matters for cross-interaction models.
    """
    return evaluate_ensemble([model], split, protocol, batch_size=batch_size, device=device, amp=amp, block=block,
                             dtype=dtype, tie_mode=tie_mode, num_workers=num_workers, progress=progress,
                             return_sims=return_sims)


def ensemble_similarity(sims: Sequence[torch.Tensor | np.ndarray], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of score matrices (upstream ``eval_ensemble``: the plain mean of two)."""
    if not sims:
        raise ValueError("ensemble needs at least one similarity matrix")
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


def evaluate_ensemble(models: Sequence[torch.nn.Module], split: Any, protocol: str = "full", *,
                      weights: Sequence[float] | None = None, batch_size: int = 128,
                      device: str | torch.device | None = None, amp: str | None = None,
                      block: tuple[int, int] = (256, 1024), dtype: torch.dtype | None = None,
                      tie_mode: TieMode = "optimistic", num_workers: int = 0, progress: bool = True,
                      return_sims: bool = False) -> dict[str, Any]:
    """Average the score matrices of several models (fold by fold) and evaluate the mean."""
    from .similarity import encode_split

    if not models:
        raise ValueError("evaluate_ensemble needs at least one model")
    p = get_protocol(protocol)
    folds = protocol_folds(protocol, split.caption_to_image, split.num_images)
    per_model = []
    for m in models:
        img, txt = encode_split(m, split, batch_size=batch_size, device=device, amp=amp, num_workers=num_workers,
                                progress=progress)
        per_model.append(_fold_sims(m, img, txt, folds, p.n_folds, block=block, device=device, amp=amp,
                                    dtype=dtype, progress=progress))
    fold_sims = [ensemble_similarity([pm[k] for pm in per_model], weights) for k in range(len(folds))]
    out = metrics_from_sims(fold_sims, split.caption_to_image, protocol, tie_mode=tie_mode)
    out.update(_provenance(split, models))
    if weights is not None:
        out["ensemble_weights"] = list(weights)
    if return_sims:
        out["sims"] = fold_sims if p.n_folds > 1 else fold_sims[0]
    return out
