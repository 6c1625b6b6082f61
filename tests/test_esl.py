"""ESL (BERT branch): parity with the authors' code, batched scoring, checkpoints, fixed modes, learning.

Fixtures (tests/fixtures/esl/, docs/fixtures/esl.md) were produced once by running the authors' code
(tests/fixtures/esl/make_fixtures.py) with parameters filled by `parity_utils.fill_value`; no upstream
code runs here.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_utils import fill_value, filled_state_dict, load_npz

import itmzoo
from itmzoo.checkpoints.safe import CheckpointError
from itmzoo.data.synthetic import SYNTHETIC_WORDPIECE
from itmzoo.eval.similarity import similarity_matrix
from itmzoo.losses import hinge_triplet_loss
from itmzoo.models.esl import (
    TINY_OVERRIDES,
    AdaptiveLevels,
    ESLBertTokenizer,
    ESLConfig,
    HeuristicLevels,
    convert_official,
    esl_cross_scores,
    level_dims,
)

FIX = Path(__file__).parent / "fixtures" / "esl"
ROOT = Path(__file__).parents[1]
WORDPIECE = Path(SYNTHETIC_WORDPIECE)
CASES = ["adaptive_a", "heuristic_a", "adaptive_b", "heuristic_b"]
TOL = 1e-5
PARTS = ("img_enc", "txt_enc", "sim_vec")


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def _is_gain(name: str) -> bool:  # the fixture generator's rule for LayerNorm/BatchNorm gains
    return bool(re.search(r"(LayerNorm|lynorm_\d+|bns\.\d+)\.weight$", name))


def _upstream_parts(meta: dict, z: dict) -> list[dict[str, torch.Tensor]]:
    sd = filled_state_dict(meta["shapes"], meta["seed"])
    for k in sd:
        if _is_gain(k):
            sd[k] = 1.0 + sd[k]
    for k, v in z.items():
        if k.startswith("set:"):
            sd[k[4:]] = _t(v)
    return [{k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")} for p in PARTS]


def _official_file(path: Path, parts: list[dict], extra_keys: bool = True) -> Path:
    """A checkpoint laid out as the authors' train.py writes it (DataParallel prefixes, never-used keys)."""
    img, txt, sim = (dict(p) for p in parts)
    if extra_keys:  # transformers <= 4.x saved position_ids; kept in old files
        n = txt["bert.embeddings.position_embeddings.weight"].shape[0]
        txt["bert.embeddings.position_ids"] = torch.arange(n)[None]
    model = [{f"module.{k}": v for k, v in d.items()} for d in (img, txt, sim)]
    opt = argparse.Namespace(embed_size=img["fc.weight"].shape[0], kernel_size=2, margin=0.2, precomp_enc_type="basic")
    torch.save({"epoch": 7, "model": model, "best_rsum": 500.0, "opt": opt, "Eiters": 99}, path)
    return path


_CASES: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory) -> tuple:
    if name not in _CASES:
        meta = json.loads((FIX / f"esl_{name}.json").read_text())
        z = load_npz(FIX / f"esl_{name}.npz")
        parts = _upstream_parts(meta, z)
        path = _official_file(tmp_path_factory.mktemp(name) / "model_best.pth", parts)
        _CASES[name] = (meta, z, parts, path)
    return _CASES[name]


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def case_a(tmp_path_factory):
    return _case("adaptive_a", tmp_path_factory)


def _load(case, **kw) -> torch.nn.Module:
    meta, _, _, path = case
    # upstream's BERT runs eager attention; SDPA differs by ~1e-7, which the text chain amplifies to ~2e-6
    bert = {**meta["bert_config"], "attn_implementation": "eager"}
    return itmzoo.build("esl", checkpoint=str(path), bert_config=bert, **kw)


_BUILT: dict[str, torch.nn.Module] = {}


def _model(case) -> torch.nn.Module:
    """A fresh copy of the case's converted model (built once per case: building BERT dominates)."""
    name = case[0]["name"]
    if name not in _BUILT:
        _BUILT[name] = _load(case)
    return copy.deepcopy(_BUILT[name])


def _train_batch(z: dict, dtype=torch.float32) -> dict:
    return {"regions": _t(z["images_train"]).to(dtype), "region_lengths": _t(z["region_lengths_train"]),
            "input_ids": _t(z["captions_train"]), "lengths": _t(z["lengths_train"])}


