"""Pixel transforms: PIL path bit-identical to torchvision's reference, tensor-decode path close, clear errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from itmzoo.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToNormalizedTensor,
    image_transform,
    load_uint8,
)


def jpeg_bytes(w=50, h=37, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def reference(backbone: str, size: int):
    """The upstream evaluation pipelines, written with torchvision's classic transforms."""
    from torchvision import transforms as T

    bic = T.InterpolationMode.BICUBIC
    if backbone == "clip":  # ESL-CLIP and Multi-SEA (train = eval)
        return T.Compose([T.Resize(size, interpolation=bic), T.CenterCrop(size), T.ToTensor(),
                          T.Normalize(CLIP_MEAN, CLIP_STD)])
    return T.Compose([T.Resize((size, size), interpolation=bic), T.ToTensor(),  # SCTA eval
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("backbone", ["clip", "vit"])
@pytest.mark.parametrize("wh", [(50, 37), (37, 50), (20, 20)])
def test_pil_backend_is_bit_identical_to_the_upstream_pipeline(backbone, wh):
    data = jpeg_bytes(*wh)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    ours = image_transform(backbone, size=32, train=False)(data)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, reference(backbone, 32)(pil))


def test_to_normalized_tensor_equals_totensor_normalize():
    from torchvision import transforms as T

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    ref = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    assert torch.equal(ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)(img), ref)
    with pytest.raises(ValueError, match="RGB"):
        ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)(img.convert("L"))


@pytest.mark.parametrize("backbone", ["clip", "vit"])
def test_tensor_backend_is_close_to_pil(backbone, tmp_path):
    data = jpeg_bytes(50, 37, seed=3)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    pil = image_transform(backbone, 32)(data)
    fast = image_transform(backbone, 32, backend="tensor")
    from_bytes, from_path = fast(data), fast(path)
    assert torch.equal(from_bytes, from_path)
    assert torch.equal(load_uint8(Image.open(path)), load_uint8(path))  # same JPEG decoder output
    diff = (from_bytes - pil).abs()
    # different resampling code (torch's antialiased bicubic vs PIL's): about a grey level at most
    assert diff.max() < 0.05 and diff.mean() < 0.01


def test_train_transforms_are_seeded_and_vary():
    data = jpeg_bytes(50, 37)
    for backend in ("pil", "tensor"):
        t = image_transform("vit", 32, train=True, backend=backend)
        torch.manual_seed(0)
        a = t(data)
        torch.manual_seed(0)
        b = t(data)
        assert torch.equal(a, b)
        assert any(not torch.equal(a, t(data)) for _ in range(5))


def test_bad_inputs_are_clear_errors(tmp_path):
    for backend in ("pil", "tensor"):
        t = image_transform("clip", 32, backend=backend)
        with pytest.raises(FileNotFoundError, match="not found"):
            t(tmp_path / "missing.jpg")
        with pytest.raises(ValueError, match="cannot decode image"):
            t(b"not a jpeg at all")
    with pytest.raises(ValueError, match="unknown image backend"):
        image_transform("clip", backend="cv2")
