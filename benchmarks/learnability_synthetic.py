"""Learnability of `SyntheticShapes`: toy_vse's test recall after 1, 3 and 8 epochs (the table in docs/data.md).

toy_vse (mean-pooled regions through one linear layer, hashed bag of words, VSE++ hinge: all negatives
in the first epoch, the hardest from the second) trains with Adam (lr 5e-4, constant, gradient norm
clipped at 2.0), batch 128, seed 0, on the default dataset's 10,000-image train split (36 x 2048 regions)
and is scored on its 1,000-image test split after every epoch. The regions are mean-pooled once up front
and fed as one region per image, which is what the model computes from them anyway (its training-time
region dropping then has nothing to drop), so the run takes minutes, not hours, on a CPU.

    python benchmarks/learnability_synthetic.py [--epochs 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

import itmzoo
from itmzoo.data import SyntheticShapes
from itmzoo.data.split import RetrievalSplit
from itmzoo.train import fit


def pooled(split: RetrievalSplit) -> RetrievalSplit:
    """The split with each image's regions replaced by their mean, as one [1, D] region."""
    means = np.stack([np.asarray(img, np.float32).mean(0, keepdims=True) for img in split.images])
    return dataclasses.replace(split, images=means)


class EpochRecorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, dict]] = []

    def on_epoch_end(self, trainer, record) -> None:
        if "dev" in record:
            self.rows.append((trainer.epoch + 1, trainer.step, record["dev"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.process_time()
    ds = SyntheticShapes(12000, seed=0)
    train, test = pooled(ds.split("train")), pooled(ds.split("test"))
    prep = time.process_time() - t0
    torch.manual_seed(args.seed)
    model = itmzoo.build("toy_vse", img_dim=ds.region_dim, warmup_epochs=1)
    rec = EpochRecorder()
    cfg = {"epochs": args.epochs, "batch_size": 128, "lr": 5e-4, "schedule": "constant", "grad_clip": 2.0,
           "seed": args.seed, "progress": False}
    t1 = time.process_time()
    fit(model, train, cfg, test, eval_config={"protocol": "full"}, callbacks=[rec], verbose=False)
    print(f"train {train.num_images} images / {len(train.captions)} captions, test {test.num_images} images; "
          f"CPU time: {prep:.0f} s data, {time.process_time() - t1:.0f} s training + evaluation; "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print("| training | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | rsum |")
    print("|---|---|---|---|---|---|")
    for epoch, step, m in rec.rows:
        print(f"| {step:,} steps ({epoch} epoch{'s' if epoch > 1 else ''}) | {m['i2t_r1']:.1f} | {m['i2t_r5']:.1f} | "
              f"{m['t2i_r1']:.1f} | {m['t2i_r5']:.1f} | {m['rsum']:.1f} |")


if __name__ == "__main__":
    main()
