"""Recall on the COCO-5K-sized matrix: itmzoo's vectorised ranks vs the reference per-query loop.

The reference loop (`itmzoo.eval.reference`) restates VSE-infinity's `i2t`/`t2i` (argsort per query).
Both run in the same process on the same matrix (`seeded_sims(2021, n, 3.0)`, n = 5000 by default),
and the script checks that the ranks are identical before reporting the speed ratio.

    python benchmarks/bench_recall.py [--n 5000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from itmzoo.eval import retrieval_ranks
from itmzoo.eval.reference import reference_ranks, seeded_sims


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.n
    S = seeded_sims(2021, n, 3.0)
    c2i = np.arange(5 * n) // 5

    t0 = time.perf_counter()
    ref_i2t, ref_t2i = reference_ranks(S)
    t_ref = time.perf_counter() - t0

    St = torch.from_numpy(S).to(args.device)
    times = []
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        i2t, t2i = retrieval_ranks(St, torch.as_tensor(c2i, device=args.device))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t_ours = min(times)
    same = bool(np.array_equal(i2t.cpu().numpy(), ref_i2t) and np.array_equal(t2i.cpu().numpy(), ref_t2i))
    print(json.dumps({"n_images": n, "n_captions": 5 * n, "device": args.device, "threads": torch.get_num_threads(),
                      "reference_s": round(t_ref, 3), "itmzoo_s": round(t_ours, 3),
                      "speedup": round(t_ref / t_ours, 1), "identical_ranks": same}, indent=2))
    if not same:
        raise SystemExit("ranks differ from the reference")


if __name__ == "__main__":
    main()
