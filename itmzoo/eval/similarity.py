"""Encoding a split and computing the image x caption score matrix block by block."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from ..features import Features, cat_features, features_len, features_to, slice_features

__all__ = ["autocast_context", "encode_split", "similarity_matrix"]


def autocast_context(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op elsewhere or when `amp` is None."""
    if amp is None or device.type != "cuda":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast("cuda", dtype=dtypes[amp])


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def _encode(fn, loader: Iterable, device: torch.device, amp: str | None, keep_on: torch.device | str, desc: str,
            progress: bool) -> Features:
    parts = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast_context(device, amp):
            feats = fn(_to_device(batch, device))
        parts.append(features_to(feats, keep_on, torch.float32))
    return cat_features(parts)


@torch.no_grad()
def encode_split(model: torch.nn.Module, split: Any, batch_size: int = 128, device: str | torch.device | None = None,
                 amp: str | None = None, num_workers: int = 0, progress: bool = True,
                 keep_on: str | torch.device = "cpu") -> tuple[Features, Features]:
    """Encode each unique image once and every caption once, in split order (model in eval mode)."""
    from ..data.collate import eval_loaders

    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    try:
        images, captions = eval_loaders(split, model, batch_size=batch_size, num_workers=num_workers)
        text_bs = model.eval_settings().text_batch_size
        if text_bs:  # features that depend on batch padding (LHSC): encode captions as the reference did
            _, captions = eval_loaders(split, model, batch_size=text_bs, num_workers=num_workers)
        img = _encode(model.encode_image, images, device, amp, keep_on, "encode images", progress)
        txt = _encode(model.encode_text, captions, device, amp, keep_on, "encode captions", progress)
    finally:
        model.train(was_training)
    return img, txt


@torch.no_grad()
def similarity_matrix(model: torch.nn.Module, image_feats: Features, text_feats: Features,
                      block: tuple[int, int] = (256, 1024), device: str | torch.device | None = None,
                      amp: str | None = None, dtype: torch.dtype | None = None,
                      progress: bool = True) -> torch.Tensor:
    """``[n_images, n_captions]`` scores of any model, computed in blocks with bounded memory.

    Each block of ``block[0]`` images x ``block[1]`` captions is moved to `device`, scored with
    ``model.similarity`` (optionally under autocast) and copied back to a CPU matrix of `dtype`
    (float32 by default; float64 reproduces the VSE-family reference, which multiplies float32
    embeddings in float64).
    """
    device = torch.device(device) if device is not None else model.device
    bi, bt = block
    if bi <= 0 or bt <= 0:
        raise ValueError(f"block sizes must be positive, got {block}")
    n_img, n_txt = features_len(image_feats), features_len(text_feats)
    out_dtype = dtype or torch.float32
    sims = torch.empty(n_img, n_txt, dtype=out_dtype)
    steps = [(i, j) for i in range(0, n_img, bi) for j in range(0, n_txt, bt)]
    was_training = model.training
    model.eval()
    try:
        for i, j in tqdm(steps, desc="similarity", disable=not progress or len(steps) < 2, leave=False):
            im = features_to(slice_features(image_feats, slice(i, i + bi)), device, dtype)
            tx = features_to(slice_features(text_feats, slice(j, j + bt)), device, dtype)
            with autocast_context(device, amp):
                s = model.similarity(im, tx)
            expected = (min(bi, n_img - i), min(bt, n_txt - j))
            if tuple(s.shape) != expected:
                raise RuntimeError(f"{type(model).__name__}.similarity returned shape {tuple(s.shape)} for a "
                                   f"block of {expected[0]} images x {expected[1]} captions")
            sims[i:i + bi, j:j + bt] = s.to("cpu", out_dtype)
    finally:
        model.train(was_training)
    return sims