def _name_map(parts: list[dict]) -> dict[str, str]:
    """upstream ``part.key`` -> itmzoo parameter name, via the converter."""
    _, state, _ = convert_official({"model": parts})
    owner = {id(v): f"{p}.{k}" for p, d in zip(PARTS, parts) for k, v in d.items()}
    return {owner[id(v)]: k for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ parity


def test_parity_eval(case):
    meta, z, _, _ = case
    model = _model(case)
    assert not model.training and model.config.strategy == meta["strategy"]
    batch = {"regions": _t(z["images"]), "input_ids": _t(z["captions"]), "lengths": _t(z["lengths"])}
    with torch.no_grad():
        img = model.image_levels(batch)["tokens"]
        cap = model.text_levels(batch)["tokens"]
        sims = model.similarity(model.encode_image(batch), model.encode_text(batch))
    np.testing.assert_allclose(img.numpy(), z["levels_img"], atol=TOL, rtol=0)
    for i, n in enumerate(z["lengths"]):  # upstream keeps BERT's outputs of [PAD]; they are never scored
        np.testing.assert_allclose(cap[i, :n].numpy(), z["levels_cap"][i, :n], atol=TOL, rtol=0)
        assert not cap[i, n:].any()
    np.testing.assert_allclose(sims.numpy(), z["sims_eval"], atol=TOL, rtol=0)
    loss = hinge_triplet_loss
    np.testing.assert_allclose(loss(sims, meta["margin"], False).item(), z["loss_eval_sum"], atol=TOL, rtol=0)
    np.testing.assert_allclose(loss(sims, meta["margin"], True).item(), z["loss_eval_max"], atol=TOL, rtol=0)
    # the evaluator's float64 blocks, in small blocks, give the same matrix
    blocks = similarity_matrix(model, model.encode_image(batch), model.encode_text(batch),
                                           block=(3, 2), dtype=torch.float64, progress=False)
    np.testing.assert_allclose(blocks.numpy(), z["sims_eval"], atol=TOL, rtol=0)


def _check_grads(model, z, meta, names, atol, rel=0.0) -> None:
    """Gradients against the fixture's float64 ones; `rel` x the largest entry is added to `atol`."""
    params = dict(model.named_parameters())
    for k in z:
        kind, _, full = k.partition(":")
        if kind not in ("grad", "grad_head", "grad_proj") or (rel and kind == "grad_proj"):
            continue
        g = params[names[full]].grad
        assert g is not None, full
        g = g.detach().double().reshape(-1)
        ref = np.asarray(z[k], dtype=np.float64)
        if kind == "grad_proj":
            proj = fill_value("proj:" + full, (g.numel(),), meta["seed"], scale=1.0).double()
            got = (g * proj).sum().item()
        else:
            got = g[: ref.size].numpy()
        if rel and not ref.any():
            # exactly 0 in exact arithmetic (the 1x1 LayerNorm of the last level at embed_size 256):
            # float32 gives rounding x its 1/sqrt(1e-8) scale
            continue
        tol = atol + rel * float(np.abs(ref).max())
        np.testing.assert_allclose(got, ref, atol=tol, rtol=0, err_msg=k)


def test_parity_train_float32(case):
    """Zero-padded regions through BatchNorm (batch statistics), a [PAD] id inside a caption, both losses.

    float32 gradients of this head carry ~1e-4 relative rounding (upstream's own float32 gradients differ
    from its float64 ones by as much), so they are held to 1e-3 of each tensor's largest entry here and
    to 1e-5 in float64 below.
    """
    meta, z, parts, _ = case
    names = _name_map(parts)
    model = _model(case).train()
    batch = _train_batch(z)
    model.on_epoch_start(0)
    with torch.no_grad():
        np.testing.assert_allclose(model(batch)["loss"].item(), z["loss_train_sum"], atol=TOL, rtol=0)
    buffers = dict(model.named_buffers())  # running statistics after one training forward
    for k in z:
        if k.startswith("buffer:"):
            np.testing.assert_allclose(buffers[names[k[7:]]].numpy(), z[k], atol=TOL, rtol=0, err_msg=k)
    model.on_epoch_start(1)
    feats = model.train_features(batch)
    out = model.train_loss(feats, batch)
    np.testing.assert_allclose(out["loss"].item(), z["loss_train_max"], atol=TOL, rtol=0)
    with torch.no_grad():
        sims = esl_cross_scores(model.head.fold(feats["text"]["tokens"]), feats["text"]["mask"],
                                feats["image"]["tokens"], feats["image"]["mask"], model.head.smooth())
    np.testing.assert_allclose(sims.numpy(), z["sims_train"], atol=TOL, rtol=0)
    out["loss"].backward()
    _check_grads(model, z, meta, names, atol=TOL, rel=1e-3)


def test_parity_gradients(case):
    """float64: every gradient equals upstream's float64 run; None/zero exactly where upstream has them."""
    meta, z, parts, _ = case
    names = _name_map(parts)
    model = _model(case).double().train()
    model.on_epoch_start(1)
    out = model(_train_batch(z, torch.float64))
    np.testing.assert_allclose(out["loss"].item(), z["loss_train_max64"], atol=TOL, rtol=0)
    out["loss"].backward()
    _check_grads(model, z, meta, names, atol=TOL)
    params = dict(model.named_parameters())
    assert sorted(n for n, p in params.items() if p.grad is None) == sorted(names[n] for n in meta["no_grad"])
    for n in meta["zero_grad"]:  # the adaptive build's temp_scale_1 (lambda forced to 0), 1x1 LayerNorms
        assert params[names[n]].grad.abs().max() < 1e-9, n
    if meta["strategy"] == "adaptive":
        assert "txt_enc.bert.pooler.dense.weight" in meta["no_grad"]
        assert "sim_vec.sims.calculator_1.temp_scale_2.weight" in meta["no_grad"]
        assert "sim_vec.sims.calculator_1.temp_scale_1.weight" in meta["zero_grad"]


# --------------------------------------------------------------------------------------- batched scoring


def _reference_scores(words, lengths, regions, smooth):
    """Upstream's per-caption loop, written out: slice the caption, score it against every image."""
    def l2n(x, d):
        return x / (x.pow(2).sum(d, keepdim=True).sqrt() + 1e-8)

    def weights(a):  # (I, query, source): normalise over the query axis per source, softmax over source
        return F.softmax(l2n(F.leaky_relu(torch.tanh(a), 0.1).transpose(1, 2), 2).transpose(1, 2) * smooth, dim=2)

    cols = []
    for c, n in enumerate(lengths):
        a = words[c, :n].unsqueeze(0).expand(regions.shape[0], -1, -1) @ regions.transpose(1, 2)
        at = a.transpose(1, 2)
        cols.append((a * weights(a)).sum(-1).mean(1) + (at * weights(at)).sum(-1).mean(1))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_scores_equal_per_pair_loop(dtype):
    g = torch.Generator().manual_seed(0)
    C, L, Ni, R, D = 7, 11, 5, 9, 40
    lengths = [11, 1, 4, 7, 2, 11, 5]
    words = torch.randn(C, L, D, generator=g, dtype=dtype) * 0.3
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    words = words * mask[..., None]
    regions = F.normalize(torch.randn(Ni, R, D, generator=g, dtype=dtype), dim=-1)
    ref = _reference_scores(words, lengths, regions, 7.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for chunk in (1, 50, 400, 1 << 20):  # any chunking gives the same scores
        fast = esl_cross_scores(words, mask, regions, None, 7.5, chunk_elems=chunk)
        torch.testing.assert_close(fast, ref, atol=tol, rtol=0)
    # autograd path: same values and the gradient of the loop
    w1, r1 = words.clone().requires_grad_(), regions.clone().requires_grad_()
    s1 = esl_cross_scores(w1, mask, r1, None, torch.tensor(7.5, dtype=dtype), chunk_elems=300)
    w2, r2 = words.clone().requires_grad_(), regions.clone().requires_grad_()
    s2 = _reference_scores(w2, lengths, r2, 7.5)
    torch.testing.assert_close(s1, s2, atol=tol, rtol=0)
    probe = torch.randn(s1.shape, generator=g, dtype=dtype)
    (s1 * probe).sum().backward()
    (s2 * probe).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, atol=tol * 10, rtol=0)
    torch.testing.assert_close(r1.grad, r2.grad, atol=tol * 10, rtol=0)
    # a large temperature switches the fast path to the max-subtracting softmax: still the loop
    torch.testing.assert_close(esl_cross_scores(words, mask, regions, None, 150.0),
                               _reference_scores(words, lengths, regions, 150.0), atol=tol * 10, rtol=0)


def test_region_mask_equals_dropping_the_regions():
    g = torch.Generator().manual_seed(1)
    words = torch.randn(3, 6, 20, generator=g)
    wmask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    regions = torch.randn(2, 8, 20, generator=g)
    rmask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8], dtype=torch.bool)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            r = regions.clone().requires_grad_(grad)
            masked = esl_cross_scores(words, wmask, r, rmask, 5.0)
            first = esl_cross_scores(words, wmask, regions[:1, :5], None, 5.0)
            torch.testing.assert_close(masked[:1], first, atol=1e-6, rtol=0)
            if grad:
                masked.sum().backward()
                assert torch.isfinite(r.grad).all() and not r.grad[0, 5:].any()


