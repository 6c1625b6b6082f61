"""Losses shared by the methods: normalisation helpers and the VSE++ hinge (triplet) loss family."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss", "hierarchical_itm_loss", "hinge_costs", "hinge_triplet_loss", "l1norm", "l2norm",
           "positive_mask", "queue_itc_loss", "sample_hard_negatives"]


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """``x / (||x|| + eps)``: the VSE/SCAN normalisation (eps added to the norm, not clamped)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def l1norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def positive_mask(n: int, image_index: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[n, n]`` mask of positive pairs: the diagonal, or every same-image pair."""
    if image_index is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return image_index[:, None] == image_index[None, :]


def hinge_costs(scores: torch.Tensor, margin: float, pos_mask: torch.Tensor | None = None,
                d_row: torch.Tensor | None = None,
                d_col: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cost_s, cost_im)`` of a square score matrix (rows: images, columns: captions).

    ``cost_s[i, j] = max(0, m + S_ij - d_row_i)`` (image i is the anchor, caption retrieval) and
    ``cost_im[i, j] = max(0, m + S_ij - d_col_j)`` (caption j is the anchor, image retrieval); the
    positive scores default to the diagonal. Positives are zeroed after the clamp, as upstream.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"hinge loss needs a square score matrix, got {tuple(scores.shape)}")
    diag = scores.diag()
    d_row = diag if d_row is None else d_row
    d_col = diag if d_col is None else d_col
    cost_s = (margin + scores - d_row.view(-1, 1)).clamp(min=0)
    cost_im = (margin + scores - d_col.view(1, -1)).clamp(min=0)
    if pos_mask is None:
        pos_mask = positive_mask(scores.shape[0], device=scores.device)
    cost_s = cost_s.masked_fill(pos_mask, 0)
    cost_im = cost_im.masked_fill(pos_mask, 0)
    return cost_s, cost_im


def hinge_triplet_loss(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                       pos_mask: torch.Tensor | None = None) -> torch.Tensor:
    """VSE++ loss, summed over the batch: hardest negative (`max_violation`) or all negatives."""
    cost_s, cost_im = hinge_costs(scores, margin, pos_mask)
    if max_violation:
        return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()
    return cost_s.sum() + cost_im.sum()


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP ITC): ``logit_scale x image_emb text_embᵀ``, the diagonal as targets."""
    logits = (image_emb @ text_emb.t()) * logit_scale
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def queue_itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor, image_queue: torch.Tensor,
                   text_queue: torch.Tensor, idx_queue: torch.Tensor, temp: torch.Tensor | float) -> torch.Tensor:
    """ITC against the in-batch keys plus a feature queue, with soft multi-positive targets (ALBEF/BLIP style).

    ``image_feat``/``text_feat [B, D]`` (not normalised here), ``idx [B, 1]`` image ids, queues ``[D, Q]``
    and ``idx_queue [1, Q]``. Keys are the *detached* batch features followed by the queue, so the
    gradient reaches the image features only through i2t, the text features only through t2i, and
    `temp` through both. Targets: ``1[idx == key id]`` normalised per row. Returns ``(L_i2t + L_t2i) / 2``.
    """
    idx = idx.view(-1, 1)
    pos = (idx == torch.cat([idx.t(), idx_queue], dim=1)).float()
    targets = pos / pos.sum(1, keepdim=True)
    text_keys = torch.cat([text_feat.detach().t(), text_queue.detach()], dim=1)
    image_keys = torch.cat([image_feat.detach().t(), image_queue.detach()], dim=1)
    loss_i2t = -(F.log_softmax(image_feat @ text_keys / temp, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(text_feat @ image_keys / temp, dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(weights: torch.Tensor, generator: torch.Generator | None = None, *,
                          allow_empty: bool = False) -> torch.Tensor:
    """One index per row drawn with probability proportional to ``weights [B, N]`` (positives zeroed).

    A row without any non-zero weight (every candidate shares the anchor's image) has no negative:
    an error, never a silent positive; with `allow_empty` its index is -1 (the caller leaves it out).
    The other rows draw exactly what they would draw without the empty ones.
    """
    empty = weights.sum(1) <= 0
    if bool(empty.any()):
        if not allow_empty:
            raise ValueError(f"hard-negative sampling: rows {empty.nonzero().flatten().tolist()[:8]} have no "
                             "candidate with another image id; batches need at least two distinct images "
                             "(use drop_last)")
        out = torch.full((weights.shape[0],), -1, dtype=torch.long, device=weights.device)
        if bool((~empty).any()):
            out[~empty] = torch.multinomial(weights[~empty], 1, generator=generator).view(-1)
        return out
    return torch.multinomial(weights, 1, generator=generator).view(-1)


def hierarchical_itm_loss(cls_states: list[torch.Tensor], head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one shared ITM `head` over the ``[CLS]`` states of several layers, equally weighted."""
    logits = head(torch.cat(cls_states))
    return F.cross_entropy(logits, labels.repeat(len(cls_states)))
