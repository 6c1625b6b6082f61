"""SCTA: sparse cross-modal token aggregation (ICME 2025), ViT-B/16 patches + BERT words.

Reimplements the authors' release ``ICME2025ITR/SCTA @ 9612c1a4d7b60cf46ca5cda86a370d1c7e6a98ad`` (built
on ``CrossmodalGroup/LAPS @ 355a43babb70a3fdfbe74aabebad9a8414b91b3b``) with upstream's module and
parameter names, so a checkpoint's ``model`` state dict loads strictly.

* image: HF ViT ``last_hidden_state`` (CLS + 196 patches) -> ``vision_proj`` (768 -> 512); nothing normalised;
* text: BERT ``last_hidden_state`` -> ``fc`` (768 -> 512); evaluation keeps the first ``max_word`` (90) tokens;
* per (image, caption) pair: patch score = cos(patch, image mean) + cos(patch, caption mean); keep the top
  half, fuse the rest into one softmax-weighted extra token; aggregate the kept patches into 29 slots
  (softmax over kept patches of a per-patch MLP); image tokens = norm([CLS, 29 slots, extra]);
  caption tokens = norm([CLS, k aggregated words]) with ``k = max(4, min(int(0.75 (l - 1)), 100))``;
  score = mean_t max_v + mean_v max_t of LeakyReLU_0.1(cos) (a sum: range [-0.2, 2]);
* loss: VSE++ hinge (margin 0.2, summed) with same-image positives, all negatives in epoch 0 then the
  hardest, times a linear warm-up factor in epoch 0, plus the constant "monitor" term.

The caption aggregator's second layer is not a parameter upstream: ``nn.Linear(102, k)`` is created
with PyTorch's default init inside every call, so scores are random and depend on the RNG state and on
how the evaluation is sharded. ``cap_fc2`` chooses:

* ``"reference"`` (faithful): in evaluation the draws come from an explicit CPU generator that restarts
  from ``fc2_seed`` on every ``model.eval()``, one draw per caption per ``similarity`` call in caption
  order, weight then bias; with the evaluator's blocks = ``shard_size`` (image blocks outer, caption
  blocks inner) this is upstream's order, so upstream's scores are reproduced given its seed. In
  training a fresh layer is drawn every step from the global CPU generator (which the trainer seeds).
* ``"fixed"`` (deviation): one draw per aggregated-token count k, in increasing k from ``fc2_seed``,
  reused for every caption, image, block and step: scores do not depend on sharding or batching.

``similarity`` computes every pair of a block at once (cross scores by one product, a sort along the
patches, masked softmaxes, one batched product for the 29 slots + extra token of all pairs), in tiles
of about ``sim_tile_pairs`` pairs to bound memory; the per-patch aggregation MLP runs once per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.safe import CheckpointError, strip_prefixes
from ..config import ConfigError, ModelConfig
from ..data.synthetic import SYNTHETIC_WORDPIECE
from ..encoders.backbones import ARCHITECTURES, load_pretrained_weights
from ..encoders.hf_text import WordPieceTokenizer, build_hf_text_model
from ..encoders.vit import VIT_ARCH, build_vit, vit_state_for
from ..features import sequence_mask
from ..losses import hinge_triplet_loss, positive_mask
from ..registry import Tag, register_model
from ..threads import inference_threads, map_blocks
from .base import EvalSettings, ITMModel

__all__ = ["SCTA", "TAGS", "TINY_OVERRIDES", "SCTAConfig", "SCTATokenizer", "convert_official", "scta"]

UPSTREAM = "ICME2025ITR/SCTA @ 9612c1a4d7b60cf46ca5cda86a370d1c7e6a98ad"
PARENT = "CrossmodalGroup/LAPS @ 355a43babb70a3fdfbe74aabebad9a8414b91b3b"


@dataclasses.dataclass
class SCTAConfig(ModelConfig):
    """Architecture, fc2 mode, loss and evaluation settings (defaults: upstream's ``arguments.py``)."""

    vit_config: dict[str, Any] = dataclasses.field(default_factory=dict)   # overrides of the ViT-B/16 fields
    vit_pretrained: str | None = None           # hub id / folder for init_pretrained (upstream: in21k)
    bert_arch: str = "bert-base-uncased"
    bert_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    bert_pretrained: str | None = None          # hub id / folder for init_pretrained
    tokenizer: str = "bert-base-uncased"        # hub id or local folder
    embed_size: int = 512
    num_patches: int = 196                      # upstream hard-codes 196 (ViT-B/16 at 224)
    img_sparse_ratio: float = 0.5
    img_aggr_ratio: float = 0.3
    cap_aggr_ratio: float = 0.75
    aggr_dim_ratio: float = 0.2                 # hidden width of both aggregation MLPs = int(0.2 C)
    min_cap_tokens: int = 4
    max_cap_tokens: int = 100
    max_word: int = 90                          # evaluation keeps this many token embeddings
    cap_fc2: Literal["reference", "fixed"] = "reference"
    fc2_seed: int = 0
    shard_size: int = 256                       # upstream's evaluation blocks (images x captions)
    size_augment: bool = True                   # training captions: whole-word mask/replace/delete
    word_aug_prob: float = 0.2
    margin: float = 0.2
    vse_mean_warmup_epochs: int = 1             # epochs summing all negatives before the hardest
    loss_warmup_epoch: int | None = 0           # epoch whose loss is scaled by step / steps_per_epoch
    monitor_weight: float = 2.0
    backbone_lr_mult: float = 0.1               # ViT and BERT train at lr x 0.1
    sim_tile_pairs: int = 256                   # pairs per step of the batched scoring (CPU)
    sim_tile_pairs_cuda: int = 8192

    def validate(self) -> None:
        for f in ("embed_size", "num_patches", "max_word", "shard_size", "sim_tile_pairs", "sim_tile_pairs_cuda",
                  "min_cap_tokens"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"scta: {f} must be positive, got {getattr(self, f)}")
        if self.max_cap_tokens < self.min_cap_tokens:
            raise ConfigError(f"scta: max_cap_tokens ({self.max_cap_tokens}) < min_cap_tokens ({self.min_cap_tokens})")
        for f in ("img_sparse_ratio", "img_aggr_ratio", "cap_aggr_ratio", "aggr_dim_ratio"):
            if not 0 < getattr(self, f) <= 1:
                raise ConfigError(f"scta: {f} must lie in (0, 1], got {getattr(self, f)}")
        if self.num_slots < 1:
            raise ConfigError(f"scta: int(num_patches * img_aggr_ratio * img_sparse_ratio) = {self.num_slots}; "
                              "at least one aggregated slot is needed")
        if int(self.embed_size * self.aggr_dim_ratio) < 1:
            raise ConfigError("scta: int(embed_size * aggr_dim_ratio) must be >= 1")
        if ARCHITECTURES.get(self.bert_arch, {}).get("model_type") != "bert":
            raise ConfigError(f"scta: bert_arch must name a bert architecture, got {self.bert_arch!r}")
        if "model_type" in self.vit_config or "model_type" in self.bert_config:
            raise ConfigError("scta: vit_config / bert_config override fields of the architecture, not model_type")
        vit = {**ARCHITECTURES[VIT_ARCH], **self.vit_config}
        grid = vit["image_size"] // vit["patch_size"]
        if grid * grid != self.num_patches:
            raise ConfigError(f"scta: num_patches={self.num_patches} but the ViT has {grid * grid} patches "
                              f"(image_size {vit['image_size']}, patch_size {vit['patch_size']})")
        if self.loss_warmup_epoch is not None and self.loss_warmup_epoch < 0:
            raise ConfigError("scta: loss_warmup_epoch must be >= 0 or null")

    @property
    def num_slots(self) -> int:
        """Aggregated patch slots S (29 for ViT-B/16)."""
        return int(self.num_patches * self.img_aggr_ratio * self.img_sparse_ratio)

    @property
    def hidden_dim(self) -> int:
        return int(self.embed_size * self.aggr_dim_ratio)


# ---------------------------------------------------------------------------------------------------
# modules (upstream names)


def _freeze_pooler(model: nn.Module) -> None:
    """The HF pooler is built (its weights are in upstream's checkpoints) but its output is never used:
    it gets no gradient, so it is frozen (AdamW skips it upstream too) and DDP needs no unused-parameter search."""
    pooler = getattr(model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


class VisionEncoder(nn.Module):
    """``visual_encoder`` (HF ViTModel, with its unused pooler) -> ``vision_proj``."""

    def __init__(self, c: SCTAConfig) -> None:
        super().__init__()
        self.visual_encoder = build_vit(c.vit_config)
        hidden = self.visual_encoder.config.hidden_size
        self.vision_proj = nn.Identity() if hidden == c.embed_size else nn.Linear(hidden, c.embed_size)
        _freeze_pooler(self.visual_encoder)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(self.visual_encoder(pixel_values=pixels).last_hidden_state)


class TextEncoder(nn.Module):
    """``bert`` (HF BertModel) -> ``fc``; attention on ids != 0 as upstream."""

    def __init__(self, c: SCTAConfig) -> None:
        super().__init__()
        self.bert = build_hf_text_model(c.bert_arch, c.bert_config)
        hidden = self.bert.config.hidden_size
        self.fc = nn.Identity() if hidden == c.embed_size else nn.Linear(hidden, c.embed_size)
        _freeze_pooler(self.bert)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bert(input_ids=ids, attention_mask=(ids != 0).float())[0])


class TokenAggregation(nn.Module):
    """Patch aggregator: ``weight`` = LN -> Linear(C, H) -> GELU -> Linear(H, S) per patch, ``scale``.

    ``weight.3.bias`` adds one constant per slot, which the softmax over patches cancels: it is kept
    (zero gradient) only so upstream checkpoints load strictly.
    """

    def __init__(self, dim: int, slots: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, slots))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))


