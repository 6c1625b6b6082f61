"""Safe reading of the authors' pickled checkpoints and strict state-dict loading.

Official files of the seed repos are ``torch.save`` pickles holding tensors plus an
``argparse.Namespace`` of options. They are read with ``torch.load(weights_only=True)`` and an explicit
allow-list of globals; any other global is refused with an error that names it, and nothing in the
file is executed.
"""

from __future__ import annotations

import argparse
import fnmatch
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

#: globals a seed repo's checkpoint may reference (besides tensors, which weights_only allows)
DEFAULT_ALLOWED_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match the model."""


def read_pickled_checkpoint(path: str | Path, allowed_globals: Iterable[Any] = DEFAULT_ALLOWED_GLOBALS) -> Any:
    """``torch.load`` with ``weights_only=True`` and an allow-list; never falls back to full unpickling.

    An entry is a class or a ``(stand-in class, "module.Name")`` pair: the pickle's object of that name is
    rebuilt as the stand-in with its attributes (no code of the original class runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    allowed = list(allowed_globals)
    last_err: Exception | None = None
    for encoding in (None, "latin1"):  # Python-2 era files (SCAN, LHSC) need latin1
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                # torch warns that load args are for weights_only=False, yet passes `encoding` on
                warnings.filterwarnings("ignore", message="pickle_load_args")
                kw = {"encoding": encoding} if encoding else {}
                return torch.load(path, map_location="cpu", weights_only=True, **kw)
        except pickle.UnpicklingError as e:
            msg = str(e)
            m = re.search(r"GLOBAL ([\w\.]+)", msg) or re.search(r"Unsupported global: ([^\s]+)", msg)
            if m or "global" in msg.lower():
                name = m.group(1) if m else "an unknown global"
                raise CheckpointError(
                    f"{path}: refusing to unpickle {name}; only tensors and "
                    f"{', '.join(_global_name(g) for g in allowed)} are allowed. "
                    "itmzoo never executes code from checkpoint files."
                ) from None
            last_err = e
        except UnicodeDecodeError as e:
            last_err = e
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            # torch's own message advises weights_only=False, i.e. running the file's code: never relay it
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_clause(e)}); expected a file "
                                  "written by torch.save (an authors' .pth / .pth.tar)") from None
    raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_clause(last_err)}); expected a file "
                          "written by torch.save (an authors' .pth / .pth.tar)")


def _first_clause(e: BaseException | None) -> str:
    """The first line of an error message, without torch's advice to unpickle unsafely."""
    text = str(e or "").strip().splitlines()
    first = text[0] if text else type(e).__name__
    if "weights_only" in first or "Weights only load failed" in first:
        return "not a torch.save file"
    return first[:200]


def _global_name(g: Any) -> str:
    # an allow-list entry is a class or a (stand-in class, "module.Name") pair
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


def strip_prefixes(state: Mapping[str, torch.Tensor],
                   prefixes: Iterable[str] = ("module.", "_orig_mod.")) -> dict[str, torch.Tensor]:
    """Remove DataParallel / torch.compile key prefixes (repeatedly, in any order)."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = v
    return out


def _fmt(keys: list[str], limit: int = 12) -> str:
    shown = keys[:limit]
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(repr(k) for k in shown) + "]" + more


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *,
                      ignorable: Iterable[str] = (), source: str = "checkpoint", hint: str = "") -> None:
    """Load `state` into `model`; every key must match except glob patterns in `ignorable`.

    Missing, unexpected and shape-mismatched keys are reported together, by name.
    """
    patterns = list(ignorable)

    def ok(k: str) -> bool:
        return any(fnmatch.fnmatchcase(k, p) for p in patterns)

    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not ok(k))
    unexpected = sorted(k for k in state if k not in own and not ok(k))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_fmt(shapes)}")
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts)
                              + (f"; {hint}" if hint else ""))
    filtered = {k: v for k, v in state.items() if k in own}
    result = model.load_state_dict(filtered, strict=False)
    leftover = [k for k in result.missing_keys if not ok(k)]
    if leftover:
        raise CheckpointError(f"{source}: keys not loaded {_fmt(leftover)}")
