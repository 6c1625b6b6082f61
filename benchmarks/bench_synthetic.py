"""How fast `SyntheticShapes` produces its data: captions up front, region features and pictures per index.

Prints the time to build the captions of all splits (wall clock and CPU time of this process), and the
median CPU time per image (over ``--images`` images, after a warm-up that builds the code tables) of the
region features and of the rendered picture.
Absolute times depend on the machine and its load; the script prints the machine load next to them.

    python benchmarks/bench_synthetic.py [--num-images 12000] [--region-dim 2048] [--images 200]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from itmzoo.data import SyntheticShapes


def per_item(fn, n: int) -> float:
    """Median CPU seconds of one call of fn(i) over i in range(n) (CPU time: robust to other jobs' load)."""
    times = []
    for i in range(n):
        t = time.process_time()
        fn(i)
        times.append(time.process_time() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=12000)
    ap.add_argument("--region-dim", type=int, default=2048)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    ds = SyntheticShapes(args.num_images, region_dim=args.region_dim)
    t, c = time.perf_counter(), time.process_time()
    splits = {s: ds.split(s) for s in ("train", "dev", "test")}
    captions_s, captions_cpu = time.perf_counter() - t, time.process_time() - c
    n_caps = sum(len(s.captions) for s in splits.values())
    ds.regions("train", 0), ds.render("train", 0)  # warm-up: code tables, scratch buffers, PIL
    regions_s = per_item(lambda i: ds.regions("train", i), args.images)
    render_s = per_item(lambda i: ds.render("train", i), args.images)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"captions of {args.num_images} images ({n_caps} captions): {captions_s:.1f} s wall, "
          f"{captions_cpu:.1f} s CPU")
    print(f"region features {ds.num_regions} x {args.region_dim}: {regions_s * 1e3:.2f} ms CPU per image (median)")
    print(f"rendered picture {ds.image_size} x {ds.image_size}: {render_s * 1e3:.2f} ms CPU per image (median)")


if __name__ == "__main__":
    main()
