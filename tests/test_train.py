"""The training engine on CPU: optimiser groups, schedules, seeding, exact accumulation, loader order,
epoch hooks, best checkpoint, non-finite losses."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import itmzoo
from itmzoo.config import ConfigError
from itmzoo.data.synthetic import SyntheticShapes
from itmzoo.train import NonFiniteLossError, TrainConfig, fit
from itmzoo.train.checkpoint import capture_rng, find_checkpoint, restore_rng
from itmzoo.train.data import ResumableBatchSampler, make_train_loader
from itmzoo.train.optim import LRSchedule, build_optimizer, build_param_groups

QUIET = {"progress": False, "log_every": 1}


@pytest.fixture(scope="module")
def data():
    ds = SyntheticShapes({"train": 32, "dev": 12, "test": 12}, region_dim=24, num_regions=5)
    return ds.split("train"), ds.split("dev")


def toy(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return itmzoo.build("toy_vse", **{"img_dim": 24, "embed_size": 16, "word_dim": 16, "hash_buckets": 97, **kw})


def step_losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["type"] == "step"]


# -- optimiser and schedule -------------------------------------------------------------------------

def test_param_groups_lr_mults_no_decay_and_freeze():
    m = toy()
    cfg = TrainConfig(lr=1e-3, weight_decay=0.01, lr_mults={"word_emb.*": 0.1}, no_weight_decay=["*.bias"],
                      freeze=["txt_fc.bias"])
    from itmzoo.train.optim import apply_freeze

    apply_freeze(m, cfg.freeze)
    groups = {g["name"]: g for g in build_param_groups(m, cfg)}
    assert set(groups) == {"all", "all[no_wd]", "all[word_emb.*]"}
    assert groups["all[word_emb.*]"]["lr"] == pytest.approx(1e-4) and groups["all[word_emb.*]"]["weight_decay"] == 0.01
    assert groups["all[no_wd]"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    assert "txt_fc.bias" not in {names[id(p)] for g in groups.values() for p in g["params"]}
    assert {names[id(p)] for p in groups["all[no_wd]"]["params"]} == {"img_fc.bias"}
    opt = build_optimizer(m, cfg)
    assert isinstance(opt, torch.optim.Adam)
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        build_param_groups(m, TrainConfig(lr_mults={"bert.*": 0.1}))
    with pytest.raises(ConfigError, match="match no parameter"):
        apply_freeze(toy(), ["nope.*"])


def test_model_param_groups_keep_their_ratio_through_decay():
    m = toy()
    m.param_groups = lambda lr: [{"params": list(m.txt_fc.parameters()) + list(m.word_emb.parameters()), "lr": lr,
                                  "name": "text"},
                                 {"params": list(m.img_fc.parameters()), "lr": lr * 0.1, "name": "image"}]
    cfg = TrainConfig(lr=1e-3, schedule="step", lr_decay_epochs=[2], lr_decay_factor=0.1)
    opt = build_optimizer(m, cfg)
    sched = LRSchedule(opt, cfg, steps_per_epoch=5)
    sched.apply(9)  # epoch 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    sched.apply(10)  # epoch 2: both x 0.1, ratio kept
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-5])


def test_cosine_schedule_with_warmup():
    m = toy()
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1, epochs=2)
    sched = LRSchedule(build_optimizer(m, cfg), cfg, steps_per_epoch=12)
    f = [sched.factor(s) for s in range(24)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[-1] > 0.1 and sched.factor(24) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[14] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))


def test_train_config_is_validated():
    with pytest.raises(ConfigError, match="divisible"):
        TrainConfig.from_dict({"batch_size": 10, "accum_steps": 4})
    with pytest.raises(ConfigError, match="unknown config field 'train.lr_sched'"):
        from itmzoo.config import config_from_dict

        config_from_dict(TrainConfig, {"lr_sched": 1}, prefix="train.")
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig.from_dict({"amp": "fp8"})


# -- loader -----------------------------------------------------------------------------------------

def test_rank_batches_make_up_the_single_process_batch_and_resume_skips():
    one = ResumableBatchSampler(100, 8, seed=5)
    ranks = [ResumableBatchSampler(100, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(3)
    single = [set(b) for _, _, b in one]
    split = [set(a) | set(b) for (_, _, a), (_, _, b) in zip(*ranks)]
    assert single == split and len(single) == 12
    one.set_epoch(3, start=7)
    assert [set(b) for _, _, b in one] == single[7:]
    one.set_epoch(4)
    assert [set(b) for _, _, b in one] != single  # a new permutation each epoch


def test_keeping_the_last_partial_batch():
    keep = ResumableBatchSampler(10, 4, seed=1, drop_last=False)
    keep.set_epoch(2)
    batches = [b for _, _, b in keep]
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    drop = ResumableBatchSampler(10, 4, seed=1)
    drop.set_epoch(2)
    assert [b for _, _, b in drop] == batches[:2]          # the same order, the tail dropped
    keep.set_epoch(2, start=2)
    assert [b for _, _, b in keep] == batches[2:]          # resuming lands on the partial batch
    # two ranks: the items are padded so both ranks hold equal batches, every item is seen
    ranks = [ResumableBatchSampler(11, 2, seed=1, rank=r, world_size=2, drop_last=False) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    per_rank = [[b for _, _, b in r] for r in ranks]
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]] == [2, 2, 2]
    assert set(sum(per_rank[0] + per_rank[1], [])) == set(range(11))
    # with accumulation the partial batch is the last micro-batch of an incomplete window (Lightning's rule)
    assert TrainConfig.from_dict({"batch_size": 8, "accum_steps": 2, "drop_last": False}).drop_last is False
    with pytest.raises(ConfigError, match="drop_last_window: true needs train.drop_last: true"):
        TrainConfig.from_dict({"drop_last": False, "drop_last_window": True})


def test_fit_trains_on_the_last_partial_batch(data, tmp_path):
    tr, dv = data                                          # 32 images x 5 captions = 160 pairs
    r = fit(toy(), tr, {"epochs": 1, "batch_size": 48, "drop_last": False, **QUIET}, dv, out_dir=tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert r.steps == 4 and recs[0]["steps_per_epoch"] == 4   # 48 + 48 + 48 + 16


def test_data_randomness_is_fixed_per_batch_not_per_worker(data):
    tr, _ = data
    m = toy()

    class NoisyTokenizer:  # a training tokenizer that draws from the global RNGs, like ESA's word masking
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, caps, train=False):
            out = self.inner(caps, train)
            if train:
                out["noise"] = torch.tensor([random.random() + np.random.rand() + float(torch.rand(())) for _ in caps])
            return out

    m._tokenizer = NoisyTokenizer(m._tokenizer)
    before = capture_rng()
    a = list(make_train_loader(tr, m, 16, seed=1))
    after = capture_rng()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    b = list(make_train_loader(tr, m, 16, seed=1, num_workers=2))
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        assert torch.equal(x["noise"], y["noise"]) and torch.equal(x["image_index"], y["image_index"])
    loader = make_train_loader(tr, m, 16, seed=1)
    loader.sampler.set_epoch(0, start=6)
    assert all(torch.equal(x["noise"], y["noise"]) for x, y in zip(a[6:], loader))


def test_rng_capture_round_trip():
    state = capture_rng()
    x = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    y = (random.random(), np.random.rand(), torch.rand(3))
    assert x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2])


# -- runs -------------------------------------------------------------------------------------------

def test_same_seed_same_run_and_logs(data, tmp_path):
    tr, dv = data
    cfg = {"epochs": 2, "batch_size": 16, "lr": 1e-2, "deterministic": True, **QUIET}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.jsonl").write_text('{"type": "step", "loss": 1.0}\n')  # an earlier attempt's records
    r1 = fit(toy(), tr, cfg, dv, out_dir=tmp_path / "a")
    fit(toy(), tr, cfg, dv, out_dir=tmp_path / "b")
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")
    assert len(step_losses(tmp_path / "a")) == r1.steps == 2 * 10
    recs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert recs[0]["type"] == "start" and recs[0]["steps_per_epoch"] == 10
    epochs = [r for r in recs if r["type"] == "epoch"]
    # epochs count from 1 in the log, as in the printed lines
    assert [e["epoch"] for e in epochs] == [1, 2] and all("rsum" in e["dev"] for e in epochs)
    step = next(r for r in recs if r["type"] == "step")
    assert {"loss", "lr", "grad_norm", "samples_per_s", "epoch", "batch"} <= set(step) and step["epoch"] == 1


def test_best_checkpoint_follows_dev_rsum(data, tmp_path):
    tr, dv = data
    res = fit(toy(), tr, {"epochs": 3, "batch_size": 16, "lr": 1e-2, **QUIET}, dv, out_dir=tmp_path)
    rsums = [e["dev"]["rsum"] for e in res.history]
    assert res.best_metric == max(rsums) and res.best_epoch == int(np.argmax(rsums)) + 1
    meta = json.loads((tmp_path / "best" / "config.json").read_text())
    assert meta["extra"]["epoch"] == res.best_epoch
    assert meta["extra"]["rsum"] == pytest.approx(res.best_metric, rel=1e-9)
    best = itmzoo.load(tmp_path / "best")
    assert itmzoo.evaluate(best, dv, progress=False)["rsum"] == pytest.approx(res.best_metric)
    assert find_checkpoint(tmp_path) == tmp_path / "last"


def test_epoch_and_step_hooks_drive_the_loss(data):
    tr, _ = data
    m = toy(warmup_epochs=1)
    calls = []
    m.on_step_start = lambda epoch, step, n: calls.append((epoch, step, n))
    seen = []
    orig = m.train_loss

    def spy(feats, batch):
        seen.append((m.epoch, m.epoch >= m.config.warmup_epochs))
        return orig(feats, batch)

    m.train_loss = spy
    fit(m, tr, {"epochs": 2, "batch_size": 16, "progress": False})
    assert calls[0] == (0, 0, 10) and calls[-1] == (1, 9, 10) and len(calls) == 20
    assert seen[0] == (0, False) and seen[-1] == (1, True)  # all negatives in epoch 0, hardest afterwards


def test_cached_accumulation_equals_the_full_batch(data):
    tr, _ = data
    cfg = {"epochs": 1, "batch_size": 32, "lr": 1e-2, "max_steps": 3, "progress": False}
    full, acc = toy(), toy()
    r1 = fit(full, tr, cfg)
    r4 = fit(acc, tr, {**cfg, "accum_steps": 4})
    assert r1.steps == r4.steps == 3
    for (n, p), q in zip(full.named_parameters(), acc.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), n


def test_accumulation_is_refused_for_a_batch_dependent_loss_without_the_split(data):
    tr, _ = data
    m = toy()
    m.accumulation = "refuse"  # as a model that only has forward()
    with pytest.raises(ConfigError, match="depends on the whole batch"):
        fit(m, tr, {"epochs": 1, "batch_size": 16, "accum_steps": 2, "progress": False})


def test_naive_accumulation_for_a_per_pair_loss_averages_micro_batches(data):
    tr, _ = data

    def per_pair(model):
        model.accumulation = "naive"

        def forward(batch):  # a mean over pairs: no other item in the batch matters
            img, txt = model.encode_image(batch), model.encode_text(batch)
            return {"loss": (1 - (img * txt).sum(1)).mean()}

        model.forward = forward
        return model

    cfg = {"epochs": 1, "batch_size": 16, "lr": 1e-2, "max_steps": 2, "progress": False}
    a, b = per_pair(toy()), per_pair(toy())
    fit(a, tr, cfg)
    fit(b, tr, {**cfg, "accum_steps": 2})
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    tr, _ = data
    m = toy()
    orig = m.forward
    count = [0]

    def forward(batch):
        count[0] += 1
        out = orig(batch)
        return {"loss": out["loss"] * float("nan")} if count[0] == 5 else out

    m.forward = forward
    expected = (r"non-finite loss \(nan\) at epoch 1, batch 5 of 10 \(optimizer step 5\)"
                r".*last good checkpoint is .*last \(after step 4\)")
    with pytest.raises(NonFiniteLossError, match=expected):
        fit(m, tr, {"epochs": 2, "batch_size": 16, "ckpt_every": 2, **QUIET}, out_dir=tmp_path)
    state = torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in m.parameters())  # the bad step was never applied
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["type"] == "error" and last["step"] == 5


def test_amp_request_on_cpu_trains_in_fp32(data, capsys):
    tr, _ = data
    res = fit(toy(), tr, {"epochs": 1, "batch_size": 16, "amp": "bf16", "max_steps": 1, "progress": True})
    assert res.steps == 1 and "needs CUDA" in capsys.readouterr().out


@pytest.mark.cuda
def test_cuda_amp_bf16_and_fp16_train(data):
    tr, dv = data
    for amp in ("bf16", "fp16"):
        res = fit(toy(), tr, {"epochs": 1, "batch_size": 16, "amp": amp, "progress": False}, dv)
        assert res.steps == 10 and math.isfinite(res.history[-1]["train_loss"])


def test_tensorboard_without_the_package_is_a_clear_error(data, tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    tr, _ = data
    with pytest.raises(ImportError, match="pip install tensorboard"):
        fit(toy(), tr, {"epochs": 1, "batch_size": 16, "tensorboard": True, "progress": False}, out_dir=tmp_path)


@pytest.mark.parametrize("drop_last, window, grads, steps", [
    (True, None, [1.5, 1.5], 1),  # 10 captions in micro-batches of 3: 3 full batches, one whole window of 2
    (False, None, [1.5, 1.5, 1.5, 0.5], 2),  # the last batch of 1 is kept and its incomplete window steps
    (True, False, [1.5, 1.5, 1.5], 2),  # the batch of 1 is dropped, the window of one full batch steps
])
def test_naive_accumulation_keeps_the_last_batch_and_divides_by_accum_steps(drop_last, window, grads, steps):
    """Lightning's rule: every micro-batch loss is divided by accum_steps, also in an incomplete window."""
    split = SyntheticShapes({"train": 2}, region_dim=24, num_regions=5).split("train")  # 10 captions
    model = toy()
    model.accumulation = "naive"
    model.scale = torch.nn.Parameter(torch.ones(()))
    model.forward = lambda batch: {"loss": model.scale * len(batch["image_index"])}
    seen: list[float] = []
    model.scale.register_hook(lambda g: seen.append(float(g)))
    result = fit(model, split, {"epochs": 1, "batch_size": 6, "accum_steps": 2, "drop_last": drop_last,
                                "drop_last_window": window, "progress": False})
    assert result.steps == steps
    assert seen == pytest.approx(grads)


def test_cpu_threads_leave_room_for_loader_workers(monkeypatch):
    from itmzoo.train import cpu_threads as engine

    monkeypatch.setattr(engine, "_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        torch.set_num_threads(4)
        assert engine.cpu_threads_beside_workers(cpu, 1) == 3
        assert engine.cpu_threads_beside_workers(cpu, 6) == 1
        assert engine.cpu_threads_beside_workers(cpu, 0) is None
        assert engine.cpu_threads_beside_workers(torch.device("cuda"), 2) is None
        torch.set_num_threads(2)  # already fits beside 2 workers: the user's count stays
        assert engine.cpu_threads_beside_workers(cpu, 2) is None
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # an explicit choice is kept
        assert engine.cpu_threads_beside_workers(cpu, 1) is None
    finally:
        torch.set_num_threads(before)
