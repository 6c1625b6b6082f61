"""Evaluation across processes (gloo, 2 CPU processes): every rank encodes and scores its share, rank 0
gathers, and the metrics (and score matrices) are exactly those of one process, for an embedding, a
cross and a two-stage model; dev evaluation inside training uses all ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import itmzoo
from itmzoo.data.synthetic import SYNTHETIC_VOCAB
from itmzoo.eval import evaluate

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
VOCAB = SYNTHETIC_VOCAB
# small blocks and batches, so both ranks get blocks, batches and second-stage queries
OPTS = {"batch_size": 6, "block": (5, 16), "pair_batch_size": 12, "progress": False, "return_sims": True}
LHSC = {"img_dim": 16, "word_dim": 8, "embed_size": 8, "sim_dim": 4, "num_regions": 4, "vocab_size": 74,
        "vocab_path": VOCAB, "gcn_layers": 1, "text_attn_layers": 1, "eval_text_batch_size": 7}
TOY = {"img_dim": 16, "embed_size": 8, "word_dim": 8, "hash_buckets": 31}


def _split(name: str = "test", n: int = 13):
    from itmzoo.data.synthetic import SyntheticShapes

    return SyntheticShapes({name: n}, region_dim=16, num_regions=4, seed=2).split(name)


def _models() -> dict:
    torch.manual_seed(0)
    return {
        "embedding": itmzoo.build("toy_vse", **TOY),
        # batch padding: caption features depend on the caption batch (7), which the shards keep
        "cross": itmzoo.build("lhsc", **LHSC, text_padding="batch"),
        "two-stage": itmzoo.build("two_stage", first="toy_vse", second="lhsc", k=4, first_config=TOY,
                                  second_config={**LHSC, "text_padding": "masked"}),
    }


def _sims(res):
    s = res["sims"]
    return {"i2t": s.i2t, "t2i": s.t2i} if hasattr(s, "i2t") else {"all": s}


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        split = _split()
        out = {}
        for kind, model in _models().items():
            model.eval()
            res = evaluate(model, split, **OPTS)
            assert res["world_size"] == 2
            record = {k: v for k, v in res.items() if k != "sims"}
            if rank == 0:
                single = evaluate(model, split, distributed=False, **OPTS)
                assert "world_size" not in single
                torch.save({"dist": _sims(res), "single": _sims(single)}, f"{tmp}/{kind}_sims.pt")
                record["single"] = {k: v for k, v in single.items() if k != "sims"}
            else:
                assert "sims" not in res  # the matrices stay on rank 0
            out[kind] = record
        # dev evaluation inside training: every rank evaluates, every rank logs the same figures
        from itmzoo.train import fit

        torch.manual_seed(0)
        r = fit(itmzoo.build("toy_vse", **TOY), _split("train", 16),
                {"epochs": 1, "batch_size": 8, "progress": False}, _split("dev", 11),
                eval_config={"batch_size": 4, "block": (3, 8)}, verbose=False)
        out["fit_dev"] = r.history[-1].get("dev")
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out, default=str))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_eval(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp_eval")
    mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, join=True, start_method="fork")
    return tmp


def _strip(rec: dict) -> dict:
    skip = ("seconds", "world_size", "single", "two_stage")
    return {k: v for k, v in rec.items() if k not in skip}


@pytest.mark.parametrize("kind", ["embedding", "cross", "two-stage"])
def test_two_processes_give_the_single_process_metrics(ddp_eval, kind):
    r0 = json.loads((ddp_eval / "rank0.json").read_text())[kind]
    r1 = json.loads((ddp_eval / "rank1.json").read_text())[kind]
    assert _strip(r0) == _strip(r0["single"])  # exactly, every metric
    assert _strip(r1) == _strip(r0)  # every rank returns the metrics
    sims = torch.load(ddp_eval / f"{kind.replace('/', '_')}_sims.pt", weights_only=True)
    for d, m in sims["dist"].items():
        assert torch.equal(m, sims["single"][d]), d  # bit for bit
    if kind == "two-stage":
        assert r0["two_stage"]["first_stage"] == r0["single"]["two_stage"]["first_stage"]
        assert r0["two_stage"]["second_stage_pairs"] == 13 * 4 + r0["n_captions"] * 4


def test_dev_evaluation_in_training_uses_all_ranks(ddp_eval, tmp_path):
    from itmzoo.train import fit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    r = fit(itmzoo.build("toy_vse", **TOY), _split("train", 16), {"epochs": 1, "batch_size": 8, "progress": False},
            _split("dev", 11), eval_config={"batch_size": 4, "block": (3, 8)}, verbose=False)
    one = r.history[-1]["dev"]
    d0 = json.loads((ddp_eval / "rank0.json").read_text())["fit_dev"]
    d1 = json.loads((ddp_eval / "rank1.json").read_text())["fit_dev"]
    assert d0 is not None and d1 is None  # rank 0 keeps the record
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum"):
        assert d0[k] == pytest.approx(one[k], abs=1e-9), k
    assert d0["world_size"] == 2