# ---------------------------------------------------------------------------------------- levels + head


def test_adaptive_mask_top2_and_gradient_reaches_every_entry():
    torch.manual_seed(0)
    lv = AdaptiveLevels(256)
    with torch.no_grad():
        lv.masks_6.weight.zero_()
        lv.masks_6.weight[:, :3] = 0.3
        lv.masks_6.weight[:, 3] = -1.0
    m = lv.mask(6)
    assert ((m != 0).sum(1) == 3).all()  # ties at the second-largest value keep every tied entry
    torch.testing.assert_close(m[0, :3], torch.full((3,), 0.3 / (0.27 + 1.0) ** 0.5))
    m1 = lv.mask(1)
    assert ((m1 != 0).sum(1) == 2).all()
    x = F.normalize(torch.randn(5, 3, 256), dim=-1)
    lv(x, normalized_chain=True).pow(2).sum().backward()
    assert (lv.masks_1.weight.grad != 0).all()  # normalise the whole row, then mask


def test_heuristic_levels_keep_four_channels_and_equal_two_taps():
    torch.manual_seed(0)
    lv = HeuristicLevels(256)
    assert tuple(lv.kernel_3.weight.shape) == (4, 1, 2)
    x = torch.randn(4, 256)
    taps = lv.kernel_1.weight.sum(0)[0]
    torch.testing.assert_close(lv.unit(1, x), taps[0] * x[:, 0::2] + taps[1] * x[:, 1::2], atol=1e-6, rtol=0)
    out = lv(F.normalize(x, dim=-1), normalized_chain=True)
    assert out.shape == (4, sum(level_dims(256)))
    # text chain (un-normalised) and image chain agree up to the +1e-8 in the normalisation
    out_t = lv(F.normalize(x, dim=-1), normalized_chain=False)
    torch.testing.assert_close(out, out_t, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------------------- checkpoints


def test_official_checkpoint_infers_strategy(case):
    meta, _, _, path = case
    overrides, _, _ = convert_official(torch.load(path, weights_only=False))
    assert overrides == {"strategy": meta["strategy"], "img_dim": meta["img_dim"], "embed_size": meta["embed_size"]}
    other = "heuristic" if meta["strategy"] == "adaptive" else "adaptive"
    with pytest.raises(CheckpointError, match=f"strategy='{meta['strategy']}'"):
        _load(case, strategy=other)


def test_official_checkpoint_strict_errors(case_a, tmp_path):
    meta, z, parts, _ = case_a
    # a key that is not on the allow-list is an error naming it
    img, txt, sim = (dict(p) for p in parts)
    sim["sims.calculator_1.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="extra"):
        _load((meta, z, parts, _official_file(tmp_path / "bad.pth", [img, txt, sim])))
    img = {k: v for k, v in parts[0].items() if not k.startswith("mlp.bns.1.")}  # ignorable when absent too
    with pytest.raises(CheckpointError, match="missing keys.*lynorm_3"):
        sim = {k: v for k, v in parts[2].items() if "lynorm_3" not in k}
        _load((meta, z, parts, _official_file(tmp_path / "bad2.pth", [img, parts[1], sim])))
    # both or neither aggregator family: the strategy cannot be told
    sim = {k: v for k, v in parts[2].items() if "plus_encoder" not in k}
    with pytest.raises(CheckpointError, match="strategy"):
        convert_official({"model": [parts[0], parts[1], sim]})
    with pytest.raises(CheckpointError, match="sim_vec"):
        convert_official({"model": [parts[0], parts[1]]})


def test_checkpoint_round_trip_through_native(case_a, tmp_path):
    _, z, _, _ = case_a
    model = _model(case_a)
    model.save_pretrained(tmp_path / "native")
    again = itmzoo.load(tmp_path / "native")
    batch = {"regions": _t(z["images"]), "input_ids": _t(z["captions"]), "lengths": _t(z["lengths"])}
    with torch.no_grad():
        s = again.similarity(again.encode_image(batch), again.encode_text(batch))
    np.testing.assert_allclose(s.numpy(), z["sims_eval"], atol=TOL, rtol=0)


class _Payload:
    """Stands for any class a malicious or foreign pickle could reference."""


def test_disallowed_pickle_global_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": [{}, {}, {}], "opt": _Payload()}, path)
    with pytest.raises(CheckpointError, match="_Payload"):
        itmzoo.build("esl", checkpoint=str(path), **TINY_OVERRIDES["esl"])


# ------------------------------------------------------------------------------------------ fixed modes


def _tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return itmzoo.build("esl", **{**TINY_OVERRIDES["esl"], **kw})


def _batch(n=4, regions=6, dim=16, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 6, 4][:n])
    ids = torch.randint(5, 60, (n, 6), generator=g) * (torch.arange(6)[None] < lengths[:, None])
    return {"regions": torch.rand(n, regions, dim, generator=g), "input_ids": ids, "lengths": lengths,
            "image_index": torch.arange(n)}


def test_mask_padded_regions_makes_training_scores_padding_independent():
    b = _batch()
    b["region_lengths"] = torch.tensor([6, 4, 5, 3])
    b["regions"] = b["regions"] * (torch.arange(6)[None] < b["region_lengths"][:, None])[..., None]
    wide = {**b, "regions": F.pad(b["regions"], (0, 0, 0, 3))}  # three more zero rows
    for fixed in (False, True):
        model = _tiny(mask_padded_regions=fixed).train()
        losses = []
        for x in (b, wide):
            torch.manual_seed(0)  # the same BERT dropout draws
            losses.append(model(x)["loss"].item())
        if fixed:
            assert losses[0] == pytest.approx(losses[1], abs=1e-5)
        else:  # upstream: the zero rows go through BatchNorm and both attentions
            assert abs(losses[0] - losses[1]) > 1e-4


def test_normalize_text_chain_and_random_tokens():
    b = _batch()
    faithful = _tiny().eval()
    fixed = _tiny(normalize_text_chain=True).eval()
    with torch.no_grad():
        emb = faithful.txt_enc(b["input_ids"])
        a, c = faithful.text_levels(b)["tokens"], fixed.text_levels(b)["tokens"]
        img_chain = faithful.txt_levels(emb, normalized_chain=True)
    mask = faithful.text_levels(b)["mask"]
    torch.testing.assert_close(c[mask], img_chain[mask])
    assert (a - c).abs().max() < 1e-2  # the same function up to the +1e-8
    tok = load_tokenizer()
    specials = ESLBertTokenizer(tok, aug_prob=0.99)
    plain = ESLBertTokenizer(tok, aug_prob=0.99, no_special_random=True)
    vocab = tok.get_vocab()
    bracket = {i for t, i in vocab.items() if re.fullmatch(r"\[.*\]", t)}
    assert bracket & set(specials.random_ids) and not bracket & set(plain.random_ids)
    assert len(plain.random_ids) == len(vocab) - len(bracket)


def load_tokenizer():
    from itmzoo.data.tokenizers import load_auto_tokenizer

    return load_auto_tokenizer(str(WORDPIECE))


def test_tokenizer_eval_and_augmentation():
    tok = ESLBertTokenizer(load_tokenizer())
    out = tok(["A red circle.", "a big blue star above a green square"])
    cls, sep = tok.splitter.cls_id, tok.splitter.sep_id
    assert out["input_ids"][0, 0] == cls and out["input_ids"][0, 5] == sep and out["lengths"].tolist() == [6, 10]
    assert out["attention_mask"].sum(1).tolist() == [6, 10]
    rng = random.Random(0)
    cap = "there is a red star and a big green triangle at the bottom"
    n_words = len(tok.splitter(cap))
    stats = {"same": 0, "shorter": 0, "mask": 0}
    for _ in range(400):
        ids = tok([cap], train=True, rng=rng)["input_ids"][0].tolist()
        ref = tok.encode(cap)
        stats["same"] += ids == ref
        stats["shorter"] += len(ids) < len(ref)
        stats["mask"] += tok.splitter.mask_id in ids
        assert ids[0] == cls and ids[-1] == sep and len(ids) >= 2
    p_untouched = 0.8 ** n_words
    assert abs(stats["same"] / 400 - p_untouched) < 0.07, stats
    assert stats["mask"] > 0 and stats["shorter"] > 0
    # the same draws as ESA-BERT's augmentation (checked against upstream there; identical code upstream)
    from itmzoo.models.esa import ESABertTokenizer

    esa = ESABertTokenizer(load_tokenizer(), hardnum=1)
    for seed in range(5):
        assert tok.augment(cap, random.Random(seed)) == esa.augment(cap, random.Random(seed))


# --------------------------------------------------------------------------------------------- contract


def test_contract_tiny_model():
    model = _tiny()
    b = _batch()
    b["region_lengths"] = torch.tensor([6, 6, 6, 6])
    model.train()
    torch.manual_seed(0)
    out = model(b)
    out["loss"].backward()
    dead = {"img_enc.mlp.bns.1.weight", "img_enc.mlp.bns.1.bias", "txt_enc.bert.pooler.dense.weight",
            "txt_enc.bert.pooler.dense.bias", "head.temp_scale_2.weight"}  # adaptive: lambda = 0
    missing = {n for n, p in model.named_parameters() if p.grad is None}
    assert missing == dead
    # the loss split is the forward
    model.zero_grad()
    torch.manual_seed(0)
    again = model.train_loss(model.train_features(b), b)["loss"]
    assert again.item() == pytest.approx(out["loss"].item(), abs=1e-6)
    # config JSON round trip, param groups cover everything once
    cfg = ESLConfig.from_dict(json.loads(model.config.to_json()))
    assert cfg == model.config
    groups = model.param_groups(5e-4)
    assert [g["name"] for g in groups] == ["text_head", "bert", "image", "sim_vec"] and groups[1]["lr"] == 5e-5
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # block-wise similarity == whole matrix
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_image(b), model.encode_text(b)
        whole = model.similarity(img, txt)
    blocks = similarity_matrix(model, img, txt, block=(3, 3), progress=False)
    torch.testing.assert_close(blocks, whole, atol=1e-6, rtol=0)
    assert model.eval_settings().block == tuple(model.config.eval_block)
    with pytest.raises(ValueError, match="regions"):
        model.encode_image({"regions": torch.zeros(2, 3, 5)})


def test_config_validation():
    with pytest.raises(Exception, match="kernel_size"):
        itmzoo.build("esl", embed_size=128, img_dim=8, bert_config=TINY_OVERRIDES["esl"]["bert_config"])
    with pytest.raises(Exception, match="strategy"):
        itmzoo.build("esl", strategy="both")


def test_registry_tags():
    info = itmzoo.model_info("esl.coco_heuristic")
    assert info["scoring"] == "cross" and info["input_kind"] == "regions"
    assert info["config"]["strategy"] == "heuristic" and info["config"]["embed_size"] == 512
    assert itmzoo.model_info("esl")["config"]["strategy"] == "adaptive"
    assert "esl.f30k_adaptive" in itmzoo.list_models("esl*", has_weights=True)


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_trains_with_the_shared_trainer(tmp_path):
    """A tiny ESL through `itmzoo.train.fit` on SyntheticShapes regions: dev recall rises well above chance.

    80 AdamW steps of 40 pairs (captions of ~35 WordPiece tokens); all negatives are summed throughout,
    since from scratch the hardest negative alone collapses the scores. Measured: dev rsum 100.7, 131.3,
    152.0, 179.3 over the 4 epochs (chance 102.0).
    """
    from itmzoo.data.synthetic import SyntheticShapes
    from itmzoo.train import fit
    from itmzoo.train.run import chance_metrics

    ds = SyntheticShapes({"train": 160, "dev": 30, "test": 0}, region_dim=32, num_regions=6, seed=0, noise=0.2)
    train, dev = ds.split("train"), ds.split("dev")
    n_vocab = len(load_tokenizer().get_vocab())
    torch.manual_seed(0)
    model = itmzoo.build("esl", img_dim=32, embed_size=256, tokenizer=str(WORDPIECE), vse_mean_warmup_epochs=100,
                         bert_config={"vocab_size": n_vocab, "hidden_size": 32, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 64,
                                      "max_position_embeddings": 64})
    result = fit(model, train, {"epochs": 4, "batch_size": 40, "lr": 1e-3, "optimizer": "adamw",
                                "weight_decay": 1e-4, "progress": False, "seed": 0}, dev, out_dir=tmp_path / "run")
    rsums = [h["dev"]["rsum"] for h in result.history]
    chance = chance_metrics(dev.caption_to_image)["rsum"]
    assert rsums[-1] > rsums[0] + 30 and max(rsums) > 1.5 * chance, (rsums, chance)
    again = itmzoo.load(tmp_path / "run" / "best")
    assert type(again).__name__ == "ESL" and again.config.strategy == "adaptive"


@pytest.mark.parametrize("name", ["esl_f30k_adaptive", "esl_f30k_heuristic", "esl_coco_adaptive",
                                  "esl_coco_heuristic", "esl_demo_synthetic"])
def test_run_configs_parse(name):
    from itmzoo.config import load_run_config
    from itmzoo.registry import resolve_config
    from itmzoo.train.run import parse_run_config

    run = parse_run_config(load_run_config(ROOT / "configs" / f"{name}.yaml"))
    _, cfg = resolve_config(run.model_name, run.model_fields)
    assert isinstance(cfg, ESLConfig)
    if name != "esl_demo_synthetic":
        assert cfg.strategy in name and run.train.lr == 5e-4 and run.train.batch_size == 128
        assert run.train.lr_decay_epochs == ([15] if "f30k" in name else [10])


# ------------------------------------------------------------------------------------------ CLIP branch

CLIP_CASES = ["clip_heuristic", "clip_adaptive"]


def _clip_case(name: str):
    meta = json.loads((FIX / f"esl_{name}.json").read_text())
    z = load_npz(FIX / f"esl_{name}.npz")
    state = {}
    for k, shape in meta["shapes"].items():  # the generator's rule: fill_value + upstream's init offset
        v = fill_value(k, tuple(shape), meta["seed"])
        if k.endswith("sim_eval.weight"):
            v = 0.1 * v
        for pat, off in meta["offsets"].items():
            if re.fullmatch(pat, k):
                v = v + (torch.eye(shape[0]) if off == "eye" else off)
        state[k] = v
    return meta, z, state


def _clip_model(meta: dict, state: dict, tmp_path: Path) -> torch.nn.Module:
    """A tiny-tower esl_clip (embed 512) loaded from an upstream-layout checkpoint with this head."""
    from itmzoo.encoders.clip import CLIP, CLIPConfig

    cfg = {**TINY_OVERRIDES["esl_clip"]["clip"], "embed_dim": 512}
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(**cfg))
    sd = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    sd.update({f"pool_frames.cross_attn.{k}": v for k, v in state.items()})
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"state": {}}, "config": _Payload()}, path)
    with pytest.raises(CheckpointError, match="_Payload"):  # only the allow-listed config class unpickles
        itmzoo.build("esl_clip", checkpoint=str(path), clip=cfg, image_size=32)
    # the authors' file pickles config.all_config.AllConfig: it is read as a plain attribute holder
    fake = types.ModuleType("config.all_config")
    AllConfig = type("AllConfig", (), {"__module__": "config.all_config"})
    fake.AllConfig = AllConfig
    conf = AllConfig()
    conf.embed_dim, conf.kernel_size, conf.huggingface = 512, 2, False
    saved = {k: sys.modules.get(k) for k in ("config", "config.all_config")}
    sys.modules["config"], sys.modules["config.all_config"] = types.ModuleType("config"), fake
    try:
        torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"state": {}}, "config": conf}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                del sys.modules[k]
            else:
                sys.modules[k] = v
    model = itmzoo.build("esl_clip", checkpoint=str(path), clip=cfg, image_size=32)
    assert model.config.strategy == meta["strategy"]
    return model


