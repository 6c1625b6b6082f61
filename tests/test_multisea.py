"""Multi-SEA: parity with the authors' code (fixtures from tests/fixtures/multisea/make_fixtures.py) and behaviour.

Fixtures hold the authors' tiny random weights, inputs and outputs (docs/fixtures/multisea.md); the
weights are converted with `convert_official` and loaded strictly, then compared within 1e-5 (float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from itmzoo.checkpoints.safe import CheckpointError, load_state_strict
from itmzoo.config import apply_overrides
from itmzoo.layers.agent_former import AgentFormer, hswish_clip1
from itmzoo.losses import queue_itc_loss, sample_hard_negatives
from itmzoo.models.multisea import (
    TINY_OVERRIDES,
    MultiSEA,
    MultiSEAConfig,
    convert_official,
)

FIX = Path(__file__).parent / "fixtures" / "multisea"


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are small: one thread avoids OpenMP spin-waiting on a busy machine (measured 94 s -> 12 s
    for the training test with 2 threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

META = json.loads((FIX / "fixtures.json").read_text())
TOL = {"rtol": 1e-5, "atol": 1e-5}


def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(FIX / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


AF = npz("aformer.npz")
MD = npz("model.npz")


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))  # keeps 0-d arrays 0-d (temp, alpha)


def close(actual: torch.Tensor, expected: np.ndarray, what: str, scale_tol: bool = False) -> None:
    exp = t(expected).to(actual.dtype)
    atol = TOL["atol"] * (max(1.0, float(exp.abs().max())) if scale_tol else 1.0)
    torch.testing.assert_close(actual.detach(), exp, rtol=TOL["rtol"], atol=atol, msg=lambda m: f"{what}: {m}")


def pixels(u8: np.ndarray) -> torch.Tensor:
    from itmzoo.data.transforms import CLIP_MEAN, CLIP_STD

    x = t(u8).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------ Agent-Former


def build_aformer(case: str) -> AgentFormer:
    c = META["aformer"][case]
    af = AgentFormer(c["hidden"], c["heads"], c["layers"], c["inter"]).eval()
    prefix = f"{case}/sd/"
    upstream = {"aformer." + k[len(prefix):]: t(v) for k, v in AF.items() if k.startswith(prefix)}
    _, state, ignorable = convert_official_aformer(upstream)
    wrapper = nn.Module()
    wrapper.aformer = af
    load_state_strict(wrapper, state, ignorable=ignorable)
    return af


def convert_official_aformer(upstream: dict[str, torch.Tensor]):
    from itmzoo.models.multisea import UNUSED_OFFICIAL_KEYS, _rename

    return {}, {_rename(k): v for k, v in upstream.items()}, list(UNUSED_OFFICIAL_KEYS)


@pytest.mark.parametrize("case", sorted(META["aformer"]))
@pytest.mark.parametrize("mode", ["text", "image", "t2i", "i2t"])
def test_agent_former_matches_upstream(case: str, mode: str) -> None:
    af = build_aformer(case)
    p = f"{case}/"
    text, image, tmask = t(AF[p + "text"]), t(AF[p + "image"]), t(AF[p + "text_mask"])
    x, m, ctx, cm = {"text": (text, tmask, None, None), "image": (image, None, None, None),
                     "t2i": (text, tmask, image, None), "i2t": (image, None, text, tmask)}[mode]
    x = x.clone().requires_grad_(True)
    ctx = ctx.clone().requires_grad_(True) if ctx is not None else None
    out = af(x, m, mode=mode, context=ctx, context_mask=cm, output_hidden_states=True)
    scale = case == "b"  # large weights and inputs: compare relative to the magnitude
    for i, h in enumerate(out.hidden_states[1:]):
        close(h, AF[p + f"{mode}/hidden"][i], f"{case}/{mode} layer {i + 1}", scale)
    close(out.pooler_output, AF[p + f"{mode}/pooled"], f"{case}/{mode} pooled", scale)
    loss = ((out.last_hidden_state * t(AF[p + f"{mode}/w_last"])).sum()
            + (out.pooler_output * t(AF[p + f"{mode}/w_pooled"])).sum())
    loss.backward()
    close(x.grad, AF[p + f"{mode}/grad_x"], f"{case}/{mode} grad input", scale)
    if ctx is not None:
        close(ctx.grad, AF[p + f"{mode}/grad_context"], f"{case}/{mode} grad context", scale)


def test_padded_text_rows_get_uniform_agent_weights() -> None:
    """A padded query row sees every agent with weight 1/n (finfo.min mask), so its output is their mean."""
    torch.manual_seed(0)
    af = AgentFormer(8, 2, 1, 16, agents=5).eval()
    block = af.layers[0]["text"].cross_attn
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    from itmzoo.layers.agent_former import additive_mask

    kv = block.project_kv(torch.randn(1, 7, 8))
    q, agents = block.project_query(x)
    z = block.attend(q, agents, kv, additive_mask(mask, torch.float32), None)
    mean_v = torch.softmax((agents * 0.5) @ kv[0].transpose(-1, -2), -1) @ kv[1]
    torch.testing.assert_close(z[:, :, 3:], mean_v.mean(2, keepdim=True).expand(-1, -1, 3, -1))
    assert not torch.allclose(z[:, :, 0], z[:, :, 3])


def test_hswish_is_the_clip1_variant() -> None:
    x = torch.tensor([-4.0, -3.0, -2.5, -2.0, 0.0, 1.0, 5.0])
    expected = torch.tensor([0.0, 0.0, -2.5 * 0.5 / 6, -2.0 / 6, 0.0, 1.0 / 6, 5.0 / 6])
    torch.testing.assert_close(hswish_clip1(x), expected)


@pytest.mark.parametrize("layers,lq,agents", [(3, 9, 6), (2, 23, 4), (1, 5, 8)])
def test_cross_cls_equals_full_forward_per_pair(layers: int, lq: int, agents: int) -> None:
    torch.manual_seed(1)
    af = AgentFormer(16, 4, layers, 32, agents=agents).eval()
    q, c = torch.randn(3, lq, 16), torch.randn(4, 5, 16)
    qmask = (torch.arange(lq)[None] < torch.tensor([[lq], [4], [1]])).long()
    cmask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]])
    qi, ci = torch.tensor([0, 2, 1, 1, 0, 2, 2]), torch.tensor([3, 0, 1, 2, 0, 3, 1])
    fast = af.cross_cls(q, qmask, c, cmask, qi, ci, "t2i", chunk=3)
    ref = torch.stack([af(q[a:a + 1], qmask[a:a + 1], "t2i", c[b:b + 1], cmask[b:b + 1]).last_hidden_state[0, 0]
                       for a, b in zip(qi.tolist(), ci.tolist())])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="evaluation path"):
        af.train().cross_cls(q, qmask, c, cmask, qi, ci, "t2i")


# ------------------------------------------------------------------------------------------ whole model


def fixture_model() -> MultiSEA:
    mm = META["model"]
    clip, rob, cfg = mm["clip"], mm["roberta"], mm["config"]
    text = {k: rob[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "max_position_embeddings")}
    state = {k[3:]: t(v) for k, v in MD.items() if k.startswith("sd/")}
    overrides, state, ignorable = convert_official({"state_dict": state, "hyper_parameters": {"config": cfg}})
    config = apply_overrides(MultiSEAConfig(), {**overrides, "vision_heads": clip["vision_width"] // 64,
                                                "vision_layers": clip["vision_layers"], "text_overrides": text})
    model = MultiSEA(config)
    load_state_strict(model, state, ignorable=ignorable)
    return model.eval()


def fixture_batch() -> dict[str, torch.Tensor]:
    return {"pixels": pixels(MD["batch/pixels_u8"]), "input_ids": t(MD["batch/input_ids"]),
            "attention_mask": t(MD["batch/attention_mask"]), "image_index": t(MD["batch/image_index"])}


def test_converter_reads_the_lightning_layout() -> None:
    model = fixture_model()
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.vision_blocks, c.queue_size, c.top_k) == (16, 4, 4, 2, 16, 4)
    assert model.temp.item() == pytest.approx(0.05) and model.alpha.item() == pytest.approx(0.9)  # stored, unclamped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    upstream_trainable = {n for n in META["model"]["trainable"] if "aformer" not in n}
    assert {n for n in trainable if "aformer" not in n} == upstream_trainable  # same frozen CLIP parts


def test_converter_is_strict() -> None:
    state = {k[3:]: t(v) for k, v in MD.items() if k.startswith("sd/")}
    _, conv, ignorable = convert_official(state)
    model = fixture_model()
    bad = dict(conv)
    bad["aformer.layers.0.text.ffn.dense5.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_state_strict(model, bad, ignorable=ignorable)
    bad = {k: v for k, v in conv.items() if k != "itm_head.bias"}
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_strict(model, bad, ignorable=ignorable)
    with pytest.raises(CheckpointError, match="not a Multi-SEA checkpoint"):
        convert_official({"state_dict": {"foo": torch.zeros(1)}})


def test_encoders_match_upstream() -> None:
    model = fixture_model()
    b = fixture_batch()
    with torch.no_grad():
        close(model.visual_encoder.encode_image(b["pixels"]), MD["enc/clip"], "CLIP tokens")
        out = model.text_encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], return_dict=True)
        close(out.last_hidden_state, MD["enc/text_last"], "RoBERTa last")
        close(out.pooler_output, MD["enc/text_pooled"], "RoBERTa pooler")
        img, txt = model.encode_image(b), model.encode_text(b)
    close(img["feat"], MD["enc/image_feats"], "image_feats")
    close(img["embeds"], MD["enc/image_embeds"], "image_embeds")
    close(txt["feat"], MD["enc/text_feats"], "text_feats")
    close(txt["embeds"], MD["enc/text_embeds"], "text_embeds")


def two_stage(model: MultiSEA, img: dict, txt: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference procedure: top-k of S per query, score_pairs on them, -100 elsewhere."""
    s = model.similarity(img, txt)
    ni, nt = s.shape
    i2t = torch.full((ni, nt), -100.0)
    top = s.topk(k, dim=1).indices
    rows = torch.arange(ni).repeat_interleave(k)
    i2t[rows, top.flatten()] = model.score_pairs(img, txt, rows, top.flatten(), "i2t")
    t2i = torch.full((nt, ni), -100.0)
    top = s.t().topk(k, dim=1).indices
    cols = torch.arange(nt).repeat_interleave(k)
    t2i[cols, top.flatten()] = model.score_pairs(img, txt, top.flatten(), cols, "t2i")
    return i2t, t2i


