"""Run files: ``{model, data, train, eval}`` YAML -> a trained model, DIR/config.json, metrics.json.

::

    model: {name: toy_vse, embed_size: 256}      # registry name + config fields (checkpoint: optional)
    data:                                        # keys beside train/dev/test are shared by all three
      format: synthetic
      num_images: 1200
      train: {split: train}
      dev: {split: dev}
      test: {split: test}
    train: {epochs: 8, batch_size: 128, lr: 2.0e-4}   # itmzoo.train.TrainConfig
    eval: {protocol: full}                            # itmzoo.eval.EvalOptions

`run_training` writes ``DIR/config.json`` (the resolved run file, every model field included),
``DIR/log.jsonl``, ``DIR/last/``, ``DIR/best/`` and ``DIR/metrics.json`` (the best checkpoint scored on
the test split, or on dev without one).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..checkpoints.atomic import write_text_atomic
from ..config import ConfigError, config_from_dict, config_to_dict
from ..eval.options import EvalOptions
from ..eval.report import chance_metrics, format_metrics
from ..jsonfmt import dumps, round_floats
from .config import TrainConfig

__all__ = ["RunConfig", "chance_metrics", "check_splits_fit", "format_metrics", "load_data", "parse_run_config",
           "run_training"]

SECTIONS = ("model", "data", "train", "eval")
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass
class RunConfig:
    model_name: str
    model_fields: dict[str, Any]
    model_checkpoint: str | None
    data: dict[str, dict[str, Any]]  # split -> load_split spec (shared keys merged in)
    train: TrainConfig
    eval: EvalOptions


def parse_run_config(tree: Mapping[str, Any]) -> RunConfig:
    """Validate a run tree (from `itmzoo.config.load_run_config`) into its typed parts."""
    unknown = set(tree) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown run-file section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
    model = dict(tree.get("model") or {})
    name = model.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("run file: model.name is required (a registry name, e.g. toy_vse; see `itmzoo list`)")
    checkpoint = model.pop("checkpoint", None)
    data_tree = dict(tree.get("data") or {})
    shared = {k: v for k, v in data_tree.items() if k not in SPLITS}
    data: dict[str, dict[str, Any]] = {}
    for s in SPLITS:
        spec = data_tree.get(s)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(f"run file: data.{s} must be a mapping (a load_split spec), got {spec!r}")
        data[s] = {**copy.deepcopy(shared), **spec}
    if "train" not in data:
        raise ConfigError("run file: data.train is required (e.g. {format: synthetic, split: train})")
    for s, spec in data.items():
        if "format" not in spec:
            raise ConfigError(f"run file: data.{s} needs a 'format' (synthetic, precomp, ...)")
    train = config_from_dict(TrainConfig, tree.get("train") or {}, prefix="train.")
    ev = config_from_dict(EvalOptions, tree.get("eval") or {}, prefix="eval.")
    return RunConfig(name, model, checkpoint, data, train, ev)


def load_data(spec: Mapping[str, Any]) -> Any:
    """A `RetrievalSplit` from a ``{"format": ..., ...}`` spec (`itmzoo.data.load_split`)."""
    from .. import data as data_mod

    loader = getattr(data_mod, "load_split", None)
    if loader is None:
        raise ConfigError("this itmzoo has no data readers (itmzoo.data.load_split is missing)")
    return loader(dict(spec))


def _resolved_tree(run: RunConfig, model: Any) -> dict[str, Any]:
    model_sec = {"name": run.model_name, **config_to_dict(model.config)}
    if run.model_checkpoint:
        model_sec["checkpoint"] = run.model_checkpoint
    return {"model": model_sec, "data": run.data, "train": config_to_dict(run.train), "eval": config_to_dict(run.eval)}


def _check_same_run(old: Mapping[str, Any], new: Mapping[str, Any], path: Path) -> None:
    from .engine import RESUMABLE_CHANGES

    diffs = []
    for sec in SECTIONS:
        a, b = old.get(sec, {}), new.get(sec, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k) and not (sec == "train" and k in RESUMABLE_CHANGES) and sec != "eval":
                diffs.append(f"{sec}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    if diffs:
        raise ConfigError(f"--resume: the run in {path.parent} was started with a different configuration ("
                          + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
                          + "); resume with the same settings or choose another --out")


def _describe_spec(spec: Mapping[str, Any]) -> str:
    where = spec.get("path") or spec.get("split")
    return f"{spec.get('format')}" + (f" {where}" if where else "")


def _check_device(train: TrainConfig) -> None:
    import torch

    dev = train.device
    if dev is not None and dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={dev!r}, but this machine has no CUDA device (torch {torch.__version__}, "
                          "CUDA build: " + ("yes" if torch.version.cuda else "no") + "); use train.device=cpu or "
                          "leave it unset")


def check_splits_fit(model: Any, splits: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> None:
    """Encode two images and captions of every split and score them, so a split the model cannot read
    (feature dim, missing vocabulary, wrong kind) fails now, naming the split, not after training."""
    import torch

    from ..eval.similarity import encode_split

    for name, split in splits.items():
        probe = split.subset(np.arange(min(2, split.num_images)))
        try:
            with torch.random.fork_rng(devices=[]):
                img, txt = encode_split(model, probe, batch_size=2, device="cpu", progress=False)
                with torch.no_grad():
                    model.eval()
                    model.similarity(img, txt)
        except Exception as e:  # any failure here would stop the run later; report it with the split's name
            msg = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(f"data.{name} ({_describe_spec(specs[name])}) does not fit the model "
                              f"'{model.registry_name}': {msg}") from e
        finally:
            model.train()


def _banner(model: Any, splits: Mapping[str, Any], run: RunConfig, out: Path, world: int) -> str:
    import torch

    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = run.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = ", ".join(f"{name} {s.num_images} images / {s.num_captions} captions" for name, s in splits.items())
    return (f"itmzoo train: model {run.model_name} ({n_all / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trainable)\n"
            f"  data: {data}\n"
            f"  device {device}" + (f" x {world} processes" if world > 1 else "")
            + f", {torch.get_num_threads()} CPU threads, {run.train.epochs} epochs of batch {run.train.batch_size}\n"
            f"  run dir {out}")


def run_training(tree: Mapping[str, Any], out_dir: str | Path, *, resume: bool = False, callbacks: Sequence[Any] = (),
                 verbose: bool = True) -> dict[str, Any]:
    """Train the run described by `tree` into `out_dir` and return the final metrics (also in metrics.json).

    Everything that can be checked before training is checked before anything is written into
    `out_dir`: the run file, the device, and that every split (test included) fits the model. The
    directory is locked for the whole run (`itmzoo.train.lock.RunLock`).
    """
    from .. import api
    from .. import distributed as D
    from .engine import seed_everything
    from .lock import RunLock

    run = parse_run_config(tree)
    out = Path(out_dir)
    _check_device(run.train)
    D.init_from_env()
    main = D.is_main_process()
    seed_everything(run.train.seed)  # the same initial weights on every rank and in every rerun
    model = api.build(run.model_name, checkpoint=run.model_checkpoint, **run.model_fields)
    splits = {s: load_data(spec) for s, spec in run.data.items()}  # every rank evaluates its share
    check_splits_fit(model, splits, run.data)
    resolved = _resolved_tree(run, model)
    cfg_path = out / "config.json"
    if resume and cfg_path.is_file():
        _check_same_run(json.loads(cfg_path.read_text(encoding="utf-8")), resolved, cfg_path)
    lock = RunLock(out).acquire() if main else None
    try:
        if main:
            write_text_atomic(cfg_path, json.dumps(resolved, indent=2))  # exact: --resume compares it
            if verbose:
                print(_banner(model, splits, run, out, D.get_world_size()), flush=True)
        return _train_and_score(run, model, splits, out, resume, callbacks, verbose, main)
    finally:
        if lock is not None:
            lock.release()


def _train_and_score(run: RunConfig, model: Any, splits: Mapping[str, Any], out: Path, resume: bool,
                     callbacks: Sequence[Any], verbose: bool, main: bool) -> dict[str, Any]:
    import torch

    from .. import api
    from .engine import Trainer

    t0 = time.time()
    trainer = Trainer(model, splits["train"], run.train, splits.get("dev"), eval_config=run.eval, out_dir=out,
                      resume=resume, callbacks=callbacks, verbose=verbose)
    result = trainer.fit()
    seconds = time.time() - t0
    name = "test" if "test" in splits else ("dev" if "dev" in splits else None)
    if name is None:
        if verbose and main:
            print(f"trained {result.steps} steps in {seconds:.0f} s; no dev/test split to evaluate")
        return {}
    from ..eval import evaluate

    best = out / "best"
    final_model = api.load(best, device=trainer.device) if (best / "config.json").is_file() else model
    split = splits[name]
    opts = dataclasses.replace(run.eval, device=str(trainer.device), progress=False, return_sims=True)
    with torch.random.fork_rng(devices=[]):
        protocol = run.eval.protocol if name == "test" else (run.eval.dev_protocol or "full")
        metrics = evaluate(final_model, split, protocol, options=opts)
    if not main:
        return {}
    chance = chance_metrics(split.caption_to_image)
    record = {**{k: v for k, v in metrics.items() if k != "sims"}, "split": name,
              "checkpoint": str(best) if final_model is not model else "final weights",
              "best_epoch": result.best_epoch, "dev_best": result.best_metric, "steps": result.steps,
              "train_seconds": seconds, "chance": chance, "seed": run.train.seed}
    record = round_floats(record)
    write_text_atomic(out / "metrics.json", dumps(record, indent=2))
    from ..eval.html import write_report

    try:
        title = f"{metrics.get('model', 'model')}: {name} split of {out.name}"
        report: Any = write_report(out / "report", {**metrics, "checkpoint": record["checkpoint"]}, split,
                                   metrics["sims"], title=title)
    except Exception as e:  # noqa: BLE001  the run and its metrics are saved; a report failure must not hide them
        report = f"not written ({type(e).__name__}: {e})"
    if verbose:
        print(f"{name} ({metrics['protocol']}, {metrics['n_images']} images, {metrics['n_captions']} captions): "
              f"{format_metrics(metrics)}")
        print(f"chance level: {format_metrics(chance)}")
        print(f"trained {result.steps} steps in {seconds:.0f} s; wrote {out}/metrics.json, best/ (epoch "
              f"{result.best_epoch}), log.jsonl")
        print(f"report: {report} (open it in a browser)")
    return record
