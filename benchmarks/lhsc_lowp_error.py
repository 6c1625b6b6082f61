"""LHSC scores under bf16/fp16 autocast against fp32: the error table of docs/performance.md.

LHSC with random weights (non-trivial BatchNorm statistics) scores random encoded features (regions
``[Ni, 36, 1024]``, word features ``[Nc, L, 1024]`` with L in 8-22) once in fp32 and once per low-precision
mode under CPU autocast (the same code path CUDA autocast takes: only the projections, and with
``lowp_attention_scores`` the region-word scores, leave fp32). Prints one table row per mode.

    python benchmarks/lhsc_lowp_error.py [--images 20] [--captions 60] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import itmzoo

D, R = 1024, 36


def features(model, n_img: int, n_cap: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """Random l2-normalised regions and word features (zero beyond each caption's length) with their globals."""
    lengths = torch.from_numpy(rng.integers(8, 23, size=n_cap))
    lmax = int(lengths.max())
    img = F.normalize(torch.randn(n_img, R, D), dim=-1)
    mask = torch.arange(lmax)[None, :] < lengths[:, None]
    cap = F.normalize(torch.randn(n_cap, lmax, D), dim=-1) * mask[..., None]
    with torch.no_grad():
        im = {"regions": img, "global": model.sim_enc.v_global_w(img)}
        tx = {"tokens": cap, "mask": mask, "global": model.sim_enc.t_global_w(cap, mask)}
    return im, tx


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of queries (images over captions and captions over images) whose best match is the same."""
    same = torch.cat([a.argmax(1) == b.argmax(1), a.argmax(0) == b.argmax(0)])
    return float(same.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--captions", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = itmzoo.build("lhsc", vocab_size=50).eval()
    with torch.no_grad():
        for m in model.modules():  # non-trivial BatchNorm statistics, so nothing cancels
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    im, tx = features(model, args.images, args.captions, rng)
    with torch.no_grad():
        ref = model.similarity(im, tx)
    print(f"LHSC, random weights, {args.images} x {args.captions} pairs, CPU autocast, torch {torch.__version__}; "
          f"scores' std {float(ref.std()):.1e}")
    print("| mode | max abs. error of the scores | mean abs. error | top-1 agreement |")
    print("|---|---|---|---|")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for scores in (False, True):
            model.config.lowp_attention_scores = scores
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                got = model.similarity(im, tx)
            err = (got.float() - ref).abs()
            label = f"{name} projections" + (" + scores" if scores else "")
            print(f"| {label} | {float(err.max()):.1e} | {float(err.mean()):.1e} | "
                  f"{100 * top1_agreement(got.float(), ref):.0f} % |")
    model.config.lowp_attention_scores = False


if __name__ == "__main__":
    main()
