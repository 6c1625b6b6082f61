"""What a new user meets first: number spellings, run-directory locking, file modes, self-contained
checkpoints, early and clear errors, the CLI's output, `itmzoo data check`, and the README's example."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hf_utils import WORDS, bert_tokenizer_folder

import itmzoo
from itmzoo.checkpoints.safe import CheckpointError
from itmzoo.cli import main
from itmzoo.config import ConfigError, config_from_dict, load_run_config
from itmzoo.data import SyntheticShapes, Vocab
from itmzoo.data.readers import DataError, read_precomp
from itmzoo.data.synthetic import SYNTHETIC_VOCAB
from itmzoo.data.writers import write_precomp
from itmzoo.train.config import TrainConfig
from itmzoo.train.lock import RunDirLocked, RunLock
from itmzoo.train.run import parse_run_config, run_training

ROOT = Path(__file__).resolve().parents[1]
SYN_VOCAB = Path(SYNTHETIC_VOCAB)
DATA = {"format": "synthetic", "kind": "regions", "region_dim": 24, "num_regions": 5,
        "num_images": {"train": 24, "dev": 8, "test": 10}}
RUN = {
    "model": {"name": "toy_vse", "img_dim": 24, "embed_size": 16, "word_dim": 16, "hash_buckets": 97},
    "data": {**DATA, "train": {"split": "train"}, "dev": {"split": "dev"}, "test": {"split": "test"}},
    "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "progress": False, "log_every": 1},
    "eval": {"protocol": "full"},
}
TINY_ESA = dict(img_dim=8, embed_size=8, word_dim=6)


def _run_file(tmp_path: Path, tree: dict = RUN) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


# -- bug 1: every float spelling -------------------------------------------------------------------------

def test_exponent_floats_from_yaml_set_and_json(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: {name: toy_vse}\ndata: {format: synthetic, train: {split: train}}\n"
                 "train: {lr: 1e-3, weight_decay: 5E-4, lr_mults: {'img_*': 1e-1}}\n")
    run = parse_run_config(load_run_config(p, ["train.eps=1e-8", "train.min_lr_ratio=+2e-2"]))
    assert (run.train.lr, run.train.weight_decay, run.train.eps, run.train.min_lr_ratio) == (1e-3, 5e-4, 1e-8, 2e-2)
    assert run.train.lr_mults == {"img_*": 0.1} and isinstance(run.train.lr, float)
    assert config_from_dict(TrainConfig, {"lr": "2.5e-4", "grad_clip": " 1e1 "}).grad_clip == 10.0  # strings in JSON
    assert parse_run_config(load_run_config(p, ["train.epochs=3"])).train.epochs == 3  # ints stay ints
    with pytest.raises(ConfigError, match=r"config field 'train.lr' expects float, got 'fast'"):
        parse_run_config(load_run_config(p, ["train.lr=fast"]))
    with pytest.raises(ConfigError, match=r"train.lr_mults\['img_\*'\]' expects float"):
        config_from_dict(TrainConfig, {"lr_mults": {"img_*": "x"}}, prefix="train.")
    with pytest.raises(ConfigError, match="train.epochs' expects int"):
        parse_run_config(load_run_config(p, ["train.epochs=1e3"]))


# -- bug 2: one run per directory --------------------------------------------------------------------------

HOLD = """
import sys, time
from itmzoo.train.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_the_same_directory_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"in use by a training run \\(pid {holder.pid} on "):
            RunLock(out).acquire()
        assert main(["train", str(_run_file(tmp_path)), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "RunDirLocked" in err and "--out" in err
        assert not (out / "config.json").exists() and not (out / "log.jsonl").exists()  # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out):  # the killed holder's lock went with its process
        with pytest.raises(RunDirLocked):
            RunLock(out).acquire()  # and a held lock refuses even within one process
    RunLock(out).acquire().release()


# -- bug 3: usual file modes ---------------------------------------------------------------------------------

def test_files_and_directories_get_the_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        model = itmzoo.build("toy_vse", img_dim=8, embed_size=8, word_dim=8, hash_buckets=31)
        d = model.save_pretrained(tmp_path / "ckpt")
        split = SyntheticShapes({"test": 2}, region_dim=8, num_regions=3).split("test")
        write_precomp(split, tmp_path / "data", "test")
        os.umask(0o027)
        model.save_pretrained(tmp_path / "ckpt2")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(d) == 0o755 and mode(d / "config.json") == 0o644 and mode(d / "model.safetensors") == 0o644
    assert mode(tmp_path / "data" / "test_ims.npy") == 0o644 and mode(tmp_path / "data" / "test_caps.txt") == 0o644
    assert mode(tmp_path / "ckpt2") == 0o750 and mode(tmp_path / "ckpt2" / "config.json") == 0o640


# -- bugs 4 and 5: checkpoints carry their vocabulary; vocab_size from the vocabulary --------------------------

def _texts(model, captions=("a red circle above a blue square", "two green triangles")):
    model.eval()
    with torch.no_grad():
        out = model.encode_text(model.tokenizer(list(captions)))
    # token-set features (cross models) compared as one flat vector
    return out if isinstance(out, torch.Tensor) else torch.cat([out[k].float().flatten() for k in sorted(out)])


def test_vocab_size_is_inferred_from_the_vocabulary_file():
    n_ids = len(json.loads(SYN_VOCAB.read_text())["word2idx"])
    model = itmzoo.build("esa", vocab_path=str(SYN_VOCAB), **TINY_ESA)
    assert model.config.vocab_size == n_ids + 1 and model.txt_enc.embed.weight.shape[0] == n_ids + 1  # + <mask>
    assert itmzoo.build("esa_bigru", **TINY_ESA).config.vocab_size == 8482  # no vocabulary: SCAN f30k's size
    with pytest.raises(ValueError, match="vocab_size=9"):
        itmzoo.build("esa", vocab_path=str(SYN_VOCAB), vocab_size=9, **TINY_ESA).tokenizer(["a"])
    with pytest.raises(ValueError, match="set vocab_path"):
        itmzoo.build("esa", **TINY_ESA).tokenizer(["a"])


@pytest.mark.parametrize("name,overrides", [
    ("esa_bigru", TINY_ESA),
    ("lhsc", dict(img_dim=8, word_dim=6, embed_size=8, sim_dim=8, vocab_size=74)),
])
def test_a_native_directory_carries_its_vocabulary(tmp_path, monkeypatch, name, overrides):
    vocab = tmp_path / "elsewhere" / "vocab.json"
    vocab.parent.mkdir()
    shutil.copy(SYN_VOCAB, vocab)
    model = itmzoo.build(name, vocab_path=str(vocab), vocab_sha256=Vocab.load(vocab).sha256(), **overrides)
    ref = _texts(model)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(vocab.parent)  # the original vocabulary is gone ...
    (tmp_path / "saved").rename(tmp_path / "moved")  # ... the checkpoint moved ...
    monkeypatch.chdir(tmp_path / "moved")  # ... and runs from another directory
    meta = json.loads(Path("config.json").read_text())
    assert meta["config"]["vocab_path"] == "vocab.json" and meta["assets"] == {"vocab_path": "vocab.json"}
    loaded = itmzoo.load(tmp_path / "moved")
    assert torch.equal(_texts(loaded), ref)
    loaded.save_pretrained(tmp_path / "again")  # and saves again as a whole
    assert torch.equal(_texts(itmzoo.build(f"local-dir:{tmp_path / 'again'}")), ref)


def test_an_in_memory_vocabulary_and_a_bert_tokenizer_folder_are_saved_too(tmp_path):
    from itmzoo.models.esa import ESAWordTokenizer

    vocab = Vocab(["red", "circle", "two"])
    vocab.add_word("<mask>")
    model = itmzoo.build("esa_bigru", vocab_size=len(vocab), **TINY_ESA)
    model.set_tokenizer(ESAWordTokenizer(vocab))
    ref = _texts(model, ["red circle", "two"])
    model.save_pretrained(tmp_path / "gru")
    assert torch.equal(_texts(itmzoo.load(tmp_path / "gru"), ["red circle", "two"]), ref)

    folder = bert_tokenizer_folder(tmp_path / "tok", WORDS)
    bert = itmzoo.build("esa_bert", img_dim=8, embed_size=8, tokenizer=str(folder),
                        bert_config=dict(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=20, max_position_embeddings=32))
    ref = _texts(bert, ["a man riding a horse", "hi"])
    bert.save_pretrained(tmp_path / "bert")
    shutil.rmtree(folder)
    assert (tmp_path / "bert" / "tokenizer" / "tokenizer_config.json").is_file()
    assert torch.equal(_texts(itmzoo.load(tmp_path / "bert"), ["a man riding a horse", "hi"]), ref)


def test_training_checkpoints_carry_the_vocabulary(tmp_path, monkeypatch):
    from itmzoo.train.checkpoint import save_checkpoint

    model = itmzoo.build("esa", vocab_path=str(SYN_VOCAB), **TINY_ESA)
    save_checkpoint(tmp_path / "last", model, {"step": 0})
    assert {p.name for p in (tmp_path / "last").iterdir()} == {"config.json", "model.safetensors", "vocab.json",
                                                              "trainer_state.pt"}
    monkeypatch.chdir(tmp_path)
    assert torch.equal(_texts(itmzoo.load("last")), _texts(model))


# -- the README's first example runs as written ----------------------------------------------------------------

def test_readme_first_example_runs(monkeypatch, capsys, tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # README says: from any directory
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  the project's own README
    assert scope["result"]["protocol"] == "full" and scope["result"]["n_images"] == 20
    assert 0 <= scope["result"]["rsum"] <= 600


# -- errors that came late or misled ---------------------------------------------------------------------------

def test_a_split_that_does_not_fit_fails_before_anything_is_written(tmp_path):
    tree = json.loads(json.dumps(RUN))
    tree["data"]["test"] = {"split": "test", "region_dim": 12}
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"data.test \(synthetic test\) does not fit the model 'toy_vse'"):
        run_training(tree, out, verbose=False)
    assert not out.exists()
    if not torch.cuda.is_available():
        tree = {**RUN, "train": {**RUN["train"], "device": "cuda"}}
        with pytest.raises(ConfigError, match="train.device='cuda', but this machine has no CUDA device"):
            run_training(tree, out, verbose=False)
        assert not out.exists()


def test_unreadable_checkpoints_name_the_file_and_never_advise_unsafe_loading(tmp_path, capsys):
    model = itmzoo.build("toy_vse", img_dim=8, embed_size=8, word_dim=8, hash_buckets=31)
    d = model.save_pretrained(tmp_path / "native")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file .*truncated"):
        itmzoo.load(d)
    junk = tmp_path / "model_best.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as e:
        itmzoo.build("esa_bigru", checkpoint=junk)
    assert "weights_only" not in str(e.value)
    assert main(["eval", "--pretrained", str(junk), "--data", "format=synthetic,split=test"]) == 1
    assert "use --model NAME --checkpoint FILE" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is a file, not a native checkpoint directory"):
        itmzoo.load(junk)


def _official(tmp_path: Path, model: torch.nn.Module, parts: tuple[str, ...]) -> Path:
    sd = model.state_dict()
    obj = {"model": [{k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")} for p in parts], "epoch": 1}
    path = tmp_path / f"{'_'.join(parts)}.pth"
    torch.save(obj, path)
    return path


def test_convert_checks_the_method_the_tag_and_the_target(tmp_path, capsys):
    lhsc = itmzoo.build("lhsc", img_dim=8, word_dim=6, embed_size=8, sim_dim=8, vocab_size=74)
    lhsc_file = _official(tmp_path, lhsc, ("img_enc", "txt_enc", "sim_enc"))
    with pytest.raises(CheckpointError, match=r"holds a list of 3 parts.*the file fits 'lhsc' instead"):
        itmzoo.build("esa_bigru", checkpoint=lhsc_file)
    esa = itmzoo.build("esa", vocab_path=str(SYN_VOCAB), **TINY_ESA)
    esa_file = _official(tmp_path, esa, ("img_enc", "txt_enc"))
    with pytest.raises(CheckpointError, match=r"does not match the tag 'esa_bigru.f30k': vocab_size=75 in the file, "
                                              r"8482 in the tag"):
        itmzoo.build("esa_bigru.f30k", checkpoint=esa_file)
    # a vocabulary that does not fit the weights is refused at convert time; nothing is written
    not_a_vocab = f"vocab_path={ROOT / 'README.md'}"
    assert main(["convert", "esa", str(esa_file), str(tmp_path / "bad"), "--set", not_a_vocab]) == 1
    assert "not valid JSON" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "native"
    assert main(["convert", "esa", str(esa_file), str(out), "--set", f"vocab_path={SYN_VOCAB}"]) == 0
    assert (out / "vocab.json").is_file()
    assert main(["convert", "esa", str(esa_file), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and (out / "vocab.json").is_file()
    assert main(["convert", "esa", str(esa_file), str(out), "--force"]) == 0
    assert not (out / "vocab.json").exists()  # replaced by a conversion without a vocabulary


def test_caption_files_with_empty_or_trailing_blank_lines(tmp_path):
    split = SyntheticShapes({"test": 2}, region_dim=4, num_regions=3).split("test")
    write_precomp(split, tmp_path, "test")
    caps = tmp_path / "test_caps.txt"
    lines = caps.read_text().splitlines()
    caps.write_text("\n".join(lines[:3] + [""] + lines[4:]) + "\n")
    with pytest.warns(UserWarning, match=r"test_caps.txt: 1 empty caption line\(s\) \(line 4\)"):
        assert read_precomp(tmp_path, "test").num_captions == 10
    caps.write_text("\n".join(lines) + "\n\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"has 11 captions .*last 1 line\(s\) are blank, and without them the "
                                            r"counts agree: remove the blank lines"):
            read_precomp(tmp_path, "test")


def test_unknown_capability_values_are_refused():
    with pytest.raises(ValueError, match=r"unknown scoring='crosss'; accepted: 'embedding', 'cross', 'two-stage'"):
        itmzoo.list_models(scoring="crosss")
    with pytest.raises(ValueError, match=r"unknown text_backbone='gru'; accepted: .*'bigru'"):
        itmzoo.list_models(text_backbone="gru")
    assert "lhsc" in itmzoo.list_models(scoring="cross", input_kind="regions")


# -- the CLI ----------------------------------------------------------------------------------------------------

def test_version_list_and_info(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"itmzoo {itmzoo.__version__}"
    assert main(["list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:4] == ["name", "aliases", "scoring", "input"]
    esa = next(r for r in rows if r.startswith("esa_bigru"))
    assert esa.split()[1] == "esa" and "embedding" in esa and "f30k, coco" in esa
    assert main(["list", "--names", "--scoring", "cross"]) == 0
    assert (capsys.readouterr().out.split() == itmzoo.list_models(scoring="cross")
            and "lhsc" in itmzoo.list_models(scoring="cross"))
    assert main(["info", "esa"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("esa_bigru (aliases: esa)") and "    vocab_path = null" in text and "{" not in text
    assert "esa_bigru.f30k: dataset f30k" in text and "expected: f30k-1k.i2t_r1 82.6" in text
    assert main(["info", "lhsc", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scoring"] == "cross" and not re.search(r"spec|§", json.dumps(info))


class _StopInEpoch2:
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 2:
            raise KeyboardInterrupt
        return {"rsum": 1.0, "i2t_r1": 0.0}


def test_training_output_banner_lines_rounding_and_ctrl_c(tmp_path, monkeypatch, capsys):
    import itmzoo.train.engine as engine

    cfg = _run_file(tmp_path, {**RUN, "train": {**RUN["train"], "progress": True}})
    monkeypatch.setattr(engine, "PROGRESS_LINE_SECONDS", 0.0)
    assert main(["train", str(cfg), "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("itmzoo train: model toy_vse (") and "train 24 images / 120 captions" in out
    assert f"run dir {tmp_path / 'a'}" in out and "CPU threads" in out and "epoch 1/2" in out
    # stderr is not a terminal here: plain progress lines, no bar
    assert re.search(r"^epoch 1/2  step 1/7  loss \S+  lr ", err, re.M) and "\r" not in err and "it/s" not in err
    metrics = (tmp_path / "a" / "metrics.json").read_text()
    # no float noise such as 244.60000000000002: every float has at most 10 significant digits
    floats = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?",
                                           metrics + (tmp_path / "a" / "log.jsonl").read_text())]
    assert floats and all(x == float(f"{x:.10g}") for x in floats)
    best = json.loads(metrics)["best_epoch"]
    saved = json.loads((tmp_path / "a" / "best" / "config.json").read_text())
    assert best in (1, 2) and saved["extra"]["epoch"] == best
    assert f"best/ (epoch {best})" in out

    monkeypatch.setattr(engine.Trainer, "_evaluate", _StopInEpoch2())
    assert main(["train", str(cfg), "--out", str(tmp_path / "b"), "--set", "train.eval_every=1"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"{tmp_path / 'b' / 'last'}/ holds the last checkpoint (after optimizer " \
        "step 7; 1 epoch(s) complete)" in err
    assert err.strip().endswith(f"--out {tmp_path / 'b'} --set train.eval_every=1 --resume")


def test_data_check(tmp_path, capsys):
    d = SyntheticShapes({"train": 6, "dev": 2, "test": 3}, region_dim=8, num_regions=3)
    for s in ("train", "dev", "test"):
        write_precomp(d.split(s), tmp_path / "f30k_precomp", s)
    shutil.copy(SYN_VOCAB, tmp_path / "f30k_precomp" / "f30k_precomp_vocab.json")
    assert main(["data", "check", str(tmp_path / "f30k_precomp")]) == 0
    out = capsys.readouterr().out
    assert "ok    test: 3 image rows x 3 regions x 8 dims (float32), 15 captions (5 per image row)" in out
    assert "f30k_precomp_vocab.json: 74 ids" in out and "not one of the known SCAN vocabularies" in out
    assert "0.0% of" in out and out.strip().endswith("usable: 0 error(s), 2 warning(s)")
    with open(tmp_path / "f30k_precomp" / "dev_caps.txt", "a") as f:
        f.write("\n")
    assert main(["data", "check", str(tmp_path / "f30k_precomp")]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "dev_caps.txt has 11 captions" in out and "NOT usable: 1 error(s)" in out
    from itmzoo.data.check import check_data

    known = {"f30k": Vocab.load(SYN_VOCAB).sha256()}
    report = check_data(tmp_path / "f30k_precomp" / "f30k_precomp_vocab.json", known_vocabs=known)
    assert report.errors == 0 and "the SCAN f30k vocabulary" in report.text()
