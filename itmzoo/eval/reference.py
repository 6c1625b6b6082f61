"""The reference definition of i2t/t2i ranks as a per-query argsort loop (slow; for verification).

This restates VSE++/SCAN/VSE-infinity's `i2t`/`t2i` (5 captions per image, caption j belongs to image
j // 5, numpy's default argsort reversed) so tests and benchmarks can compare the vectorised
`itmzoo.eval.retrieval_ranks` against it on the same matrix.
"""

from __future__ import annotations

import numpy as np


def reference_ranks(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based ``(i2t[npts], t2i[5 * npts])`` ranks of an ``[npts, 5 * npts]`` matrix, as upstream loops them."""
    sims = np.asarray(sims)
    npts = sims.shape[0]
    i2t = np.zeros(npts)
    for i in range(npts):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.flatnonzero(order == j)[0] for j in range(5 * i, 5 * i + 5))
    t2i = np.zeros(5 * npts)
    st = sims.T
    for q in range(5 * npts):
        order = np.argsort(st[q])[::-1]
        t2i[q] = np.flatnonzero(order == q // 5)[0]
    return i2t, t2i


def seeded_sims(seed: int, n: int, mu: float) -> np.ndarray:
    """The spec's seeded test matrices: ``N(0, 1)`` noise of shape ``[n, 5n]`` plus `mu` on the 5 positives."""
    sims = np.random.default_rng(seed).standard_normal((n, 5 * n))
    idx = np.arange(n)
    for k in range(5):
        sims[idx, 5 * idx + k] += mu
    return sims
