"""Two-stage retrieval: an embedding model's top k re-scored by a cross model, against the cross model
on every pair (recall and wall time, one process).

Train the two demo models on the same synthetic data first (LHSC's demo data: 128-d regions, 12 per
image, noise 0.3), then point this script at their best checkpoints:

    itmzoo train configs/lhsc_demo_synthetic.yaml --out runs/lhsc_demo
    itmzoo train configs/esa_demo_synthetic.yaml --out runs/esa_demo_lhsc_data \\
        --set data.region_dim=128 --set data.num_regions=12 --set data.noise=0.3 --set model.img_dim=128 \\
        --set "data.num_images={train: 1000, dev: 100, test: 200}"
    OMP_NUM_THREADS=1 python benchmarks/bench_two_stage.py --first runs/esa_demo_lhsc_data/best \\
        --second runs/lhsc_demo/best --ks 16 64 128 [--test-images 1000]

It prints a markdown table (first stage alone, the second on all pairs, the composition at each k)
and, with --out, writes the raw records as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import itmzoo
from itmzoo.data import load_split
from itmzoo.eval import evaluate

DATA = {"format": "synthetic", "kind": "regions", "seed": 0, "region_dim": 128, "num_regions": 12, "noise": 0.3,
        "num_images": {"train": 1000, "dev": 100, "test": 200}, "split": "test"}


KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def _timed(model, split, **kw):
    t0 = time.perf_counter()
    res = evaluate(model, split, progress=False, **kw)
    return res, time.perf_counter() - t0


@torch.no_grad()
def _block_costs(model, split) -> None:
    """Time per pair of `model.similarity` on blocks of (images, captions): small blocks cost more per pair."""
    from itmzoo.eval import encode_split
    from itmzoo.features import slice_features

    img, txt = encode_split(model, split, progress=False)
    model.eval()
    print("| block (images x captions) | us per pair |")
    print("|---|---|")
    for a, b in [(1, 64), (64, 1), (4, 256), (16, 64), (200, 1000)]:
        a, b = min(a, split.num_images), min(b, split.num_captions)
        n = max(1, 20000 // (a * b))
        t0 = time.perf_counter()
        for _ in range(n):
            model.similarity(slice_features(img, slice(0, a)), slice_features(txt, slice(0, b)))
        print(f"| {a} x {b} | {(time.perf_counter() - t0) / (n * a * b) * 1e6:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--first", required=True, help="native directory of the first-stage model (ESA)")
    ap.add_argument("--second", required=True, help="native directory of the second-stage model (LHSC)")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (the fastest is reported)")
    ap.add_argument("--test-images", type=int, default=200,
                    help="size of the synthetic test split (200: the demo's; 1000: Flickr30K's 1,000 x 5,000)")
    ap.add_argument("--block-costs", action="store_true",
                    help="only print the second model's time per pair on blocks of a few shapes")
    ap.add_argument("--out", help="write the records here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # synthetic items do not depend on split sizes: the first 200 test images are the demo's
    data = {**DATA, "num_images": {**DATA["num_images"], "test": args.test_images}}
    split = load_split(data)
    first, second = itmzoo.load(args.first), itmzoo.load(args.second)

    if args.block_costs:
        _block_costs(second, split)
        return
    rows = []

    def run(label, model, k=None, **kw):
        best = None
        for _ in range(args.repeats):
            res, sec = _timed(model, split, **kw)
            best = sec if best is None else min(best, sec)
        rows.append({"model": label, "k": k, "seconds": best,
                     **{key: res[key] for key in KEYS},
                     "two_stage": res.get("two_stage")})
        print(f"{label} k={k}: rsum {res['rsum']:.1f} in {best:.2f} s", flush=True)

    run("ESA (first stage alone)", first)
    run("LHSC, all pairs", second)
    for k in args.ks:
        model = itmzoo.build("two_stage", first=first.registry_name, second=second.registry_name, k=k,
                             first_checkpoint=args.first, second_checkpoint=args.second)
        run("ESA -> LHSC", model, k=k)
    full = rows[1]["seconds"]
    print(f"\n{split.num_images} images, {split.num_captions} captions, {args.threads} thread(s), "
          f"best of {args.repeats}\n")
    print("| model | k | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | time (s) | time / LHSC all pairs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = "-" if r["k"] is None else str(r["k"])
        print(f"| {r['model']} | {k} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | {r['i2t_r10']:.1f} | "
              f"{r['t2i_r1']:.1f} | {r['t2i_r5']:.1f} | {r['t2i_r10']:.1f} | {r['rsum']:.1f} | "
              f"{r['seconds']:.2f} | {r['seconds'] / full:.2f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"threads": args.threads, "data": data, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
