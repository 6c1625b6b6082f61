"""The training loop every method shares; method quirks live in the model's hooks.

The engine uses only the contract of `itmzoo.models.base.ITMModel` (docs/contract.md): `forward`,
the loss split `train_features` / `train_loss` with the model's `accumulation` policy, and the hooks
`on_epoch_start`, `on_step_start`, `after_optimizer_step` and `param_groups`. Distributed training
gathers embeddings inside the model (`itmzoo.distributed.gather_features`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed as D
from ..config import ConfigError, config_from_dict, config_to_dict
from ..data.split import RetrievalSplit
from ..eval.options import EvalOptions, eval_options
from ..eval.similarity import autocast_context
from ..features import cat_features, features_to
from ..models.base import ACCUMULATION_POLICIES, ITMModel
from .checkpoint import capture_rng, find_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig
from .cpu_threads import plan_cpu_threads
from .data import make_train_loader, merge_batches
from .logs import JsonlLog, TensorBoardLog
from .optim import LRSchedule, apply_freeze, build_optimizer

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "fit", "seed_everything", "steps_per_epoch"]

# without a terminal, at most one progress line per this many seconds (at log_every steps)
PROGRESS_LINE_SECONDS = 15.0

# settings a resumed run may change without breaking the continuation
RESUMABLE_CHANGES = {"epochs", "max_steps", "progress", "log_every", "tensorboard", "num_workers", "eval_every",
                     "ckpt_every", "device", "cpu_threads"}


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) of a step is NaN or infinite; training stopped before applying it."""


@dataclasses.dataclass
class TrainResult:
    out_dir: Path | None
    steps: int
    epochs: int  # epochs completed
    best_metric: float | None
    best_epoch: int | None  # counted from 1, as in every printed line, log record and file
    history: list[dict[str, Any]]  # the epoch records of log.jsonl
    last_dev: dict[str, Any] | None


def steps_per_epoch(cfg: TrainConfig, micro_batches: int) -> int:
    """Optimizer steps in an epoch of `micro_batches`: the whole accumulation windows, plus the incomplete
    last one unless ``drop_last_window`` (default: ``drop_last``) drops it; Lightning steps on it."""
    drop_window = cfg.drop_last if cfg.drop_last_window is None else cfg.drop_last_window
    return micro_batches // cfg.accum_steps if drop_window else -(-micro_batches // cfg.accum_steps)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StepModule(torch.nn.Module):
    """What DistributedDataParallel wraps: one forward entry for the loss and for cached features."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor], mode: str = "loss") -> Any:
        if mode == "features":
            return self.model.train_features(batch)
        return self.model(batch)


def _scalars(out: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def _float_items(feats: Any) -> list[tuple[str | None, torch.Tensor]]:
    if isinstance(feats, torch.Tensor):
        return [(None, feats)]
    return [(k, v) for k, v in feats.items()]


def _batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ValueError("empty batch")


def _declared_dead(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters that match the model's ``unused_parameters`` globs."""
    globs = type(model).unused_parameters if isinstance(model, ITMModel) else ()
    return [n for n, p in model.named_parameters() if p.requires_grad and any(fnmatch.fnmatchcase(n, g) for g in globs)]


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt_metrics(m: Mapping[str, Any]) -> str:
    keys = [("i2t_r1", "i2t R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"), ("t2i_r1", "t2i R@1"), ("t2i_r5", "R@5"),
            ("t2i_r10", "R@10"), ("rsum", "rsum")]
    return "  ".join(f"{label} {m[k]:.1f}" for k, label in keys if k in m)


