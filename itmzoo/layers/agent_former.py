"""The Agent-Former of Multi-SEA: two experts (text, image) per layer, four modes.

One expert layer is post-norm (RMSNorm, eps 1e-5, no bias): BERT self-attention, then (cross-modal modes
only) *agent* cross-attention, then a dual-gate FFN. Facts from ``jim4399266/Multi-SEA @ 3941a49``:

* **agent attention**: n = 40 agent tokens are the projected queries (bias included) linearly resampled
  along the token axis (``interpolate(..., align_corners=False)``; for 40 text tokens the identity).
  Step 1: the agents attend to the other modality's keys (key mask); step 2: every query token attends
  to the agents with *its own* mask broadcast over the agents, so a padded query row gets the uniform
  1/40 distribution, and padded text positions also act as agents. Masks are additive with
  ``finfo.min`` (not -inf: a fully masked row would give NaN);
* **dual-gate FFN**: ``h2 = D(W2 x)``, ``o = D(W3 (σ(W1 x) ⊙ h2)) ⊙ σ(W4 h2)``, ``y = norm(x + o)``
  with upstream's "HSwish" ``σ(x) = x·clip(x+3, 0, 1)/6`` (not the standard hard-swish, which clips at 6);
* modes: ``text``/``image`` run self-attention + FFN with the text/image expert; ``t2i``/``i2t`` add the
  agent cross-attention (text queries over image keys with the text expert, and the reverse).

`AgentFormer.cross_cls` is the re-ranking path: the ``[CLS]`` state of the last layer for many
(query, candidate) pairs, computing each candidate's cross-attention keys/values and each query's
first self-attention once, and only the ``[CLS]`` row after the last agents are formed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS", "AgentCrossAttention", "AgentFormer", "AgentFormerExpert", "AgentFormerOutput",
    "DualGateFFN", "RMSNorm", "SelfAttention", "additive_mask", "hswish_clip1",
]

MODES = ("text", "image", "t2i", "i2t")


def hswish_clip1(x: torch.Tensor) -> torch.Tensor:
    """Multi-SEA's "HSwish": ``x * clip(x + 3, 0, 1) / 6`` (x/6 for x >= -2, 0 below -3)."""
    return x * torch.clamp(x + 3.0, min=0.0, max=1.0) / 6.0


