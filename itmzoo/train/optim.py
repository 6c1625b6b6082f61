"""Optimiser and learning-rate schedule from a `TrainConfig`.

Parameter groups start from the model's own ``param_groups(lr)`` hook (e.g. BERT at 0.1 x lr) and are
then split by the config: ``lr_mults`` (parameter-name glob -> multiplier, first match wins) and
``no_weight_decay`` globs. ``freeze`` globs switch ``requires_grad`` off before anything is grouped.
Every group remembers its ``base_lr``; the schedule sets ``lr = base_lr * factor(step)``, so ratios
between groups (BERT's 0.1) survive every decay, as in VSE-infinity.

Optimizers: ``adam`` (L2 decay in the gradient), ``adamw`` (torch's decoupled decay) and ``hf_adamw``
(`HFAdamW`, the AdamW of older transformers that ESL's CLIP branch copies; see its docstring for how
it differs from torch's).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch

from ..config import ConfigError
from ..models.base import ITMModel
from .config import TrainConfig

__all__ = ["HFAdamW", "LRSchedule", "apply_freeze", "build_optimizer", "build_param_groups"]


def _match(name: str, patterns: Any) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def apply_freeze(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose names match a glob; return their names."""
    frozen: list[str] = []
    used: set[str] = set()
    for name, p in model.named_parameters():
        pat = _match(name, patterns)
        if pat is not None:
            p.requires_grad_(False)
            frozen.append(name)
            used.add(pat)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(f"train.freeze patterns match no parameter: {unused} (names look like "
                          f"{[n for n, _ in list(model.named_parameters())[:3]]})")
    return frozen


def build_param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The model's groups, split by ``lr_mults`` and ``no_weight_decay``; each group gets ``base_lr``."""
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(model, ITMModel):
        base = model.param_groups(cfg.lr)
    else:  # a bare module (a backbone trained on its own)
        base = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr, "name": "all"}]
    groups: list[dict[str, Any]] = []
    seen: dict[int, str] = {}
    used_patterns: set[str] = set()
    for gi, g in enumerate(base):
        gname = g.get("name", f"group{gi}")
        glr = float(g.get("lr", cfg.lr))
        gwd = float(g.get("weight_decay", cfg.weight_decay))
        extra = {k: v for k, v in g.items() if k not in ("params", "lr", "weight_decay", "name")}
        buckets: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {}
        for p in g["params"]:
            if not p.requires_grad:
                continue
            if id(p) not in names:
                raise ConfigError(f"{type(model).__name__}.param_groups returned a tensor "
                                  "that is not a parameter of the model")
            if id(p) in seen:
                raise ConfigError(f"parameter {names[id(p)]} is in two parameter groups ({seen[id(p)]}, {gname})")
            seen[id(p)] = gname
            pat = _match(names[id(p)], cfg.lr_mults)
            if pat is not None:
                used_patterns.add(pat)
            decay = _match(names[id(p)], cfg.no_weight_decay) is None
            buckets.setdefault((pat, decay), []).append(p)
        for (pat, decay), params in buckets.items():
            lr = glr * (float(cfg.lr_mults[pat]) if pat is not None else 1.0)
            label = gname + (f"[{pat}]" if pat else "") + ("" if decay else "[no_wd]")
            groups.append({**extra, "params": params, "lr": lr, "base_lr": lr,
                           "weight_decay": gwd if decay else 0.0, "name": label})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ConfigError(f"{type(model).__name__}.param_groups leaves trainable parameters out: {missing[:8]}; "
                          "freeze them with train.freeze or add them to a group")
    unused = [p for p in cfg.lr_mults if p not in used_patterns]
    if unused:
        raise ConfigError(f"train.lr_mults patterns match no trainable parameter: {unused}")
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen")
    return groups


class HFAdamW(torch.optim.Optimizer):
    """AdamW as in transformers < 5 (``transformers.optimization.AdamW``), which ESL's CLIP branch copies.

    Per parameter with a gradient (parameters whose ``grad`` is None are skipped entirely, their step
    count included), with ``t`` the parameter's step count::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)     # bias corrections in the step size
        p -= lr * weight_decay * p                                     # decoupled decay, after the update

    torch's AdamW instead divides by ``sqrt(v / (1 - b2^t)) + eps`` (eps added after the bias
    correction) and decays the weights before the update; the two agree only when eps is negligible
    and the decay is zero. ``correct_bias=False`` uses ``lr`` as the step size.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid HFAdamW settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HFAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
                denom = v.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
                p.addcdiv_(m, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (L2 weight decay, as SCAN/SGRAF), AdamW (decoupled, as VSE-infinity) or `HFAdamW` over the groups."""
    groups = build_param_groups(model, cfg)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "hf_adamw": HFAdamW}[cfg.optimizer]
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


class LRSchedule:
    """``lr = base_lr * factor(step)`` for every group, from the number of optimizer steps taken.

    * ``constant``: 1;
    * ``step``: ``lr_decay_factor ** (number of lr_decay_epochs <= current epoch)``;
    * ``cosine``: ``0.5 (1 + cos(2 pi num_cycles p))`` scaled into ``[min_lr_ratio, 1]``, with the
      progress ``p`` after the warm-up clamped to 1 (``num_cycles`` 0.5: half a cosine to ``min_lr_ratio``);
    * ``hf_cosine``: transformers' ``get_cosine_schedule_with_warmup`` stepped once per optimizer step
      (ESL's CLIP branch, Multi-SEA): warm-up ``step / warmup`` (the **first step runs at lr 0**), then
      ``max(0, 0.5 (1 + cos(2 pi num_cycles p)))`` with ``p`` not clamped, so steps past the schedule
      length continue the curve (Multi-SEA: num_cycles 0.3 ends at 0.3455; COCO overshoots to 0.3434);
    * other schedules: a linear warm-up ``(step + 1) / warmup`` over the first ``warmup`` steps.

    The warm-up is ``warmup_steps`` or ``int(warmup_ratio x length)``; the length is ``schedule_steps``,
    else the run's optimizer steps (``epochs x steps_per_epoch``, capped by ``max_steps``).
    It is a pure function of the step, so a resumed run needs only the step count to continue.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        if cfg.schedule_steps:
            self.total_steps = cfg.schedule_steps
        self.warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)

    def factor(self, step: int) -> float:
        cfg, warm = self.cfg, self.warmup
        if cfg.schedule == "hf_cosine":
            if step < warm:
                return step / max(1, warm)
            progress = (step - warm) / max(1, self.total_steps - warm)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cfg.num_cycles * 2.0 * progress)))
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "step":
            epoch = step // self.steps_per_epoch
            return cfg.lr_decay_factor ** sum(epoch >= e for e in cfg.lr_decay_epochs)
        if cfg.schedule == "cosine":
            span = max(1, self.total_steps - warm)
            progress = min(1.0, (step - warm) / span)
            cos = 0.5 * (1 + math.cos(2 * math.pi * cfg.num_cycles * progress))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos
        return 1.0

    def apply(self, step: int) -> float:
        """Set every group's lr for optimizer step `step` (0-based); return the factor."""
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return f

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.cfg.schedule, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ConfigError(f"cannot resume: the checkpoint had {state.get('steps_per_epoch')} optimizer steps per "
                              f"epoch, this run has {self.steps_per_epoch} (batch size or data changed)")
