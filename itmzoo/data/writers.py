"""Writers: export a `RetrievalSplit` (typically `SyntheticShapes`) in every format the readers take.

They produce the files a user of the real datasets has, so the readers can be exercised end to end
(tests, demos) without downloading anything. Region features go to SCAN precomp; pixel splits go
to an image folder plus the annotation format of choice (or into an arrow table).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..checkpoints.atomic import atomic_path, write_text_atomic
from .split import RetrievalSplit, load_pil

__all__ = [
    "write_albef_json",
    "write_arrow",
    "write_coco_captions",
    "write_ids_caps",
    "write_images",
    "write_karpathy",
    "write_precomp",
]

PathLike = str | Path


def _need_kind(split: RetrievalSplit, kind: str, what: str) -> None:
    if split.kind != kind:
        raise ValueError(f"{what} needs a split of {kind}, got {split.kind} ({split!r})")


def _uniform_per_image(split: RetrievalSplit, what: str) -> int:
    """Captions per image when they are image-major and equally many (the text-file formats need it)."""
    per, rem = divmod(split.num_captions, split.num_images)
    if rem or not np.array_equal(split.caption_to_image, np.arange(split.num_captions) // max(per, 1)):
        raise ValueError(f"{what} stores captions as consecutive lines, the same number per image; this split "
                         "has them in another order or in varying numbers")
    return per


def _check_lines(captions: Sequence[str], what: str) -> None:
    bad = [k for k, c in enumerate(captions) if "\n" in c or "\r" in c]
    if bad:
        raise ValueError(f"{what}: captions {bad[:3]} contain line breaks and cannot be written one per line")


def _file_stem(split: RetrievalSplit, i: int) -> str:
    if split.image_ids is not None:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(split.image_ids[i])).strip("._")
        if stem:
            return stem
    return f"{i:06d}"


def _encode(image: Any, ext: str) -> bytes:
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}.get(ext.lower())
    if fmt is None:
        raise ValueError(f"image extension must be jpg or png, got {ext!r}")
    load_pil(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_images(split: RetrievalSplit, image_dir: PathLike, *, ext: str = "jpg",
                 names: Sequence[str] | None = None) -> list[str]:
    """Save every image of a pixel split under `image_dir`; returns the file names (relative)."""
    _need_kind(split, "pixels", "write_images")
    d = Path(image_dir)
    d.mkdir(parents=True, exist_ok=True)
    if names is None:
        names = [f"{_file_stem(split, i)}.{ext}" for i in range(split.num_images)]
    if len(set(names)) != len(names):
        raise ValueError("image file names are not unique")
    for i, n in enumerate(names):
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        (d / n).write_bytes(_encode(split.images[i], ext))
    return list(names)


def write_precomp(split: RetrievalSplit, root: PathLike, name: str) -> dict[str, Path]:
    """SCAN precomp: ``{name}_ims.npy`` (float32 ``(N, R, D)``) and ``{name}_caps.txt``.

    The array is filled image by image through a memory map, so a lazy split of any size fits.
    """
    _need_kind(split, "regions", "write_precomp")
    _uniform_per_image(split, "precomp")
    _check_lines(split.captions, "precomp")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    first = np.asarray(split.images[0], dtype=np.float32)
    shape = (split.num_images, *first.shape)
    ims_path, caps_path = root / f"{name}_ims.npy", root / f"{name}_caps.txt"
    with atomic_path(ims_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        for i in range(split.num_images):
            x = first if i == 0 else np.asarray(split.images[i], dtype=np.float32)
            if x.shape != first.shape:
                raise ValueError(f"precomp needs the same region count for every image: image {i} has "
                                 f"{x.shape}, image 0 has {first.shape}")
            arr[i] = x
        arr.flush()
        del arr
    write_text_atomic(caps_path, "".join(c + "\n" for c in split.captions))
    return {"ims": ims_path, "caps": caps_path}


def write_karpathy(splits: Mapping[str, RetrievalSplit], json_path: PathLike, image_root: PathLike, *,
                   dataset: str = "synthetic", coco_style: bool = False, ext: str = "jpg") -> Path:
    """A Karpathy split json covering several splits (keys ``train``/``val``/``test``/``restval``;
    ``dev`` is written as ``val``) and the images under `image_root`.

    ``coco_style=True`` writes COCO's layout: images in a ``filepath`` subfolder per split and a
    ``cocoid``; otherwise F30K's flat folder.
    """
    root = Path(image_root)
    images: list[dict[str, Any]] = []
    sentid = 0
    for key, split in splits.items():
        kname = "val" if key == "dev" else key
        sub = f"{kname}2014" if coco_style else ""
        names = [f"{kname}_{_file_stem(split, i)}.{ext}" for i in range(split.num_images)]
        write_images(split, root / sub if sub else root, ext=ext, names=names)
        by_image: list[list[int]] = [[] for _ in range(split.num_images)]
        for j, i in enumerate(split.caption_to_image):
            by_image[int(i)].append(j)
        for i in range(split.num_images):
            imgid = len(images)
            sents = []
            for j in by_image[i]:
                raw = split.captions[j]
                tokens = re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", raw.lower())
                sents.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
                sentid += 1
            entry: dict[str, Any] = {"sentids": [s["sentid"] for s in sents], "imgid": imgid, "sentences": sents,
                                     "split": kname, "filename": names[i]}
            if coco_style:
                entry = {"filepath": sub, **entry, "cocoid": 100000 + imgid}
            images.append(entry)
    p = Path(json_path)
    write_text_atomic(p, json.dumps({"images": images, "dataset": dataset}))
    return p


def write_ids_caps(split: RetrievalSplit, root: PathLike, name: str, *, image_root: PathLike | None = None,
                   per_caption_ids: bool = False, mapping: str = "id_mapping.json",
                   ext: str = "jpg") -> dict[str, Path]:
    """``{name}_ids.txt`` + ``{name}_caps.txt`` + ``id_mapping.json`` (merged with an existing one) and
    the images under `image_root` (default ``root/images``), as VSE-infinity's raw-image layout.

    Ids are integers continuing after those already in the mapping. ``per_caption_ids=True`` repeats
    each id for every caption, as COCO ``testall_ids.txt`` / F30K ``test_ids.txt`` do.
    """
    _need_kind(split, "pixels", "write_ids_caps")
    per = _uniform_per_image(split, "the ids/caps layout")
    _check_lines(split.captions, "captions file")
    root = Path(root)
    img_root = Path(image_root) if image_root is not None else root / "images"
    map_path = root / mapping
    id2path: dict[str, str] = json.loads(map_path.read_text(encoding="utf-8")) if map_path.is_file() else {}
    start = max((int(k) for k in id2path), default=-1) + 1
    names = [f"{name}_{_file_stem(split, i)}.{ext}" for i in range(split.num_images)]
    write_images(split, img_root, ext=ext, names=names)
    ids = [str(start + i) for i in range(split.num_images)]
    id2path.update(zip(ids, names))
    lines = [i for i in ids for _ in range(per)] if per_caption_ids else ids
    write_text_atomic(root / f"{name}_ids.txt", "".join(i + "\n" for i in lines))
    write_text_atomic(root / f"{name}_caps.txt", "".join(c + "\n" for c in split.captions))
    write_text_atomic(map_path, json.dumps(id2path))
    return {"ids": root / f"{name}_ids.txt", "caps": root / f"{name}_caps.txt", "mapping": map_path}


def write_albef_json(split: RetrievalSplit, path: PathLike, image_root: PathLike, *, train: bool = False,
                     ext: str = "jpg", subdir: str = "images") -> Path:
    """ALBEF/BLIP retrieval json: eval form ``[{"image", "caption": [...]}]`` or, with ``train=True``,
    one ``{"image", "caption", "image_id"}`` entry per caption. Images go to ``image_root/subdir``."""
    _need_kind(split, "pixels", "write_albef_json")
    names = write_images(split, Path(image_root) / subdir, ext=ext)
    rel = [f"{subdir}/{n}" if subdir else n for n in names]
    if train:
        data: list[dict[str, Any]] = [
            {"image": rel[int(i)], "caption": c, "image_id": f"synthetic_{int(i)}"}
            for c, i in zip(split.captions, split.caption_to_image)]
    else:
        data = [{"image": r, "caption": []} for r in rel]
        for c, i in zip(split.captions, split.caption_to_image):
            data[int(i)]["caption"].append(c)
    p = Path(path)
    write_text_atomic(p, json.dumps(data))
    return p


def write_coco_captions(split: RetrievalSplit, ann_path: PathLike, image_root: PathLike, *, ext: str = "jpg",
                        first_image_id: int = 1) -> Path:
    """COCO captions annotation json (``info``, ``licenses``, ``images``, ``annotations``) + images."""
    _need_kind(split, "pixels", "write_coco_captions")
    names = write_images(split, image_root, ext=ext)
    images = []
    for i, n in enumerate(names):
        w, h = load_pil(split.images[i]).size
        images.append({"id": first_image_id + i, "file_name": n, "height": h, "width": w, "license": 0})
    anns = [{"image_id": first_image_id + int(i), "id": k + 1, "caption": c}
            for k, (c, i) in enumerate(zip(split.captions, split.caption_to_image))]
    data = {"info": {"description": "itmzoo synthetic captions", "version": "1.0"},
            "licenses": [{"id": 0, "name": "CC0"}], "images": images, "annotations": anns}
    p = Path(ann_path)
    write_text_atomic(p, json.dumps(data))
    return p


def write_arrow(split: RetrievalSplit, path: PathLike, *, split_name: str | None = None, ext: str = "jpg") -> Path:
    """A ViLT arrow table (IPC file format): ``image`` bytes, ``caption`` list, ``image_id`` (file name),
    ``split``. Needs pyarrow (extra ``arrow``)."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError("writing .arrow files needs pyarrow: pip install 'itmzoo[arrow]'") from e
    _need_kind(split, "pixels", "write_arrow")
    by_image: list[list[str]] = [[] for _ in range(split.num_images)]
    for c, i in zip(split.captions, split.caption_to_image):
        by_image[int(i)].append(c)
    table = pa.table({
        "image": pa.array([_encode(split.images[i], ext) for i in range(split.num_images)], pa.binary()),
        "caption": pa.array(by_image, pa.list_(pa.string())),
        "image_id": pa.array([f"{_file_stem(split, i)}.{ext}" for i in range(split.num_images)], pa.string()),
        "split": pa.array([split_name or split.name] * split.num_images, pa.string()),
    })
    p = Path(path)
    with atomic_path(p) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return p
