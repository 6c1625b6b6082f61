"""Text tokenizers that produce the contract's text batch (``input_ids``, ``attention_mask``, ``lengths``).

* `HFTokenizer`: BERT / RoBERTa (any transformers tokenizer) from a local folder or a hub name.
  Nothing is downloaded unless the name is not a local folder and the hub is reachable; offline, a
  clear error says to pass a local folder.
* `CLIPTokenizer`: OpenAI CLIP's byte-level BPE (the ``SimpleTokenizer`` of CLIP, open_clip and ESL),
  reading the BPE merges shipped in this package (``assets/bpe_simple_vocab_16e6.txt.gz``, MIT,
  OpenAI) or a local file/folder. Context length 77 as upstream.
* The SCAN word vocabulary is `itmzoo.data.vocab.Vocab`.

Upstream maximum lengths: VSE-infinity/ESA/ESL BERT: none; ALBEF: 30; BLIP: 35; Multi-SEA RoBERTa:
40 (padded to 40); CLIP: 77 (padded to 77).
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path
from typing import Any, Sequence

import torch

from .vocab import pad_ids

__all__ = ["CLIP_BPE_PATH", "CLIPTokenizer", "HFTokenizer", "TokenizerError"]

CLIP_BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# sha256 of the shipped file (identical to OpenAI CLIP's and open_clip's)
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


class TokenizerError(RuntimeError):
    """A tokenizer cannot be loaded (missing files, unreachable hub)."""


class HFTokenizer:
    """A transformers tokenizer as a contract tokenizer: ``tok(captions, train=False) -> dict``.

    Args:
        name_or_path: a local folder (``vocab.txt`` / ``tokenizer.json`` ...) or a hub name such as
            ``bert-base-uncased``; a hub name needs the hub (or its cache) and fails clearly offline.
        max_length: truncate to this many tokens, specials included (``None``: no truncation, as
            VSE-infinity, but never beyond the model's limit).
        pad_to_max_length: pad every batch to `max_length` (ALBEF/BLIP/Multi-SEA use
            ``padding='max_length'``); otherwise pad to the longest caption of the batch.
    """

    def __init__(self, name_or_path: str | Path, max_length: int | None = None,
                 pad_to_max_length: bool = False) -> None:
        self.name_or_path = str(name_or_path)
        if pad_to_max_length and max_length is None:
            raise ValueError("pad_to_max_length needs max_length")
        self.max_length, self.pad_to_max_length = max_length, pad_to_max_length
        self.tokenizer = load_auto_tokenizer(self.name_or_path)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, captions: Sequence[str], train: bool = False) -> dict[str, torch.Tensor]:
        limit = self.max_length
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if limit is None and isinstance(model_max, int) and model_max < 100_000:
            limit = model_max  # only guards against position-embedding overflow; captions are short
        enc = self.tokenizer(list(captions), padding="max_length" if self.pad_to_max_length else "longest",
                             truncation=limit is not None, max_length=limit, return_tensors="pt")
        mask = enc["attention_mask"].long()
        return {"input_ids": enc["input_ids"].long(), "attention_mask": mask, "lengths": mask.sum(1)}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name_or_path!r}, max_length={self.max_length})"


def load_auto_tokenizer(source: str) -> Any:
    """A transformers tokenizer from a local folder, the local hub cache, or the hub; clear errors offline."""
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise TokenizerError(f"{local} is a file; pass the folder that holds the tokenizer files")
        try:
            return AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read a tokenizer from the folder {local} ({e})") from e
    if source.startswith((".", "/", "~")) or "\\" in source:
        raise TokenizerError(f"tokenizer folder not found: {local}")
    try:  # the local hub cache first: no network when the name was downloaded before
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"cannot load the tokenizer {source!r}: it is not a local folder, not in the Hugging Face cache, and "
            f"the hub is unreachable (offline?) or has no such name ({type(e).__name__}). Download it once "
            "elsewhere (e.g. `huggingface-cli download NAME`) and pass the local folder instead.") from e


# ---------------------------------------------------------------------------------------------------
# CLIP BPE (port of OpenAI CLIP's simple_tokenizer.py, MIT License, Copyright (c) 2021 OpenAI)


@functools.lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode character table of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


def _basic_clean(text: str) -> str:
    try:
        import ftfy  # upstream always runs it; without it, text is used as given (same on plain ASCII)

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return html.unescape(html.unescape(text)).strip()


@functools.lru_cache(maxsize=4)
def _clip_tables(path: str) -> tuple[list[tuple[str, str]], str]:
    """The 48,894 merges of a CLIP BPE file (``.txt.gz`` as shipped by CLIP) or folder (``merges.txt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "merges.txt"
    if not p.is_file():
        raise TokenizerError(f"CLIP BPE merges not found: {p} (expected bpe_simple_vocab_16e6.txt.gz or a folder "
                             "with merges.txt)")
    raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    # line 0 is a header ("bpe_simple_vocab_16e6.txt#version: 0.2" / "#version: 0.2"); CLIP keeps 49152-256-2 merges
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
    return merges, str(p)  # type: ignore[return-value]


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer: ``[SOT] + bpe(clean(text).lower()) + [EOT]``, zero-padded to 77.

    Args:
        bpe_path: the merges file (``bpe_simple_vocab_16e6.txt.gz``) or a folder with ``merges.txt``
            (Hugging Face layout); default: the copy shipped in this package.
        context_length: 77 for every CLIP model.
        truncate: ``"eot"`` cuts to `context_length` and ends with EOT (OpenAI ``clip.tokenize(...,
            truncate=True)`` and open_clip); ``"cut"`` keeps the first `context_length` tokens, which can
            drop the EOT (ESL's ``SimpleTokenizer``).
        pad_to_context: pad every batch to `context_length` as upstream (positional embeddings and
            EOT-argmax pooling then see the same layout); ``False`` pads to the longest caption.
    """

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = 77, truncate: str = "eot",
                 pad_to_context: bool = True) -> None:
        if truncate not in ("eot", "cut"):
            raise ValueError(f"truncate must be 'eot' or 'cut', got {truncate!r}")
        import regex

        merges, self.bpe_path = _clip_tables(str(bpe_path or CLIP_BPE_PATH))
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        vocab.extend(["<|startoftext|>", "<|endoftext|>"])
        self.encoder = {w: i for i, w in enumerate(vocab)}
        self.decoder = {i: w for w, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)
        self.sot_id, self.eot_id = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.context_length, self.truncate, self.pad_to_context = context_length, truncate, pad_to_context

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def pad_id(self) -> int:
        return 0

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without SOT/EOT."""
        text = " ".join(_basic_clean(text).split()).strip().lower()
        ids: list[int] = []
        for tok in self.pat.findall(text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(tok).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, captions: Sequence[str], train: bool = False) -> dict[str, torch.Tensor]:
        L = self.context_length
        seqs = []
        for c in captions:
            ids = [self.sot_id, *self.encode(c), self.eot_id]
            if len(ids) > L:
                ids = ids[:L]
                if self.truncate == "eot":
                    ids[-1] = self.eot_id
            seqs.append(ids)
        out = pad_ids(seqs, 0)
        if self.pad_to_context and out["input_ids"].shape[1] < L:
            extra = L - out["input_ids"].shape[1]
            out["input_ids"] = torch.nn.functional.pad(out["input_ids"], (0, extra))
            out["attention_mask"] = torch.nn.functional.pad(out["attention_mask"], (0, extra))
        return out

    def __repr__(self) -> str:
        return f"CLIPTokenizer({self.bpe_path!r}, context_length={self.context_length}, truncate={self.truncate!r})"

