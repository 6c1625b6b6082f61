"""Recall metrics against the VSE++/SCAN/VSE-infinity definitions."""

import numpy as np
import pytest
import torch

from itmzoo.eval import ensemble_similarity, metrics_from_sims, recall_metrics, retrieval_ranks
from itmzoo.eval.reference import reference_ranks, seeded_sims


def reference_i2t_t2i(sims: np.ndarray):
    r_i2t, r_t2i = reference_ranks(sims)

    def summary(r):
        recalls = [100.0 * len(np.where(r < k)[0]) / len(r) for k in (1, 5, 10)]
        return recalls + [np.floor(np.median(r)) + 1, r.mean() + 1]

    return r_i2t, r_t2i, summary(r_i2t), summary(r_t2i)


seeded = seeded_sims


def as_tuple(m, d):
    return [m[f"{d}_r1"], m[f"{d}_r5"], m[f"{d}_r10"], m[f"{d}_medr"], m[f"{d}_meanr"]]


def test_worked_example_a():
    S = np.array([[0.90, 0.10, 0.20, 0.30, 0.40, 0.95, 0.50, 0.60, 0.05, 0.00],
                  [0.80, 0.70, 0.75, 0.85, 0.60, 0.20, 0.10, 0.30, 0.65, 0.50]])
    c2i = np.arange(10) // 5
    i2t, t2i = retrieval_ranks(S, c2i)
    assert i2t.tolist() == [1, 4]
    assert t2i.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    m = recall_metrics(S, c2i)
    assert as_tuple(m, "i2t") == [0.0, 100.0, 100.0, 3.0, 3.5]
    assert as_tuple(m, "t2i") == pytest.approx([30.0, 100.0, 100.0, 2.0, 1.7])
    assert m["rsum"] == pytest.approx(430.0)