class Trainer:
    """Trains `model` on `train_data` (a RetrievalSplit) under `config`; see `fit`."""

    def __init__(self, model: torch.nn.Module, train_data: RetrievalSplit,
                 config: TrainConfig | Mapping[str, Any] | None = None,
                 eval_data: RetrievalSplit | None = None, *, eval_config: EvalOptions | Mapping[str, Any] | None = None,
                 out_dir: str | Path | None = None, resume: bool = False, callbacks: Sequence[Any] = (),
                 verbose: bool = True) -> None:
        self.cfg = config if isinstance(config, TrainConfig) else config_from_dict(TrainConfig, config or {})
        self.eval_cfg = eval_options(eval_config)
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        self.callbacks = list(callbacks)
        self.verbose = verbose  # one line per epoch on rank 0 (the tqdm bar is train.progress)
        # loop position (restored on resume)
        self.epoch = 0
        self.batch_pos = 0  # micro-batches of `epoch` already consumed
        self.step = 0  # optimizer steps taken
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.last_dev: dict[str, Any] | None = None
        self._epoch_loss = [0.0, 0]
        self._last_ckpt: tuple[Path, int] | None = None

    # -- set-up --------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.cfg.device is not None:
            return torch.device(self.cfg.device)
        if torch.cuda.is_available():
            index = int(os.environ.get("LOCAL_RANK", "0")) if D.is_distributed() else torch.cuda.current_device()
            return torch.device("cuda", index)
        return torch.device("cpu")

    def _accum_mode(self) -> str:
        """"none" (one micro-batch per step), or the model's policy: "exact" or "naive"."""
        cfg, m = self.cfg, self.model
        if cfg.accum_steps == 1:
            return "none"
        policy = m.accumulation
        if policy not in ACCUMULATION_POLICIES:
            raise ConfigError(f"{type(m).__name__}.accumulation must be one of {ACCUMULATION_POLICIES}, got {policy!r}")
        if policy == "refuse":
            raise ConfigError(
                f"train.accum_steps={cfg.accum_steps}: the loss of {type(m).__name__} depends on the whole batch "
                "(hardest or in-batch negatives) and the method does not split it for exact accumulation "
                "(accumulation='refuse'); use train.accum_steps=1 with a batch that fits, or more GPUs"
            )
        return policy

    def _amp(self, device: torch.device) -> str | None:
        amp = self.cfg.amp
        if amp is None:
            return None
        if device.type != "cuda":
            if self.main:
                tqdm.write(f"itmzoo train: amp={amp} needs CUDA; training in fp32 on {device.type}")
            return None
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.amp=bf16: this GPU does not support bfloat16; use fp16")
        return amp

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.amp)

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.main = self.rank == 0
        self.device = device = self._device()
        det_before = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        if self.world > 1:
            # collectives (checkpoint RNG gathering, evaluation barriers) must happen on every rank
            mine = (str(self.out_dir) if self.out_dir is not None else None, self.eval_data is not None, self.resume)
            every: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(every, mine)
            if any(x != mine for x in every):
                raise ConfigError(f"ranks disagree on (out_dir, eval_data given, resume): {every}; pass the same "
                                  "out_dir, eval_data and resume on every rank (rank 0 writes the files)")
        self.amp = self._amp(device)
        self.accum_mode = self._accum_mode()
        per_step = cfg.batch_size // self.world
        if cfg.batch_size % (self.world * cfg.accum_steps):
            raise ConfigError(f"train.batch_size={cfg.batch_size} must be divisible by world size x accum_steps "
                              f"({self.world} x {cfg.accum_steps})")
        micro = per_step // cfg.accum_steps

        model = self.model
        if cfg.freeze:
            apply_freeze(model, cfg.freeze)
        model.to(device)
        model.train()
        seed_everything(cfg.seed + self.rank)  # ranks draw different dropout masks; data seeding is separate

        loader = make_train_loader(self.train_data, model, micro, seed=cfg.seed, rank=self.rank, world_size=self.world,
                                   num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                   drop_last=cfg.drop_last, epoch_over=cfg.epoch_over)
        sampler = loader.sampler
        self.steps_per_epoch = steps_per_epoch(cfg, sampler.batches_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"one epoch holds {sampler.batches_per_epoch} micro-batches, fewer than accum_steps="
                              f"{cfg.accum_steps}")
        sampler.limit = self.steps_per_epoch * cfg.accum_steps

        self.step_module: torch.nn.Module = _StepModule(model)
        self.ddp = None
        self.tuner = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # weights the model declares dead by design never get a gradient: DDP must look for them
            # every step, or its second step fails waiting for their reduction
            dead = _declared_dead(model)
            if dead and not cfg.find_unused_parameters and self.main and self.verbose:
                print(f"train: DDP with find_unused_parameters (the model declares {len(dead)} weights that get no "
                      f"gradient by design, e.g. {dead[0]})")
            self.ddp = DDP(self.step_module, device_ids=[device.index] if device.type == "cuda" else None,
                           find_unused_parameters=cfg.find_unused_parameters or bool(dead))
            self.step_module = self.ddp
        self.optimizer = build_optimizer(model, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = LRSchedule(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None

        self.log = JsonlLog(self.out_dir / "log.jsonl" if (self.out_dir and self.main) else None)
        self.tb = None
        threads_before = torch.get_num_threads()
        plan = plan_cpu_threads(device, cfg.cpu_threads, cfg.num_workers, self.world, cfg.deterministic)
        self.tuner = plan.tuner
        if self.tuner is not None:
            self.tuner.on_choice = self._threads_chosen
        if plan.threads is not None:
            torch.set_num_threads(plan.threads)
        if self.main and self.verbose and device.type == "cpu":
            if self.tuner is not None:
                how = (f"CPU threads chosen from step times among {self.tuner.candidates} "
                       "(train.cpu_threads fixes the count)")
            else:
                how = f"{torch.get_num_threads()} CPU thread(s)"
            print(f"train: {how}" + (f"; {plan.why}" if plan.why else ""))
        try:
            resumed_from = self._maybe_resume()
            if resumed_from is None:
                self.log.truncate(0)  # a new run: no records of an earlier attempt in the same directory
            if self.main and cfg.tensorboard and self.out_dir is not None:
                self.tb = TensorBoardLog(self.out_dir / "tensorboard",
                                         purge_step=self.step + 1 if resumed_from else None)
            n_train = sum(p.numel() for p in self.params)
            head = {"world_size": self.world, "device": str(device), "amp": self.amp, "accum_mode": self.accum_mode,
                    "micro_batch": micro, "steps_per_epoch": self.steps_per_epoch, "trainable_params": n_train,
                    "model": model.registry_name or type(model).__name__, "time": time.time()}
            if resumed_from is not None:
                self.log.write({"type": "resume", "from": str(resumed_from), "step": self.step, "epoch": self.epoch + 1,
                                "batch": self.batch_pos // cfg.accum_steps, **head})
            else:
                self.log.write({"type": "start", "train_config": config_to_dict(cfg), **head})
            self._loop(loader, sampler)
        finally:
            self.log.close()
            if self.tb is not None:
                self.tb.close()
            if cfg.deterministic and not det_before:
                torch.use_deterministic_algorithms(False)
            if torch.get_num_threads() != threads_before:
                torch.set_num_threads(threads_before)
        return TrainResult(self.out_dir, self.step, self.epoch, self.best, self.best_epoch, self.history, self.last_dev)

    def _maybe_resume(self) -> Path | None:
        if not self.resume:
            return None
        if self.out_dir is None:
            raise ConfigError("resume needs an output directory")
        ckpt = find_checkpoint(self.out_dir)
        if ckpt is None:
            if self.main:
                tqdm.write(f"itmzoo train: no checkpoint in {self.out_dir}; starting a new run")
            return None
        state = load_checkpoint(ckpt, self.model)
        saved = state["train_config"]
        now = config_to_dict(self.cfg)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"cannot resume {ckpt}: train settings differ from the checkpoint's: "
                              + ", ".join(f"{k}={saved.get(k)!r}->{now.get(k)!r}" for k in changed)
                              + "; resume with the original settings or write to a new --out")
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_pos, self.step = state["epoch"], state["batch_pos"], state["step"]
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.history = list(state["history"])
        self.last_dev = state.get("last_dev")
        self._epoch_loss = list(state["epoch_loss"])
        rngs = state["rng"]
        if len(rngs) == self.world:
            restore_rng(rngs[self.rank], self.device)
        else:  # a different number of processes cannot continue the same random streams
            seed_everything(self.cfg.seed + self.rank + 7919 * self.step)
            if self.main:
                tqdm.write(f"itmzoo train: checkpoint from {len(rngs)} process(es), resuming on {self.world}: "
                           "random streams restart (the run is no longer bit-identical to an uninterrupted one)")
        self.log.truncate(state["log_size"])
        self._last_ckpt = (ckpt, self.step)
        return ckpt

    def _save(self) -> None:
        """Write DIR/last (every rank contributes its RNG state; rank 0 writes)."""
        if self.out_dir is None:
            return
        rng = capture_rng(self.device)
        if self.world > 1:
            rngs: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if self.main:
            state = {
                "format": "itmzoo-trainer/1",
                "epoch": self.epoch, "batch_pos": self.batch_pos, "step": self.step,
                "best": self.best, "best_epoch": self.best_epoch, "history": self.history, "last_dev": self.last_dev,
                "epoch_loss": list(self._epoch_loss),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rngs, "train_config": config_to_dict(self.cfg), "log_size": self.log.size(),
            }
            save_checkpoint(self.out_dir / "last", self.model, state)
        self._last_ckpt = (self.out_dir / "last", self.step)
        D.barrier()

    def _stop_nonfinite(self, what: str, value: float, batch_in_epoch: int) -> None:
        where = (f"epoch {self.epoch + 1}, batch {batch_in_epoch} of {self.steps_per_epoch} "
                 f"(optimizer step {self.step + 1})")
        if self._last_ckpt is not None:
            keep = f"the last good checkpoint is {self._last_ckpt[0]} (after step {self._last_ckpt[1]})"
        elif self.out_dir is not None:
            keep = "no checkpoint was written before it"
        else:
            keep = "no output directory was given"
        self.log.write({"type": "error", "error": f"non-finite {what}", "value": value, "epoch": self.epoch + 1,
                        "step": self.step + 1, "time": time.time()})
        raise NonFiniteLossError(f"non-finite {what} ({value}) at {where}; stopped before the optimizer step; {keep}")

    # -- one optimizer step --------------------------------------------------------------------------
    def _global_scalars(self, vals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world == 1:
            return vals
        keys = sorted(vals)
        t = torch.stack([vals[k] for k in keys])
        torch.distributed.all_reduce(t)
        return {k: v for k, v in zip(keys, t / self.world)}

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _sync_ctx(self, last: bool) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()

    def _plain_step(self, micro: list[dict[str, Any]], b: int) -> dict[str, torch.Tensor]:
        """Forward/backward each micro-batch; their gradients add up (loss / accum_steps each).

        An incomplete last window divides by accum_steps too, as Lightning's naive accumulation does.
        """
        total: dict[str, torch.Tensor] = {}
        n = self.cfg.accum_steps
        for i, mb in enumerate(micro):
            # the last micro-batch of the window syncs DDP gradients, also in an incomplete last window
            with self._sync_ctx(i == len(micro) - 1):
                with self._autocast():
                    out = self.step_module(mb, "loss")
                vals = self._global_scalars(_scalars(out))
                self._check(vals, b)
                self._backward(out["loss"].float() / n)
            for k, v in vals.items():
                total[k] = total.get(k, 0) + v / n
        return total

    def _cached_step(self, micro: list[dict[str, Any]], b: int) -> dict[str, torch.Tensor]:
        """Exact accumulation for batch-dependent losses (the GradCache scheme, as in open_clip).

        1. embed every micro-batch without a graph, remembering each one's RNG state;
        2. compute the loss over all embeddings at once (the same negatives as one big batch) and
           back-propagate it to the embeddings only;
        3. re-embed each micro-batch with a graph under its saved RNG state (same dropout) and push the
           cached embedding gradients through it.
        The step's gradient equals that of the whole batch in one pass (up to float rounding);
        BatchNorm running statistics see each micro-batch twice.
        """
        model, dev = self.model, self.device
        devices = [dev] if dev.type == "cuda" else []
        rng_states, parts = [], []
        with torch.no_grad():
            for mb in micro:
                rng_states.append((torch.get_rng_state(), torch.cuda.get_rng_state(dev) if devices else None))
                with self._autocast():
                    parts.append(model.train_features(mb))
        feats = cat_features(parts)
        leaves = {}
        for k, v in _float_items(feats):
            leaves[k] = v.detach().float().requires_grad_(True) if v.is_floating_point() else v
        feats_in = leaves[None] if None in leaves else leaves
        grads_before = {id(p) for p in self.params if p.grad is not None}
        with self._autocast():
            out = model.train_loss(feats_in, merge_batches(micro))
        vals = self._global_scalars(_scalars(out))
        self._check(vals, b)
        self._backward(out["loss"].float())
        if self.world > 1 and any(p.grad is not None and id(p) not in grads_before for p in self.params):
            raise ConfigError(f"{type(model).__name__}.train_loss uses parameters of its own; cached-feature "
                              "accumulation under DDP needs a parameter-free train_loss (or train.accum_steps=1)")
        offset = 0
        for i, mb in enumerate(micro):
            n = _batch_len(mb)
            with self._sync_ctx(i == len(micro) - 1), torch.random.fork_rng(devices=devices):
                cpu_state, cuda_state = rng_states[i]
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, dev)
                with self._autocast():
                    f = self.step_module(mb, "features")
                outs, grads = [], []
                for k, v in _float_items(f):
                    leaf = leaves[k]
                    if not (v.is_floating_point() and v.requires_grad and leaf.grad is not None):
                        continue
                    g = leaf.grad[offset:offset + n]
                    g = g[(slice(None),) + tuple(slice(0, s) for s in v.shape[1:])]
                    outs.append(v)
                    grads.append(g.to(v.dtype))
                if outs:
                    torch.autograd.backward(outs, grads)
            offset += n
        return vals

    def _check(self, vals: dict[str, torch.Tensor], b: int) -> None:
        loss = float(vals["loss"])
        if not math.isfinite(loss):
            self._stop_nonfinite("loss", loss, b)

    def _optimizer_step(self, b: int) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(norm) and self.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            self._stop_nonfinite("gradient norm", norm, b)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()
        return norm

    # -- epochs ----------------------------------------------------------------------------------------
    def _loop(self, loader: Iterable, sampler: Any) -> None:
        cfg, model = self.cfg, self.model
        A = cfg.accum_steps
        step_fn = self._cached_step if self.accum_mode == "exact" else self._plain_step
        show = self.main and cfg.progress
        # a bar only on a terminal; in a log file (nohup, CI, a pipe) periodic plain lines instead
        lines = show and self.verbose and not _is_terminal(sys.stderr)
        bar = tqdm(total=cfg.epochs * self.steps_per_epoch, initial=self.epoch * self.steps_per_epoch
                   + self.batch_pos // A, disable=not show or lines, unit="step", dynamic_ncols=True)
        t_line = time.time()
        stop = cfg.max_steps is not None and self.step >= cfg.max_steps
        try:
            while self.epoch < cfg.epochs and not stop:
                model.on_epoch_start(self.epoch)
                sampler.set_epoch(self.epoch, start=self.batch_pos)
                bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}")
                t_epoch = time.time()
                t_last, n_last = time.time(), 0
                micro: list[dict[str, Any]] = []
                n_batches = len(loader)
                for i_batch, batch in enumerate(loader):
                    micro.append(features_to(batch, self.device))
                    if len(micro) < A and i_batch + 1 < n_batches:
                        continue
                    b = self.batch_pos // A  # step index within the epoch
                    self.schedule.apply(self.step)
                    model.on_step_start(self.epoch, b, self.steps_per_epoch)
                    n_items = sum(_batch_len(m) for m in micro) * self.world
                    if self.tuner is not None:
                        n = self.tuner.next_threads()
                        if n != torch.get_num_threads():
                            torch.set_num_threads(n)
                    t_step = time.perf_counter()
                    vals = step_fn(micro, b + 1)
                    norm = self._optimizer_step(b + 1)
                    step_seconds = time.perf_counter() - t_step
                    self.batch_pos += len(micro)
                    micro = []
                    self.step += 1
                    if self.tuner is not None:
                        self.tuner.record(step_seconds)
                    loss = float(vals["loss"])
                    self._epoch_loss[0] += loss
                    self._epoch_loss[1] += 1
                    n_last += n_items
                    record = {"type": "step", "epoch": self.epoch + 1, "step": self.step, "batch": b + 1,
                              **{k: float(v) for k, v in vals.items()}, "lr": self.optimizer.param_groups[0]["lr"],
                              "grad_norm": norm}
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or b + 1 == self.steps_per_epoch:
                        now = time.time()
                        record.update(samples_per_s=n_last / max(now - t_last, 1e-9), time=now)
                        t_last, n_last = now, 0
                        self.log.write(record)
                        if self.tb is not None:
                            self.tb.scalars("train", {k: v for k, v in record.items() if k not in ("type", "time")},
                                            self.step)
                        bar.set_postfix(loss=f"{loss:.4g}", lr=f"{record['lr']:.2e}",
                                        sps=f"{record['samples_per_s']:.0f}")
                        if lines and now - t_line >= PROGRESS_LINE_SECONDS:
                            t_line = now
                            print(f"epoch {self.epoch + 1}/{cfg.epochs}  step {b + 1}/{self.steps_per_epoch}  "
                                  f"loss {loss:.4g}  lr {record['lr']:.2e}  {record['samples_per_s']:.0f} samples/s",
                                  file=sys.stderr, flush=True)
                    for cb in self.callbacks:
                        fn = getattr(cb, "on_step_end", None)  # callbacks are user objects, not models
                        if fn is not None:
                            fn(self, record)
                    stop = cfg.max_steps is not None and self.step >= cfg.max_steps
                    mid_epoch = self.batch_pos < sampler.batches_per_epoch
                    if mid_epoch and (stop or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0)):
                        self._save()
                    if stop:
                        break
                finished = self.batch_pos >= sampler.batches_per_epoch
                self._end_epoch(finished, time.time() - t_epoch)
        finally:
            bar.close()

    def _end_epoch(self, finished: bool, seconds: float) -> None:
        cfg = self.cfg
        last = (self.epoch + 1 >= cfg.epochs) or (cfg.max_steps is not None and self.step >= cfg.max_steps)
        record: dict[str, Any] = {"type": "epoch", "epoch": self.epoch + 1, "finished": finished, "step": self.step,
                                  "train_loss": self._epoch_loss[0] / max(1, self._epoch_loss[1]),
                                  "seconds": seconds}
        if self.eval_data is not None and (last or (self.epoch + 1) % cfg.eval_every == 0):
            metrics = self._evaluate()  # every rank takes part; every rank gets the metrics
            if self.main:
                value = float(metrics[cfg.best_metric])
                is_best = self.best is None or value > self.best
                if is_best:
                    self.best, self.best_epoch = value, self.epoch + 1
                    if self.out_dir is not None:
                        self.model.save_pretrained(self.out_dir / "best", extra={
                            "epoch": self.epoch + 1, "step": self.step, cfg.best_metric: value,
                            "dev": {k: v for k, v in metrics.items() if k != "folds"}})
                record.update(dev=metrics, best=is_best)
                self.last_dev = metrics
            D.barrier()
        record["time"] = time.time()
        self.history.append(record)
        self.log.write(record)
        if self.tb is not None and "dev" in record:
            self.tb.scalars("dev", record["dev"], self.step)
        if self.main and self.verbose:
            dev = ""
            if "dev" in record:
                dev = f"  dev {_fmt_metrics(record['dev'])}{' (best)' if record.get('best') else ''}"
            tqdm.write(f"epoch {self.epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}{dev}  ({seconds:.1f} s)")
        for cb in self.callbacks:
            fn = getattr(cb, "on_epoch_end", None)
            if fn is not None:
                fn(self, record)
        if finished:
            self.epoch += 1
            self.batch_pos = 0
            self._epoch_loss = [0.0, 0]
            self._save()

    def _evaluate(self) -> dict[str, Any]:
        """Dev metrics, with the RNG untouched so evaluation never changes training.

        Under DDP every rank encodes and scores its share (`itmzoo.evaluate` inside a process group)
        instead of rank 0 working while the others wait.
        """
        from ..eval import evaluate

        devices = [self.device] if self.device.type == "cuda" else []
        opts = dataclasses.replace(self.eval_cfg, device=str(self.device), progress=False, return_sims=False)
        step_threads = torch.get_num_threads()
        if self.tuner is not None:  # the evaluator shares its CPU blocks among threads itself
            torch.set_num_threads(self.tuner.max_threads)
        try:
            with torch.random.fork_rng(devices=devices):
                out = evaluate(self.model, self.eval_data, self.eval_cfg.dev_protocol or "full", options=opts)
        finally:
            torch.set_num_threads(step_threads)
        return out

    def _threads_chosen(self, threads: int, medians: dict[int, float], changed: bool) -> None:
        """The tuner's choice after a probe: logged, and said when it changes (or is the first)."""
        self.log.write({"type": "cpu_threads", "step": self.step, "threads": threads,
                        "step_seconds": {str(c): m for c, m in sorted(medians.items())}, "time": time.time()})
        if changed and self.main and self.verbose:
            times = ", ".join(f"{c}: {m * 1e3:.0f} ms" for c, m in sorted(medians.items()))
            tqdm.write(f"train: {threads} CPU thread(s) after step {self.step} "
                       f"(median step time by threads: {times})")


def fit(model: torch.nn.Module, train_data: RetrievalSplit, config: TrainConfig | Mapping[str, Any] | None = None,
        eval_data: RetrievalSplit | None = None, **kwargs: Any) -> TrainResult:
    """Train `model` on `train_data`, evaluating on `eval_data` after every epoch.

    `config` is a `TrainConfig` or a dict of its fields. Keywords: ``eval_config`` (`EvalOptions` or dict),
    ``out_dir`` (writes log.jsonl, last/ and best/ there), ``resume`` (continue from ``out_dir/last``),
    ``callbacks`` (objects with ``on_step_end(trainer, record)`` / ``on_epoch_end(trainer, record)``),
    ``verbose`` (print one line per epoch; the progress bar is ``config.progress``).
    """
    return Trainer(model, train_data, config, eval_data, **kwargs).fit()
