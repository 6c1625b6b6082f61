"""ESA: External Space Attention Aggregation for Image-Text Retrieval (Zhu et al., TCSVT 2023).

Faithful reimplementation of ``KevinLight831/ESA @ c94e9b892b437a6bfd2e69b4ca6cae9b60489ca1`` (folders
``ESA_BIGRU/`` and ``ESA_BERT/``, a fork of VSE-infinity), one module for both text backbones:

* image: precomputed regions -> ``fc(x) + mlp(x)`` -> **ESA pooling** (per-channel softmax attention
  over the regions, logits from ``linear1``) -> l2norm. In training every image gives ``hardnum`` (2)
  views, each dropping ~20 % of the regions from the attention;
* text: BiGRU over a SCAN vocabulary (``esa_bigru``, alias ``esa``) or BERT-base (``esa_bert``), then the
  same ESA pooling over the words; in training each caption comes as ``hardnum`` word-augmented copies
  (mask 10 % / random token 2 % / delete 8 % of the words);
* loss: the Self-Expanding triplet Loss (SEL): hardest positive among the views of a sample, all
  negatives summed in the warm-up epoch, hardest negative afterwards.

Also here: the key map of the authors' checkpoints (`convert_official`), the tag table and the
registered builders. Shared parts come from `itmzoo.encoders` and `itmzoo.losses`.
"""

from __future__ import annotations

import dataclasses
import functools
import random as _random
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from ..checkpoints.safe import CheckpointError, strip_prefixes
from ..config import ConfigError, ModelConfig
from ..data.synthetic import SYNTHETIC_VOCAB
from ..data.transforms import RegionTransform
from ..data.vocab import SCAN_VOCAB_SHA256, Vocab, load_scan_vocab, pad_ids, word_tokenize
from ..encoders.backbones import load_pretrained_weights
from ..encoders.gru import WordGRUEncoder, glove_candidates, init_embedding_from_glove, load_glove, sequence_mask
from ..encoders.hf_text import (
    WordPieceSplitter,
    augment_word_pieces,
    build_hf_text_model,
    encode_word_pieces,
    load_hf_tokenizer,
)
from ..encoders.regions import RegionFeatureEncoder, region_mask, xavier_linear_
from ..losses import hinge_costs, l2norm
from ..registry import Tag, expected_recalls, register_model
from .base import ITMModel

__all__ = [
    "ESA", "ESABertConfig", "ESABertTokenizer", "ESABiGRUConfig", "ESAConfig", "ESAImageEncoder",
    "ESATextBert", "ESATextGRU", "ESAWordTokenizer", "convert_official", "esa_bert", "esa_bigru", "esa_pool",
    "sel_loss",
]

UPSTREAM = "KevinLight831/ESA @ c94e9b892b437a6bfd2e69b4ca6cae9b60489ca1"
MASK_TOKEN = "<mask>"


# ----------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass
class ESAConfig(ModelConfig):
    """Fields shared by both ESA variants (defaults = the authors' scripts)."""

    img_dim: int = 2048
    embed_size: int = 1024
    precomp_enc_type: Literal["basic"] = "basic"  # regions + MLP; the unused raw-image mode is not ported
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    hardnum: int = 2  # views per image and augmented copies per caption
    region_drop_prob: float = 0.2  # a region is left out of a training view when rand < this
    word_aug_prob: float = 0.2  # a word is masked / replaced / deleted with this probability
    text_dropout: float = 0.1
    margin: float = 0.2
    max_violation: bool = False  # hardest negative from the start (upstream --max_violation)
    vse_mean_warmup_epochs: int = 1  # epochs summing all negatives before switching to the hardest
    # Upstream ignores region lengths (BUTD always has 36 regions); masking padded regions out of the
    # pooling is identical on such data and correct on padded batches.
    mask_padded_regions: bool = True

    def validate(self) -> None:
        for f in ("img_dim", "embed_size", "hardnum"):
            if getattr(self, f) < 1:
                raise ConfigError(f"ESA: {f} must be >= 1, got {getattr(self, f)}")
        for f in ("region_drop_prob", "word_aug_prob", "text_dropout"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"ESA: {f} must lie in [0, 1), got {getattr(self, f)}")
        if self.embed_size % 2:
            raise ConfigError("ESA: embed_size must be even (the region MLP is embed_size//2 wide), "
                              f"got {self.embed_size}")


