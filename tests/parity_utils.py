"""Deterministic parameter filling shared by parity fixtures and parity tests.

Upstream models are run once (outside the test suite) with parameters filled by this rule, keyed by
the *upstream* parameter name, so a fixture only needs the names, shapes, inputs and outputs: the test
rebuilds the same upstream-named state dict, converts it with itmzoo's converter and compares outputs.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def param_seed(name: str, seed: int) -> int:
    """Seed of one parameter: depends only on its upstream name and the fixture seed."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**31 - 1)


def fill_value(name: str, shape: tuple[int, ...], seed: int, scale: float = 0.1) -> torch.Tensor:
    """The float32 tensor a parameter/buffer called `name` gets under the fixture rule.

    * ``*.running_var``   -> uniform in [0.5, 1.5) (must stay positive)
    * ``*.num_batches_tracked`` -> 0 (int64)
    * everything else      -> normal(0, scale)
    """
    g = torch.Generator().manual_seed(param_seed(name, seed))
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    return torch.randn(shape, generator=g, dtype=torch.float32) * scale


def filled_state_dict(names_and_shapes: dict[str, list[int]], seed: int, scale: float = 0.1) -> dict:
    """Rebuild a whole upstream-named state dict from `{name: shape}` with the fixture rule."""
    return {n: fill_value(n, tuple(s), seed, scale) for n, s in names_and_shapes.items()}


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
