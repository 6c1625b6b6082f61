"""Registry, configs, the model contract, native checkpoints and safe loading (toy_vse)."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import itmzoo
from itmzoo.checkpoints import CheckpointError, load_state_strict, read_pickled_checkpoint, strip_prefixes
from itmzoo.config import ConfigError, load_run_config
from itmzoo.data import RetrievalSplit
from itmzoo.eval import encode_split, evaluate, evaluate_ensemble, recall_metrics, similarity_matrix
from itmzoo.registry import RegistryError, Tag, register_model


def tiny_split(n_img=12, caps=5, dim=16, seed=0, name="tiny"):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_img, 6, dim)).astype(np.float32)
    words = ["red", "blue", "green", "circle", "square", "star", "big", "small"]
    captions, c2i = [], []
    for i in range(n_img):
        for _k in range(caps):
            captions.append(" ".join(rng.choice(words, 4)) + f" item{i}")
            c2i.append(i)
    return RetrievalSplit(images=feats, captions=captions, caption_to_image=np.array(c2i), name=name)


def test_import_is_light():
    code = "import sys, itmzoo; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_list_and_filter_models():
    names = itmzoo.list_models()
    assert {"esa_bigru", "esa_bert", "lhsc", "toy_vse"} <= set(names)
    cross = itmzoo.list_models(scoring="cross")
    assert "lhsc" in cross and not {"esa_bigru", "esa_bert", "toy_vse"} & set(cross)
    assert "lhsc" not in itmzoo.list_models("esa*")
    assert "toy_vse" not in itmzoo.list_models(include_demo=False)
    no_weights = set(itmzoo.list_models(has_weights=False))  # other tests may register models of their own
    assert "toy_vse" in no_weights and not {"esa_bigru", "esa_bert", "lhsc"} & no_weights
    assert {"lhsc.f30k", "esa_bigru.coco"} <= set(itmzoo.list_models(has_weights=True))
    assert itmzoo.list_models("lhsc*", include_tags=True) == ["lhsc.coco", "lhsc.f30k"]
    with pytest.raises(ValueError, match="unknown capability"):
        itmzoo.list_models(colour="red")


def test_unknown_names_and_paths_are_clear():
    with pytest.raises(RegistryError, match="Closest: esa_bigru"):
        itmzoo.build("esa_bigrru")
    with pytest.raises(RegistryError, match="local-dir:runs/x"):
        itmzoo.build("runs/x")
    with pytest.raises(RegistryError, match="unknown tag"):
        itmzoo.build("toy_vse.nope")


def test_overrides_are_validated():
    m = itmzoo.build("toy_vse", embed_size=32, img_dim=8, margin=None)
    assert m.config.embed_size == 32 and m.config.margin == 0.2
    with pytest.raises(ConfigError, match="unknown config field 'embed_dim'.*embed_size"):
        itmzoo.build("toy_vse", embed_dim=3)
    with pytest.raises(ConfigError, match="'margin' expects float"):
        itmzoo.build("toy_vse", margin="big")
    with pytest.raises(ConfigError, match="must be positive"):
        itmzoo.build("toy_vse", embed_size=0)


def test_config_round_trips_through_json():
    m = itmzoo.build("toy_vse", img_dim=8)
    cfg = type(m.config).from_dict(json.loads(m.config.to_json()))
    assert cfg == m.config


def test_model_info():
    info = itmzoo.model_info("toy_vse")
    assert info["input_kind"] == "regions" and info["scoring"] == "embedding"
    assert info["config"]["embed_size"] == 256


def test_register_twice_raises_and_user_models_work():
    @dataclasses.dataclass
    class Cfg(itmzoo.config.ModelConfig):
        width: int = 3

    @register_model("user_model_x", config=Cfg, input_kind="regions", scoring="embedding",
                    tags={"wide": Tag(overrides={"width": 9})})
    def user_model_x(config):
        from itmzoo.models.toy import ToyVSE, ToyVSEConfig
        m = ToyVSE(ToyVSEConfig(img_dim=4, embed_size=config.width))
        return m

    assert itmzoo.build("user_model_x.wide").config.embed_size == 9
    with pytest.raises(RegistryError, match="already registered"):
        register_model("user_model_x", config=Cfg, input_kind="regions", scoring="embedding")(user_model_x)
    # a built-in name is refused whether or not its module was imported already
    with pytest.raises(RegistryError, match="reserved|already registered"):
        register_model("lhsc", config=Cfg, input_kind="regions", scoring="cross")(user_model_x)


def test_add_model_config_from_json(tmp_path):
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"name": "toy_small_json", "base": "toy_vse", "config": {"embed_size": 12}}))
    assert itmzoo.add_model_config(p) == "toy_small_json"
    assert itmzoo.build("toy_small_json").config.embed_size == 12
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "toy_bad", "base": "toy_vse", "config": {"nope": 1}}))
    with pytest.raises(ConfigError, match="nope"):
        itmzoo.add_model_config(bad)


def test_run_config_dotted_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  name: toy_vse\n  embed_size: 64\ntrain:\n  lr: 0.001\n")
    tree = load_run_config(p, ["model.embed_size=32", "train.epochs=3", "data.train.format=synthetic"])
    assert tree["model"]["embed_size"] == 32 and tree["train"]["epochs"] == 3
    assert tree["data"]["train"]["format"] == "synthetic"
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config(p, ["model.embed_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_save_and_load_native_round_trip(tmp_path):
    m = itmzoo.build("toy_vse", img_dim=16, embed_size=8)
    out = m.save_pretrained(tmp_path / "ck")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    for loaded in (itmzoo.load(out), itmzoo.build(f"local-dir:{out}"), itmzoo.build("toy_vse", checkpoint=out)):
        assert loaded.config == m.config
        for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k
    # overwriting leaves no temporary or backup directories behind
    m.save_pretrained(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_native_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        itmzoo.load(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        itmzoo.load(tmp_path / "half")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = itmzoo.build("toy_vse", img_dim=16, embed_size=8)
    m.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import itmzoo.checkpoints.native as native

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with torch.no_grad():
        m.img_fc.weight.add_(1)
    with pytest.raises(OSError):
        m.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_safe_loading_allows_namespace_and_refuses_other_globals(tmp_path):
    ok = tmp_path / "ok.pth"
    torch.save({"model": [{"w": torch.ones(2)}], "opt": argparse.Namespace(vocab_size=5)}, ok)
    obj = read_pickled_checkpoint(ok)
    assert obj["opt"].vocab_size == 5 and torch.equal(obj["model"][0]["w"], torch.ones(2))
    bad = tmp_path / "bad.pth"
    torch.save({"x": Path("/")}, bad)  # a global outside the allow-list
    with pytest.raises(CheckpointError, match="refusing to unpickle.*Path"):
        read_pickled_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_pickled_checkpoint(tmp_path / "none.pth")


def test_strict_loading_names_keys():
    m = torch.nn.Linear(2, 3)
    state = {"module.weight": torch.zeros(3, 2), "module.extra": torch.zeros(1)}
    state = strip_prefixes(state)
    with pytest.raises(CheckpointError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        load_state_strict(m, state)
    load_state_strict(m, {"weight": torch.zeros(3, 2), "bias": torch.zeros(3), "pos_ids": torch.zeros(1)},
                      ignorable=["pos_*"])
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_strict(m, {"weight": torch.zeros(2, 2), "bias": torch.zeros(3)})


def test_blockwise_similarity_equals_full_and_evaluate_runs():
    split = tiny_split()
    m = itmzoo.build("toy_vse", img_dim=16, embed_size=8)
    img, txt = encode_split(m, split, batch_size=5, progress=False)
    assert img.shape == (12, 8) and txt.shape == (60, 8)
    full = similarity_matrix(m, img, txt, block=(100, 1000), progress=False)
    blocks = similarity_matrix(m, img, txt, block=(5, 7), progress=False)
    # a GEMM's summation order depends on the operand shapes (block sizes): equal to float rounding
    torch.testing.assert_close(full, blocks, rtol=0, atol=4e-7)
    torch.testing.assert_close(full, img @ txt.t())
    res = evaluate(m, split, protocol="full", progress=False)
    assert res["n_images"] == 12 and res["n_captions"] == 60 and res["itmzoo_version"] == itmzoo.__version__
    assert res["rsum"] == pytest.approx(recall_metrics(full, split.caption_to_image)["rsum"])
    # batching of the encoder does not change the result
    assert evaluate(m, split, protocol="full", batch_size=64, progress=False)["rsum"] == res["rsum"]


def test_ensemble_of_one_model_twice_equals_model():
    split = tiny_split(n_img=10)
    m = itmzoo.build("toy_vse", img_dim=16, embed_size=8)
    single = evaluate(m, split, "5fold", progress=False)
    ens = evaluate_ensemble([m, m], split, "5fold", progress=False)
    assert ens["rsum"] == pytest.approx(single["rsum"])


def test_subset_and_split_validation():
    split = tiny_split()
    sub = split.subset([3, 4, 5])
    assert sub.num_images == 3 and sub.num_captions == 15 and sub.caption_to_image.max() == 2
    with pytest.raises(ValueError, match="caption_to_image has shape"):
        RetrievalSplit(images=np.zeros((2, 3, 4)), captions=["a", "b"], caption_to_image=np.array([0]))
    with pytest.raises(ValueError, match="images without captions"):
        RetrievalSplit(images=np.zeros((2, 3, 4)), captions=["a", "b"], caption_to_image=np.array([0, 0]))


def test_kind_mismatch_is_clear():
    split = tiny_split()
    split.kind = "pixels"
    m = itmzoo.build("toy_vse", img_dim=16)
    with pytest.raises(ValueError, match="takes regions"):
        evaluate(m, split, progress=False)


def test_cli_list_and_info():
    out = subprocess.run([sys.executable, "-m", "itmzoo.cli", "list", "--names", "--scoring", "cross"],
                         capture_output=True, text=True, check=True).stdout
    assert "lhsc" in out.split() and "esa_bigru" not in out.split()
    err = subprocess.run([sys.executable, "-m", "itmzoo.cli", "info", "nope_model"], capture_output=True, text=True)
    assert err.returncode != 0 and "unknown model 'nope_model'" in err.stderr and "Traceback" not in err.stderr


@pytest.mark.cuda
def test_cuda_evaluation_with_and_without_autocast_agrees():
    split = tiny_split(n_img=20)
    m = itmzoo.build("toy_vse", img_dim=16, embed_size=8)
    cpu = evaluate(m, split, "full", progress=False)
    m.to("cuda")
    fp32 = evaluate(m, split, "full", device="cuda", progress=False)
    bf16 = evaluate(m, split, "full", device="cuda", amp="bf16", progress=False)
    assert fp32["rsum"] == pytest.approx(cpu["rsum"])
    assert abs(bf16["rsum"] - cpu["rsum"]) < 60  # a few near-ties may flip in bf16


@pytest.mark.cuda
def test_cuda_recall_ranks_equal_cpu():
    S = torch.randn(300, 1500, dtype=torch.float64)
    c2i = torch.arange(1500) // 5
    a = [r.cpu() for r in itmzoo.eval.retrieval_ranks(S.cuda(), c2i.cuda())]
    b = itmzoo.eval.retrieval_ranks(S, c2i)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", itmzoo.list_models())
def test_every_registered_model_builds_offline_with_defaults(name):
    """`build(name)` needs no network and no file: random weights from itmzoo's own architecture configs."""
    model = itmzoo.build(name)
    assert isinstance(model, itmzoo.models.base.ITMModel)
    assert model.registry_name == itmzoo.registry.split_name(name)[0]
    assert model.input_kind in ("regions", "pixels") and model.scoring in ("embedding", "cross", "two-stage")
    assert sum(p.numel() for p in model.parameters()) > 0