# "hswish_clip1" is what the released checkpoints were trained with; the others are the fixed variants
# (the paper's figure says Swish).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hswish_clip1": hswish_clip1,
    "hardswish": F.hardswish,
    "swish": F.silu,
}


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, L]`` keep-mask (1 = real) -> ``[B, 1, 1, L]`` additive mask ``(1 - m) * finfo(dtype).min``."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"attention mask must be [batch, length], got {tuple(mask.shape)}")
    m = mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x²) + eps) * w``, computed in float32 and cast back (LLaMA style)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class _Attention(nn.Module):
    """What both attention kinds hold, with upstream's names: the query/key/value/output projections,
    the post-norm and the two dropouts; `finish` is the residual ``norm(x + D(W_o z))``."""

    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float, eps: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not a multiple of the {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = RMSNorm(dim, eps)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.drop = nn.Dropout(dropout)

    def finish(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``norm(x + D(W_o merge(z)))`` of head-split outputs `z` ``[B, h, L, d_h]``."""
        return self.norm(x + self.drop(self.out(_merge(z))))


class SelfAttention(_Attention):
    """Post-norm BERT multi-head self-attention: ``norm(x + D(W_o softmax(QKᵀ/√d_h + M) V))``."""

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows` (evaluation only): compute the output of these query rows only (keys/values use all)."""
        h = self.heads
        xq = x if rows is None else x[:, rows]
        q, k, v = _heads(self.query(xq), h), _heads(self.key(x), h), _heads(self.value(x), h)
        if self.training:  # upstream's order of operations, with dropout on the probabilities
            scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
            if mask_add is not None:
                scores = scores + mask_add
            ctx = torch.matmul(self.attn_drop(scores.softmax(-1)), v)
        else:  # the same softmax through the fused kernel (about 2x faster on CPU at 197 tokens)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_add)
        return self.finish(xq, ctx)


class AgentCrossAttention(_Attention):
    """Agent cross-attention (see the module docstring); `project_kv` may be computed once per context."""

    def __init__(self, dim: int, heads: int, agents: int, attn_dropout: float, dropout: float, eps: float) -> None:
        super().__init__(dim, heads, attn_dropout, dropout, eps)
        self.agents = agents

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the other modality, ``[B, h, Lk, d_h]`` each."""
        return _heads(self.key(context), self.heads), _heads(self.value(context), self.heads)

    def project_query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected queries and agent tokens, head-split: ``[B, h, Lq, d_h]``, ``[B, h, n, d_h]``."""
        q = self.query(x)
        # linear resampling along the tokens == upstream's bilinear interpolate of [1, B, Lq, d] to (n, d)
        agents = F.interpolate(q.transpose(1, 2), size=self.agents, mode="linear", align_corners=False)
        return _heads(q, self.heads), _heads(agents.transpose(1, 2), self.heads)

    def agent_rows(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rows the agents are interpolated from and the weights: ``rows [r]``, ``W [r, n]``.

        ``agents = Wᵀ q[rows]`` equals `project_query`'s resampling (each agent blends <= 2 rows), so a pass
        that needs only some outputs can skip the other rows (197 image tokens -> 80 rows).
        """
        eye = torch.eye(length, device=device)[None]
        w = F.interpolate(eye, size=self.agents, mode="linear", align_corners=False)[0]  # [length, n]
        rows = w.abs().sum(1).nonzero().flatten()
        return rows, w[rows]

    def attend(self, q: torch.Tensor, agents: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
               mask_add: torch.Tensor | None, kv_mask_add: torch.Tensor | None) -> torch.Tensor:
        """Both agent steps: ``[B, h, Lq', d_h]`` (Lq' may be a subset of the rows that made the agents)."""
        k, v = kv
        if not self.training:  # the same two softmaxes through the fused kernel
            agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=kv_mask_add)
            own = mask_add.transpose(-1, -2) if mask_add is not None else None
            return F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=own)
        scale = q.shape[-1] ** -0.5
        s1 = torch.matmul(agents * scale, k.transpose(-2, -1))            # [B, h, n, Lk]
        if kv_mask_add is not None:
            s1 = s1 + kv_mask_add
        agent_v = torch.matmul(self.attn_drop(s1.softmax(-1)), v)          # [B, h, n, d_h]
        s2 = torch.matmul(q * scale, agents.transpose(-2, -1))             # [B, h, Lq', n]
        if mask_add is not None:
            s2 = s2 + mask_add.transpose(-1, -2)  # the query's own mask, over all agents of a row
        return torch.matmul(self.attn_drop(s2.softmax(-1)), agent_v)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor],
                kv_mask_add: torch.Tensor | None) -> torch.Tensor:
        q, agents = self.project_query(x)
        return self.finish(x, self.attend(q, agents, kv, mask_add, kv_mask_add))


class DualGateFFN(nn.Module):
    """``norm(x + D(W3(σ(W1 x) ⊙ D(W2 x))) ⊙ σ(W4 D(W2 x)))`` (upstream ``AFormerCrossGateFeedForward``)."""

    def __init__(self, dim: int, inner: int, dropout: float, eps: float, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown Agent-Former activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.dense1 = nn.Linear(dim, inner)
        self.dense2 = nn.Linear(dim, inner)
        self.dense3 = nn.Linear(inner, dim)
        self.dense4 = nn.Linear(inner, dim)
        self.norm = RMSNorm(dim, eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h2 = self.drop(self.dense2(x))
        o1 = self.drop(self.dense3(self.act(self.dense1(x)) * h2))
        return self.norm(x + o1 * self.act(self.dense4(h2)))


class AgentFormerExpert(nn.Module):
    """One expert of one layer: self-attention, [agent cross-attention], dual-gate FFN."""

    def __init__(self, dim: int, heads: int, inner: int, agents: int, attn_dropout: float, dropout: float,
                 eps: float, activation: str) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, attn_dropout, dropout, eps)
        self.cross_attn = AgentCrossAttention(dim, heads, agents, attn_dropout, dropout, eps)
        self.ffn = DualGateFFN(dim, inner, dropout, eps, activation)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_mask_add: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_attn(x, mask_add)
        if kv is not None:
            x = self.cross_attn(x, mask_add, kv, kv_mask_add)
        return self.ffn(x)


class AgentFormerOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None  # (input, after layer 1, ..., after layer L)


class AgentFormer(nn.Module):
    """``layers[i]["text" | "image"]`` experts and a tanh pooler on token 0 (BERT init)."""

    def __init__(self, dim: int, heads: int, num_layers: int, inner: int, agents: int = 40,
                 attn_dropout: float = 0.1, dropout: float = 0.1, eps: float = 1e-5,
                 activation: str = "hswish_clip1") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({e: AgentFormerExpert(dim, heads, inner, agents, attn_dropout, dropout, eps, activation)
                           for e in ("text", "image")})
            for _ in range(num_layers))
        self.pooler = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Upstream's BERT init: Linear N(0, std) with zero bias, norms 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    @staticmethod
    def _expert(mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"Agent-Former mode must be one of {MODES}, got {mode!r}")
        return "text" if mode in ("text", "t2i") else "image"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "text",
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> AgentFormerOutput:
        """`x [B, Lq, d]` with keep-mask `mask [B, Lq]` (None: all real); cross modes need `context [B, Lk, d]`."""
        expert = self._expert(mode)
        cross = mode in ("t2i", "i2t")
        if cross and context is None:
            raise ValueError(f"Agent-Former mode {mode!r} needs a context (the other modality's states)")
        dtype = x.dtype
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=dtype, device=x.device)
        mask_add = additive_mask(mask, dtype)
        kv_mask_add = None
        if cross:
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], dtype=dtype, device=x.device)
            kv_mask_add = additive_mask(context_mask, dtype)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            block = layer[expert]
            kv = block.cross_attn.project_kv(context) if cross else None
            x = block(x, mask_add, kv, kv_mask_add)
            if hidden is not None:
                hidden.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return AgentFormerOutput(x, pooled, tuple(hidden) if hidden is not None else None)

    @torch.no_grad()
    def cross_cls(self, queries: torch.Tensor, query_mask: torch.Tensor | None, contexts: torch.Tensor,
                  context_mask: torch.Tensor | None, query_index: torch.Tensor, context_index: torch.Tensor,
                  mode: str, chunk: int = 64) -> torch.Tensor:
        """Last-layer ``[CLS]`` states ``[P, d]`` of the cross pass of pairs ``(query_index[p], context_index[p])``.

        Equal to ``forward(queries[qi], mask[qi], mode, contexts[ci], cmask[ci]).last_hidden_state[:, 0]``
        in eval mode, but each context's keys/values (every layer) and each query's first
        self-attention are computed once, and the last layer finishes the ``[CLS]`` row only.
        `chunk` pairs run together (bounds the memory).
        """
        if mode not in ("t2i", "i2t"):
            raise ValueError(f"cross_cls needs mode 't2i' or 'i2t', got {mode!r}")
        if self.training:
            raise RuntimeError("cross_cls is an evaluation path (no dropout); call model.eval() first")
        blocks = [layer[self._expert(mode)] for layer in self.layers]
        dtype = queries.dtype
        if query_mask is None:
            query_mask = torch.ones(queries.shape[:2], dtype=dtype, device=queries.device)
        if context_mask is None:
            context_mask = torch.ones(contexts.shape[:2], dtype=dtype, device=contexts.device)
        q_ids, q_inv = torch.unique(query_index, return_inverse=True)
        c_ids, c_inv = torch.unique(context_index, return_inverse=True)
        q_mask_add = additive_mask(query_mask[q_ids], dtype)
        c_mask_add = additive_mask(context_mask[c_ids], dtype)
        x0 = blocks[0].self_attn(queries[q_ids], q_mask_add)                 # query-only
        q0, agents0 = blocks[0].cross_attn.project_query(x0)                # query-only
        ctx = contexts[c_ids]
        kvs = [b.cross_attn.project_kv(ctx) for b in blocks]                 # context-only, every layer
        last = len(blocks) - 1
        # last layer: only [CLS] is read, and the agents need only the rows they are interpolated from
        rows, w = blocks[last].cross_attn.agent_rows(queries.shape[1], queries.device)
        keep = torch.unique(torch.cat([rows.new_zeros(1), rows]))                 # sorted, row 0 first
        w_keep = torch.zeros(keep.numel(), w.shape[1], dtype=dtype, device=queries.device)
        w_keep[torch.searchsorted(keep, rows)] = w.to(dtype)
        out = []
        for s in range(0, query_index.numel(), chunk):
            qi, ci = q_inv[s:s + chunk], c_inv[s:s + chunk]
            m_add, cm_add = q_mask_add[qi], c_mask_add[ci]
            x, q, agents = x0[qi], q0[qi], agents0[qi]
            for li, b in enumerate(blocks):
                kv = (kvs[li][0][ci], kvs[li][1][ci])
                ca = b.cross_attn
                if li == last and last > 0:
                    x = b.self_attn(x, m_add, rows=keep)                           # [P, |keep|, d]
                    qk = ca.query(x)
                    agents = _heads(torch.einsum("rn,brd->bnd", w_keep, qk), ca.heads)
                    z = ca.attend(_heads(qk[:, :1], ca.heads), agents, kv, m_add[..., :1], cm_add)
                    x = b.ffn(ca.finish(x[:, :1], z))
                    continue
                if li > 0:
                    x = b.self_attn(x, m_add)
                    q, agents = ca.project_query(x)
                if li == last:  # a single layer: layer 0 is shared, finish [CLS] alone
                    x = b.ffn(ca.finish(x[:, :1], ca.attend(q[:, :, :1], agents, kv, m_add[..., :1], cm_add)))
                else:
                    x = b.ffn(ca.finish(x, ca.attend(q, agents, kv, m_add, cm_add)))
            out.append(x[:, 0])
        return torch.cat(out) if out else queries.new_zeros(0, queries.shape[-1])
