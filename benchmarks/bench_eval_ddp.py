"""Evaluation across processes: an LHSC evaluation with 2 processes x 1 thread (torchrun) against
1 process x 1 thread, through the CLI; checks that both print the same metrics.

    python benchmarks/bench_eval_ddp.py --pretrained runs/lhsc_demo/best [--block 50 250] [--repeats 2]

The data is the LHSC demo's test split (200 images, 1,000 captions). The ranks share the blocks of
the similarity grid, so --block should give each rank several blocks (default 50 x 250: 16 blocks).
Reported: wall time of the whole command (start-up included) and the evaluation's own time (encoding
and scoring, from the metrics JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = ("{format: synthetic, kind: regions, seed: 0, region_dim: 128, num_regions: 12, noise: 0.3, "
        "num_images: {train: 1000, dev: 100, test: 200}, split: test}")


def _run(nproc: int, pretrained: str, block: list[int], out: Path) -> tuple[float, dict]:
    cli = ["-m", "itmzoo.cli", "eval", "--pretrained", pretrained, "--data", DATA, "--quiet",
           "--block", *map(str, block), "--out", str(out)]
    if nproc == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrained", required=True, help="native LHSC directory (e.g. runs/lhsc_demo/best)")
    ap.add_argument("--block", type=int, nargs=2, default=[50, 250])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    results: dict[int, list[tuple[float, dict]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.repeats):
            for n in (1, 2):  # interleaved, so both see the same machine load
                results[n].append(_run(n, args.pretrained, args.block, Path(d) / f"m{n}_{rep}.json"))
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    ref = results[1][0][1]
    for n, runs in results.items():
        for _, m in runs:
            assert all(m[k] == ref[k] for k in keys), f"{n} process(es) gave other metrics: {m} vs {ref}"
    print(f"metrics identical: rsum {ref['rsum']:.2f}")
    print("| processes x threads | command wall (s) | evaluation (s): encode + score |")
    print("|---|---|---|")
    best = {}
    for n, runs in results.items():
        wall = min(w for w, _ in runs)
        ev = min(m["seconds"]["encode"] + m["seconds"]["score"] for _, m in runs)
        best[n] = (wall, ev)
        print(f"| {n} x 1 | {wall:.1f} | {ev:.1f} |")
    print(f"ratio (2 x 1) / (1 x 1): command {best[2][0] / best[1][0]:.2f}, evaluation {best[2][1] / best[1][1]:.2f}")


if __name__ == "__main__":
    main()
