"""LHSC cross-interaction scoring: itmzoo's batched `similarity` vs the upstream sharded routine.

Both score the same encoded features (regions ``[Ni, 36, 1024]``, word features ``[Nc, L, 1024]``) with
the same random similarity weights, in one process, on the same device, so the ratio is what matters.
The machine's fp32 matrix-multiply rate is measured in the same run for reference.

The upstream half is optional: pass an LHSC checkout (``lDarryll/LHSC``; it is imported from there, never
copied into itmzoo) with ``--upstream PATH`` or ``ITMZOO_LHSC_UPSTREAM=PATH``. Its ``evaluation.py``
moves shards to CUDA with ``.cuda()``; on a CPU-only machine this script makes ``Tensor.cuda`` a no-op
for the duration of the upstream call (the same patch as the LHSC fixtures, docs/fixtures/lhsc.md).
Without an upstream checkout only the itmzoo half runs.

    python benchmarks/bench_lhsc_similarity.py [--upstream PATH] [--images 100] [--captions 500]
        [--device cpu|cuda] [--amp bf16|fp16] [--tf32] [--repeats 3] [--json out.json] [--compare-float32-norm]

``--compare-float32-norm`` also times itmzoo with the context norm's Gram quadratic form accumulated in
float32 (the code before it moved to float64, kept here only as a yardstick), interleaved with the
other runs, and reports the ratio of the two itmzoo times.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time

import numpy as np
import torch

import itmzoo
from itmzoo.eval.similarity import similarity_matrix

D, S, R = 1024, 256, 36


def pair_flops(lengths: np.ndarray, n_images: int) -> float:
    """FLOPs of all pairs: 2 x (336,900·L + 263,000) multiply-adds per pair of a caption of L words
    (D=1024, S=256, R=36)."""
    return float(2 * (336_900 * lengths.astype(np.float64) + 263_000).sum() * n_images)


def matmul_rate(device: torch.device, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a 2048^3 fp32 product and of the model's dominant shape (rows x 1024 @ 1024 x 256)."""
    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "proj_16384x1024x256": (16384, 1024, 256)}.items():
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        for _ in range(2):
            a @ b
        ts = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            ts.append(time.perf_counter() - t)
        out[name] = 2 * m * k * n / float(np.median(ts)) / 1e9
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _cuda_noop_on_cpu(device: torch.device):
    """Upstream `shard_attn_scores` calls `.cuda()`; on a CPU run let that be the identity."""
    if device.type == "cuda":
        yield
        return
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = orig  # type: ignore[method-assign]


@contextlib.contextmanager
def _float32_context_norm():
    """Swap in the float32 Gram quadratic form of ``||Σ_r α_r v_r||`` (before the float64 fix) for timing."""
    import itmzoo.models.lhsc as lhsc_module

    def float32_gram(regions):
        v = regions.float()
        return torch.bmm(v, v.transpose(1, 2))

    def float32_scale(regions, attn, eps=1e-8, gram=None):
        g = float32_gram(regions) if gram is None else gram
        return 1.0 / ((torch.bmm(attn, g) * attn).sum(-1).clamp(min=0).sqrt() + eps)

    orig = lhsc_module.context_scale, lhsc_module.region_gram
    lhsc_module.context_scale, lhsc_module.region_gram = float32_scale, float32_gram
    try:
        yield
    finally:
        lhsc_module.context_scale, lhsc_module.region_gram = orig


