"""Multi-SEA second stage: itmzoo's batched re-ranking vs the authors' one-query-at-a-time loop.

Both re-score the same (query, top-k candidate) pairs with the same full-size Agent-Former (768 wide,
12 heads, 4 layers, FFN 3072, 40 agents) and ITM head, on random blended features (``E_i [N, 197, 768]``,
``E_t [M, 40, 768]`` with padded captions), in one process on the same device:

* ``upstream``: the authors' ``AFormerWithAug`` called once per query on its k candidates
  (``evaluate.val_irtr_recall_sort``), imported from a checkout given with ``--upstream DIR``
  (``jim4399266/Multi-SEA``; it needs transformers < 4.31 and pytorch-lightning importable);
* ``loop``: the same per-query algorithm with itmzoo's `AgentFormer.forward` (runs without a checkout);
* ``itmzoo``: `MultiSEA.score_pairs`'s path, `AgentFormer.cross_cls` over many queries at once: each
  candidate's cross-attention keys/values and each query's first self-attention computed once, and only
  the ``[CLS]`` row finished in the last layer.

Reported per direction: process CPU-seconds and wall seconds per pair, the ratio, and the largest score
difference. CUDA options: ``--dtype bf16`` (autocast) and ``--tf32``, whose score error against fp32 is
reported too.

    python benchmarks/bench_multisea_rerank.py [--upstream DIR] [--queries 4] [--k 16] [--threads 1]
        [--device cpu|cuda] [--dtype fp32|bf16] [--tf32] [--chunk 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from itmzoo.layers.agent_former import AgentFormer

D, HEADS, LAYERS, INNER, LI, LT = 768, 12, 4, 3072, 197, 40


def upstream_aformer(src: Path):
    """The authors' AFormerWithAug at full size (random BERT init), or None without a checkout."""
    sys.path.insert(0, str(src / "src"))
    from subsrc.modules.AFormer import AFormerWithAug
    from transformers import BertConfig

    cfg = BertConfig.from_json_file(str(src / "src/subsrc/configs/aformer_config.json"))
    cfg.num_hidden_layers, cfg.num_attention_heads = LAYERS, HEADS
    cfg.hidden_size = cfg.encoder_width = D
    cfg.intermediate_size = INNER
    return AFormerWithAug(cfg).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    _sync(device)
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", type=Path, default=None)
    ap.add_argument("--queries", type=int, default=4, help="queries per direction")
    ap.add_argument("--k", type=int, default=16, help="candidates per query (64 in the published configs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--chunk", type=int, default=64, help="pairs per cross_cls step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    import fnmatch

    from itmzoo.models.multisea import (  # the checkpoint key map
        UNUSED_OFFICIAL_KEYS,
        _rename,
    )

    ours = AgentFormer(D, HEADS, LAYERS, INNER).eval()
    up = upstream_aformer(args.upstream) if args.upstream else None
    if up is not None:
        state = {_rename("aformer." + k)[len("aformer."):]: v for k, v in up.state_dict().items()
                 if not any(fnmatch.fnmatchcase("aformer." + k, p) for p in UNUSED_OFFICIAL_KEYS)}
        ours.load_state_dict(state)
        up.to(device)
    ours.to(device)
    head = torch.nn.Linear(D, 2).to(device)

    n_img = n_txt = max(args.queries, args.k)
    ei = torch.randn(n_img, LI, D, device=device)
    et = torch.randn(n_txt, LT, D, device=device)
    lengths = torch.randint(8, LT + 1, (n_txt,), generator=torch.Generator().manual_seed(1)).to(device)
    mt = (torch.arange(LT, device=device)[None] < lengths[:, None]).long()
    s = torch.randn(n_img, n_txt, device=device)
    report = {"device": str(device), "threads": args.threads, "k": args.k, "queries": args.queries,
              "dtype": args.dtype, "tf32": args.tf32, "chunk": args.chunk, "directions": {}}

    def per_query(model_call, direction):
        out = []
        for q in range(args.queries):
            if direction == "i2t":
                cand = s[q].topk(args.k).indices
                h = model_call(ei[q:q + 1].expand(args.k, -1, -1), None, et[cand], mt[cand], "i2t")
                out.append(head(h)[:, 1] + s[q, cand])
            else:
                cand = s[:, q].topk(args.k).indices
                h = model_call(et[q:q + 1].expand(args.k, -1, -1), mt[q:q + 1].expand(args.k, -1), ei[cand], None,
                               "t2i")
                out.append(head(h)[:, 1] + s[cand, q])
        return torch.cat(out)

    def loop_ours(x, m, ctx, cm, mode):
        return ours(x, m, mode=mode, context=ctx, context_mask=cm).last_hidden_state[:, 0]

    def loop_up(x, m, ctx, cm, mode):
        if m is None:
            m = torch.ones(x.shape[:2], dtype=torch.long, device=device)
        if cm is None:
            cm = torch.ones(ctx.shape[:2], dtype=torch.long, device=device)
        return up(x, attention_mask=m, encoder_hidden_states=ctx, encoder_attention_mask=cm,
                  mode=mode).last_hidden_state[:, 0]

    def batched(direction):
        q = torch.arange(args.queries, device=device)
        if direction == "i2t":
            cand = s[q].topk(args.k, dim=1).indices
            qi, ci = q.repeat_interleave(args.k), cand.reshape(-1)
            h = ours.cross_cls(ei, None, et, mt, qi, ci, "i2t", args.chunk)
            return head(h)[:, 1] + s[qi, ci]
        cand = s[:, q].t().topk(args.k, dim=1).indices
        qi, ci = q.repeat_interleave(args.k), cand.reshape(-1)
        h = ours.cross_cls(et, mt, ei, None, qi, ci, "t2i", args.chunk)
        return head(h)[:, 1] + s[ci, qi]

    if args.tf32:
        torch.set_float32_matmul_precision("high")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
           else torch.autocast(device.type, enabled=False))
    with torch.no_grad():
        for direction in ("i2t", "t2i"):
            pairs = args.queries * args.k
            rec = {}
            ref, c, w = timed(lambda d=direction: per_query(loop_up if up is not None else loop_ours, d), device)
            rec["reference"] = "upstream" if up is not None else "loop"
            rec["reference_cpu_s_per_pair"], rec["reference_wall_s_per_pair"] = c / pairs, w / pairs
            with amp:
                got, c2, w2 = timed(lambda d=direction: batched(d), device)
            rec["itmzoo_cpu_s_per_pair"], rec["itmzoo_wall_s_per_pair"] = c2 / pairs, w2 / pairs
            rec["cpu_speedup"], rec["wall_speedup"] = c / c2, w / w2
            rec["max_abs_score_diff"] = float((got.float() - ref.float()).abs().max())
            report["directions"][direction] = rec
            print(f"{direction}: {rec['reference']} {1e3 * rec['reference_cpu_s_per_pair']:.1f} CPU-ms/pair "
                  f"({1e3 * rec['reference_wall_s_per_pair']:.1f} ms wall), itmzoo "
                  f"{1e3 * rec['itmzoo_cpu_s_per_pair']:.1f} CPU-ms/pair "
                  f"({1e3 * rec['itmzoo_wall_s_per_pair']:.1f} ms wall): x{rec['cpu_speedup']:.2f} CPU, "
                  f"x{rec['wall_speedup']:.2f} wall, max |score diff| {rec['max_abs_score_diff']:.2e}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
