"""Page faults and system time of an LHSC training step (paper dimensions, batch 128, CPU).

Runs one warm-up step and then `--steps` timed steps (forward + backward, no optimizer) of LHSC at its
default (paper) dimensions on random inputs, and prints per step: wall time, user and system CPU
seconds, minor page faults and the peak resident size. ``--heap`` first sets glibc's
``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` and ``M_TRIM_THRESHOLD``, so freed large blocks stay in the heap
for the next step instead of being unmapped and faulted in again (Linux/glibc only). Run each mode in
its own process, interleaved:

    for m in default heap default heap; do python benchmarks/lhsc_step_allocations.py --mode $m; done
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import time

import torch

import itmzoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["default", "heap"], default="default")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    if args.mode == "heap":
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        if libc.mallopt(m_mmap_threshold, 1 << 30) != 1 or libc.mallopt(m_trim_threshold, (1 << 31) - 1) != 1:
            raise SystemExit("mallopt refused the setting (not glibc?)")
    torch.manual_seed(0)
    model = itmzoo.build("lhsc", vocab_size=100).train()
    n = args.batch
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 23, (n,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(4, 100, (n, width), generator=g) * (torch.arange(width)[None] < lengths[:, None])
    batch = {"regions": torch.randn(n, 36, 2048, generator=g), "region_lengths": torch.full((n,), 36),
             "input_ids": ids, "lengths": lengths, "attention_mask": (ids != 0).long(), "image_index": torch.arange(n)}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        step()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    k = args.steps
    print(f"{args.mode}: per step wall {(t1 - t0) / k:.2f} s, user {(r1.ru_utime - r0.ru_utime) / k:.2f} s, "
          f"sys {(r1.ru_stime - r0.ru_stime) / k:.2f} s, minor faults {(r1.ru_minflt - r0.ru_minflt) / k / 1e3:.0f} k, "
          f"peak RSS {r1.ru_maxrss / 1e6:.2f} GB ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
