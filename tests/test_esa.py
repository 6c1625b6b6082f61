"""ESA (BiGRU and BERT): parity with the upstream code, official checkpoints, tokenizers, learning.

Fixtures (tests/fixtures/esa/, see docs/fixtures/esa.md) were produced once by running the authors'
code with parameters filled by `parity_utils.fill_value`; no upstream code runs here.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_utils import WORDS, bert_base_uncased_slice, tiny_bert_folder
from parity_utils import filled_state_dict, load_npz

import itmzoo
from itmzoo.checkpoints.safe import CheckpointError
from itmzoo.data.collate import collate_images
from itmzoo.models.esa import ESABertTokenizer, ESAWordTokenizer, convert_official, sel_loss

FIX = Path(__file__).parent / "fixtures" / "esa"
TOL = 1e-5


def _fixture(variant: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((FIX / f"esa_{variant}.json").read_text())
    return meta, load_npz(FIX / f"esa_{variant}.npz")


def _upstream_parts(meta: dict, seed: int | None = None) -> tuple[dict, dict]:
    """The two upstream state dicts (upstream names) filled with the fixture rule."""
    seed = meta["seed"] if seed is None else seed
    parts = []
    for part in ("img_enc", "txt_enc"):
        filled = filled_state_dict({f"{part}.{k}": s for k, s in meta[part].items()}, seed)
        parts.append({k[len(part) + 1:]: v for k, v in filled.items()})
    return parts[0], parts[1]


def _tiny_overrides(variant: str, meta: dict) -> dict:
    if variant == "bigru":
        c = meta["config"]
        return dict(img_dim=c["img_dim"], embed_size=c["embed_size"], word_dim=c["word_dim"],
                    vocab_size=c["vocab_size"])
    bert = {k: v for k, v in meta["bert_config"].items() if k != "model_type"}
    return dict(img_dim=meta["config"]["img_dim"], embed_size=meta["config"]["embed_size"], pretrained=None,
                bert_config=bert)


def _official_file(tmp_path: Path, variant: str, img: dict, txt: dict, opt: argparse.Namespace | None = None) -> Path:
    """A checkpoint laid out as the authors' train.py writes it."""
    if variant == "bert":  # ESA_BERT wraps both encoders in DataParallel; transformers 4.15 saved position_ids
        n_pos = txt["bert.embeddings.position_embeddings.weight"].shape[0]
        txt = {**txt, "bert.embeddings.position_ids": torch.arange(n_pos)[None]}
        img, txt = ({f"module.{k}": v for k, v in d.items()} for d in (img, txt))
    opt = opt or argparse.Namespace(data_name="f30k", margin=0.2, hardnum=2, embed_size=16, precomp_enc_type="basic",
                                    max_violation=True, vocab_size=30)
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 12, "model": [img, txt], "best_rsum": 321.0, "opt": opt, "Eiters": 1234}, path)
    return path


@pytest.fixture(scope="module", params=["bigru", "bert"])
def parity(request, tmp_path_factory):
    variant = request.param
    meta, z = _fixture(variant)
    img, txt = _upstream_parts(meta)
    path = _official_file(tmp_path_factory.mktemp(variant), variant, img, txt)
    return variant, meta, z, path


def _load(parity_case) -> torch.nn.Module:
    variant, meta, _, path = parity_case
    return itmzoo.build(f"esa_{variant}", checkpoint=str(path), **_tiny_overrides(variant, meta))


class FixedMaskDropout(torch.nn.Module):
    """Dropout replaying the keep mask the upstream run drew."""

    def __init__(self, keep: np.ndarray, p: float) -> None:
        super().__init__()
        self.keep = torch.from_numpy(keep)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * self.keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def _train_batch(z: dict) -> dict:
    keep = torch.stack([_t(z["train_rand1"]) >= 0.2, _t(z["train_rand2"]) >= 0.2], 1)
    return {"regions": _t(z["images"]), "region_lengths": _t(z["image_lengths"]), "input_ids": _t(z["captions"]),
            "lengths": _t(z["lengths"]), "views_input_ids": _t(z["captions_train"]),
            "views_lengths": _t(z["lengths_train"]), "region_view_keep": keep}


