"""SCAN-style word vocabulary and offline word tokenisation.

Ids match SCAN/SGRAF/VSE-infinity: ``<pad>=0, <start>=1, <end>=2, <unk>=3``, then the words of the
vocabulary json in its own order. Tokenisation is SCAN's ``nltk.word_tokenize(caption.lower())``: Punkt
sentence splitting (English parameters shipped in itmzoo, see `itmzoo.data.punkt`), then nltk's Treebank
word tokenizer on each sentence; no nltk data is downloaded.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..features import sequence_mask

__all__ = ["SCAN_VOCAB_SHA256", "SPECIALS", "Vocab", "load_scan_vocab", "word_tokenize"]

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")


def word_tokenize(text: str, sentence_split: bool = True) -> list[str]:
    """``nltk.word_tokenize(text.lower())``, as SCAN/SGRAF/LHSC/ESA tokenise captions, offline.

    Punkt splits the lower-cased text into sentences, so a period that ends an inner sentence is its own
    token (``shirt . he``), while abbreviations keep theirs (``mr.``, ``st.``, ``u.s.``, ``d.c.``).
    ``sentence_split=False`` is nltk's ``preserve_line=True`` (Treebank only): such a period then stays
    on its word (``shirt.``), which the SCAN vocabularies do not contain.
    """
    from nltk.tokenize import word_tokenize as _wt

    from .punkt import sent_tokenize

    text = text.lower()
    sentences = sent_tokenize(text) if sentence_split else [text]
    return [tok for sent in sentences for tok in _wt(sent, preserve_line=True)]


class Vocab:
    """A word <-> id table with SCAN's special tokens and json format."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for w in SPECIALS:
            self.add_word(w)
        for w in words:
            self.add_word(w)

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            idx = len(self.word2idx)
            self.word2idx[word] = idx
            self.idx2word[idx] = word
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.word2idx)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx["<unk>"])

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    @property
    def pad_id(self) -> int:
        return self.word2idx["<pad>"]

    def encode(self, caption: str) -> list[int]:
        """``[<start>] + ids(tokens) + [<end>]`` as SCAN builds a caption."""
        return [self.word2idx["<start>"], *(self(t) for t in word_tokenize(caption)), self.word2idx["<end>"]]

    def encode_batch(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded ids, attention mask and lengths (specials included) of a list of captions."""
        seqs = [self.encode(c) for c in captions]
        return pad_ids(seqs, self.pad_id)

    # -- files ------------------------------------------------------------------------------------
    @classmethod
    def from_captions(cls, captions: Iterable[str], threshold: int = 4) -> "Vocab":
        """Words of count >= `threshold` after tokenisation, most frequent first (ties alphabetical)."""
        counter: collections.Counter[str] = collections.Counter()
        for c in captions:
            counter.update(word_tokenize(c))
        words = sorted((w for w, n in counter.items() if n >= threshold and w not in SPECIALS),
                       key=lambda w: (-counter[w], w))
        return cls(words)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        """Read a SCAN vocab json (``word2idx``, ``idx2word``, ``idx``)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or "word2idx" not in data:
            raise ValueError(f"{p}: expected a SCAN vocab json with 'word2idx', 'idx2word', 'idx'")
        return cls.from_word2idx(data["word2idx"], source=str(p))

    @classmethod
    def from_word2idx(cls, word2idx: dict[str, int], source: str = "word2idx") -> "Vocab":
        ids = sorted(word2idx.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"{source}: ids must be 0..{len(ids) - 1} without gaps")
        v = cls.__new__(cls)
        v.word2idx = dict(word2idx)
        v.idx2word = {i: w for w, i in word2idx.items()}
        for i, w in enumerate(SPECIALS):
            if v.word2idx.get(w) != i:
                raise ValueError(f"{source}: special token {w} must have id {i}, has {v.word2idx.get(w)}")
        return v

    def to_json(self) -> dict:
        return {"word2idx": self.word2idx, "idx2word": {str(i): w for i, w in self.idx2word.items()},
                "idx": len(self)}

    def save(self, path: str | Path) -> None:
        from ..checkpoints.atomic import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_json()))

    def sha256(self) -> str:
        """Checksum of the id table, so a checkpoint can tell which vocabulary it was trained with."""
        blob = json.dumps(sorted(self.word2idx.items(), key=lambda kv: kv[1]), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` right-padded with `pad_id`, ``attention_mask`` and ``lengths`` of token id lists."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    # at least one column, so an empty caption still makes a (fully padded) batch
    L = max(1, int(lengths.max())) if len(seqs) else 1
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    mask = sequence_mask(lengths, L).long()
    return {"input_ids": ids, "attention_mask": mask, "lengths": lengths}


#: `Vocab.sha256` of SCAN's vocabulary files (identical blobs in SCAN, SGRAF, LHSC and the VSE-infinity
#: family: ``vocab/{f30k,coco}_precomp_vocab.json``); a different file gives different word ids
SCAN_VOCAB_SHA256 = {
    "f30k": "5c5c542884188fffb3b3ed151be62b60d301d19bb50ee5c6b80cbae1328290bd",
    "coco": "2a317734d6702f94e4d01bf348a95167cdebb14598b36abd7c18ab1437d415bc",
}


def load_scan_vocab(path: str | Path | None, *, model: str, vocab_size: int | None = None,
                    sha256: str | None = None, extra_words: Sequence[str] = ()) -> "Vocab":
    """A SCAN vocabulary checked against the model that will use it.

    `extra_words` are appended after the file's ids (ESA's ``<mask>``); the id count must then equal
    the model's embedding rows `vocab_size` (when given) and the file's id table must match `sha256`
    (when given). Every failure is one error naming the file and what was expected.
    """
    if not path:
        raise ValueError(f"{model} needs its SCAN vocabulary to tokenise captions: set vocab_path, e.g. "
                         f"itmzoo.build('{model}', vocab_path='vocab/f30k_precomp_vocab.json')")
    vocab = Vocab.load(path)
    if sha256 and vocab.sha256() != sha256:
        raise ValueError(f"{path}: vocabulary checksum {vocab.sha256()} differs from the expected {sha256} "
                         "(a different vocabulary gives wrong word ids)")
    n_file = len(vocab)
    for w in extra_words:
        vocab.add_word(w)
    if vocab_size is not None and len(vocab) != vocab_size:
        extra = f" + {', '.join(extra_words)}" if extra_words else ""
        raise ValueError(f"{path}: {n_file} ids{extra} = {len(vocab)}, but the {model} embedding has "
                         f"vocab_size={vocab_size} rows")
    return vocab
