"""Images per second per DataLoader worker: JPEG decode + each method's training transform.

Generates `--n` 500x375 JPEGs (the COCO / Flickr30K size; smooth random content, quality 90) in a temporary
folder, then runs every pipeline in this one process with one torch thread (what one DataLoader worker
has), reading the files from disk each time:

* ``pil``: ``PIL.Image.open(path).convert("RGB")`` + itmzoo's transform (torchvision on PIL images), the
  path the upstream methods use and the one `itmzoo.data.transforms.image_transform` takes;
* ``tv``: ``torchvision.io.decode_image`` to a uint8 tensor + the same steps on tensors
  (``image_transform(..., backend="tensor")``: ``transforms.v2``, bicubic with antialias). Its output
  differs slightly from PIL's resampling (the script prints the mean and max difference in normalised
  units, over the evaluation transforms of 20 images).

    python benchmarks/bench_pixel_loading.py [--n 200] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` 500x375 RGB JPEGs with smooth random content (upsampled noise), quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noise = rng.normal(0, 12, (375, 500, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
        p = folder / f"{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def rate(fn, paths: list[Path], repeats: int) -> tuple[float, float]:
    """Best (images per wall second, images per CPU second of this process) over `repeats` passes.

    On a shared machine the wall rate depends on the other load; the CPU rate is what one worker
    reaches when it has a core to itself.
    """
    best_wall = best_cpu = 0.0
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for p in paths:
            fn(p)
        best_wall = max(best_wall, len(paths) / (time.perf_counter() - t))
        best_cpu = max(best_cpu, len(paths) / max(time.process_time() - c, 1e-9))
    return best_wall, best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file

    from itmzoo.data.transforms import image_transform

    results: dict[str, tuple[float, float] | float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n)
        torch.manual_seed(0)

        def pil_decode(p):
            with Image.open(p) as im:
                return im.convert("RGB")

        def tv_decode(p):
            return decode_image(read_file(str(p)), mode=ImageReadMode.RGB)

        results["decode_only.pil"] = rate(pil_decode, paths, args.repeats)
        results["decode_only.tv"] = rate(tv_decode, paths, args.repeats)
        for backbone in ("clip", "vit"):
            pil_t = image_transform(backbone, 224, train=True)
            tv_t = image_transform(backbone, 224, train=True, backend="tensor")
            results[f"{backbone}_train.pil"] = rate(pil_t, paths, args.repeats)
            results[f"{backbone}_train.tv"] = rate(tv_t, paths, args.repeats)
        # how far the tensor path is from PIL's resampling (deterministic eval transforms)
        diffs = []
        for backbone in ("clip", "vit"):
            pil_t = image_transform(backbone, 224, train=False)
            tv_t = image_transform(backbone, 224, train=False, backend="tensor")
            for p in paths[:20]:
                diffs.append((pil_t(p) - tv_t(p)).abs())
        d = torch.stack(diffs)
        results["tv_vs_pil.mean_abs"] = float(d.mean())
        results["tv_vs_pil.max_abs"] = float(d.max())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.n} JPEGs 500x375, 1 torch thread, best of {args.repeats}; cpus={os.cpu_count()}, "
          f"load average {load:.1f}")
    print(f"  {'pipeline':22s} {'img/s (wall)':>12s} {'img/CPU-s':>10s}")
    for k, v in results.items():
        if isinstance(v, tuple):
            print(f"  {k:22s} {v[0]:12.1f} {v[1]:10.1f}")
        else:
            print(f"  {k:22s} {v:12.4f}")
    results["load_average"] = load
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
