"""A self-contained HTML report of an evaluation: metrics, R@K curves, example queries with thumbnails.

`write_report(directory, metrics, split, sims)` writes ``index.html`` plus its pictures into one
directory with relative links only, so the directory can be moved, zipped or served as it is:

* the metrics table with the protocol and the recall of a random ranking;
* R@K for K = 1..50 in both directions: ``recall_at_k.png`` when matplotlib (extra ``plot``) is
  installed, else an SVG drawn here and written inline;
* a grid of example queries: caption -> top-5 images (thumbnails) and image -> top-5 captions, the
  correct results marked. Pixel splits show their pictures; region splits show a picture when their
  image sequence has a ``picture(i)`` method (the synthetic dataset renders its scenes), else the ids.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .protocols import FoldRanks, _per_fold, direction_matrices, fold_ranks
from .report import chance_metrics

__all__ = ["recall_curves", "write_report"]

THUMB = 96
MAX_K = 50


def recall_curves(sims: Any, split: Any, protocol: str = "full", max_k: int = MAX_K,
                  ranks: list[FoldRanks] | None = None) -> dict[str, list[float]]:
    """``{"k": [1..K], "i2t": [R@k ...], "t2i": [...]}`` in percent, over every fold's queries
    (`ranks`: `fold_ranks` of the same scores, when already computed)."""
    folds = ranks if ranks is not None else fold_ranks(sims, split, protocol)
    n_gallery = min(split.num_captions, split.num_images)
    ks = list(range(1, min(max_k, max(n_gallery, 1)) + 1))
    out: dict[str, list[float]] = {"k": [float(k) for k in ks]}
    for d in ("i2t", "t2i"):
        allr = np.concatenate([getattr(f, d).numpy() for f in folds])
        out[d] = [float((allr < k).mean() * 100) for k in ks]
    return out


def _svg_curves(curves: Mapping[str, list[float]]) -> str:
    """A small line chart of both curves as inline SVG (used when matplotlib is not installed)."""
    w, h, left, bottom, top, right = 420, 260, 44, 30, 12, 12
    ks = curves["k"]
    kmax = max(ks[-1], 2.0)

    def xy(k: float, r: float) -> str:
        x = left + (k - 1) / (kmax - 1) * (w - left - right)
        y = top + (1 - r / 100) * (h - top - bottom)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="recall at K">', f'<rect x="{left}" y="{top}" width="{w - left - right}" '
             f'height="{h - top - bottom}" fill="none" stroke="#888"/>']
    for r in (0, 25, 50, 75, 100):
        y = top + (1 - r / 100) * (h - top - bottom)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{r}</text>')
    for k in sorted({1, int(kmax) // 2, int(kmax)}):
        x = left + (k - 1) / (kmax - 1) * (w - left - right)
        parts.append(f'<text x="{x:.1f}" y="{h - bottom + 14}" font-size="10" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{(w + left) / 2:.0f}" y="{h - 2}" font-size="11" text-anchor="middle">K</text>')
    for d, colour, dy in (("i2t", "#1f77b4", 0), ("t2i", "#d62728", 14)):
        pts = " ".join(xy(k, r) for k, r in zip(ks, curves[d]))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{w - right - 4}" y="{h - bottom - 24 + dy}" font-size="11" fill="{colour}" '
                     f'text-anchor="end">{d} R@K</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _png_curves(curves: Mapping[str, list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for d in ("i2t", "t2i"):
        ax.plot(curves["k"], curves[d], label=f"{d} R@K")
    ax.set_xlabel("K")
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _picture(images: Sequence[Any], kind: str, i: int) -> Any:
    if kind == "pixels":
        from ..data.split import load_pil

        return load_pil(images[i])
    pic = getattr(images, "picture", None)
    return pic(i) if callable(pic) else None


class _Thumbs:
    """Writes each image's thumbnail once into ``thumbs/`` and returns its relative path (None: no picture)."""

    def __init__(self, directory: Path, split: Any) -> None:
        self.dir, self.split, self.done = directory / "thumbs", split, {}

    def __call__(self, i: int) -> str | None:
        if i not in self.done:
            img = _picture(self.split.images, self.split.kind, i)
            if img is None:
                self.done[i] = None
            else:
                self.dir.mkdir(exist_ok=True)
                img = img.convert("RGB")
                img.thumbnail((THUMB, THUMB))
                img.save(self.dir / f"{i}.png")
                self.done[i] = f"thumbs/{i}.png"
        return self.done[i]


def _image_cell(thumbs: _Thumbs, split: Any, i: int, css: str, score: float | None = None) -> str:
    """A table cell with image `i`'s thumbnail (or its id); `css` is hit, miss or q (the query)."""
    ident = split.image_ids[i] if split.image_ids is not None else i
    src = thumbs(i)
    body = (f'<img src="{html.escape(src)}" alt="{html.escape(str(ident))}" width="{THUMB}">' if src
            else f'<div class="noimg">{html.escape(str(ident))}</div>')
    sc = f"<br><small>{score:.3f}</small>" if score is not None else ""
    return f'<td class="{css}">{body}{sc}{" ✓" if css == "hit" else ""}</td>'


