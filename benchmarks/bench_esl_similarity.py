"""ESL (BERT branch) scoring speed: itmzoo's batched form vs the authors' per-caption loop, same CPU.

    python benchmarks/bench_esl_similarity.py --upstream DIR [--strategy adaptive] [--threads 1]

DIR is a checkout of CrossmodalGroup/ESL @ b91e287b238fcf6dd7dc784c04e7bf1ac53404ae; its ``lib/vse.py`` is
loaded with the strategy flag set, ``Tensor.cuda`` as the identity and the torch-1.8 integer
``linspace`` result (``arange``), as the parity fixtures do (docs/fixtures/esl.md). Nothing is edited.

Both sides start from the same region and word embeddings (unit vectors, real sizes: 512-d, 36 regions,
captions of 10-18 tokens) and the same head weights, and compute one block of scores:

* upstream: ``Sim_vec.forward`` (what its ``forward_sim_test`` runs: both aggregators on the block, then
  the per-caption loop over all images);
* itmzoo: the image and caption levels, ``D`` folded into the captions, then ``esl_cross_scores``
  (what ``encode_image`` / ``encode_text`` / ``similarity`` do, levels included in the timing);
* itmzoo scoring only: ``esl_cross_scores`` on levels computed beforehand, which is what an evaluation
  does per block (``encode_*`` runs once per image and caption, not once per block).

Runs alternate (upstream, itmzoo, upstream, ...) and the best of each is reported, with the largest
score difference.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from itmzoo.models.esl import (
    AdaptiveLevels,
    ESLHead,
    HeuristicLevels,
    _map_sim_key,
    esl_cross_scores,
)


def load_upstream(upstream: Path, heuristic: bool) -> types.ModuleType:
    torch.Tensor.cuda = lambda self, *a, **k: self
    orig = torch.linspace

    def linspace(start, end, steps=100, *args, dtype=None, **kw):
        if dtype is not None and not dtype.is_floating_point and start == 0 and end == steps:
            return torch.arange(steps, dtype=dtype)  # the authors' torch 1.8 result
        return orig(start, end, steps, *args, dtype=dtype, **kw)

    torch.linspace = linspace
    sys.path.insert(0, str(upstream))
    src = (upstream / "lib" / "vse.py").read_text().replace("heuristic_strategy = False",
                                                             f"heuristic_strategy = {heuristic}")
    mod = types.ModuleType("esl_vse")
    mod.__file__ = str(upstream / "lib" / "vse.py")
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 (the authors' module)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, type=Path)
    ap.add_argument("--strategy", choices=["adaptive", "heuristic"], default="adaptive")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--min-len", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="esl_cross_scores chunk_elems (default: ESLConfig's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heuristic = args.strategy == "heuristic"
    vse = load_upstream(args.upstream.resolve(), heuristic)
    opt = argparse.Namespace(embed_size=512, kernel_size=2)
    torch.manual_seed(0)
    ref = vse.Sim_vec(512, opt).eval()
    with torch.no_grad():  # spread the contribution weights so the heuristic re-weighting is active
        ref.sims.calculator_1.sim_eval.weight.add_(0.02 * torch.randn(1, 9))
    levels = HeuristicLevels if heuristic else AdaptiveLevels
    img_lv, txt_lv, head = levels(512), levels(512), ESLHead(512, heuristic=heuristic)
    ours = torch.nn.ModuleDict({"img_levels": img_lv, "txt_levels": txt_lv, "head": head}).eval()
    ours.load_state_dict({_map_sim_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    from itmzoo.models.esl import ESLConfig

    chunk = args.chunk or ESLConfig.sim_chunk_elems

    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(args.images, args.regions, 512, generator=g), dim=-1)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.captions,), generator=g)
    L = int(lens.max())
    mask = torch.arange(L)[None] < lens[:, None]
    cap = torch.nn.functional.normalize(torch.randn(args.captions, L, 512, generator=g), dim=-1) * mask[..., None]
    cap_lens = lens.tolist()

    def run_ref() -> torch.Tensor:
        return ref(img, cap, cap_lens, False)[0]

    def run_ours() -> torch.Tensor:
        v = img_lv(img, normalized_chain=True)
        x = head.fold(txt_lv(cap, normalized_chain=False) * mask[..., None])
        return esl_cross_scores(x, mask, v, None, head.smooth().item(), chunk)

    with torch.no_grad():  # what itmzoo's evaluation does per block: the levels come from encode_*, once per item
        enc_v = img_lv(img, normalized_chain=True)
        enc_x = head.fold(txt_lv(cap, normalized_chain=False) * mask[..., None])
        smooth = head.smooth().item()

    def run_scores() -> torch.Tensor:
        return esl_cross_scores(enc_x, mask, enc_v, None, smooth, chunk)

    times: dict[str, list[float]] = {"upstream": [], "itmzoo": [], "itmzoo scoring only": []}
    runs = (("upstream", run_ref), ("itmzoo", run_ours), ("itmzoo scoring only", run_scores))
    with torch.no_grad():
        s_ref, s_ours = run_ref(), run_ours()
        assert torch.equal(run_scores(), s_ours)
        for _ in range(args.repeats):
            for name, fn in runs:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    pairs = args.images * args.captions
    best = {k: min(v) for k, v in times.items()}
    diff = (s_ref - s_ours).abs().max().item()
    print(f"ESL {args.strategy} head, {args.images} images x {args.captions} captions, R={args.regions}, "
          f"caption tokens {args.min_len}-{args.max_len} (mean {lens.float().mean():.1f}), "
          f"{args.threads} thread(s), torch {torch.__version__}, best of {args.repeats}")
    print("| code | ms per block | ms per pair | pairs/s |")
    print("|---|---|---|---|")
    for k, _ in runs:
        print(f"| {k} | {best[k] * 1e3:.1f} | {best[k] * 1e3 / pairs:.4f} | {pairs / best[k]:,.0f} |")
    print(f"speed-up {best['upstream'] / best['itmzoo']:.2f}x with the levels in the block, "
          f"{best['upstream'] / best['itmzoo scoring only']:.2f}x scoring only; max |score difference| {diff:.2e} "
          f"(|scores| <= {s_ref.abs().max().item():.3f}); all times (s): "
          + "; ".join(f"{k} " + ", ".join(f"{x:.3f}" for x in v) for k, v in times.items()))
    assert math.isfinite(diff)


if __name__ == "__main__":
    main()
