"""Two-stage evaluation (first stage, top k per query, second stage per direction, -100 elsewhere), the
`two_stage` composition model, and the evaluation options shared by evaluate / trainer / CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import itmzoo
from itmzoo.config import ConfigError, ModelConfig
from itmzoo.data.split import RetrievalSplit
from itmzoo.data.synthetic import SYNTHETIC_VOCAB
from itmzoo.eval import (
    DirectionalScores,
    EvalOptions,
    chance_metrics,
    evaluate,
    evaluate_ensemble,
    rank_metrics,
    retrieval_ranks,
)
from itmzoo.eval.rerank import FILL
from itmzoo.models.base import EvalSettings, ITMModel

ROOT = Path(__file__).resolve().parents[1]
VOCAB = SYNTHETIC_VOCAB
DIM, FIRST_DIMS = 6, 2


# ---------------------------------------------------------------------------------------------------
# a two-stage model whose stages are known functions of the data

class VecTokenizer:
    """Captions are written as numbers: "0.25 -1.5 ..." -> that vector."""

    def __call__(self, captions, train=False):
        return {"vec": torch.tensor([[float(x) for x in c.split()] for c in captions], dtype=torch.float32)}


def second_score(img: np.ndarray, txt: np.ndarray, direction: str) -> float:
    """Direction-dependent second stage (as Multi-SEA's): the full dot product, plus a per-image term for t2i."""
    return float(img @ txt) + (0.25 * float(img[0]) if direction == "t2i" else 0.0)


class KnownTwoStage(ITMModel):
    input_kind = "regions"
    scoring = "two-stage"

    def __init__(self, k: int | None = None, cross: bool = False) -> None:
        super().__init__(ModelConfig())
        self.k, self.calls = k, []
        if cross:  # the i2t second stage on every pair, as a plain cross model
            self.scoring = "cross"

    @property
    def tokenizer(self):
        return VecTokenizer()

    def image_transform_for(self, train):
        return lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32))

    def eval_settings(self):
        return EvalSettings(rerank_k=self.k)

    def encode_image(self, batch):
        return batch["regions"][:, 0, :]

    def encode_text(self, batch):
        return batch["vec"]

    def similarity(self, img, txt):
        if self.scoring == "cross":
            return img @ txt.t()  # == the i2t second stage on every pair
        return img[:, :FIRST_DIMS] @ txt[:, :FIRST_DIMS].t()

    def score_pairs(self, img, txt, image_index, text_index, direction):
        self.calls.append((direction, int(image_index.numel())))
        s = (img[image_index] * txt[text_index]).sum(-1)
        return s + 0.25 * img[image_index, 0] if direction == "t2i" else s


def _dyadic(rng: np.random.Generator, shape) -> np.ndarray:
    # multiples of 1/64: every product and sum here is exact in float32, in any order
    return rng.integers(-64, 65, size=shape) / 64.0


def _known_split(seed: int, n_img: int = 12) -> RetrievalSplit:
    """Images and captions as vectors with irregular captions per image and no score ties."""
    for attempt in range(100):
        rng = np.random.default_rng(seed * 1000 + attempt)
        counts = rng.integers(1, 5, size=n_img)
        c2i = np.repeat(np.arange(n_img), counts)
        img = _dyadic(rng, (n_img, DIM))
        txt = img[c2i] * 0.5 + _dyadic(rng, (len(c2i), DIM))
        txt = np.round(txt * 64) / 64
        first = img[:, :FIRST_DIMS] @ txt[:, :FIRST_DIMS].T
        full = img @ txt.T
        t2i = full + 0.25 * img[:, :1]
        if all(len(np.unique(m[i])) == m.shape[1] for m in (first, full) for i in range(n_img)) and \
                all(len(np.unique(m[:, j])) == n_img for m in (first, t2i) for j in range(len(c2i))):
            captions = [" ".join(str(float(x)) for x in row) for row in txt]
            return RetrievalSplit(images=[row[None, :].astype(np.float32) for row in img], captions=captions,
                                  caption_to_image=c2i, name=f"known{seed}")
    raise AssertionError("no tie-free split found")