class TokenAggregationforCap(nn.Module):
    """Word aggregator: LN -> ``fc1`` -> GELU, then a second layer that is *not* a parameter (see module doc)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.gelu = nn.GELU()
        self.scale = nn.Parameter(torch.ones(1, 1))


class CrossSparseAggrNet(nn.Module):
    """``cross_net``: the two aggregators (the sparse selection has no parameters)."""

    def __init__(self, c: SCTAConfig) -> None:
        super().__init__()
        self.img_aggr_net = TokenAggregation(c.embed_size, c.num_slots, c.hidden_dim)
        self.cap_aggr_net = TokenAggregationforCap(c.embed_size, c.hidden_dim)


def draw_fc2(k: int, hidden: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[k, hidden]`` and bias ``[k]`` exactly as ``nn.Linear(hidden, k)`` initialises them (CPU)."""
    w = torch.empty(k, hidden)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    b = torch.empty(k)
    bound = 1 / math.sqrt(hidden)
    nn.init.uniform_(b, -bound, bound, generator=generator)
    return w, b


def _is_square(n: int) -> bool:
    a = int(math.sqrt(n))
    return a * a == n


# ---------------------------------------------------------------------------------------------------
# tokenizer


class SCTATokenizer(WordPieceTokenizer):
    """BERT uncased ids ``[CLS] pieces [SEP]`` (no truncation); training copies get upstream's size augmentation."""

    def __init__(self, source: str, size_augment: bool = True, aug_prob: float = 0.2) -> None:
        super().__init__(source, augment=size_augment, aug_prob=aug_prob)


