"""ESL: Enhanced Semantic Similarity Learning for image-text matching (Zhang et al., TCSVT 2023).

Two official branches, one module:

* ``esl`` (``CrossmodalGroup/ESL @ b91e287b238fcf6dd7dc784c04e7bf1ac53404ae``, built on VSE-infinity):
  precomputed BUTD regions -> ``l2n(fc(x) + mlp(x))`` per region; BERT-base -> ``l2n(Linear(768, 512))``
  per token. Both sets go through the **measure-unit levels** (9 levels of 512, 256, ..., 2 dims, each
  built from the previous one by a heuristic 2-tap kernel or an adaptive top-2 mask) and are compared by
  a cross-attention head: ``A = sum_k X_k D_k Y_k^T`` (words x regions), ``D_k = LayerNorm(E_k) w'_k``,
  then a bidirectional softmax attention over ``leaky_relu(tanh(A))``. Loss: VSE++ hinge, summed, all
  negatives in epoch 0 and the hardest one afterwards. Scoring is cross-interaction, batched (below).
* ``esl_clip`` (``kkzhang95/ESL @ 7edd3da0b404b3262d54b8304f36b615c282d705``, built on X-Pool): the same
  levels on CLIP's global image/text vectors, a bilinear head ``(1/9) sum_k x_k (M_k w'_k) y_k^T`` and a
  symmetric InfoNCE with CLIP's logit scale. The score is a dot product of independent embeddings.

Faithful by default; documented deviations ("fixed" mode) are config fields. docs/methods/esl.md has
the table. Upstream quirks kept in faithful mode:

* the image chain feeds the *normalised* level to the next level, the text chain the *un-normalised* one
  (`normalize_text_chain` = False), with ``x / (||x|| + 1e-8)`` normalisation;
* upstream indexes the head/mask embeddings with ``torch.linspace(0, d, d, dtype=int)``: ``0..d-1`` on
  the authors' torch 1.8, an out-of-range index on torch >= 2. The weights are used whole (= torch 1.8);
* the adaptive mask normalises the whole row, then keeps the top 2 entries by signed value (ties keep
  more), so every entry of the row gets a gradient;
* BERT branch: zero-padded regions of a training batch go through the MLP's BatchNorm and take part in
  both attentions (`mask_padded_regions` = False); the heuristic build switches the contribution
  re-weighting ``w' = w exp(lambda (|w| - thr))`` on, the adaptive build forces lambda = 0.

**Batched scoring (BERT branch).** Upstream loops over captions and, for every (image, caption) pair,
re-multiplies the caption's nine levels by ``D_k`` and applies tanh/LeakyReLU twice. Here ``D`` is folded
into the caption once (`encode_text` returns ``X_c = [T_c^(k) D_k]_k``), so a pair costs one
``n_words x 1022`` by ``1022 x R`` product (10.5x fewer multiply-adds at 14 words x 36 regions), and
the elementwise work is done once, on chunks sized to stay in cache, with captions bucketed by length.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.safe import CheckpointError, strip_prefixes
from ..config import ConfigError, ModelConfig
from ..data.transforms import RegionTransform
from ..encoders.backbones import load_pretrained_weights
from ..encoders.hf_text import WordPieceTokenizer, build_hf_text_model, load_hf_tokenizer
from ..encoders.regions import RegionFeatureEncoder, region_mask
from ..features import sequence_mask
from ..losses import contrastive_loss, hinge_triplet_loss, l2norm, positive_mask
from ..registry import Tag, expected_recalls, register_model
from ..threads import inference_threads, map_blocks
from .base import EvalSettings, ITMModel

__all__ = [
    "ESL",
    "ESLCLIP",
    "NUM_LEVELS",
    "TAGS",
    "TAGS_CLIP",
    "TINY_OVERRIDES",
    "AdaptiveLevels",
    "ESLBertTokenizer",
    "ESLCLIPConfig",
    "ESLCLIPHead",
    "ESLConfig",
    "ESLHead",
    "HeuristicLevels",
    "contribution_weights",
    "convert_official",
    "convert_official_clip",
    "esl",
    "esl_clip",
    "esl_cross_scores",
    "level_dims",
    "strategy_from_keys",
]

UPSTREAM = "CrossmodalGroup/ESL @ b91e287b238fcf6dd7dc784c04e7bf1ac53404ae"
UPSTREAM_CLIP = "kkzhang95/ESL @ 7edd3da0b404b3262d54b8304f36b615c282d705"
NUM_LEVELS = 9  # hard-coded upstream: level 0 (the feature) + 8 halvings
EPS = 1e-8

Strategy = Literal["heuristic", "adaptive"]


def level_dims(embed_size: int, kernel_size: int = 2, levels: int = NUM_LEVELS) -> list[int]:
    """Widths of the measure-unit levels: ``embed_size / kernel_size**k`` for k = 0..levels-1."""
    return [embed_size // kernel_size**k for k in range(levels)]


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class ESLConfig(ModelConfig):
    """ESL, BERT branch (defaults: the authors' ``arguments.py`` + ``train_region_*.sh``; adaptive build)."""

    strategy: Strategy = "adaptive"  # dimensional selective mask; upstream's module flag (BERT default: adaptive)
    img_dim: int = 2048
    embed_size: int = 512
    kernel_size: int = 2
    bert_arch: str = "bert-base-uncased"  # architecture (itmzoo.encoders.backbones.ARCHITECTURES)
    bert_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of its fields
    pretrained: str | None = None  # hub id or local folder loaded by init_pretrained(); None: random
    tokenizer: str = "bert-base-uncased"  # hub id or local folder of the tokenizer
    bert_lr_mult: float = 0.1  # BERT trains at lr x 0.1 (upstream's AdamW groups)
    margin: float = 0.2
    max_violation: bool = False  # hardest negatives from the first epoch
    vse_mean_warmup_epochs: int = 1  # epochs summing all negatives before the hardest one
    same_image_positives: bool = False  # upstream: only the diagonal is positive
    region_drop_prob: float = 0.2  # training transform: a region is dropped when rand <= this
    word_aug_prob: float = 0.2  # training tokenizer: a word is masked / replaced / deleted with this probability
    # -- fixed mode (False = upstream behaviour) --
    mask_padded_regions: bool = False  # keep padded regions out of BatchNorm statistics and attention
    normalize_text_chain: bool = False  # text levels chained like the image ones (normalised)
    random_token_no_specials: bool = False  # word augmentation never draws [PAD]/[CLS]/[unused*]...
    # -- scoring speed (no effect on values beyond float rounding) --
    sim_chunk_elems: int = 1 << 18  # words x regions x pairs per scoring chunk on CPU (cache sized)
    sim_chunk_elems_cuda: int = 1 << 27  # same on CUDA
    eval_block: tuple[int, int] = (256, 1024)  # (images, captions) per similarity() call in evaluation

    def validate(self) -> None:
        from ..encoders.backbones import ARCHITECTURES

        if self.strategy not in ("heuristic", "adaptive"):
            raise ConfigError(f"esl: strategy must be 'heuristic' or 'adaptive', got {self.strategy!r}")
        for f in ("img_dim", "embed_size", "sim_chunk_elems", "sim_chunk_elems_cuda"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"esl: {f} must be positive, got {getattr(self, f)}")
        if self.kernel_size < 2 or self.embed_size % self.kernel_size ** (NUM_LEVELS - 1):
            raise ConfigError(f"esl: embed_size ({self.embed_size}) must be divisible by kernel_size**8 "
                              f"(kernel_size={self.kernel_size}) for the 9 measure-unit levels; upstream: 512 and 2")
        if self.embed_size % 2:
            raise ConfigError("esl: embed_size must be even (the region MLP is embed_size//2 wide), "
                              f"got {self.embed_size}")
        for f in ("region_drop_prob", "word_aug_prob"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"esl: {f} must lie in [0, 1), got {getattr(self, f)}")
        if ARCHITECTURES.get(self.bert_arch, {}).get("model_type") != "bert":
            raise ConfigError(f"esl needs a BERT architecture, got bert_arch={self.bert_arch!r}")
        if "model_type" in self.bert_config:
            raise ConfigError("esl: bert_config overrides fields of bert_arch; it cannot change model_type")
        if len(self.eval_block) != 2 or min(self.eval_block) <= 0:
            raise ConfigError(f"esl: eval_block must be two positive ints, got {self.eval_block}")


# ------------------------------------------------------------------------------------ measure-unit levels


class HeuristicLevels(nn.Module):
    """Levels from a fixed choice of adjacent dimension pairs: ``y = a_k x[0::2] + b_k x[1::2]``.

    Upstream parameterises each level as ``Conv1d(1, 4, kernel 2, stride 2, no bias)`` summed over its 4
    output channels. That is kept as is: folding the channels into 2 taps is the same function, but
    changes the init and the gradient scaling, and its different rounding is amplified by the text
    chain's small norms and the head's contribution weights (measured: 1e-5 on the scores).
    """

    def __init__(self, embed_size: int, kernel_size: int = 2, levels: int = NUM_LEVELS) -> None:
        super().__init__()
        self.dims = level_dims(embed_size, kernel_size, levels)
        self.kernel_size = kernel_size
        for k in range(1, levels):
            self.add_module(f"kernel_{k}", nn.Conv1d(1, 4, kernel_size, stride=kernel_size, bias=False))

    def unit(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Level k (un-normalised) from level k-1: the 4-channel convolution, summed over channels."""
        conv = getattr(self, f"kernel_{k}")
        y = F.conv1d(x.reshape(-1, 1, x.shape[-1]), conv.weight.to(x.dtype), stride=self.kernel_size)
        return y.sum(1).view(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor, normalized_chain: bool) -> torch.Tensor:
        return _chain(self, x, normalized_chain)


class AdaptiveLevels(nn.Module):
    """Levels from learned top-2 masks: ``y = x M^T``, ``M = top2_rows(l2n_rows(E_k))``.

    ``masks_k.weight`` (``d_k x d_{k-1}``, N(0, 1) as ``nn.Embedding``) is row-normalised **as a whole**,
    then every entry below the row's second-largest value is zeroed (ties keep more), so the gradient
    reaches every entry through the normalisation, as upstream.
    """

    def __init__(self, embed_size: int, kernel_size: int = 2, levels: int = NUM_LEVELS) -> None:
        super().__init__()
        self.dims = level_dims(embed_size, kernel_size, levels)
        for k in range(1, levels):
            self.add_module(f"masks_{k}", nn.Embedding(self.dims[k], self.dims[k - 1]))

    def mask(self, k: int) -> torch.Tensor:
        m = l2norm(getattr(self, f"masks_{k}").weight, dim=-1, eps=EPS)
        keep = min(2, m.shape[1])
        thr = m.detach().topk(keep, dim=1).values[:, keep - 1 : keep]
        return (m >= thr).to(m.dtype) * m

    def unit(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.mask(k).to(x.dtype).t()

    def forward(self, x: torch.Tensor, normalized_chain: bool) -> torch.Tensor:
        return _chain(self, x, normalized_chain)


def _chain(levels: HeuristicLevels | AdaptiveLevels, x: torch.Tensor, normalized_chain: bool) -> torch.Tensor:
    """``[lvl0 | lvl1 | ... | lvl8]`` where ``lvl_k = l2n(A_k(input_{k-1}))`` and ``lvl0 = x``.

    Image chain (`normalized_chain`): ``input_k = lvl_k``. Text chain: ``input_k = A_k(input_{k-1})``,
    un-normalised, as upstream (differs from the image chain only where the +1e-8 matters).
    """
    out, cur = [x], x
    for k in range(1, len(levels.dims)):
        y = levels.unit(k, cur)
        z = l2norm(y, dim=-1, eps=EPS)
        out.append(z)
        cur = z if normalized_chain else y
    return torch.cat(out, -1)


def contribution_weights(w: torch.Tensor, sigma: torch.Tensor, lam: torch.Tensor | float, squash: bool) -> torch.Tensor:
    """``w'_k = w_k exp(lambda (|w_k| - thr))``, ``thr = min|w| + (max|w| - min|w|) s`` (shape ``(1, levels)``).

    ``s = sigmoid(sigma)`` in the CLIP branch (`squash`), the raw ``sigma`` in the BERT branch.
    """
    aw = w.abs()
    s = torch.sigmoid(sigma) if squash else sigma
    thr = (aw.max() - aw.min()) * s + aw.min()
    return torch.exp((aw - thr) * lam) * w


class ESLHead(nn.Module):
    """The BERT branch's ``sims_claculator`` parameters: ``D_k = LayerNorm_[d_k, d_k](E_k) w'_k``.

    Names and shapes as upstream (``sim_eval`` (1, 9), ``temp_scale{,_1,_2}`` (1, 1), ``masks_k``,
    ``lynorm_k``); ``smooth = exp(temp_scale)`` is the attention temperature.
    """

    def __init__(self, embed_size: int, kernel_size: int = 2, heuristic: bool = False) -> None:
        super().__init__()
        self.dims = level_dims(embed_size, kernel_size)
        self.heuristic = heuristic
        self.sim_eval = nn.Linear(NUM_LEVELS, 1, bias=False)
        self.temp_scale = nn.Linear(1, 1, bias=False)
        self.temp_scale_1 = nn.Linear(1, 1, bias=False)
        self.temp_scale_2 = nn.Linear(1, 1, bias=False)
        for k, d in enumerate(self.dims):
            self.add_module(f"masks_{k}", nn.Embedding(d, d))
            self.add_module(f"lynorm_{k}", nn.LayerNorm([d, d], eps=1e-8, elementwise_affine=True))
        with torch.no_grad():
            self.temp_scale.weight.fill_(math.log(1 / 0.07))
            self.sim_eval.weight.fill_(0.1)
            self.temp_scale_1.weight.fill_(0)
            self.temp_scale_2.weight.fill_(3)

    def smooth(self) -> torch.Tensor:
        return torch.exp(self.temp_scale.weight)[0, 0]

    def matrices(self) -> list[torch.Tensor]:
        """``[D_0, ..., D_8]``."""
        # the adaptive build forces lambda = 0 (w' = w; temp_scale_1 then gets a zero gradient, _2 none)
        lam = torch.exp(self.temp_scale_2.weight) if self.heuristic else 0
        w = contribution_weights(self.sim_eval.weight, self.temp_scale_1.weight, lam, squash=False)
        return [getattr(self, f"lynorm_{k}")(getattr(self, f"masks_{k}").weight) * w[0, k]
                for k in range(len(self.dims))]

    def fold(self, levels: torch.Tensor) -> torch.Tensor:
        """``[..., 1022] -> [..., 1022]``: every level block times its ``D_k`` (the caption-side fold)."""
        parts = levels.split(self.dims, dim=-1)
        return torch.cat([p @ d.to(p.dtype) for p, d in zip(parts, self.matrices())], -1)


# --------------------------------------------------------------------------------------- batched scoring


def esl_cross_scores(words: torch.Tensor, word_mask: torch.Tensor, regions: torch.Tensor,
                     region_mask: torch.Tensor | None, smooth: torch.Tensor | float,
                     chunk_elems: int = 1 << 18) -> torch.Tensor:
    """ESL's cross-attention score of every (image, caption) pair: ``[n_images, n_captions]``.

    `words` ``[C, L, F]`` are the caption levels with ``D`` folded in (padded rows are ignored),
    `regions` ``[I, R, F]`` the image levels; `word_mask` ``[C, L]``, `region_mask` ``[I, R]`` (None: all
    real). For ``A = words_c regions_i^T`` (words x regions) and ``G = leaky_relu(tanh(A), 0.1)``:
    ``s_t2i = mean_w sum_r A softmax_r(smooth G / ||G||_words)`` and
    ``s_i2t = mean_r sum_w A softmax_w(smooth G / ||G||_regions)``; the score is their sum.
    Captions are sorted by length and scored in chunks of about `chunk_elems` ``A`` entries.
    """
    C, Ni, R = words.shape[0], regions.shape[0], regions.shape[1]
    word_mask = word_mask.bool()
    lengths = word_mask.sum(1)
    if C == 0 or Ni == 0:
        return regions.new_zeros(Ni, C, dtype=torch.promote_types(words.dtype, regions.dtype))
    if region_mask is not None and bool(region_mask.all()):
        region_mask = None
    order = torch.argsort(lengths.cpu(), stable=True).tolist()
    sorted_len = [max(1, n) for n in lengths.cpu()[order].tolist()]
    grad = torch.is_grad_enabled() and (words.requires_grad or regions.requires_grad
                                        or (isinstance(smooth, torch.Tensor) and smooth.requires_grad))
    fn = _pair_scores_grad if grad else _pair_scores_fast
    # square-ish chunks (images x captions) keep the product efficient and the chunk in cache
    ic = max(1, min(Ni, int(math.sqrt(chunk_elems / (sorted_len[-1] * R)))))
    idx: list[list[int]] = []  # caption chunks, each padded to its last (longest) caption
    widths: list[int] = []
    a = 0
    while a < C:
        b = a + 1
        while b < C and (b + 1 - a) * sorted_len[b] * R * ic <= chunk_elems:
            b += 1
        idx.append(order[a:b])
        widths.append(sorted_len[b - 1])
        a = b
    row_starts = range(0, Ni, ic)

    def block(work: tuple[int, int]) -> torch.Tensor:
        sel, width, i = idx[work[0]], widths[work[0]], work[1]
        return fn(words[sel, :width], word_mask[sel, :width], regions[i:i + ic],
                  None if region_mask is None else region_mask[i:i + ic], smooth)

    # evaluation on the CPU: the (caption chunk, image block) pieces on threads
    pieces = [(c, i) for c in range(len(idx)) for i in row_starts]
    done = map_blocks(block, pieces, 1 if grad else inference_threads(len(pieces), words.device))
    n_rows = len(row_starts)
    cols = [torch.cat(done[c * n_rows:(c + 1) * n_rows], 0) if n_rows > 1 else done[c * n_rows]
            for c in range(len(idx))]
    flat = [j for s in idx for j in s]
    scores = torch.cat(cols, 1)
    inv = torch.empty(C, dtype=torch.long)
    inv[torch.tensor(flat)] = torch.arange(C)
    return scores[:, inv.to(scores.device)]


def _attn(words: torch.Tensor, word_mask: torch.Tensor, regions: torch.Tensor,
          region_mask: torch.Tensor | None) -> torch.Tensor:
    """``A [C, L, I, R]``: every word of every caption against every region of every image (0 on padding)."""
    C, L, Fd = words.shape
    Ni, R, _ = regions.shape
    words = words * word_mask.unsqueeze(-1).to(words.dtype)
    if region_mask is not None:
        regions = regions * region_mask.unsqueeze(-1).to(regions.dtype)
    return (words.reshape(C * L, Fd) @ regions.reshape(Ni * R, Fd).t()).view(C, L, Ni, R)


def _pair_scores_grad(words, word_mask, regions, region_mask, smooth) -> torch.Tensor:
    """Differentiable form (training); plain softmaxes. Returns ``[I, C]``."""
    a = _attn(words, word_mask, regions, region_mask)
    g = F.leaky_relu(torch.tanh(a), 0.1)
    sq = g * g
    pad_w = ~word_mask.bool()[:, :, None, None]  # [C, L, 1, 1]
    # padding has G = 0 everywhere; +1 under its root keeps sqrt's gradient finite (its logits are -inf)
    # text -> image: normalise over the words of each region, softmax over regions
    n_w = sq.sum(1, keepdim=True)
    if region_mask is not None:
        pad_r = ~region_mask.bool()[None, None]  # [1, 1, I, R]
        n_w = n_w + pad_r.to(a.dtype)
    p = g / (n_w.sqrt() + EPS) * smooth
    if region_mask is not None:
        p = p.masked_fill(pad_r, float("-inf"))
    s_t2i = (a * torch.softmax(p, dim=3)).sum(3).sum(1) / word_mask.sum(1, keepdim=True).to(a.dtype)
    # image -> text: normalise over the regions of each word, softmax over words
    q = g / ((sq.sum(3, keepdim=True) + pad_w.to(a.dtype)).sqrt() + EPS) * smooth
    q = q.masked_fill(pad_w, float("-inf"))
    per_region = (a * torch.softmax(q, dim=1)).sum(1)  # [C, I, R]
    if region_mask is None:
        s_i2t = per_region.mean(2)
    else:
        rm = region_mask.to(a.dtype)[None]
        s_i2t = (per_region * rm).sum(2) / rm.sum(2)
    return (s_t2i + s_i2t).t()


@torch.no_grad()
def _pair_scores_fast(words, word_mask, regions, region_mask, smooth) -> torch.Tensor:
    """The same values without autograd: in-place, one buffer, softmax without max subtraction.

    ``|G / ||G||| <= 1``, so the softmax logits lie in ``[-smooth, smooth]`` and ``exp`` cannot overflow
    while ``smooth <= 80``; above that the exact (max-subtracting) softmax is used.
    """
    smooth = float(smooth)
    if smooth > 80.0:
        return _pair_scores_grad(words, word_mask, regions, region_mask, smooth)
    a = _attn(words, word_mask, regions, region_mask)
    g = torch.tanh(a)
    F.leaky_relu_(g, 0.1)
    buf = torch.mul(g, g)
    inv_w = buf.sum(1, keepdim=True).sqrt_().add_(EPS).reciprocal_().mul_(smooth)  # [C, 1, I, R]
    inv_r = buf.sum(3, keepdim=True).sqrt_().add_(EPS).reciprocal_().mul_(smooth)  # [C, L, I, 1]
    # text -> image
    torch.mul(g, inv_w, out=buf).exp_()
    if region_mask is not None:
        buf.mul_(region_mask.to(buf.dtype)[None, None])
    den = buf.sum(3)
    s_t2i = buf.mul_(a).sum(3).div_(den).sum(1)  # [C, I]
    s_t2i.div_(word_mask.sum(1, keepdim=True).to(a.dtype))
    # image -> text
    torch.mul(g, inv_r, out=buf).exp_()
    buf.mul_(word_mask.to(buf.dtype)[:, :, None, None])
    den = buf.sum(1)
    per_region = buf.mul_(a).sum(1).div_(den)  # [C, I, R]
    if region_mask is None:
        s_i2t = per_region.mean(2)
    else:
        rm = region_mask.to(a.dtype)[None]
        s_i2t = per_region.mul_(rm).sum(2).div_(rm.sum(2))
    return s_t2i.add_(s_i2t).t()


# ------------------------------------------------------------------------------------------- tokenizer


class ESLBertTokenizer(WordPieceTokenizer):
    """BERT basic + WordPiece tokens, ``[CLS] ... [SEP]``, no truncation; training adds word augmentation.

    Upstream ``process_caption``: each basic word, with probability `aug_prob`, has its pieces all
    replaced by ``[MASK]`` (50 %), each replaced by a uniformly drawn vocabulary entry (10 %: any entry,
    specials included, unless `no_special_random`), or deleted (40 %). ``lengths`` count every id, also a
    drawn ``[PAD]``, which the model keeps out of BERT's attention only (as upstream).
    Draws come from `rng` (a ``random.Random``) or Python's global ``random`` (seeded per DataLoader worker).
    """

    def __init__(self, hf_tokenizer: Any, aug_prob: float = 0.2, no_special_random: bool = False) -> None:
        super().__init__(hf_tokenizer, augment=aug_prob > 0, aug_prob=aug_prob, no_special_random=no_special_random)


# ----------------------------------------------------------------------------------------------- model


class ESLImageEncoder(RegionFeatureEncoder):
    """``l2n(fc(x) + mlp(x))`` per region (upstream ``EncoderImageAggr``, GPO unused).

    With `valid` (fixed mode), the MLP's BatchNorm takes its training statistics from real regions only.
    """

    def forward(self, regions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None or not self.training or bool(valid.all()):
            return l2norm(self.region_features(regions), dim=-1)
        mlp = self.mlp
        B, R, D = regions.shape
        flat = regions.reshape(B * R, D)
        keep = valid.reshape(-1)
        h = mlp.layers[0](flat)
        h = h.masked_scatter(keep[:, None], mlp.bns[0](h[keep]))  # BN over real regions only
        m = mlp.layers[1](F.relu(h)).view(B, R, -1)
        return l2norm(m + self.fc(regions), dim=-1)


class ESLTextBert(nn.Module):
    """BERT (last hidden layer) -> ``Linear(hidden, embed)`` (default init) -> l2n per token."""

    def __init__(self, config: ESLConfig) -> None:
        super().__init__()
        self.bert = build_hf_text_model(config.bert_arch, config.bert_config)
        self.linear = nn.Linear(self.bert.config.hidden_size, config.embed_size)
        pad = self.bert.config.pad_token_id
        self.pad_token_id = 0 if pad is None else int(pad)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # upstream attends to every non-[PAD] id (a drawn [PAD] inside a caption too)
        attention_mask = (input_ids != self.pad_token_id).to(torch.float32)
        hid = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        return l2norm(self.linear(hid), dim=-1)


def _levels_class(strategy: str) -> type[nn.Module]:
    return HeuristicLevels if strategy == "heuristic" else AdaptiveLevels


class ESL(ITMModel):
    """ESL, BERT branch: BUTD regions + BERT tokens, measure-unit levels, cross-attention head.

    Children: ``img_enc`` (``fc``, ``mlp``), ``txt_enc`` (``bert``, ``linear``), ``img_levels`` /
    ``txt_levels`` (``kernel_k`` or ``masks_k``), ``head`` (`ESLHead`). Features: images
    ``{"tokens": [N, R, 1022] levels, "mask"}``; captions ``{"tokens": [N, L, 1022] levels x D, "mask"}``.
    """

    input_kind = "regions"
    scoring = "cross"
    # never used upstream, kept so the released files load strictly: the image MLP's last BatchNorm,
    # BERT's pooler, and the adaptive head's second temperature
    unused_parameters = ("img_enc.mlp.bns.1.*", "txt_enc.bert.pooler.*", "head.temp_scale_2.*")
    # the hinge's hardest negatives come from the whole batch: split at the per-item levels
    accumulation = "exact"

    def __init__(self, config: ESLConfig) -> None:
        super().__init__(config)
        c = config
        self.img_enc = ESLImageEncoder(c.img_dim, c.embed_size, use_mlp=True)
        self.txt_enc = ESLTextBert(c)
        levels = _levels_class(c.strategy)
        self.img_levels = levels(c.embed_size, c.kernel_size)
        self.txt_levels = levels(c.embed_size, c.kernel_size)
        self.head = ESLHead(c.embed_size, c.kernel_size, heuristic=c.strategy == "heuristic")
        self._tokenizer: ESLBertTokenizer | None = None

    # -- data plumbing ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> ESLBertTokenizer:
        if self._tokenizer is None:
            c = self.config
            self._tokenizer = ESLBertTokenizer(load_hf_tokenizer(c.tokenizer), c.word_aug_prob,
                                               c.random_token_no_specials)
        return self._tokenizer

    def set_tokenizer(self, tokenizer: ESLBertTokenizer) -> None:
        """Use a ready tokenizer instead of loading `config.tokenizer`."""
        self._tokenizer = tokenizer

    def image_transform_for(self, train: bool) -> RegionTransform:
        # upstream drops regions in the dataset (keep when rand > 0.2), and the batch is zero-padded
        return RegionTransform(train=train, drop_prob=self.config.region_drop_prob)

    # -- encoding ---------------------------------------------------------------------------------
    def _region_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # faithful: every row of the (padded) batch is a region
        return region_mask(batch["regions"], batch.get("region_lengths") if self.config.mask_padded_regions else None)

    def image_levels(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"tokens": [B, R, 1022], "mask": [B, R]}``: region embeddings and their levels."""
        regions = batch["regions"]
        if regions.dim() != 3 or regions.shape[-1] != self.config.img_dim:
            raise ValueError(f"esl: expected regions [B, R, {self.config.img_dim}], got {tuple(regions.shape)}")
        mask = self._region_mask(batch)
        emb = self.img_enc(regions, mask if self.config.mask_padded_regions else None)
        return {"tokens": self.img_levels(emb, normalized_chain=True), "mask": mask}

    def text_levels(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"tokens": [B, L, 1022], "mask": [B, L]}``: token embeddings and their levels (0 on padding)."""
        ids, lengths = batch["input_ids"], batch["lengths"].to(batch["input_ids"].device)
        emb = self.txt_enc(ids)
        mask = sequence_mask(lengths, ids.shape[1])
        lv = self.txt_levels(emb, normalized_chain=self.config.normalize_text_chain)
        return {"tokens": lv * mask.unsqueeze(-1).to(lv.dtype), "mask": mask}

    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.image_levels(batch)

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Caption levels with the head's ``D`` folded in (computed once per caption, not per pair)."""
        lv = self.text_levels(batch)
        return {"tokens": self.head.fold(lv["tokens"]), "mask": lv["mask"]}

    def _chunk(self, device: torch.device) -> int:
        return self.config.sim_chunk_elems_cuda if device.type == "cuda" else self.config.sim_chunk_elems

    def similarity(self, image_feats: Mapping[str, torch.Tensor],
                   text_feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        img, txt = image_feats["tokens"], text_feats["tokens"]
        smooth = self.head.smooth()
        if not torch.is_grad_enabled():
            smooth = smooth.item()
        return esl_cross_scores(txt, text_feats["mask"], img, image_feats["mask"], smooth, self._chunk(img.device))

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(block=tuple(self.config.eval_block))

    # -- training ---------------------------------------------------------------------------------
    def train_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Per-item levels (the head's ``D`` is applied in `train_loss`, where its gradient is taken)."""
        return {"image": self.image_levels(batch), "text": self.text_levels(batch)}

    def use_max_violation(self) -> bool:
        return self.config.max_violation or self.epoch >= self.config.vse_mean_warmup_epochs

    def train_loss(self, feats: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Summed VSE++ hinge over the global batch (all negatives in the warm-up epoch, then the hardest).

        Under DDP every rank scores all images of the global batch against its own captions; the score
        columns are then gathered (as LHSC). Outside a process group both gathers are the identity.
        """
        from ..distributed import all_gather_with_grad, gather_features

        images = gather_features(dict(feats["image"]))
        text = feats["text"]
        words = self.head.fold(text["tokens"])
        cols = esl_cross_scores(words, text["mask"], images["tokens"], images["mask"], self.head.smooth(),
                                self._chunk(words.device))
        scores = all_gather_with_grad(cols.t().contiguous()).t()
        pos = None
        if self.config.same_image_positives and "image_index" in batch:
            idx = gather_features(batch["image_index"])
            pos = positive_mask(scores.shape[0], idx, scores.device)
        loss = hinge_triplet_loss(scores, self.config.margin, self.use_max_violation(), pos_mask=pos)
        return {"loss": loss}

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Upstream's AdamW groups: text head, BERT (lr x `bert_lr_mult`), image encoder, similarity module."""
        bert = [p for p in self.txt_enc.bert.parameters() if p.requires_grad]
        head = [p for p in self.txt_enc.linear.parameters() if p.requires_grad]
        img = [p for p in self.img_enc.parameters() if p.requires_grad]
        sim = [p for m in (self.img_levels, self.txt_levels, self.head) for p in m.parameters() if p.requires_grad]
        return [{"params": head, "lr": base_lr, "name": "text_head"},
                {"params": bert, "lr": base_lr * self.config.bert_lr_mult, "name": "bert"},
                {"params": img, "lr": base_lr, "name": "image"},
                {"params": sim, "lr": base_lr, "name": "sim_vec"}]

    def init_pretrained(self) -> None:
        """Load BERT's pretrained weights when `config.pretrained` names them."""
        if self.config.pretrained:
            load_pretrained_weights(self.txt_enc.bert, self.config.pretrained)


# ------------------------------------------------------------------------------------------ CLIP branch


def _clip_config_default():
    from ..encoders.clip import CLIPConfig

    return CLIPConfig()


@dataclasses.dataclass
class ESLCLIPConfig(ModelConfig):
    """ESL, CLIP branch (defaults: ``kkzhang95/ESL @ 7edd3da``, ``config/all_config.py`` + scripts; heuristic)."""

    strategy: Strategy = "heuristic"  # upstream's module flag (CLIP default: heuristic)
    clip: Any = dataclasses.field(default_factory=_clip_config_default)  # itmzoo.encoders.clip.CLIPConfig
    pretrained: str | None = None  # OpenAI ViT-B-16.pt, an open_clip/timm file or an HF folder; None: random
    kernel_size: int = 2
    clip_lr_mult: float = 1e-6 / 3e-5  # CLIP at 1e-6, the ESL head at the base lr 3e-5 (upstream groups)
    logit_scale_max: float = math.log(100)  # CLIP's temperature is clamped after every step
    caption_strip: str = ""  # characters stripped from both ends of a caption (upstream F30K: ".")
    image_size: int = 224
    # -- fixed mode (False/"cut" = upstream) --
    truncate: Literal["cut", "eot"] = "cut"  # captions over 77 tokens: cut (EOT lost) or end with EOT
    normalize_text_chain: bool = False
    eval_block: tuple[int, int] = (4096, 16384)  # (images, captions) per similarity() call: one product

    def validate(self) -> None:
        from ..encoders.clip import CLIPConfig

        if self.strategy not in ("heuristic", "adaptive"):
            raise ConfigError(f"esl_clip: strategy must be 'heuristic' or 'adaptive', got {self.strategy!r}")
        if isinstance(self.clip, Mapping):
            self.clip = CLIPConfig.from_dict(self.clip)
        if not isinstance(self.clip, CLIPConfig):
            raise ConfigError("esl_clip: clip must be a CLIPConfig or a dict of its fields, "
                              f"got {type(self.clip).__name__}")
        self.clip.validate()
        if self.clip.vision_output != "cls_proj" or self.clip.text_tower != "full":
            raise ConfigError("esl_clip needs CLIP's projected CLS and EOT vectors (vision_output='cls_proj', "
                              "text_tower='full')")
        e = self.clip.embed_dim
        if self.kernel_size < 2 or e % self.kernel_size ** (NUM_LEVELS - 1):
            raise ConfigError(f"esl_clip: clip.embed_dim ({e}) must be divisible by kernel_size**8 for the 9 levels")
        if self.truncate not in ("cut", "eot"):
            raise ConfigError(f"esl_clip: truncate must be 'cut' or 'eot', got {self.truncate!r}")
        if self.clip_lr_mult < 0:
            raise ConfigError(f"esl_clip: clip_lr_mult must be >= 0, got {self.clip_lr_mult}")


class ESLCLIPHead(nn.Module):
    """The CLIP branch's ``sims_claculator``: ``D_k = M_k w'_k`` (``masks_k = Linear(d_k, d_k)``, identity init).

    ``w' = w exp(lambda (|w| - thr))`` with ``thr`` at ``sigmoid(temp_scale_1)`` between min and max ``|w|``
    and ``lambda = exp(temp_scale_2)``, in both builds; ``temp_scale`` exists upstream but is unused.
    """

    def __init__(self, embed_dim: int = 512, kernel_size: int = 2) -> None:
        super().__init__()
        self.dims = level_dims(embed_dim, kernel_size)
        self.sim_eval = nn.Linear(NUM_LEVELS, 1, bias=False)
        self.temp_scale = nn.Linear(1, 1, bias=False)  # unused upstream; kept so checkpoints load strictly
        self.temp_scale_1 = nn.Linear(1, 1, bias=False)
        self.temp_scale_2 = nn.Linear(1, 1, bias=False)
        for k, d in enumerate(self.dims):
            self.add_module(f"masks_{k}", nn.Linear(d, d, bias=False))
        with torch.no_grad():
            self.temp_scale.weight.fill_(math.log(1 / 0.07))
            self.sim_eval.weight.fill_(0.1)
            self.temp_scale_1.weight.fill_(-1)
            self.temp_scale_2.weight.fill_(4)
            for k in range(len(self.dims)):
                nn.init.eye_(getattr(self, f"masks_{k}").weight)

    def matrices(self) -> list[torch.Tensor]:
        w = contribution_weights(self.sim_eval.weight, self.temp_scale_1.weight, torch.exp(self.temp_scale_2.weight),
                                 squash=True)
        return [getattr(self, f"masks_{k}").weight * w[0, k] for k in range(len(self.dims))]

    def fold(self, image_levels: torch.Tensor) -> torch.Tensor:
        """``(1/9) [x_k D_k]_k``: the image side of the bilinear score, so that ``score = e_img . y``."""
        parts = image_levels.split(self.dims, dim=-1)
        return torch.cat([p @ d.to(p.dtype) for p, d in zip(parts, self.matrices())], -1) / NUM_LEVELS


class ESLCLIPTokenizer:
    """CLIP BPE, 77 tokens; ``truncate="cut"`` keeps the first 77 (EOT lost), as ESL's ``SimpleTokenizer``."""

    def __init__(self, truncate: str = "cut", strip: str = "") -> None:
        from ..data.tokenizers import CLIPTokenizer

        self.bpe = CLIPTokenizer(truncate=truncate, pad_to_context=True)
        self.strip = strip

    def __call__(self, captions: Sequence[str], train: bool = False) -> dict[str, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        if self.strip:
            captions = [c.strip(self.strip) for c in captions]
        return self.bpe(list(captions), train=train)


class ESLCLIP(ITMModel):
    """ESL, CLIP branch: CLIP ViT image and text vectors, measure-unit levels, bilinear head, InfoNCE.

    Children: ``clip`` (OpenAI names), ``img_levels`` / ``txt_levels``, ``head`` (`ESLCLIPHead`). The score is
    a dot product: `encode_image` returns the image levels with the head folded in (``[N, 1022]``),
    `encode_text` the caption levels, so evaluation encodes every item once and scores with one product.
    """

    input_kind = "pixels"
    scoring = "embedding"
    accumulation = "exact"
    unused_parameters = ("head.temp_scale.*",)  # created but never used upstream (strict loading)

    def __init__(self, config: ESLCLIPConfig) -> None:
        from ..encoders.clip import CLIP

        super().__init__(config)
        self.clip = CLIP(config.clip)
        levels = _levels_class(config.strategy)
        e = config.clip.embed_dim
        self.img_levels = levels(e, config.kernel_size)
        self.txt_levels = levels(e, config.kernel_size)
        self.head = ESLCLIPHead(e, config.kernel_size)
        self._tokenizer: ESLCLIPTokenizer | None = None

    @property
    def tokenizer(self) -> ESLCLIPTokenizer:
        if self._tokenizer is None:
            self._tokenizer = ESLCLIPTokenizer(self.config.truncate, self.config.caption_strip)
        return self._tokenizer

    def image_transform_for(self, train: bool):
        from ..data.transforms import image_transform

        # upstream trains on the evaluation transform (no augmentation)
        return image_transform("clip", self.config.image_size, train=train)

    def image_levels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.clip.encode_image(batch["pixels"])
        x = x / x.norm(dim=1, keepdim=True)  # upstream: plain division, no eps
        return self.img_levels(x, normalized_chain=True)

    def text_levels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        y = self.clip.encode_text(batch["input_ids"])
        y = y / y.norm(dim=1, keepdim=True)
        return self.txt_levels(y, normalized_chain=self.config.normalize_text_chain)

    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head.fold(self.image_levels(batch))

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.text_levels(batch)

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(block=tuple(self.config.eval_block))

    def train_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": self.image_levels(batch), "text": self.text_levels(batch)}

    def train_loss(self, feats: Mapping[str, torch.Tensor],
                   batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE on ``sims x exp(logit_scale)`` over the (global) batch; duplicates are negatives."""
        from ..distributed import gather_features

        f = gather_features(dict(feats))
        return {"loss": contrastive_loss(self.head.fold(f["image"]), f["text"], self.clip.logit_scale.exp())}

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(max=self.config.logit_scale_max)

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """``clip.*`` at lr x `clip_lr_mult` (upstream 1e-6), the ESL head at lr (upstream 3e-5)."""
        clip = [p for p in self.clip.parameters() if p.requires_grad]
        head = [p for m in (self.img_levels, self.txt_levels, self.head) for p in m.parameters() if p.requires_grad]
        return [{"params": clip, "lr": base_lr * self.config.clip_lr_mult, "name": "clip"},
                {"params": head, "lr": base_lr, "name": "esl_head"}]

    def init_pretrained(self) -> None:
        if self.config.pretrained:
            from ..encoders.clip import load_clip_pretrained

            load_clip_pretrained(self.clip, self.config.pretrained)


# ------------------------------------------------------------------------------------ official checkpoints

_LEVEL_PREFIX = "plus_encoder.encoders_1."
_HEAD_PREFIX = "sims.calculator_1."
# present in the authors' files but never used (the MLP's last BatchNorm, BERT's pooler)
IGNORED_OFFICIAL = ("img_enc.mlp.bns.1.*", "txt_enc.bert.pooler.*", "txt_enc.bert.embeddings.position_ids")


def strategy_from_keys(keys: Sequence[str]) -> str:
    """'heuristic' (``kernel_img_k``) or 'adaptive' (``image_levels.masks_k``) from a head's keys."""
    heur = any(re.search(r"kernel_(img|txt)_\d+\.weight$", k) for k in keys)
    adap = any(re.search(r"(image|text)_levels\.masks_\d+\.weight$", k) for k in keys)
    if heur == adap:
        raise CheckpointError("cannot tell the ESL strategy from the checkpoint: expected either "
                              "'...kernel_img_k.weight' (heuristic) or '...image_levels.masks_k.weight' (adaptive) keys"
                              + (", found both" if heur else ", found neither"))
    return "heuristic" if heur else "adaptive"


def _map_sim_key(k: str) -> str:
    if k.startswith(_LEVEL_PREFIX):
        rest = k[len(_LEVEL_PREFIX):]
        m = re.fullmatch(r"(image|text)_levels\.(?:kernel_(?:img|txt)_(\d+)|masks_(\d+))\.weight", rest)
        if m is None:
            raise CheckpointError(f"unexpected ESL aggregator key {k!r}")
        side = "img_levels" if m.group(1) == "image" else "txt_levels"
        return f"{side}.kernel_{m.group(2)}.weight" if m.group(2) else f"{side}.masks_{m.group(3)}.weight"
    if k.startswith(_HEAD_PREFIX):
        return "head." + k[len(_HEAD_PREFIX):]
    raise CheckpointError(f"unexpected ESL similarity-module key {k!r}")


def convert_official(obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """The BERT branch's ``model_best.pth`` / ``checkpoint_*.pth.tar`` -> ``(overrides, state, ignorable)``.

    The file is ``{'model': [img_enc, txt_enc, sim_vec] state dicts ('module.' prefixed), 'opt':
    Namespace, ...}``. The strategy is not saved upstream; it is read from the aggregator keys, and the
    sizes from the tensors (``img_dim``, ``embed_size``). Known never-used keys are ignorable.
    """
    parts, opt = obj, None
    if isinstance(obj, Mapping):
        if "model" not in obj:
            raise CheckpointError(f"not an ESL checkpoint: expected a dict with 'model' (a list [img_enc, txt_enc, "
                                  f"sim_vec]), got keys {sorted(map(str, obj))[:8]}")
        parts, opt = obj["model"], obj.get("opt")
    if not (isinstance(parts, (list, tuple)) and len(parts) == 3 and all(isinstance(p, Mapping) for p in parts)):
        raise CheckpointError("not an ESL checkpoint: 'model' must be the list [img_enc, txt_enc, sim_vec] of state "
                              f"dicts, got {type(parts).__name__}"
                              + (f" of length {len(parts)}" if isinstance(parts, (list, tuple)) else ""))
    img, txt, sim = (strip_prefixes(p) for p in parts)
    for name, part in (("img_enc", img), ("txt_enc", txt), ("sim_vec", sim)):
        bad = [k for k, v in part.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"ESL checkpoint: {name} holds non-tensor entries {bad[:5]}")
    if "fc.weight" not in img or not any(k.startswith("bert.") for k in txt):
        raise CheckpointError("not an ESL (BERT branch) checkpoint: expected img_enc 'fc.weight' "
                              "and txt_enc 'bert.*' keys")
    strategy = strategy_from_keys(list(sim))
    embed_size, img_dim = (int(x) for x in img["fc.weight"].shape)
    overrides: dict[str, Any] = {"strategy": strategy, "img_dim": img_dim, "embed_size": embed_size}
    if opt is not None and getattr(opt, "kernel_size", 2) != 2:
        overrides["kernel_size"] = int(opt.kernel_size)
    state = {f"img_enc.{k}": v for k, v in img.items()}
    state.update({f"txt_enc.{k}": v for k, v in txt.items()})
    state.update({_map_sim_key(k): v for k, v in sim.items()})
    return overrides, state, list(IGNORED_OFFICIAL)


class _PickledConfig:
    """Stand-in for the CLIP branch's pickled ``AllConfig`` / ``Config``: attributes only, no code runs."""


def convert_official_clip(obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """The CLIP branch's ``model_best.pth`` -> ``(overrides, state, ignorable)``.

    The file is ``{'epoch', 'state_dict': {'clip.*', 'pool_frames.cross_attn.*'}, 'optimizer', 'config':
    AllConfig}`` (the optimizer state is ignored); a bare state dict works too. The strategy is read from the
    aggregator keys; CLIP's architecture must be the configured one (ViT-B/16 by default).
    """
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    # strip `module.` (DataParallel) before looking for the 'clip.*' keys
    state = strip_prefixes(state) if isinstance(state, Mapping) else None
    if state is None or not any(str(k).startswith("clip.") for k in state):
        raise CheckpointError("not an ESL-CLIP checkpoint: expected a dict with 'state_dict' holding 'clip.*' and "
                              "'pool_frames.cross_attn.*' keys")
    head_prefix = "pool_frames.cross_attn."
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"ESL-CLIP checkpoint: {k} is a {type(v).__name__}, not a tensor")
        if k.startswith("clip."):
            out[k] = v
        elif k.startswith(head_prefix):
            out[_map_sim_key(k[len(head_prefix):])] = v
        else:
            raise CheckpointError(f"unexpected ESL-CLIP key {k!r}")
    strategy = strategy_from_keys([k for k in state if k.startswith(head_prefix)])
    overrides: dict[str, Any] = {"strategy": strategy}
    cfg = obj.get("config") if isinstance(obj, Mapping) else None
    if cfg is not None and getattr(cfg, "embed_dim", 512) != 512:
        raise CheckpointError(f"ESL-CLIP checkpoint: config.embed_dim={cfg.embed_dim}; only 512 is supported")
    return overrides, out, []


# the CLIP branch pickles its config objects: read as plain attribute holders, none of their code runs
CLIP_CHECKPOINT_GLOBALS = ((_PickledConfig, "config.all_config.AllConfig"),
                           (_PickledConfig, "config.base_config.Config"))


# -------------------------------------------------------------------------------------------- tags + names

_DRIVE = "Google Drive file linked from the README of " + UPSTREAM
_PRE = {"regions": "BUTD 36 x 2048 (SCAN precomp)", "tokenizer": "bert-base-uncased basic + WordPiece, no truncation"}


TAGS: dict[str, Tag] = {
    "coco_heuristic": Tag(
        overrides={"strategy": "heuristic"}, dataset="coco", license="unspecified",
        source=f"{_DRIVE}: 1NgTLNFGhEt14YgLb3gCkWfBp1gBxvl9w (ESL-H, COCO)",
        expected={**expected_recalls("coco-1k-5fold", (82.5, 97.4, 99.0, 66.2, 91.9, 96.7, 533.5)),
                  **expected_recalls("coco-5k", (63.6, 87.4, 93.5, 44.2, 74.1, 84.0, 446.9))},
        preprocessing=_PRE, note="expected = README table (rsum tolerance +-0.3: fold means of rounded recalls)"),
    "coco_adaptive": Tag(
        overrides={"strategy": "adaptive"}, dataset="coco", license="unspecified",
        source=f"{_DRIVE}: 17jaJm2DSJbF5IuUij9s3c2fupcy4CW8T (ESL-A, COCO)",
        expected={**expected_recalls("coco-1k-5fold", (82.2, 96.9, 98.9, 66.5, 92.1, 96.7, 533.4)),
                  **expected_recalls("coco-5k", (63.0, 87.6, 93.3, 44.5, 74.4, 84.1, 447.0))},
        preprocessing=_PRE, note="expected = README table (rsum tolerance +-0.3)"),
    "f30k_heuristic": Tag(
        overrides={"strategy": "heuristic"}, dataset="f30k", license="unspecified",
        source=f"{_DRIVE}: 17FnwyH8aSOwvUuZco0lQ5eY0TM_4LXxv (ESL-H, Flickr30K)",
        expected=expected_recalls("f30k-1k", (83.5, 96.3, 98.4, 65.1, 87.6, 92.7, 523.7)),
        preprocessing=_PRE, note="expected = README table (rsum tolerance +-0.3)"),
    "f30k_adaptive": Tag(
        overrides={"strategy": "adaptive"}, dataset="f30k", license="unspecified",
        source=f"{_DRIVE}: 1ZoPW8azNkBWVq1jaQxHfI_XpINzvmv1n (ESL-A, Flickr30K)",
        expected=expected_recalls("f30k-1k", (84.3, 96.3, 98.0, 64.1, 87.4, 92.2, 522.4)),
        preprocessing=_PRE, note="expected = README table (rsum tolerance +-0.3)"),
    "heuristic": Tag(overrides={"strategy": "heuristic"}, note="ESL-H architecture, random weights"),
    "adaptive": Tag(overrides={"strategy": "adaptive"}, note="ESL-A architecture, random weights"),
}

_TINY_BERT = {"vocab_size": 120, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "max_position_embeddings": 64}

_TINY_CLIP = {"embed_dim": 256, "image_size": 32, "patch_size": 16, "vision_width": 32, "vision_layers": 1,
              "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2}

#: registry name -> config overrides of a tiny model with random weights (no files needed)
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "esl": {"img_dim": 16, "embed_size": 256, "bert_config": _TINY_BERT},
    "esl_clip": {"clip": _TINY_CLIP, "image_size": 32},
}

_CLIP_NOTE = ("the README gives no numbers and the F30K weights were lost; COCO files: "
              "Google Drive ids from the README of " + UPSTREAM_CLIP)
TAGS_CLIP: dict[str, Tag] = {
    "coco_heuristic": Tag(overrides={"strategy": "heuristic"}, dataset="coco", license="unspecified",
                          source="model_best_heuristic_coco_clip_based.pth: 1Wk-dzIx04v9NXZJk4oFWVzaEPiRrsfeT",
                          preprocessing={"image": "Resize 224 bicubic, CenterCrop 224, CLIP mean/std",
                                         "text": "CLIP BPE, first 77 tokens, raw.lower()"}, note=_CLIP_NOTE),
    "coco_adaptive": Tag(overrides={"strategy": "adaptive"}, dataset="coco", license="unspecified",
                         source="model_best_adaptive_coco_clip_based.pth: 1gPM-9xppPh-RPMLm6GLJ8IUKO7GUFP5n",
                         preprocessing={"image": "Resize 224 bicubic, CenterCrop 224, CLIP mean/std",
                                        "text": "CLIP BPE, first 77 tokens, raw.lower()"}, note=_CLIP_NOTE),
    "f30k_heuristic": Tag(overrides={"strategy": "heuristic", "caption_strip": "."}, dataset="f30k",
                          note="recipe only (no released weights); captions raw.strip('.').lower()"),
    "f30k_adaptive": Tag(overrides={"strategy": "adaptive", "caption_strip": "."}, dataset="f30k",
                         note="recipe only (no released weights); captions raw.strip('.').lower()"),
}


_PAPER = "ESL: Enhanced Semantic Similarity Learning Framework for Image-Text Matching (TCSVT 2023)"


@register_model("esl", config=ESLConfig, input_kind="regions", scoring="cross", paper=_PAPER, upstream=UPSTREAM,
                text_backbone="bert-base-uncased", image_backbone="butd-regions", tags=TAGS,
                converter=convert_official, tiny=TINY_OVERRIDES["esl"])
def esl(config: ESLConfig) -> ESL:
    """ESL (BERT branch): BUTD regions + BERT-base, cross-attention over measure-unit levels."""
    return ESL(config)


@register_model("esl_clip", config=ESLCLIPConfig, input_kind="pixels", scoring="embedding",
                paper=_PAPER + ", CLIP branch", upstream=UPSTREAM_CLIP, text_backbone="clip-text",
                image_backbone="clip-vit-b16", tags=TAGS_CLIP, converter=convert_official_clip,
                checkpoint_globals=CLIP_CHECKPOINT_GLOBALS, tiny=TINY_OVERRIDES["esl_clip"])
def esl_clip(config: ESLCLIPConfig) -> ESLCLIP:
    """ESL (CLIP branch): CLIP ViT-B/16 image and text vectors, measure-unit levels, bilinear head."""
    return ESLCLIP(config)
