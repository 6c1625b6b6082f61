"""SCTA: parity with the authors' code (encoders, sharded similarity with the random fc2, losses, gradients),
the fc2 modes, checkpoint loading, tokenizer, learning on synthetic pictures."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import itmzoo
from itmzoo.checkpoints.safe import CheckpointError
from itmzoo.encoders.vit import _rename_layer_key
from itmzoo.eval.similarity import similarity_matrix
from itmzoo.models.scta import TINY_OVERRIDES, SCTATokenizer, convert_official, draw_fc2

FIX = Path(__file__).parent / "fixtures" / "scta"
TOL = 1e-5


def _fixture(name: str) -> tuple[dict, dict]:
    z = np.load(FIX / f"scta_{name}.npz", allow_pickle=False)
    return json.loads((FIX / f"scta_{name}.json").read_text()), {k: z[k] for k in z.files}


def _state(z: dict) -> dict[str, torch.Tensor]:
    return {k[len("state."):]: torch.from_numpy(v) for k, v in z.items() if k.startswith("state.")}


def _close(a, b, tol: float = TOL) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def _tiny_overrides(meta: dict, **kw) -> dict:
    bert = {k: v for k, v in meta["bert_config"].items()}
    return dict(vit_config=meta["vit_config"], bert_config=bert, num_patches=meta["num_patches"], **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The upstream tiny model as an official file, loaded through build(checkpoint=)."""
    meta, z = _fixture("tiny")
    path = tmp_path_factory.mktemp("scta") / "model_best.pth"
    torch.save({"model": _state(z), "opt": argparse.Namespace(**meta["opt"]), "epoch": 1}, path)
    model = itmzoo.build("scta", checkpoint=str(path), **_tiny_overrides(meta))
    return meta, z, model


def _text(z: dict, prefix: str = "") -> dict:
    return {"input_ids": torch.from_numpy(z[f"{prefix}ids"]), "lengths": torch.from_numpy(z[f"{prefix}lens"])}


