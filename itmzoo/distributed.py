"""Distributed helpers: rank/world queries, ``torchrun`` set-up and all-gather *with gradients*.

A method whose loss needs negatives from every rank (VSE++ hardest negatives, InfoNCE) gathers its
embeddings in ``forward`` before scoring them::

    from itmzoo.distributed import gather_features

    def forward(self, batch):
        img = gather_features(self.encode_image(batch))      # [global B, D], differentiable
        txt = gather_features(self.encode_text(batch))
        idx = gather_features(batch["image_index"])          # no gradient needed, gathered too
        return {"loss": hinge_triplet_loss(img @ txt.t(), pos_mask=idx[:, None] == idx[None, :])}

Every rank then computes the same global loss. The backward pass of the gather sums the gradient
over ranks before taking this rank's rows, so after DistributedDataParallel averages the parameter
gradients they equal the single-process gradients of the loss over the global batch (tested on CPU
with gloo). Outside a process group (or with one process) the functions are the identity, so a model
written this way trains unchanged on one device. This module imports nothing heavy.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "all_gather_with_grad",
    "barrier",
    "broadcast_object",
    "gather_features_nograd",
    "gather_to_main",
    "gather_features",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# Collectives wait this long before failing. Every rank now takes part in evaluation (a COCO 5K
# cross-model evaluation can take hours on few GPUs), so the backends' defaults (10 min for NCCL
# with async error handling, 30 min for gloo) are too short; ITMZOO_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 6 * 3600


def init_from_env(timeout_s: float | None = None) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment; ``(rank, world, local_rank)``.

    Uses NCCL when CUDA is available and gloo otherwise; without ``WORLD_SIZE`` > 1 it does nothing.
    Collectives time out after `timeout_s` (default: ``ITMZOO_DIST_TIMEOUT_S`` or 6 hours).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        if timeout_s is None:
            raw = os.environ.get("ITMZOO_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
            try:
                timeout_s = float(raw)
            except ValueError:
                raise ValueError(f"ITMZOO_DIST_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
        if timeout_s <= 0:
            raise ValueError(f"the process-group timeout must be positive, got {timeout_s} s")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), local_rank


def _gather_shapes(t: torch.Tensor) -> list[tuple[int, ...]]:
    shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)
    out = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(out, shape)
    return [tuple(int(x) for x in s.tolist()) for s in out]


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t.contiguous()
    pad: list[int] = []
    for d in reversed(range(t.dim())):
        pad += [0, shape[d] - t.shape[d]]
    return torch.nn.functional.pad(t, pad)


def _raw_gather(t: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Concatenate every rank's `t` along dim 0; other dims are zero-padded to the largest rank's."""
    shapes = _gather_shapes(t)
    if len({len(s) for s in shapes}) != 1:
        raise RuntimeError(f"all_gather: ranks hold tensors of different ranks: {shapes}")
    full = tuple(max(s[d] for s in shapes) for d in range(t.dim()))
    parts = [torch.empty(full, dtype=t.dtype, device=t.device) for _ in shapes]
    dist.all_gather(parts, _pad_to(t, full))
    trimmed = [p[: s[0]] for p, s in zip(parts, shapes)]
    return torch.cat(trimmed, 0), shapes


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out, shapes = _raw_gather(t)
        rank = dist.get_rank()
        ctx.start = sum(s[0] for s in shapes[:rank])
        ctx.shape = tuple(t.shape)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # every rank computed the loss from the gathered rows: this rank's rows receive the gradient
        # of every rank's loss copy, so sum over ranks (DDP's averaging then cancels the factor)
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        own = grad[ctx.start: ctx.start + ctx.shape[0]]
        return own[tuple(slice(0, n) for n in ctx.shape)]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Rows of `t` from every rank, in rank order, keeping the autograd graph to this rank's rows.

    Ranks may hold different numbers of rows; trailing dims (e.g. token counts) are zero-padded to
    the largest. Integer tensors are gathered without a graph. The identity outside a process group.
    """
    if not is_distributed():
        return t
    if not (t.requires_grad and t.is_floating_point()):
        return _raw_gather(t)[0]
    return _AllGatherWithGrad.apply(t)


def gather_features(feats: Any) -> Any:
    """`all_gather_with_grad` over a tensor or each tensor of a dict (token sets with masks)."""
    if isinstance(feats, torch.Tensor):
        return all_gather_with_grad(feats)
    if isinstance(feats, Mapping):
        return {k: gather_features(v) for k, v in feats.items()}
    raise TypeError(f"gather_features expects a tensor or a dict of tensors, got {type(feats).__name__}")


def gather_features_nograd(feats: Any) -> Any:
    """Rows of a feature set (tensor or dict of tensors) from every rank, in rank order, without a graph.

    Every rank receives the whole set. A rank may hold zero rows if it still has the right keys and
    trailing shapes; token dims are zero-padded to the largest rank's, as `cat_features` pads batches.
    """
    if not is_distributed():
        return feats
    if isinstance(feats, Mapping):
        return {k: gather_features_nograd(v) for k, v in feats.items()}
    t = feats.detach()
    if t.dtype == torch.bool:  # gloo has no bool all_gather
        return _raw_gather(t.to(torch.uint8))[0].bool()
    return _raw_gather(t)[0]


def gather_to_main(t: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's 1-D tensor `t` (lengths may differ), on rank 0 only (others get None).

    Memory: rank 0 receives world x the longest piece; the other ranks send theirs and keep nothing.
    """
    if not is_distributed():
        return [t]
    if t.dim() != 1:
        raise ValueError(f"gather_to_main sends 1-D tensors, got shape {tuple(t.shape)}")
    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    send = torch.nn.functional.pad(t.contiguous(), (0, longest - t.numel()))
    if dist.get_rank() == 0:
        recv = [torch.empty_like(send) for _ in sizes]
        dist.gather(send, recv, dst=0)
        return [r[: int(s)] for r, s in zip(recv, sizes)]
    dist.gather(send, None, dst=0)
    return None


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank (the identity outside a process group)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
