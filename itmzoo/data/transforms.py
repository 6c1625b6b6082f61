"""Image transforms per backbone (pixels) and the region-feature transform (precomputed regions).

Pixel transforms follow the target methods' code (see specs), per backbone:

- ``clip`` (ESL-CLIP, Multi-SEA): eval Resize(size, bicubic) shorter side, CenterCrop(size); train the same
  (no augmentation upstream); mean / std OpenAI CLIP.
- ``vit`` (SCTA): eval Resize((size, size), bicubic), aspect not kept; train RandomResizedCrop(size,
  scale=(0.6, 1), bicubic) + HorizontalFlip; mean / std ImageNet (SCTA keeps them for its in21k ViT).
- ``imagenet``: eval Resize(size * 256 / 224) shorter side, CenterCrop(size); train RandomResizedCrop(size)
  + HorizontalFlip; mean / std ImageNet.

Every transform accepts what a `RetrievalSplit` of pixels holds (PIL image, path or bytes) and
returns ``FloatTensor[3, size, size]``. Decoding (PIL) and the transform run in the DataLoader
workers (the datasets call the transform per item). The resampling is PIL's, as upstream; the final
``ToTensor`` + ``Normalize`` pair is one `ToNormalizedTensor` step that performs the same float
operations in the same order (bit-identical, tested) with fewer copies. Measured speed and the
comparison with ``torchvision.io.decode_image``: docs/performance.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .split import load_pil

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform", "RegionTransform",
           "ToNormalizedTensor", "image_transform", "load_uint8"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("clip", "vit", "imagenet")


class ToNormalizedTensor:
    """PIL RGB image -> ``(x / 255 - mean) / std`` as ``FloatTensor[3, H, W]``.

    The same float32 operations, in the same order, as torchvision's ``ToTensor()`` followed by
    ``Normalize(mean, std)``, so the result is bit-identical; it skips ToTensor's byte-buffer copy.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Any) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8, copy=True)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return x.sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def load_uint8(source: Any) -> torch.Tensor:
    """``uint8[3, H, W]`` RGB from a path or encoded bytes (``torchvision.io.decode_image``), or a PIL image."""
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"image file not found: {p}")
        data = torch.from_numpy(np.fromfile(p, dtype=np.uint8))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = torch.frombuffer(bytearray(source), dtype=torch.uint8)
    else:
        return torch.from_numpy(np.array(load_pil(source), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        where = source if isinstance(source, (str, Path)) else "<bytes>"
        raise ValueError(f"cannot decode image {where}: {e}") from e


class ImageTransform:
    """Decode (PIL or torchvision) followed by a torchvision pipeline; picklable for worker processes."""

    def __init__(self, pipeline: Callable[[Any], torch.Tensor], backbone: str, size: int, train: bool,
                 backend: str = "pil") -> None:
        self.pipeline, self.backbone, self.size, self.train, self.backend = pipeline, backbone, size, train, backend

    def __call__(self, image: Any) -> torch.Tensor:
        return self.pipeline(load_pil(image) if self.backend == "pil" else load_uint8(image))

    def __repr__(self) -> str:
        return (f"ImageTransform(backbone={self.backbone!r}, size={self.size}, train={self.train}, "
                f"backend={self.backend!r})\n{self.pipeline}")


def image_transform(backbone: str = "clip", size: int = 224, train: bool = False,
                    backend: str = "pil") -> ImageTransform:
    """The pixel transform of `backbone` (``"clip"``, ``"vit"`` or ``"imagenet"``) for training or evaluation.

    ``backend="pil"`` (default) decodes and resamples with PIL, as every upstream method does.
    ``backend="tensor"`` decodes with ``torchvision.io.decode_image`` and resamples uint8 tensors
    (bicubic with antialias); about twice as fast here, but its resampling differs from PIL's by up
    to ~1 grey level (measured in docs/performance.md), so released checkpoints see slightly
    different inputs.
    """
    if backend not in ("pil", "tensor"):
        raise ValueError(f"unknown image backend {backend!r}; use 'pil' or 'tensor'")
    if backend == "pil":
        from torchvision import transforms as T
    else:
        from torchvision.transforms import v2 as T

    aa = {} if backend == "pil" else {"antialias": True}
    bicubic = T.InterpolationMode.BICUBIC
    if backbone == "clip":
        # ESL and Multi-SEA use the evaluation transform for training too
        steps = [T.Resize(size, interpolation=bicubic, **aa), T.CenterCrop(size)]
        mean, std = CLIP_MEAN, CLIP_STD
    elif backbone == "vit":
        steps = ([T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=bicubic, **aa), T.RandomHorizontalFlip()]
                 if train else [T.Resize((size, size), interpolation=bicubic, **aa)])
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif backbone == "imagenet":
        steps = ([T.RandomResizedCrop(size, **aa), T.RandomHorizontalFlip()] if train
                 else [T.Resize(int(round(size * 256 / 224)), **aa), T.CenterCrop(size)])
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ValueError(f"unknown backbone {backbone!r}; use one of {list(BACKBONES)}")
    if backend == "pil":
        tail = [ToNormalizedTensor(mean, std)]
    else:
        tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return ImageTransform(T.Compose([*steps, *tail]), backbone, size, train, backend)


class RegionTransform:
    """Region features ``[R, D]`` -> ``FloatTensor[R', D]``.

    Training keeps each region independently when ``rand > drop_prob`` (VSE-infinity's "size
    augmentation", ``np.random.rand(R) > 0.20``), and at least one region (upstream could return an
    empty set). Evaluation keeps all. Draws use torch's generator, which DataLoader seeds per worker.
    """

    def __init__(self, train: bool = False, drop_prob: float = 0.2) -> None:
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.train, self.drop_prob = train, drop_prob

    def __call__(self, regions: Any) -> torch.Tensor:
        a = np.asarray(regions, dtype=np.float32)
        if not a.flags.writeable:  # a row of a read-only memmap: copy it into memory once
            a = a.copy()
        x = torch.from_numpy(a)
        if x.dim() != 2:
            raise ValueError(f"region features must be [R, D], got shape {tuple(x.shape)}")
        if not self.train or self.drop_prob == 0.0 or len(x) == 0:
            return x
        keep = torch.rand(len(x)) > self.drop_prob
        if not keep.any():
            keep[torch.randint(len(x), ())] = True
        return x[keep]

    def __repr__(self) -> str:
        return f"RegionTransform(train={self.train}, drop_prob={self.drop_prob})"
