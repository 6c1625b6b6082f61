"""Cross-interaction losses under DistributedDataParallel (CPU, gloo, 2 processes): every rank scores all
images of the global batch against its own captions and the score columns are gathered, so the loss
and the DDP-averaged gradients equal the single-process ones on the same global batch."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_models_generic import tiny_model, tiny_split, train_batch

from itmzoo.data import SYNTHETIC_WORDPIECE
from itmzoo.train import fit

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# SCTA in its fixed cap_fc2 mode: the faithful mode draws a fresh caption layer per caption from each
# process's RNG, which no split of the batch can reproduce
CASES = {"lhsc": {}, "esl": {}, "scta": {"cap_fc2": "fixed"}}


def _model(name: str):
    model = tiny_model(name, SYNTHETIC_WORDPIECE)
    for k, v in CASES[name].items():
        setattr(model.config, k, v)
    # eval mode: no dropout draws, so the halves see what the whole batch sees; the gathers are the same
    return model.eval()


def _batch(model) -> dict:
    torch.manual_seed(1)
    random.seed(1)
    return train_batch(model, tiny_split(model, 8), n=8)


def _worker(rank: int, world: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        for name in CASES:
            model = _model(name)
            batch = _batch(model)
            n = batch["image_index"].shape[0] // world
            mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
            ddp = DDP(model, find_unused_parameters=True)
            out = ddp(mine)
            out["loss"].backward()
            torch.save({"loss": out["loss"].detach(), "batch": batch,
                        "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None}},
                       f"{tmp}/{name}{rank}.pt")
        # a model with weights that are dead by design (ESA: a BatchNorm and BERT's pooler, declared in
        # unused_parameters) trains several DDP steps with the default train settings
        esa = tiny_model("esa_bert", SYNTHETIC_WORDPIECE)
        result = fit(esa, tiny_split(esa, 8), {"epochs": 1, "batch_size": 4, "max_steps": 3, "progress": False})
        torch.save({"steps": result.steps, "params": {k: p.detach() for k, p in esa.named_parameters()}},
                   f"{tmp}/esa{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_cross")
    mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, join=True, start_method="fork")
    return tmp


@pytest.mark.parametrize("name", list(CASES))
def test_cross_model_loss_and_gradients_equal_single_process(ddp_run, name):
    model = _model(name)
    batch = _batch(model)
    ranks = [torch.load(ddp_run / f"{name}{r}.pt", weights_only=True) for r in range(2)]
    for k, v in batch.items():  # the same global batch everywhere
        assert all(torch.equal(got["batch"][k], v) for got in ranks), k
    out = model(batch)
    out["loss"].backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads
    for got in ranks:
        torch.testing.assert_close(got["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == grads.keys()
        for k, g in grads.items():  # sums over other splits of the batch: rounding relative to the largest entry
            atol = 1e-6 * max(1.0, float(g.abs().max()))
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=atol, msg=f"{name}: {k}")


def test_declared_dead_weights_do_not_stop_ddp_training(ddp_run):
    ranks = [torch.load(ddp_run / f"esa{r}.pt", weights_only=True) for r in range(2)]
    assert [r["steps"] for r in ranks] == [3, 3]
    for k, v in ranks[0]["params"].items():  # gradients were averaged: the ranks hold the same weights
        assert torch.equal(v, ranks[1]["params"][k]), k