@dataclasses.dataclass
class ESABiGRUConfig(ESAConfig):
    """ESA with the BiGRU text encoder (``ESA_BIGRU``)."""

    # SCAN vocabulary + <mask>: 8481 + 1 (f30k), 11353 + 1 (coco); None: the words of vocab_path + 1, or
    # 8482 (the f30k size) without a vocabulary. The built model's config always holds the number.
    vocab_size: int | None = None
    word_dim: int = 300
    num_layers: int = 1
    vocab_path: str | None = None  # SCAN vocab json (without <mask>) for the tokenizer
    vocab_sha256: str | None = None  # checksum of its id table (`Vocab.sha256`), checked when given
    glove_path: str | None = None  # GloVe file used by init_pretrained() (upstream: glove.840B.300d)

    def validate(self) -> None:
        super().validate()
        if self.vocab_size is not None and self.vocab_size < 6:
            raise ConfigError("esa_bigru: vocab_size must count the 4 specials, the words and <mask>, "
                              f"got {self.vocab_size}")


@dataclasses.dataclass
class ESABertConfig(ESAConfig):
    """ESA with the BERT text encoder (``ESA_BERT``)."""

    bert_arch: str = "bert-base-uncased"  # architecture (itmzoo.encoders.backbones.ARCHITECTURES)
    bert_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of its fields
    # hub id or local folder loaded by init_pretrained(); None = random init, so build() works offline
    # (the paper configs set bert-base-uncased)
    pretrained: str | None = None
    tokenizer: str = "bert-base-uncased"  # hub id or local folder of the tokenizer
    bert_lr_mult: float = 0.1  # BERT trains at lr x 0.1 (upstream)

    def validate(self) -> None:
        super().validate()
        from ..encoders.backbones import ARCHITECTURES

        if ARCHITECTURES.get(self.bert_arch, {}).get("model_type") != "bert":
            raise ConfigError(f"esa_bert needs a BERT architecture, got bert_arch={self.bert_arch!r}")
        if "model_type" in self.bert_config:
            raise ConfigError("esa_bert: bert_config overrides fields of bert_arch; it cannot change model_type")


# ----------------------------------------------------------------------------------------------- modules


