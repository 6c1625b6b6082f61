"""Encoding a split and computing the image x caption score matrix block by block."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..features import Features, cat_features, features_len, features_to, slice_features
from ..threads import block_threads, run_blocks

__all__ = ["autocast_context", "block_tiles", "encode_batches", "encode_split", "scoring_threads",
           "similarity_matrix"]


def autocast_context(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op elsewhere or when `amp` is None."""
    if amp is None or device.type != "cuda":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast("cuda", dtype=dtypes[amp])


@torch.no_grad()
def encode_batches(fn: Any, loader: Iterable, device: torch.device, amp: str | None = None,
                   keep_on: torch.device | str = "cpu", desc: str = "encode", progress: bool = False,
                   num_threads: int | None = None) -> Features:
    """`fn` (an encoder) over collated batches moved to `device`, features joined on `keep_on` in float32.

    On the CPU, `num_threads` threads (default ``torch.get_num_threads()``) each take the next batch
    from the loader and encode it with one torch thread (`itmzoo.threads`); the features come back
    in loader order, each batch encoded as a one-thread run encodes it.
    """
    n = len(loader) if hasattr(loader, "__len__") else None
    # no more threads than batches; an iterator without a length may have any number
    threads = block_threads(n if n is not None else 1 << 30, num_threads) if device.type == "cpu" else 1
    batches = enumerate(loader)
    parts: dict[int, Features] = {}
    lock = threading.Lock()
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)

    def drain(_: int, _state: None) -> None:  # each thread encodes the next batch until none is left
        while True:
            with lock:
                item = next(batches, None)
            if item is None:
                return
            k, batch = item
            with autocast_context(device, amp):
                feats = fn(features_to(batch, device))
            parts[k] = features_to(feats, keep_on, torch.float32)
            with lock:
                bar.update(1)

    try:
        run_blocks(range(threads), drain, threads)  # one thread: in order, with the caller's settings
    finally:
        bar.close()
    return cat_features([parts[k] for k in range(len(parts))])


