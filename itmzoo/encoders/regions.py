"""Encoders of precomputed region features (BUTD Faster R-CNN, ``[B, R, 2048]``), as in VSE-infinity.

`RegionFeatureEncoder` is VSE-infinity's ``EncoderImageAggr`` without its pooling: per-region
features ``fc(x) + mlp(x)`` (``precomp_enc_type='basic'``) or ``fc(x)`` alone (backbone grids).
Methods add their own pooling on top (ESA: per-channel attention; VSE-infinity: GPO).
Module and parameter names follow the upstream code so official checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..features import sequence_mask

__all__ = ["RegionFeatureEncoder", "RegionMLP", "region_mask", "xavier_linear_"]


def xavier_linear_(layer: nn.Linear) -> None:
    """VSE-infinity's ``init_weights``: ``W ~ U(+-sqrt(6)/sqrt(in+out))``, bias 0."""
    r = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
    with torch.no_grad():
        layer.weight.uniform_(-r, r)
        layer.bias.zero_()


class RegionMLP(nn.Module):
    """VSE-infinity's ``MLP``: ``Linear -> BN -> ReLU -> ... -> Linear`` over the flattened regions.

    There is one BatchNorm per layer, including the last, but the last one is never applied. It stays
    a module (dead weights) so that the authors' checkpoints, which contain it, load strictly.
    BatchNorm runs over all ``B*R`` region vectors, zero-padded rows included, as upstream.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 2) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in h + [output_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        x = x.reshape(B * N, D)
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
            x = F.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
        return x.view(B, N, self.output_dim)


class RegionFeatureEncoder(nn.Module):
    """Per-region embeddings ``fc(x) + mlp(x)`` of precomputed features ``[B, R, img_dim]``.

    Children (and state-dict names) ``fc``, ``mlp`` as in VSE-infinity / ESA. ``fc`` gets the Xavier
    init of `xavier_linear_`; the MLP keeps PyTorch's default init (upstream's ``init_weights`` only
    visits direct children, so it never reaches the MLP's layers).
    """

    def __init__(self, img_dim: int, embed_size: int, use_mlp: bool = True) -> None:
        super().__init__()
        self.img_dim = img_dim
        self.embed_size = embed_size
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = RegionMLP(img_dim, embed_size // 2, embed_size, 2) if use_mlp else None
        xavier_linear_(self.fc)

    def region_features(self, regions: torch.Tensor) -> torch.Tensor:
        """``[B, R, embed_size]`` features of every region (padding included)."""
        if regions.dim() != 3 or regions.shape[-1] != self.img_dim:
            raise ValueError(f"expected region features [B, R, {self.img_dim}], got {tuple(regions.shape)}")
        feats = self.fc(regions)
        if self.mlp is not None:
            # upstream order: mlp(x) + fc(x); addition order matters only in the last bit
            feats = self.mlp(regions) + feats
        return feats

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return self.region_features(regions)


def region_mask(regions: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Boolean ``[B, R]``: True for real regions (all True when `lengths` is None)."""
    B, R = regions.shape[:2]
    if lengths is None:
        return torch.ones(B, R, dtype=torch.bool, device=regions.device)
    return sequence_mask(lengths.to(regions.device), R)