# ------------------------------------------------------------------------------------------------ parity


def test_parity_eval(parity):
    _, _, z, _ = parity
    model = _load(parity)
    assert not model.training
    with torch.no_grad():
        img = model.encode_image({"regions": _t(z["images"]), "region_lengths": _t(z["image_lengths"])})
        cap = model.encode_text({"input_ids": _t(z["captions"]), "lengths": _t(z["lengths"])})
        sims = model.similarity(img.double(), cap.double())
    np.testing.assert_allclose(img.numpy(), z["img_eval"], atol=TOL, rtol=0)
    np.testing.assert_allclose(cap.numpy(), z["cap_eval"], atol=TOL, rtol=0)
    np.testing.assert_allclose(sims.numpy(), z["sims_eval"], atol=TOL, rtol=0)
    # hardnum = 1 reduces SEL to the VSE++ hinge
    for key, mv in (("eval_h1_vse0", False), ("eval_h1_maxviol", True)):
        c_im, c_s = sel_loss(img, cap, 1, 0.2, mv)
        np.testing.assert_allclose([c_im.item(), c_s.item()], z[key], atol=TOL, rtol=0)


def test_parity_train(parity):
    _, meta, z, _ = parity
    for epoch, key in ((0, "sel_vse0"), (1, "sel_maxviol")):
        model = _load(parity).train()
        model.txt_enc.dropout = FixedMaskDropout(z["txt_dropout_keep"], 0.1)
        model.on_epoch_start(epoch)
        batch = _train_batch(z)
        out = model(batch)
        np.testing.assert_allclose([out["cost_im"].item(), out["cost_s"].item()], z[key], atol=TOL, rtol=0)
        np.testing.assert_allclose(out["loss"].item(), z[key].sum(), atol=TOL, rtol=0)
        # BatchNorm running statistics after that one forward (bns.1 is dead upstream)
        for b in (0, 1):
            for k in ("running_mean", "running_var", "num_batches_tracked"):
                got = getattr(model.img_enc.mlp.bns[b], k).numpy()
                np.testing.assert_allclose(got, z[f"after_train.mlp.bns.{b}.{k}"], atol=TOL, rtol=0)
        # gradients of cost_im + cost_s, parameter by parameter
        out["loss"].backward()
        params = dict(model.named_parameters())
        norms = [0.0 if params[n].grad is None else params[n].grad.norm().item() for n in meta["grad_names"]]
        np.testing.assert_allclose(norms, z[f"grad_norm_{key[4:]}"], atol=1e-4, rtol=1e-4)

    # the embeddings themselves, and the seeded view masks (same CPU-generator draws as upstream)
    model = _load(parity).train()
    model.txt_enc.dropout = FixedMaskDropout(z["txt_dropout_keep"], 0.1)
    batch = _train_batch(z)
    torch.manual_seed(meta["train_rand_seed"])
    img_seeded = model.encode_image({k: batch[k] for k in ("regions", "region_lengths")})
    model = _load(parity).train()
    model.txt_enc.dropout = FixedMaskDropout(z["txt_dropout_keep"], 0.1)
    img = model.encode_image(batch, view_keep=batch["region_view_keep"])
    cap = model.txt_enc(batch["views_input_ids"], batch["views_lengths"])
    np.testing.assert_allclose(img.detach().numpy(), z["img_train"], atol=TOL, rtol=0)
    np.testing.assert_allclose(img_seeded.detach().numpy(), z["img_train"], atol=TOL, rtol=0)
    np.testing.assert_allclose(cap.detach().numpy(), z["cap_train"], atol=TOL, rtol=0)
    np.testing.assert_allclose((img @ cap.t()).detach().numpy(), z["sims_train"], atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------- official checkpoints


def test_official_checkpoint_round_trip_save_pretrained(parity, tmp_path):
    variant, meta, z, path = parity
    model = _load(parity)
    out = model.save_pretrained(tmp_path / "native")
    again = itmzoo.load(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    with torch.no_grad():
        cap = again.encode_text({"input_ids": _t(z["captions"]), "lengths": _t(z["lengths"])})
    np.testing.assert_allclose(cap.numpy(), z["cap_eval"], atol=TOL, rtol=0)


def test_convert_official_infers_sizes_and_variant():
    meta, _ = _fixture("bigru")
    img, txt = _upstream_parts(meta)
    overrides, state, ignorable = convert_official({"model": [img, txt]}, variant="bigru")
    assert overrides == {"img_dim": 32, "embed_size": 16, "vocab_size": 30, "word_dim": 12, "num_layers": 1}
    assert set(state) == {f"img_enc.{k}" for k in img} | {f"txt_enc.{k}" for k in txt}
    assert ignorable == []
    with pytest.raises(CheckpointError, match="esa_bigru"):
        convert_official({"model": [img, txt]}, variant="bert")
    with pytest.raises(CheckpointError, match=r"\[img_enc"):
        convert_official({"model": {"fc.weight": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match="raw images"):
        convert_official({"model": [img, txt], "opt": argparse.Namespace(precomp_enc_type="backbone")})


def test_official_checkpoint_strict_errors(tmp_path):
    meta, _ = _fixture("bigru")
    img, txt = _upstream_parts(meta)
    ov = _tiny_overrides("bigru", meta)
    # an unexpected key and a missing key are both named
    bad_txt = dict(txt)
    bad_txt["gpool.linear.weight"] = torch.zeros(1, 32)
    del bad_txt["linear1.bias"]
    path = _official_file(tmp_path, "bigru", img, bad_txt)
    with pytest.raises(CheckpointError) as e:
        itmzoo.build("esa_bigru", checkpoint=str(path), **ov)
    assert "txt_enc.gpool.linear.weight" in str(e.value) and "txt_enc.linear1.bias" in str(e.value)
    # the file's vocabulary size (json + <mask>) wins over a conflicting request
    path = _official_file(tmp_path, "bigru", img, txt)
    with pytest.raises(CheckpointError, match="vocab_size=30"):
        itmzoo.build("esa_bigru", checkpoint=str(path), **{**ov, "vocab_size": 29})
    # a BERT file given to the BiGRU model
    bmeta, _ = _fixture("bert")
    bimg, btxt = _upstream_parts(bmeta)
    path = _official_file(tmp_path, "bert", bimg, btxt)
    with pytest.raises(CheckpointError, match="esa_bert"):
        itmzoo.build("esa_bigru", checkpoint=str(path), **ov)


class _Payload:
    """Anything outside the allow-list (here: a class defined in this test module)."""


def test_disallowed_pickle_global_is_refused(tmp_path):
    meta, _ = _fixture("bigru")
    img, txt = _upstream_parts(meta)
    path = tmp_path / "model_best.pth"
    torch.save({"model": [img, txt], "opt": _Payload()}, path)
    with pytest.raises(CheckpointError, match="_Payload"):
        itmzoo.build("esa_bigru", checkpoint=str(path), **_tiny_overrides("bigru", meta))


# ---------------------------------------------------------------------------------- tokenizers and GloVe


def _ragged(z: dict, name: str) -> list[list[int]]:
    lengths, ids = z[f"{name}_lengths"], z[f"{name}_ids"]
    off = np.concatenate([[0], np.cumsum(lengths)])
    return [ids[off[i]:off[i + 1]].tolist() for i in range(len(lengths))]


def _rows(batch: dict, prefix: str = "") -> list[list[int]]:
    ids, lengths = batch[f"{prefix}input_ids"], batch[f"{prefix}lengths"]
    return [ids[i, : lengths[i]].tolist() for i in range(len(lengths))]


def _augment_fixture() -> tuple[dict, dict]:
    return json.loads((FIX / "esa_augment.json").read_text()), load_npz(FIX / "esa_augment.npz")


def _write_vocab(tmp_path: Path, words: list[str]) -> Path:
    p = tmp_path / "f30k_precomp_vocab.json"
    p.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                             "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}))
    return p


def _augmented_rows(tok, captions, seed):
    """Eval ids and augmented training views of each caption, drawing from one seeded stream as upstream."""
    rng = random.Random(seed)
    evals, trains = [], []
    for cap in captions:
        evals += _rows(tok([cap]))  # eval ids draw nothing from the stream
        trains += _rows(tok([cap], train=True, rng=rng), "views_")
    return evals, trains


def test_bigru_word_augmentation_matches_upstream(tmp_path):
    meta, z = _augment_fixture()
    vocab_path = _write_vocab(tmp_path, meta["vocab_words"])
    model = itmzoo.build("esa_bigru", img_dim=32, embed_size=16, word_dim=12, vocab_size=len(meta["vocab_words"]) + 1,
                         vocab_path=str(vocab_path))
    tok = model.tokenizer
    assert isinstance(tok, ESAWordTokenizer) and tok.mask_id == meta["mask_id"]
    evals, trains = _augmented_rows(tok, meta["gru_captions"], meta["gru_seed"])
    assert evals == _ragged(z, "gru_eval")
    assert trains == _ragged(z, "gru_train")


def test_bert_word_augmentation_matches_upstream(tmp_path):
    meta, z = _augment_fixture()
    local = bert_base_uncased_slice(tmp_path / "tok")  # bert-base-uncased's ids and size, only the rows used
    model = itmzoo.build("esa_bert", img_dim=32, embed_size=16, pretrained=None, tokenizer=str(local),
                         bert_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=37))
    tok = model.tokenizer
    assert isinstance(tok, ESABertTokenizer)
    evals, trains = _augmented_rows(tok, meta["bert_captions"], meta["bert_seed"])
    assert evals == _ragged(z, "bert_eval")
    assert trains == _ragged(z, "bert_train")


def test_glove_init_follows_upstream_rule(tmp_path):
    meta, z = _augment_fixture()
    vocab_path = _write_vocab(tmp_path, meta["vocab_words"])
    glove = tmp_path / "glove.txt"
    with open(glove, "w", encoding="utf-8") as f:
        f.write(f"{len(meta['glove_words'])} {meta['glove_dim']}\n")  # a header line is skipped
        for w, v in zip(meta["glove_words"], z["glove_vectors"]):
            f.write(w + " " + " ".join(f"{x:.4f}" for x in v) + "\n")
    model = itmzoo.build("esa_bigru", img_dim=32, embed_size=16, word_dim=12,
                         vocab_size=len(meta["vocab_words"]) + 1, vocab_path=str(vocab_path), glove_path=str(glove))
    emb = model.txt_enc.embed.weight.detach()
    src = z["glove_src_row"]
    for i, s in enumerate(src):
        if s >= 0:
            np.testing.assert_array_equal(emb[i].numpy(), z["glove_vectors"][s])
        else:
            assert not any(np.array_equal(emb[i].numpy(), v) for v in z["glove_vectors"]), meta["vocab_words"][i:i + 1]


def test_bigru_vocab_size_checked(tmp_path):
    vocab_path = _write_vocab(tmp_path, ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"])
    model = itmzoo.build("esa_bigru", img_dim=8, embed_size=8, word_dim=4, vocab_size=8, vocab_path=str(vocab_path))
    with pytest.raises(ValueError, match="vocab_size=8"):
        _ = model.tokenizer
    with pytest.raises(ValueError, match="vocab_path"):
        _ = itmzoo.build("esa_bigru", img_dim=8, embed_size=8, word_dim=4, vocab_size=8).tokenizer


# ------------------------------------------------------------------------------------------------ ensemble


def test_ensemble_matches_upstream_eval_ensemble(tmp_path):
    from itmzoo.eval import ensemble_similarity, metrics_from_sims

    meta_e = json.loads((FIX / "esa_ensemble.json").read_text())
    z = load_npz(FIX / "esa_ensemble.npz")
    meta, _ = _fixture("bigru")
    sims = []
    for k, seed in enumerate(meta_e["seeds"]):
        img, txt = _upstream_parts(meta, seed)
        d = tmp_path / str(k)
        d.mkdir()
        model = itmzoo.build("esa_bigru", checkpoint=str(_official_file(d, "bigru", img, txt)),
                             **_tiny_overrides("bigru", meta))
        with torch.no_grad():
            ie = model.encode_image({"regions": _t(z["images"])})
            ce = model.encode_text({"input_ids": _t(z["captions"]), "lengths": _t(z["lengths"])})
        s = model.similarity(ie.double(), ce.double())
        np.testing.assert_allclose(s.numpy(), z[f"sims_model{k}"], atol=TOL, rtol=0)
        sims.append(s)
    c2i = np.arange(z["captions"].shape[0]) // 5
    mean = ensemble_similarity(sims)
    for protocol, key in (("full", "full"), ("5fold", "fold5")):
        got = metrics_from_sims(mean, c2i, protocol)
        i2t = [got[f"i2t_{m}"] for m in ("r1", "r5", "r10", "medr", "meanr")]
        t2i = [got[f"t2i_{m}"] for m in ("r1", "r5", "r10", "medr", "meanr")]
        np.testing.assert_allclose(i2t, z[f"{key}_i2t"], atol=1e-9)
        np.testing.assert_allclose(t2i, z[f"{key}_t2i"], atol=1e-9)
        np.testing.assert_allclose(got["rsum"], z[f"{key}_rsum"], atol=1e-9)


# ------------------------------------------------------------------------------------------ model contract


def _tiny_bigru(tmp_path: Path, **kw) -> torch.nn.Module:
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "sits", "red", "blue", "ball"]
    vocab_path = _write_vocab(tmp_path, words)
    return itmzoo.build("esa", img_dim=8, embed_size=8, word_dim=6, vocab_size=len(words) + 1,
                        vocab_path=str(vocab_path), **kw)


def test_contract_shapes_backward_and_blocks(tmp_path):
    from itmzoo.eval import similarity_matrix

    torch.manual_seed(0)
    model = _tiny_bigru(tmp_path)
    assert model.registry_name == "esa_bigru"
    caps = ["a dog runs", "a red ball", "a cat sits", "blue dog"]
    regions = torch.randn(4, 5, 8)
    batch = {"regions": regions, "region_lengths": torch.tensor([5, 5, 3, 5]),
             **model.tokenizer(caps, train=True, rng=random.Random(0)), "image_index": torch.arange(4)}
    assert batch["views_input_ids"].shape[0] == 8
    assert "input_ids" not in batch  # the loss reads only the copies: no third encoding per caption
    model.train()
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    dead = {"img_enc.mlp.bns.1.weight", "img_enc.mlp.bns.1.bias"}  # upstream's unused BatchNorm
    for n, p in model.named_parameters():
        if n in dead:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    with torch.no_grad():
        img = model.encode_image(batch)
        txt = model.encode_text(model.tokenizer(caps))
        full = model.similarity(img, txt)
    assert img.shape == (4, 8) and txt.shape == (4, 8)
    torch.testing.assert_close(similarity_matrix(model, img, txt, block=(3, 2), progress=False), full)
    # padded regions are left out of the pooling: image 2 equals itself encoded unpadded
    with torch.no_grad():
        alone = model.encode_image({"regions": regions[2:3, :3], "region_lengths": torch.tensor([3])})
    torch.testing.assert_close(alone[0], img[2], atol=1e-6, rtol=0)
    # config JSON round trip
    cfg = type(model.config).from_dict(json.loads(model.config.to_json()))
    assert cfg == model.config


def test_param_groups_bert_lr(tmp_path):
    model = itmzoo.build("esa_bert", img_dim=8, embed_size=8, pretrained=None,
                         bert_config=dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=16, max_position_embeddings=16))
    groups = {g["name"]: g for g in model.param_groups(5e-4)}
    assert groups["bert"]["lr"] == pytest.approx(5e-5) and groups["image"]["lr"] == 5e-4
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(model.parameters()))


def test_registry_names_and_tags():
    names = itmzoo.list_models("esa*", include_tags=True)
    assert {"esa_bigru.f30k", "esa_bigru.coco", "esa_bert.f30k", "esa_bert.coco"} <= set(names)
    info = itmzoo.model_info("esa.coco")  # alias + tag
    assert info["name"] == "esa_bigru" and info["config"]["vocab_size"] == 11354 and info["config"]["vocab_sha256"]
    assert itmzoo.model_info("esa_bigru")["config"]["vocab_size"] is None  # from vocab_path, else 8482 at build


def test_load_glove_formats_follow_torchtext(tmp_path):
    import gzip
    import zipfile

    from itmzoo.encoders.gru import esa_glove_key, load_glove

    lines = [b"3 2\n", b"dog 1.0 2.0\n", b"non\xc2\xa0break 3.0 4.0\n", b"bad\xff 5.0 6.0\n", b"dog 7.0 8.0\n",
             b"cat 9.0 10.0 \n"]
    txt = tmp_path / "g.txt"
    txt.write_bytes(b"".join(lines))
    with gzip.open(tmp_path / "g.txt.gz", "wb") as f:
        f.write(b"".join(lines))
    with zipfile.ZipFile(tmp_path / "g.zip", "w") as zf:
        zf.writestr("glove.txt", b"".join(lines))
    expected = {"dog": [7.0, 8.0], "non\xa0break": [3.0, 4.0], "cat": [9.0, 10.0]}  # last duplicate wins
    for name in ("g.txt", "g.txt.gz", "g.zip"):
        got = load_glove(tmp_path / name)
        assert {k: v.tolist() for k, v in got.items()} == expected, name
    itos = ["dog", "cat"]
    torch.save((itos, {w: i for i, w in enumerate(itos)}, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 2),
               tmp_path / "glove.840B.300d.txt.pt")
    got = load_glove(tmp_path / "glove.840B.300d.txt.pt", words={"cat"})
    assert list(got) == ["cat"] and got["cat"].tolist() == [3.0, 4.0]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a 1 2\nb 1 2 3\n")
    with pytest.raises(ValueError, match="expected 2"):
        load_glove(bad)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_glove(tmp_path / "missing.txt")
    assert esa_glove_key("t-shirt") == "tshirt" and esa_glove_key("black/white") == "black"
    assert esa_glove_key("dog's") == "dogs" and esa_glove_key("d.c.") == "dc"


def test_bert_pretrained_weights_load_from_a_local_folder(tmp_path):
    from transformers import AutoModel

    local = str(tiny_bert_folder(tmp_path / "bert", WORDS, hidden_size=24, num_hidden_layers=2,
                                 intermediate_size=40))
    model = itmzoo.build("esa_bert", img_dim=8, embed_size=8, pretrained=local, tokenizer=local,
                         bert_config=dict(vocab_size=len(WORDS), hidden_size=24, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=40, max_position_embeddings=64))
    ref = AutoModel.from_pretrained(local, local_files_only=True).state_dict()
    own = model.txt_enc.bert.state_dict()
    shared = [k for k in ref if k in own]
    assert len(shared) > 20 and all(torch.equal(ref[k], own[k]) for k in shared)
    model.eval()
    with torch.no_grad():
        emb = model.encode_text(model.tokenizer(["A dog runs on the grass.", "Two men"]))
    assert emb.shape == (2, 8) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_view_dropping_every_region_keeps_gradients_finite(tmp_path):
    model = _tiny_bigru(tmp_path).train()
    regions = torch.randn(2, 3, 8)
    keep = torch.ones(2, 2, 3, dtype=torch.bool)
    keep[1, 0] = False  # image 1, view 0 drops all its regions
    out = model.encode_image({"regions": regions, "region_lengths": torch.tensor([3, 3])}, view_keep=keep)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.img_enc.parameters()
                                             if p.grad is not None)
    torch.testing.assert_close(out[2], out[3])  # the empty view fell back to all regions, like view 1


