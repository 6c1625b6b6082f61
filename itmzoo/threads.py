"""Independent CPU blocks shared by Python threads, one torch thread each.

torch's intra-op parallelism cuts every operation into equal static shares and waits at its end for
all of them. On a machine where another process holds a core, one share is often descheduled, and
every operation then waits a scheduler slice for it: work made of many small operations (a score
tile, a row block, a group of captions) slows down 3-25x instead of the fair 2x. When the work falls
into independent blocks, `run_blocks` lets each of N threads take the next whole block and run it
with one torch thread: a descheduled thread delays only its own block, the others keep taking blocks,
and there is one wait at the end instead of one per operation. Each block is computed by one thread
from start to end, so results do not depend on N or on which thread took the block.

N is ``torch.get_num_threads()`` (which follows ``OMP_NUM_THREADS`` and ``torch.set_num_threads``)
unless the caller passes another count; code running inside a block sees N = 1, so nested callers
run their blocks in sequence.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence, TypeVar

__all__ = ["block_threads", "in_block_worker", "inference_threads", "map_blocks", "run_blocks"]

T = TypeVar("T")
S = TypeVar("S")
R = TypeVar("R")

_local = threading.local()


def in_block_worker() -> bool:
    """True inside a block run by `run_blocks` (nested block-parallel code then runs serially)."""
    return getattr(_local, "active", False)


def block_threads(n_blocks: int, num_threads: int | None = None) -> int:
    """Threads for `n_blocks` independent blocks: `num_threads` (default torch's intra-op count), at most
    one per block, and 1 inside a block worker."""
    import torch

    if in_block_worker():
        return 1
    n = torch.get_num_threads() if num_threads is None else num_threads
    return max(1, min(int(n), n_blocks))


def inference_threads(n_blocks: int, device: Any) -> int:
    """`block_threads` for blocks of a model's scoring without autograd on the CPU; else 1 (CUDA runs
    its own kernels in parallel, and a recorded graph is built in one sequence)."""
    import torch

    if torch.is_grad_enabled() or torch.device(device).type != "cpu":
        return 1
    return block_threads(n_blocks)


def run_blocks(items: Sequence[T], work: Callable[[T, S], None], num_threads: int,
               state: Callable[[], S] = lambda: None) -> list[S]:
    """Call ``work(item, state)`` for every item on `num_threads` threads (the caller's included).

    Each thread takes the next item when it is free, with one torch intra-op thread, the caller's
    autograd mode, and its own ``state()`` (e.g. a private accumulator); the states are returned. The
    first exception stops the others from taking new items and is raised here. With
    ``num_threads <= 1`` the items run in order on the caller's thread with its settings unchanged.
    """
    if num_threads <= 1 or len(items) <= 1:
        st = state()
        for item in items:
            work(item, st)
        return [st]
    import torch

    grad = torch.is_grad_enabled()
    lock = threading.Lock()
    next_item = iter(items)
    errors: list[BaseException] = []
    states: list[S] = []

    def worker() -> None:
        _local.active = True
        torch.set_num_threads(1)  # thread-local for OpenMP and MKL; the caller restores the process count
        st = state()
        try:
            with torch.set_grad_enabled(grad):
                while not errors:
                    with lock:
                        item = next(next_item, _DONE)
                    if item is _DONE:
                        break
                    work(item, st)
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)
        finally:
            _local.active = False
            with lock:
                states.append(st)

    before = torch.get_num_threads()
    threads = [threading.Thread(target=worker, daemon=True, name=f"itmzoo-block-{i}") for i in range(num_threads - 1)]
    for t in threads:
        t.start()
    try:
        worker()
    finally:
        for t in threads:
            t.join()
        torch.set_num_threads(before)
    if errors:
        raise errors[0]
    return states


def map_blocks(fn: Callable[[T], R], items: Sequence[T], num_threads: int) -> list[R]:
    """``[fn(item) for item in items]`` computed by `run_blocks` (results in item order)."""
    out: list = [None] * len(items)

    def work(k: int, _state: None) -> None:
        out[k] = fn(items[k])

    run_blocks(range(len(items)), work, num_threads)
    return out


_DONE = object()