def load_upstream(path: str):
    """Import `model` and `evaluation` from an LHSC checkout (both need `libs/` and `data.py` on the path)."""
    sys.path.insert(0, os.path.abspath(path))
    model = importlib.import_module("model")
    evaluation = importlib.import_module("evaluation")
    return model, evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default=os.environ.get("ITMZOO_LHSC_UPSTREAM"))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--captions", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--block", type=int, nargs=2, default=None, help="evaluator block: images captions")
    ap.add_argument("--amp", default=None, choices=[None, "bf16", "fp16"])
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare-float32-norm", action="store_true")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    model = itmzoo.build("lhsc", vocab_size=50).to(device).eval()
    # make SAF/VisualSA BatchNorm stats non-trivial so nothing cancels
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    ni, nc = args.images, args.captions
    lengths = rng.integers(8, 23, size=nc)            # mean ≈ 15, as F30K/COCO with <start>/<end>
    lmax = int(lengths.max())
    img = torch.nn.functional.normalize(torch.randn(ni, R, D), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(nc, lmax, D), dim=-1)
    cap *= (torch.arange(lmax)[None, :] < torch.from_numpy(lengths)[:, None])[..., None]
    flops = pair_flops(lengths, ni)

    def itmzoo_run() -> tuple[torch.Tensor, float]:
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            im = {"regions": img.to(device), "global": model.sim_enc.v_global_w(img.to(device))}
            mask = torch.from_numpy(lengths)[:, None] > torch.arange(lmax)[None, :]
            tx = {"tokens": cap.to(device), "mask": mask.to(device),
                  "global": model.sim_enc.t_global_w(cap.to(device), mask.to(device))}
            block = tuple(args.block) if args.block else (ni, nc)
            sims = similarity_matrix(model, im, tx, block=block, device=device, amp=args.amp, progress=False)
        _sync(device)
        return sims, time.perf_counter() - t

    results: dict[str, object] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "images": ni, "captions": nc,
        "mean_words": float(lengths.mean()), "pairs": ni * nc, "gflop": flops / 1e9,
        "amp": args.amp, "tf32": args.tf32, "torch": torch.__version__,
    }
    up = None
    if args.upstream:
        up_model, up_eval = load_upstream(args.upstream)
        up_sim = up_model.EncoderSimilarity(D, S).to(device).eval()
        up_sim.load_state_dict({k[len("sim_enc."):]: v for k, v in model.state_dict().items()
                                if k.startswith("sim_enc.")})

        class Shim:  # the `model` argument of shard_attn_scores only needs forward_sim
            forward_sim = staticmethod(up_sim.forward)

        img64, cap64 = img.double().numpy(), cap.double().numpy()

        def upstream_run() -> tuple[np.ndarray, float]:
            with _cuda_noop_on_cpu(device), contextlib.redirect_stdout(open(os.devnull, "w")):
                _sync(device)
                t = time.perf_counter()
                sims = up_eval.shard_attn_scores(Shim, img64, cap64, list(lengths), None, shard_size=100)
                _sync(device)
            return sims, time.perf_counter() - t

        up = upstream_run

    t_ours, t_up, t_f32, rates = [], [], [], []
    ours = ref = f32 = None
    itmzoo_run()  # warm-up (allocator, thread pool)
    for _ in range(args.repeats):  # interleaved, so all runs see the same machine load
        rates.append(matmul_rate(device))
        ours, t = itmzoo_run()
        t_ours.append(t)
        if args.compare_float32_norm:
            with _float32_context_norm():
                f32, t = itmzoo_run()
            t_f32.append(t)
        if up is not None:
            ref, t = up()
            t_up.append(t)

    def summary(times: list[float]) -> dict[str, float]:
        best, med = min(times), float(np.median(times))
        return {"best_s": best, "median_s": med, "best_us_per_pair": best / (ni * nc) * 1e6,
                "median_us_per_pair": med / (ni * nc) * 1e6, "best_gflops": flops / best / 1e9,
                "median_gflops": flops / med / 1e9}

    mm = {k: {"best": max(r[k] for r in rates), "median": float(np.median([r[k] for r in rates]))}
          for k in rates[0]}
    o = summary(t_ours)
    results.update({"matmul_gflops": mm, "itmzoo": o,
                    "itmzoo_matmul_ratio_best": mm["square_2048"]["best"] / o["best_gflops"],
                    "itmzoo_matmul_ratio_median": mm["square_2048"]["median"] / o["median_gflops"],
                    "itmzoo_proj_ratio_best": mm["proj_16384x1024x256"]["best"] / o["best_gflops"]})
    if up is not None:
        u = summary(t_up)
        results.update({"upstream": u, "speedup_best": u["best_s"] / o["best_s"],
                        "speedup_median": float(np.median(np.array(t_up) / np.array(t_ours))),
                        "max_abs_diff": float(np.abs(ours.double().numpy() - ref).max())})
    if t_f32:
        f = summary(t_f32)
        results.update({"itmzoo_float32_norm": f, "float64_norm_time_ratio_best": o["best_s"] / f["best_s"],
                        "float64_norm_time_ratio_median": float(np.median(np.array(t_ours) / np.array(t_f32))),
                        "float64_norm_time_ratios": [round(a / b, 4) for a, b in zip(t_ours, t_f32)],
                        "float32_norm_max_abs_diff": float((ours - f32).abs().max())})
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
