"""LHSC: parity with the upstream code, block-wise scoring, padding modes, official checkpoints, learning.

The fixture (tests/fixtures/lhsc/, see docs/fixtures/lhsc.md) was produced once by running the authors'
code with parameters filled by `parity_utils.fill_value`; no upstream code runs here.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from parity_utils import filled_state_dict, load_npz

import itmzoo
from itmzoo.checkpoints.safe import CheckpointError
from itmzoo.config import ConfigError
from itmzoo.eval.similarity import similarity_matrix
from itmzoo.features import cat_features
from itmzoo.layers.cross_attention import context_scale, scan_t2i_attention, t2i_attention_packed
from itmzoo.models.lhsc import LHSCConfig, convert_official

FIX = Path(__file__).parent / "fixtures" / "lhsc"
TOL = 1e-5
PARTS = ("img_enc", "txt_enc", "sim_enc")


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which stalls badly
    when the machine is shared (seen: 7x slower with 2 threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CASES = ("lhsc_small", "lhsc_seed1_scale1_dropout", "lhsc_gcn_bn_offset", "lhsc_short_context")


def _load(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    return json.loads((FIX / f"{name}.json").read_text()), load_npz(FIX / f"{name}.npz")


@pytest.fixture(scope="module")
def fx() -> tuple[dict, dict[str, np.ndarray]]:
    return _load("lhsc_small")


def _parts(meta: dict, seed: int | None = None, z: dict | None = None) -> list[OrderedDict]:
    """The three upstream state dicts, filled with the fixture rule (plus the case's zeroed tensors and
    stored buffers, see make_fixtures.py)."""
    sd = filled_state_dict(meta["state_dict"], meta["seed"] if seed is None else seed, meta["scale"])
    for k in meta.get("zeroed", []):
        sd[k] = torch.zeros_like(sd[k])
    for k, c in meta.get("offset", {}).items():
        sd[k] = sd[k] + c
    if z is not None:
        sd.update({k[len("init."):]: torch.from_numpy(v) for k, v in z.items() if k.startswith("init.")})
    return [OrderedDict((k[len(p) + 1:], v) for k, v in sd.items() if k.startswith(p + ".")) for p in PARTS]


def _official_file(path: Path, parts: list, opt: argparse.Namespace | dict | None) -> Path:
    """A file laid out as the release's train.py writes it."""
    obj = {"epoch": 30, "model": parts, "best_rsum": 500.0, "Eiters": 1000}
    if opt is not None:
        obj["opt"] = opt
    torch.save(obj, path)
    return path


def _case_ckpt(meta: dict, z: dict, directory: Path) -> Path:
    opt = argparse.Namespace(**meta["settings"], data_name="f30k_precomp", lr_update=20, workers=20)
    return _official_file(directory / "model_best.pth.tar", _parts(meta, z=z), opt)


@pytest.fixture(scope="module")
def ckpt(fx, tmp_path_factory) -> Path:
    meta, z = fx
    return _case_ckpt(meta, z, tmp_path_factory.mktemp("lhsc"))


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory) -> tuple[dict, dict[str, np.ndarray], Path]:
    """Every parity fixture: (meta, arrays, official-layout checkpoint)."""
    meta, z = _load(request.param)
    return meta, z, _case_ckpt(meta, z, tmp_path_factory.mktemp(request.param))


def _text(z: dict, rows: slice, width: int | None = None) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(z["captions"][rows])
    lengths = torch.from_numpy(z["lengths"][rows])
    width = int(lengths.max()) if width is None else width
    if width > ids.shape[1]:
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
    return {"input_ids": ids[:, :width], "lengths": lengths,
            "attention_mask": (torch.arange(width)[None] < lengths[:, None]).long()}


def _encode_text_blocks(model, z: dict, block: int, mode: str | None = None) -> dict[str, torch.Tensor]:
    """Captions in consecutive blocks, each padded to its own maximum (the reference evaluation)."""
    n = len(z["lengths"])
    return cat_features([model.encode_text(_text(z, slice(s, s + block)), text_padding=mode)
                         for s in range(0, n, block)])


# ---------------------------------------------------------------------------------------------------
# parity with the upstream code


