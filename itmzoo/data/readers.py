"""Readers: every supported on-disk format -> `RetrievalSplit`, plus the `load_split` dispatcher.

| format | reader | layout |
|---|---|---|
| ``synthetic`` | `SyntheticShapes` | built in, nothing on disk |
| ``precomp`` | `read_precomp` | SCAN ``{split}_ims.npy`` + ``{split}_caps.txt`` |
| ``karpathy`` | `read_karpathy` | ``dataset_{flickr30k,coco}.json`` + image folder |
| ``ids_caps`` | `read_ids_caps` | ``{split}_ids.txt`` + ``{split}_caps.txt`` + ``id_mapping.json`` + image folder |
| ``albef_json`` | `read_albef_json` | ALBEF/BLIP retrieval json (train or eval form) + image folder |
| ``coco_captions`` | `read_coco_captions` | COCO ``captions_*.json`` through pycocotools + image folder |
| ``arrow`` | `read_arrow` | ViLT ``*.arrow`` tables (extra ``arrow``: pyarrow) |

Errors name the file and say what was expected: a missing file is a `FileNotFoundError`, a file
that is malformed or disagrees with another one a `DataError`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .split import RetrievalSplit
from .text import pre_caption as _pre_caption

__all__ = [
    "DataError",
    "FORMATS",
    "ArrowImages",
    "load_split",
    "read_albef_json",
    "read_arrow",
    "read_coco_captions",
    "read_ids_caps",
    "read_karpathy",
    "read_precomp",
]

PathLike = str | Path

# upstream (SCAN, VSE-infinity, ESA, ...) validates on the first 5000 `dev` captions = 1000 images
DEV_CAPTIONS = 5000


class DataError(ValueError):
    """A data file is malformed, or disagrees with another file of the same split."""


def _path(p: PathLike) -> Path:
    return Path(p).expanduser()


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        hint = f" (the folder {path.parent} does not exist)" if not path.parent.is_dir() else ""
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    return path


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, each `strip()`ped as the SCAN readers do."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _blank_tail(lines: Sequence[str]) -> int:
    n = 0
    while n < len(lines) and not lines[len(lines) - 1 - n]:
        n += 1
    return n


def _read_captions(path: Path) -> list[str]:
    """Caption lines; empty ones are kept (upstream keeps them) but named in a warning."""
    caps = _read_lines(path)
    tail = _blank_tail(caps)
    inner = [i + 1 for i, c in enumerate(caps[: len(caps) - tail]) if not c]
    if inner or tail:
        parts = []
        if inner:
            parts.append(f"{len(inner)} empty caption line(s) (line {', '.join(map(str, inner[:5]))}"
                         + (", ..." if len(inner) > 5 else "") + ")")
        if tail:
            parts.append(f"{tail} blank line(s) at the end of the file")
        warnings.warn(f"{path}: {' and '.join(parts)}; each counts as an (empty) caption", stacklevel=3)
    return caps


def _read_json(path: Path, what: str) -> Any:
    _need(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def _check_images(paths: Sequence[Path], source: Path | str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images listed in {source} are missing, "
                                f"e.g. {', '.join(str(p) for p in missing[:3])}; check image_root")


def _per_image(n_img: int, n_cap: int, img_file: Path, cap_file: Path, blank_tail: int = 0) -> int:
    """Captions per image under SCAN's rule (`im_div`): image rows are per image or per caption."""
    if n_img == 0 or n_cap == 0:
        raise DataError(f"empty split: {n_img} images in {img_file}, {n_cap} captions in {cap_file}")
    if n_cap < n_img or n_cap % n_img:
        tail = ""
        if blank_tail:
            tail = (f"; its last {blank_tail} line(s) are blank, and without them the counts "
                    + ("agree: remove the blank lines" if (n_cap - blank_tail) % n_img == 0 and n_cap > blank_tail
                       else "still disagree"))
        raise DataError(f"{cap_file} has {n_cap} captions but {img_file} has {n_img} images: expected the same "
                        f"number of captions for every image (e.g. 5 per image, or one image row per caption){tail}")
    return n_cap // n_img