# ------------------------------------------------------------------------------------------------ learning


def test_learns_on_synthetic_shapes(tmp_path):
    """The shared trainer lifts test rsum on SyntheticShapes far above chance in two short epochs."""
    from itmzoo.data.synthetic import SyntheticShapes
    from itmzoo.eval import evaluate
    from itmzoo.train.engine import fit
    from itmzoo.train.run import chance_metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention
    try:
        ds = SyntheticShapes({"train": 500, "test": 100}, seed=0, region_dim=256, num_regions=8)
        train, test = ds.split("train"), ds.split("test")
        from itmzoo.data.vocab import Vocab

        vocab = Vocab.from_captions(train.captions, threshold=1)
        vocab.save(tmp_path / "vocab.json")
        torch.manual_seed(0)
        model = itmzoo.build("esa_bigru", img_dim=256, embed_size=128, word_dim=64, vocab_size=len(vocab) + 1,
                             vocab_path=str(tmp_path / "vocab.json"), vse_mean_warmup_epochs=2)
        before = evaluate(model, test, "full", progress=False)["rsum"]
        fit(model, train, {"epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01,
                           "progress": False, "log_every": 1000})
        after = evaluate(model, test, "full", progress=False)["rsum"]
    finally:
        torch.set_num_threads(threads)
    chance = chance_metrics(test.caption_to_image)["rsum"]  # about 32 for 100 images x 5 captions
    assert after > 5 * chance and after > before + 100, (chance, before, after)


