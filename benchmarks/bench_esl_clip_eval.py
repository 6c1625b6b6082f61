"""ESL (CLIP branch) evaluation cost: itmzoo's encode-once scoring vs the authors' per-shard re-encoding.

    python benchmarks/bench_esl_clip_eval.py --upstream DIR [--images 20 --captions 100 --shard 2 --layers 2]

DIR is a checkout of kkzhang95/ESL @ 7edd3da0b404b3262d54b8304f36b615c282d705. Its ``CLIPTransformer``
(``model/clip_transformer.py`` with ``modules/transformer.py``, strategy flag set) is built with its own
``model/clip_model.CLIP`` at ViT-B/16 widths (224 px, 16 px patches, vision width 768 / 12 heads, text
width 512 / 8 heads, 49,408 tokens, 77 positions) and ``--layers`` blocks per tower instead of
``load_clip`` (no download); ``torch.Tensor.cuda`` is the identity. Nothing is edited. Weights: upstream's
random initialisation, loaded into itmzoo through ``itmzoo.build("esl_clip", checkpoint=...)``.

* upstream: the loop of its ``_valid_epoch_step`` / ``shard_attn_scores`` (the whole model on every
  image-shard x caption-shard block), with the shard size ``--shard`` instead of its hard-coded 100, so
  that a small split repeats the encodings as a COCO-1K fold does (1,000 images, 5,000 captions, shards
  of 100: every image encoded 50 times, every caption 10 times). The defaults (20 images, 100 captions,
  shards of 2) give the same 50 and 10.
* itmzoo: ``encode_image`` / ``encode_text`` once per item (batches of ``--batch``), then ``similarity``.

Both use 1 thread by default; the best of ``--repeats`` runs of each is reported, with the largest score
difference. Depth is reduced (``--layers``) to keep CPU runs short: both towers scale with it alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itmzoo  # noqa: E402 (needs the sys.path entry above)


def load_module(upstream: Path, rel: str, heuristic: bool | None = None) -> types.ModuleType:
    src = (upstream / rel).read_text()
    if heuristic is not None:
        flag = "heuristic_strategy = True"
        assert src.count(flag) == 1, f"{rel}: expected one '{flag}'"
        src = src.replace(flag, f"heuristic_strategy = {heuristic}")
    mod = types.ModuleType(rel.replace("/", "_")[:-3])
    mod.__file__ = str(upstream / rel)
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def upstream_model(upstream: Path, heuristic: bool, layers: int) -> torch.nn.Module:
    sys.path.insert(0, str(upstream))
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.modules["modules.transformer"] = load_module(upstream, "modules/transformer.py", heuristic)
    import model.clip_model as clip_model  # from the upstream checkout

    clip_model.load_clip = lambda arch, *a, **k: clip_model.CLIP(
        embed_dim=512, image_resolution=224, vision_layers=layers, vision_width=768, vision_patch_size=16,
        context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=layers)
    ct = load_module(upstream, "model/clip_transformer.py")
    cfg = types.SimpleNamespace(clip_arch="ViT-B/16", input_res=224, embed_dim=512, kernel_size=2, num_mha_heads=1,
                                sim_dim=512)
    return ct.CLIPTransformer(cfg).eval()


def upstream_eval(net: torch.nn.Module, pixels: torch.Tensor, ids: torch.Tensor, shard: int) -> torch.Tensor:
    """Upstream's evaluation loop: the whole model on every (image shard, caption shard) block."""
    sims = torch.zeros(pixels.shape[0], ids.shape[0])
    for i0 in range(0, pixels.shape[0], shard):
        for j0 in range(0, ids.shape[0], shard):
            sims[i0:i0 + shard, j0:j0 + shard] = net({"image": pixels[i0:i0 + shard], "text": ids[j0:j0 + shard]},
                                                     return_all_frames=True)
    return sims


def itmzoo_eval(model, pixels: torch.Tensor, ids: torch.Tensor, batch: int) -> torch.Tensor:
    img = torch.cat([model.encode_image({"pixels": pixels[i:i + batch]}) for i in range(0, len(pixels), batch)])
    txt = torch.cat([model.encode_text({"input_ids": ids[i:i + batch]}) for i in range(0, len(ids), batch)])
    return model.similarity(img, txt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, type=Path)
    ap.add_argument("--strategy", choices=["heuristic", "adaptive"], default="heuristic")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--shard", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2, help="blocks per CLIP tower (ViT-B/16 has 12)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = upstream_model(args.upstream.resolve(), args.strategy == "heuristic", args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_best.pth"
        torch.save({"epoch": 0, "state_dict": net.state_dict()}, path)
        model = itmzoo.build("esl_clip", checkpoint=str(path),
                             clip={"vision_layers": args.layers, "text_layers": args.layers}).eval()
    assert model.config.strategy == args.strategy
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(args.images, 3, 224, 224, generator=g)
    ids = torch.zeros(args.captions, 77, dtype=torch.long)
    for r in range(args.captions):
        n = int(torch.randint(10, 19, (1,), generator=g))
        ids[r, 0], ids[r, n - 1] = 49406, 49407
        ids[r, 1:n - 1] = torch.randint(1, 49406, (n - 2,), generator=g)
    best = {"upstream": float("inf"), "itmzoo": float("inf")}
    out = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in (("upstream", lambda: upstream_eval(net, pixels, ids, args.shard)),
                             ("itmzoo", lambda: itmzoo_eval(model, pixels, ids, args.batch))):
                t0 = time.perf_counter()
                out[name] = fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    n_i, n_t = args.images, args.captions
    rep_i, rep_t = -(-n_t // args.shard), -(-n_i // args.shard)
    print(f"{args.strategy}, {n_i} images x {n_t} captions, shards of {args.shard} (upstream encodes each image "
          f"{rep_i}x, each caption {rep_t}x), {args.layers} blocks per tower, {args.threads} thread(s)")
    print(f"upstream {best['upstream']:.2f} s, itmzoo {best['itmzoo']:.2f} s, "
          f"ratio {best['upstream'] / best['itmzoo']:.1f}x; "
          f"max |score difference| {(out['upstream'] - out['itmzoo']).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