# ---------------------------------------------------------------------------------------------------
# the model


class SCTA(ITMModel):
    """SCTA with upstream's module names: ``img_enc``, ``txt_enc``, ``cross_net``."""

    input_kind = "pixels"
    scoring = "cross"
    accumulation = "exact"  # the loss needs only the encoder outputs of the whole batch

    def __init__(self, config: SCTAConfig) -> None:
        super().__init__(config)
        self.img_enc = VisionEncoder(config)
        self.txt_enc = TextEncoder(config)
        self.cross_net = CrossSparseAggrNet(config)
        self._tokenizer = SCTATokenizer(config.tokenizer, config.size_augment, config.word_aug_prob)
        self._eval_gen = torch.Generator().manual_seed(config.fc2_seed)
        self._fixed_fc2: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.loss_alpha = 1.0

    # -- data plumbing ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> SCTATokenizer:
        return self._tokenizer

    def image_transform_for(self, train: bool):
        from ..data.transforms import image_transform

        size = {**ARCHITECTURES[VIT_ARCH], **self.config.vit_config}["image_size"]
        return image_transform("vit", size, train=train)

    def eval_settings(self) -> EvalSettings:
        """Reference mode: upstream's shards of 256 x 256 and the fc2 seed; fixed mode: any block."""
        if self.config.cap_fc2 == "reference":
            return EvalSettings(block=(self.config.shard_size, self.config.shard_size), seed=self.config.fc2_seed)
        return EvalSettings(block=(self.config.shard_size, self.config.shard_size))

    def train(self, mode: bool = True) -> SCTA:
        if not mode:  # every evaluation starts the reference draws from the seed
            self.reset_fc2_rng()
        return super().train(mode)

    def reset_fc2_rng(self, seed: int | None = None) -> None:
        """Restart the evaluation draws of ``cap_fc2="reference"`` from `seed` (default ``fc2_seed``)."""
        self._eval_gen.manual_seed(self.config.fc2_seed if seed is None else seed)

    # -- encoders ----------------------------------------------------------------------------------
    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"tokens": [B, 1 + N, C]}``: projected ViT tokens (CLS first), not normalised."""
        tokens = self.img_enc(batch["pixels"])
        if tokens.shape[1] - (0 if _is_square(tokens.shape[1]) else 1) != self.config.num_patches:
            raise ValueError(f"scta: the ViT gave {tokens.shape[1]} tokens for num_patches={self.config.num_patches}; "
                             "feed images of the configured image_size (model.image_transform)")
        return {"tokens": tokens}

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"tokens": [B, L, C], "mask": [B, L]}``; in eval mode only the first ``max_word`` tokens are kept."""
        ids = batch["input_ids"]
        lengths = batch["lengths"].to(ids.device).long() if "lengths" in batch else (ids != 0).sum(1)
        if int(lengths.min()) < 2:
            raise ValueError("scta: every caption needs [CLS] and at least one more token")
        tokens = self.txt_enc(ids)
        if not self.training:  # upstream stores max_word embeddings per caption for evaluation
            tokens = tokens[:, : self.config.max_word]
            lengths = lengths.clamp(max=self.config.max_word)
        mask = sequence_mask(lengths, tokens.shape[1])
        return {"tokens": tokens, "mask": mask}

    # -- fc2 draws ---------------------------------------------------------------------------------
    def caption_token_counts(self, lengths: Sequence[int]) -> list[int]:
        """k per caption: ``max(min_cap_tokens, min(int(cap_aggr_ratio * (l - 1)), max_cap_tokens))``."""
        c = self.config
        return [max(c.min_cap_tokens, min(int(c.cap_aggr_ratio * (n - 1)), c.max_cap_tokens)) for n in lengths]

    def draw_fc2_layers(self, ks: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The second caption layers of one scoring call, one per caption (see ``cap_fc2``)."""
        h = self.config.hidden_dim
        if self.config.cap_fc2 == "fixed":
            if not self._fixed_fc2:  # filled whole, then published: the evaluator may score tiles on threads
                gen = torch.Generator().manual_seed(self.config.fc2_seed)
                self._fixed_fc2 = {k: draw_fc2(k, h, gen)
                                   for k in range(self.config.min_cap_tokens, self.config.max_cap_tokens + 1)}
            return [self._fixed_fc2[k] for k in ks]
        gen = None if self.training else self._eval_gen  # training: the global CPU stream, as upstream
        return [draw_fc2(k, h, gen) for k in ks]

    # -- scoring -----------------------------------------------------------------------------------
    def similarity(self, image_feats: Mapping[str, torch.Tensor],
                   text_feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``[n_images, n_captions]`` in [-0.2, 2]; one fc2 draw per caption per call (reference mode)."""
        return self.cross_scores(image_feats, text_feats)

    def cross_scores(self, image_feats: Mapping[str, torch.Tensor], text_feats: Mapping[str, torch.Tensor],
                     fc2: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Every pair of the given sets at once; `fc2` (per caption ``(W, b)``) overrides the draws."""
        img = image_feats["tokens"]
        txt, mask = text_feats["tokens"], text_feats["mask"].bool()
        lengths = mask.sum(1).tolist()
        ks = self.caption_token_counts(lengths)
        if fc2 is None:
            fc2 = self.draw_fc2_layers(ks)
        elif len(fc2) != txt.shape[0]:
            raise ValueError(f"scta: {len(fc2)} fc2 layers for {txt.shape[0]} captions")
        # fp32 even under autocast: the kept patch set is decided by score differences near 1e-5
        with torch.autocast(img.device.type, enabled=False):
            caps, cap_mask, q = self._caption_side(txt.float(), mask, ks, fc2)
            return self._pair_scores(img.float(), caps, cap_mask, q)

    def _caption_side(self, txt: torch.Tensor, mask: torch.Tensor, ks: list[int],
                      fc2: Sequence[tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised caption tokens ``[Bt, 1 + k_max, C]``, their mask, and the no-grad caption query ``[Bt, C]``."""
        agg = self.cross_net.cap_aggr_net
        bt, _, _c = txt.shape
        lengths = mask.sum(1)
        with torch.no_grad():
            # upstream: normalize(mean of the l raw rows); CPU mean is sum then division
            q = F.normalize(txt.masked_fill(~mask[..., None], 0).sum(1) / lengths[:, None].to(txt.dtype), dim=-1)
        words, wmask = txt[:, 1:], mask[:, 1:]
        h = agg.gelu(agg.fc1(agg.layer_norm(words)))                               # [Bt, n, H]
        kmax = max(ks)
        w2 = h.new_zeros(bt, kmax, h.shape[-1])
        b2 = h.new_zeros(bt, kmax)
        for j, (w, b) in enumerate(fc2):
            if w.shape != (ks[j], h.shape[-1]) or b.shape != (ks[j],):
                raise ValueError(f"scta: fc2 layer {j} has shape {tuple(w.shape)}, expected ({ks[j]}, {h.shape[-1]})")
            w2[j, : ks[j]] = w.to(h)
            b2[j, : ks[j]] = b.to(h)
        logit = (torch.einsum("jnh,jkh->jkn", h, w2) + b2[..., None]) * agg.scale    # [Bt, k, n]
        att = torch.softmax(logit.masked_fill(~wmask[:, None, :], float("-inf")), dim=-1)
        aggr = torch.bmm(att, words)                                               # [Bt, k, C]
        caps = F.normalize(torch.cat([txt[:, :1], aggr], 1), dim=-1)
        kk = torch.tensor(ks, device=txt.device)
        cap_mask = sequence_mask(kk + 1, kmax + 1)
        caps = caps * cap_mask[..., None]
        return caps, cap_mask, q

    def _pair_scores(self, img: torch.Tensor, caps: torch.Tensor, cap_mask: torch.Tensor,
                     q: torch.Tensor) -> torch.Tensor:
        c = self.config
        bv, lv, _dim = img.shape
        has_cls = not _is_square(lv)
        patches = img[:, 1:] if has_cls else img
        n = patches.shape[1]
        keep_n = math.ceil(n * c.img_sparse_ratio)
        pn = F.normalize(patches, dim=-1)
        with torch.no_grad():
            glo = F.normalize(patches.mean(1, keepdim=True), dim=-1)
            a_self = (glo * pn).sum(-1)                                            # [Bv, N], as upstream
        agg = self.cross_net.img_aggr_net
        slot_logit = (agg.weight(patches) * agg.scale).transpose(1, 2)             # [Bv, S, N], once per image
        cls_n = F.normalize(img[:, 0], dim=-1) if has_cls else None                # [Bv, C]
        bt = caps.shape[0]
        tile = c.sim_tile_pairs_cuda if img.is_cuda else c.sim_tile_pairs
        cj = min(bt, 16)
        ci = max(1, tile // cj)
        row_starts, col_starts = range(0, bv, ci), range(0, bt, cj)

        def score(start: tuple[int, int]) -> torch.Tensor:
            i0, j0 = start
            i1, j1 = min(i0 + ci, bv), min(j0 + cj, bt)
            return self._tile(patches[i0:i1], pn[i0:i1], a_self[i0:i1], slot_logit[i0:i1],
                              None if cls_n is None else cls_n[i0:i1], caps[j0:j1], cap_mask[j0:j1], q[j0:j1],
                              keep_n)

        starts = [(i0, j0) for i0 in row_starts for j0 in col_starts]
        # the fc2 draws are done: the tiles are independent, so evaluation shares them among threads
        tiles = map_blocks(score, starts, inference_threads(len(starts), img.device))
        w = len(col_starts)
        return torch.cat([torch.cat(tiles[r * w:(r + 1) * w], 1) for r in range(len(row_starts))], 0)

    def _tile(self, patches, pn, a_self, slot_logit, cls_n, caps, cap_mask, q, keep_n) -> torch.Tensor:
        """Scores ``[bi, bj]`` of a tile; see ``_pair_scores``. Equal to upstream's per-caption loop up to rounding."""
        bi, n, dim = patches.shape
        bj, t = caps.shape[0], caps.shape[1]
        with torch.no_grad():
            keep, score = self._keep_mask(pn, a_self, q, keep_n)                 # [bi, bj, N]
            # extra token: softmax over the dropped patches; the normalisation constant is left out
            # because the token is L2-normalised below (same for the slots)
            w_drop = torch.exp(score - score.amax(-1, keepdim=True)).masked_fill_(keep, 0)
            keep_f = keep.to(patches.dtype)
        e = torch.exp(slot_logit - slot_logit.amax(-1, keepdim=True))             # [bi, S, N], once per image
        s = e.shape[1]
        # a slot whose kept logits all underflow after subtracting the max over every patch: use the
        # exact masked softmax for this tile instead (never seen in practice)
        safe = bool((torch.bmm(keep_f, e.detach().transpose(1, 2)) > 1e-30).all())
        if not safe:
            e = torch.softmax(slot_logit[:, None].masked_fill(~keep[:, :, None, :], float("-inf")), dim=-1)
            w_slots = e
        else:
            w_slots = e[:, None] * keep_f[:, :, None, :]                            # [bi, bj, S, N]
        if torch.is_grad_enabled():
            weights = torch.cat([w_slots, w_drop[:, :, None, :]], 2)
        else:
            weights = patches.new_empty(bi, bj, s + 1, n)
            weights[:, :, :s] = w_slots
            weights[:, :, s] = w_drop
        toks = torch.bmm(weights.view(bi, bj * (s + 1), n), patches).view(bi * bj, s + 1, dim)
        norms = torch.linalg.vector_norm(toks, dim=-1).clamp_min(1e-12)            # F.normalize's denominator
        caps_e = caps[None].expand(bi, bj, t, dim).reshape(bi * bj, t, dim)
        sim = (torch.bmm(toks, caps_e.transpose(1, 2)) / norms[..., None]).view(bi, bj, s + 1, t)
        if cls_n is not None:
            cls_sim = (cls_n @ caps.reshape(bj * t, dim).t()).view(bi, bj, 1, t)
            sim = torch.cat([cls_sim, sim], 2)                                    # [bi, bj, V, T]
        sim = F.leaky_relu(sim, negative_slope=0.1)
        m = cap_mask[None, :, None, :]                                             # [1, bj, 1, T]
        t2i = (sim.amax(2) * m[:, :, 0]).sum(-1) / m[:, :, 0].sum(-1)
        i2t = sim.masked_fill(~m, float("-inf")).amax(-1).mean(-1)
        return t2i + i2t

    @staticmethod
    def _keep_mask(pn, a_self, q, keep_n) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``keep_n`` patches of ``cos(patch, image mean) + cos(patch, caption mean)`` per pair."""
        bi, n, dim = pn.shape
        bj = q.shape[0]
        score = a_self[:, None, :] + (pn.reshape(bi * n, dim) @ q.t()).view(bi, n, bj).transpose(1, 2)
        thr = torch.kthvalue(score, n - keep_n + 1, dim=-1, keepdim=True).values  # keep_n-th largest
        keep = score >= thr
        below = score.masked_fill(keep, float("-inf")).amax(-1)
        # the product rounds differently from upstream's elementwise sum: where the keep boundary is
        # that close (or tied), recompute the pair's scores exactly as upstream and select by its sort
        near = ((thr[..., 0] - below) < 1e-5) | (keep.sum(-1) != keep_n)
        if near.any():
            ii, jj = near.nonzero(as_tuple=True)
            exact = a_self[ii] + (q[jj][:, None, :] * pn[ii]).sum(-1)
            idx = torch.sort(exact, dim=-1, descending=True).indices[:, :keep_n]
            score[ii, jj] = exact
            keep[ii, jj] = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, idx, True)
        return keep, score

    # -- training ----------------------------------------------------------------------------------
    def train_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {"image": self.encode_image(batch), "text": self.encode_text(batch)}

    def train_loss(self, feats: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hinge over the global batch; under DDP each rank scores all images against its own captions."""
        from ..distributed import all_gather_with_grad, gather_features

        images = gather_features(feats["image"])
        cols = self.cross_scores(images, feats["text"])                           # [global images, local captions]
        scores = all_gather_with_grad(cols.t().contiguous()).t()
        index = batch.get("image_index")
        index = gather_features(index.to(scores.device)) if index is not None else None
        return self.loss_from_scores(scores, index, images["tokens"].shape[1])

    def loss_from_scores(self, scores: torch.Tensor, image_index: torch.Tensor | None,
                         image_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """``alpha * hinge + monitor_weight * (kept fraction - img_sparse_ratio)^2`` (upstream's total)."""
        c = self.config
        pos = positive_mask(scores.shape[0], image_index, scores.device) if image_index is not None else None
        hardest = self.epoch >= c.vse_mean_warmup_epochs
        align = hinge_triplet_loss(scores, c.margin, hardest, pos_mask=pos) * self.loss_alpha
        n = c.num_patches if image_tokens is None else image_tokens - (0 if _is_square(image_tokens) else 1)
        kept = torch.tensor(math.ceil(n * c.img_sparse_ratio) / n, dtype=scores.dtype, device=scores.device)
        monitor = (kept - c.img_sparse_ratio) ** 2   # a constant (0 for ViT): the selection has no gradient
        return {"loss": align + c.monitor_weight * monitor, "align": align.detach(), "monitor": monitor}

    def on_step_start(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Upstream's loss warm-up: ``step / steps_per_epoch`` during `loss_warmup_epoch`, else 1."""
        w = self.config.loss_warmup_epoch
        self.loss_alpha = step / max(1, steps_per_epoch) if (w is not None and epoch == w) else 1.0

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Upstream's groups: text fc, BERT (x0.1), ViT (x0.1), vision_proj, cross_net."""
        m = self.config.backbone_lr_mult

        def live(ps):
            return [p for p in ps if p.requires_grad]

        return [
            {"params": live(self.txt_enc.fc.parameters()), "lr": base_lr, "name": "text_fc"},
            {"params": live(self.txt_enc.bert.parameters()), "lr": base_lr * m, "name": "bert"},
            {"params": live(self.img_enc.visual_encoder.parameters()), "lr": base_lr * m, "name": "vit"},
            {"params": live(self.img_enc.vision_proj.parameters()), "lr": base_lr, "name": "vision_proj"},
            {"params": live(self.cross_net.parameters()), "lr": base_lr, "name": "cross_net"},
        ]

    def init_pretrained(self) -> None:
        """Load the ViT / BERT weights named by ``vit_pretrained`` / ``bert_pretrained`` (if set)."""
        if self.config.vit_pretrained:
            load_pretrained_weights(self.img_enc.visual_encoder, self.config.vit_pretrained)
        if self.config.bert_pretrained:
            load_pretrained_weights(self.txt_enc.bert, self.config.bert_pretrained)


# ---------------------------------------------------------------------------------------------------
# official checkpoints

_VIT = "img_enc.visual_encoder."


@functools.lru_cache(maxsize=1)
def _vit_template() -> nn.Module:
    """A tiny ViT of the installed transformers: its key layout is what a checkpoint is renamed to."""
    return build_vit({"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 4,
                      "image_size": 4, "patch_size": 4})


def _vit_keys_for_installed(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the ``img_enc.visual_encoder.*`` keys to the installed transformers' ViT layout (4.x or 5.x)."""
    vit = {k[len(_VIT):]: v for k, v in state.items() if k.startswith(_VIT)}
    rest = {k: v for k, v in state.items() if not k.startswith(_VIT)}
    return {**rest, **{_VIT + k: v for k, v in vit_state_for(_vit_template(), vit).items()}}


_OPT_FIELDS = ("img_sparse_ratio", "img_aggr_ratio", "cap_aggr_ratio", "embed_size", "max_word", "margin",
               "monitor_weight", "shard_size", "vse_mean_warmup_epochs")


def convert_official(obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """An SCTA ``model_best.pth`` (``{"model": state, "opt": Namespace, ...}``) or bare state dict -> itmzoo.

    ViT keys are renamed to the installed transformers' names (4.x ``encoder.layer.*.attention.attention.query``
    <-> 5.x ``layers.*.attention.q_proj``), so no weight is silently dropped; everything else keeps its name.
    LAPS checkpoints (``cross_net.aggr_net``, 39 slots) and Swin variants are refused.
    """
    opt = None
    state = obj
    if isinstance(obj, Mapping) and "model" in obj:
        state, opt = obj["model"], obj.get("opt")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("not an SCTA checkpoint: expected {'model': state_dict, 'opt': Namespace} "
                              "or a state dict")
    state = strip_prefixes(dict(state))
    if any(k.startswith(("cross_net.aggr_net.", "cross_net.sparse_net.")) for k in state):
        raise CheckpointError("this is a LAPS checkpoint (cross_net.aggr_net, 39 slots), not SCTA "
                              "(cross_net.img_aggr_net, 29 slots, plus cross_net.cap_aggr_net): "
                              "LAPS weights do not fit SCTA")
    if "cross_net.cap_aggr_net.fc1.weight" not in state:
        raise CheckpointError("not an SCTA checkpoint: missing cross_net.cap_aggr_net.fc1.weight")
    given = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt) if isinstance(opt, Mapping) else {}
    if "swin" in str(given.get("vit_type", "vit")):
        raise CheckpointError("SCTA checkpoint with a Swin backbone: itmzoo implements the ViT variant only")
    state = _vit_keys_for_installed(state)
    inferred: dict[str, Any] = {k: given[k] for k in _OPT_FIELDS if k in given}
    for k in ("img_sparse_ratio", "img_aggr_ratio", "cap_aggr_ratio", "margin", "monitor_weight"):
        if k in inferred:
            inferred[k] = float(inferred[k])
    embed = state["cross_net.cap_aggr_net.fc1.weight"].shape[1]
    if inferred.get("embed_size", embed) != embed:
        raise CheckpointError(f"SCTA checkpoint: opt.embed_size={inferred['embed_size']} "
                              f"disagrees with the weights ({embed})")
    inferred["embed_size"] = embed
    slots = state.get("cross_net.img_aggr_net.weight.3.weight")
    if slots is not None and "num_patches" in given:
        n = int(given["num_patches"])
        want = int(n * inferred.get("img_aggr_ratio", 0.3) * inferred.get("img_sparse_ratio", 0.5))
        if slots.shape[0] != want:
            raise CheckpointError(f"SCTA checkpoint: {slots.shape[0]} aggregation slots but opt implies {want}")
    return inferred, state, ["txt_enc.bert.embeddings.position_ids", "txt_enc.bert.embeddings.token_type_ids"]


# ---------------------------------------------------------------------------------------------------
# registry

_PREPROCESSING = {"image": "Resize((224, 224), bicubic), ImageNet mean/std (as upstream, with the in21k ViT)",
                  "text": "bert-base-uncased, [CLS] w [SEP], no truncation; 90 token embeddings at evaluation",
                  "cap_fc2": "reference, shards of 256 x 256"}

TAGS = {
    "f30k": Tag(
        overrides={"vit_pretrained": "google/vit-base-patch16-224-in21k", "bert_pretrained": "bert-base-uncased"},
        dataset="f30k", source=None, preprocessing=_PREPROCESSING,
        expected={"f30k1k.i2t_r1": 78.5, "f30k1k.i2t_r5": 96.2, "f30k1k.t2i_r1": 65.6, "f30k1k.t2i_r5": 91.4},
        note=f"origin {UPSTREAM}; the README links no checkpoints; its numbers are one sample of the random fc2",
    ),
    "coco": Tag(
        overrides={"vit_pretrained": "google/vit-base-patch16-224-in21k", "bert_pretrained": "bert-base-uncased"},
        dataset="coco", source=None, preprocessing=_PREPROCESSING,
        expected={"coco1k.i2t_r1": 82.3, "coco1k.i2t_r5": 96.7, "coco1k.t2i_r1": 68.7, "coco1k.t2i_r5": 90.9,
                  "coco5k.i2t_r1": 55.8, "coco5k.i2t_r5": 84.0, "coco5k.t2i_r1": 43.7, "coco5k.t2i_r5": 73.6},
        note=f"origin {UPSTREAM}; the README links no checkpoints; its numbers are one sample of the random fc2",
    ),
}

#: tiny random model for tests (no downloads): 64 px, 16 patches -> 8 kept, 2 slots
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "scta": {
        "tokenizer": SYNTHETIC_WORDPIECE,
        "vit_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
                       "image_size": 64},
        "bert_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
                        "vocab_size": 120},
        "embed_size": 40, "num_patches": 16, "img_aggr_ratio": 0.3,
    },
}


@register_model("scta", config=SCTAConfig, input_kind="pixels", scoring="cross",
                paper="SCTA: sparse cross-modal token aggregation for image-text retrieval "
                      "(ICME 2025, on LAPS CVPR 2024)",
                upstream=UPSTREAM, text_backbone="bert-base-uncased", image_backbone="vit-base-patch16-224-in21k",
                tags=TAGS, converter=convert_official, tiny=TINY_OVERRIDES["scta"])
def scta(config: SCTAConfig) -> SCTA:
    return SCTA(config)
