"""CPU work on threads (itmzoo.threads), block-parallel scoring, and the training thread tuner."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import itmzoo
from itmzoo.data.synthetic import SYNTHETIC_VOCAB, SyntheticShapes
from itmzoo.eval.similarity import similarity_matrix
from itmzoo.threads import block_threads, in_block_worker, map_blocks, run_blocks
from itmzoo.train import fit
from itmzoo.train.cpu_threads import ThreadTuner, candidate_counts, plan_cpu_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# -- itmzoo.threads ---------------------------------------------------------------------------------

def test_run_blocks_shares_items_one_torch_thread_each_and_restores_the_count(two_threads):
    seen: dict[int, tuple[str, int, bool, bool]] = {}

    def work(k: int, state: list[int]) -> None:
        state.append(k)
        seen[k] = (threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled(),
                   in_block_worker())

    with torch.no_grad():
        states = run_blocks(range(40), work, 2, list)
    assert len(states) == 2 and sorted(k for st in states for k in st) == list(range(40))
    assert {s[1:] for s in seen.values()} == {(1, False, True)}  # one torch thread, caller's grad mode, inside
    assert torch.get_num_threads() == 2 and not in_block_worker()
    # one thread or one item: the caller's thread, with its settings
    states = run_blocks(range(3), work, 1, list)
    assert states == [[0, 1, 2]] and seen[0][1] == 2 and seen[0][0] == threading.current_thread().name


def test_run_blocks_raises_the_first_error_and_stops_taking_items(two_threads):
    done = []

    def work(k: int, _state: None) -> None:
        if k == 3:
            raise ValueError("block 3 is bad")
        done.append(k)

    with pytest.raises(ValueError, match="block 3 is bad"):
        run_blocks(range(1000), work, 2)
    assert len(done) < 999 and torch.get_num_threads() == 2


def test_map_blocks_keeps_order_and_nested_blocks_run_in_sequence(two_threads):
    def inner(k: int) -> tuple[int, int]:
        return k * k, block_threads(8)  # inside a block: nested work gets one thread

    out = map_blocks(inner, list(range(10)), 2)
    assert [v for v, _ in out] == [k * k for k in range(10)] and {n for _, n in out} == {1}
    assert block_threads(8) == 2 and block_threads(1) == 1 and block_threads(8, 5) == 5


def test_tiled_scores_equal_the_sequential_ones_and_do_not_depend_on_the_thread_count(two_threads):
    torch.manual_seed(0)
    model = itmzoo.build("toy_vse", embed_size=64).eval()
    img = torch.nn.functional.normalize(torch.randn(50, 64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(230, 64), dim=-1)
    one = similarity_matrix(model, img, txt, block=(16, 40), progress=False, num_threads=1)
    two = similarity_matrix(model, img, txt, block=(16, 40), progress=False, num_threads=2)
    three = similarity_matrix(model, img, txt, block=(16, 40), progress=False, num_threads=3)
    torch.testing.assert_close(two, img @ txt.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)
    assert torch.equal(two, three)  # every tile is computed by one thread, whichever


def test_lhsc_caption_groups_on_threads_equal_one_sequence(two_threads):
    torch.manual_seed(0)
    model = itmzoo.build("lhsc", embed_size=32, sim_dim=16, img_dim=24, word_dim=16, num_regions=5,
                         vocab_size=40, sim_group_tokens=20).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 12, (30,), generator=g)
    mask = torch.arange(12)[None] < lengths[:, None]
    with torch.no_grad():
        regions = torch.nn.functional.normalize(torch.randn(7, 5, 32, generator=g), dim=-1)
        tokens = torch.nn.functional.normalize(torch.randn(30, 12, 32, generator=g), dim=-1) * mask[..., None]
        img = {"regions": regions, "global": model.sim_enc.v_global_w(regions)}
        txt = {"tokens": tokens, "mask": mask, "global": model.sim_enc.t_global_w(tokens, mask)}
        par = model.similarity(img, txt)  # groups of ~20 words on 2 threads
        torch.set_num_threads(1)
        seq = model.similarity(img, txt)
    torch.testing.assert_close(par, seq, rtol=0, atol=1e-6)


def test_models_that_draw_while_scoring_are_scored_in_tile_order(two_threads):
    from itmzoo.eval.similarity import scoring_threads
    from itmzoo.models.base import EvalSettings

    model = itmzoo.build("toy_vse", embed_size=8)
    assert scoring_threads(model, torch.device("cpu"), 10, None) == 2
    model.eval_settings = lambda: EvalSettings(seed=3)  # e.g. SCTA's reference mode
    assert scoring_threads(model, torch.device("cpu"), 10, None) == 1
    assert scoring_threads(itmzoo.build("toy_vse", embed_size=8), torch.device("cuda"), 10, None) == 1


# -- the training thread tuner ----------------------------------------------------------------------

def drive(tuner: ThreadTuner, seconds_at, steps: int) -> list[int]:
    """Run `steps` fake steps whose time is ``seconds_at(threads, step)``; the thread count of each."""
    used = []
    for i in range(steps):
        n = tuner.next_threads()
        used.append(n)
        tuner.record(seconds_at(n, i))
    return used


def test_tuner_keeps_the_faster_count_and_follows_a_change_of_load():
    choices = []
    tuner = ThreadTuner(2, probe_steps=3, first_interval=10, warmup_steps=2,
                        on_choice=lambda n, med, changed: choices.append((n, med, changed)))
    assert candidate_counts(2) == [2, 1] and candidate_counts(12) == [12, 6, 3, 1]
    free = {2: 0.10, 1: 0.14}   # a machine of its own: 2 threads win
    busy = {2: 0.40, 1: 0.15}   # another process holds a core: 1 thread wins
    used = drive(tuner, lambda n, i: free[n], 8)
    assert used == [2, 2, 2, 1, 2, 1, 2, 1]  # warm-up, then interleaved probes
    assert choices == [(2, {2: 0.10, 1: 0.14}, True)] and tuner.threads == 2  # the first choice is news
    assert set(drive(tuner, lambda n, i: free[n], 5)) == {2}  # no probe before the interval
    # the load arrives: once the median of the last 3 steps is 4x the measured time, a probe starts at
    # once (not at the interval) and picks 1 thread
    used = drive(tuner, lambda n, i: busy[n], 2 + 6 + 5)
    assert used[:2] == [2, 2] and sorted(used[2:8]) == [1, 1, 1, 2, 2, 2] and set(used[8:]) == {1}
    assert choices[-1][0] == 1 and choices[-1][2] and tuner.threads == 1
    # the same answer again doubles the interval between probes
    before = tuner.interval
    drive(tuner, lambda n, i: busy[n], tuner.interval - 5 + 6)
    assert tuner.threads == 1 and tuner.interval == 2 * before and choices[-1][2] is False  # no news


def test_thread_plan_respects_explicit_choices(monkeypatch):
    from itmzoo.train import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "_cores", lambda: 4)
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        plan = plan_cpu_threads(cpu, None, 0)
        assert plan.threads is None and plan.tuner.candidates == [4, 2, 1]
        plan = plan_cpu_threads(cpu, None, 1)  # beside a loader worker: at most 3
        assert plan.threads == 3 and plan.tuner.candidates == [3, 1]
        assert plan_cpu_threads(cpu, 2, 0).threads == 2 and plan_cpu_threads(cpu, 2, 0).tuner is None
        assert plan_cpu_threads(cpu, None, 0, deterministic=True).tuner is None
        assert plan_cpu_threads(cpu, None, 0, world=2).tuner is None
        assert plan_cpu_threads(torch.device("cuda"), None, 0).tuner is None
        assert plan_cpu_threads(cpu, None, 3).tuner is None  # one thread left: nothing to choose
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        plan = plan_cpu_threads(cpu, None, 0)
        assert plan.threads is None and plan.tuner is None and "OMP_NUM_THREADS" in plan.why
    finally:
        torch.set_num_threads(before)


def test_training_logs_its_thread_choices_and_restores_the_count(two_threads, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # an explicit count would fix the threads
    ds = SyntheticShapes({"train": 48, "dev": 12}, region_dim=24, num_regions=5)
    torch.manual_seed(0)
    model = itmzoo.build("toy_vse", img_dim=24, embed_size=16, word_dim=16, hash_buckets=97)
    fit(model, ds.split("train"), {"epochs": 1, "batch_size": 4, "progress": False}, ds.split("dev"),
        out_dir=tmp_path / "auto", verbose=False)
    recs = [json.loads(line) for line in (tmp_path / "auto" / "log.jsonl").read_text().splitlines()]
    chosen = [r for r in recs if r["type"] == "cpu_threads"]
    assert chosen and chosen[0]["threads"] in (1, 2) and set(chosen[0]["step_seconds"]) == {"1", "2"}
    assert chosen[0]["step"] == 2 + 2 * 3  # after the warm-up steps and the interleaved probe
    assert torch.get_num_threads() == 2
    fit(model, ds.split("train"), {"epochs": 1, "batch_size": 4, "progress": False, "cpu_threads": 1},
        ds.split("dev"), out_dir=tmp_path / "fixed", verbose=False)
    recs = [json.loads(line) for line in (tmp_path / "fixed" / "log.jsonl").read_text().splitlines()]
    assert not [r for r in recs if r["type"] == "cpu_threads"] and torch.get_num_threads() == 2


def test_batches_encoded_on_threads_come_back_in_loader_order(two_threads):
    from itmzoo.data.collate import eval_loaders
    from itmzoo.eval.similarity import encode_batches

    torch.manual_seed(0)
    model = itmzoo.build("lhsc", embed_size=32, sim_dim=16, img_dim=24, word_dim=16, num_regions=5,
                         vocab_path=str(SYNTHETIC_VOCAB), vocab_size=74).eval()
    split = SyntheticShapes({"test": 20}, region_dim=24, num_regions=5).split("test")
    images, captions = eval_loaders(split, model, batch_size=7)
    for fn, loader in ((model.encode_image, images), (model.encode_text, captions)):
        runs = [encode_batches(fn, loader, torch.device("cpu"), num_threads=n) for n in (1, 2, 3)]
        # batches from a plain iterator (no length) are shared the same way
        unsized = encode_batches(fn, (b for b in loader), torch.device("cpu"), num_threads=2)
        for k in runs[0]:
            torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=1e-6)
            assert torch.equal(runs[1][k], runs[2][k])  # each batch is encoded by one thread, whichever
            assert torch.equal(unsized[k], runs[1][k])