def ranks_metrics(i2t: np.ndarray, t2i: np.ndarray, per_image: int) -> dict[str, float]:
    ti = [min(np.where(np.argsort(r)[::-1] == j)[0][0] for j in range(i * per_image, (i + 1) * per_image))
          for i, r in enumerate(i2t)]
    it = [np.where(np.argsort(r)[::-1] == j // per_image)[0][0] for j, r in enumerate(t2i)]
    out = {f"txt_r{k}": 100.0 * np.mean(np.array(ti) < k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": 100.0 * np.mean(np.array(it) < k) for k in (1, 5, 10)})
    return out


def test_two_stage_evaluation_matches_upstream() -> None:
    model = fixture_model()
    e = {k[5:]: t(v) for k, v in MD.items() if k.startswith("eval/")}
    img = {"feat": e["image_feats"], "embeds": e["image_embeds"]}
    txt = {"feat": e["text_feats"], "embeds": e["text_embeds"], "mask": e["text_atts"]}
    with torch.no_grad():
        i2t, t2i = two_stage(model, img, txt, model.eval_settings().rerank_k)
    close(i2t, e["score_i2t"].numpy(), "score_i2t")
    close(t2i, e["score_t2i"].numpy(), "score_t2i")
    # the shared evaluator, in small query batches
    from itmzoo.eval.rerank import two_stage_scores

    res = two_stage_scores(model, img, txt, model.eval_settings().rerank_k, block=(3, 7), pair_batch_size=8,
                           progress=False)
    close(res.i2t, e["score_i2t"].numpy(), "evaluator score_i2t")
    close(res.t2i.t(), e["score_t2i"].numpy(), "evaluator score_t2i")
    metrics = ranks_metrics(i2t.numpy(), t2i.numpy(), per_image=5)
    expected = META["model"]["eval_metrics"]
    assert metrics == {k: pytest.approx(expected[k]) for k in metrics}
    assert 0 < expected["img_r1"] < 100  # the fixture is not trivially perfect


def test_training_loss_matches_upstream(monkeypatch) -> None:
    model = fixture_model()
    model.train()
    model.text_encoder.eval()  # upstream's recorded step ran without dropout
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    draws = (t(MD["train/neg_image_for_text"]).long(), t(MD["train/neg_text_for_image"]).long())
    monkeypatch.setattr(model, "sample_negatives", lambda w_t2i, w_i2t: draws)
    close(model.image_queue, MD["train/queue_before/image"], "queue before")
    out = model(fixture_batch())
    out["loss"].backward()
    close(out["loss"], MD["train/loss"], "loss")
    close(out["itc"], MD["train/itc"], "itc")
    close(out["itm"], MD["train/itm"], "itm")
    close(model.temp, MD["train/temp_after_clamp"], "temp clamped")
    close(model.alpha, MD["train/alpha_after_clamp"], "alpha clamped")
    close(model.image_queue, MD["train/queue_after/image"], "image queue")
    close(model.text_queue, MD["train/queue_after/text"], "text queue")
    assert torch.equal(model.idx_queue, t(MD["train/queue_after/idx"]))
    assert torch.equal(model.queue_ptr, t(MD["train/queue_after/ptr"]))
    params = dict(model.named_parameters())
    renamed = {"aformer.pooler.dense.weight": "aformer.pooler.weight",
               "aformer.encoder.layers.1.image_expert.ffn.dense4.weight": "aformer.layers.1.image.ffn.dense4.weight"}
    for key in (k for k in MD if k.startswith("train/grad/")):
        name = key[len("train/grad/"):]
        close(params[renamed.get(name, name)].grad, MD[key], f"grad {name}", scale_tol=True)


# ------------------------------------------------------------------------------------------ behaviour


def tiny(**kw) -> MultiSEA:
    torch.manual_seed(0)
    return MultiSEA(apply_overrides(MultiSEAConfig(), {**TINY_OVERRIDES["multisea"], **kw}))


def test_queue_itc_multi_positive_targets_and_gradients() -> None:
    fi = torch.randn(3, 4, requires_grad=True)
    ft = torch.randn(3, 4, requires_grad=True)
    idx = torch.tensor([[1], [2], [2]])
    qi, qt, qidx = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([[2, -100, 7, 1, -100]])
    loss = queue_itc_loss(fi, ft, idx, qi, qt, qidx, 0.5)
    keys_t = torch.cat([ft.detach().t(), qt], 1)
    pos = (idx == torch.cat([idx.t(), qidx], 1)).float()
    ref_i2t = -(torch.log_softmax(fi @ keys_t / 0.5, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    keys_i = torch.cat([fi.detach().t(), qi], 1)
    ref_t2i = -(torch.log_softmax(ft @ keys_i / 0.5, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    torch.testing.assert_close(loss, (ref_i2t + ref_t2i) / 2)
    gi, = torch.autograd.grad(loss, fi, retain_graph=True)
    gi_ref, = torch.autograd.grad(ref_i2t / 2, fi)
    torch.testing.assert_close(gi, gi_ref)  # image features get gradient from i2t only


def test_hard_negatives_are_seeded_and_never_positive() -> None:
    w = torch.rand(6, 6).masked_fill(torch.eye(6, dtype=torch.bool), 0)
    a = sample_hard_negatives(w, torch.Generator().manual_seed(3))
    b = sample_hard_negatives(w, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not bool((a == torch.arange(6)).any())
    with pytest.raises(ValueError, match="at least two distinct images"):
        sample_hard_negatives(torch.zeros(2, 2))


def test_clamps_only_in_training_and_queue_advances() -> None:
    model = tiny()
    with torch.no_grad():
        model.temp.fill_(5.0)
        model.alpha.fill_(0.1)
    b = {"pixels": torch.randn(3, 3, 32, 32), "input_ids": torch.randint(3, 100, (3, 12)),
         "attention_mask": torch.ones(3, 12, dtype=torch.long), "image_index": torch.tensor([4, 5, 6])}
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_image(b), model.encode_text(b)
        s = model.similarity(img, txt)
    assert model.temp.item() == 5.0 and model.alpha.item() == pytest.approx(0.1)
    torch.testing.assert_close(s, img["feat"] @ txt["feat"].t() / 5.0)
    model.train()
    out = model(b)
    assert model.temp.item() == 3.0 and model.alpha.item() == pytest.approx(0.2)
    assert model.queue_ptr.item() == 3 and model.idx_queue[0, :3].tolist() == [4, 5, 6]
    assert set(out) >= {"loss", "itc", "itm"} and torch.isfinite(out["loss"])


def test_param_groups_follow_upstream() -> None:
    model = tiny()
    groups = {g["name"]: g for g in model.param_groups(1e-5)}
    assert set(groups) == {"default", "encoder", "alpha", "temp"}
    assert groups["encoder"]["lr"] == pytest.approx(1e-6)
    assert groups["alpha"]["lr"] == 1e-4 and groups["temp"]["lr"] == 5e-4
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "visual_encoder.visual.transformer.resblocks.0.attn.in_proj_weight" in frozen
    assert "visual_encoder.token_embedding.weight" in frozen
    assert model.visual_encoder.visual.ln_post.weight.requires_grad
    assert model.visual_encoder.visual.transformer.resblocks[1].attn.in_proj_weight.requires_grad


def test_score_pairs_both_directions_equal_a_per_pair_loop() -> None:
    model = tiny().eval()
    b = {"pixels": torch.randn(3, 3, 32, 32), "input_ids": torch.randint(3, 100, (4, 12)),
         "attention_mask": (torch.arange(12)[None] < torch.tensor([[12], [3], [7], [1]])).long()}
    with torch.no_grad():
        img, txt = model.encode_image(b), model.encode_text(b)
        ii = torch.tensor([0, 0, 1, 2, 2, 1])
        ti = torch.tensor([1, 3, 0, 2, 3, 3])
        for direction in ("i2t", "t2i"):
            got = model.score_pairs(img, txt, ii, ti, direction)
            ref = []
            for i, j in zip(ii.tolist(), ti.tolist()):
                if direction == "i2t":
                    o = model.aformer(img["embeds"][i:i + 1], None, "i2t", txt["embeds"][j:j + 1], txt["mask"][j:j + 1])
                else:
                    o = model.aformer(txt["embeds"][j:j + 1], txt["mask"][j:j + 1], "t2i", img["embeds"][i:i + 1])
                s = (img["feat"][i] * txt["feat"][j]).sum() / model.temp
                ref.append(model.itm_head(o.last_hidden_state[:, 0])[0, 1] + s)
            torch.testing.assert_close(got, torch.stack(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="direction"):
        model.score_pairs(img, txt, ii, ti, "x2y")


def test_build_reads_a_lightning_checkpoint_through_the_safe_loader(tmp_path) -> None:
    """The observed PL 2.0 layout: top-level keys, unprefixed state_dict (with 4.27's position_ids), hparams."""
    import itmzoo

    state = {k[3:]: t(v) for k, v in MD.items() if k.startswith("sd/")}
    state["text_encoder.embeddings.position_ids"] = torch.arange(42).view(1, -1)
    cfg = dict(META["model"]["config"], num_heads=4, top_k=4, optimizer={"betas": (0.9, 0.98), "init_lr": 1e-5})
    ckpt = {"epoch": 9, "global_step": 600, "pytorch-lightning_version": "2.0.0", "state_dict": state,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val/the_metric', 'mode': 'max', 'every_n_train_steps': 0, "
                          "'every_n_epochs': 1, 'train_time_interval': None}": {"best_model_score": torch.tensor(1.0),
                                                                                "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {}, "param_groups": [
                {"name": "temp", "initial_lr": 5e-4, "betas": (0.9, 0.98), "weight_decay": 0.05, "eps": 1e-8,
                 "params": [0]}]}],
            "lr_schedulers": [{"base_lrs": [5e-4], "last_epoch": 600, "lr_lambdas": [None]}],
            "hparams_name": "kwargs", "hyper_parameters": {"config": cfg, "num_device": 1, "cur_alpha": 0.4}}
    path = tmp_path / "step600-val_score490.0000.ckpt"
    torch.save(ckpt, path)
    rob = META["model"]["roberta"]
    text = {k: rob[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "max_position_embeddings")}
    model = itmzoo.build("multisea", checkpoint=path, text_overrides=text, vision_heads=1)
    assert not model.training and model.config.top_k == 4
    with torch.no_grad():
        img = model.encode_image(fixture_batch())
    close(img["feat"], MD["enc/image_feats"], "image_feats after build()")


def test_tiny_model_learns_synthetic_pictures_through_the_trainer() -> None:
    """Shared trainer (naive accumulation, 2 micro-batches) + shared two-stage evaluator, end to end.

    From scratch the tiny model learns slowly, so it memorises 8 pictures (40 captions): the loss falls
    and the first-stage recall on them rises (measured: loss 3.53 -> 3.39, first-stage rsum 250 -> 312.5).
    """
    from itmzoo.data.synthetic import SyntheticShapes
    from itmzoo.eval import evaluate
    from itmzoo.train import fit

    tok = Path(__file__).parents[1] / "configs" / "vocab" / "multisea_synthetic_tokenizer"
    train = SyntheticShapes({"train": 8, "dev": 1, "test": 1}, seed=0, image_size=32).split("train", "pixels")
    model = tiny(tokenizer=str(tok), max_text_len=24, top_k=4, patch_size=8, encoder_lr_mult=1.0,
                 vision_trainable_blocks=-1, temp_lr=5e-3, alpha_lr=5e-3,
                 text_overrides={**TINY_OVERRIDES["multisea"]["text_overrides"], "vocab_size": 74,
                                 "max_position_embeddings": 32})
    opts = {"progress": False, "batch_size": 40}
    before = evaluate(model, train, "full", **opts)
    cfg = {"epochs": 10, "batch_size": 16, "accum_steps": 2, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05,
           "schedule": "constant", "grad_clip": 1.0, "progress": False, "log_every": 1, "seed": 0,
           "epoch_over": "captions"}  # 40 pairs per epoch (the model's default, images, would give 8)
    result = fit(model, train, cfg)
    after = evaluate(model, train, "full", **opts)
    losses = [h["train_loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05, losses
    first = before["two_stage"]["first_stage"]["rsum"], after["two_stage"]["first_stage"]["rsum"]
    assert first[1] > first[0] + 30, first
    assert after["two_stage"]["k_i2t"] == 4 and result.steps == 20


def test_clip_pretrained_keeps_the_first_blocks_and_the_text_embeddings(tmp_path) -> None:
    """A full CLIP file (3 blocks, proj, text tower) fills the 2-block token tower; the rest is left out."""
    from safetensors.torch import save_file

    from itmzoo.encoders.clip import CLIP, CLIPConfig

    model = tiny()
    c = model.config
    torch.manual_seed(5)
    full = CLIP(CLIPConfig(embed_dim=8, image_size=c.image_size, patch_size=c.patch_size,
                           vision_width=c.vision_width, vision_layers=c.vision_layers, vision_heads=c.vision_heads,
                           context_length=c.clip_context_length, vocab_size=c.clip_text_vocab,
                           text_width=c.clip_text_width, text_layers=1, text_heads=1))
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    dropped = model.load_clip_weights(str(tmp_path / "clip.safetensors"))
    assert "visual.proj" in dropped and any(k.startswith("visual.transformer.resblocks.2.") for k in dropped)
    assert any(k.startswith("transformer.resblocks.0.") for k in dropped)  # the text transformer
    own = model.visual_encoder.state_dict()
    assert set(own) <= set(full.state_dict())
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in own.items())
