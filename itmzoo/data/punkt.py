"""Punkt sentence splitting with English parameters shipped in the package (no nltk data download).

SCAN-style code tokenises a caption with ``nltk.word_tokenize(caption.lower())``, which first splits it
into sentences with nltk's Punkt model and then runs the Treebank word tokenizer on each sentence, so a
period that ends an inner sentence becomes its own token (``shirt . he``). Punkt needs its trained
English parameters (nltk's ``punkt_tab`` data: abbreviation types, collocations, sentence starters and
orthographic contexts). They are shipped here as ``assets/punkt_english.json.gz`` (Apache License 2.0,
see ``assets/punkt_english.LICENSE.txt``), checked against a fixed sha256 when first used, and fed to
nltk's own ``PunktSentenceTokenizer``, so the algorithm is nltk's and only the data is ours.

``python -m itmzoo.data.punkt PUNKT_TAB_ENGLISH_DIR OUT.json.gz`` rebuilds the asset from an nltk
``tokenizers/punkt_tab/english`` folder (the output is byte-reproducible).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["ASSET", "ASSET_SHA256", "punkt_parameters", "sent_tokenize", "write_asset"]

ASSET = Path(__file__).parent / "assets" / "punkt_english.json.gz"
ASSET_SHA256 = "1347fa106fe574e86a9cfe1a79279d5f4a914d1f402cf24dfa38200766a6cb91"


def _read_asset(path: Path = ASSET, sha256: str | None = ASSET_SHA256) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"Punkt parameters not found: {path} (the itmzoo package is incomplete)")
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"{path}: sha256 {digest} differs from the expected {sha256} (corrupted or replaced file)")
    data = json.loads(gzip.decompress(blob).decode("utf-8"))
    for key in ("abbrev_types", "collocations", "sent_starters", "ortho_context"):
        if key not in data:
            raise ValueError(f"{path}: missing {key!r}")
    return data


@functools.lru_cache(maxsize=1)
def punkt_parameters() -> Any:
    """nltk ``PunktParameters`` for English, from the shipped asset (read and checked once)."""
    from nltk.tokenize.punkt import PunktParameters

    data = _read_asset()
    params = PunktParameters()
    params.abbrev_types = set(data["abbrev_types"])
    params.collocations = {tuple(c) for c in data["collocations"]}
    params.sent_starters = set(data["sent_starters"])
    params.ortho_context.update({w: int(f) for w, f in data["ortho_context"].items()})  # stays a defaultdict
    return params


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(punkt_parameters())  # a PunktParameters object is taken as trained


def sent_tokenize(text: str) -> list[str]:
    """English sentences of `text`, as ``nltk.sent_tokenize(text)`` with the punkt_tab English model."""
    return _tokenizer().tokenize(text)


def write_asset(punkt_tab_dir: str | Path, out: str | Path) -> str:
    """Convert an nltk ``punkt_tab/english`` folder into the asset format; returns the file's sha256."""
    d = Path(punkt_tab_dir)

    def lines(name: str) -> list[str]:
        p = d / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not a punkt_tab folder (expected {name})")
        return [ln for ln in p.read_text(encoding="utf-8").split("\n") if ln]

    def pairs(name: str) -> list[list[str]]:
        rows = [ln.split("\t") for ln in lines(name)]
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise ValueError(f"{d / name}: expected two tab-separated fields per line, got {bad[0]!r}")
        return rows

    data = {
        "abbrev_types": sorted(set(lines("abbrev_types.txt"))),
        "collocations": sorted({tuple(r) for r in pairs("collocations.tab")}),
        "sent_starters": sorted(set(lines("sent_starters.txt"))),
        "ortho_context": {w: int(f) for w, f in sorted(pairs("ortho_context.tab"))},
    }
    raw = json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(raw)
    blob = buf.getvalue()
    Path(out).write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m itmzoo.data.punkt PUNKT_TAB_ENGLISH_DIR OUT.json.gz")
    print(write_asset(sys.argv[1], sys.argv[2]))
