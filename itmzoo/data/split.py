"""The data contract: one retrieval split = images, captions and `caption_to_image`."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

__all__ = ["RetrievalSplit", "load_pil"]


@dataclasses.dataclass
class RetrievalSplit:
    """Images (region features or pixel sources), captions, and the image index of each caption.

    * ``kind="regions"``: ``images[i]`` is a float array ``[R, D]`` (a row of a memory-mapped
      ``(N, R, D)`` array works).
    * ``kind="pixels"``: ``images[i]`` is a PIL image, a path, or encoded bytes (see `load_pil`).

    `images` may be any sequence; one with a ``select(indices)`` method (the lazy sequences of the
    synthetic and arrow readers) keeps its laziness through `subset`.

    Any number of captions per image is allowed (COCO has 5-7); every image needs at least one.
    """

    images: Sequence[Any]
    captions: list[str]
    caption_to_image: np.ndarray
    kind: Literal["regions", "pixels"] = "regions"
    name: str = ""
    image_ids: list[Any] | None = None

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        if self.kind not in ("regions", "pixels"):
            raise ValueError(f"split kind must be 'regions' or 'pixels', got {self.kind!r}")
        n_img, n_cap = len(self.images), len(self.captions)
        where = f"split '{self.name}'" if self.name else "split"
        if self.caption_to_image.shape != (n_cap,):
            raise ValueError(f"{where}: caption_to_image has shape {self.caption_to_image.shape}, expected ({n_cap},) "
                             "(one image index per caption)")
        if n_cap and (self.caption_to_image.min() < 0 or self.caption_to_image.max() >= n_img):
            raise ValueError(f"{where}: caption_to_image refers to images outside [0, {n_img})")
        if n_img and n_cap:
            counts = np.bincount(self.caption_to_image, minlength=n_img)
            if (counts == 0).any():
                raise ValueError(f"{where}: images without captions, e.g. {np.flatnonzero(counts == 0)[:5].tolist()}")
        if self.image_ids is not None and len(self.image_ids) != n_img:
            raise ValueError(f"{where}: {len(self.image_ids)} image ids for {n_img} images")

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def captions_per_image(self) -> np.ndarray:
        return np.bincount(self.caption_to_image, minlength=self.num_images)

    def subset(self, image_indices: Sequence[int] | np.ndarray, name: str | None = None) -> "RetrievalSplit":
        """The split restricted to `image_indices` (in that order) and their captions, in caption order."""
        idx = np.asarray(image_indices, dtype=np.int64)
        remap = np.full(self.num_images, -1, dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        keep = np.flatnonzero(remap[self.caption_to_image] >= 0)
        images = _take(self.images, idx)
        return RetrievalSplit(
            images=images,
            captions=[self.captions[j] for j in keep],
            caption_to_image=remap[self.caption_to_image[keep]],
            kind=self.kind,
            name=name if name is not None else self.name,
            image_ids=[self.image_ids[i] for i in idx] if self.image_ids is not None else None,
        )

    def dedup_captions(self, order: Literal["stable", "hash_order"] = "stable") -> "RetrievalSplit":
        """The split without repeated captions of an image (the same text twice for one image).

        ``"stable"`` keeps each first occurrence, in caption order. ``"hash_order"`` is ViLT-style
        ``list(set(texts))`` per image: captions grouped by image, each image's in the order of Python's
        string hashes, so it changes with ``PYTHONHASHSEED`` (random per process unless set), as upstream.
        """
        if order not in ("stable", "hash_order"):
            raise ValueError(f"dedup_captions: order must be 'stable' or 'hash_order', got {order!r}")
        per_image: list[list[str]] = [[] for _ in range(self.num_images)]
        for text, i in zip(self.captions, self.caption_to_image.tolist()):
            per_image[i].append(text)
        if order == "hash_order":
            groups = [list(set(texts)) for texts in per_image]
            captions = [t for texts in groups for t in texts]
            c2i = [i for i, texts in enumerate(groups) for _ in texts]
        else:
            seen: set[tuple[int, str]] = set()
            captions, c2i = [], []
            for text, i in zip(self.captions, self.caption_to_image.tolist()):
                if (i, text) not in seen:
                    seen.add((i, text))
                    captions.append(text)
                    c2i.append(i)
        return dataclasses.replace(self, captions=captions, caption_to_image=np.asarray(c2i, dtype=np.int64))

    def __repr__(self) -> str:
        return (f"RetrievalSplit(name={self.name!r}, kind={self.kind!r}, images={self.num_images}, "
                f"captions={self.num_captions})")


def _take(images: Sequence[Any], idx: np.ndarray) -> Sequence[Any]:
    if callable(getattr(images, "select", None)):
        return images.select(idx)  # lazy sequences (synthetic, arrow) stay lazy
    if isinstance(images, np.ndarray):
        if len(idx) and np.all(np.diff(idx) == 1):
            return images[idx[0]: idx[-1] + 1]  # keeps a memmap a memmap
        return images[idx]
    return [images[int(i)] for i in idx]


def load_pil(source: Any):
    """A PIL RGB image from a PIL image, a path or encoded bytes, with a clear error if unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(source))).convert("RGB")
        if isinstance(source, (str, Path)):
            p = Path(source)
            if not p.is_file():
                raise FileNotFoundError(f"image file not found: {p}")
            with Image.open(p) as im:
                return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        shown = source if not isinstance(source, (bytes, bytearray, memoryview)) else "<bytes>"
        raise ValueError(f"cannot decode image {shown}: {e}") from e
    raise TypeError(f"cannot read an image from {type(source).__name__}; expected a PIL image, a path or bytes")
