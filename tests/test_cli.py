"""The command line: train (files written, resume, refusals), eval, convert, one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import itmzoo
from itmzoo.cli import main, parse_data_spec

ROOT = Path(__file__).resolve().parents[1]
DATA = {"format": "synthetic", "kind": "regions", "region_dim": 24, "num_regions": 5,
        "num_images": {"train": 24, "dev": 8, "test": 10}}
RUN = {
    "model": {"name": "toy_vse", "img_dim": 24, "embed_size": 16, "word_dim": 16, "hash_buckets": 97},
    "data": {**DATA, "train": {"split": "train"}, "dev": {"split": "dev"}, "test": {"split": "test"}},
    "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "progress": False, "log_every": 2},
    "eval": {"protocol": "full"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "run.yaml"
    cfg.write_text(yaml.safe_dump(RUN))
    assert main(["train", str(cfg), "--out", str(tmp / "out"), "--set", "model.margin=0.3"]) == 0
    return tmp


def test_train_writes_the_run_directory(trained, capsys):
    out = trained / "out"
    assert {p.name for p in out.iterdir()} >= {"config.json", "log.jsonl", "best", "last", "metrics.json"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "toy_vse" and cfg["model"]["margin"] == 0.3  # the override, resolved in full
    assert cfg["model"]["warmup_epochs"] == 1 and cfg["train"]["lr"] == 0.01
    assert cfg["data"]["dev"] == {**DATA, "split": "dev"}  # shared data keys merged into each split
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_images"] == 10 and metrics["protocol"] == "full"
    assert metrics["checkpoint"].endswith("best")
    # chance of a random ranking, 10 images x 5 captions: t2i R@K = K/10; i2t R@K = 1 - C(45, K)/C(50, K)
    i2t = [100 * (1 - math.comb(45, k) / math.comb(50, k)) for k in (1, 5, 10)]
    assert metrics["chance"] == pytest.approx({"i2t_r1": i2t[0], "i2t_r5": i2t[1], "i2t_r10": i2t[2], "t2i_r1": 10.0,
                                               "t2i_r5": 50.0, "t2i_r10": 100.0, "rsum": sum(i2t) + 160.0})
    # 14 steps on 24 images stay near chance (rsum 278 vs 281): check the bookkeeping, not learning
    assert metrics["rsum"] == pytest.approx(sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert itmzoo.load(out / "best").config.margin == 0.3
    # the resolved config.json is itself a run file
    from itmzoo.config import load_run_config
    from itmzoo.train.run import parse_run_config

    assert parse_run_config(load_run_config(out / "config.json")).model_fields["margin"] == 0.3


def test_train_refuses_to_overwrite_and_resume_checks_the_config(trained, capsys):
    cfg, out = str(trained / "run.yaml"), str(trained / "out")
    assert main(["train", cfg, "--out", out]) == 1
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--resume" in err and len(err.splitlines()) == 1
    assert main(["train", cfg, "--out", out, "--resume"]) == 1  # margin 0.2 now, 0.3 in the run
    err = capsys.readouterr().err
    assert "different configuration" in err and "model.margin: 0.3 -> 0.2" in err
    # the same settings: the finished run is complete, resuming just re-scores the best checkpoint
    before = json.loads((trained / "out" / "metrics.json").read_text())
    assert main(["train", cfg, "--out", out, "--resume", "--set", "model.margin=0.3"]) == 0
    after = json.loads((trained / "out" / "metrics.json").read_text())
    assert after["rsum"] == before["rsum"] and after["steps"] == before["steps"]


def test_eval_pretrained_and_model_checkpoint(trained, tmp_path, capsys):
    best = trained / "out" / "best"
    spec = "format=synthetic,split=test,region_dim=24,num_regions=5,num_images={train: 24, dev: 8, test: 10}"
    assert main(["eval", "--pretrained", str(best), "--data", spec, "--protocol", "full", "--out",
                 str(tmp_path / "m.json"), "--quiet", "--chance"]) == 0
    printed = capsys.readouterr().out
    assert "rsum" in printed and "chance level" in printed
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["rsum"] == pytest.approx(json.loads((trained / "out" / "metrics.json").read_text())["rsum"])
    yml = tmp_path / "data.yaml"
    yml.write_text(yaml.safe_dump({**DATA, "split": "test"}))
    assert main(["eval", "--model", "toy_vse", "--checkpoint", str(best), "--data", str(yml), "--quiet"]) == 0
    assert f"rsum {got['rsum']:.1f}" in capsys.readouterr().out
    assert main(["eval", "--data", spec]) == 1
    assert "--pretrained DIR" in capsys.readouterr().err


def test_data_spec_forms(tmp_path):
    assert parse_data_spec("format=precomp,path=data/f30k,split=test") == {"format": "precomp", "path": "data/f30k",
                                                                          "split": "test"}
    assert parse_data_spec("{format: synthetic, split: dev}") == {"format": "synthetic", "split": "dev"}
    with pytest.raises(ValueError, match="'format'"):
        parse_data_spec("split=test")


def test_convert_is_build_plus_save_pretrained(tmp_path, capsys):
    from itmzoo.models.toy import ToyVSE, ToyVSEConfig
    from itmzoo.registry import register_model

    def convert(obj):  # an "official" layout: [image part, text part] with a prefix, as the seed repos save
        img, txt = obj["model"]
        state = {**{k.replace("module.", ""): v for k, v in img.items()}, **txt}
        return {"img_dim": state["img_fc.weight"].shape[1]}, state, []

    register_model("cli_official_toy", config=ToyVSEConfig, input_kind="regions", scoring="embedding",
                   converter=convert)(lambda cfg: ToyVSE(cfg))
    ref = itmzoo.build("toy_vse", img_dim=24, embed_size=16, word_dim=16, hash_buckets=97)
    sd = ref.state_dict()
    official = {"model": [{f"module.{k}": v for k, v in sd.items() if k.startswith("img")},
                          {k: v for k, v in sd.items() if not k.startswith("img")}], "epoch": 3}
    torch.save(official, tmp_path / "model_best.pth")
    out = tmp_path / "native"
    assert main(["convert", "cli_official_toy", str(tmp_path / "model_best.pth"), str(out),
                 "--set", "embed_size=16", "--set", "word_dim=16", "--set", "hash_buckets=97"]) == 0
    assert "converted" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == "cli_official_toy" and len(meta["extra"]["source_sha256"]) == 64
    loaded = itmzoo.load(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    assert main(["convert", "toy_vse", str(tmp_path / "model_best.pth"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "has no converter" in err and len(err.strip().splitlines()) == 1


def test_errors_are_one_line_with_exit_code_and_debug_shows_the_traceback(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "itmzoo.cli", *args], capture_output=True, text=True, cwd=ROOT)

    p = run("train", str(tmp_path / "missing.yaml"))
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"itmzoo train: error: ConfigError: config file not found: {tmp_path / 'missing.yaml'}"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**RUN, "train": {"epochs": 1, "batch_size": 16, "lr_sched": "x"}}))
    p = run("train", str(bad), "--out", str(tmp_path / "o"), "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr and "unknown config field 'train.lr_sched'" in p.stderr
    p = run("--debug", "info", "no_such_model")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_list_filters(capsys):
    assert main(["list", "--input-kind", "regions", "--scoring", "embedding"]) == 0
    names = capsys.readouterr().out.split()
    assert "toy_vse" in names and "lhsc" not in names
