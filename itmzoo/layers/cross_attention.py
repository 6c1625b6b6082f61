"""SCAN-style text-to-image cross attention, batched over blocks of images x captions.

Words are queries and regions the context (SCAN's t2i attention, kuanghuei/SCAN):
``s_rt = LeakyReLU_0.1(v_r · w_t)``, L2-normalised over the words of each caption (the "clipped l2norm"),
``α_tr = softmax_r(λ s_rt)`` and ``a_t = Σ_r α_tr v_r``. SGRAF/LHSC add an L2 norm of ``a_t``.

The reference loops over captions; here every (image, caption) pair of a block is computed at once:
the scores are one matrix product ``regions [Ni·R, D] @ words [T, D]ᵀ`` over the *packed* real words of
several captions (pads never enter, so no masking is needed), and the attended vectors one batched
product per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attended_context", "context_scale", "region_gram", "scan_t2i_attention", "t2i_attention_packed"]


def scan_t2i_attention(query: torch.Tensor, context: torch.Tensor, smooth: float, eps: float = 1e-8) -> torch.Tensor:
    """Paired form (the reference's ``SCAN_attention``): ``query [B, L, D]``, ``context [B, R, D]`` ->
    the L2-normalised attended context ``[B, L, D]``. Query rows must all be real words."""
    attn = torch.bmm(context, query.transpose(1, 2))                  # [B, R, L]
    attn = F.leaky_relu(attn, 0.1)
    attn = attn / (attn.pow(2).sum(2, keepdim=True).sqrt() + eps)    # over words, per region
    attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)        # [B, L, R], over regions
    ctx = torch.bmm(attn, context)
    return ctx / (ctx.pow(2).sum(-1, keepdim=True).sqrt() + eps)


def t2i_attention_packed(regions: torch.Tensor, words: torch.Tensor, onehot: torch.Tensor, seg: torch.Tensor,
                         smooth: float, eps: float = 1e-8, region_mask: torch.Tensor | None = None,
                         scores_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention of every packed word over the regions of every image: ``α [Ni, T, R]``.

    ``regions [Ni, R, D]``; ``words [T, D]`` are the real words of several captions, packed (no pads);
    ``seg [T]`` gives each word's caption and ``onehot [T, n]`` is ``one_hot(seg)`` (its matrix product
    sums the squared scores over each caption's words for the clipped l2norm). ``region_mask [Ni, R]``
    (True = real) excludes padded regions from the softmax. `scores_dtype` (e.g. bf16) computes the
    scores product in that precision; the rest runs in the inputs' dtype. The result is a transposed
    view of a ``[Ni, R, T]`` tensor, which batched products read without a copy.
    """
    ni, r, d = regions.shape
    t = words.shape[0]
    if scores_dtype is None:
        s = torch.mm(regions.reshape(ni * r, d), words.t())             # [Ni*R, T]
    else:
        s = torch.mm(regions.reshape(ni * r, d).to(scores_dtype), words.t().to(scores_dtype)).to(regions.dtype)
    if torch.is_grad_enabled():
        s = F.leaky_relu(s, 0.1)
        norm = torch.mm(s * s, onehot).sqrt() + eps                     # [Ni*R, n] over each caption's words
        s = (s / norm.index_select(1, seg)) * smooth
    else:  # same maths, in place (this runs once per caption group on the largest small tensor)
        F.leaky_relu_(s, 0.1)
        inv = torch.mm(s.square(), onehot).sqrt_().add_(eps).reciprocal_().mul_(smooth)
        s.mul_(inv.index_select(1, seg))
    s = s.view(ni, r, t)
    if region_mask is not None:
        s = s.masked_fill(~region_mask.bool()[:, :, None], float("-inf"))
    return torch.softmax(s, dim=1).transpose(1, 2)


def region_gram(regions: torch.Tensor) -> torch.Tensor:
    """``V Vᵀ [Ni, R, R]`` in float64 (it feeds a quadratic form that can cancel); once per block of images.

    The products of float32 inputs are exact in float64, so the Gram matrix carries no rounding that
    matters; it costs ``R² D`` per image, next to nothing beside the scoring it serves.
    """
    with torch.autocast(regions.device.type, enabled=False):
        v = regions.double()
        return torch.bmm(v, v.transpose(1, 2))


def context_scale(regions: torch.Tensor, attn: torch.Tensor, eps: float = 1e-8,
                  gram: torch.Tensor | None = None, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """``1 / (||Σ_r α_r v_r|| + eps)`` from the region Gram matrix, without forming the D-dim vectors.

    ``||α V||² = α (V Vᵀ) αᵀ`` costs R² per (image, word) instead of a pass over D values. The form is
    accumulated in float64: its terms are of the order of ``(Σ_r α_r ||v_r||)²`` while the result can be
    far smaller (an attended context that is short because its regions point in opposite directions),
    and in float32 that cancellation leaves an absolute error of ~1e-7 in ``||α V||²``, i.e. a relative
    error of ~1e-7 / ``||α V||²`` in the norm (5e-4 at a length of 1e-2, 9 % measured at 1.3e-4). In
    float64 the error is ~1e-16 absolute, below float32's own rounding of the vector.
    ``attn [Ni, T, R]`` -> ``[Ni, T]`` in ``attn``'s dtype; pass `gram` (`region_gram`)
    to reuse it across caption groups. `chunk_elems` bounds the float64 temporaries (elements).
    """
    gram = region_gram(regions) if gram is None else gram.double()
    ni, t, r = attn.shape
    step = max(1, chunk_elems // max(1, t * r))
    parts = []
    with torch.autocast(attn.device.type, enabled=False):
        for i in range(0, ni, step):
            a = attn[i:i + step].double()
            n2 = (torch.bmm(a, gram[i:i + step]) * a).sum(-1).clamp(min=0)     # [n, T]
            parts.append((1.0 / (n2.sqrt() + eps)).to(attn.dtype))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def attended_context(regions: torch.Tensor, attn: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L2-normalised attended vectors ``l2norm(α V)``: ``regions [Ni, R, D]``, ``attn [Ni, T, R]`` -> ``[Ni, T, D]``."""
    return torch.bmm(attn * context_scale(regions, attn, eps)[..., None], regions)
