"""Hugging Face text transformers (BERT, RoBERTa) built offline from a config dict.

* `build_hf_text_model(config)`: the architecture from a plain dict (``{"model_type": "bert", ...}``),
  random weights, no network. Configs of the usual backbones are constants here (`BERT_BASE_UNCASED`).
* `load_hf_pretrained(model, source)`: fills it from a local folder or a hub id, only when asked, and
  checks that every tensor fits (no silent partial loads).
* `load_hf_tokenizer(source)` and `WordPieceSplitter`: BERT's *basic* tokenisation followed by WordPiece
  per word, which the VSE-infinity family augments word by word. transformers 5 removed
  ``BertTokenizer.basic_tokenizer``; the fast tokenizer's normalizer + pre-tokenizer + WordPiece model
  give the same pieces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["BERT_BASE_UNCASED", "HFTextError", "WordPieceSplitter", "build_hf_text_model", "load_hf_pretrained",
           "load_hf_tokenizer"]

#: bert-base-uncased's architecture (the values of its hub config.json)
BERT_BASE_UNCASED: dict[str, Any] = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "pad_token_id": 0,
}

#: state-dict keys that differ between transformers versions (persistent buffers in old ones)
VERSION_DEPENDENT_KEYS = ("*embeddings.position_ids", "*embeddings.token_type_ids")


class HFTextError(RuntimeError):
    """A text backbone cannot be built, loaded or does not fit its config."""


def build_hf_text_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """A randomly initialised transformers model (with pooler, as ``AutoModel``) from a config dict."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise HFTextError(f"text backbone config needs a 'model_type' (e.g. 'bert'), got keys {sorted(config)}")
    try:
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
    except ValueError as e:
        raise HFTextError(f"cannot build a {model_type!r} config: {e}") from e
    return AutoModel.from_config(hf_cfg)


def _local(source: str) -> Path | None:
    p = Path(source).expanduser()
    return p if p.exists() else None


def load_hf_pretrained(model: torch.nn.Module, source: str) -> None:
    """Copy pretrained weights from `source` (local folder or hub id) into `model`, all tensors or none."""
    from transformers import AutoModel

    local = _local(source)
    try:
        pretrained = AutoModel.from_pretrained(str(local) if local else source,
                                               **({"local_files_only": True} if local else {}))
    except OSError as e:
        raise HFTextError(
            f"cannot load pretrained text weights from {source!r}: not a local folder and the hub is unreachable or "
            f"the id is unknown ({type(e).__name__}). Download it once and pass the folder, or set the config's "
            "pretrained field to None for random weights."
        ) from e
    import fnmatch

    own, theirs = model.state_dict(), pretrained.state_dict()
    skip = lambda k: any(fnmatch.fnmatchcase(k, p) for p in VERSION_DEPENDENT_KEYS)  # noqa: E731
    missing = sorted(k for k in own if k not in theirs and not skip(k))
    unexpected = sorted(k for k in theirs if k not in own and not skip(k))
    shapes = sorted(k for k in own if k in theirs and own[k].shape != theirs[k].shape)
    if missing or unexpected or shapes:
        raise HFTextError(f"{source!r} does not fit the configured text backbone: missing {missing[:6]}, "
                          f"unexpected {unexpected[:6]}, shape mismatches {shapes[:6]}")
    model.load_state_dict({k: v for k, v in theirs.items() if k in own}, strict=False)


def load_hf_tokenizer(source: str) -> Any:
    """A fast tokenizer from a local folder or hub id."""
    from transformers import AutoTokenizer

    local = _local(source)
    try:
        return AutoTokenizer.from_pretrained(str(local) if local else source,
                                             **({"local_files_only": True} if local else {}))
    except OSError as e:
        raise HFTextError(f"cannot load a tokenizer from {source!r}: not a local folder and the hub is unreachable "
                          f"or the id is unknown ({type(e).__name__}). Pass a local folder.") from e


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