@pytest.mark.parametrize("name", ["esa_bigru_f30k", "esa_bigru_coco", "esa_bert_f30k", "esa_bert_coco",
                                  "esa_demo_synthetic"])
def test_run_configs_are_valid(name):
    from itmzoo.config import load_run_config
    from itmzoo.registry import resolve_config
    from itmzoo.train.run import parse_run_config

    run = parse_run_config(load_run_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml"))
    entry, cfg = resolve_config(run.model_name, run.model_fields)
    assert entry.name in ("esa_bigru", "esa_bert")
    assert cfg.margin == 0.2
    if name != "esa_demo_synthetic":  # the authors' recipe
        assert cfg.embed_size == 1024 and cfg.vse_mean_warmup_epochs == 1 and entry.name == name.rsplit("_", 1)[0]
        t = run.train
        assert (t.lr, t.batch_size, t.epochs, t.lr_decay_epochs, t.grad_clip, t.optimizer) == \
            (5e-4, 128, 25, [15], 2.0, "adamw")
        assert t.weight_decay == (0.01 if entry.name == "esa_bigru" else 1e-4)
        assert run.eval.protocol == ("f30k-1k" if "f30k" in name else "coco-1k-5fold")


def test_trainer_accumulation_uses_cached_features(tmp_path):
    """SEL depends on the whole batch: the trainer accumulates through train_features/train_loss."""
    from itmzoo.train.engine import Trainer

    model = _tiny_bigru(tmp_path)
    caps = ["a dog runs", "a red ball", "a cat sits", "blue dog", "a blue ball", "red cat", "a dog sits", "cat"]
    from itmzoo.data.split import RetrievalSplit

    split = RetrievalSplit(images=[np.random.RandomState(i).randn(5, 8).astype(np.float32) for i in range(8)],
                           captions=caps, caption_to_image=np.arange(8))
    trainer = Trainer(model, split, {"epochs": 1, "batch_size": 8, "accum_steps": 2, "optimizer": "adamw",
                                     "lr": 1e-3, "progress": False, "max_steps": 1})
    assert trainer._accum_mode() == "exact"
    result = trainer.fit()
    assert result.steps == 1
    feats = model.train().train_features({**collate_images([torch.zeros(5, 8)] * 2, "regions"),
                                          **model.tokenizer(caps[:2], train=True)})
    assert feats["img"].shape == (2, 2, 8) and feats["cap"].shape == (2, 2, 8)


def test_cli_convert_official_file(tmp_path, capsys):
    import yaml

    from itmzoo.cli import main

    meta, z = _fixture("bert")
    img, txt = _upstream_parts(meta)
    path = _official_file(tmp_path, "bert", img, txt)
    bert = {k: v for k, v in meta["bert_config"].items() if k != "model_type"}
    rc = main(["convert", "esa_bert", str(path), str(tmp_path / "native"), "--set", "img_dim=32",
               "--set", "embed_size=16", "--set", "pretrained=null",
               "--set", f"bert_config={yaml.safe_dump(bert, default_flow_style=True).strip()}"])
    assert rc == 0, capsys.readouterr().err
    model = itmzoo.load(tmp_path / "native")
    with torch.no_grad():
        cap = model.encode_text({"input_ids": _t(z["captions"]), "lengths": _t(z["lengths"])})
    np.testing.assert_allclose(cap.numpy(), z["cap_eval"], atol=TOL, rtol=0)
    extra = json.loads((tmp_path / "native" / "config.json").read_text())["extra"]
    assert extra["converted_from"] == "model_best.pth" and len(extra["source_sha256"]) == 64
