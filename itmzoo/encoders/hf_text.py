"""Hugging Face text transformers (BERT, RoBERTa) built offline, and their tokenizers.

* `build_hf_text_model(arch, overrides)`: the architecture written down in
  `itmzoo.encoders.backbones` (no network), random weights; pretrained weights are loaded only when a
  config asks (`backbones.load_pretrained_weights`).
* `load_hf_tokenizer(source)` and `WordPieceSplitter`: BERT's *basic* tokenisation followed by WordPiece
  per word, which the VSE-infinity family augments word by word. transformers 5 removed
  ``BertTokenizer.basic_tokenizer``; the fast tokenizer's normalizer + pre-tokenizer + WordPiece model
  give the same pieces.
"""

from __future__ import annotations

import random as _random
import re
from typing import Any, Mapping, Sequence

import torch

__all__ = ["HFTextError", "WordPieceSplitter", "WordPieceTokenizer", "augment_word_pieces", "build_hf_text_model",
           "encode_word_pieces", "load_hf_tokenizer"]


class HFTextError(RuntimeError):
    """A text backbone or tokenizer cannot be built or loaded."""


def build_hf_text_model(arch: str = "bert-base-uncased", overrides: Mapping[str, Any] | None = None,
                        attention: str | None = None) -> torch.nn.Module:
    """A randomly initialised transformers text model (with pooler, as ``AutoModel``), offline.

    `arch` names an architecture of `itmzoo.encoders.backbones.ARCHITECTURES` (``bert-base-uncased``,
    ``roberta-base`` for Multi-SEA); `overrides` change its fields (tests use tiny sizes). `attention`:
    ``"sdpa"`` (transformers' default, ``F.scaled_dot_product_attention``) or ``"eager"``. Pretrained
    weights: `backbones.load_pretrained_weights` (roberta-base's hub file has no pooler: pass
    ``allow_missing=("pooler.*",)``).
    """
    from transformers import AutoModel

    from .backbones import hf_config

    kwargs = {"attn_implementation": attention} if attention else {}
    return AutoModel.from_config(hf_config(arch, overrides), **kwargs)


def load_hf_tokenizer(source: str) -> Any:
    """A fast tokenizer from a local folder or hub id (one loader for the whole package)."""
    from ..data.tokenizers import load_auto_tokenizer

    return load_auto_tokenizer(source)


