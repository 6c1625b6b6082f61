"""SCTA cross-net scoring: itmzoo's batched `similarity` vs the authors' per-caption loop, same CPU.

Both score the same encoded features (ViT tokens ``[Ni, 197, 512]``, BERT tokens ``[Nc, L, 512]`` with
caption lengths drawn like Flickr30K's: 9-40 tokens, mean about 17) with the same cross-net weights, in
`reference` mode with the same seed, so both draw the same random caption fc2 layers and the scores must
agree. The upstream half imports ``lib/cross_net.py`` from an SCTA checkout (``ICME2025ITR/SCTA``, never
copied into itmzoo) and runs its ``CrossSparseAggrNet_v2`` block by block as its ``shard_attn_scores``
does. Rounds alternate between the two; time is process CPU time (``time.process_time``), which a shared
machine disturbs less than wall time, and wall time is reported too.

    python benchmarks/bench_scta_similarity.py --upstream PATH [--images 256] [--captions 32]
        [--threads 1] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types

import numpy as np
import torch

import itmzoo
from itmzoo.eval.similarity import similarity_matrix
from itmzoo.models.scta import TINY_OVERRIDES


def caption_lengths(n: int, seed: int = 0) -> torch.Tensor:
    """Token lengths with [CLS]/[SEP] resembling Flickr30K test captions (mean about 17)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.clip(np.round(rng.gamma(6.0, 2.9, n)), 9, 40).astype(np.int64))


def load_upstream(path: str):
    sys.path.insert(0, path)
    from lib import cross_net

    opt = types.SimpleNamespace(embed_size=512, num_patches=196, img_sparse_ratio=0.5, img_aggr_ratio=0.3,
                                cap_aggr_ratio=0.75, attention_weight=0.8, monitor_weight=2.0)
    torch.manual_seed(0)
    return cross_net.CrossSparseAggrNet_v2(opt).eval()


def upstream_scores(net, img, cap, lens, shard: int) -> torch.Tensor:
    """``lib.evaluation.shard_attn_scores`` without its CUDA moves and progress output."""
    sims = torch.zeros(len(img), len(cap))
    with torch.no_grad():
        for i in range(0, len(img), shard):
            for j in range(0, len(cap), shard):
                sims[i:i + shard, j:j + shard] = net(img[i:i + shard], cap[j:j + shard], lens[j:j + shard])
    return sims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="checkout of ICME2025ITR/SCTA")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--captions", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    net = load_upstream(a.upstream)
    model = itmzoo.build("scta", embed_size=512, num_patches=196, fc2_seed=a.seed,
                         vit_config={**TINY_OVERRIDES["scta"]["vit_config"], "image_size": 224},
                         bert_config=TINY_OVERRIDES["scta"]["bert_config"]).eval()
    model.cross_net.load_state_dict({k: v for k, v in net.state_dict().items()}, strict=True)

    g = torch.Generator().manual_seed(0)
    img = torch.randn(a.images, 1, 512, generator=g) + 0.8 * torch.randn(a.images, 197, 512, generator=g)
    lens = caption_lengths(a.captions)
    width = int(lens.max())
    cap = torch.randn(a.captions, width, 512, generator=g)
    mask = torch.arange(width)[None] < lens[:, None]
    cap = cap * mask[..., None]
    feats_i, feats_t = {"tokens": img}, {"tokens": cap, "mask": mask}
    pairs = a.images * a.captions

    rows = []
    ref = ours = None
    for r in range(a.repeats):
        for name in ("upstream", "itmzoo"):
            c0, w0 = time.process_time(), time.perf_counter()
            if name == "upstream":
                torch.manual_seed(a.seed)
                ref = upstream_scores(net, img, cap, lens, 256)
            else:
                ours = similarity_matrix(model, feats_i, feats_t, block=(256, 256), progress=False)
            rows.append({"round": r, "impl": name, "cpu_ms_per_pair": 1e3 * (time.process_time() - c0) / pairs,
                         "wall_ms_per_pair": 1e3 * (time.perf_counter() - w0) / pairs})
            print(rows[-1], flush=True)
    diff = float((ref - ours).abs().max())

    def best(impl, key):
        return min(x[key] for x in rows if x["impl"] == impl)

    def med(impl, key):
        return float(np.median([x[key] for x in rows if x["impl"] == impl]))

    summary = {"images": a.images, "captions": a.captions, "pairs": pairs, "threads": a.threads,
               "mean_caption_tokens": float(lens.float().mean()), "max_abs_diff": diff,
               "torch": torch.__version__}
    for key in ("cpu_ms_per_pair", "wall_ms_per_pair"):
        for impl in ("upstream", "itmzoo"):
            summary[f"{impl}_{key}_best"] = best(impl, key)
            summary[f"{impl}_{key}_median"] = med(impl, key)
        summary[f"ratio_{key}_median"] = med("upstream", key) / med("itmzoo", key)
    f30k_pairs = 1000 * 5000
    summary["f30k_1k_cross_net_cpu_hours_upstream"] = summary["upstream_cpu_ms_per_pair_median"] * f30k_pairs / 3.6e6
    summary["f30k_1k_cross_net_cpu_hours_itmzoo"] = summary["itmzoo_cpu_ms_per_pair_median"] * f30k_pairs / 3.6e6
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "rounds": rows}, f, indent=1)
    assert math.isfinite(diff)


if __name__ == "__main__":
    main()