def _shard(n_items: int, batch_size: int, rank: int, world: int) -> range:
    """This rank's contiguous run of whole batches (so every batch is the one a single process encodes)."""
    n_batches = -(-n_items // batch_size)
    a, b = rank * n_batches // world, (rank + 1) * n_batches // world
    return range(min(a * batch_size, n_items), min(b * batch_size, n_items))


def _comm_device(device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_encoded(local: Features | None, template: Features | None, device: torch.device,
                    keep_on: torch.device | str) -> Features:
    """Every rank's encoded rows, concatenated in rank (= split) order, on every rank."""
    from .. import distributed as D

    if local is None:  # this rank had no batch: send zero rows of the right layout
        local = ({k: v[:0] for k, v in template.items()} if isinstance(template, dict) else template[:0])
    comm = _comm_device(device)
    return features_to(D.gather_features_nograd(features_to(local, comm)), keep_on)


@torch.no_grad()
def encode_split(model: torch.nn.Module, split: Any, batch_size: int = 128, device: str | torch.device | None = None,
                 amp: str | None = None, num_workers: int = 0, progress: bool = True,
                 keep_on: str | torch.device = "cpu", *, image_batch_size: int | None = None,
                 text_batch_size: int | None = None, distributed: bool = False) -> tuple[Features, Features]:
    """Encode each unique image once and every caption once, in split order (model in eval mode).

    Batch sizes: the arguments, else ``model.eval_settings()``, else `batch_size` (text features that
    depend on batch padding, as LHSC's, must be encoded in the reference's batches). With
    `distributed`, each rank of the process group encodes a contiguous run of whole batches and every
    rank receives all features.
    """
    from torch.utils.data import Subset

    from ..data.collate import eval_loaders

    device = torch.device(device) if device is not None else model.device
    settings = model.eval_settings()
    ibs = image_batch_size or settings.image_batch_size or batch_size
    tbs = text_batch_size or settings.text_batch_size or batch_size
    rank, world = 0, 1
    if distributed:
        from .. import distributed as D

        rank, world = D.get_rank(), D.get_world_size()
    was_training = model.training
    model.eval()
    try:
        images, _ = eval_loaders(split, model, batch_size=ibs, num_workers=num_workers)
        _, captions = eval_loaders(split, model, batch_size=tbs, num_workers=num_workers)
        out = []
        for fn, loader, bs, n, what in ((model.encode_image, images, ibs, split.num_images, "images"),
                                        (model.encode_text, captions, tbs, split.num_captions, "captions")):
            if world > 1:
                mine = _shard(n, bs, rank, world)
                loader = torch.utils.data.DataLoader(Subset(loader.dataset, mine), batch_size=bs, shuffle=False,
                                                     num_workers=num_workers, collate_fn=loader.collate_fn)
            feats = None
            if len(loader):
                feats = encode_batches(fn, loader, device, amp, keep_on, f"encode {what}", progress)
            if world > 1:
                layouts: list[Any] = [None] * world
                torch.distributed.all_gather_object(layouts, None if feats is None else _layout(feats))
                template = _empty_like_layout(next(x for x in layouts if x is not None))
                feats = _gather_encoded(feats, template, device, keep_on)
            out.append(feats)
    finally:
        model.train(was_training)
    return out[0], out[1]


def _layout(feats: Features) -> Any:
    if isinstance(feats, torch.Tensor):
        return (tuple(feats.shape[1:]), feats.dtype)
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in feats.items()}


def _empty_like_layout(layout: Any) -> Features:
    if isinstance(layout, tuple):
        return torch.empty((0, *layout[0]), dtype=layout[1])
    return {k: torch.empty((0, *shape), dtype=dtype) for k, (shape, dtype) in layout.items()}


def block_tiles(n_img: int, n_txt: int, block: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The ``(row, col, rows, cols)`` tiles of the block grid, row-major (the same in every process)."""
    bi, bt = block
    if bi <= 0 or bt <= 0:
        raise ValueError(f"block sizes must be positive, got {block}")
    return [(i, j, min(bi, n_img - i), min(bt, n_txt - j)) for i in range(0, n_img, bi) for j in range(0, n_txt, bt)]


def _score_tile(model: torch.nn.Module, image_feats: Features, text_feats: Features, tile: tuple[int, int, int, int],
                device: torch.device, amp: str | None, dtype: torch.dtype | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The scores of one tile, on the CPU in `out_dtype` (the model is already in eval mode)."""
    i, j, h, w = tile
    im = features_to(slice_features(image_feats, slice(i, i + h)), device, dtype)
    tx = features_to(slice_features(text_feats, slice(j, j + w)), device, dtype)
    with autocast_context(device, amp):
        s = model.similarity(im, tx)
    if tuple(s.shape) != (h, w):
        raise RuntimeError(f"{type(model).__name__}.similarity returned shape {tuple(s.shape)} for a "
                           f"block of {h} images x {w} captions")
    return s.to("cpu", out_dtype)


def _score_tiles(model: torch.nn.Module, image_feats: Features, text_feats: Features,
                 tiles: list[tuple[int, int, int, int]], device: torch.device, amp: str | None,
                 dtype: torch.dtype | None, out_dtype: torch.dtype, progress: bool,
                 sink: Callable[[int, torch.Tensor], None], threads: int = 1) -> None:
    """Score every tile and hand ``(tile number, scores on the CPU in out_dtype)`` to `sink`.

    With ``threads > 1`` (CPU) the tiles are shared by `itmzoo.threads.run_blocks`; `sink` is then
    called from several threads, in any order, for distinct tiles.
    """
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(tiles), desc="similarity", disable=not progress or len(tiles) < 2, leave=False)
    lock = threading.Lock()

    def work(k: int, _state: None) -> None:
        sink(k, _score_tile(model, image_feats, text_feats, tiles[k], device, amp, dtype, out_dtype))
        with lock:
            bar.update(1)

    try:
        run_blocks(range(len(tiles)), work, threads)
    finally:
        bar.close()
        model.train(was_training)


def scoring_threads(model: torch.nn.Module, device: torch.device, n_blocks: int,
                    num_threads: int | None = None) -> int:
    """Threads that score a model's blocks (tiles, query batches) side by side: 1 on CUDA and for a
    model that draws random numbers while scoring (``eval_settings().seed``: its draws follow the
    block order), else `itmzoo.threads.block_threads`."""
    if device.type != "cpu" or model.eval_settings().seed is not None:
        return 1
    return block_threads(n_blocks, num_threads)


@torch.no_grad()
def similarity_matrix(model: torch.nn.Module, image_feats: Features, text_feats: Features,
                      block: tuple[int, int] = (256, 1024), device: str | torch.device | None = None,
                      amp: str | None = None, dtype: torch.dtype | None = None,
                      progress: bool = True, distributed: bool = False,
                      num_threads: int | None = None) -> torch.Tensor | None:
    """``[n_images, n_captions]`` scores of any model, computed in blocks with bounded memory.

    Each block of ``block[0]`` images x ``block[1]`` captions is moved to `device`, scored with
    ``model.similarity`` (optionally under autocast) and copied back to a CPU matrix of `dtype`
    (float32 by default; float64 reproduces the VSE-family reference, which multiplies float32
    embeddings in float64).

    With `distributed`, the ranks of the process group share the blocks (contiguous runs of the same
    row-major grid, so every block is scored exactly as one process scores it) and rank 0 receives the
    matrix; the other ranks return None.

    On the CPU, `num_threads` threads (default ``torch.get_num_threads()``) take whole tiles, each
    with one torch thread (`itmzoo.threads`): this holds its speed when another process takes a core,
    and every tile is computed as a one-thread run computes it. Models that draw random numbers while
    scoring (``eval_settings().seed``) are scored tile after tile, in order.
    """
    device = torch.device(device) if device is not None else model.device
    n_img, n_txt = features_len(image_feats), features_len(text_feats)
    out_dtype = dtype or torch.float32
    tiles = block_tiles(n_img, n_txt, block)
    rank, world = 0, 1
    if distributed:
        from .. import distributed as D

        rank, world = D.get_rank(), D.get_world_size()
    mine = tiles[rank * len(tiles) // world:(rank + 1) * len(tiles) // world]
    threads = scoring_threads(model, device, len(mine), num_threads)
    if world == 1:
        sims = torch.empty(n_img, n_txt, dtype=out_dtype)

        def into_matrix(k: int, s: torch.Tensor) -> None:
            i, j, h, w = mine[k]
            sims[i:i + h, j:j + w] = s

        _score_tiles(model, image_feats, text_feats, mine, device, amp, dtype, out_dtype, progress, into_matrix,
                     threads)
        return sims
    from .. import distributed as D

    parts: list[torch.Tensor] = [torch.empty(0, dtype=out_dtype)] * len(mine)

    def into_parts(k: int, s: torch.Tensor) -> None:
        parts[k] = s.reshape(-1)

    _score_tiles(model, image_feats, text_feats, mine, device, amp, dtype, out_dtype, progress, into_parts, threads)
    comm = _comm_device(device)
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=out_dtype)
    pieces = D.gather_to_main(flat.to(comm))
    if pieces is None:
        return None
    sims = torch.empty(n_img, n_txt, dtype=out_dtype)
    for r, piece in enumerate(pieces):
        piece, at = piece.cpu(), 0
        for i, j, h, w in tiles[r * len(tiles) // world:(r + 1) * len(tiles) // world]:
            sims[i:i + h, j:j + w] = piece[at:at + h * w].view(h, w)
            at += h * w
    return sims
