"""Whole `itmzoo train` runs of the demo configurations, with and without one CPU core held by a spinner.

Each run is ``itmzoo train CONFIG --set train.max_steps=N`` in a fresh process (loader, trainer, thread
choice and all), and what is timed is its training: the ``seconds`` of the epoch record in log.jsonl
(the steps, without start-up and evaluation). Every configuration runs with the default thread policy
(``train.cpu_threads: null``, chosen from step times) and with ``train.cpu_threads`` fixed at torch's
count (the policy before the tuner), as the machine is ("free") and while a spinner process started
and stopped by this script holds one core ("busy"); rounds alternate everything.

    python benchmarks/bench_epoch_under_load.py [--rounds 2] [--steps 60]
        [--configs configs/esa_demo_synthetic.yaml,configs/lhsc_demo_synthetic.yaml,configs/demo_synthetic.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = "configs/esa_demo_synthetic.yaml,configs/lhsc_demo_synthetic.yaml,configs/demo_synthetic.yaml"


def _train_seconds(config: str, steps: int, fixed: int | None, out: Path) -> tuple[float, list[int]]:
    """Training seconds of one run, and the thread counts its tuner chose (empty when fixed)."""
    cmd = [sys.executable, "-m", "itmzoo.cli", "train", config, "--out", str(out),
           "--set", "train.epochs=1", "--set", f"train.max_steps={steps}", "--set", "train.progress=false"]
    if fixed is not None:
        cmd += ["--set", f"train.cpu_threads={fixed}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epoch = next(r for r in recs if r["type"] == "epoch")
    return epoch["seconds"], [r["threads"] for r in recs if r["type"] == "cpu_threads"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    import torch

    threads = torch.get_num_threads()
    configs = [c for c in args.configs.split(",") if c]
    times: dict[tuple[str, str, str], list[float]] = {}
    chosen: dict[tuple[str, str], list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        k = 0
        for r in range(args.rounds):
            for cond in ("free", "busy"):
                spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "busy" else None
                try:
                    time.sleep(0.2)
                    for config in configs:
                        for policy, fixed in (("measured", None), (f"fixed {threads}", threads)):
                            k += 1
                            sec, picks = _train_seconds(config, args.steps, fixed, Path(tmp) / f"run{k}")
                            times.setdefault((config, policy, cond), []).append(sec)
                            if fixed is None:
                                chosen.setdefault((config, cond), []).append(picks)
                finally:
                    if spin is not None:
                        spin.kill()
                        spin.wait()
            print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{args.steps} steps per run, torch threads {threads}, medians of {args.rounds} rounds (training seconds)")
    print(f"{'config':<36} {'policy':<9} {'free':>7} {'busy':>7} {'slowdown':>8}  tuner's choices (free | busy)")
    for config in configs:
        for policy in ("measured", f"fixed {threads}"):
            f = statistics.median(times[(config, policy, "free")])
            b = statistics.median(times[(config, policy, "busy")])
            picks = ""
            if policy == "measured":
                picks = f"{chosen[(config, 'free')]} | {chosen[(config, 'busy')]}"
            print(f"{config:<36} {policy:<9} {f:>7.2f} {b:>7.2f} {b / f:>7.2f}x  {picks}")


if __name__ == "__main__":
    main()
