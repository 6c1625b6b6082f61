"""Hot paths with and without one CPU core held by a spinner process, side by side with a reference.

Each round times every hot path twice: once as the machine is ("free"), once while a spinner process
that this script starts and stops itself holds one core ("busy"). Rounds alternate the two conditions,
so slow moments of a shared machine hit both. Reported per path: medians over rounds, the slowdown
(busy / free) of itmzoo and of the reference, and itmzoo's time over the reference's under the same
condition; the 1-minute load average is recorded at every measurement.

    python benchmarks/bench_under_load.py [--rounds 3] [--paths recall,embed_sim,lhsc_sim,esa_step,lhsc_step]
        [--n 2000] [--json out.json]

Hot paths and their references (same inputs, same process, same thread settings):

* ``recall``: `retrieval_ranks` on an ``[n, 5n]`` float32 matrix vs the per-query argsort loop of
  VSE-infinity's ``i2t``/``t2i`` (`itmzoo.eval.reference.reference_ranks`, numpy).
* ``embed_sim``: `similarity_matrix` of an embedding model (toy_vse, as ESA: cosine of 1024-d vectors)
  over ``n x 5n`` pairs, vs the reference's numpy product of the normalised embeddings.
* ``lhsc_sim``: `similarity_matrix` of LHSC (paper dims, random weights) over 40 x 200 pairs, vs a
  per-caption loop over the same model (the shape of the authors' loop over captions).
* ``esa_step`` / ``lhsc_step``: one training step (forward + backward) of the demo configurations'
  models (configs/esa_demo_synthetic.yaml at batch 64, configs/lhsc_demo_synthetic.yaml at batch 128),
  vs the same step with ``torch.set_num_threads(1)`` (the usual workaround on a busy machine; the
  authors' code is not imported here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import torch

import itmzoo
from itmzoo.eval.recall import retrieval_ranks
from itmzoo.eval.reference import reference_ranks, seeded_sims
from itmzoo.eval.similarity import similarity_matrix

Timed = Callable[[], None]


def _recall(n: int) -> tuple[Timed, Timed]:
    S = seeded_sims(2021, n, 3.0).astype(np.float32)
    St, c2i = torch.from_numpy(S), torch.arange(5 * n) // 5
    got, want = retrieval_ranks(St, c2i), reference_ranks(S)
    assert np.array_equal(got[0].numpy(), want[0]) and np.array_equal(got[1].numpy(), want[1])
    return (lambda: retrieval_ranks(St, c2i)), (lambda: reference_ranks(S))


def _embed_sim(n: int) -> tuple[Timed, Timed]:
    model = itmzoo.build("toy_vse", embed_size=1024).eval()
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, 1024, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5 * n, 1024, generator=g), dim=-1)
    a, b = img.double().numpy(), txt.double().numpy()

    def ours() -> None:
        similarity_matrix(model, img, txt, block=model.eval_settings().block or (256, 1024), progress=False)

    return ours, (lambda: np.dot(a, b.T))


def _lhsc_model(**kw):
    torch.manual_seed(0)
    return itmzoo.build("lhsc", **kw)


def _lhsc_sim() -> tuple[Timed, Timed]:
    model = _lhsc_model().eval()
    g = torch.Generator().manual_seed(0)
    ni, nc = 40, 200
    lengths = torch.randint(8, 23, (nc,), generator=g)
    L = int(lengths.max())
    mask = torch.arange(L)[None] < lengths[:, None]
    with torch.no_grad():
        img = {"regions": torch.nn.functional.normalize(torch.randn(ni, 36, 1024, generator=g), dim=-1)}
        img["global"] = model.sim_enc.v_global_w(img["regions"])
        tok = torch.nn.functional.normalize(torch.randn(nc, L, 1024, generator=g), dim=-1) * mask[..., None]
        txt = {"tokens": tok, "mask": mask, "global": model.sim_enc.t_global_w(tok, mask)}

    def ours() -> None:
        similarity_matrix(model, img, txt, block=(ni, nc), progress=False)

    @torch.no_grad()
    def loop() -> None:
        for j in range(nc):
            model.similarity(img, {k: v[j:j + 1, : int(lengths[j])] if k != "global" else v[j:j + 1]
                                   for k, v in txt.items()})

    return ours, loop


def _step(model: torch.nn.Module, batch: dict) -> tuple[Timed, Timed]:
    model.train()

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    def one_thread() -> None:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run()
        finally:
            torch.set_num_threads(n)

    return run, one_thread


def _demo(config: str) -> tuple[Timed, Timed]:
    """One training step of a demo configuration's model on a batch of its data (batch size as configured)."""
    import yaml

    from itmzoo.data import load_split

    with open(config) as f:
        cfg = yaml.safe_load(f)
    torch.manual_seed(0)
    model = itmzoo.build(cfg["model"]["name"], **{k: v for k, v in cfg["model"].items() if k != "name"})
    n = cfg["train"]["batch_size"]
    spec = {k: v for k, v in cfg["data"].items() if k not in ("train", "dev", "test", "num_images")}
    split = load_split({**spec, "num_images": {"train": n}, "split": "train"})
    caps = [split.captions[5 * i] for i in range(n)]
    regions = torch.stack([torch.as_tensor(np.asarray(split.images[i], dtype=np.float32)) for i in range(n)])
    batch = {"regions": regions, "region_lengths": torch.full((n,), regions.shape[1]),
             **model.tokenizer(caps, train=True), "image_index": torch.arange(n)}
    return _step(model, batch)


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _time(fn: Timed) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default="recall,embed_sim,lhsc_sim,esa_step,lhsc_step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="images of the recall / embedding cases (5 captions each)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    makers = {"recall": lambda: _recall(args.n), "embed_sim": lambda: _embed_sim(args.n), "lhsc_sim": _lhsc_sim,
              "esa_step": lambda: _demo("configs/esa_demo_synthetic.yaml"),
              "lhsc_step": lambda: _demo("configs/lhsc_demo_synthetic.yaml")}
    names = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; expected some of {sorted(makers)}")
    cases = {name: makers[name]() for name in names}
    for ours, ref in cases.values():  # warm-up: first-call allocations and lazy imports
        ours()
        ref()
    times: dict[tuple[str, str, str], list[float]] = {}
    loads: dict[str, list[float]] = {"free": [], "busy": []}
    print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    for r in range(args.rounds):
        for cond in ("free", "busy"):
            spin = _spinner() if cond == "busy" else None
            try:
                time.sleep(0.2)
                for name, (ours, ref) in cases.items():
                    times.setdefault((name, cond, "itmzoo"), []).append(_time(ours))
                    times.setdefault((name, cond, "reference"), []).append(_time(ref))
                    loads[cond].append(os.getloadavg()[0])
            finally:
                if spin is not None:
                    spin.kill()
                    spin.wait()
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    print(f"\nload average (1 min) free {min(loads['free']):.1f}-{max(loads['free']):.1f}, "
          f"busy {min(loads['busy']):.1f}-{max(loads['busy']):.1f}; medians of {args.rounds} rounds (s)")
    print(f"{'path':<10} {'itmzoo free':>11} {'busy':>7} {'slowdown':>8} | {'ref free':>8} {'busy':>7} "
          f"{'slowdown':>8} | {'itmzoo/ref free':>15} {'busy':>6}")
    for name in cases:
        o_f, o_b = med[(name, "free", "itmzoo")], med[(name, "busy", "itmzoo")]
        r_f, r_b = med[(name, "free", "reference")], med[(name, "busy", "reference")]
        row = {"path": name, "itmzoo_free_s": o_f, "itmzoo_busy_s": o_b, "itmzoo_slowdown": o_b / o_f,
               "ref_free_s": r_f, "ref_busy_s": r_b, "ref_slowdown": r_b / r_f,
               "ratio_free": o_f / r_f, "ratio_busy": o_b / r_b}
        rows.append(row)
        print(f"{name:<10} {o_f:>11.3f} {o_b:>7.3f} {o_b / o_f:>7.2f}x | {r_f:>8.3f} {r_b:>7.3f} {r_b / r_f:>7.2f}x"
              f" | {o_f / r_f:>15.2f} {o_b / r_b:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "loads": loads, "rounds": args.rounds, "n": args.n,
                       "threads": torch.get_num_threads(), "times": {"|".join(k): v for k, v in times.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
