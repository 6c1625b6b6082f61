"""DistributedDataParallel on CPU (gloo, file rendezvous, 2 processes): with embeddings gathered with
gradients, the loss and the gradients equal the single-process ones on the same global batch, and a
2-rank run follows the 1-process run step by step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import itmzoo
from itmzoo.data.synthetic import SyntheticShapes
from itmzoo.distributed import all_gather_with_grad, gather_features
from itmzoo.train import fit
from itmzoo.train.data import make_train_loader

TRAIN = {"epochs": 2, "batch_size": 16, "lr": 1e-2, "log_every": 1, "progress": False}
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _split():
    return SyntheticShapes({"train": 24, "dev": 8, "test": 8}, region_dim=24, num_regions=5).split("train")


def _model():
    torch.manual_seed(0)
    return itmzoo.build("toy_vse", img_dim=24, embed_size=16, word_dim=16, hash_buckets=97, warmup_epochs=0)


def _global_batch(model) -> dict:
    return next(iter(make_train_loader(_split(), model, 16, seed=4)))


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        # 1. one DDP step on this rank's half of a fixed global batch
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = _model()
        batch = _global_batch(model)
        n = batch["image_index"].shape[0] // world
        mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        ddp = DDP(model)
        out = ddp(mine)
        out["loss"].backward()
        # uneven rows and padded token dims also gather, with gradients to the right rows
        x = torch.full((rank + 1, 2 + rank), float(rank + 1), requires_grad=True)
        g = all_gather_with_grad(x)
        (g * torch.arange(1.0, g.numel() + 1).view_as(g)).sum().backward()
        ints = gather_features({"i": torch.tensor([rank])})["i"]
        torch.save({"loss": out["loss"].detach(), "grads": {k: p.grad for k, p in model.named_parameters()},
                    "gathered": g.detach(), "x_grad": x.grad, "ints": ints}, f"{tmp}/step{rank}.pt")
        # 2. a whole run: rank 0 writes the log
        fit(_model(), _split(), TRAIN, out_dir=f"{tmp}/ddp")
        # 3. cached-feature accumulation under DDP: 2 ranks x 2 micro-batches of 4
        fit(_model(), _split(), {**TRAIN, "accum_steps": 2}, out_dir=f"{tmp}/ddp_accum")
        # 4. naive accumulation ending in an incomplete window (60 items per rank in micro-batches of 4:
        #    7 windows of 2 and one of 1): the last window must sync gradients too, or the ranks drift apart
        naive = _model()
        naive.accumulation = "naive"
        fit(naive, _split(), {**TRAIN, "epochs": 1, "accum_steps": 2, "drop_last": False})
        torch.save(naive.state_dict(), f"{tmp}/naive{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    # fork: the children reuse the parent's imports (spawn would re-import torch, itmzoo and nltk in each)
    mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, join=True, start_method="fork")
    return tmp


def test_gathered_loss_and_gradients_equal_single_process(ddp_run):
    model = _model()
    out = model(_global_batch(model))
    out["loss"].backward()
    for r in range(2):
        got = torch.load(ddp_run / f"step{r}.pt", weights_only=True)
        assert torch.allclose(got["loss"], out["loss"], rtol=1e-6)
        for k, p in model.named_parameters():  # DDP averages; the gather's backward sums: single-process grads
            assert torch.allclose(got["grads"][k], p.grad, rtol=1e-5, atol=1e-6), k
        assert got["ints"].tolist() == [0, 1]
    g0 = torch.load(ddp_run / "step0.pt", weights_only=True)
    g1 = torch.load(ddp_run / "step1.pt", weights_only=True)
    # rank 0 holds 1 x 2 ones, rank 1 holds 2 x 3 twos: gathered to 3 x 3, rank 0's row zero-padded
    assert torch.equal(g0["gathered"], torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]))
    weights = torch.arange(1.0, 10.0).view(3, 3)
    assert torch.equal(g0["x_grad"], 2 * weights[:1, :2]) and torch.equal(g1["x_grad"], 2 * weights[1:, :3])


def test_two_rank_run_follows_the_single_process_run(ddp_run, tmp_path):
    fit(_model(), _split(), TRAIN, out_dir=tmp_path)

    def losses(p: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (p / "log.jsonl").read_text().splitlines()) if r["type"] == "step"]

    a, b, c = losses(ddp_run / "ddp"), losses(tmp_path), losses(ddp_run / "ddp_accum")
    assert len(a) == len(b) == len(c) == 2 * (24 * 5 // 16)
    assert a == pytest.approx(b, rel=1e-5) and c == pytest.approx(b, rel=1e-5)
    start = json.loads((ddp_run / "ddp" / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["micro_batch"] == 8
    ddp_w = itmzoo.load(ddp_run / "ddp" / "last").state_dict()
    one_w = itmzoo.load(tmp_path / "last").state_dict()
    for k in one_w:
        assert torch.allclose(ddp_w[k], one_w[k], atol=1e-5), k


def test_an_incomplete_accumulation_window_keeps_the_ranks_identical(ddp_run):
    w0 = torch.load(ddp_run / "naive0.pt", weights_only=True)
    w1 = torch.load(ddp_run / "naive1.pt", weights_only=True)
    start = _model().state_dict()
    assert any(not torch.equal(w0[k], start[k]) for k in start)  # it trained
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