@pytest.mark.parametrize("name", CLIP_CASES)
def test_clip_head_parity(name, tmp_path):
    meta, z, state = _clip_case(name)
    model = _clip_model(meta, state, tmp_path)
    img, txt = _t(z["image_features"]), _t(z["text_features"])
    with torch.no_grad():
        li = model.img_levels(img / img.norm(dim=1, keepdim=True), normalized_chain=True)
        lt = model.txt_levels(txt / txt.norm(dim=1, keepdim=True), normalized_chain=False)
        sims = model.head.fold(li) @ lt.t()
    np.testing.assert_allclose(li.numpy(), z["levels_img"], atol=TOL, rtol=0)
    np.testing.assert_allclose(lt.numpy(), z["levels_txt"], atol=TOL, rtol=0)
    np.testing.assert_allclose(sims.numpy(), z["sims"], atol=TOL, rtol=0)
    with torch.no_grad():
        model.clip.logit_scale.fill_(float(z["logit_scale"]))
        loss = model.train_loss({"image": li[:4], "text": lt[:4]}, {})["loss"]
    np.testing.assert_allclose(loss.item(), z["loss"], atol=TOL, rtol=0)
    # float64 gradients: head parameters and the CLIP features, through the normalisation
    model = model.double()
    img64, txt64 = img.double().requires_grad_(True), txt.double().requires_grad_(True)
    li = model.img_levels(img64 / img64.norm(dim=1, keepdim=True), normalized_chain=True)
    lt = model.txt_levels(txt64 / txt64.norm(dim=1, keepdim=True), normalized_chain=False)
    loss = model.train_loss({"image": li, "text": lt[:4]}, {})["loss"]
    np.testing.assert_allclose(loss.item(), z["loss64"], atol=TOL, rtol=0)
    loss.backward()
    np.testing.assert_allclose(img64.grad.numpy(), z["grad_input:image_features"], atol=TOL, rtol=0)
    np.testing.assert_allclose(txt64.grad.numpy(), z["grad_input:text_features"], atol=TOL, rtol=0)
    params = dict(model.named_parameters())
    from itmzoo.models.esl import _map_sim_key

    for k in z:
        kind, _, up = k.partition(":")
        if kind not in ("grad", "grad_head", "grad_proj"):
            continue
        g = params[_map_sim_key(up)].grad.reshape(-1)
        if kind == "grad_proj":
            proj = fill_value("proj:" + up, (g.numel(),), meta["seed"], scale=1.0).double()
            np.testing.assert_allclose((g * proj).sum().item(), z[k], atol=TOL, rtol=0, err_msg=k)
        else:
            np.testing.assert_allclose(g[: z[k].size].numpy(), z[k], atol=TOL, rtol=0, err_msg=k)
    assert meta["no_grad"] == ["sims.calculator_1.temp_scale.weight"] and params["head.temp_scale.weight"].grad is None


