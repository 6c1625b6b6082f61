"""Tiny Hugging Face tokenizer / BERT folders written into a temporary directory (nothing downloaded).

`bert_tokenizer_folder` writes a ``vocab.txt`` (given tokens in order, or a full-size vocabulary that
keeps only some rows at their ids) and saves a `BertTokenizerFast` from it with ``save_pretrained``;
`tiny_bert_folder` adds a randomly initialised `BertModel` with ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer_folder(path: Path, tokens: Sequence[str] | None = None, *, rows: Mapping[int, str] | None = None,
                          size: int | None = None) -> Path:
    """A BERT (uncased WordPiece) tokenizer folder: `tokens` in id order, or `rows` {id: token} in `size` ids
    (other rows are placeholders that no text can match)."""
    from transformers import BertTokenizerFast

    if tokens is not None:
        lines = list(tokens)
    else:
        lines = [f"[unused-{i}]" for i in range(size)]
        for i, t in rows.items():
            lines[int(i)] = t
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    BertTokenizerFast.from_pretrained(str(path), do_lower_case=True).save_pretrained(str(path))
    return path


def bert_base_uncased_slice(path: Path) -> Path:
    """The tokenizer of bert-base-uncased as far as the ESA augmentation fixture needs it (same ids, same size)."""
    data = json.loads((FIXTURES / "esa" / "bert_vocab_slice.json").read_text(encoding="utf-8"))
    return bert_tokenizer_folder(path, rows={int(k): v for k, v in data["tokens"].items()}, size=data["size"])


def tiny_bert_folder(path: Path, tokens: Sequence[str], seed: int = 0, **config: int) -> Path:
    """A tokenizer folder plus a random tiny `BertModel` (``config`` overrides hidden sizes etc.)."""
    import torch
    from transformers import BertConfig, BertModel

    bert_tokenizer_folder(path, tokens)
    cfg = BertConfig(vocab_size=len(tokens), **{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                "intermediate_size": 37, "max_position_embeddings": 64, **config})
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(str(path))
    return path


WORDS = SPECIALS + ["a", "man", "riding", "horse", "dog", "runs", "on", "the", "grass", "two", "men", "hi", "b", "c",
                    "d", "e", "f", "g", "x", ".", "##s"]


def tiny_hf_clip_config():
    """A small transformers `CLIPConfig` (the CLIP ViT-B/16 architecture with tiny widths) for key-map tests."""
    from itmzoo.encoders.backbones import hf_config

    return hf_config("clip-vit-base-patch16", {
        "projection_dim": 16,
        "text_config": {"hidden_size": 24, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "vocab_size": 100, "max_position_embeddings": 12, "eos_token_id": 2, "bos_token_id": 0,
                        "pad_token_id": 1},
        "vision_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}})
