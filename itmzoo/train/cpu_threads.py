"""The number of torch threads for CPU training, chosen from measured step times.

A training step is hundreds of small operations, each one of torch's parallel regions, and every
region waits for all its threads. On a machine of its own, 2 threads make a small model's step about
1.4x faster than 1; when another process holds one of 2 cores, the same 2 threads make it 2-4x
slower than 1 thread (each region waits a scheduler slice for the descheduled thread). No fixed count
suits both, and the load of a shared machine changes during a run, so `ThreadTuner` measures: it
runs a few interleaved steps at each candidate count (n, n/2, ..., 1), keeps the fastest, and checks
again after a growing number of steps, or at once when steps become much slower than measured.

Changing the count can change the order of floating-point sums inside some operations, so a run
whose count changed is not bit-identical to one that kept it: set ``train.cpu_threads`` (or
``OMP_NUM_THREADS``) for bit-reproducible CPU runs.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections import deque
from typing import Callable

import torch

__all__ = ["CpuThreadPlan", "ThreadTuner", "candidate_counts", "cpu_threads_beside_workers", "plan_cpu_threads"]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads_beside_workers(device: torch.device, num_workers: int) -> int | None:
    """Torch threads for CPU training beside `num_workers` loader processes, or None to keep the current count.

    Loader workers and compute threads that together exceed the cores make every parallel region wait
    for a descheduled thread. An explicit ``OMP_NUM_THREADS`` is the user's choice and is kept, as is a
    count the user lowered with ``torch.set_num_threads`` so that it already fits.
    """
    if device.type != "cpu" or num_workers <= 0 or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores, now = _cores(), torch.get_num_threads()
    if now + num_workers <= cores:
        return None
    return max(1, cores - num_workers)


@dataclasses.dataclass
class CpuThreadPlan:
    """How a run sets torch's threads: `threads` for the run (None: keep the current count), and a
    `tuner` that changes the count per step (None: fixed); `why` says why, for the start-up line."""

    threads: int | None
    tuner: ThreadTuner | None
    why: str


def plan_cpu_threads(device: torch.device, cpu_threads: int | None, num_workers: int, world: int = 1,
                     deterministic: bool = False) -> CpuThreadPlan:
    """The thread policy of a training run (``train.cpu_threads``; None = measured per step).

    Fixed counts: an explicit `cpu_threads`; else ``OMP_NUM_THREADS`` when set; else, for
    deterministic or multi-process runs, torch's count (lowered beside loader workers). Otherwise a
    `ThreadTuner` chooses between torch's count (lowered beside loader workers) and fewer.
    """
    if device.type != "cpu":
        return CpuThreadPlan(None, None, "not a CPU run")
    if cpu_threads is not None:
        return CpuThreadPlan(cpu_threads, None, f"train.cpu_threads = {cpu_threads}")
    if os.environ.get("OMP_NUM_THREADS"):
        return CpuThreadPlan(None, None, f"OMP_NUM_THREADS = {os.environ['OMP_NUM_THREADS']}")
    beside = cpu_threads_beside_workers(device, num_workers)
    most = beside or torch.get_num_threads()
    why = (f"{num_workers} loader worker(s) + {torch.get_num_threads()} torch threads exceed the {_cores()} cores"
           if beside is not None else "")
    if deterministic or world > 1 or most == 1:
        reason = "train.deterministic" if deterministic else "several processes" if world > 1 else ""
        return CpuThreadPlan(beside, None, "; ".join(x for x in (why, reason) if x) or "one thread")
    return CpuThreadPlan(beside, ThreadTuner(most), why)


def candidate_counts(max_threads: int) -> list[int]:
    """``[n, n // 2, ..., 1]`` without repeats."""
    out, n = [], max(1, int(max_threads))
    while n >= 1:
        out.append(n)
        n //= 2
    return out


class ThreadTuner:
    """Chooses the thread count of each training step from the times of earlier steps.

    Use: ``n = tuner.next_threads()`` before a step (and ``torch.set_num_threads(n)``), then
    ``tuner.record(seconds)`` after it. `on_choice(threads, medians, changed)` is called whenever a
    probe ends, with the median step time of every candidate it measured and whether the count differs
    from the one before (always true for the first probe).
    """

    def __init__(self, max_threads: int, probe_steps: int = 3, first_interval: int = 24,
                 max_interval: int = 384, warmup_steps: int = 2, slack: float = 1.5,
                 on_choice: Callable[[int, dict[int, float], bool], None] | None = None) -> None:
        if probe_steps < 1 or first_interval < 1 or warmup_steps < 0 or slack <= 1:
            raise ValueError("ThreadTuner needs probe_steps >= 1, first_interval >= 1, warmup_steps >= 0, slack > 1")
        self.candidates = candidate_counts(max_threads)
        self.max_threads = self.candidates[0]
        self.probe_steps, self.first_interval, self.max_interval = probe_steps, first_interval, max_interval
        self.slack, self.on_choice = slack, on_choice
        self.threads = self.max_threads
        self.interval = first_interval
        # the next steps' thread counts, and whether each step's time counts for the probe
        self._plan: deque[tuple[int, bool]] = deque((self.max_threads, False) for _ in range(warmup_steps))
        self._samples: dict[int, list[float]] = {}
        self._pending: tuple[int, bool] | None = None
        self._since_probe = 0
        self._expected: float | None = None  # the chosen count's median step time at the last probe
        self._recent: deque[float] = deque(maxlen=probe_steps)
        self.probes = 0
        if len(self.candidates) > 1:
            self._plan_probe()
        else:
            self._plan.clear()

    def _plan_probe(self) -> None:
        # interleaved (a, b, a, b, ...) so that a change of load during the probe hits every candidate
        self._samples = {c: [] for c in self.candidates}
        self._plan.extend((c, True) for _ in range(self.probe_steps) for c in self.candidates)

    def next_threads(self) -> int:
        """The thread count to use for the next step."""
        self._pending = self._plan[0] if self._plan else (self.threads, False)
        return self._pending[0]

    def record(self, seconds: float) -> None:
        """The wall time of the step just run with ``next_threads()``."""
        if self._pending is None:
            raise RuntimeError("ThreadTuner.record() without next_threads() before the step")
        threads, measured = self._pending
        self._pending = None
        if self._plan:
            self._plan.popleft()
            if measured:
                self._samples[threads].append(seconds)
                if not self._plan:
                    self._choose()
            return
        if len(self.candidates) == 1:
            return
        self._since_probe += 1
        self._recent.append(seconds)
        slower = (self._expected is not None and len(self._recent) == self._recent.maxlen
                  and statistics.median(self._recent) > self.slack * self._expected)
        if slower or self._since_probe >= self.interval:
            if slower:
                self.interval = self.first_interval
            self._plan_probe()

    def _choose(self) -> None:
        medians = {c: statistics.median(v) for c, v in self._samples.items() if v}
        best = min(medians, key=lambda c: (medians[c], -c))
        changed = not self.probes or best != self.threads
        if self.probes:
            # the same answer again: check less often; a new one: the load changed, check soon
            self.interval = min(self.max_interval, 2 * self.interval) if best == self.threads else self.first_interval
        self.threads, self._expected = best, medians[best]
        self.probes += 1
        self._since_probe = 0
        self._recent.clear()
        if self.on_choice is not None:
            self.on_choice(best, medians, changed)