def _draws(z: dict, prefix: str, ks: list[int], hidden: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    w, b = torch.from_numpy(z[f"{prefix}_fc2_w"]), torch.from_numpy(z[f"{prefix}_fc2_b"])
    out, ow, ob = [], 0, 0
    for k in ks:
        out.append((w[ow: ow + k * hidden].view(k, hidden), b[ob: ob + k]))
        ow, ob = ow + k * hidden, ob + k
    return out


# ------------------------------------------------------------------------------------- tiny, end to end


def test_tiny_encoders_match_upstream(tiny):
    _meta, z, model = tiny
    model.eval()
    with torch.no_grad():
        img = model.encode_image({"pixels": torch.from_numpy(z["pixels"])})
        txt = model.encode_text(_text(z))
    _close(img["tokens"], z["img_emb"])
    # evaluation keeps max_word = 90 embeddings (caption 6 has more tokens)
    assert z["lens"].max() > 90 and txt["tokens"].shape[1] == 90
    _close(txt["tokens"], z["cap_emb"][:, :90])
    assert txt["mask"].sum(1).tolist() == np.minimum(z["lens"], 90).tolist()


@pytest.mark.parametrize("shard", [256, 3])
def test_tiny_sharded_similarity_matches_upstream(tiny, shard):
    """The reference generator reproduces upstream's fc2 draws bit for bit, and the scores at both shard sizes."""
    meta, z, model = tiny
    seed, ks = meta[f"seed_shard{shard}"], meta[f"ks_shard{shard}"]
    hidden = model.config.hidden_dim
    gen = torch.Generator().manual_seed(seed)
    for (w, b), (uw, ub) in zip([draw_fc2(k, hidden, gen) for k in ks], _draws(z, f"shard{shard}", ks, hidden)):
        assert torch.equal(w, uw) and torch.equal(b, ub)
    model.eval()
    with torch.no_grad():
        img = model.encode_image({"pixels": torch.from_numpy(z["pixels"])})
        txt = model.encode_text(_text(z))
    model.config.fc2_seed = seed
    try:
        sims = similarity_matrix(model, img, txt, block=(shard, shard), progress=False)
    finally:
        model.config.fc2_seed = 0
    _close(sims, z[f"sims_shard{shard}"])


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_tiny_training_loss_and_gradients_match_upstream(tiny, mode):
    meta, z, model = tiny
    info = meta[f"train_{mode}"]
    model.train()
    model.on_epoch_start(0 if mode == "sum" else 1)
    model.loss_alpha = info["alpha"]
    model.zero_grad()
    batch = {"pixels": torch.from_numpy(z["pixels"])[[0, 0, 1, 2]], **_text(z, "train_"),
             "image_index": torch.from_numpy(z["train_img_ids"])}
    torch.manual_seed(info["seed"])  # training draws fc2 from the global CPU stream, as upstream
    out = model(batch)
    _close(out["loss"].detach(), z[f"train_{mode}_loss"])
    out["loss"].backward()
    prefix = f"train_{mode}_grad."
    up_grads = {k[len(prefix):]: v for k, v in z.items() if k.startswith(prefix)}  # transformers-5 names
    mine = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(up_grads) <= set(mine)
    for k, g in up_grads.items():
        _close(mine[k], g)
    # the slot bias of the patch aggregator cancels in the softmax: zero gradient up to rounding
    assert model.cross_net.img_aggr_net.weight[3].bias.grad.abs().max() < 1e-6
    model.eval()


def test_tokenizer_matches_upstream(tmp_path):
    meta, _ = _fixture("tiny")
    (tmp_path / "vocab.txt").write_text("\n".join(meta["vocab"]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    tok = SCTATokenizer(str(tmp_path))
    assert [tok.encode(c) for c in meta["captions"]] == meta["eval_ids"]
    rng = random.Random(meta["aug_seed"])
    aug = []
    for c in meta["captions"]:
        for _ in range(3):
            b = tok([c], train=True, rng=rng)
            aug.append(b["input_ids"][0, : b["lengths"][0]].tolist())
    assert aug == meta["aug_ids"]


# ----------------------------------------------------------------------------------- full-size cross-net


def _full_inputs(meta: dict) -> dict[str, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("scta_make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = mod.full_inputs()
    for k, v in meta["input_checksums"].items():
        assert abs(float(x[k].double().abs().sum()) - v) <= 1e-9 * max(1.0, abs(v)), k
    return x


@pytest.fixture(scope="module")
def full():
    meta, z = _fixture("full")
    model = itmzoo.build("scta", embed_size=512, num_patches=196,
                         vit_config={**TINY_OVERRIDES["scta"]["vit_config"], "image_size": 224},
                         bert_config=TINY_OVERRIDES["scta"]["bert_config"])
    model.cross_net.load_state_dict({k.removeprefix("cross_net."): v
                                     for k, v in _state(z).items()}, strict=True)
    return meta, z, model, _full_inputs(meta)


def _txt_feats(cap: torch.Tensor, lens: torch.Tensor, max_word: int = 90) -> dict:
    n = lens.clamp(max=max_word)
    return {"tokens": cap[:, :max_word], "mask": torch.arange(min(cap.shape[1], max_word))[None] < n[:, None]}


@pytest.mark.parametrize("shard", [256, 3])
def test_full_size_similarity_matches_upstream(full, shard):
    """196 patches, 98 kept, 29 slots, 512-d; image scales 0.01..10; captions of 2..120 tokens."""
    meta, z, model, x = full
    assert model.config.num_slots == 29 and model.config.hidden_dim == 102
    assert model.caption_token_counts(np.minimum(meta["cap_lens"], 90)) == meta["ks_shard256"][: len(meta["cap_lens"])]
    model.config.fc2_seed = meta[f"seed_shard{shard}"]
    try:
        sims = similarity_matrix(model, {"tokens": x["img"]}, _txt_feats(x["cap"], x["lens"]), block=(shard, shard),
                                 progress=False)
        # the same draws as upstream (sums of weight + bias per draw, in draw order)
        model.eval()
        gen = model._eval_gen
        sums = [float(w.double().sum() + b.double().sum())
                for w, b in (draw_fc2(k, 102, gen) for k in meta[f"ks_shard{shard}"])]
    finally:
        model.config.fc2_seed = 0
    np.testing.assert_allclose(sums, meta[f"fc2_sums_shard{shard}"], rtol=0, atol=1e-9)
    _close(sims, z[f"sims_shard{shard}"])


def test_full_size_training_loss_and_gradients_match_upstream(full):
    _meta, z, model, x = full
    model.train()
    model.on_epoch_start(1)          # hardest negatives
    model.loss_alpha = 1.0
    model.zero_grad()
    img = x["train_img"].clone().requires_grad_(True)
    cap = x["train_cap"].clone().requires_grad_(True)
    torch.manual_seed(7)
    feats = _txt_feats(cap, x["train_lens"], max_word=10 ** 6)
    sims = model.cross_scores({"tokens": img}, feats)
    out = model.loss_from_scores(sims, x["train_img_ids"], img.shape[1])
    _close(sims.detach(), z["train_sims"])
    _close(out["loss"].detach(), z["train_loss"])
    assert out["monitor"].item() == 0.0 and z["train_score_mask_mean"] == 0.5
    out["loss"].backward()
    _close(cap.grad, z["train_grad_cap"])
    _close(img.grad.norm(dim=-1), z["train_grad_img_norm"])
    _close(img.grad[:, :, :16], z["train_grad_img_slice"])
    for k, p in model.cross_net.named_parameters():
        _close(p.grad, z[f"train_grad.{k}"])
    model.eval()


# ----------------------------------------------------------------------------------- modes and loading


def _tiny_model(**kw):
    torch.manual_seed(0)
    return itmzoo.build("scta", **{**TINY_OVERRIDES["scta"], **kw}).eval()


def _tiny_feats(model, n_img=5, n_cap=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n_cap, 14), generator=g)
    lens = torch.tensor([14, 2, 3, 9, 5, 12, 7][:n_cap])
    ids[:, 0] = 2
    for i, n in enumerate(lens.tolist()):
        ids[i, n - 1], ids[i, n:] = 3, 0
    with torch.no_grad():
        return (model.encode_image({"pixels": torch.randn(n_img, 3, 64, 64, generator=g)}),
                model.encode_text({"input_ids": ids, "lengths": lens}))


def test_reference_mode_depends_on_blocks_fixed_mode_does_not():
    ref = _tiny_model()
    img, txt = _tiny_feats(ref)
    a = similarity_matrix(ref, img, txt, block=(256, 256), progress=False)
    assert torch.equal(a, similarity_matrix(ref, img, txt, block=(256, 256), progress=False))  # reseeded by eval()
    assert (a - similarity_matrix(ref, img, txt, block=(2, 3), progress=False)).abs().max() > 1e-4
    fixed = _tiny_model(cap_fc2="fixed")
    f1 = similarity_matrix(fixed, img, txt, block=(256, 256), progress=False)
    f2 = similarity_matrix(fixed, img, txt, block=(2, 3), progress=False)
    _close(f1, f2, 1e-6)
    assert fixed.eval_settings().seed is None and ref.eval_settings() .seed == 0
    assert ref.eval_settings().block == (256, 256)


def test_batched_scores_equal_per_pair_scores():
    """Tiling over images and captions (sim_tile_pairs) gives the scores of one pair at a time."""
    model = _tiny_model(cap_fc2="fixed", sim_tile_pairs=4)
    img, txt = _tiny_feats(model)
    whole = model.similarity(img, txt)
    for i in range(whole.shape[0]):
        for j in range(whole.shape[1]):
            one = model.similarity({"tokens": img["tokens"][i:i + 1]},
                                   {k: v[j:j + 1, : int(txt["mask"][j].sum())] for k, v in txt.items()})
            _close(one[0, 0], whole[i, j], 1e-6)
    assert whole.min() >= -0.2 - 1e-6 and whole.max() <= 2 + 1e-6


def test_save_and_load_native_round_trip(tmp_path):
    model = _tiny_model(cap_fc2="fixed")
    img, txt = _tiny_feats(model)
    model.save_pretrained(tmp_path / "native")
    again = itmzoo.load(tmp_path / "native").eval()
    img2, txt2 = _tiny_feats(again)
    _close(img2["tokens"], img["tokens"], 0)
    _close(again.similarity(img2, txt2), model.similarity(img, txt), 0)


def test_checkpoint_with_transformers4_vit_names_loads_strictly(tiny, tmp_path):
    meta, z, _model = tiny
    vit = "img_enc.visual_encoder."
    state = {(vit + _rename_layer_key(k[len(vit):], "v4") if k.startswith(vit) else k): v for k, v in _state(z).items()}
    assert any(".encoder.layer.0.attention.attention.query." in k for k in state)
    state["txt_enc.bert.embeddings.position_ids"] = torch.arange(160)[None]  # old files keep it; ignored
    path = tmp_path / "v4.pth"
    torch.save({"model": state, "opt": argparse.Namespace(**meta["opt"])}, path)
    m4 = itmzoo.build("scta", checkpoint=str(path), **_tiny_overrides(meta)).eval()
    with torch.no_grad():
        _close(m4.encode_image({"pixels": torch.from_numpy(z["pixels"])})["tokens"], z["img_emb"])
    # a file missing the ViT layers is an error, not a silently random backbone
    del state["img_enc.visual_encoder.encoder.layer.0.attention.attention.query.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="q_proj"):
        itmzoo.build("scta", checkpoint=str(path), **_tiny_overrides(meta))


def test_laps_and_swin_checkpoints_are_refused(tiny):
    _meta, z, _ = tiny
    state = {k.replace("cross_net.img_aggr_net.", "cross_net.aggr_net."): v for k, v in _state(z).items()
             if not k.startswith("cross_net.cap_aggr_net.")}
    with pytest.raises(CheckpointError, match="LAPS"):
        convert_official({"model": state})
    with pytest.raises(CheckpointError, match="Swin"):
        convert_official({"model": _state(z), "opt": argparse.Namespace(vit_type="swin")})
    with pytest.raises(CheckpointError, match="29|slots"):
        convert_official({"model": _state(z), "opt": argparse.Namespace(num_patches=196, img_aggr_ratio=0.3,
                                                                       img_sparse_ratio=0.5)})


def test_config_errors():
    with pytest.raises(Exception, match="num_patches"):
        itmzoo.build("scta", **{**TINY_OVERRIDES["scta"], "num_patches": 196})
    with pytest.raises(Exception, match="cap_fc2"):
        itmzoo.build("scta", **{**TINY_OVERRIDES["scta"], "cap_fc2": "learned"})
    model = _tiny_model()
    with pytest.raises(ValueError, match="CLS"):
        model.encode_text({"input_ids": torch.tensor([[2, 0]]), "lengths": torch.tensor([1])})


def test_hooks_warmup_and_param_groups():
    model = _tiny_model()
    model.on_step_start(0, 25, 100)
    assert model.loss_alpha == 0.25
    model.on_step_start(1, 25, 100)
    assert model.loss_alpha == 1.0
    groups = model.param_groups(2e-4)
    assert [g["name"] for g in groups] == ["text_fc", "bert", "vit", "vision_proj", "cross_net"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 2e-5, 2e-5, 2e-4, 2e-4])
    n = sum(len(g["params"]) for g in groups)
    assert n == len([p for p in model.parameters() if p.requires_grad])


def test_keep_mask_ties_fall_back_to_upstream_sort():
    """Duplicated patches tie at the keep boundary: exactly keep_n are kept, chosen as upstream's sort does."""
    from itmzoo.models.scta import SCTA

    g = torch.Generator().manual_seed(3)
    pn = torch.nn.functional.normalize(torch.randn(2, 16, 8, generator=g), dim=-1)
    pn[:, 8:] = pn[:, :8]                                    # every score appears twice
    a_self = (torch.nn.functional.normalize(pn.mean(1, keepdim=True), dim=-1) * pn).sum(-1)
    q = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    keep, _score = SCTA._keep_mask(pn, a_self, q, 7)
    assert keep.sum(-1).eq(7).all()
    for i in range(2):
        for j in range(3):
            exact = a_self[i] + (q[j][None] * pn[i]).sum(-1)
            idx = torch.sort(exact, descending=True).indices[:7]
            assert keep[i, j].nonzero().squeeze(1).tolist() == sorted(idx.tolist())


# ------------------------------------------------------------------------------------------ learning


def test_learns_on_synthetic_pictures():
    """Tiny ViT + BERT from scratch, through the shared trainer: test rsum far above chance after 3 epochs."""
    from itmzoo.data.synthetic import SyntheticShapes
    from itmzoo.eval import evaluate
    from itmzoo.train.engine import fit
    from itmzoo.train.run import chance_metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = SyntheticShapes({"train": 300, "test": 100}, seed=0, image_size=64)
        train, test = ds.split("train", "pixels"), ds.split("test", "pixels")
        torch.manual_seed(0)
        tiny = TINY_OVERRIDES["scta"]
        model = itmzoo.build("scta", **{**tiny,
                                        "bert_config": {**tiny["bert_config"], "vocab_size": 76,
                                                        "hidden_dropout_prob": 0.0},
                                        "backbone_lr_mult": 1.0, "vse_mean_warmup_epochs": 100,
                                        "loss_warmup_epoch": None})
        before = evaluate(model, test, "full", progress=False)["rsum"]
        fit(model, train, {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4,
                           "progress": False, "log_every": 1000})
        after = evaluate(model, test, "full", progress=False)["rsum"]
    finally:
        torch.set_num_threads(threads)
    chance = chance_metrics(test.caption_to_image)["rsum"]  # about 32 for 100 images x 5 captions
    assert after > 2 * chance and after > before + 25, (chance, before, after)


@pytest.mark.parametrize("name", ["scta_f30k", "scta_coco", "scta_demo_synthetic"])
def test_run_configs_are_valid(name):
    from itmzoo.config import load_run_config
    from itmzoo.registry import resolve_config
    from itmzoo.train.run import parse_run_config

    run = parse_run_config(load_run_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml"))
    entry, cfg = resolve_config(run.model_name, run.model_fields)
    assert entry.name == "scta" and cfg.margin == 0.2
    if name != "scta_demo_synthetic":  # the authors' recipe
        t = run.train
        assert (t.lr, t.epochs, t.lr_decay_epochs, t.lr_decay_factor, t.grad_clip, t.optimizer, t.weight_decay) == \
            (2e-4, 30, [9, 15, 20, 25], 0.3, 2.0, "adamw", 1e-4)
        assert t.batch_size == (128 if "f30k" in name else 64)
        assert (cfg.num_slots, cfg.hidden_dim, cfg.vse_mean_warmup_epochs, cfg.loss_warmup_epoch) == (29, 102, 1, 0)
        assert cfg.vit_pretrained == "google/vit-base-patch16-224-in21k" and cfg.bert_pretrained == "bert-base-uncased"
        assert run.eval.protocol == ("f30k-1k" if "f30k" in name else "coco-1k-5fold")


def test_backward_reaches_every_trainable_parameter_and_accumulation_is_exact():
    """One loss over a batch reaches every trainable parameter; two micro-batches give the same gradients."""
    model = _tiny_model(cap_fc2="fixed").train()
    model.on_epoch_start(1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (4, 9), generator=g)
    lens = torch.tensor([9, 4, 6, 3])
    ids[:, 0] = 2
    for i, n in enumerate(lens.tolist()):
        ids[i, n - 1], ids[i, n:] = 3, 0
    batch = {"pixels": torch.randn(4, 3, 64, 64, generator=g), "input_ids": ids, "lengths": lens,
             "image_index": torch.tensor([0, 1, 1, 2])}
    for m in model.modules():  # dropout off, so the two passes see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.zero_grad()
    model(batch)["loss"].backward()
    whole = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    missing = [k for k, v in whole.items() if v is None]
    assert not missing and all(not p.requires_grad for k, p in model.named_parameters() if ".pooler." in k)
    from itmzoo.features import cat_features

    model.zero_grad()
    parts = [model.train_features({k: v[s] for k, v in batch.items()}) for s in (slice(0, 2), slice(2, 4))]
    feats = {"image": cat_features([p["image"] for p in parts]), "text": cat_features([p["text"] for p in parts])}
    model.train_loss(feats, batch)["loss"].backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            _close(p.grad, whole[k], 1e-5)