def _truncate_dev(split: str, n_cap: int, dev_captions: int | None) -> int:
    """Number of captions to keep: all, or the first `dev_captions` of the `dev` split (upstream rule)."""
    if split == "dev" and dev_captions is not None and n_cap > dev_captions:
        return int(dev_captions)
    return n_cap


# ---------------------------------------------------------------------------------------------------
# SCAN precomp


def read_precomp(root: PathLike, split: str, *, dev_captions: int | None = DEV_CAPTIONS,
                 region_dim: int | None = None, mmap: bool = True) -> RetrievalSplit:
    """SCAN precomp features: ``{split}_ims.npy`` ``(N, R, D)`` float32 + ``{split}_caps.txt``.

    `root` is the ``*_precomp`` folder (VSE-infinity's ``<data>/precomp`` layout is found too).
    Captions are consecutive per image (5 lines each); a file with one image row per caption
    (``N == #captions``) gives one caption per row. COCO's 5K test is ``split="testall"``.
    Like SCAN and VSE-infinity, ``split="dev"`` keeps only the first `dev_captions` (5000) captions,
    i.e. 1000 images; pass ``dev_captions=None`` for all of them. The features stay memory-mapped.
    `region_dim`: the feature dimension the model expects (checked here, with a clear error).
    """
    root = _path(root)
    if not (root / f"{split}_caps.txt").is_file() and (root / "precomp" / f"{split}_caps.txt").is_file():
        root = root / "precomp"
    ims_path = _need(root / f"{split}_ims.npy", f"precomp features of split '{split}'")
    caps_path = _need(root / f"{split}_caps.txt", f"precomp captions of split '{split}'")
    try:
        ims = np.load(ims_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{ims_path}: not a readable .npy array ({e})") from e
    if ims.ndim != 3:
        raise DataError(f"{ims_path}: features of shape {tuple(ims.shape)}; expected (images, regions, dim), "
                        "e.g. (1000, 36, 2048)")
    if region_dim is not None and ims.shape[2] != region_dim:
        raise DataError(f"{ims_path}: region features have dim {ims.shape[2]}, expected {region_dim}")
    if not np.issubdtype(ims.dtype, np.floating):
        raise DataError(f"{ims_path}: dtype {ims.dtype}; expected floating point features")
    caps = _read_captions(caps_path)
    per = _per_image(len(ims), len(caps), ims_path, caps_path, _blank_tail(caps))
    n_cap = _truncate_dev(split, len(caps), dev_captions)
    n_img = -(-n_cap // per)
    ids = _precomp_ids(root / f"{split}_ids.txt", len(ims), len(caps), per)
    return RetrievalSplit(images=ims[:n_img], captions=caps[:n_cap],
                          caption_to_image=np.arange(n_cap) // per, kind="regions", name=split,
                          image_ids=ids[:n_img] if ids is not None else None)


def _precomp_ids(path: Path, n_img: int, n_cap: int, per: int) -> list[str] | None:
    # optional: only raw-image loaders need the ids, so a file that does not fit is only a warning
    if not path.is_file():
        return None
    ids = _read_lines(path)
    if ids and ids[-1] == "":
        ids = ids[:-1]
    if len(ids) == n_img:
        return ids
    if len(ids) == n_cap:
        return ids[::per]
    warnings.warn(f"{path}: {len(ids)} ids fit neither {n_img} images nor {n_cap} captions; ignored", stacklevel=3)
    return None


# ---------------------------------------------------------------------------------------------------
# Karpathy split json

_KARPATHY_ALIASES = {"dev": ["val"], "trainrestval": ["train", "restval"], "train+restval": ["train", "restval"]}


def read_karpathy(json_path: PathLike, image_root: PathLike, split: str | Sequence[str], *, text: str = "raw",
                  max_captions_per_image: int | None = None, check_images: bool = True) -> RetrievalSplit:
    """A split of ``dataset_flickr30k.json`` / ``dataset_coco.json`` with images under `image_root`.

    `split`: ``train``, ``val`` (alias ``dev``), ``test``, ``restval`` (COCO), a list of them, or
    ``trainrestval``. Image path: ``image_root/filepath/filename`` when the entry has ``filepath``
    (COCO: ``train2014``/``val2014``), else ``image_root/filename``. Captions: the ``raw`` sentences,
    as VSE++ and ViLT use them (``text="tokens"`` joins the lower-cased ``tokens`` instead), all of
    them by default (COCO has 5-7); ``max_captions_per_image=5`` keeps the first five.
    """
    path = _path(json_path)
    data = _read_json(path, "Karpathy split json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected {{'dataset': ..., 'images': [...]}} (a Karpathy split json)")
    if text not in ("raw", "tokens"):
        raise ValueError(f"text must be 'raw' or 'tokens', got {text!r}")
    wanted = [split] if isinstance(split, str) else list(split)
    wanted = [s for w in wanted for s in _KARPATHY_ALIASES.get(w, [w])]
    root = _path(image_root)
    images: list[Path] = []
    ids: list[Any] = []
    caps: list[str] = []
    c2i: list[int] = []
    seen: set[str] = set()
    for k, im in enumerate(data["images"]):
        try:
            seen.add(im["split"])
            if im["split"] not in wanted:
                continue
            sents = im["sentences"]
            rel = Path(im["filepath"], im["filename"]) if im.get("filepath") else Path(im["filename"])
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: images[{k}] lacks {e}; expected 'split', 'filename' and 'sentences'") from e
        if max_captions_per_image is not None:
            sents = sents[:max_captions_per_image]
        if not sents:
            raise DataError(f"{path}: images[{k}] ({rel}) has no sentences")
        for s in sents:
            caps.append(s["raw"] if text == "raw" else " ".join(s["tokens"]))
            c2i.append(len(images))
        images.append(root / rel)
        ids.append(im.get("cocoid", im.get("imgid", k)))
    if not images:
        raise DataError(f"{path}: no images in split {wanted}; the file has splits {sorted(seen)}")
    if check_images:
        _check_images(images, path)
    name = split if isinstance(split, str) else "+".join(split)
    return RetrievalSplit(images=[str(p) for p in images], captions=caps, caption_to_image=np.array(c2i),
                          kind="pixels", name=name, image_ids=ids)


# ---------------------------------------------------------------------------------------------------
# ids/caps text files + id_mapping.json (VSE-infinity / SCTA raw-image layout)


def read_ids_caps(root: PathLike, split: str, image_root: PathLike | None = None, *,
                  mapping: PathLike = "id_mapping.json", dev_captions: int | None = DEV_CAPTIONS,
                  check_images: bool = True) -> RetrievalSplit:
    """``{split}_ids.txt`` + ``{split}_caps.txt`` with ``id_mapping.json`` (id -> relative image path).

    As VSE-infinity's raw-image loader: `root` holds the text files (also under ``root/precomp``);
    `mapping` is relative to `root` unless absolute; images are under `image_root` (default
    ``root/images``). The ids file has one line per image or one per caption (each id repeated for
    its captions); images are the distinct ids in order of first appearance. ``split="dev"`` keeps the
    first `dev_captions` captions, as upstream.
    """
    root = _path(root)
    txt = root if (root / f"{split}_caps.txt").is_file() or not (root / "precomp").is_dir() else root / "precomp"
    ids_path = _need(txt / f"{split}_ids.txt", f"image ids of split '{split}'")
    caps_path = _need(txt / f"{split}_caps.txt", f"captions of split '{split}'")
    map_path = _path(mapping)
    if not map_path.is_absolute():
        map_path = root / map_path
    id2path = _read_json(map_path, "id_mapping.json (image id -> relative path)")
    if not isinstance(id2path, dict):
        raise DataError(f"{map_path}: expected a json object {{\"<id>\": \"<relative image path>\"}}")
    ids = _read_lines(ids_path)
    caps = _read_captions(caps_path)
    if len(ids) == len(caps):
        order: dict[str, int] = {}
        c2i = np.array([order.setdefault(i, len(order)) for i in ids], dtype=np.int64)
        uniq = list(order)
    else:
        per = _per_image(len(ids), len(caps), ids_path, caps_path, _blank_tail(caps))
        uniq, c2i = ids, np.arange(len(caps)) // per
    n_cap = _truncate_dev(split, len(caps), dev_captions)
    c2i, caps = c2i[:n_cap], caps[:n_cap]
    uniq = uniq[: int(c2i.max()) + 1]
    absent = [i for i in uniq if i not in id2path]
    if absent:
        raise DataError(f"{map_path}: no image path for {len(absent)} ids of {ids_path}, e.g. {absent[:3]}")
    img_root = _path(image_root) if image_root is not None else root / "images"
    images = [img_root / id2path[i] for i in uniq]
    if check_images:
        _check_images(images, f"{ids_path} via {map_path}")
    return RetrievalSplit(images=[str(p) for p in images], captions=caps, caption_to_image=c2i, kind="pixels",
                          name=split, image_ids=list(uniq))


# ---------------------------------------------------------------------------------------------------
# ALBEF / BLIP retrieval json


def read_albef_json(path: PathLike, image_root: PathLike, *, pre_caption: str | None = None, max_words: int = 30,
                    check_images: bool = True) -> RetrievalSplit:
    """ALBEF/BLIP retrieval annotations, either form.

    * eval (``coco_karpathy_test.json``, ``flickr30k_test.json``): ``[{"image": path, "caption": [...]}]``;
    * train: ``[{"image": path, "caption": str, "image_id": id}]``, one entry per caption; entries are
      grouped by ``image_id`` (else by path) in order of first appearance, as ALBEF numbers them.

    Image paths are relative to `image_root`. `pre_caption`: ``None`` keeps captions as written,
    ``"albef"`` / ``"blip"`` apply that repo's ``pre_caption(caption, max_words)``.
    """
    p = _path(path)
    data = _read_json(p, "retrieval json")
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a list of {{'image': ..., 'caption': ...}} entries")
    root = _path(image_root)
    order: dict[Any, int] = {}
    images: list[Path] = []
    ids: list[Any] = []
    caps: list[str] = []
    c2i: list[int] = []
    for k, ann in enumerate(data):
        try:
            img, cap = ann["image"], ann["caption"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{p}: entry {k} lacks {e}; expected 'image' and 'caption'") from e
        key = ann.get("image_id", img)
        if key not in order:
            order[key] = len(images)
            images.append(root / img)
            ids.append(key)
        texts = [cap] if isinstance(cap, str) else list(cap)
        if not texts:
            raise DataError(f"{p}: entry {k} ({img}) has an empty caption list")
        for t in texts:
            caps.append(_pre_caption(t, max_words, pre_caption) if pre_caption else t)
            c2i.append(order[key])
    if not images:
        raise DataError(f"{p}: no entries")
    if check_images:
        _check_images(images, p)
    return RetrievalSplit(images=[str(x) for x in images], captions=caps, caption_to_image=np.array(c2i),
                          kind="pixels", name=p.stem, image_ids=ids)


# ---------------------------------------------------------------------------------------------------
# COCO caption annotations (pycocotools)


def read_coco_captions(ann_path: PathLike, image_root: PathLike, *, image_ids: Sequence[int] | None = None,
                       ann_ids: Sequence[int] | None = None, max_captions_per_image: int | None = None,
                       check_images: bool = True) -> RetrievalSplit:
    """COCO ``captions_{train,val}2014.json`` read with pycocotools; images are ``image_root/file_name``.

    Default: every image of the file that has captions, in file order, with its captions in file
    order. `image_ids` picks images (in that order). `ann_ids` picks captions as VSE++ does with its
    ``coco_*_ids.npy`` (images in order of first appearance).
    """
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError("reading COCO caption annotations needs pycocotools (pip install pycocotools)") from e
    p = _need(_path(ann_path), "COCO captions annotation json")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            coco = COCO(str(p))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from e
    except (KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{p}: not a COCO annotation file ({type(e).__name__}: {e})") from e
    root = _path(image_root)
    order: dict[int, int] = {}
    caps: list[str] = []
    c2i: list[int] = []

    def add(ann: Mapping[str, Any]) -> None:
        c2i.append(order.setdefault(ann["image_id"], len(order)))
        caps.append(ann["caption"])

    if ann_ids is not None:
        for a in ann_ids:
            if int(a) not in coco.anns:
                raise DataError(f"{p}: annotation id {a} not found")
            add(coco.anns[int(a)])
    else:
        for i in (image_ids if image_ids is not None else list(coco.imgs)):
            if int(i) not in coco.imgs:
                raise DataError(f"{p}: image id {i} not found")
            anns = coco.imgToAnns.get(int(i), [])
            if max_captions_per_image is not None:
                anns = anns[:max_captions_per_image]
            if not anns and image_ids is not None:
                raise DataError(f"{p}: image id {i} has no captions")
            for a in anns:
                add(a)
    if not order:
        raise DataError(f"{p}: no captions")
    ids = list(order)
    images = [root / coco.imgs[i]["file_name"] for i in ids]
    if check_images:
        _check_images(images, p)
    return RetrievalSplit(images=[str(x) for x in images], captions=caps, caption_to_image=np.array(c2i),
                          kind="pixels", name=p.stem, image_ids=ids)


# ---------------------------------------------------------------------------------------------------
# ViLT arrow tables


def _open_arrow(path: Path) -> Any:
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError("reading .arrow files needs pyarrow: pip install 'itmzoo[arrow]'") from e
    _need(path, "arrow table")
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not an Arrow IPC file ({e})") from e


class ArrowImages(Sequence):
    """Encoded image bytes of the ``image`` column of arrow tables, read lazily (memory-mapped).

    Pickles as its file paths, so worker processes reopen the files instead of copying the table.
    """

    def __init__(self, paths: Sequence[PathLike], indices: np.ndarray | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self._column: Any = None
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices is None:
            self.indices = np.arange(len(self._col()))

    def _col(self) -> Any:
        if self._column is None:
            import pyarrow as pa

            self._column = pa.chunked_array([c for p in self.paths for c in _open_arrow(Path(p))["image"].chunks])
        return self._column

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        return self._col()[int(self.indices[i])].as_py()

    def __iter__(self) -> Iterator[bytes]:
        for k in range(len(self)):
            yield self[k]

    def select(self, indices: Sequence[int] | np.ndarray) -> "ArrowImages":
        out = ArrowImages.__new__(ArrowImages)
        out.paths, out._column = self.paths, self._column
        out.indices = self.indices[np.asarray(indices, dtype=np.int64)]
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "_column": None, "indices": self.indices}


def read_arrow(paths: PathLike | Sequence[PathLike], *, remove_duplicate: bool = False) -> RetrievalSplit:
    """ViLT arrow tables (``image`` bytes, ``caption`` list, ``image_id``, ``split``), concatenated.

    Rows keep the file order (ViLT shuffled them when writing). `remove_duplicate` drops repeated
    captions of an image as ViLT/Multi-SEA do, but keeps their order (upstream's ``list(set(...))``
    randomises it). Needs pyarrow (extra ``arrow``).
    """
    files = [_path(paths)] if isinstance(paths, (str, Path)) else [_path(p) for p in paths]
    if not files:
        raise ValueError("read_arrow: no files given")
    captions: list[str] = []
    c2i: list[int] = []
    ids: list[Any] = []
    row = 0
    for f in files:
        table = _open_arrow(f)
        missing = [c for c in ("image", "caption", "image_id") if c not in table.column_names]
        if missing:
            raise DataError(f"{f}: missing columns {missing}; a ViLT table has image, caption, image_id, split "
                            f"(found {table.column_names})")
        for k, (texts, iid) in enumerate(zip(table["caption"].to_pylist(), table["image_id"].to_pylist())):
            if isinstance(texts, str):
                texts = [texts]
            if not texts:
                raise DataError(f"{f}: row {k} ({iid}) has no captions")
            if remove_duplicate:
                texts = list(dict.fromkeys(texts))
            captions.extend(texts)
            c2i.extend([row] * len(texts))
            ids.append(iid)
            row += 1
    return RetrievalSplit(images=ArrowImages(files), captions=captions, caption_to_image=np.array(c2i),
                          kind="pixels", name=files[0].stem if len(files) == 1 else "arrow", image_ids=ids)


# ---------------------------------------------------------------------------------------------------
# the dispatcher


def _synthetic(split: str = "train", kind: str = "regions", **kwargs: Any) -> RetrievalSplit:
    from .synthetic import SyntheticShapes

    return SyntheticShapes(**kwargs).split(split, kind=kind)


# format -> (reader, name of the parameter that "path" fills)
FORMATS: dict[str, tuple[Callable[..., RetrievalSplit], str | None]] = {
    "synthetic": (_synthetic, None),
    "precomp": (read_precomp, "root"),
    "karpathy": (read_karpathy, "json_path"),
    "ids_caps": (read_ids_caps, "root"),
    "albef_json": (read_albef_json, "path"),
    "coco_captions": (read_coco_captions, "ann_path"),
    "arrow": (read_arrow, "paths"),
}


def _accepted(fn: Callable[..., Any], path_param: str | None) -> list[str]:
    if fn is _synthetic:
        from .synthetic import SyntheticShapes

        extra = [k for k in inspect.signature(SyntheticShapes.__init__).parameters if k != "self"]
        return ["split", "kind", *extra]
    return [k for k in inspect.signature(fn).parameters if k != path_param]


def load_split(spec: Mapping[str, Any]) -> RetrievalSplit:
    """A `RetrievalSplit` from a dict such as the ``data.train`` section of a run config.

    ``{"format": "precomp", "path": "data/f30k_precomp", "split": "test"}``; ``path`` fills the reader's
    first argument, every other key is passed on by name (unknown keys are an error). Common keys:
    ``limit`` keeps the first N images (quick runs), ``kind`` checks the kind of the result.
    See docs/data.md for every format and its keys.
    """
    spec = dict(spec)
    fmt = spec.pop("format", None)
    if fmt not in FORMATS:
        raise DataError(f"data spec needs 'format' in {sorted(FORMATS)}, got {fmt!r}")
    fn, path_param = FORMATS[fmt]
    limit = spec.pop("limit", None)
    want_kind = spec.pop("kind", None) if fmt != "synthetic" else None
    if path_param is not None:
        if "path" not in spec:
            raise DataError(f"data spec of format '{fmt}' needs 'path' ({path_param} of {fn.__name__})")
        spec[path_param] = spec.pop("path")
    elif "path" in spec:
        raise DataError("the 'synthetic' format takes no 'path'")
    accepted = _accepted(fn, path_param)
    unknown = sorted(set(spec) - set(accepted) - ({path_param} if path_param else set()))
    if unknown:
        raise DataError(f"unknown keys {unknown} for data format '{fmt}'; accepted: "
                        f"{sorted(['format', 'limit', 'kind'] + (['path'] if path_param else []) + accepted)}")
    try:
        split = fn(**spec)
    except TypeError as e:
        raise DataError(f"data spec of format '{fmt}': {e}") from e
    if want_kind is not None and split.kind != want_kind:
        raise DataError(f"data format '{fmt}' gives {split.kind}, but the spec asks for kind={want_kind!r}")
    if limit is not None:
        n = int(limit)
        if n < split.num_images:
            split = split.subset(np.arange(n))
    return split
