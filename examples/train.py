"""Train a model from a run file with the Python API — what ``itmzoo train`` does, spelled out.

    python examples/train.py                                    # configs/demo_synthetic.yaml
    python examples/train.py configs/demo_synthetic.yaml --set train.epochs=2 --out runs/example

Each step is one library call: read the run file, build the model, load the splits, `fit`, evaluate
the best checkpoint. Swap any of them for your own (a custom split, a model built in a notebook).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import itmzoo
from itmzoo.config import load_run_config
from itmzoo.data import load_split
from itmzoo.eval import chance_metrics, format_metrics
from itmzoo.train import fit
from itmzoo.train.engine import seed_everything
from itmzoo.train.run import parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs" / "demo_synthetic.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    # 1. the run file: {model, data, train, eval}, with dotted overrides
    run = parse_run_config(load_run_config(args.config, args.set))

    # 2. the model: a registry name plus validated config fields; seeded for reproducible weights
    seed_everything(run.train.seed)
    model = itmzoo.build(run.model_name, **run.model_fields)
    print(f"{run.model_name}: {sum(p.numel() for p in model.parameters()):,} parameters")

    # 3. the data: any RetrievalSplit works; load_split reads every supported format
    train, dev, test = (load_split(run.data[s]) for s in ("train", "dev", "test"))
    print(train, dev, test, sep="\n")

    # 4. training: dev recall every epoch, best checkpoint in OUT/best, exact resume from OUT/last
    result = fit(model, train, run.train, dev, eval_config=run.eval, out_dir=args.out, resume=args.resume)
    print(f"best dev {run.train.best_metric} {result.best_metric:.1f} after epoch {result.best_epoch}")

    # 5. the best checkpoint on the test split
    best = itmzoo.load(Path(args.out) / "best", device="cuda" if torch.cuda.is_available() else "cpu")
    metrics = itmzoo.evaluate(best, test, run.eval.protocol, progress=False)
    print(f"test: {format_metrics(metrics)}")
    print(f"chance: {format_metrics(chance_metrics(test.caption_to_image))}")
    print(json.dumps({k: metrics[k] for k in ("protocol", "n_images", "n_captions", "rsum")}))


if __name__ == "__main__":
    main()
