"""Image transforms per backbone (pixels) and the region-feature transform (precomputed regions).

Pixel transforms follow the target methods' code (see specs):

| backbone | eval | train | mean / std |
|---|---|---|---|
| ``clip`` (ESL-CLIP, Multi-SEA) | Resize(size, bicubic) shorter side, CenterCrop(size) | same (no augmentation upstream) | OpenAI CLIP |
| ``vit`` (SCTA) | Resize((size, size), bicubic), aspect not kept | RandomResizedCrop(size, scale=(0.6, 1), bicubic) + HorizontalFlip | ImageNet (SCTA keeps them for its in21k ViT) |
| ``imagenet`` | Resize(size * 256 / 224) shorter side, CenterCrop(size) | RandomResizedCrop(size) + HorizontalFlip | ImageNet |

Every transform accepts what a `RetrievalSplit` of pixels holds (PIL image, path or bytes) and
returns ``FloatTensor[3, size, size]``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .split import load_pil

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform", "RegionTransform",
           "image_transform"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("clip", "vit", "imagenet")


class ImageTransform:
    """`load_pil` followed by a torchvision pipeline; picklable for worker processes."""

    def __init__(self, pipeline: Callable[[Any], torch.Tensor], backbone: str, size: int, train: bool) -> None:
        self.pipeline, self.backbone, self.size, self.train = pipeline, backbone, size, train

    def __call__(self, image: Any) -> torch.Tensor:
        return self.pipeline(load_pil(image))

    def __repr__(self) -> str:
        return f"ImageTransform(backbone={self.backbone!r}, size={self.size}, train={self.train})\n{self.pipeline}"


def image_transform(backbone: str = "clip", size: int = 224, train: bool = False) -> ImageTransform:
    """The pixel transform of `backbone` (``"clip"``, ``"vit"`` or ``"imagenet"``) for training or evaluation."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if backbone == "clip":
        # ESL and Multi-SEA use the evaluation transform for training too
        steps = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
        mean, std = CLIP_MEAN, CLIP_STD
    elif backbone == "vit":
        steps = ([T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
                 if train else [T.Resize((size, size), interpolation=bicubic)])
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif backbone == "imagenet":
        steps = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train
                 else [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)])
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ValueError(f"unknown backbone {backbone!r}; use one of {list(BACKBONES)}")
    pipeline = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    return ImageTransform(pipeline, backbone, size, train)


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
