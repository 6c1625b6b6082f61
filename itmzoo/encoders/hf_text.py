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

from typing import Any, Mapping, Sequence

import torch

__all__ = ["HFTextError", "WordPieceSplitter", "augment_word_pieces", "build_hf_text_model", "encode_word_pieces",
           "load_hf_tokenizer"]


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
