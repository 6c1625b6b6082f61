"""Graph-reasoning blocks over a set of nodes (image regions or words).

Both blocks build a dense affinity matrix from the node features themselves, with no softmax, and add
the propagated features back to the input (residual). Parameter names follow the LHSC release
(`libs/img_gcn.py` `IM_GCN`, `libs/text_atten.py` `TextAttn`) so official checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegionRelationGCN", "WordRelationAttention"]


class RegionRelationGCN(nn.Module):
    """Residual GCN over a fully connected region graph with a learned bilinear affinity (LHSC ``IM_GCN``).

    For nodes ``H [N, C]``: ``A = fc1([θ|θ1|θ2|θ3](H))``, ``P = fc2([φ|φ1|φ2|φ3](H))``,
    ``Adj = A Pᵀ / N``, ``out = BN(W(Adj · g(H))) + H``. The 1x1 convolutions are kept as ``Conv1d``
    modules (their weights are ``[out, in, 1]`` in the checkpoints) and applied as linear maps on a
    node-major tensor, except ``W`` (conv + BatchNorm), which runs channel-first as upstream does so the
    BatchNorm sees the same memory layout. The BatchNorm starts at weight = bias = 0, so a fresh block
    is the identity.
    """

    def __init__(self, dim: int, inter_dim: int | None = None) -> None:
        super().__init__()
        inter = dim if inter_dim is None else inter_dim
        if inter % 4:
            raise ValueError(f"RegionRelationGCN: inter_dim must be divisible by 4, got {inter}")
        q = inter // 4
        self.dim, self.inter_dim = dim, inter
        self.g = nn.Conv1d(dim, inter, 1)
        self.W = nn.Sequential(nn.Conv1d(inter, dim, 1), nn.BatchNorm1d(dim))
        nn.init.constant_(self.W[1].weight, 0)
        nn.init.constant_(self.W[1].bias, 0)
        self.theta, self.theta1, self.theta2, self.theta3 = (nn.Conv1d(dim, q, 1) for _ in range(4))
        self.phi, self.phi1, self.phi2, self.phi3 = (nn.Conv1d(dim, q, 1) for _ in range(4))
        # upstream defines a Xavier init for fc1/fc2 but never calls it: keep PyTorch's default
        self.fc1 = nn.Linear(dim, inter)
        self.fc2 = nn.Linear(dim, inter)

    @staticmethod
    def _stacked(convs: tuple[nn.Conv1d, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # the four 1x1 convs are concatenated along channels (θ, θ1, θ2, θ3 order), i.e. one linear map
        w = torch.cat([c.weight.squeeze(-1) for c in convs], 0)
        b = torch.cat([c.bias for c in convs], 0)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]`` (node-major) -> ``[B, N, C]``."""
        N = x.shape[1]
        gv = F.linear(x, self.g.weight.squeeze(-1), self.g.bias)                     # [B, N, inter]
        a = F.linear(F.linear(x, *self._stacked((self.theta, self.theta1, self.theta2, self.theta3))),
                     self.fc1.weight, self.fc1.bias)
        p = F.linear(F.linear(x, *self._stacked((self.phi, self.phi1, self.phi2, self.phi3))),
                     self.fc2.weight, self.fc2.bias)
        adj = torch.matmul(a, p.transpose(1, 2)) / N                                 # [B, N, N]
        y = torch.matmul(adj, gv)                                                    # [B, N, inter]
        # W = Conv1d + BatchNorm1d run on the contiguous channel-first [B, C, N] tensor, as upstream: the
        # BN kernels accumulate the per-channel statistics (and their gradients) in a different order on
        # a [B*N, C] reshape, which loses accuracy when a channel's mean is large against its std
        z = self.W(y.transpose(1, 2).contiguous())                                  # [B, C, N]
        return z.transpose(1, 2) + x


class WordRelationAttention(nn.Module):
    """Residual word-word affinity block (LHSC ``TextAttn``): ``y = (tanh(Wl x) tanh(Wg x)ᵀ / T) tanh(Wv x) + x``.

    Without a mask it is the upstream block: every position of the padded batch (``<pad>`` included)
    is a key and value, and the affinity is divided by the padded length T, so a caption's output
    depends on how far its batch is padded. With ``mask`` [B, T] only real words are keys/values and
    the division is by each caption's own length, which equals encoding every caption on its own.
    """

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()

        def branch() -> nn.Sequential:
            lin = nn.Linear(dim, dim)
            r = (6.0 / (lin.in_features + lin.out_features)) ** 0.5
            nn.init.uniform_(lin.weight, -r, r)
            nn.init.zeros_(lin.bias)
            return nn.Sequential(lin, nn.Tanh(), nn.Dropout(dropout))

        self.embedding_local = branch()
        self.embedding_global = branch()
        self.embedding_v = branch()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        lq = self.embedding_local(x)
        gk = self.embedding_global(x)
        vv = self.embedding_v(x)
        if mask is None:
            aff = torch.matmul(lq, gk.transpose(1, 2)) / x.shape[1]
        else:
            m = mask.to(x.dtype)
            aff = torch.matmul(lq, (gk * m[..., None]).transpose(1, 2)) / m.sum(1).clamp(min=1)[:, None, None]
        return torch.matmul(aff, vv) + x