FULL_CASES = ["clip_full_heuristic", "clip_full_adaptive"]


def _full_case(name: str, tmp_path: Path):
    """The generator's rule for the whole upstream model -> an upstream-layout file -> ``itmzoo.build``."""
    meta = json.loads((FIX / f"esl_{name}.json").read_text())
    z = load_npz(FIX / f"esl_{name}.npz")
    seed, head = meta["seed"], "pool_frames.cross_attn."
    sd = {}
    for k, shape in meta["shapes"].items():
        if k == "clip.logit_scale":
            v = torch.tensor(meta["logit_scale_init"])
        elif k.startswith("clip."):
            v = fill_value(k, tuple(shape), seed, scale=meta["clip_scale"])
            v = v + 1.0 if re.search(r"ln_\w+\.weight$", k) else v
        else:
            v = fill_value(k[len(head):], tuple(shape), seed)
            if k.endswith("sim_eval.weight"):
                v = 0.1 * v
            for pat, off in meta["offsets"].items():
                if re.fullmatch(pat, k[len(head):]):
                    v = v + (torch.eye(shape[0]) if off == "eye" else off)
        sd[k] = v
    t = meta["tiny_clip"]
    clip = {"embed_dim": meta["embed_dim"], "image_size": t["image_resolution"], "patch_size": t["vision_patch_size"],
            "vision_width": t["vision_width"], "vision_layers": t["vision_layers"],
            "vision_heads": t["vision_width"] // 64, "vocab_size": t["vocab_size"],
            "text_width": t["transformer_width"], "text_layers": t["transformer_layers"],
            "text_heads": t["transformer_heads"]}
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = itmzoo.build("esl_clip", checkpoint=str(path), clip=clip, image_size=t["image_resolution"])
    assert model.config.strategy == meta["strategy"]
    return meta, z, model


