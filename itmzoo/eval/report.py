"""Reading metrics: the recall of a random ranking (what "better than chance" means) and one-line summaries."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["chance_metrics", "compare_expected", "format_comparison", "format_metrics"]


def chance_metrics(caption_to_image: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Expected recalls (percent) of a random ranking: what 'better than chance' is measured against."""
    c2i = np.asarray(caption_to_image)
    n_img, n_cap = int(c2i.max()) + 1, len(c2i)
    counts = np.bincount(c2i, minlength=n_img)
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        kk = min(k, n_cap)
        # i2t: P(at least one of an image's c captions among K random picks of n_cap)
        miss = [math.comb(n_cap - c, kk) / math.comb(n_cap, kk) if n_cap - c >= kk else 0.0 for c in counts]
        out[f"i2t_r{k}"] = 100.0 * (1.0 - float(np.mean(miss)))
        out[f"t2i_r{k}"] = 100.0 * min(k, n_img) / n_img
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def format_metrics(m: Mapping[str, Any]) -> str:
    """One line of the six recalls and rsum."""
    return (f"i2t R@1 {m['i2t_r1']:.1f}  R@5 {m['i2t_r5']:.1f}  R@10 {m['i2t_r10']:.1f} | "
            f"t2i R@1 {m['t2i_r1']:.1f}  R@5 {m['t2i_r5']:.1f}  R@10 {m['t2i_r10']:.1f} | rsum {m['rsum']:.1f}")


def compare_expected(metrics: Mapping[str, Any], expected: Mapping[str, float]) -> list[dict[str, Any]]:
    """The expected metrics of a tag (``"protocol.metric": value``) that this evaluation's protocol measured,
    each with what was measured and the difference (measured - expected)."""
    protocol = metrics.get("protocol", "full")
    rows = []
    for key, want in expected.items():
        proto, _, metric = key.rpartition(".")
        if proto and proto != protocol:
            continue
        if metric in metrics:
            got = float(metrics[metric])
            rows.append({"metric": metric, "protocol": protocol, "expected": float(want), "measured": got,
                         "difference": got - float(want)})
    return rows


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """Lines ``metric  expected  measured  difference`` of `compare_expected`."""
    lines = [f"{'metric':<10}{'expected':>10}{'measured':>10}{'diff':>9}"]
    lines += [f"{r['metric']:<10}{r['expected']:>10.2f}{r['measured']:>10.2f}{r['difference']:>+9.2f}" for r in rows]
    return "\n".join(lines)