def _brute_force_ranks(split: RetrievalSplit, k: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Upstream's loops, written out: per query, top k by the first stage, second stage on those, -100
    elsewhere, rank = items scoring strictly higher than the ground truth."""
    img = np.stack([np.asarray(x, dtype=np.float64)[0] for x in split.images])
    txt = np.array([[float(v) for v in c.split()] for c in split.captions])
    c2i = split.caption_to_image
    first = img[:, :FIRST_DIMS] @ txt[:, :FIRST_DIMS].T
    n_img, n_txt = first.shape
    i2t, t2i, outside_i2t, outside_t2i = [], [], 0, 0
    for i in range(n_img):
        cand = np.argsort(-first[i])[:k]
        row = np.full(n_txt, FILL)
        for j in cand:
            row[j] = second_score(img[i], txt[j], "i2t")
        gts = np.flatnonzero(c2i == i)
        outside_i2t += not set(gts) & set(cand)
        i2t.append(min(int((row > row[g]).sum()) for g in gts))
    for j in range(n_txt):
        cand = np.argsort(-first[:, j])[:k]
        col = np.full(n_img, FILL)
        for i in cand:
            col[i] = second_score(img[i], txt[j], "t2i")
        outside_t2i += c2i[j] not in cand
        t2i.append(int((col > col[c2i[j]]).sum()))
    return np.array(i2t), np.array(t2i), outside_i2t, outside_t2i


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 5)])
def test_two_stage_ranks_equal_a_brute_force_loop(seed, k):
    split = _known_split(seed)
    model = KnownTwoStage(k=k)
    res = evaluate(model, split, progress=False, return_sims=True, pair_batch_size=7)
    bf_i2t, bf_t2i, out_i2t, out_t2i = _brute_force_ranks(split, k)
    assert out_i2t > 0 and out_t2i > 0  # some ground truths fall outside the top k
    sims = res["sims"]
    assert isinstance(sims, DirectionalScores)
    i2t = retrieval_ranks(sims.i2t, split.caption_to_image)[0].numpy()
    t2i = retrieval_ranks(sims.t2i, split.caption_to_image)[1].numpy()
    np.testing.assert_array_equal(i2t, bf_i2t)
    np.testing.assert_array_equal(t2i, bf_t2i)
    for d, r in (("i2t", bf_i2t), ("t2i", bf_t2i)):
        for key, v in rank_metrics(r).items():
            assert res[f"{d}_{key}"] == v
    # only the top k of each query were re-scored, in batches of whole queries (7 // k per call)
    n_img, n_txt = sims.i2t.shape
    ts = res["two_stage"]
    assert ts["rerank_k"] == k and ts["k_i2t"] == k and ts["k_t2i"] == k
    assert ts["second_stage_pairs"] == (n_img + n_txt) * k == sum(n for _, n in model.calls)
    assert max(n for _, n in model.calls) <= max(7 // k, 1) * k
    assert ((sims.i2t > FILL).sum(1) == k).all() and ((sims.t2i > FILL).sum(0) == k).all()
    assert set(ts["first_stage"]) >= {"i2t_r1", "rsum"}


def test_k_at_least_the_gallery_equals_plain_cross_scoring():
    split = _known_split(2)
    big = evaluate(KnownTwoStage(k=1000), split, progress=False, return_sims=True)
    cross = evaluate(KnownTwoStage(cross=True), split, progress=False, return_sims=True)
    assert big["two_stage"]["k_i2t"] == split.num_captions and big["two_stage"]["k_t2i"] == split.num_images
    torch.testing.assert_close(big["sims"].i2t, cross["sims"], rtol=0, atol=0)
    for key in ("i2t_r1", "i2t_r5", "i2t_medr", "i2t_meanr"):
        assert big[key] == cross[key]
    # t2i differs from the cross model only by the per-image term of the t2i second stage
    img0 = torch.tensor([float(np.asarray(x)[0, 0]) for x in split.images])
    torch.testing.assert_close(big["sims"].t2i, cross["sims"] + 0.25 * img0[:, None], rtol=0, atol=0)


def test_protocols_ensembles_and_options_with_two_stage():
    split = _known_split(3, n_img=10)
    one = evaluate(KnownTwoStage(k=3), split, "5fold", progress=False)
    assert len(one["folds"]) == 5 and len(one["two_stage"]["folds"]) == 5
    # each fold is its own gallery: the same as evaluating that fold's images and captions alone
    fold0 = split.subset(np.arange(2))
    alone = evaluate(KnownTwoStage(k=3), fold0, progress=False)
    assert one["folds"][0]["rsum"] == alone["rsum"]
    assert one["two_stage"]["folds"][0]["k_t2i"] == 2  # a fold holds 2 images: k is clipped to the gallery
    ens = evaluate_ensemble([KnownTwoStage(k=3), KnownTwoStage(k=3)], split, "5fold", progress=False)
    assert ens["rsum"] == one["rsum"] and len(ens["two_stage"]) == 2
    # the user's k overrides the model's
    assert evaluate(KnownTwoStage(k=3), split, progress=False, rerank_k=2)["two_stage"]["k_i2t"] == 2


def test_second_stage_scores_at_the_fill_value_are_refused():
    class Bad(KnownTwoStage):
        def score_pairs(self, img, txt, image_index, text_index, direction):
            return torch.full((image_index.numel(),), -200.0)

    with pytest.raises(ValueError, match="at or below -100"):
        evaluate(Bad(k=2), _known_split(0), progress=False)


# ---------------------------------------------------------------------------------------------------
# the composition model


def _synthetic(n: int = 12):
    from itmzoo.data.synthetic import SyntheticShapes

    return SyntheticShapes({"test": n}, region_dim=16, num_regions=4, seed=1).split("test")


def _composition(**kw):
    torch.manual_seed(0)
    cfg = dict(first="toy_vse", second="lhsc", k=4,
               first_config={"img_dim": 16, "embed_size": 8, "word_dim": 8, "hash_buckets": 31},
               second_config={"img_dim": 16, "word_dim": 8, "embed_size": 8, "sim_dim": 4, "num_regions": 4,
                              "vocab_size": 74, "vocab_path": VOCAB, "gcn_layers": 1, "text_attn_layers": 1,
                              "text_padding": "masked", "sa_dropout": 0.0, "embed_dropout": 0.0})
    cfg.update(kw)
    return itmzoo.build("two_stage", **cfg).eval()


def test_composition_k_at_least_gallery_equals_the_second_model_alone():
    split = _synthetic()
    model = _composition(k=10_000)
    assert model.scoring == "two-stage" and model.input_kind == "regions"
    both = evaluate(model, split, progress=False, return_sims=True)
    alone = evaluate(model.second, split, progress=False, return_sims=True)
    torch.testing.assert_close(both["sims"].i2t, alone["sims"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both["sims"].t2i, alone["sims"], rtol=1e-5, atol=1e-6)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum"):
        assert both[key] == alone[key]
    first = evaluate(model.first, split, progress=False)
    assert both["two_stage"]["first_stage"]["rsum"] == first["rsum"]
    # "sum" adds the first stage's score to the second's
    summed = evaluate(_composition(k=10_000, combine="sum"), split, progress=False, return_sims=True)
    first_sims = evaluate(model.first, split, progress=False, return_sims=True)["sims"]
    torch.testing.assert_close(summed["sims"].i2t, alone["sims"] + first_sims, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("waste", [1.0, 4.0])
def test_composition_pair_scores_equal_the_second_models_matrix(waste):
    """score_pairs merges queries into blocks; every pair still gets its own entry of the full matrix."""
    from itmzoo.eval import encode_split

    split = _synthetic()
    model = _composition(block_waste=waste)
    img, txt = encode_split(model, split, progress=False)
    with torch.no_grad():
        full = model.second.similarity({k[7:]: v for k, v in img.items() if k.startswith("second.")},
                                       {k[7:]: v for k, v in txt.items() if k.startswith("second.")})
        g = torch.Generator().manual_seed(0)
        # queries in shuffled order with 1-5 candidates each, some repeated
        ii = torch.randint(0, split.num_images, (40,), generator=g)
        ti = torch.randint(0, split.num_captions, (40,), generator=g)
        second_img = {k[7:]: v for k, v in img.items() if k.startswith("second.")}
        second_txt = {k[7:]: v for k, v in txt.items() if k.startswith("second.")}
        for direction in ("i2t", "t2i"):
            got = model.score_pairs(img, txt, ii, ti, direction)
            torch.testing.assert_close(got, full[ii, ti], rtol=1e-5, atol=1e-6)
            # a cross model's own (default) score_pairs: the same dense blocks of its similarity
            own = model.second.score_pairs(second_img, second_txt, ii, ti, direction)
            torch.testing.assert_close(own, full[ii, ti], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="direction must be"):
            model.second.score_pairs(second_img, second_txt, ii, ti, "x2y")


def test_composition_parts_load_their_checkpoints_and_round_trip(tmp_path):
    split = _synthetic()
    a = _composition()
    a.first.save_pretrained(tmp_path / "first")
    a.second.save_pretrained(tmp_path / "second")
    b = _composition(first_checkpoint=str(tmp_path / "first"), second_checkpoint=str(tmp_path / "second"))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert b.config.second_config["vocab_path"] == VOCAB and b.config.second_config["sim_dim"] == 4
    b.save_pretrained(tmp_path / "both")
    c = itmzoo.load(tmp_path / "both")
    assert json.loads((tmp_path / "both" / "config.json").read_text())["model"] == "two_stage"
    r1, r2 = evaluate(b, split, progress=False), evaluate(c, split, progress=False)
    assert r1["rsum"] == r2["rsum"] and r1["two_stage"]["first_stage"] == r2["two_stage"]["first_stage"]


def test_composition_trains_both_parts_and_rejects_mismatched_parts():
    from itmzoo.data.collate import PairCollate

    model = _composition().train()
    split = _synthetic(4)
    collate = PairCollate(model.input_kind, model.tokenizer, train=True)
    tf = model.image_transform_for(True)
    batch = collate([(tf(split.images[int(i)]), c, int(i)) for c, i in zip(split.captions, split.caption_to_image)])
    assert {"first.input_ids", "second.input_ids", "regions"} <= set(batch)
    out = model(batch)
    out["loss"].backward()
    assert torch.allclose(out["loss"].detach(), out["first_loss"] + out["second_loss"])
    assert model.first.img_fc.weight.grad is not None and model.second.img_enc.fc.weight.grad is not None
    with pytest.raises(ConfigError, match="single-stage model"):
        itmzoo.build("two_stage", first="toy_vse", second="two_stage")
    with pytest.raises(ConfigError, match="unknown model"):
        itmzoo.build("two_stage", first="nope", second="lhsc")
    bad = _composition(second_config={**_composition().config.second_config, "num_regions": 6})
    with pytest.raises(ValueError, match="transform images differently"):
        bad.image_transform_for(False)(split.images[0])


# ---------------------------------------------------------------------------------------------------
# evaluation options and layering


def test_eval_options_one_object_for_evaluate_trainer_and_run_files():
    from itmzoo.train.run import parse_run_config

    run = parse_run_config({"model": {"name": "toy_vse"}, "data": {"format": "synthetic", "train": {"split": "train"}},
                            "eval": {"protocol": "5fold", "block": [4, 8], "rerank_k": 16}})
    assert isinstance(run.eval, EvalOptions) and run.eval.block == (4, 8) and run.eval.rerank_k == 16
    with pytest.raises(ConfigError, match="eval.rerank_k"):
        parse_run_config({"model": {"name": "toy_vse"}, "data": {"format": "synthetic", "train": {"split": "train"}},
                          "eval": {"rerank_k": 0}})
    with pytest.raises(TypeError, match="unknown evaluation option"):
        evaluate(KnownTwoStage(k=2), _known_split(0), progress=False, rerank=3)
    split = _known_split(0)
    opts = dataclasses.replace(EvalOptions(), progress=False, block=(5, 7))
    assert evaluate(KnownTwoStage(k=2), split, options=opts)["rsum"] == \
        evaluate(KnownTwoStage(k=2), split, progress=False)["rsum"]
    assert chance_metrics(split.caption_to_image)["rsum"] < 600


def test_evaluating_imports_nothing_of_train():
    code = ("import sys, itmzoo\n"
            "from itmzoo.data.synthetic import SyntheticShapes\n"
            "from itmzoo.eval import chance_metrics, format_metrics\n"
            "split = SyntheticShapes({'test': 6}, region_dim=8, num_regions=3).split('test')\n"
            "m = itmzoo.build('toy_vse', img_dim=8, embed_size=4, word_dim=4, hash_buckets=7)\n"
            "print(format_metrics(itmzoo.evaluate(m, split, progress=False)))\n"
            "bad = sorted(k for k in sys.modules if k.startswith('itmzoo.train'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rsum" in r.stdout


def test_cli_evaluates_a_composition_with_a_chosen_k(tmp_path, capsys):
    from itmzoo.cli import main

    first = _composition().first
    first.save_pretrained(tmp_path / "first")
    second_cfg = json.dumps(_composition().config.second_config)
    rc = main(["eval", "--model", "two_stage", "--set", "first=toy_vse",
               "--set", f"first_checkpoint={tmp_path / 'first'}", "--set", "second=lhsc",
               "--set", f"second_config={second_cfg}", "--rerank-k", "3", "--block", "5", "7",
               "--data", "format=synthetic,split=test,region_dim=16,num_regions=4,seed=1,num_images={test: 12}",
               "--quiet", "--out", str(tmp_path / "m.json")])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["two_stage"]["rerank_k"] == 3 and m["two_stage"]["k_i2t"] == 3 and m["n_images"] == 12
    assert "two-stage: k = 3; first stage alone:" in capsys.readouterr().out
    with torch.no_grad():  # the first stage is the saved toy model
        # the CLI's JSON rounds metrics to 10 significant digits
        assert m["two_stage"]["first_stage"]["rsum"] == pytest.approx(
            evaluate(itmzoo.load(tmp_path / "first"), _synthetic(), progress=False)["rsum"], rel=1e-9)