@pytest.mark.parametrize("name", FULL_CASES)
def test_clip_full_path_parity(name, tmp_path):
    """Upstream's CLIPTransformer with a tiny random CLIP: pixels + token ids -> CLIP vectors -> levels ->
    similarities -> CLIPLoss (logit scale clamped to ln 100), and float64 gradients of every parameter."""
    meta, z, model = _full_case(name, tmp_path)
    model.after_optimizer_step()  # upstream clamps clip.logit_scale after every step; the fixture stores it clamped
    np.testing.assert_allclose(model.clip.logit_scale.item(), z["logit_scale"], atol=1e-7, rtol=0)
    ids = _t(z["input_ids"])
    if 0 in meta["caption_lengths"]:  # the cut caption has no EOT: argmax pools a word, as upstream
        assert (ids.max(-1).values < meta["tiny_clip"]["vocab_size"] - 1).any()
    b = {"pixels": _t(z["pixels"]), "input_ids": ids, "attention_mask": (ids > 0).long(), "lengths": (ids > 0).sum(1)}
    model.eval()
    with torch.no_grad():
        img, txt = model.clip.encode_image(b["pixels"]), model.clip.encode_text(ids)
        li, lt = model.image_levels(b), model.text_levels(b)
        sims = model.similarity(model.encode_image(b), model.encode_text(b))
    for ours, key in ((img, "image_features"), (txt, "text_features"), (li, "levels_img"), (lt, "levels_txt"),
                      (sims, "sims")):
        np.testing.assert_allclose(ours.numpy(), z[key], atol=TOL, rtol=0, err_msg=key)
    model.train()
    with torch.no_grad():
        loss = model.train_loss(model.train_features(b), b)["loss"]
    np.testing.assert_allclose(loss.item(), z["loss"], atol=TOL, rtol=0)
    model = model.double()
    b["pixels"] = b["pixels"].double()
    loss = model(b)["loss"]
    np.testing.assert_allclose(loss.item(), z["loss64"], atol=TOL, rtol=0)
    loss.backward()
    params = dict(model.named_parameters())
    from itmzoo.models.esl import _map_sim_key

    seen = set()
    for k in z:
        kind, _, up = k.partition(":")
        if kind not in ("grad", "grad_head", "grad_proj"):
            continue
        ours = up if up.startswith("clip.") else _map_sim_key(up[len("pool_frames.cross_attn."):])
        seen.add(ours)
        g = params[ours].grad.reshape(-1)
        if kind == "grad_proj":
            proj = fill_value("proj:" + up, (g.numel(),), meta["seed"], scale=1.0).double()
            np.testing.assert_allclose((g * proj).sum().item(), z[k], atol=TOL, rtol=0, err_msg=k)
        else:
            np.testing.assert_allclose(g[: z[k].size].numpy(), z[k], atol=TOL, rtol=0, err_msg=k)
    # every parameter's gradient was compared, except the one upstream never uses
    assert meta["no_grad"] == ["pool_frames.cross_attn.sims.calculator_1.temp_scale.weight"]
    assert set(params) - seen == {"head.temp_scale.weight"}


