"""Gallery search: index build time and query latency for N random embeddings, exact torch vs FAISS.

A `Retriever` over an embedding gallery (unit vectors, seed 0) answers text -> images with one
product (torch) or a FAISS inner-product index (``IndexFlatIP``, exact too). Both run in the same
process on the same vectors; the script checks that the top-k indices agree before it reports.
The model is a stand-in whose features are the stored vectors, so only the search is timed
(encoding a query with a real model comes on top).

    python benchmarks/bench_retrieval.py [--n 100000] [--dim 1024] [--queries 1 100] [--k 10]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from itmzoo.config import ModelConfig
from itmzoo.models.base import ITMModel
from itmzoo.retrieval import Retriever, faiss_available


class StoredVectors(ITMModel):
    """An embedding model whose captions are written as indices into a table of query vectors."""

    input_kind = "regions"

    def __init__(self, queries: torch.Tensor) -> None:
        super().__init__(ModelConfig())
        self.register_buffer("queries", queries)

    @property
    def tokenizer(self):
        return lambda caps, train=False: {"row": torch.tensor([int(c) for c in caps])}

    def encode_text(self, batch):
        return self.queries[batch["row"]]


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(max(args.queries), args.dim, generator=g), dim=1)
    model = StoredVectors(queries).eval()
    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    out: dict = {"n": args.n, "dim": args.dim, "k": args.k, "threads": torch.get_num_threads(), "results": {}}
    answers = {}
    for backend in backends:
        t0 = time.perf_counter()
        r = Retriever.from_features(model, image_features=gallery, backend=backend).build_index()
        build = time.perf_counter() - t0
        res = {"build_s": build}
        for q in args.queries:
            caps = [str(i) for i in range(q)]
            res[f"query_{q}_ms"] = 1000 * _time(lambda r=r, caps=caps: r.search_images(caps, k=args.k), args.repeats)
        answers[backend] = r.search_images([str(i) for i in range(max(args.queries))], k=args.k).indices
        out["results"][backend] = res
    if "faiss" in answers:
        out["same_topk"] = bool(torch.equal(answers["torch"], answers["faiss"]))
        if not out["same_topk"]:
            raise SystemExit(f"torch and FAISS disagree: {json.dumps(out)}")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
