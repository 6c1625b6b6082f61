"""Typed settings of a training run: the ``train:`` and ``eval:`` sections of a run file."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from ..config import ConfigError, ModelConfig
from ..eval.options import EvalOptions

__all__ = ["EvalConfig", "TrainConfig"]


@dataclasses.dataclass
class TrainConfig(ModelConfig):
    """Optimiser, schedule, precision, checkpointing and logging of a run (``train:`` section).

    Defaults follow the SCAN/VSE family (Adam, lr 2e-4, grad-clip 2.0, fp32, step decay); method
    configs in ``configs/`` set their paper's values.
    """

    epochs: int = 30
    batch_size: int = 128  # global batch: all ranks and all accumulation micro-batches together
    accum_steps: int = 1  # micro-batches per optimizer step (the model's `accumulation` policy decides how)
    # keep the last, smaller batch of an epoch (and step on an incomplete accumulation window, as
    # Lightning does) instead of dropping it; several upstream recipes train on it
    drop_last: bool = True
    # the incomplete last accumulation window (whole micro-batches): None = as drop_last; false with
    # drop_last true steps on it but drops the smaller micro-batch (Lightning over a drop_last DataLoader)
    drop_last_window: Optional[bool] = None
    # optimiser
    optimizer: Literal["adam", "adamw", "hf_adamw"] = "adam"  # hf_adamw: transformers' old AdamW (ESL-CLIP)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_mults: dict[str, float] = dataclasses.field(default_factory=dict)  # param-name glob -> lr multiplier
    no_weight_decay: list[str] = dataclasses.field(default_factory=list)  # param-name globs without decay
    freeze: list[str] = dataclasses.field(default_factory=list)  # param-name globs never trained
    # schedule (a factor on every group's lr, from the optimizer step count)
    schedule: Literal["constant", "step", "cosine", "hf_cosine"] = "step"
    lr_decay_epochs: list[int] = dataclasses.field(default_factory=list)  # step: x lr_decay_factor from these epochs
    lr_decay_factor: float = 0.1
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps (any schedule)
    warmup_ratio: float = 0.0  # or: warm-up over int(warmup_ratio x schedule length) steps
    num_cycles: float = 0.5  # cosine / hf_cosine: cosine cycles over the schedule (0.5 = half a cosine to 0)
    schedule_steps: Optional[int] = None  # schedule length in optimizer steps (None: epochs x steps per epoch)
    min_lr_ratio: float = 0.0  # cosine: final lr / base lr
    # an epoch runs over every caption (one pair each) or over every image (one random caption each);
    # None: the model's `train_epoch_over` (ITMModel default: captions)
    epoch_over: Optional[Literal["captions", "images"]] = None
    grad_clip: Optional[float] = 2.0  # max global grad norm; None disables
    # precision and hardware
    amp: Optional[Literal["bf16", "fp16"]] = None  # autocast on CUDA; ignored (fp32) on CPU
    device: Optional[str] = None  # None: cuda (this rank's GPU) if available, else cpu
    num_workers: int = 0
    # CPU: torch threads of every training step; null = chosen from measured step times between torch's
    # count (lowered beside loader workers) and fewer, which holds the speed when another process takes a
    # core; set a number (or OMP_NUM_THREADS) for bit-reproducible runs
    cpu_threads: Optional[int] = None
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms + cudnn settings
    find_unused_parameters: bool = False  # DDP
    # checkpoints, evaluation, logging
    ckpt_every: int = 0  # also checkpoint every N optimizer steps mid-epoch (0: at epoch ends only)
    eval_every: int = 1  # evaluate on dev every N epochs (and after the last)
    best_metric: str = "rsum"
    log_every: int = 10  # optimizer steps between log.jsonl step records
    progress: bool = True  # tqdm bar
    tensorboard: bool = False
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total (smoke runs)

    def validate(self) -> None:
        for f in ("epochs", "batch_size", "accum_steps", "log_every", "eval_every"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"train.{f} must be positive, got {getattr(self, f)}")
        for f in ("ckpt_every", "warmup_steps", "num_workers", "weight_decay"):
            if getattr(self, f) < 0:
                raise ConfigError(f"train.{f} must be >= 0, got {getattr(self, f)}")
        if self.cpu_threads is not None and self.cpu_threads <= 0:
            raise ConfigError(f"train.cpu_threads must be a positive int or null, got {self.cpu_threads}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by train.accum_steps "
                              f"({self.accum_steps})")
        if self.drop_last_window and not self.drop_last:
            raise ConfigError("train.drop_last_window: true needs train.drop_last: true (dropping the window "
                              "drops its smaller micro-batch too)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be positive or null, got {self.grad_clip}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError("set train.warmup_steps or train.warmup_ratio, not both")
        if self.num_cycles <= 0:
            raise ConfigError(f"train.num_cycles must be positive, got {self.num_cycles}")
        if self.schedule_steps is not None and self.schedule_steps <= 0:
            raise ConfigError(f"train.schedule_steps must be positive or null, got {self.schedule_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"train.max_steps must be positive or null, got {self.max_steps}")
        for pattern, mult in self.lr_mults.items():
            if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult < 0:
                raise ConfigError(f"train.lr_mults['{pattern}'] must be a number >= 0, got {mult!r}")


# The ``eval:`` section of a run file is the evaluator's own options object (one definition, in eval/).
EvalConfig = EvalOptions