def test_clip_encode_once_equals_head_and_contract():
    model = itmzoo.build("esl_clip", **TINY_OVERRIDES["esl_clip"])
    tok = model.tokenizer
    long = " ".join(["dog"] * 100)
    ids = tok([long, "a photo of a cat"])["input_ids"]
    assert ids.shape == (2, 77) and 49407 not in ids[0].tolist() and 49407 in ids[1].tolist()  # cut: EOT lost
    fixed = itmzoo.build("esl_clip", truncate="eot", **TINY_OVERRIDES["esl_clip"]).tokenizer([long])["input_ids"]
    assert fixed[0, -1] == 49407
    g = torch.Generator().manual_seed(0)
    b = {"pixels": torch.randn(3, 3, 32, 32, generator=g), **tok(["a red circle", "two blue squares", "a star"])}
    model.eval()
    with torch.no_grad():
        sims = model.similarity(model.encode_image(b), model.encode_text(b))
        feats = model.train_features(b)
        ref = model.head.fold(feats["image"]) @ feats["text"].t()
    torch.testing.assert_close(sims, ref)
    model.train()
    out = model(b)
    out["loss"].backward()
    assert {n for n, p in model.named_parameters() if p.grad is None} == {"head.temp_scale.weight"}
    with torch.no_grad():
        model.clip.logit_scale.fill_(9.0)
    model.after_optimizer_step()
    assert model.clip.logit_scale.item() == pytest.approx(math.log(100))
    groups = model.param_groups(3e-5)
    assert groups[0]["name"] == "clip" and groups[0]["lr"] == pytest.approx(1e-6)
    cfg = type(model.config).from_dict(json.loads(model.config.to_json()))
    assert cfg == model.config