def esa_pool(feats: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ESA's element-wise attention pooling over dim 1: ``sum_t softmax_t(logits)[t, c] * feats[t, c]``.

    `mask` (``[B, T]``, True = keep) sets the logits of left-out items to -10000 before the softmax and
    their weights to 0 after it, exactly as upstream (an all-masked row pools to 0).
    """
    if mask is not None:
        m = ~mask.unsqueeze(-1)
        logits = logits.masked_fill(m, -10000)
    attn = torch.softmax(logits - logits.max(dim=1, keepdim=True)[0], dim=1)
    if mask is not None:
        attn = attn.masked_fill(m, 0)
    return (attn * feats).sum(dim=1)


class ESAImageEncoder(RegionFeatureEncoder):
    """``fc + mlp`` over regions, then ESA pooling with ``linear1`` (upstream ``EncoderImageAggr``).

    Eval: ``[B, E]``. Train: ``[B * n_views, E]``, rows ``[img0_view0, img0_view1, img1_view0, ...]``,
    each view keeping a region when ``torch.rand >= drop_prob`` (drawn on the CPU generator, one
    ``[B, R]`` draw per view, as upstream), unless `view_keep` gives the masks.
    """

    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False) -> None:
        super().__init__(img_dim, embed_size, use_mlp=True)
        self.linear1 = nn.Linear(embed_size, embed_size)
        xavier_linear_(self.linear1)
        self.no_imgnorm = no_imgnorm

    def forward(self, regions: torch.Tensor, lengths: torch.Tensor | None = None, n_views: int = 2,
                drop_prob: float = 0.2, view_keep: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.region_features(regions)
        logits = self.linear1(feats)
        valid = region_mask(regions, lengths) if lengths is not None else None
        if not self.training:
            out = esa_pool(feats, logits, valid)
        else:
            B, R = regions.shape[:2]
            if view_keep is None:
                view_keep = torch.stack([torch.rand(B, R) >= drop_prob for _ in range(n_views)], 1)
            view_keep = view_keep.to(regions.device, torch.bool)
            if tuple(view_keep.shape) != (B, n_views, R):
                raise ValueError(f"view_keep must be [B, n_views, R] = {(B, n_views, R)}, got {tuple(view_keep.shape)}")
            views = []
            for k in range(n_views):
                keep = view_keep[:, k] if valid is None else view_keep[:, k] & valid
                # A view that drops every region pools to 0 upstream, and l2norm's sqrt(0) then gives NaN
                # gradients. It has probability 0.2^36 with BUTD features; with few regions it is common,
                # so such a view keeps all (valid) regions instead.
                empty = ~keep.any(dim=1, keepdim=True)
                if bool(empty.any()):
                    keep = torch.where(empty, valid if valid is not None else torch.ones_like(keep), keep)
                views.append(esa_pool(feats, logits, keep))
            out = torch.stack(views, 1).reshape(B * n_views, -1)
        return out if self.no_imgnorm else l2norm(out, dim=-1)


class ESATextGRU(WordGRUEncoder):
    """Word embedding -> Dropout(0.1) -> BiGRU (directions averaged) -> ESA pooling (upstream ``EncoderText``)."""

    def __init__(self, config: ESABiGRUConfig) -> None:
        super().__init__(config.vocab_size, config.word_dim, config.embed_size, config.num_layers,
                         bidirectional=True, embed_dropout=config.text_dropout, embed_init="normal")
        self.linear1 = nn.Linear(config.embed_size, config.embed_size)  # PyTorch default init, as upstream
        self.no_txtnorm = config.no_txtnorm

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h, mask = self.token_features(input_ids, lengths)
        out = esa_pool(h, self.linear1(h), mask)
        return out if self.no_txtnorm else l2norm(out, dim=-1)


class ESATextBert(nn.Module):
    """BERT -> Linear(hidden, E) -> Dropout(0.1) -> ESA pooling over ``lengths`` tokens (``ESA_BERT``)."""

    def __init__(self, config: ESABertConfig) -> None:
        super().__init__()
        self.bert = build_hf_text_model(config.bert_arch, config.bert_config)
        # upstream hard-codes 768 (bert-base); the configured hidden size is the same there
        self.linear = nn.Linear(self.bert.config.hidden_size, config.embed_size)
        self.linear1 = nn.Linear(config.embed_size, config.embed_size)
        self.dropout = nn.Dropout(config.text_dropout)
        xavier_linear_(self.linear)
        xavier_linear_(self.linear1)
        pad = self.bert.config.pad_token_id
        self.pad_token_id = 0 if pad is None else int(pad)
        self.no_txtnorm = config.no_txtnorm

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # upstream attends to every non-[PAD] id, even a [PAD] that augmentation put inside a caption,
        # while the pooling below covers the first `lengths` tokens
        attention_mask = (input_ids != self.pad_token_id).float()
        hid = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        h = self.dropout(self.linear(hid))
        max_len = int(lengths.max())
        h = h[:, :max_len]
        out = esa_pool(h, self.linear1(h), sequence_mask(lengths.to(h.device), max_len))
        return out if self.no_txtnorm else l2norm(out, dim=-1)


def sel_loss(im: torch.Tensor, s: torch.Tensor, hardnum: int, margin: float = 0.2,
             max_violation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-Expanding triplet Loss; returns ``(cost_im, cost_s)`` (sums), as upstream ``ContrastiveLoss``.

    Rows ``k*hardnum + a`` of `im` and `s` are views of sample k. The anchor's positive score is its
    *lowest* score over the other modality's views of the same sample; the whole ``hardnum x hardnum``
    block is excluded from the negatives. With ``hardnum=1`` this is the VSE++ hinge loss.
    """
    scores = im @ s.t()
    n = scores.shape[0]
    if scores.shape[1] != n or n % hardnum:
        raise ValueError(f"SEL needs two [N, E] sets with N a multiple of hardnum={hardnum}, got {tuple(scores.shape)}")
    group = torch.arange(n, device=scores.device) // hardnum
    pos = group[:, None] == group[None, :]
    masked = scores.masked_fill(~pos, float("inf"))
    pos_img = masked.min(dim=1)[0]  # image view i: hardest positive caption view
    pos_cap = masked.min(dim=0)[0]  # caption view j: hardest positive image view
    cost_s, cost_im = hinge_costs(scores, margin, pos, d_row=pos_img, d_col=pos_cap)
    if max_violation:
        cost_im = cost_im.max(dim=0)[0]
        cost_s = cost_s.max(dim=1)[0]
    return cost_im.sum(), cost_s.sum()


# ---------------------------------------------------------------------------------------------- tokenizers


class _AugmentingTokenizer:
    """``tokenizer(captions, train=False, rng=None)``; in training it returns ``hardnum`` augmented copies.

    Training batches hold only ``views_input_ids`` / ``views_attention_mask`` / ``views_lengths`` with
    ``B * hardnum`` rows (row ``i * hardnum + j`` = copy j of caption i): the training loss never reads
    clean ids, so each caption is encoded ``hardnum`` times, as upstream does. Random draws come from
    `rng` (a ``random.Random``) or, by default, from Python's global ``random``, which DataLoader seeds
    differently in every worker (as upstream relies on).
    """

    pad_id = 0

    def __init__(self, hardnum: int, aug_prob: float) -> None:
        self.hardnum = hardnum
        self.aug_prob = aug_prob

    def encode(self, caption: str) -> list[int]:
        raise NotImplementedError

    def augment(self, caption: str, rng: Any) -> list[int]:
        raise NotImplementedError

    def __call__(self, captions: Sequence[str], train: bool = False, rng: Any = None) -> dict[str, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        if not train:
            return pad_ids([self.encode(c) for c in captions], self.pad_id)
        rng = _random if rng is None else rng
        views = [self.augment(c, rng) for c in captions for _ in range(self.hardnum)]
        return {f"views_{k}": v for k, v in pad_ids(views, self.pad_id).items()}


class ESAWordTokenizer(_AugmentingTokenizer):
    """SCAN vocabulary + ``<mask>``; eval ids as SCAN, training copies as ESA-BiGRU's ``process_caption``."""

    def __init__(self, vocab: Vocab, hardnum: int = 2, aug_prob: float = 0.2) -> None:
        super().__init__(hardnum, aug_prob)
        self.vocab = vocab
        self.pad_id = vocab.pad_id
        if MASK_TOKEN not in vocab:
            raise ValueError("ESAWordTokenizer needs a vocabulary with <mask> (Vocab.add_word('<mask>'))")
        self.mask_id = vocab.word2idx[MASK_TOKEN]

    def encode(self, caption: str) -> list[int]:
        return self.vocab.encode(caption)

    def augment(self, caption: str, rng: Any) -> list[int]:
        # every token, <start>/<end> included, draws once: mask 50 %, random id 10 %, delete 40 %
        tokens = ["<start>", *word_tokenize(caption), "<end>"]
        out: list[int] = []
        for tok in tokens:
            p = rng.random()
            if p < self.aug_prob:
                p /= self.aug_prob
                if p < 0.5:
                    out.append(self.mask_id)
                elif p < 0.6:
                    out.append(rng.randrange(len(self.vocab)))  # any id, <pad> and <mask> included
            else:
                out.append(self.vocab(tok))
        return out


class ESABertTokenizer(_AugmentingTokenizer):
    """BERT basic + WordPiece tokenisation with ESA-BERT's whole-word augmentation (never [CLS]/[SEP])."""

    def __init__(self, hf_tokenizer: Any, hardnum: int = 2, aug_prob: float = 0.2) -> None:
        super().__init__(hardnum, aug_prob)
        self.hf_tokenizer = hf_tokenizer
        self.splitter = WordPieceSplitter(hf_tokenizer)
        self.pad_id = self.splitter.pad_id

    def encode(self, caption: str) -> list[int]:
        return encode_word_pieces(self.splitter, caption)

    def augment(self, caption: str, rng: Any) -> list[int]:
        # random replacement draws over the whole vocabulary in file order, special tokens included
        return augment_word_pieces(self.splitter, caption, rng, self.aug_prob)


# ------------------------------------------------------------------------------------------------- model


class ESA(ITMModel):
    """ESA with a BiGRU (`ESABiGRUConfig`) or BERT (`ESABertConfig`) text encoder.

    Children ``img_enc`` and ``txt_enc`` hold upstream's two encoders with upstream's parameter names.
    In training mode ``encode_image`` returns ``hardnum`` views per image; the evaluator uses eval mode.
    """

    input_kind = "regions"
    scoring = "embedding"
    # created but never used upstream (kept so the released checkpoints load strictly): the second
    # BatchNorm of the image MLP, and BERT's pooler (ESA pools the last hidden states itself)
    unused_parameters = ("img_enc.mlp.bns.1.*", "txt_enc.bert.pooler.*")

    def __init__(self, config: ESAConfig) -> None:
        if isinstance(config, ESABiGRUConfig) and config.vocab_size is None:
            config = dataclasses.replace(config, vocab_size=_vocab_size_of(config.vocab_path))
        super().__init__(config)
        self.img_enc = ESAImageEncoder(config.img_dim, config.embed_size, config.no_imgnorm)
        if isinstance(config, ESABiGRUConfig):
            self.text_backbone = "bigru"
            self.txt_enc: nn.Module = ESATextGRU(config)
        elif isinstance(config, ESABertConfig):
            self.text_backbone = "bert"
            self.txt_enc = ESATextBert(config)
        else:
            raise TypeError(f"ESA needs an ESABiGRUConfig or ESABertConfig, got {type(config).__name__}")
        self._tokenizer: _AugmentingTokenizer | None = None

    # -- data plumbing ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> _AugmentingTokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def _make_tokenizer(self) -> _AugmentingTokenizer:
        cfg = self.config
        if self.text_backbone == "bert":
            return ESABertTokenizer(load_hf_tokenizer(cfg.tokenizer), cfg.hardnum, cfg.word_aug_prob)
        return ESAWordTokenizer(self.load_vocab(), cfg.hardnum, cfg.word_aug_prob)

    def load_vocab(self) -> Vocab:
        """The SCAN vocabulary of `config.vocab_path` plus ``<mask>``, checked against the model."""
        cfg = self.config
        # upstream appends <mask> at run time: vocab_size = the json's ids + 1
        return load_scan_vocab(cfg.vocab_path, model="esa_bigru", vocab_size=cfg.vocab_size, sha256=cfg.vocab_sha256,
                               extra_words=(MASK_TOKEN,))

    def save_assets(self, directory: Path) -> dict[str, Any]:
        """BiGRU: the vocabulary in use (file or in memory) as ``vocab.json``; BERT: the tokenizer files in
        ``tokenizer/`` when they are at hand (a local folder or one loaded already), else the hub name stays."""
        cfg = self.config
        if self.text_backbone == "bigru":
            if self._tokenizer is None and not cfg.vocab_path:
                return {}  # nothing to tokenise with yet: the directory says so by vocab_path = null
            vocab = self.tokenizer.vocab  # checked against the model (size, checksum) when read from a file
            words = {w: i for w, i in vocab.word2idx.items() if w != MASK_TOKEN}  # the json never holds <mask>
            Vocab.from_word2idx(words).save(Path(directory) / "vocab.json")
            return {"vocab_path": "vocab.json"}
        if self._tokenizer is None and not Path(cfg.tokenizer).expanduser().is_dir():
            return {}  # a hub name, not loaded: the exact name is in the config
        self.tokenizer.hf_tokenizer.save_pretrained(str(Path(directory) / "tokenizer"))
        return {"tokenizer": "tokenizer"}

    def set_tokenizer(self, tokenizer: _AugmentingTokenizer) -> None:
        """Use a ready tokenizer (e.g. a vocabulary built in memory) instead of the config's files."""
        self._tokenizer = tokenizer

    def image_transform_for(self, train: bool) -> RegionTransform:
        # ESA drops regions inside the image encoder (two views), not in the data as VSE-infinity did
        return RegionTransform(train=False)

    # -- the contract -----------------------------------------------------------------------------
    def encode_image(self, batch: Mapping[str, torch.Tensor], view_keep: torch.Tensor | None = None) -> torch.Tensor:
        lengths = batch.get("region_lengths") if self.config.mask_padded_regions else None
        return self.img_enc(batch["regions"], lengths, self.config.hardnum, self.config.region_drop_prob, view_keep)

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.txt_enc(batch["input_ids"], batch["lengths"])

    def use_max_violation(self) -> bool:
        return self.config.max_violation or self.epoch >= self.config.vse_mean_warmup_epochs

    # The loss depends on the whole batch (hardest positives/negatives): the trainer splits it at the
    # embeddings for exact gradient accumulation, and the embeddings are gathered over DDP ranks.
    accumulation = "exact"

    def train_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"img", "cap"}``, each ``[B, hardnum, E]``: the image views and the caption copies of each pair.

        Caption copies come from ``views_input_ids`` / ``views_lengths`` (the training tokenizer; the
        clean caption repeated when absent); ``region_view_keep`` ``[B, hardnum, R]`` optionally fixes
        the region masks. In eval mode the single image embedding stands for every view.
        """
        h = self.config.hardnum
        img = self.encode_image(batch, view_keep=batch.get("region_view_keep"))
        if not self.img_enc.training:
            img = img.repeat_interleave(h, dim=0)
        if "views_input_ids" in batch:
            ids, lengths = batch["views_input_ids"], batch["views_lengths"]
        else:
            ids, lengths = batch["input_ids"].repeat_interleave(h, 0), batch["lengths"].repeat_interleave(h, 0)
        cap = self.txt_enc(ids, lengths)
        B = batch["regions"].shape[0]
        return {"img": img.reshape(B, h, -1), "cap": cap.reshape(B, h, -1)}

    def train_loss(self, feats: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
        """SEL over every pair of the (global) batch; rows ``k*hardnum + a`` = view a of pair k."""
        from ..distributed import gather_features

        feats = gather_features(dict(feats))
        img = feats["img"].reshape(-1, feats["img"].shape[-1])
        cap = feats["cap"].reshape(-1, feats["cap"].shape[-1])
        cost_im, cost_s = sel_loss(img, cap, self.config.hardnum, self.config.margin, self.use_max_violation())
        return {"loss": cost_im + cost_s, "cost_im": cost_im.detach(), "cost_s": cost_s.detach()}

    # -- hooks ------------------------------------------------------------------------------------
    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """BiGRU: one group (upstream). BERT: text head lr, BERT lr x `bert_lr_mult`, image lr."""
        if self.text_backbone != "bert":
            return super().param_groups(base_lr)
        bert_ids = {id(p) for p in self.txt_enc.bert.parameters()}
        head = [p for p in self.txt_enc.parameters() if id(p) not in bert_ids and p.requires_grad]
        bert = [p for p in self.txt_enc.bert.parameters() if p.requires_grad]
        img = [p for p in self.img_enc.parameters() if p.requires_grad]
        return [{"params": head, "lr": base_lr, "name": "text_head"},
                {"params": bert, "lr": base_lr * self.config.bert_lr_mult, "name": "bert"},
                {"params": img, "lr": base_lr, "name": "image"}]

    def init_pretrained(self) -> None:
        """BiGRU: copy GloVe vectors (if `glove_path`); BERT: load `pretrained` weights (if set)."""
        cfg = self.config
        if self.text_backbone == "bert":
            if cfg.pretrained:
                load_pretrained_weights(self.txt_enc.bert, cfg.pretrained)
            return
        if cfg.glove_path:
            self.init_glove(cfg.glove_path)

    def init_glove(self, path: str) -> tuple[int, list[str]]:
        """ESA's GloVe init: rows of the json words (not ``<mask>``), with ESA's fallback spelling."""
        vocab = self.load_vocab()
        word2idx = {w: i for w, i in vocab.word2idx.items() if w != MASK_TOKEN}
        glove = load_glove(path, glove_candidates(word2idx))
        return init_embedding_from_glove(self.txt_enc.embed.weight, word2idx, glove)


def _vocab_size_of(vocab_path: str | None) -> int:
    """Embedding rows for a SCAN vocabulary file: its ids + ``<mask>``; 8482 (f30k) without a file."""
    if not vocab_path:
        return 8482
    return len(Vocab.load(vocab_path)) + 1


# ------------------------------------------------------------------------------------ official checkpoints


def _unwrap_official(obj: Any) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Any]:
    opt = None
    if isinstance(obj, Mapping):
        opt = obj.get("opt")
        if "model" not in obj:
            raise CheckpointError(f"not an ESA checkpoint: expected a dict with 'model' (a list [img_enc, txt_enc]), "
                                  f"got keys {sorted(map(str, obj))[:8]}")
        obj = obj["model"]
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(p, Mapping) for p in obj)):
        got = f"a list of {len(obj)} parts" if isinstance(obj, (list, tuple)) else f"a {type(obj).__name__}"
        raise CheckpointError(f"not an ESA checkpoint: 'model' holds {got}; ESA files hold 2 state dicts "
                              "[img_enc, txt_enc]")
    for part in obj:
        bad = [k for k, v in part.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"ESA checkpoint holds non-tensor entries {bad[:5]}")
    return obj[0], obj[1], opt


def convert_official(obj: Any, variant: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """The authors' ``model_best.pth`` content -> ``(config overrides, itmzoo state dict, ignorable keys)``.

    The file is ``{'model': [img_enc_sd, txt_enc_sd], 'opt': Namespace, ...}``. BERT files carry
    DataParallel ``module.`` prefixes (stripped) and, from transformers 4.15, the persistent buffer
    ``bert.embeddings.position_ids`` (ignored). The variant and the sizes (``img_dim``, ``embed_size``;
    BiGRU ``vocab_size`` = json + ``<mask>``, ``word_dim``, ``num_layers``) are read from the tensors;
    `variant` ("bigru" / "bert") must agree.
    """
    img, txt, opt = _unwrap_official(obj)
    img, txt = strip_prefixes(img), strip_prefixes(txt)
    if any(k.startswith("bert.") for k in txt):
        detected = "bert"
    elif "embed.weight" in txt and any(k.startswith("rnn.") for k in txt):
        detected = "bigru"
    else:
        raise CheckpointError(f"the text encoder keys look like neither ESA-BiGRU nor ESA-BERT: {sorted(txt)[:8]}")
    if variant is not None and detected != variant:
        raise CheckpointError(f"this is an ESA-{detected.upper()} checkpoint; build it with "
                              f"itmzoo.build('esa_{detected}', checkpoint=...)")
    if opt is not None and getattr(opt, "precomp_enc_type", "basic") != "basic":
        raise CheckpointError(f"checkpoint trained with precomp_enc_type={opt.precomp_enc_type!r} (raw images); "
                              "only the region-feature ('basic') model is ported")
    if "fc.weight" not in img:
        raise CheckpointError(f"image encoder keys do not look like ESA's: {sorted(img)[:8]}")
    embed_size, img_dim = (int(x) for x in img["fc.weight"].shape)
    overrides: dict[str, Any] = {"img_dim": img_dim, "embed_size": embed_size}
    ignorable: list[str] = []
    if detected == "bigru":
        vocab_size, word_dim = (int(x) for x in txt["embed.weight"].shape)
        layers = {int(m.group(1)) for k in txt if (m := re.fullmatch(r"rnn\.weight_ih_l(\d+)", k))}
        overrides.update(vocab_size=vocab_size, word_dim=word_dim, num_layers=max(layers) + 1 if layers else 1)
    else:
        # BERT's architecture is not inferred (its head count is not in the tensors): a file that does not
        # fit the configured one fails the strict load with the mismatching keys and shapes
        ignorable.append("txt_enc.bert.embeddings.position_ids")
    state = {f"img_enc.{k}": v for k, v in img.items()}
    state.update({f"txt_enc.{k}": v for k, v in txt.items()})
    return overrides, state, ignorable


# -------------------------------------------------------------------------------------------- tags + names

# Checked on the copies in Paranioar/SGRAF @ 50d0c6f9 (vocab/): 8481 and 11353 words.

_DRIVE = "Google Drive folder linked from the README of " + UPSTREAM
_PAPER_NOTE = ("expected = paper, single model (ESA); the README table lists the 2-model ensemble ESA*, "
               "evaluated with itmzoo.eval.evaluate_ensemble")

TAGS_BIGRU: dict[str, Tag] = {
    "f30k": Tag(
        overrides={"vocab_size": 8482, "vocab_sha256": SCAN_VOCAB_SHA256["f30k"]}, dataset="f30k",
        source=f"{_DRIVE} (Flickr30K, BiGRU): https://drive.google.com/drive/folders/1u6McZdcu1dTXn9uS9IYH6MsrqNCdJnYo",
        expected={**expected_recalls("f30k-1k", (82.6, 95.9, 98.1, 61.1, 85.9, 91.1, 514.7)),
                  "ensemble2.f30k-1k.rsum": 520.2},
        preprocessing={"regions": "BUTD 36 x 2048 (SCAN precomp)", "vocab": "SCAN f30k_precomp_vocab.json + <mask>",
                       "tokenizer": "nltk word_tokenize (Punkt + Treebank) on lower-cased text"},
        license="MIT", note=_PAPER_NOTE),
    "coco": Tag(
        overrides={"vocab_size": 11354, "vocab_sha256": SCAN_VOCAB_SHA256["coco"]}, dataset="coco",
        source=f"{_DRIVE} (COCO, BiGRU): https://drive.google.com/drive/folders/1gXslTklR_YnkIjpF4QN-eqSFQ52yP1L_",
        expected={**expected_recalls("coco-1k-5fold", (79.6, 96.5, 98.7, 63.5, 90.9, 96.1, 525.3)),
                  **expected_recalls("coco-5k", (58.2, 84.8, 91.8, 41.2, 71.4, 82.2, 429.6)),
                  "ensemble2.coco-1k-5fold.rsum": 527.6, "ensemble2.coco-5k.rsum": 433.5},
        preprocessing={"regions": "BUTD 36 x 2048 (SCAN precomp)", "vocab": "SCAN coco_precomp_vocab.json + <mask>",
                       "tokenizer": "nltk word_tokenize (Punkt + Treebank) on lower-cased text"},
        license="MIT", note=_PAPER_NOTE),
}

TAGS_BERT: dict[str, Tag] = {
    "f30k": Tag(
        dataset="f30k",
        source=f"{_DRIVE} (Flickr30K, BERT-base): https://drive.google.com/drive/folders/1oY-w0q64MeTB83rPRBtqPd1X4oHnkmrj",
        expected={**expected_recalls("f30k-1k", (84.0, 96.3, 98.7, 64.7, 87.8, 92.3, 523.8)),
                  "ensemble2.f30k-1k.rsum": 528.0},
        preprocessing={"regions": "BUTD 36 x 2048 (SCAN precomp)", "tokenizer": "bert-base-uncased, no truncation"},
        license="MIT", note=_PAPER_NOTE),
    "coco": Tag(
        dataset="coco",
        source=f"{_DRIVE} (COCO, BERT-base): https://drive.google.com/drive/folders/1yioepvwz1_59CoICBOqBt-lYnk077v5a",
        expected={**expected_recalls("coco-1k-5fold", (80.3, 96.5, 99.0, 65.2, 91.6, 96.3, 528.9)),
                  **expected_recalls("coco-5k", (59.2, 85.6, 92.8, 43.0, 73.1, 83.6, 437.3)),
                  "ensemble2.coco-1k-5fold.rsum": 531.9, "ensemble2.coco-5k.rsum": 443.0},
        preprocessing={"regions": "BUTD 36 x 2048 (SCAN precomp)", "tokenizer": "bert-base-uncased, no truncation"},
        license="MIT", note=_PAPER_NOTE),
}


_PAPER = "ESA: External Space Attention Aggregation for Image-Text Retrieval (TCSVT 2023)"


@register_model("esa_bigru", config=ESABiGRUConfig, input_kind="regions", scoring="embedding", paper=_PAPER,
                upstream=UPSTREAM, text_backbone="bigru", image_backbone="butd-regions", aliases=("esa",),
                tags=TAGS_BIGRU, converter=functools.partial(convert_official, variant="bigru"),
                tiny={"img_dim": 16, "embed_size": 8, "word_dim": 8, "vocab_path": SYNTHETIC_VOCAB})
def esa_bigru(config: ESABiGRUConfig) -> ESA:
    """ESA with BUTD regions and a BiGRU text encoder (alias ``esa``)."""
    return ESA(config)


@register_model("esa_bert", config=ESABertConfig, input_kind="regions", scoring="embedding", paper=_PAPER,
                upstream=UPSTREAM, text_backbone="bert-base-uncased", image_backbone="butd-regions",
                tags=TAGS_BERT, converter=functools.partial(convert_official, variant="bert"),
                tiny={"img_dim": 16, "embed_size": 8, "bert_config": {"hidden_size": 16, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 120}})
def esa_bert(config: ESABertConfig) -> ESA:
    """ESA with BUTD regions and a BERT-base text encoder."""
    return ESA(config)

