"""LHSC: Learning Hierarchical Semantic Correspondences (Zeng et al., ICMR 2022), built on SGRAF's SAF.

Reimplements the authors' release ``lDarryll/LHSC @ 1aa2753b88c99eb7900c12402f4087bc5c709bd7``
with the same module and parameter names, so an official checkpoint's three
state dicts load with a plain prefix map (``img_enc.``, ``txt_enc.``, ``sim_enc.``).

* image: ``fc`` -> 4 residual region-relation GCN blocks (``IM_GCN_k``) -> l2norm, regions ``[B, 36, D]``;
* text: embedding -> dropout -> 4 word-affinity blocks (``W_attk``) -> BiGRU (directions averaged) -> l2norm;
* score: SCAN text-to-image attention (λ = 9), squared-difference similarity vectors (local per word,
  global from VisualSA/TextSA vectors), SAF attention filtration, ``sigmoid(Linear(256 -> 1))``;
* loss: VSE++ hinge with hardest negatives, summed, diagonal positives.

Text padding: the upstream word-affinity blocks have no padding mask and divide by the padded
length, so a caption's features depend on how far its batch is padded. ``text_padding="batch"`` keeps
that (default; reproduces official numbers when captions are encoded in consecutive blocks of
``eval_text_batch_size`` = 100, as upstream's test loader does); ``"masked"`` makes every caption's
features independent of padding (identical to encoding it alone).

Scoring is cross-interaction: ``similarity`` computes every (image, caption) pair of the given blocks at
once, over the packed real words (no Python loop over images or captions; an inner loop over tiles of
``sim_tile_rows`` image-word rows bounds the memory of the ``[rows, D]`` intermediate).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..checkpoints.safe import CheckpointError
from ..config import ConfigError, ModelConfig
from ..data.synthetic import SYNTHETIC_VOCAB
from ..data.transforms import RegionTransform
from ..data.vocab import SCAN_VOCAB_SHA256, Vocab, load_scan_vocab
from ..encoders.regions import xavier_linear_
from ..features import sequence_mask
from ..layers.cross_attention import context_scale, region_gram, t2i_attention_packed
from ..layers.graph import RegionRelationGCN, WordRelationAttention
from ..losses import hinge_triplet_loss, l2norm, positive_mask
from ..registry import Tag, register_model
from ..threads import inference_threads, map_blocks
from .base import EvalSettings, ITMModel

__all__ = ["LHSC", "TAGS", "LHSCConfig", "convert_official", "lhsc"]

UPSTREAM = "lDarryll/LHSC @ 1aa2753b88c99eb7900c12402f4087bc5c709bd7"


@dataclasses.dataclass
class LHSCConfig(ModelConfig):
    """Architecture and training-loss settings (defaults: the release's ``opts.py``)."""

    vocab_size: int = 8481                 # f30k SCAN vocab; coco: 11353
    vocab_path: str | None = None          # SCAN vocab json used by the tokenizer
    vocab_sha256: str | None = None        # checksum of its id table (`Vocab.sha256`), checked when given
    img_dim: int = 2048
    word_dim: int = 300
    embed_size: int = 1024
    sim_dim: int = 256
    num_regions: int = 36                  # VisualSA's BatchNorm1d(36) fixes the region count
    gcn_layers: int = 4
    text_attn_layers: int = 4
    num_layers: int = 1                    # GRU layers
    bi_gru: bool = True
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    embed_dropout: float = 0.4             # on word embeddings
    text_attn_dropout: float = 0.0         # inside the word-affinity blocks (opts.drop_out)
    sa_dropout: float = 0.4                # inside VisualSA / TextSA
    smooth: float = 9.0                    # λ of the text-to-image softmax
    margin: float = 0.2
    max_violation: bool = True
    vse_mean_warmup_epochs: int = 0        # epochs summing all negatives before the hardest one (upstream: 0)
    same_image_positives: bool = False     # upstream: only the diagonal is positive
    text_padding: Literal["batch", "masked"] = "batch"
    eval_text_batch_size: int = 100        # caption block size of the reference evaluation (P2)
    sim_group_tokens: int = 256            # words of one caption group per scoring step (CPU)
    sim_group_tokens_cuda: int = 4096      # same on CUDA
    sim_group_tokens_train: int = 64       # same when autograd records (training step, CPU): smaller
                                           # saved intermediates are reused by the allocator, not re-mapped
    sim_tile_rows: int = 1024              # image x word rows of the [rows, embed] intermediate per CPU thread
    sim_tile_rows_cuda: int = 262144       # same on CUDA, where big tiles keep the GPU busy
    lowp_attention_scores: bool = False    # under autocast, also the region-word scores in bf16/fp16

    def validate(self) -> None:
        for f in ("vocab_size", "img_dim", "word_dim", "embed_size", "sim_dim", "num_regions", "num_layers",
                  "eval_text_batch_size", "sim_group_tokens", "sim_group_tokens_cuda", "sim_group_tokens_train",
                  "sim_tile_rows", "sim_tile_rows_cuda"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"lhsc: {f} must be positive, got {getattr(self, f)}")
        for f in ("gcn_layers", "text_attn_layers", "vse_mean_warmup_epochs"):
            if getattr(self, f) < 0:
                raise ConfigError(f"lhsc: {f} must be >= 0, got {getattr(self, f)}")
        if self.embed_size % 4:
            raise ConfigError(f"lhsc: embed_size must be divisible by 4 (GCN θ/φ split), got {self.embed_size}")
        for f in ("embed_dropout", "text_attn_dropout", "sa_dropout"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"lhsc: {f} must be in [0, 1), got {getattr(self, f)}")



# ---------------------------------------------------------------------------------------------------
# encoders


class EncoderImage(nn.Module):
    """``fc`` (Xavier) -> ``IM_GCN_1..k`` -> l2norm, on ``[B, R, img_dim]`` region features."""

    def __init__(self, img_dim: int, embed_size: int, gcn_layers: int = 4, no_imgnorm: bool = False) -> None:
        super().__init__()
        self.no_imgnorm = no_imgnorm
        self.gcn_layers = gcn_layers
        self.fc = nn.Linear(img_dim, embed_size)
        xavier_linear_(self.fc)
        for k in range(1, gcn_layers + 1):
            self.add_module(f"IM_GCN_{k}", RegionRelationGCN(embed_size, embed_size))

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        x = self.fc(regions)
        for k in range(1, self.gcn_layers + 1):
            x = getattr(self, f"IM_GCN_{k}")(x)
        return x if self.no_imgnorm else l2norm(x, dim=-1)


class EncoderText(nn.Module):
    """``embed`` -> dropout -> ``W_att1..k`` word-affinity blocks -> ``cap_rnn`` (Bi)GRU -> l2norm."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 attn_dropout: float = 0.0, embed_dropout: float = 0.4, attn_layers: int = 4,
                 bi_gru: bool = True, no_txtnorm: bool = False) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.use_bi_gru = bi_gru
        self.attn_layers = attn_layers
        # no padding_idx: the <pad> row is an ordinary trained vector that the unmasked blocks read
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        for k in range(1, attn_layers + 1):
            self.add_module(f"W_att{k}", WordRelationAttention(word_dim, attn_dropout))
        self.dropout = nn.Dropout(embed_dropout)
        self.cap_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, masked: bool = False) -> torch.Tensor:
        """``[B, T]`` ids (T = padded width) -> ``[B, max(lengths), embed]``, zero past each length."""
        lengths = lengths.clamp(min=1)
        x = self.dropout(self.embed(input_ids))
        mask = sequence_mask(lengths, input_ids.shape[1]) if masked else None
        for k in range(1, self.attn_layers + 1):
            x = getattr(self, f"W_att{k}")(x, mask)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.cap_rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        if self.use_bi_gru:
            half = out.shape[2] // 2
            out = (out[:, :, :half] + out[:, :, half:]) / 2
        return out if self.no_txtnorm else l2norm(out, dim=-1)


class VisualSA(nn.Module):
    """Global image vector by self-attention over the regions (SGRAF); BN over the region slots."""

    def __init__(self, embed_dim: int, dropout: float, num_region: int) -> None:
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(num_region),
                                             nn.Tanh(), nn.Dropout(dropout))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(embed_dim),
                                              nn.Tanh(), nn.Dropout(dropout))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        for seq in (self.embedding_local, self.embedding_global, self.embedding_common):
            for m in seq:
                if isinstance(m, nn.Linear):
                    xavier_linear_(m)
                elif isinstance(m, nn.BatchNorm1d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """``[B, R, D]`` -> ``[B, D]``; the weights apply to the raw regions."""
        l_emb = self.embedding_local(local)
        g_emb = self.embedding_global(local.mean(1))
        w = torch.softmax(self.embedding_common(l_emb * g_emb[:, None, :]).squeeze(2), dim=1)
        return l2norm((w[..., None] * local).sum(1), dim=-1)


class TextSA(nn.Module):
    """Global caption vector by self-attention over its real words (SGRAF), batched with a mask."""

    def __init__(self, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        for seq in (self.embedding_local, self.embedding_global, self.embedding_common):
            xavier_linear_(seq[0])

    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` words, ``[B, L]`` mask -> ``[B, D]`` (mean and softmax over real words only)."""
        mask = mask.bool()
        m = mask.to(words.dtype)
        mean = (words * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        g_emb = self.embedding_global(mean)                                 # [B, D]
        rows, cols = mask.nonzero(as_tuple=True)
        # the local branch only on real words (packed), as upstream slices each caption to its length
        l_emb = self.embedding_local(words[rows, cols])                     # [T, D]
        logit = self.embedding_common(l_emb * g_emb[rows]).squeeze(1)       # [T]
        logits = words.new_full(mask.shape, float("-inf")).index_put((rows, cols), logit)
        w = torch.softmax(logits, dim=1)
        return l2norm((w[..., None] * words).sum(1), dim=-1)


class SimilarityCalculation(nn.Module):
    """SGRAF's attention filtration (SAF): ``attn_sim_w`` gate logits, ``bn`` = BatchNorm1d(1)."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        xavier_linear_(self.attn_sim_w)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)


class EncoderSimilarity(nn.Module):
    """Global vectors, similarity vectors, SAF and the final score (upstream ``EncoderSimilarity``)."""

    def __init__(self, embed_size: int, sim_dim: int, num_regions: int = 36, sa_dropout: float = 0.4) -> None:
        super().__init__()
        self.v_global_w = VisualSA(embed_size, sa_dropout, num_regions)
        self.t_global_w = TextSA(embed_size, sa_dropout)
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
        self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        self.cal_sim_base_atten = SimilarityCalculation(sim_dim)
        for lin in (self.sim_tranloc_w, self.sim_tranglo_w, self.sim_eval_w):
            xavier_linear_(lin)


# ---------------------------------------------------------------------------------------------------
# SAF BatchNorm1d(1): eval = affine map with running stats; train = statistics per caption, as the reference loop


def _saf_bn_eval(bn: nn.BatchNorm1d, e: torch.Tensor) -> torch.Tensor:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return e * scale + (bn.bias - bn.running_mean * scale)


def _saf_bn_train(bn: nn.BatchNorm1d, e_glo: torch.Tensor, e_loc: torch.Tensor, onehot: torch.Tensor,
                  seg: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise with each caption's own statistics over its ``Ni·(L_j+1)`` gate logits.

    Upstream calls the SAF once per caption, so BatchNorm1d(1) sees one caption's logits (all images,
    global node + its words) and updates its running stats once per caption, in caption order.
    ``e_glo [Ni, n]``, ``e_loc [Ni, T]`` (packed words), ``onehot [T, n]``.
    """
    ni = e_glo.shape[0]
    count = (lengths.to(e_glo.dtype) + 1) * ni                                       # [n]
    mean = (e_glo.sum(0) + e_loc.sum(0) @ onehot) / count
    var = (((e_glo - mean) ** 2).sum(0) + ((e_loc - mean[seg]) ** 2).sum(0) @ onehot) / count  # biased
    inv = bn.weight / torch.sqrt(var + bn.eps)
    out_glo = (e_glo - mean) * inv + bn.bias
    out_loc = (e_loc - mean[seg]) * inv[seg] + bn.bias
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 0.1
            n = mean.shape[0]
            # n sequential updates r <- (1-m) r + m x_j, in closed form
            decay = (1 - m) ** torch.arange(n - 1, -1, -1, dtype=torch.float64, device=mean.device)
            unbiased = var * count / (count - 1).clamp(min=1)
            bn.running_mean.mul_((1 - m) ** n).add_((m * decay * mean.double()).sum().to(mean.dtype))
            bn.running_var.mul_((1 - m) ** n).add_((m * decay * unbiased.double()).sum().to(var.dtype))
            bn.num_batches_tracked.add_(n)
    return out_glo, out_loc


# ---------------------------------------------------------------------------------------------------
# the model


class LHSCTokenizer:
    """SCAN vocabulary tokenizer: ``[<start>] + word ids + [<end>]``, right-padded with ``<pad>`` = 0.

    The vocabulary is read on first use and checked against the model (size, optional checksum), so a
    wrong file fails loudly instead of giving wrong word ids.
    """

    def __init__(self, vocab_path: str | None, vocab_size: int, vocab_sha256: str | None = None) -> None:
        self.vocab_path, self.vocab_size, self.vocab_sha256 = vocab_path, vocab_size, vocab_sha256
        self._vocab = None

    @property
    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = load_scan_vocab(self.vocab_path, model="lhsc", vocab_size=self.vocab_size,
                                          sha256=self.vocab_sha256)
        return self._vocab

    def __call__(self, captions: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        return self.vocab.encode_batch(list(captions))


class RegionsToTensor:
    """``np.ndarray [R, D]`` -> ``FloatTensor [num_regions, D]``, zero-padded (upstream data always has 36)."""

    def __init__(self, num_regions: int, img_dim: int) -> None:
        self.num_regions, self.img_dim = num_regions, img_dim

    def __call__(self, x: Any) -> torch.Tensor:
        t = RegionTransform(train=False)(x)
        if t.shape[1] != self.img_dim:
            raise ValueError(f"lhsc expects region features [R, {self.img_dim}], got {tuple(t.shape)}")
        if t.shape[0] > self.num_regions:
            raise ValueError(f"lhsc is built for {self.num_regions} regions per image (VisualSA's BatchNorm), "
                             f"got {t.shape[0]}; set num_regions")
        if t.shape[0] < self.num_regions:
            t = torch.cat([t, t.new_zeros(self.num_regions - t.shape[0], t.shape[1])])
        return t


class LHSC(ITMModel):
    """LHSC with the official module names: ``img_enc``, ``txt_enc``, ``sim_enc``."""

    input_kind = "regions"
    scoring = "cross"

    def __init__(self, config: LHSCConfig) -> None:
        super().__init__(config)
        c = config
        self.img_enc = EncoderImage(c.img_dim, c.embed_size, c.gcn_layers, c.no_imgnorm)
        self.txt_enc = EncoderText(c.vocab_size, c.word_dim, c.embed_size, c.num_layers, c.text_attn_dropout,
                                   c.embed_dropout, c.text_attn_layers, c.bi_gru, c.no_txtnorm)
        self.sim_enc = EncoderSimilarity(c.embed_size, c.sim_dim, c.num_regions, c.sa_dropout)
        self._tokenizer = LHSCTokenizer(c.vocab_path, c.vocab_size, c.vocab_sha256)

    # -- data plumbing -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> LHSCTokenizer:
        return self._tokenizer

    def eval_settings(self) -> EvalSettings:
        """With batch padding, captions are encoded in the reference's blocks of 100 (features depend on it)."""
        if self.config.text_padding == "batch":
            return EvalSettings(text_batch_size=self.config.eval_text_batch_size)
        return EvalSettings()

    def image_transform_for(self, train: bool) -> RegionsToTensor:
        return RegionsToTensor(self.config.num_regions, self.config.img_dim)

    # -- encoders --------------------------------------------------------------------------------
    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"regions": [B, R, D], "global": [B, D]}``; the global vector is caption independent."""
        x = batch["regions"]
        if x.shape[1] != self.config.num_regions:
            raise ValueError(f"lhsc expects {self.config.num_regions} regions per image, got {x.shape[1]} "
                             "(use model.image_transform, which pads)")
        regions = self.img_enc(x)
        return {"regions": regions, "global": self.sim_enc.v_global_w(regions)}

    def encode_text(self, batch: Mapping[str, torch.Tensor],
                    text_padding: str | None = None) -> dict[str, torch.Tensor]:
        """``{"tokens": [B, L, D], "mask": [B, L], "global": [B, D]}`` (tokens zero past each length).

        With ``text_padding="batch"`` the result depends on ``input_ids.shape[1]`` (the upstream
        behaviour); with ``"masked"`` it does not.
        """
        mode = text_padding or self.config.text_padding
        if mode not in ("batch", "masked"):
            raise ValueError(f"text_padding must be 'batch' or 'masked', got {mode!r}")
        ids = batch["input_ids"]
        lengths = batch["lengths"].to(ids.device).long() if "lengths" in batch else batch["attention_mask"].sum(1)
        tokens = self.txt_enc(ids, lengths, masked=(mode == "masked"))
        mask = sequence_mask(lengths.clamp(min=1), tokens.shape[1])
        return {"tokens": tokens, "mask": mask, "global": self.sim_enc.t_global_w(tokens, mask)}

    # -- scoring -----------------------------------------------------------------------------------
    def similarity(self, image_feats: Mapping[str, torch.Tensor],
                   text_feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``[n_images, n_captions]`` of every pair, in (0, 1).

        Captions are processed in groups of about ``sim_group_tokens`` words (``sim_group_tokens_train``
        on the CPU when autograd records, ``sim_group_tokens_cuda`` on CUDA) and, for each group, all
        images at once; only the ``[images, words, embed]`` intermediate is tiled (``sim_tile_rows``).
        In train mode the SAF BatchNorm uses per-caption statistics over all images given.
        """
        regions, img_glo = image_feats["regions"], image_feats["global"]
        tokens, mask, txt_glo = text_feats["tokens"], text_feats["mask"].bool(), text_feats["global"]
        lengths = mask.sum(1)
        c = self.config
        if tokens.is_cuda:
            group = c.sim_group_tokens_cuda
        else:
            group = c.sim_group_tokens_train if torch.is_grad_enabled() else c.sim_group_tokens
        groups = _caption_groups(lengths, group)
        # under autocast (bf16/fp16) only the large products run in low precision (the embed -> sim_dim
        # projections and the attention scores); differences that cancel, norms, softmaxes and SAF stay fp32
        lowp = _autocast_dtype(regions.device)
        with torch.autocast(regions.device.type, enabled=False):
            regions, img_glo, tokens, txt_glo = regions.float(), img_glo.float(), tokens.float(), txt_glo.float()
            gram = region_gram(regions)

            def score(group: tuple[int, int]) -> torch.Tensor:
                a, b = group
                return self._score_group(regions, gram, img_glo, tokens[a:b], mask[a:b], txt_glo[a:b], lowp)

            # evaluation on the CPU: whole groups on threads; train mode keeps one sequence, as its
            # BatchNorm updates shared running statistics
            cols = map_blocks(score, groups, 1 if self.training else inference_threads(len(groups), tokens.device))
        return torch.cat(cols, 1) if len(cols) > 1 else cols[0]

    def _score_group(self, regions: torch.Tensor, gram: torch.Tensor, img_glo: torch.Tensor, tokens: torch.Tensor,
                     mask: torch.Tensor, txt_glo: torch.Tensor, lowp: torch.dtype | None = None) -> torch.Tensor:
        sim = self.sim_enc
        ni, _, d = regions.shape
        nc = tokens.shape[0]
        lengths = mask.sum(1)
        flat = mask.reshape(-1)
        real = flat.nonzero().squeeze(1)
        words = tokens.reshape(-1, d).index_select(0, real)                          # [T, D] packed words
        seg = real // tokens.shape[1]                                                # caption of each word
        onehot = F.one_hot(seg, nc).to(words.dtype)                                  # [T, nc]
        attn = t2i_attention_packed(regions, words, onehot, seg, self.config.smooth,
                                    scores_dtype=lowp if self.config.lowp_attention_scores else None)  # [Ni, T, R]
        attn = attn * context_scale(regions, attn, gram=gram)[..., None]            # folds l2norm of a_t
        loc, glo = self._similarity_vectors(regions, attn, words, img_glo, txt_glo, lowp)  # [Ni,T,s], [Ni,nc,s]
        # SAF: gate logits, BN, sigmoid, L1 over (global + words) of each pair, weighted sum
        saf = sim.cal_sim_base_atten
        e_loc = saf.attn_sim_w(loc).squeeze(-1)                                      # [Ni, T]
        e_glo = saf.attn_sim_w(glo).squeeze(-1)                                      # [Ni, nc]
        if self.training:
            e_glo, e_loc = _saf_bn_train(saf.bn, e_glo, e_loc, onehot, seg, lengths)
        else:
            e_glo, e_loc = _saf_bn_eval(saf.bn, e_glo), _saf_bn_eval(saf.bn, e_loc)
        g_glo, g_loc = torch.sigmoid(e_glo), torch.sigmoid(e_loc)
        den = g_glo + g_loc @ onehot + 1e-8                                          # [Ni, nc]
        # Σ_t∈j g_t s_t for every pair: per image, a [nc, T] block-diagonal weight times [T, s]
        u = torch.bmm(onehot.t()[None] * g_loc[:, None, :], loc) + g_glo[..., None] * glo
        u = l2norm(u / den[..., None], dim=-1)
        return torch.sigmoid(sim.sim_eval_w(u)).squeeze(-1)

    def _similarity_vectors(self, regions: torch.Tensor, attn: torch.Tensor, words: torch.Tensor,
                            img_glo: torch.Tensor, txt_glo: torch.Tensor,
                            lowp: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised similarity vectors: local ``[Ni, T, s]`` and global ``[Ni, nc, s]``.

        local = ``l2norm(sim_tranloc_w((a_t - w_t)²))`` for every image and packed word (``attn`` already
        carries the 1/||a_t|| factor); global = ``l2norm(sim_tranglo_w((v_glo - t_glo)²))``. The
        ``embed -> sim_dim`` projection of every image-word row is most of the work; without autograd it
        runs in tiles of about ``sim_tile_rows`` rows, in place, into preallocated outputs, so the
        ``[rows, embed]`` intermediates stay in cache (CPU) and memory is bounded (any device).
        """
        loc_w, glo_w = self.sim_enc.sim_tranloc_w, self.sim_enc.sim_tranglo_w
        if torch.is_grad_enabled():
            def proj(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
                if lowp is None:
                    return lin(x)
                return F.linear(x.to(lowp), lin.weight.to(lowp), lin.bias.to(lowp)).float()

            loc = proj(loc_w, (torch.bmm(attn, regions) - words) ** 2)
            glo = proj(glo_w, (img_glo[:, None, :] - txt_glo[None, :, :]) ** 2)
            return l2norm(loc, dim=-1), l2norm(glo, dim=-1)
        ni, t = attn.shape[0], attn.shape[1]
        nc, s_dim = txt_glo.shape[0], loc_w.out_features
        # CPU: a few MB of [rows, embed] per thread stays in L2/L3; CUDA: large tiles fill the device
        rows = (self.config.sim_tile_rows_cuda if regions.is_cuda
                else self.config.sim_tile_rows * max(1, torch.get_num_threads()))
        step = max(1, rows // max(t, 1))
        loc = regions.new_empty(ni, t, s_dim, dtype=torch.float32)
        glo = regions.new_empty(ni, nc, s_dim, dtype=torch.float32)
        # `lowp`: the projections run in that dtype (bf16/fp16 autocast); a_t - w_t and the norms stay fp32
        cast = (lambda x: x) if lowp is None else (lambda x: x.to(lowp))
        loc_wt, glo_wt = cast(loc_w.weight).t(), cast(glo_w.weight).t()
        loc_b, glo_b = cast(loc_w.bias), cast(glo_w.bias)
        buf = regions.new_empty(min(step, ni), t, regions.shape[-1])  # reused: no allocation per tile
        for i in range(0, ni, step):
            j = min(i + step, ni)
            r = torch.bmm(attn[i:j], regions[i:j], out=buf[: j - i])
            r.sub_(words).square_()
            if lowp is None:
                torch.addmm(loc_b, r.view(-1, r.shape[-1]), loc_wt, out=loc[i:j].view(-1, s_dim))
            else:
                loc[i:j] = torch.addmm(loc_b, cast(r.view(-1, r.shape[-1])), loc_wt).view(j - i, t, s_dim)
        # the global pairs are one row per pair (1/L of the local work): one product for the group
        g = torch.sub(img_glo[:, None, :], txt_glo[None, :, :]).square_().view(-1, regions.shape[-1])
        if lowp is None:
            torch.addmm(glo_b, g, glo_wt, out=glo.view(-1, s_dim))
        else:
            glo.view(-1, s_dim).copy_(torch.addmm(glo_b, cast(g), glo_wt))
        # l2norm in place: x / (||x|| + eps), eps outside the root as upstream
        loc.div_(torch.linalg.vector_norm(loc, dim=-1, keepdim=True).add_(1e-8))
        glo.div_(torch.linalg.vector_norm(glo, dim=-1, keepdim=True).add_(1e-8))
        return loc, glo

    # -- training ----------------------------------------------------------------------------------
    accumulation = "exact"  # hardest negatives come from the whole batch: split at the features

    def train_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Per-item features; the loss below is split here so the trainer can accumulate exactly."""
        return {"image": self.encode_image(batch), "text": self.encode_text(batch)}

    def train_loss(self, feats: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Summed hardest-negative hinge over the global batch.

        Under DDP every rank scores all images of the global batch against its own captions (so the
        expensive scoring is divided among ranks, and the SAF BatchNorm sees each caption with every
        image, as upstream), then the score columns are gathered into the full matrix. Outside a
        process group both gathers are the identity.
        """
        from ..distributed import all_gather_with_grad, gather_features

        images = gather_features(feats["image"])
        cols = self.similarity(images, feats["text"])                      # [global images, local captions]
        scores = all_gather_with_grad(cols.t().contiguous()).t()            # [global, global]
        pos = None
        if self.config.same_image_positives and "image_index" in batch:
            idx = gather_features(batch["image_index"])
            pos = positive_mask(scores.shape[0], idx, scores.device)
        hardest = self.config.max_violation and self.epoch >= self.config.vse_mean_warmup_epochs
        loss = hinge_triplet_loss(scores, self.config.margin, hardest, pos_mask=pos)
        return {"loss": loss}


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The active autocast dtype on `device`'s type, or None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _caption_groups(lengths: torch.Tensor, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive caption ranges holding at most `max_tokens` words each (at least one caption)."""
    lens = lengths.tolist()
    groups, start, acc = [], 0, 0
    for j, n in enumerate(lens):
        if j > start and acc + n > max_tokens:
            groups.append((start, j))
            start, acc = j, 0
        acc += n
    groups.append((start, len(lens)))
    return groups


# ---------------------------------------------------------------------------------------------------
# official checkpoints


_OPT_FIELDS = {  # opts.py name -> LHSCConfig field
    "img_dim": "img_dim", "word_dim": "word_dim", "embed_size": "embed_size", "sim_dim": "sim_dim",
    "num_layers": "num_layers", "bi_gru": "bi_gru", "no_imgnorm": "no_imgnorm", "no_txtnorm": "no_txtnorm",
    "drop_out": "text_attn_dropout", "margin": "margin", "max_violation": "max_violation",
    "vocab_size": "vocab_size",
}
_PARTS = ("img_enc", "txt_enc", "sim_enc")


def convert_official(obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """An LHSC release file -> ``(config overrides, itmzoo state dict, ignorable keys)``.

    Accepts the checkpoint dict (``{"model": [img, txt, sim], "opt": Namespace, ...}``), the bare list of
    three state dicts, or a dict keyed ``img_enc``/``txt_enc``/``sim_enc``. The map is a prefix per part;
    ``num_batches_tracked`` absent from pre-0.4.1 files is filled with 0 (it has no effect in eval).
    Architecture sizes are read from the tensors and checked against ``opt`` when it is present.
    """
    opt = None
    parts = obj
    if isinstance(obj, Mapping) and "model" in obj:
        parts, opt = obj["model"], obj.get("opt")
    if isinstance(parts, Mapping) and set(_PARTS) <= set(parts):
        parts = [parts[p] for p in _PARTS]
    if not isinstance(parts, (list, tuple)) or len(parts) != 3 or not all(isinstance(p, Mapping) for p in parts):
        raise CheckpointError("not an LHSC checkpoint: expected {'model': [img_enc, txt_enc, sim_enc] state dicts, "
                              "'opt': Namespace} or a list of three state dicts")
    state: dict[str, torch.Tensor] = {}
    for name, sd in zip(_PARTS, parts):
        for k, v in sd.items():
            k = k[len("module."):] if k.startswith("module.") else k
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{name}.{k} is a {type(v).__name__}, not a tensor")
            state[f"{name}.{k}"] = v
    for k in [k for k in state if k.endswith(".running_mean")]:
        nbt = k[: -len("running_mean")] + "num_batches_tracked"
        state.setdefault(nbt, torch.zeros((), dtype=torch.long))

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"not an LHSC checkpoint: missing {key}")
        return tuple(state[key].shape)

    vocab_size, word_dim = shape("txt_enc.embed.weight")
    embed_size, img_dim = shape("img_enc.fc.weight")
    sim_dim = shape("sim_enc.sim_tranloc_w.weight")[0]
    num_regions = shape("sim_enc.v_global_w.embedding_local.1.running_mean")[0]
    gcn = sum(1 for k in state if k.startswith("img_enc.IM_GCN_") and k.endswith(".g.weight"))
    att = sum(1 for k in state if k.startswith("txt_enc.W_att") and k.endswith(".embedding_v.0.weight"))
    inferred: dict[str, Any] = dict(vocab_size=vocab_size, word_dim=word_dim, embed_size=embed_size, img_dim=img_dim,
                                    sim_dim=sim_dim, num_regions=num_regions, gcn_layers=gcn, text_attn_layers=att,
                                    bi_gru="txt_enc.cap_rnn.weight_ih_l0_reverse" in state,
                                    num_layers=sum(1 for k in state if k.startswith("txt_enc.cap_rnn.weight_ih_l")
                                                   and not k.endswith("_reverse")))
    if opt is not None:
        given = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt) if isinstance(opt, Mapping) else {}
        for src, dst in _OPT_FIELDS.items():
            if src not in given:
                continue
            val = given[src]
            if dst in inferred and inferred[dst] != val:
                raise CheckpointError(f"LHSC checkpoint: opt.{src}={val!r} disagrees with the weights "
                                      f"({inferred[dst]!r})")
            if dst not in inferred:
                inferred[dst] = float(val) if dst in ("margin", "text_attn_dropout") else val
    return inferred, state, []



TAGS = {
    "f30k": Tag(
        overrides={"vocab_size": 8481, "vocab_sha256": SCAN_VOCAB_SHA256["f30k"]},
        dataset="f30k",
        source="LHSC README: Google Drive file 1y8Ywa2vrPB7m_Q_Ku69z7EdwsLB9gsJW ('for MSCOCO and Flickr30K')",
        preprocessing={"features": "SCAN f30k_precomp BUTD 36x2048", "vocab": "f30k_precomp_vocab.json (SCAN)",
                       "text_padding": "batch", "eval_text_batch_size": 100},
        note=f"origin {UPSTREAM}; the paper's result tables were not available to this port",
    ),
    "coco": Tag(
        overrides={"vocab_size": 11353, "vocab_sha256": SCAN_VOCAB_SHA256["coco"]},
        dataset="coco",
        source="LHSC README: Google Drive file 1y8Ywa2vrPB7m_Q_Ku69z7EdwsLB9gsJW ('for MSCOCO and Flickr30K')",
        preprocessing={"features": "SCAN coco_precomp BUTD 36x2048", "vocab": "coco_precomp_vocab.json (SCAN)",
                       "text_padding": "batch", "eval_text_batch_size": 100},
        note=f"origin {UPSTREAM}; the paper's result tables were not available to this port",
    ),
}


@register_model("lhsc", config=LHSCConfig, input_kind="regions", scoring="cross",
                paper="LHSC: Learning Hierarchical Semantic Correspondences (ICMR 2022, on SGRAF)",
                upstream=UPSTREAM, text_backbone="bigru", image_backbone="butd-regions", tags=TAGS,
                converter=convert_official,
                tiny={"img_dim": 16, "word_dim": 8, "embed_size": 8, "sim_dim": 4, "vocab_size": 74,
                      "vocab_path": SYNTHETIC_VOCAB})
def lhsc(config: LHSCConfig) -> LHSC:
    return LHSC(config)