def _examples(sims: Any, split: Any, protocol: str, thumbs: _Thumbs, n: int, k: int = 5) -> str:
    folds, fold_sims, _ = _per_fold(sims, np.asarray(split.caption_to_image), protocol)
    (f_img, caps), (i2t, t2i) = folds[0], direction_matrices(fold_sims[:1])[0]  # the first fold's examples
    start = f_img.start
    c2i = np.asarray(split.caption_to_image)
    n_img = i2t.shape[0]
    rows = ['<h2>Caption &rarr; images</h2>', "<table class='grid'>"]
    picks = np.linspace(0, len(caps) - 1, num=min(n, len(caps))).round().astype(int)
    for q in picks:
        j = int(caps[q])
        top = t2i[:, q].topk(min(k, n_img))
        cells = "".join(_image_cell(thumbs, split, start + int(i), "hit" if start + int(i) == c2i[j] else "miss",
                                    float(s))
                        for s, i in zip(top.values.tolist(), top.indices.tolist()))
        rows.append(f"<tr><th class='q'>{html.escape(split.captions[j])}</th>{cells}</tr>")
    rows += ["</table>", '<h2>Image &rarr; captions</h2>', "<table class='grid'>"]
    for i in np.linspace(0, n_img - 1, num=min(n, n_img)).round().astype(int):
        top = i2t[i].topk(min(k, len(caps)))
        cells = []
        for s, q in zip(top.values.tolist(), top.indices.tolist()):
            j = int(caps[q])
            ok = c2i[j] == start + i
            cells.append(f'<td class="{"hit" if ok else "miss"}">{html.escape(split.captions[j])}'
                         f'<br><small>{s:.3f}</small>{" ✓" if ok else ""}</td>')
        rows.append(f"<tr>{_image_cell(thumbs, split, start + int(i), 'q')}"
                    f"{''.join(cells)}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}
.grid td{width:110px;text-align:center}.hit{background:#e3f6e3;border:3px solid #2a2}.miss{background:#fafafa}
th.q,td.q{max-width:220px;text-align:left;background:#eef}.noimg{width:96px;height:40px;font-size:10px}"""


def _metrics_table(metrics: Mapping[str, Any], chance: Mapping[str, float] | None) -> str:
    cols = [("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("medr", "medr"), ("meanr", "meanr")]
    head = "".join(f"<th>{c}</th>" for c, _ in cols)
    rows = [f"<table><tr><th>direction</th>{head}</tr>"]
    for d, label in (("i2t", "image &rarr; text"), ("t2i", "text &rarr; image")):
        vals = "".join(f"<td>{metrics[f'{d}_{k}']:.2f}</td>" for _, k in cols)
        extra = (f"<td><small>chance R@1 {chance[f'{d}_r1']:.1f}</small></td>" if chance else "")
        rows.append(f"<tr><th>{label}</th>{vals}{extra}</tr>")
    rows.append(f"<tr><th>rsum</th><td colspan='{len(cols)}'>{metrics['rsum']:.2f}"
                + (f" (chance {chance['rsum']:.1f})" if chance else "") + "</td></tr></table>")
    return "\n".join(rows)


def write_report(directory: str | Path, metrics: Mapping[str, Any], split: Any, sims: Any, *,
                 title: str | None = None, n_examples: int = 8, ranks: list[FoldRanks] | None = None) -> Path:
    """Write the report into `directory` (atomically) and return the path of its ``index.html``.

    `sims` is what ``evaluate(..., return_sims=True)`` returns under ``"sims"`` (a matrix, a
    `DirectionalScores`, or a list of them per fold of the protocol); `ranks`, its `fold_ranks` if the
    caller has them already.
    """
    from ..checkpoints.atomic import atomic_dir

    protocol = metrics.get("protocol", "full")
    directory = Path(directory)
    title = title or f"{metrics.get('model', 'model')} on {metrics.get('split', '') or 'split'}"
    curves = recall_curves(sims, split, protocol, ranks=ranks)
    chance = chance_metrics(split.caption_to_image)
    with atomic_dir(directory) as tmp:
        thumbs = _Thumbs(tmp, split)
        plot = ('<img src="recall_at_k.png" alt="R@K curves">' if _png_curves(curves, tmp / "recall_at_k.png")
                else _svg_curves(curves))
        info = (f"protocol <b>{html.escape(str(protocol))}</b>, {metrics.get('n_images')} images, "
                f"{metrics.get('n_captions')} captions, tie mode {html.escape(str(metrics.get('tie_mode', '')))}, "
                f"itmzoo {html.escape(str(metrics.get('itmzoo_version', '')))}")
        if metrics.get("checkpoint"):
            info += f", checkpoint <code>{html.escape(str(metrics['checkpoint']))}</code>"
        page = [
            "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{info}</p>",
            _metrics_table(metrics, chance), "<h2>Recall at K</h2>", plot,
            _examples(sims, split, protocol, thumbs, n_examples),
            "<p><small>Correct results are marked ✓ (green). Examples are queries spread evenly over the "
            + ("first fold." if isinstance(sims, list) and len(sims) > 1 else "split.") + "</small></p>",
            "</body></html>",
        ]
        (tmp / "index.html").write_text("\n".join(page), encoding="utf-8")
    return directory / "index.html"
