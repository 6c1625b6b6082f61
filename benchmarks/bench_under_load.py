"""Hot paths with and without one CPU core held by a spinner process, side by side with a reference.

Each round times every hot path twice: once as the machine is ("free"), once while a spinner process
that this script starts and stops itself holds one core ("busy"). Rounds alternate the two conditions,
so slow moments of a shared machine hit both. Reported per path: medians over rounds, the slowdown
(busy / free) of itmzoo and of the reference, and itmzoo's time over the reference's under the same
condition; the 1-minute load average is recorded at every measurement.

    python benchmarks/bench_under_load.py [--rounds 3] [--paths recall,embed_sim,...] [--n 2000]
        [--window 30] [--esa-upstream DIR] [--lhsc-upstream DIR] [--scta-upstream DIR] [--esl-upstream DIR]
        [--json out.json]

Hot paths and their references (same inputs, same process, same thread settings):

* ``recall``: `retrieval_ranks` on an ``[n, 5n]`` float32 matrix vs the per-query argsort loop of
  VSE-infinity's ``i2t``/``t2i`` (`itmzoo.eval.reference.reference_ranks`, numpy).
* ``embed_sim``: `similarity_matrix` of an embedding model (toy_vse, as ESA: cosine of 1024-d vectors)
  over ``n x 5n`` pairs, vs the reference's numpy product of the normalised embeddings.
* ``lhsc_sim``: `similarity_matrix` of LHSC (paper dims, random weights) over 40 x 200 pairs, vs the
  authors' ``shard_attn_scores`` (with ``--lhsc-upstream``; it also computes the global vectors, which
  itmzoo's encoders compute once) or else the same itmzoo model called one caption at a time.
* ``scta_sim``: `similarity_matrix` of SCTA's cross-net (paper dims, the faithful ``cap_fc2`` mode,
  whose draws keep the 256 x 256 blocks in order; the pair tiles inside a block are shared) over
  48 x 32 encoded pairs, vs the authors' ``CrossSparseAggrNet_v2`` block by block (only with
  ``--scta-upstream``, an ``ICME2025ITR/SCTA`` checkout; benchmarks/bench_scta_similarity.py).
* ``esl_sim``: ESL's adaptive head (512-d, 36 regions) scoring 64 x 320 encoded pairs with
  `esl_cross_scores`, vs the authors' ``Sim_vec`` on the same block (only with ``--esl-upstream``, a
  ``CrossmodalGroup/ESL`` checkout; benchmarks/bench_esl_similarity.py; the authors' side also computes
  the levels, as its forward does).
* ``esa_encode``: `encode_split` of the ESA demo model (configs/esa_demo_synthetic.yaml) on 200
  images and 1,000 captions, vs the same batches encoded one after another with torch's own threads
  (the loop of the authors' ``encode_data``, with itmzoo's encoders).
* ``esa_step`` / ``lhsc_step``: training steps (forward + backward, no optimizer step) of the demo
  configurations' models on one batch of their data (batch 64 each), `--window` steps per timing,
  reported per step. itmzoo's thread count per step comes from the trainer's `ThreadTuner`, one tuner
  per condition (the steady state of a run under that load; the warm-up call runs its first probe).
  Reference: the authors' step (``--esa-upstream`` / ``--lhsc-upstream``, at torch's threads) or else
  itmzoo's step at 1 thread (the usual workaround on a busy machine).
* ``esa_step_fixed`` / ``lhsc_step_fixed``: itmzoo's step at torch's thread count, no tuner (what a
  run with ``train.cpu_threads`` set to that count does), vs the same reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import itmzoo
from itmzoo.eval.recall import retrieval_ranks
from itmzoo.eval.reference import reference_ranks, seeded_sims
from itmzoo.eval.similarity import encode_batches, encode_split, similarity_matrix
from itmzoo.train.cpu_threads import ThreadTuner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream_reference as U  # noqa: E402 (benchmarks/ is not a package)

Timed = Callable[[str], None]  # called with the condition, "free" or "busy"


def _plain(fn: Callable[[], object]) -> Timed:
    return lambda cond: fn()


def _recall(n: int) -> tuple[Timed, Timed]:
    S64 = seeded_sims(2021, n, 3.0)
    c2i = torch.arange(5 * n) // 5
    # the same ranks as the reference, checked in float64: float32 rounding makes ties at large n, which
    # the reference orders by its unstable argsort and itmzoo counts optimistically (docs/evaluation.md)
    got, want = retrieval_ranks(torch.from_numpy(S64), c2i), reference_ranks(S64)
    assert np.array_equal(got[0].numpy(), want[0]) and np.array_equal(got[1].numpy(), want[1])
    S = S64.astype(np.float32)  # timed in float32, the dtype of similarity_matrix's output
    St = torch.from_numpy(S)
    return _plain(lambda: retrieval_ranks(St, c2i)), _plain(lambda: reference_ranks(S))


def _embed_sim(n: int) -> tuple[Timed, Timed]:
    model = itmzoo.build("toy_vse", embed_size=1024).eval()
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, 1024, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5 * n, 1024, generator=g), dim=-1)
    a, b = img.double().numpy(), txt.double().numpy()

    def ours() -> None:
        similarity_matrix(model, img, txt, block=model.eval_settings().block or (256, 1024), progress=False)

    return _plain(ours), _plain(lambda: np.dot(a, b.T))


def _lhsc_sim(upstream: Path | None) -> tuple[Timed, Timed]:
    torch.manual_seed(0)
    model = itmzoo.build("lhsc").eval()
    ni, nc = 40, 200
    regions, tok, lengths, mask = U.lhsc_sim_inputs(ni, nc)  # the inputs of the authors' side too
    with torch.no_grad():
        img = {"regions": regions, "global": model.sim_enc.v_global_w(regions)}
        txt = {"tokens": tok, "mask": mask, "global": model.sim_enc.t_global_w(tok, mask)}

    def ours() -> None:
        similarity_matrix(model, img, txt, block=(ni, nc), progress=False)

    @torch.no_grad()
    def loop() -> None:
        for j in range(nc):
            model.similarity(img, {k: v[j:j + 1, : int(lengths[j])] if k != "global" else v[j:j + 1]
                                   for k, v in txt.items()})

    if upstream is not None:
        return _plain(ours), _plain(U.lhsc_sim(upstream, ni, nc))
    return _plain(ours), _plain(loop)


def _scta_sim(upstream: Path, n_images: int = 48, n_captions: int = 32) -> tuple[Timed, Timed]:
    """SCTA's cross-net (paper dims, reference mode) on encoded features vs the authors' blocks."""
    import bench_scta_similarity as S

    from itmzoo.models.scta import TINY_OVERRIDES

    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        del sys.modules[name]  # ESA's checkout calls its package `lib` too
    net = S.load_upstream(str(upstream))
    model = itmzoo.build("scta", embed_size=512, num_patches=196,
                         vit_config={**TINY_OVERRIDES["scta"]["vit_config"], "image_size": 224},
                         bert_config=TINY_OVERRIDES["scta"]["bert_config"]).eval()
    model.cross_net.load_state_dict(net.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(n_images, 1, 512, generator=g) + 0.8 * torch.randn(n_images, 197, 512, generator=g)
    lens = S.caption_lengths(n_captions)
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]
    cap = torch.randn(n_captions, int(lens.max()), 512, generator=g) * mask[..., None]
    block = model.eval_settings().block

    def ours() -> None:
        similarity_matrix(model.eval(), {"tokens": img}, {"tokens": cap, "mask": mask}, block=block, progress=False)

    return _plain(ours), _plain(lambda: S.upstream_scores(net, img, cap, lens, block[0]))


def _esl_sim(upstream: Path, n_images: int = 64, n_captions: int = 320) -> tuple[Timed, Timed]:
    """ESL's adaptive head (512-d, 36 regions) on encoded levels vs the authors' ``Sim_vec`` on the same block."""
    import bench_esl_similarity as E

    from itmzoo.models.esl import AdaptiveLevels, ESLConfig, ESLHead, _map_sim_key, esl_cross_scores

    vse = E.load_upstream(upstream.resolve(), heuristic=False)  # patches Tensor.cuda / int linspace (CPU, torch 1.8)
    torch.manual_seed(0)
    ref = vse.Sim_vec(512, argparse.Namespace(embed_size=512, kernel_size=2)).eval()
    img_lv, txt_lv, head = AdaptiveLevels(512), AdaptiveLevels(512), ESLHead(512, heuristic=False)
    ours = torch.nn.ModuleDict({"img_levels": img_lv, "txt_levels": txt_lv, "head": head}).eval()
    ours.load_state_dict({_map_sim_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(n_images, 36, 512, generator=g), dim=-1)
    lens = torch.randint(10, 19, (n_captions,), generator=g)
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]
    cap = torch.nn.functional.normalize(torch.randn(n_captions, int(lens.max()), 512, generator=g), dim=-1)
    cap = cap * mask[..., None]
    with torch.no_grad():  # what evaluation scores per block: levels from encode_*, once per item
        v = img_lv(img, normalized_chain=True)
        x = head.fold(txt_lv(cap, normalized_chain=False) * mask[..., None])
        smooth = head.smooth().item()

    @torch.no_grad()
    def scores() -> None:
        esl_cross_scores(x, mask, v, None, smooth, ESLConfig.sim_chunk_elems)

    @torch.no_grad()
    def authors() -> None:
        ref(img, cap, lens.tolist(), False)

    return _plain(scores), _plain(authors)


def _esa_encode() -> tuple[Timed, Timed]:
    import yaml

    from itmzoo.data import load_split
    from itmzoo.data.collate import eval_loaders

    with open("configs/esa_demo_synthetic.yaml") as f:
        cfg = yaml.safe_load(f)
    torch.manual_seed(0)
    model = itmzoo.build(cfg["model"]["name"], **{k: v for k, v in cfg["model"].items() if k != "name"}).eval()
    spec = {k: v for k, v in cfg["data"].items() if k not in ("train", "dev", "test")}
    split = load_split({**spec, "split": "test"})
    images, captions = eval_loaders(split, model, batch_size=128)
    cpu = torch.device("cpu")

    def ours() -> None:
        encode_split(model, split, batch_size=128, progress=False)

    def batch_loop() -> None:
        for fn, loader in ((model.encode_image, images), (model.encode_text, captions)):
            encode_batches(fn, loader, cpu, num_threads=1)

    return _plain(ours), _plain(batch_loop)


def _model_step(config: str) -> Callable[[], None]:
    """itmzoo's training step (forward + backward) on the batch of upstream_reference's demo batch."""
    _cfg, model, caps, regions = U._demo_batch(config)
    n = regions.shape[0]
    batch = {"regions": regions, "region_lengths": torch.full((n,), regions.shape[1]),
             **model.tokenizer(caps, train=True), "image_index": torch.arange(n)}
    model.train()

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    return run


def _windows(step: Callable[[], None], window: int, threads: Callable[[str], int | None],
             record: Callable[[str, float], None] | None = None) -> Timed:
    """`window` steps per call, each at ``threads(cond)`` torch threads (None: as set)."""
    def timed(cond: str) -> None:
        before = torch.get_num_threads()
        try:
            for _ in range(window):
                n = threads(cond)
                if n is not None and n != torch.get_num_threads():
                    torch.set_num_threads(n)
                t = time.perf_counter()
                step()
                if record is not None:
                    record(cond, time.perf_counter() - t)
        finally:
            torch.set_num_threads(before)

    return timed


def _steps(config: str, upstream_step: Callable[..., Callable[[], None]], upstream: Path | None, window: int,
           tuned: bool) -> tuple[Timed, Timed]:
    step = _model_step(config)
    if tuned:
        tuners = {c: ThreadTuner(torch.get_num_threads()) for c in ("free", "busy")}
        ours = _windows(step, window, lambda c: tuners[c].next_threads(), lambda c, s: tuners[c].record(s))
    else:
        ours = _windows(step, window, lambda c: None)
    if upstream is not None:
        return ours, _windows(upstream_step(upstream, config), window, lambda c: None)
    return ours, _windows(step, window, lambda c: 1)


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _time(fn: Timed, cond: str) -> float:
    t = time.perf_counter()
    fn(cond)
    return time.perf_counter() - t


PATHS = "recall,embed_sim,lhsc_sim,esa_encode,esa_step,lhsc_step,esa_step_fixed,lhsc_step_fixed"  # + scta_sim, esl_sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default=PATHS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="images of the recall / embedding cases (5 captions each)")
    ap.add_argument("--window", type=int, default=30, help="training steps per timing of a *_step path")
    ap.add_argument("--esa-upstream", type=Path, default=None, help="KevinLight831/ESA checkout (step reference)")
    ap.add_argument("--lhsc-upstream", type=Path, default=None, help="lDarryll/LHSC checkout (references)")
    ap.add_argument("--scta-upstream", type=Path, default=None, help="ICME2025ITR/SCTA checkout (scta_sim)")
    ap.add_argument("--esl-upstream", type=Path, default=None, help="CrossmodalGroup/ESL checkout (esl_sim)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    esa_cfg, lhsc_cfg = "configs/esa_demo_synthetic.yaml", "configs/lhsc_demo_synthetic.yaml"
    w = args.window
    makers = {"recall": lambda: _recall(args.n), "embed_sim": lambda: _embed_sim(args.n),
              "lhsc_sim": lambda: _lhsc_sim(args.lhsc_upstream), "esa_encode": _esa_encode,
              "scta_sim": lambda: _scta_sim(args.scta_upstream), "esl_sim": lambda: _esl_sim(args.esl_upstream),
              "esa_step": lambda: _steps(esa_cfg, U.esa_step, args.esa_upstream, w, True),
              "lhsc_step": lambda: _steps(lhsc_cfg, U.lhsc_step, args.lhsc_upstream, w, True),
              "esa_step_fixed": lambda: _steps(esa_cfg, U.esa_step, args.esa_upstream, w, False),
              "lhsc_step_fixed": lambda: _steps(lhsc_cfg, U.lhsc_step, args.lhsc_upstream, w, False)}
    units = {name: (w if "_step" in name else 1) for name in makers}  # times are reported per step
    names = [p for p in args.paths.split(",") if p]
    for path, flag, given in (("scta_sim", "--scta-upstream", args.scta_upstream), ("esl_sim", "--esl-upstream",
                                                                                   args.esl_upstream)):
        if path in names and given is None:
            raise SystemExit(f"--paths {path} needs {flag} DIR (its reference is the authors' code)")
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; expected some of {sorted(makers)}")
    cases = {name: makers[name]() for name in names}
    # warm-up in each condition: first-call allocations, lazy imports, each tuner's first probe
    for cond in ("free", "busy"):
        spin = _spinner() if cond == "busy" else None
        try:
            time.sleep(0.2)
            for ours, ref in cases.values():
                ours(cond)
                ref(cond)
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()
    times: dict[tuple[str, str, str], list[float]] = {}
    loads: dict[str, list[float]] = {"free": [], "busy": []}
    refs = {"esa": args.esa_upstream is not None, "lhsc": args.lhsc_upstream is not None,
            "scta": args.scta_upstream is not None, "esl": args.esl_upstream is not None}
    print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, authors' code as reference: "
          f"{', '.join(k for k, v in refs.items() if v) or 'none'}", flush=True)
    for r in range(args.rounds):
        for cond in ("free", "busy"):
            spin = _spinner() if cond == "busy" else None
            try:
                time.sleep(0.2)
                for name, (ours, ref) in cases.items():
                    times.setdefault((name, cond, "itmzoo"), []).append(_time(ours, cond) / units[name])
                    times.setdefault((name, cond, "reference"), []).append(_time(ref, cond) / units[name])
                    loads[cond].append(os.getloadavg()[0])
            finally:
                if spin is not None:
                    spin.kill()
                    spin.wait()
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    print(f"\nload average (1 min) free {min(loads['free']):.1f}-{max(loads['free']):.1f}, "
          f"busy {min(loads['busy']):.1f}-{max(loads['busy']):.1f}; medians of {args.rounds} rounds "
          f"(s; *_step paths: s per step)")
    print(f"{'path':<15} {'itmzoo free':>11} {'busy':>7} {'slowdown':>8} | {'ref free':>8} {'busy':>7} "
          f"{'slowdown':>8} | {'itmzoo/ref free':>15} {'busy':>6}")
    for name in cases:
        o_f, o_b = med[(name, "free", "itmzoo")], med[(name, "busy", "itmzoo")]
        r_f, r_b = med[(name, "free", "reference")], med[(name, "busy", "reference")]
        row = {"path": name, "itmzoo_free_s": o_f, "itmzoo_busy_s": o_b, "itmzoo_slowdown": o_b / o_f,
               "ref_free_s": r_f, "ref_busy_s": r_b, "ref_slowdown": r_b / r_f,
               "ratio_free": o_f / r_f, "ratio_busy": o_b / r_b}
        rows.append(row)
        print(f"{name:<15} {o_f:>11.3f} {o_b:>7.3f} {o_b / o_f:>7.2f}x | {r_f:>8.3f} {r_b:>7.3f} {r_b / r_f:>7.2f}x"
              f" | {o_f / r_f:>15.2f} {o_b / r_b:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "loads": loads, "rounds": args.rounds, "n": args.n, "window": w,
                       "authors_reference": refs, "threads": torch.get_num_threads(),
                       "times": {"|".join(k): v for k, v in times.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
