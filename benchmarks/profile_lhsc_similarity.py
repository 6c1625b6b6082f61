"""Where LHSC's batched `similarity` spends its time: a torch.profiler breakdown (docs/performance.md).

Scores the setting of `bench_lhsc_similarity.py` (random weights, ``--images`` x ``--captions`` pairs,
36 regions, D = 1024, caption lengths 8-22) once to warm up and once under the profiler, then prints
the share of self CPU time of the top operators (with their input shapes) and of four groups:

* projection: ``addmm`` with 1024 input features (the 1024 -> 256 local and global projections);
* context product: batched products with an inner size of 36 (attention x regions);
* other 1024-d products: every other matrix product with a 1024-long dimension (mostly the
  region-word scores);
* the rest: elementwise passes, softmax, norms, copies, indexing.

    python benchmarks/profile_lhsc_similarity.py [--images 100] [--captions 500] [--threads 2] [--top 12]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import itmzoo
from itmzoo.eval.similarity import similarity_matrix

D, R = 1024, 36
PRODUCTS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def group(name: str, shapes: list) -> str:
    dims = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) >= 2]
    if name not in PRODUCTS or len(dims) < 2:
        return "rest (elementwise, softmax, norms, copies, indexing)"
    if name == "aten::addmm" and dims[0][-1] == D:
        return "projection (addmm, 1024 -> 256)"
    if dims[0][-1] == R:
        return "context product (inner size 36)"
    if any(D in s for s in dims):
        return "other 1024-d products (region-word scores)"
    return "other products"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--captions", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = itmzoo.build("lhsc", vocab_size=50).eval()
    ni, nc = args.images, args.captions
    lengths = torch.from_numpy(rng.integers(8, 23, size=nc))
    lmax = int(lengths.max())
    mask = torch.arange(lmax)[None, :] < lengths[:, None]
    img = torch.nn.functional.normalize(torch.randn(ni, R, D), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(nc, lmax, D), dim=-1) * mask[..., None]
    with torch.no_grad():
        im = {"regions": img, "global": model.sim_enc.v_global_w(img)}
        tx = {"tokens": cap, "mask": mask, "global": model.sim_enc.t_global_w(cap, mask)}

    def run() -> None:
        with torch.no_grad():
            similarity_matrix(model, im, tx, block=(ni, nc), device="cpu", progress=False)

    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group(e.key, e.input_shapes)] += e.self_cpu_time_total
    print(f"LHSC similarity, {ni} x {nc} pairs, {args.threads} thread(s), torch {torch.__version__}: "
          f"{total / 1e6:.2f} s self CPU time under the profiler")
    print("| group | share of self CPU time |")
    print("|---|---|")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * t / total:.0f} % |")
    print(f"\ntop {args.top} operators:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f} %  {e.key:<22} x{e.count:<5} {e.input_shapes}")


if __name__ == "__main__":
    main()