class WordPieceSplitter:
    """``text -> [[piece ids of word 1], [piece ids of word 2], ...]`` with BERT's basic tokenisation.

    Equivalent to ``[wordpiece_tokenizer.tokenize(w) for w in basic_tokenizer.tokenize(text)]`` of the
    old slow ``BertTokenizer`` (clean text, CJK spacing, lower-casing + accent stripping, punctuation
    split, greedy longest-match WordPiece, ``[UNK]`` for unsplittable or over-long words).
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.pre_tokenizer is None:
            raise HFTextError(f"{type(tokenizer).__name__} has no fast backend with a pre-tokenizer; "
                              "word-level augmentation needs a fast BERT-style tokenizer")
        self.tokenizer = tokenizer
        self._backend = backend
        vocab = tokenizer.get_vocab()
        # upstream draws random tokens with random.choice(list(vocab.keys())): vocab.txt order = id order
        self.ids_in_vocab_order = sorted(vocab.values())
        self.pad_id = tokenizer.pad_token_id
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id

    def words(self, text: str) -> list[str]:
        norm = self._backend.normalizer.normalize_str(text) if self._backend.normalizer else text
        return [w for w, _ in self._backend.pre_tokenizer.pre_tokenize_str(norm)]

    def pieces(self, word: str) -> list[int]:
        return [t.id for t in self._backend.model.tokenize(word)]

    def __call__(self, text: str) -> list[list[int]]:
        return [self.pieces(w) for w in self.words(text)]


def augment_word_pieces(splitter: WordPieceSplitter, caption: str, rng: Any, prob: float = 0.2,
                        random_ids: Sequence[int] | None = None) -> list[int]:
    """VSE-infinity's whole-word caption augmentation: ``[CLS] + altered pieces + [SEP]``.

    One ``rng.random()`` per basic word; with probability `prob` the word is altered: (draw rescaled to
    [0, 1)) < 0.5 masks every piece, < 0.6 replaces every piece by a random entry of `random_ids` (one
    ``rng.choice`` per piece; default: the whole vocabulary in id order, special tokens included, as
    upstream), otherwise the word is deleted (upstream's comment says "keep"; its code deletes).
    ESA-BERT, ESL and SCTA all augment this way.
    """
    pool = splitter.ids_in_vocab_order if random_ids is None else random_ids
    out: list[int] = []
    for pieces in splitter(caption):
        p = rng.random()
        if p < prob:
            p /= prob
            if p < 0.5:
                out.extend([splitter.mask_id] * len(pieces))
            elif p < 0.6:
                out.extend(rng.choice(pool) for _ in pieces)
        else:
            out.extend(pieces)
    return [splitter.cls_id, *out, splitter.sep_id]


def encode_word_pieces(splitter: WordPieceSplitter, caption: str) -> list[int]:
    """``[CLS] + every word's pieces + [SEP]`` (no truncation), as the BERT-based methods tokenise."""
    return [splitter.cls_id, *(i for word in splitter(caption) for i in word), splitter.sep_id]


class WordPieceTokenizer:
    """``tokenizer(captions, train=False, rng=None)``: BERT ids ``[CLS] pieces [SEP]`` (no truncation),
    right-padded (``input_ids``, ``attention_mask``, ``lengths``); with `augment`, training captions get
    the whole-word augmentation of `augment_word_pieces` (draws from `rng`, a ``random.Random``, or
    Python's global ``random``, which the loader seeds per worker).

    `source` is a loaded fast tokenizer, or a folder / hub id loaded on first use. With
    `no_special_random`, random replacements never draw a bracketed special token (``[PAD]``, ...).
    """

    def __init__(self, source: Any, augment: bool = True, aug_prob: float = 0.2,
                 no_special_random: bool = False) -> None:
        self.source, self.augment_train, self.aug_prob = source, augment, aug_prob
        self.no_special_random = no_special_random
        self._splitter: WordPieceSplitter | None = None
        self._random_ids: list[int] | None = None

    @property
    def splitter(self) -> WordPieceSplitter:
        if self._splitter is None:
            hf = load_hf_tokenizer(self.source) if isinstance(self.source, str) else self.source
            self._splitter = WordPieceSplitter(hf)
        return self._splitter

    @property
    def pad_id(self) -> int:
        return self.splitter.pad_id

    @property
    def random_ids(self) -> list[int]:
        """The ids a random replacement draws from, in vocabulary order."""
        if self._random_ids is None:
            ids = self.splitter.ids_in_vocab_order
            if self.no_special_random:
                inv = {i: t for t, i in self.splitter.tokenizer.get_vocab().items()}
                ids = [i for i in ids if not re.fullmatch(r"\[.*\]", inv[i])]
            self._random_ids = ids
        return self._random_ids

    def encode(self, caption: str) -> list[int]:
        return encode_word_pieces(self.splitter, caption)

    def augment(self, caption: str, rng: Any) -> list[int]:
        return augment_word_pieces(self.splitter, caption, rng, self.aug_prob, self.random_ids)

    def __call__(self, captions: Sequence[str], train: bool = False, rng: Any = None) -> dict[str, torch.Tensor]:
        from ..data.vocab import pad_ids

        if isinstance(captions, str):
            captions = [captions]
        if train and self.augment_train:
            rng = _random if rng is None else rng
            return pad_ids([self.augment(c, rng) for c in captions], self.pad_id)
        return pad_ids([self.encode(c) for c in captions], self.pad_id)