@torch.no_grad()
def test_parity_eval_embeddings_and_similarity(case):
    meta, z, ckpt = case
    model = itmzoo.build("lhsc", checkpoint=str(ckpt))
    assert not model.training and model.config.text_padding == "batch"
    img = model.encode_image({"regions": torch.from_numpy(z["images"])})
    torch.testing.assert_close(img["regions"], torch.from_numpy(z["eval_img_emb"]), atol=TOL, rtol=0)
    txt = _encode_text_blocks(model, z, meta["eval_batch_size"])
    ref = torch.from_numpy(z["eval_cap_emb"])
    assert txt["tokens"].shape[1] == ref.shape[1]
    torch.testing.assert_close(txt["tokens"], ref, atol=TOL, rtol=0)
    assert txt["mask"].sum(1).tolist() == z["eval_cap_lens"].tolist()
    sims = model.similarity(img, txt).double()
    torch.testing.assert_close(sims, torch.from_numpy(z["eval_sims"]), atol=TOL, rtol=0)
    # the reference's eval-mode hinge loss on the square image x positive-caption matrix
    from itmzoo.losses import hinge_triplet_loss

    loss = hinge_triplet_loss(sims[:, torch.from_numpy(z["eval_loss_pos"])].float(), 0.2, True)
    assert abs(loss.item() - float(z["eval_loss"])) < TOL


