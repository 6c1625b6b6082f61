"""Word-embedding + (Bi)GRU text encoder over a SCAN vocabulary, and a local GloVe reader.

`WordGRUEncoder` is the token part of VSE-infinity's BiGRU ``EncoderText`` (branch ``bigru``) and of
ESA-BiGRU's: ``Embedding -> Dropout -> GRU`` on packed sequences, the two directions averaged. It
returns per-token features and a mask; pooling is left to the method. Children are named ``embed``,
``rnn``, ``dropout`` as upstream, so checkpoints map one to one.

GloVe: torchtext (which the seed repos use) cannot be installed with torch 2.x, so `load_glove` reads
the files itself with torchtext's parsing rules (protocol spec, section 5). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..features import sequence_mask

__all__ = ["WordGRUEncoder", "esa_glove_key", "glove_candidates", "init_embedding_from_glove", "load_glove",
           "sequence_mask"]


class WordGRUEncoder(nn.Module):
    """``Embedding(V, word_dim) -> Dropout -> GRU(word_dim, hidden)``, directions averaged.

    `embed_init`: ``"normal"`` keeps PyTorch's N(0, 1) (ESA), ``"uniform"`` draws U(-0.1, 0.1)
    (VSE-infinity bigru, SCAN).
    """

    def __init__(self, vocab_size: int, word_dim: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = True, embed_dropout: float = 0.0, embed_init: str = "normal") -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.bidirectional = bidirectional
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.dropout = nn.Dropout(embed_dropout)
        if embed_init == "uniform":
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        elif embed_init != "normal":
            raise ValueError(f"embed_init must be 'normal' or 'uniform', got {embed_init!r}")

    def token_features(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, Lmax, hidden], mask [B, Lmax])`` with ``Lmax = max(lengths)``; padded outputs are 0.

        Lengths are clamped to at least 1 (an empty caption reads its first, padding, token), as ESA does.
        """
        x = self.dropout(self.embed(input_ids))
        lengths = lengths.clamp(min=1)
        if x.is_cuda:
            self.rnn.flatten_parameters()
        # enforce_sorted=False sorts and unsorts internally: identical to ESA's manual sort/unsort
        packed = pack_padded_sequence(x, lengths.cpu().long(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        if self.bidirectional:
            half = out.shape[-1] // 2
            out = (out[..., :half] + out[..., half:]) / 2
        return out, sequence_mask(lengths.to(out.device), out.shape[1])

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_features(input_ids, lengths)


# ------------------------------------------------------------------------------------------------- GloVe


def esa_glove_key(word: str) -> str:
    """ESA's fallback spelling of a vocabulary word missing from GloVe: strip ``- . '``, cut at ``/``."""
    word = word.replace("-", "").replace(".", "").replace("'", "")
    if "/" in word:
        word = word.split("/")[0]
    return word


def _text_lines(path: Path) -> Iterator[bytes]:
    name = path.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.lower().endswith(".txt")]
            if not members:
                raise ValueError(f"{path}: no .txt member inside the zip")
            with zf.open(members[0]) as f:
                yield from f
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield from f
    else:
        with open(path, "rb") as f:
            yield from f


def load_glove(path: str | Path, words: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Word vectors of a GloVe file as ``{word: float32 vector}``.

    Accepts ``.txt``, ``.txt.gz``, ``.zip`` and torchtext's ``.pt`` cache (read with
    ``weights_only=True``). Text parsing follows torchtext: split each line on the byte ``b" "`` (so
    non-breaking spaces stay inside tokens), skip one-value header lines, skip words that are not UTF-8,
    fail on a dimension change; a repeated word keeps its **last** vector (torchtext's ``stoi``).
    With `words`, only those words are kept (the 840B file has 2.2M rows; a vocabulary needs ~10K).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"GloVe file not found: {p} (expected e.g. glove.840B.300d.txt, .zip or torchtext's .pt cache; "
            "itmzoo never downloads it)"
        )
    keep = set(words) if words is not None else None
    if p.name.endswith(".pt"):
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if not (isinstance(obj, (tuple, list)) and len(obj) >= 3):
            raise ValueError(f"{p}: expected torchtext's cache tuple (itos, stoi, vectors, dim)")
        stoi, vectors = obj[1], obj[2]
        return {w: vectors[i].numpy().astype(np.float32) for w, i in stoi.items() if keep is None or w in keep}
    out: dict[str, np.ndarray] = {}
    dim = None
    for line in _text_lines(p):
        entries = line.rstrip().split(b" ")
        word_b, values = entries[0], entries[1:]
        if len(values) == 1:
            continue  # a header such as "2196017 300"
        if dim is None and len(values) > 1:
            dim = len(values)
        elif dim != len(values):
            raise ValueError(f"{p}: vector for {word_b!r} has {len(values)} values, expected {dim}")
        try:
            word = word_b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if keep is not None and word not in keep:
            continue
        out[word] = np.array([float(v) for v in values], dtype=np.float32)
    return out


def init_embedding_from_glove(weight: torch.Tensor, word2idx: Mapping[str, int], glove: Mapping[str, np.ndarray],
                              key_fn: Callable[[str], str] = esa_glove_key) -> tuple[int, list[str]]:
    """Copy GloVe vectors into the rows of `weight` (in place) for the words of `word2idx`.

    A word missing from GloVe is looked up again as ``key_fn(word)`` (ESA's rule by default); rows
    that are not found keep their values. Returns ``(found, missing_words)``. Lookup is case-sensitive,
    like torchtext.
    """
    missing = []
    found = 0
    dim = weight.shape[1]
    with torch.no_grad():
        for word, idx in word2idx.items():
            key = word if word in glove else key_fn(word)
            vec = glove.get(key)
            if vec is None:
                missing.append(key)
                continue
            if vec.shape[0] != dim:
                raise ValueError(f"GloVe vectors have {vec.shape[0]} dims but the embedding has {dim}")
            weight[idx] = torch.from_numpy(vec)
            found += 1
    return found, missing


def glove_candidates(words: Iterable[str], key_fn: Callable[[str], str] = esa_glove_key) -> set[str]:
    """Every spelling `init_embedding_from_glove` may look up for `words` (to read only those)."""
    out: set[str] = set()
    for w in words:
        out.add(w)
        out.add(key_fn(w))
    return out

