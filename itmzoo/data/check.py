"""``itmzoo data check PATH``: is a downloaded dataset what the readers and the released weights expect?

Checks a SCAN precomp folder (every ``{split}_ims.npy`` + ``{split}_caps.txt`` pair: counts, feature
shape and dtype, captions per image, empty lines, the optional ids file), the SCAN vocabulary json
files in it or given (size, `Vocab.sha256` against the known SCAN tables, share of unknown words in
the captions) and a Karpathy split json (images and sentences per split, and with an image folder,
how many listed images are missing).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from .readers import DataError, _blank_tail, _per_image, _read_captions

__all__ = ["CheckReport", "check_data"]

PRECOMP_SPLITS = ("train", "dev", "test", "testall")
BUTD_SHAPE = (36, 2048)


@dataclasses.dataclass
class CheckReport:
    """Lines of findings; `errors` counts the ones that make the data unusable."""

    lines: list[str] = dataclasses.field(default_factory=list)
    errors: int = 0
    warnings: int = 0

    def ok(self, msg: str) -> None:
        self.lines.append(f"  ok    {msg}")

    def warn(self, msg: str) -> None:
        self.warnings += 1
        self.lines.append(f"  warn  {msg}")

    def error(self, msg: str) -> None:
        self.errors += 1
        self.lines.append(f"  ERROR {msg}")

    def text(self) -> str:
        return "\n".join(self.lines)


def _captions(path: Path, report: CheckReport) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        caps = _read_captions(path)
    for w in caught:
        report.warn(str(w.message))
    return caps


def _check_precomp_split(root: Path, split: str, report: CheckReport) -> dict | None:
    ims_path, caps_path = root / f"{split}_ims.npy", root / f"{split}_caps.txt"
    if not ims_path.is_file():
        report.error(f"{caps_path.name} has no {ims_path.name} beside it")
        return None
    try:
        ims = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        report.error(f"{ims_path}: not a readable .npy array ({e})")
        return None
    caps = _captions(caps_path, report)
    if ims.ndim != 3:
        report.error(f"{ims_path}: shape {tuple(ims.shape)}; expected (images, regions, dim), e.g. (1000, 36, 2048)")
        return None
    try:
        per = _per_image(len(ims), len(caps), ims_path, caps_path, _blank_tail(caps))
    except DataError as e:
        report.error(str(e))
        return None
    sample = np.asarray(ims[: min(len(ims), 50)])
    finite = bool(np.isfinite(sample).all())
    report.ok(f"{split}: {len(ims)} image rows x {ims.shape[1]} regions x {ims.shape[2]} dims ({ims.dtype}), "
              f"{len(caps)} captions ({per} per image row)")
    if not np.issubdtype(ims.dtype, np.floating):
        report.error(f"{ims_path}: dtype {ims.dtype}; expected floating point features")
    if not finite:
        report.error(f"{ims_path}: NaN or infinite values among the first {len(sample)} images")
    if tuple(ims.shape[1:]) != BUTD_SHAPE and not any("BUTD" in line for line in report.lines):
        report.warn(f"{ims_path.name}: {tuple(ims.shape[1:])} per image; the released ESA/LHSC weights expect BUTD "
                    f"{BUTD_SHAPE} (set img_dim to the feature dim when training your own)")
    ids_path = root / f"{split}_ids.txt"
    if ids_path.is_file():
        ids = [x for x in ids_path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if len(ids) in (len(ims), len(caps)):
            report.ok(f"{ids_path.name}: {len(ids)} ids (one per {'image' if len(ids) == len(ims) else 'caption'})")
        else:
            report.warn(f"{ids_path.name}: {len(ids)} ids fit neither {len(ims)} images nor {len(caps)} captions")
    return {"dim": int(ims.shape[2]), "captions": caps}


def _check_vocab(path: Path, known: Mapping[str, str], captions: list[str], report: CheckReport) -> None:
    from .vocab import Vocab, word_tokenize

    try:
        vocab = Vocab.load(path)
    except (ValueError, FileNotFoundError) as e:
        report.error(str(e))
        return
    digest = vocab.sha256()
    names = [name for name, h in known.items() if h == digest]
    what = f"the SCAN {names[0]} vocabulary" if names else "not one of the known SCAN vocabularies " \
        f"({', '.join(sorted(known))}): the released weights would read wrong word ids"
    line = f"{path.name}: {len(vocab)} ids, sha256 {digest[:16]}..., {what}"
    (report.ok if names else report.warn)(line)
    if captions:
        tokens = [t for c in captions[:5000] for t in word_tokenize(c)]
        unk = sum(t not in vocab for t in tokens)
        share = 100.0 * unk / max(1, len(tokens))
        msg = f"{path.name}: {share:.1f}% of {len(tokens)} caption tokens are out of vocabulary"
        (report.ok if share < 10 else report.warn)(msg + ("" if share < 10 else " (a vocabulary of another dataset?)"))


def _check_karpathy(path: Path, image_root: Path | None, report: CheckReport) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        report.error(f"{path}: not valid JSON ({e})")
        return
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        report.error(f"{path}: expected {{'dataset': ..., 'images': [...]}} (a Karpathy split json)")
        return
    per_split: dict[str, list[int]] = {}
    missing, listed = 0, 0
    for im in data["images"]:
        split = im.get("split", "?")
        per_split.setdefault(split, []).append(len(im.get("sentences", [])))
        if image_root is not None:
            listed += 1
            rel = Path(im.get("filepath", ""), im.get("filename", ""))
            missing += not (image_root / rel).is_file()
    for split, counts in sorted(per_split.items()):
        report.ok(f"{path.name} [{data.get('dataset', '?')}] {split}: {len(counts)} images, {sum(counts)} sentences "
                  f"({min(counts)}-{max(counts)} per image)")
    if image_root is not None:
        if missing:
            report.error(f"{missing} of {listed} images listed in {path.name} are missing under {image_root}")
        else:
            report.ok(f"all {listed} images listed in {path.name} are under {image_root}")


def check_data(path: str | Path, *, vocab: str | Path | None = None, image_root: str | Path | None = None,
               known_vocabs: Mapping[str, str] | None = None) -> CheckReport:
    """Check a precomp folder, a Karpathy json or a vocabulary json; see the module docstring."""
    p = Path(path).expanduser()
    report = CheckReport()
    known = dict(known_vocabs or {})
    if not p.exists():
        report.error(f"{p} does not exist")
        return report
    captions: list[str] = []
    if p.is_file():
        if p.suffix != ".json":
            report.error(f"{p}: give a precomp folder, a Karpathy split json or a vocabulary json")
        elif "word2idx" in p.read_text(encoding="utf-8")[:4096]:
            _check_vocab(p, known, [], report)
        else:
            _check_karpathy(p, Path(image_root).expanduser() if image_root else None, report)
        return report
    root = p / "precomp" if not any(p.glob("*_caps.txt")) and (p / "precomp").is_dir() else p
    dims = {}
    for split in PRECOMP_SPLITS:
        if (root / f"{split}_caps.txt").is_file():
            found = _check_precomp_split(root, split, report)
            if found:
                dims[split] = found["dim"]
                captions = captions or found["captions"]
    if not dims and not report.errors:
        report.error(f"{root}: no {{split}}_caps.txt + {{split}}_ims.npy pairs (train, dev, test, testall)")
    if len(set(dims.values())) > 1:
        report.error(f"feature dims differ between splits: {dims}")
    vocabs = [Path(vocab).expanduser()] if vocab else sorted(root.glob("*vocab*.json")) + sorted(p.glob("vocab/*.json"))
    for v in vocabs:
        _check_vocab(v, known, captions, report)
    for j in sorted(root.glob("dataset_*.json")):
        _check_karpathy(j, Path(image_root).expanduser() if image_root else None, report)
    return report