@torch.no_grad()
def test_parity_through_tokenizer_and_evaluator(fx, ckpt, tmp_path):
    """Captions as text through the SCAN-vocab tokenizer and `encode_split`: the evaluator encodes them in
    the model's `eval_text_batch_size` blocks, which reproduces the reference's block padding."""
    from itmzoo.data.split import RetrievalSplit
    from itmzoo.data.vocab import Vocab
    from itmzoo.eval.similarity import encode_split

    meta, z = fx
    vocab = Vocab([f"w{i}" for i in range(4, 30)])              # ids 4..29; 3 is <unk>
    vocab.save(tmp_path / "vocab.json")
    words = {i: f"w{i}" for i in range(4, 30)} | {3: "neverseen"}
    caps = [" ".join(words[int(i)] for i in row[1:n - 1]) for row, n in zip(z["captions"], z["lengths"])]
    split = RetrievalSplit(images=list(z["images"]), captions=caps, caption_to_image=np.arange(40) // 5)
    model = itmzoo.build("lhsc", checkpoint=str(ckpt), vocab_path=str(tmp_path / "vocab.json"),
                         eval_text_batch_size=meta["eval_batch_size"])
    img, txt = encode_split(model, split, batch_size=64, progress=False)
    sims = similarity_matrix(model, img, txt, block=(3, 7), progress=False).double()
    torch.testing.assert_close(sims, torch.from_numpy(z["eval_sims"]), atol=TOL, rtol=0)
    # one batch of 40 captions pads everything to 14 words: not the reference numbers
    model.config.eval_text_batch_size = 64
    _, txt64 = encode_split(model, split, batch_size=64, progress=False)
    assert not torch.allclose(similarity_matrix(model, img, txt64, progress=False).double(),
                              torch.from_numpy(z["eval_sims"]), atol=1e-3)


@torch.no_grad()
def test_parity_masked_equals_encoding_alone(case):
    _, z, ckpt = case
    model = itmzoo.build("lhsc", checkpoint=str(ckpt), text_padding="masked")
    img = model.encode_image({"regions": torch.from_numpy(z["images"])})
    txt = model.encode_text(_text(z, slice(None)))            # one batch padded to the longest: padding ignored
    torch.testing.assert_close(txt["tokens"], torch.from_numpy(z["alone_cap_emb"]), atol=TOL, rtol=0)
    torch.testing.assert_close(model.similarity(img, txt).double(), torch.from_numpy(z["alone_sims"]),
                               atol=TOL, rtol=0)


def _replay_dropout(model: torch.nn.Module, meta: dict, z: dict) -> None:
    """Make every active Dropout of `model` apply the mask upstream drew in the fixture's training step.

    Upstream's TextSA runs once per caption ([1, L_j, D] and [1, D] masks); itmzoo's runs once on the
    packed words of all captions and on all captions' means, so those masks are concatenated in caption
    order (the batch order, which is the same on both sides).
    """
    calls = meta["dropout_calls"]
    active = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert active == set(calls), (sorted(active ^ set(calls)))
    for name, m in model.named_modules():
        if name not in active:
            continue
        masks = [torch.from_numpy(z[f"dropout.{name}.{j}"]) for j in range(calls[name])]
        if name == "sim_enc.t_global_w.embedding_local.2":
            keep = torch.cat([k[0] for k in masks])             # [T packed words, D]
        elif name == "sim_enc.t_global_w.embedding_global.2":
            keep = torch.cat(masks)                             # [captions, D]
        else:
            assert len(masks) == 1, name
            keep = masks[0]
        scale = 1 - m.p
        m.forward = lambda x, keep=keep, scale=scale: x * (keep.to(x.dtype) / scale)


def _assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Within 1e-5, relative for entries larger than 1."""
    err = (got.double() - want.double()).abs() / want.double().abs().clamp(min=1.0)
    assert err.max().item() <= TOL, f"{name}: max error {err.max().item():.3g} (scaled by max(1, |g|))"


def _train_model(meta: dict, ckpt: Path, z: dict) -> torch.nn.Module:
    drop = meta["train_dropout"]
    model = itmzoo.build("lhsc", checkpoint=str(ckpt), embed_dropout=0.4 if drop else 0.0,
                         sa_dropout=0.4 if drop else 0.0)
    assert model.config.text_attn_dropout == meta["settings"]["drop_out"]
    if drop:
        _replay_dropout(model, meta, z)
    return model.train()


def test_parity_training_step(case):
    """Train mode (dropout replayed or p=0): scores, summed hardest-negative loss, every gradient, BN stats."""
    meta, z, ckpt = case
    batch = {"regions": torch.from_numpy(z["train_images"]), "input_ids": torch.from_numpy(z["train_captions"]),
             "lengths": torch.from_numpy(z["train_lengths"])}
    model = _train_model(meta, ckpt, z)
    scores = model.similarity(model.encode_image(batch), model.encode_text(batch))
    torch.testing.assert_close(scores, torch.from_numpy(z["train_sims"]), atol=TOL, rtol=0)
    # forward() recomputes everything, so use a fresh copy for the loss and the gradients
    model = _train_model(meta, ckpt, z)
    loss = model(batch)["loss"]
    assert abs(loss.item() - float(z["train_loss"])) < TOL
    loss.backward()
    for name, p in model.named_parameters():
        want = torch.from_numpy(z[f"grad.{name}"])
        if f"grad64.{name}" not in z:
            _assert_grad_close(p.grad, want, name)
            continue
        # an attended context ~1e-4 long amplifies rounding ~1e4x on its way back: upstream's own float32
        # gradients are up to 8e-5 from the float64 ones there, so both are measured against float64
        exact = torch.from_numpy(z[f"grad64.{name}"])
        scale = exact.abs().clamp(min=1.0)
        upstream_err = ((want.double() - exact) / scale).abs().max().item()
        err = ((p.grad.double() - exact) / scale).abs().max().item()
        assert err <= max(TOL, 2 * upstream_err), (name, err, upstream_err)
    for name, b in model.named_buffers():
        if "running" in name:
            torch.testing.assert_close(b, torch.from_numpy(z[f"bn_after.{name}"]), atol=TOL, rtol=1e-5, msg=name)
    saf_bn = model.sim_enc.cal_sim_base_atten.bn
    n_tracked = int(torch.from_numpy(z["init.sim_enc.cal_sim_base_atten.bn.num_batches_tracked"])) \
        if "init.sim_enc.cal_sim_base_atten.bn.num_batches_tracked" in z else 0
    assert int(saf_bn.num_batches_tracked) == n_tracked + 8   # once per caption, as upstream


@torch.no_grad()
def test_short_context_fixture_defeats_a_float32_quadratic_form():
    """The short-context fixture holds attended contexts ~1e-4 long: on its features the float32 Gram form
    of their norm (the code before the float64 one) is off by percents, the float64 form by < 1e-6."""
    _, z = _load("lhsc_short_context")
    regions = torch.from_numpy(z["eval_img_emb"])
    lengths = torch.from_numpy(z["eval_cap_lens"])
    words = torch.cat([torch.from_numpy(z["eval_cap_emb"][j, :n]) for j, n in enumerate(lengths.tolist())])
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    attn = t2i_attention_packed(regions, words, torch.nn.functional.one_hot(seg).float(), seg, 9.0)
    exact = torch.bmm(attn.double(), regions.double()).norm(dim=-1)         # direct norm, float64
    assert exact.min().item() < 3e-4
    gram32 = torch.bmm(regions, regions.transpose(1, 2))
    norm32 = (torch.bmm(attn, gram32) * attn).sum(-1).clamp(min=0).sqrt().double()
    norm64 = 1 / context_scale(regions, attn).double() - 1e-8
    err32, err64 = (((n - exact).abs() / exact).max().item() for n in (norm32, norm64))
    assert err32 > 1e-3 and err64 < 1e-6, (err32, err64)


def test_context_scale_is_exact_for_short_contexts():
    """Regions that nearly cancel in pairs: the batched norm agrees with a direct float64 norm."""
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(4, 18, 64, generator=g, dtype=torch.float64), dim=-1)
    regions = torch.cat([v, -v + 1e-4 * torch.randn(4, 18, 64, generator=g, dtype=torch.float64)], 1)
    attn = torch.softmax(1e-3 * torch.randn(4, 5, 36, generator=g, dtype=torch.float64), -1)
    want = 1.0 / (torch.bmm(attn, regions).norm(dim=-1) + 1e-8)
    assert (1 / want).max() < 1e-3                                   # the contexts are short
    got = context_scale(regions.float(), attn.float())
    direct = 1.0 / (torch.bmm(attn.float().double(), regions.float().double()).norm(dim=-1) + 1e-8)
    torch.testing.assert_close(got.double(), direct, rtol=1e-6, atol=0)
    # chunking the float64 temporaries changes nothing
    torch.testing.assert_close(context_scale(regions.float(), attn.float(), chunk_elems=100), got, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# scoring


def _tiny(**kw) -> torch.nn.Module:
    cfg = dict(vocab_size=40, img_dim=24, word_dim=12, embed_size=16, sim_dim=8, num_regions=6)
    cfg.update(kw)
    return itmzoo.build("lhsc", **cfg)


def _random_batch(n: int, seed: int = 0, img_dim: int = 24, regions: int = 6, vocab: int = 40) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (n,), generator=g)
    ids = torch.randint(4, vocab, (n, int(lengths.max())), generator=g)
    ids[:, 0] = 1
    ids[torch.arange(n), lengths - 1] = 2
    ids = ids * (torch.arange(ids.shape[1])[None] < lengths[:, None])
    return {"regions": torch.rand(n, regions, img_dim, generator=g), "input_ids": ids, "lengths": lengths,
            "attention_mask": (ids != 0).long(), "image_index": torch.arange(n)}


def _perturb_bn(model) -> None:
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1)


@torch.no_grad()
def test_blockwise_similarity_equals_full_and_reference_loop():
    model = _tiny(sim_group_tokens=9, sim_tile_rows=7).eval()
    _perturb_bn(model)
    b = _random_batch(13)
    img, txt = model.encode_image(b), model.encode_text(b)
    full = model.similarity(img, txt)
    blocks = similarity_matrix(model, img, txt, block=(4, 5), progress=False)
    torch.testing.assert_close(blocks, full, atol=1e-6, rtol=0)
    # an unchunked computation (one group, one tile) gives the same numbers
    model.config.sim_group_tokens, model.config.sim_tile_rows = 10_000, 10_000
    torch.testing.assert_close(model.similarity(img, txt), full, atol=1e-6, rtol=0)
    # and so does a per-caption loop written like the reference's forward_sim
    torch.testing.assert_close(_reference_loop(model, img, txt), full, atol=1e-6, rtol=0)


def test_training_groups_give_the_same_scores_and_gradients():
    # with autograd recording, captions are grouped by sim_group_tokens_train: any grouping gives the
    # same scores (train-mode SAF BatchNorm included) and the same gradients
    b = _random_batch(11)
    outs = []
    for group in (6, 10_000):
        torch.manual_seed(0)
        model = _tiny(sim_group_tokens_train=group).train()
        torch.manual_seed(1)  # same dropout draws in both runs
        scores = model.similarity(model.encode_image(b), model.encode_text(b))
        (scores * torch.linspace(0.5, 1.5, scores.numel()).view_as(scores)).sum().backward()
        outs.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=0)
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], atol=1e-5, rtol=1e-4, msg=n)


def _reference_loop(model, img, txt) -> torch.Tensor:
    sim = model.sim_enc
    def l2(x):
        return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)

    cols = []
    for j in range(txt["tokens"].shape[0]):
        n = int(txt["mask"][j].sum())
        w = txt["tokens"][j, :n][None].expand(img["regions"].shape[0], -1, -1)
        ctx = scan_t2i_attention(w, img["regions"], 9.0)
        loc = l2(sim.sim_tranloc_w((ctx - w) ** 2))
        glo = l2(sim.sim_tranglo_w((img["global"] - txt["global"][j]) ** 2))
        s = torch.cat([glo[:, None], loc], 1)
        saf = sim.cal_sim_base_atten
        g = torch.sigmoid(saf.bn(saf.attn_sim_w(s).permute(0, 2, 1)))
        g = g / (g.abs().sum(-1, keepdim=True) + 1e-8)
        cols.append(torch.sigmoid(sim.sim_eval_w(l2(torch.matmul(g, s).squeeze(1)))))
    return torch.cat(cols, 1)


def test_packed_attention_matches_paired_form():
    g = torch.Generator().manual_seed(1)
    regions = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)
    lengths = [4, 2, 6]
    words = torch.nn.functional.normalize(torch.randn(sum(lengths), 8, generator=g), dim=-1)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    onehot = torch.nn.functional.one_hot(seg, 3).float()
    attn = t2i_attention_packed(regions, words, onehot, seg, 9.0)
    ctx = torch.bmm(attn * context_scale(regions, attn)[..., None], regions)
    start = 0
    for n in lengths:
        w = words[start:start + n][None].expand(3, -1, -1)
        torch.testing.assert_close(ctx[:, start:start + n], scan_t2i_attention(w, regions, 9.0), atol=1e-6, rtol=0)
        start += n


@torch.no_grad()
def test_masked_mode_is_padding_independent_batch_mode_is_not():
    b = _random_batch(6, seed=3)
    for mode, independent in (("masked", True), ("batch", False)):
        model = _tiny(text_padding=mode).eval()
        tight = model.encode_text(b)
        wide = model.encode_text({**b, "input_ids": torch.nn.functional.pad(b["input_ids"], (0, 7))})
        assert wide["tokens"].shape == tight["tokens"].shape
        same = torch.allclose(wide["tokens"], tight["tokens"], atol=1e-6)
        assert same is independent, mode
        # each caption encoded alone = the masked result (the definition of padding independence)
        if independent:
            for j in range(6):
                n = int(b["lengths"][j])
                alone = model.encode_text({"input_ids": b["input_ids"][j:j + 1, :n], "lengths": b["lengths"][j:j + 1]})
                torch.testing.assert_close(alone["tokens"][0], tight["tokens"][j, :n], atol=1e-6, rtol=0)
    assert _tiny(text_padding="batch").eval_settings().text_batch_size == 100
    assert _tiny(text_padding="masked").eval_settings().text_batch_size is None


def test_backward_reaches_every_parameter_and_config_roundtrip():
    model = _tiny().train()
    out = model(_random_batch(5, seed=2))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    cfg = LHSCConfig.from_dict(json.loads(model.config.to_json()))
    assert cfg == model.config
    with pytest.raises(ConfigError):
        _tiny(embed_size=18)
    with pytest.raises(ConfigError):
        _tiny(text_padding="sometimes")


@torch.no_grad()
def test_native_save_and_load_roundtrip(tmp_path):
    model = _tiny().eval()
    _perturb_bn(model)
    b = _random_batch(4, seed=7)
    before = model.similarity(model.encode_image(b), model.encode_text(b))
    model.save_pretrained(tmp_path / "m")
    again = itmzoo.load(tmp_path / "m").eval()
    torch.testing.assert_close(again.similarity(again.encode_image(b), again.encode_text(b)), before)


# ---------------------------------------------------------------------------------------------------
# official checkpoints


def test_official_checkpoint_layouts_and_inference(fx, tmp_path):
    meta, _ = fx
    parts = _parts(meta)
    # bare list of three state dicts (no opt): sizes come from the tensors
    overrides, state, ignorable = convert_official(parts)
    assert overrides["vocab_size"] == 30 and overrides["embed_size"] == 16 and overrides["num_regions"] == 36
    assert overrides["gcn_layers"] == 4 and overrides["text_attn_layers"] == 4 and overrides["bi_gru"]
    assert set(state) == {f"{p}.{k}" for p, d in zip(PARTS, parts) for k in d}
    # a pre-0.4.1 file without num_batches_tracked gets them filled in
    old = [OrderedDict((k, v) for k, v in d.items() if not k.endswith("num_batches_tracked")) for d in parts]
    path = _official_file(tmp_path / "old.pth.tar", old, None)
    model = itmzoo.build("lhsc", checkpoint=str(path))
    assert model.config.vocab_size == 30
    # DataParallel prefixes are stripped
    dp = [OrderedDict((f"module.{k}", v) for k, v in d.items()) for d in parts]
    itmzoo.build("lhsc", checkpoint=str(_official_file(tmp_path / "dp.pth.tar", dp, None)))


def test_official_checkpoint_strict_errors(fx, tmp_path):
    meta, _ = fx
    parts = _parts(meta)
    extra = [OrderedDict(d) for d in parts]
    extra[2]["cal_sim_base_atten.gate.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys.*sim_enc.cal_sim_base_atten.gate.weight"):
        itmzoo.build("lhsc", checkpoint=str(_official_file(tmp_path / "extra.pth", extra, None)))
    missing = [OrderedDict(d) for d in parts]
    del missing[0]["IM_GCN_2.phi3.bias"]
    with pytest.raises(CheckpointError, match="missing keys.*img_enc.IM_GCN_2.phi3.bias"):
        itmzoo.build("lhsc", checkpoint=str(_official_file(tmp_path / "missing.pth", missing, None)))
    opt = argparse.Namespace(**{**meta["settings"], "embed_size": 1024})
    with pytest.raises(CheckpointError, match="embed_size"):
        itmzoo.build("lhsc", checkpoint=str(_official_file(tmp_path / "opt.pth", parts, opt)))
    good = _official_file(tmp_path / "good.pth", parts, argparse.Namespace(**meta["settings"]))
    with pytest.raises(CheckpointError, match="vocab_size"):
        itmzoo.build("lhsc", checkpoint=str(good), vocab_size=31)
    with pytest.raises(CheckpointError, match="not an LHSC checkpoint"):
        convert_official({"model": parts[:2]})


def test_unsafe_pickle_is_refused(fx, tmp_path):
    meta, _ = fx

    path = tmp_path / "evil.pth"
    torch.save({"model": _parts(meta), "opt": OrderedDict(a=1), "hook": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        itmzoo.build("lhsc", checkpoint=str(path))


class _Evil:
    pass


# ---------------------------------------------------------------------------------------------------
# learning


def test_learns_synthetic_concepts():
    """Images are sums of concept prototypes, captions name the concepts: recall must rise fast."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_concepts, img_dim, regions = 12, 24, 6
    protos = torch.randn(n_concepts, img_dim, generator=g)

    def sample(n):
        concepts = torch.stack([torch.randperm(n_concepts, generator=g)[:3] for _ in range(n)])
        regs = protos[concepts].repeat_interleave(2, 1) + 0.1 * torch.randn(n, regions, img_dim, generator=g)
        ids = torch.cat([torch.ones(n, 1, dtype=torch.long), concepts + 4, torch.full((n, 1), 2)], 1)
        return {"regions": regs.relu(), "input_ids": ids, "lengths": torch.full((n,), 5),
                "attention_mask": torch.ones_like(ids), "image_index": torch.arange(n)}

    model = _tiny(vocab_size=4 + n_concepts, embed_size=32, sim_dim=16, text_padding="masked")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    test = sample(40)

    @torch.no_grad()
    def r1() -> float:
        model.eval()
        s = model.similarity(model.encode_image(test), model.encode_text(test))
        model.train()
        return (s.argmax(1) == torch.arange(40)).float().mean().item()

    before = r1()
    for _ in range(120):
        loss = model(sample(24))["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
    after = r1()
    assert after >= 0.4 and after > before + 0.3, (before, after)


def test_tokenizer_checks_vocabulary(tmp_path):
    from itmzoo.data.vocab import Vocab

    vocab = Vocab(["a", "dog", "runs"])
    vocab.save(tmp_path / "v.json")
    model = _tiny(vocab_size=7, vocab_path=str(tmp_path / "v.json"))
    out = model.tokenizer(["A dog runs", "a cat"])
    assert out["input_ids"].tolist() == [[1, 4, 5, 6, 2], [1, 4, 3, 2, 0]]
    assert out["lengths"].tolist() == [5, 4]
    with pytest.raises(ValueError, match="vocab_size=8"):
        _tiny(vocab_size=8, vocab_path=str(tmp_path / "v.json")).tokenizer(["a"])
    with pytest.raises(ValueError, match="checksum"):
        _tiny(vocab_size=7, vocab_path=str(tmp_path / "v.json"), vocab_sha256="0" * 64).tokenizer(["a"])
    with pytest.raises(ValueError, match="vocab_path"):
        _tiny().tokenizer(["a"])
    assert itmzoo.model_info("lhsc.f30k")["config"]["vocab_size"] == 8481


def test_trains_with_the_shared_trainer(tmp_path):
    """A tiny LHSC through `itmzoo.train.fit` on SyntheticShapes regions: dev recall far above chance.

    All negatives are summed throughout (`vse_mean_warmup_epochs`): from scratch on a few hundred
    pairs, the hardest-negative loss alone collapses every score to one value.
    """
    from itmzoo.data.synthetic import SyntheticShapes
    from itmzoo.data.vocab import Vocab
    from itmzoo.train import fit
    from itmzoo.train.run import chance_metrics

    ds = SyntheticShapes({"train": 160, "dev": 30, "test": 0}, region_dim=32, num_regions=6, seed=0, noise=0.2)
    train, dev = ds.split("train"), ds.split("dev")
    vocab = Vocab.from_captions(train.captions + dev.captions, threshold=1)
    vocab.save(tmp_path / "vocab.json")
    torch.manual_seed(0)
    model = _tiny(vocab_size=len(vocab), vocab_path=str(tmp_path / "vocab.json"), img_dim=32, word_dim=16,
                  embed_size=32, sim_dim=16, text_padding="masked", vse_mean_warmup_epochs=100)
    result = fit(model, train, {"epochs": 5, "batch_size": 40, "lr": 4e-3, "progress": False, "seed": 0}, dev,
                 out_dir=tmp_path / "run")
    rsums = [h["dev"]["rsum"] for h in result.history]
    chance = chance_metrics(dev.caption_to_image)["rsum"]
    assert rsums[-1] > rsums[0] and max(rsums) > 1.8 * chance, (rsums, chance)
    again = itmzoo.load(tmp_path / "run" / "best")           # the best checkpoint is a native LHSC
    assert type(again).__name__ == "LHSC" and again.config.text_padding == "masked"


@pytest.mark.parametrize("name", ["lhsc_f30k", "lhsc_coco", "lhsc_demo_synthetic"])
def test_run_configs_parse(name):
    from itmzoo.config import load_run_config
    from itmzoo.registry import resolve_config
    from itmzoo.train.run import parse_run_config

    run = parse_run_config(load_run_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml"))
    _, cfg = resolve_config(run.model_name, run.model_fields)
    assert isinstance(cfg, LHSCConfig)
    if name != "lhsc_demo_synthetic":
        assert cfg.text_padding == "batch" and cfg.vocab_sha256 and run.train.lr == 2e-4
        # upstream trains on the last partial batch; lr steps at 20 epochs (README), not opts.py's 30
        assert run.train.drop_last is False and run.train.lr_decay_epochs == [20, 40]


@torch.no_grad()
def test_cli_convert_then_load_native(fx, ckpt, tmp_path):
    from itmzoo.cli import main

    meta, z = fx
    assert main(["convert", "lhsc", str(ckpt), str(tmp_path / "native")]) == 0
    model = itmzoo.load(tmp_path / "native").eval()
    img = model.encode_image({"regions": torch.from_numpy(z["images"])})
    txt = _encode_text_blocks(model, z, meta["eval_batch_size"])
    torch.testing.assert_close(model.similarity(img, txt).double(), torch.from_numpy(z["eval_sims"]), atol=TOL, rtol=0)
    extra = json.loads((tmp_path / "native" / "config.json").read_text())["extra"]
    assert extra["converted_from"] == ckpt.name and len(extra["source_sha256"]) == 64