def test_clip_trains_with_the_shared_trainer(tmp_path):
    """A tiny esl_clip on 16 SyntheticShapes pictures (80 pairs, 150 steps) through `itmzoo.train.fit` with ESL-CLIP's
    recipe (HF AdamW eps 1e-6, HF cosine with 10 % warm-up and a first step at lr 0, grad clip 1.0; weight
    decay 0 and lr 3e-3 from scratch): the InfoNCE loss leaves chance level (ln 16 = 2.77)."""
    from itmzoo.data.synthetic import SyntheticShapes
    from itmzoo.train import fit

    train = SyntheticShapes({"train": 16, "dev": 8, "test": 8}, image_size=32, seed=0).split("train", "pixels")
    torch.manual_seed(0)
    model = itmzoo.build("esl_clip", clip_lr_mult=1.0, **TINY_OVERRIDES["esl_clip"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy machine
    try:
        result = fit(model, train, {"epochs": 30, "batch_size": 16, "lr": 3e-3, "optimizer": "hf_adamw",
                                    "weight_decay": 0.0, "eps": 1e-6, "schedule": "hf_cosine", "warmup_ratio": 0.1,
                                    "grad_clip": 1.0, "progress": False, "seed": 0}, out_dir=tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    losses = [h["train_loss"] for h in result.history]
    # measured: 2.79 after the first epoch, 0.90 after the last
    assert losses[-1] < math.log(16) - 0.3 and losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", ["esl_clip_f30k_heuristic", "esl_clip_f30k_adaptive", "esl_clip_coco_heuristic",
                                  "esl_clip_coco_adaptive"])
def test_clip_run_configs_parse(name):
    from itmzoo.config import load_run_config
    from itmzoo.models.esl import ESLCLIPConfig
    from itmzoo.registry import resolve_config
    from itmzoo.train.run import parse_run_config

    run = parse_run_config(load_run_config(ROOT / "configs" / f"{name}.yaml"))
    _, cfg = resolve_config(run.model_name, run.model_fields)
    assert isinstance(cfg, ESLCLIPConfig) and cfg.strategy in name and cfg.truncate == "cut"
    assert run.train.optimizer == "hf_adamw" and run.train.schedule == "hf_cosine" and run.train.warmup_ratio == 0.1
    assert run.train.lr * cfg.clip_lr_mult == pytest.approx(1e-6) and run.train.weight_decay == 0.2
    assert cfg.caption_strip == ("." if "f30k" in name else "")