@pytest.mark.parametrize("seed,n,mu,i2t,t2i,rsum", [
    (1234, 100, 2.0, [59.0, 81.0, 91.0, 1, 3.99], [31.8, 60.6, 73.4, 4, 8.98], 396.8),
])
def test_seeded_matrix_matches_spec_table(seed, n, mu, i2t, t2i, rsum):
    S = seeded(seed, n, mu)
    m = recall_metrics(S, np.arange(5 * n) // 5)
    assert as_tuple(m, "i2t") == pytest.approx(i2t, abs=1e-9)
    assert as_tuple(m, "t2i") == pytest.approx(t2i, abs=1e-9)
    assert m["rsum"] == pytest.approx(rsum, abs=1e-9)


def test_ensemble_and_fold5_match_spec_table():
    a, b = seeded(1234, 100, 2.0), seeded(5678, 100, 2.0)
    ens = ensemble_similarity([a, b])
    c2i = np.arange(500) // 5
    m = metrics_from_sims(ens, c2i, "full")
    assert as_tuple(m, "i2t") == pytest.approx([84.0, 99.0, 100.0, 1, 1.28], abs=1e-9)
    assert as_tuple(m, "t2i") == pytest.approx([57.8, 85.6, 94.2, 1, 3.38], abs=1e-9)
    m5 = metrics_from_sims(ens, c2i, "5fold")
    assert m5["n_folds"] == 5 and len(m5["folds"]) == 5
    assert as_tuple(m5, "i2t") == pytest.approx([98.0, 100, 100, 1, 1.02], abs=1e-9)
    assert as_tuple(m5, "t2i") == pytest.approx([77.8, 97.6, 99.8, 1, 1.48], abs=1e-9)
    assert m5["rsum"] == pytest.approx(573.2, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_brute_force_reference_on_random_tie_free(seed):
    S = np.random.default_rng(seed).standard_normal((40, 200))
    r_i2t, r_t2i, s_i2t, s_t2i = reference_i2t_t2i(S)
    i2t, t2i = retrieval_ranks(S, np.arange(200) // 5)
    np.testing.assert_array_equal(i2t.numpy(), r_i2t)
    np.testing.assert_array_equal(t2i.numpy(), r_t2i)
    m = recall_metrics(S, np.arange(200) // 5)
    assert as_tuple(m, "i2t") == pytest.approx(s_i2t, abs=1e-12)
    assert as_tuple(m, "t2i") == pytest.approx(s_t2i, abs=1e-12)


def test_float32_torch_input_gives_same_ranks():
    S = np.random.default_rng(7).standard_normal((30, 150))
    a = retrieval_ranks(S, np.arange(150) // 5)
    b = retrieval_ranks(torch.tensor(S, dtype=torch.float32), torch.arange(150) // 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_any_number_of_captions_per_image():
    rng = np.random.default_rng(3)
    counts = [1, 3, 5, 7, 2, 6]
    c2i = np.repeat(np.arange(6), counts)
    rng.shuffle(c2i)  # captions need not be grouped
    S = rng.standard_normal((6, len(c2i)))
    i2t, t2i = retrieval_ranks(S, c2i)
    for i in range(6):
        gt = np.flatnonzero(c2i == i)
        order = np.argsort(-S[i])
        assert i2t[i] == min(np.flatnonzero(np.isin(order, [g]))[0] for g in gt)
    for j in range(len(c2i)):
        assert t2i[j] == int((S[:, j] > S[c2i[j], j]).sum())


def test_ties_follow_documented_rule():
    S = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.5, 0.2, 0.2, 0.2, 0.2],
                  [0.5, 0.3, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4]])
    c2i = np.arange(10) // 5
    i2t, t2i = retrieval_ranks(S, c2i, tie_mode="optimistic")
    assert i2t[0] == 0 and t2i[0] == 0  # equal scores do not count as ranked above
    i2t, t2i = retrieval_ranks(S, c2i, tie_mode="pessimistic")
    assert i2t[0] == 1 and t2i[0] == 1  # equal scores of other items do
    # the spec's `ties` case: strictly-greater count gives i2t R@1 = 64.0
    ties = np.round(seeded(1234, 100, 2.0) * 2) / 2
    m = recall_metrics(ties, np.arange(500) // 5)
    assert m["i2t_r1"] == 64.0
    mp = recall_metrics(ties, np.arange(500) // 5, tie_mode="pessimistic")
    assert mp["rsum"] < m["rsum"]
    # pessimistic i2t: negatives tying with the best positive rank above it (other positives do not);
    # the spec's plain ">=" count (41.0) also puts tying positives above, which is not a retrieval error
    i2t_p, _ = retrieval_ranks(ties, np.arange(500) // 5, tie_mode="pessimistic")
    for i in range(100):
        best = ties[i, 5 * i:5 * i + 5].max()
        neg = np.delete(ties[i], np.arange(5 * i, 5 * i + 5))
        assert i2t_p[i] == int((neg >= best).sum())


def test_non_finite_similarities_raise():
    S = np.random.default_rng(0).standard_normal((2, 10))
    S[1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        recall_metrics(S, np.arange(10) // 5)


def test_threads_and_blocks_do_not_change_ranks():
    # the CPU pass shares row blocks between threads; any split gives the ranks of a single block,
    # with ties, uneven caption counts, float16 and both tie modes
    rng = np.random.default_rng(5)
    c2i = np.sort(np.r_[np.arange(37), rng.integers(0, 37, 120)])
    S = np.round(rng.standard_normal((37, c2i.size)), 1)
    for dtype in (torch.float64, torch.float32, torch.float16):
        St = torch.as_tensor(S).to(dtype)
        for mode in ("optimistic", "pessimistic"):
            want = retrieval_ranks(St, c2i, tie_mode=mode, chunk=37, num_threads=1)
            for chunk, threads in ((1, 4), (3, 2), (5, 3)):
                got = retrieval_ranks(St, c2i, tie_mode=mode, chunk=chunk, num_threads=threads)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, mode, chunk)
    # against the definition: count of captions/images scoring strictly higher, or >= for pessimistic
    i2t, t2i = retrieval_ranks(S, c2i, chunk=2, num_threads=3)
    for j in range(c2i.size):
        assert t2i[j] == int((S[:, j] > S[c2i[j], j]).sum())
    for i in range(37):
        assert i2t[i] == int((S[i] > S[i, c2i == i].max()).sum())


def test_non_finite_raises_from_a_worker_thread():
    S = np.random.default_rng(0).standard_normal((40, 200))
    S[33, 7] = np.inf
    with pytest.raises(ValueError, match=r"non-finite.*\[33, 7\]"):
        retrieval_ranks(S, np.arange(200) // 5, chunk=2, num_threads=3)


@pytest.mark.parametrize("c2i,match", [
    (np.arange(9) // 5, "one entry per caption"),
    (np.r_[np.zeros(5, int), np.full(5, 7)], "must lie in"),
    (np.zeros(10, int), "at least one caption"),
])
def test_bad_caption_to_image_raises(c2i, match):
    with pytest.raises(ValueError, match=match):
        recall_metrics(np.zeros((2, 10)), c2i)


def test_fold_protocol_equals_evaluating_folds_separately():
    S = np.random.default_rng(11).standard_normal((50, 250))
    c2i = np.arange(250) // 5
    m5 = metrics_from_sims(S, c2i, "5fold")
    rows = [recall_metrics(S[10 * k:10 * k + 10, 50 * k:50 * k + 50], np.arange(50) // 5) for k in range(5)]
    for key in ("i2t_r1", "t2i_r5", "i2t_medr", "t2i_meanr", "rsum"):
        assert m5[key] == pytest.approx(np.mean([r[key] for r in rows]))
    assert metrics_from_sims(S, c2i, "full")["rsum"] != m5["rsum"]


def test_named_protocols_check_split_size():
    with pytest.raises(ValueError, match="expects a split of 5000 images"):
        metrics_from_sims(np.zeros((10, 50)), np.arange(50) // 5, "coco-1k-5fold")
    with pytest.raises(ValueError, match="unknown protocol"):
        metrics_from_sims(np.zeros((10, 50)), np.arange(50) // 5, "coco-2k")


@pytest.mark.slow
def test_coco_5k_and_1k_folds_match_spec_table():
    n = 5000
    S = seeded_sims(2021, n, 3.0)
    c2i = np.arange(5 * n) // 5
    St = torch.from_numpy(S)
    m1 = metrics_from_sims(St, c2i, "coco-1k-5fold")
    assert as_tuple(m1, "i2t") == pytest.approx([73.84, 94.54, 97.66, 1, 1.995], abs=1e-9)
    assert as_tuple(m1, "t2i") == pytest.approx([41.504, 65.128, 74.268, 2, 18.438], abs=1e-9)
    assert m1["rsum"] == pytest.approx(446.94, abs=1e-9)
    m5 = metrics_from_sims(St, c2i, "coco-5k")
    assert as_tuple(m5, "i2t") == pytest.approx([54.38, 80.38, 88.04, 1, 5.9208], abs=1e-9)
    assert as_tuple(m5, "t2i") == pytest.approx([26.264, 45.364, 54.132, 8, 88.33676], abs=1e-9)
    assert m5["rsum"] == pytest.approx(348.56, abs=1e-9)


def test_torch_pass_used_on_cuda_gives_the_cpu_ranks(monkeypatch):
    # the CUDA code path (torch ops over large blocks), run on the CPU, against the threaded numpy pass
    from itmzoo.eval import recall

    rng = np.random.default_rng(9)
    c2i = np.sort(np.r_[np.arange(23), rng.integers(0, 23, 60)])
    S = torch.as_tensor(np.round(rng.standard_normal((23, c2i.size)), 1))
    want = {m: retrieval_ranks(S, c2i, tie_mode=m, chunk=4, num_threads=2) for m in ("optimistic", "pessimistic")}
    monkeypatch.setattr(recall, "_ranks_cpu", lambda S, pos, best, strict, chunk, i2t, t2i, n:
                        recall._ranks_torch(S, pos, best, strict, chunk, i2t, t2i))
    for mode, (i2t, t2i) in want.items():
        got = retrieval_ranks(S, c2i, tie_mode=mode, chunk=4)
        assert torch.equal(got[0], i2t) and torch.equal(got[1], t2i), mode


def test_fold_ranks_rank_each_fold_within_itself_and_each_direction_on_its_matrix():
    from types import SimpleNamespace

    from itmzoo.eval import DirectionalScores, fold_ranks, retrieval_ranks

    g = torch.Generator().manual_seed(0)
    c2i = torch.arange(50) // 5
    split = SimpleNamespace(caption_to_image=c2i.numpy(), num_images=10, num_captions=50)
    a, b = torch.randn(10, 50, generator=g), torch.randn(10, 50, generator=g)
    blocks = [(slice(2 * k, 2 * k + 2), slice(10 * k, 10 * k + 10)) for k in range(5)]  # each fold's own matrix
    folds = fold_ranks([DirectionalScores(a[r, c], b[r, c]) for r, c in blocks], split, "5fold")
    assert len(folds) == 5
    for k, f in enumerate(folds):
        caps = torch.arange(10 * k, 10 * k + 10)
        assert f.first_image == 2 * k and f.captions.tolist() == caps.tolist()
        sub = c2i[caps] - 2 * k
        assert torch.equal(f.i2t, retrieval_ranks(a[blocks[k]], sub)[0])
        assert torch.equal(f.t2i, retrieval_ranks(b[blocks[k]], sub)[1])
    cut = fold_ranks(a, split, "5fold")  # a full matrix is cut into the folds, as metrics_from_sims cuts it
    assert [c.first_image for c in cut] == [0, 2, 4, 6, 8]
    for k, c in enumerate(cut):
        assert torch.equal(c.i2t, retrieval_ranks(a[blocks[k]], c2i[blocks[k][1]] - 2 * k)[0])
    whole = fold_ranks(a, split, "full")[0]  # one matrix serves both directions
    assert torch.equal(whole.i2t, retrieval_ranks(a, c2i)[0]) and torch.equal(whole.t2i, retrieval_ranks(a, c2i)[1])
