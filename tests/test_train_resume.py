"""Exact resume: a run killed with SIGKILL (after a checkpoint, or inside the checkpoint's rename) and
resumed gives the same per-step losses and the same final weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import itmzoo
from itmzoo.data.synthetic import SyntheticShapes
from itmzoo.train import fit

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 5e-3, "log_every": 1, "ckpt_every": 3, "progress": False,
         "deterministic": True, "seed": 3}

# The same run in a child process; `KILL` decides where it dies (SIGKILL: no cleanup, no flush).
SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(int(sys.argv[2]))
    import itmzoo
    from itmzoo.data.synthetic import SyntheticShapes
    from itmzoo.train import fit
    out, mode = sys.argv[1], sys.argv[3]
    train = {train!r}

    class KillAt:
        def on_step_end(self, trainer, record):
            if mode == "step" and record["step"] == 11:  # after the checkpoint of step 9, 2 steps logged past it
                os.kill(os.getpid(), signal.SIGKILL)

    if mode == "rename":   # die in atomic_dir between moving last/ aside and moving the new one in
        real = os.replace
        calls = []
        def replace(src, dst):
            if str(dst).endswith(".last.old"):
                calls.append(dst)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.replace = replace
    ds = SyntheticShapes({{"train": 24, "dev": 10, "test": 10}}, region_dim=24, num_regions=5)
    torch.manual_seed(0)
    m = itmzoo.build("toy_vse", img_dim=24, embed_size=16, word_dim=16, hash_buckets=97)
    fit(m, ds.split("train"), train, ds.split("dev"), out_dir=out, callbacks=[KillAt()])
    print("finished without being killed")
""").format(train=TRAIN)


def _data():
    ds = SyntheticShapes({"train": 24, "dev": 10, "test": 10}, region_dim=24, num_regions=5)
    return ds.split("train"), ds.split("dev")


def _model():
    torch.manual_seed(0)
    return itmzoo.build("toy_vse", img_dim=24, embed_size=16, word_dim=16, hash_buckets=97)


def _steps(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["type"] == "step"]


def _epochs(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["dev"]["rsum"] for r in recs if r["type"] == "epoch"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    tr, dv = _data()
    fit(_model(), tr, TRAIN, dv, out_dir=out)
    return out


def _killed_then_resumed(tmp_path: Path, mode: str) -> Path:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(torch.get_num_threads()), mode],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -9, f"child was not killed: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    tr, dv = _data()
    fit(_model(), tr, TRAIN, dv, out_dir=out, resume=True)
    return out


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigkill_mid_epoch_resume_is_exact(reference, tmp_path):
    out = _killed_then_resumed(tmp_path, "step")
    # the killed run logged steps 10-11 after its checkpoint at 9 (epoch 2); the resume cut and redid them
    assert _steps(out) == _steps(reference)
    assert _epochs(out) == _epochs(reference)
    _same_weights(out, reference)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resume = [r for r in recs if r["type"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 9


def test_sigkill_inside_checkpoint_rename_resume_is_exact(reference, tmp_path):
    out = _killed_then_resumed(tmp_path, "rename")
    assert _steps(out) == _steps(reference)
    _same_weights(out, reference)
    assert not (out / ".last.old").exists()  # the next save cleaned it up


def test_resume_refuses_changed_settings(reference, tmp_path):
    import shutil

    from itmzoo.config import ConfigError

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    tr, dv = _data()
    with pytest.raises(ConfigError, match=r"lr=0.005->0.001"):
        fit(_model(), tr, {**TRAIN, "lr": 1e-3}, dv, out_dir=out, resume=True)
    # more epochs is a legitimate continuation
    res = fit(_model(), tr, {**TRAIN, "epochs": 3}, dv, out_dir=out, resume=True)
    assert res.epochs == 3 and res.steps == 3 * (24 * 5 // 16)
