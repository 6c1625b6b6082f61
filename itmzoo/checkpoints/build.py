"""Building a model from a registry name, an authors' released file or a native directory: `build`, `load`.

It sits below the models (it only calls the builders the registry holds), so a composition model can
build its parts with it; `itmzoo.build` and `itmzoo.load` are these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import apply_overrides
from ..registry import get_entry, instantiate, resolve_config
from .safe import DEFAULT_ALLOWED_GLOBALS, CheckpointError, load_state_strict, read_pickled_checkpoint

LOCAL_DIR = "local-dir:"


def _fitting_methods_hint(obj: Any, tried: str) -> str:
    """``"; the file fits 'lhsc': ..."`` when another method's converter accepts what `tried`'s refused."""
    from ..registry import list_models

    fits = []
    for other in list_models(include_demo=False):
        if other == tried:
            continue
        try:
            conv = get_entry(other).converter
            if conv is not None:
                conv(obj)
                fits.append(other)
        except Exception:  # noqa: BLE001  any refusal means "not this method"
            continue
    if not fits:
        return ""
    return (f"; the file fits {', '.join(repr(f) for f in fits)} instead: use "
            f"itmzoo.build('{fits[0]}', checkpoint=...) "
            f"or itmzoo convert {fits[0]} FILE DIR")


def _check_tag_agrees(name: str, entry: Any, inferred: Mapping[str, Any], checkpoint: Any) -> None:
    """A ``method.tag`` fixes sizes (vocabulary, dims): a file whose tensors imply other sizes is another tag's."""
    from ..registry import split_name

    tag = split_name(name)[1] or entry.default_tag
    if tag is None:
        return
    fixed = entry.tags[tag].overrides
    clash = {k: (v, fixed[k]) for k, v in inferred.items() if k in fixed and fixed[k] != v}
    if not clash:
        return
    others = [t for t, tg in entry.tags.items()
              if t != tag and all(tg.overrides.get(k, v) == v for k, v in inferred.items())]
    hint = f"; it looks like '{entry.name}.{others[0]}'" if others else ""
    raise CheckpointError(f"{checkpoint}: the file does not match the tag '{entry.name}.{tag}': "
                          + ", ".join(f"{k}={v!r} in the file, {t!r} in the tag" for k, (v, t) in clash.items()) + hint)


def build(name: str, checkpoint: str | Path | None = None, device: str | torch.device | None = None,
          **overrides: Any) -> torch.nn.Module:
    """Build a registered model.

    * ``build("esa_bigru", embed_size=512)``: random weights (pretrained backbones only when the config
      names them), overrides validated against the typed config;
    * ``build("lhsc", checkpoint="model_best.pth.tar")``: an authors' released file, converted by the
      method's converter and loaded strictly;
    * ``build("local-dir:runs/x/best")`` or ``checkpoint=<native dir>``: a native checkpoint.
    """
    if isinstance(name, str) and name.startswith(LOCAL_DIR):
        from .native import load_pretrained

        if checkpoint is not None:
            raise ValueError("give either 'local-dir:PATH' or checkpoint=, not both")
        return load_pretrained(name[len(LOCAL_DIR):], device=device, **overrides)
    entry, cfg = resolve_config(name, overrides)
    if checkpoint is not None and Path(checkpoint).is_dir():
        from .native import load_pretrained, read_native_config

        meta = read_native_config(checkpoint)
        if get_entry(meta["model"]).name != entry.name:
            raise CheckpointError(f"{checkpoint} holds a '{meta['model']}' model, not '{entry.name}'")
        return load_pretrained(checkpoint, device=device, **overrides)
    if checkpoint is not None:
        if entry.converter is None:
            raise CheckpointError(f"model '{entry.name}' has no converter for official checkpoints")
        obj = read_pickled_checkpoint(checkpoint, (*DEFAULT_ALLOWED_GLOBALS, *entry.checkpoint_globals))
        try:
            inferred, state, ignorable = entry.converter(obj)
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint}: {e}{_fitting_methods_hint(obj, entry.name)}") from None
        for key, value in inferred.items():
            if key in overrides and overrides[key] is not None and overrides[key] != value:
                raise CheckpointError(
                    f"{checkpoint}: the file implies {key}={value!r} but you asked for {overrides[key]!r}"
                )
        _check_tag_agrees(name, entry, inferred, checkpoint)
        cfg = apply_overrides(cfg, inferred)
        model = instantiate(entry.name, cfg)
        load_state_strict(model, state, ignorable=ignorable, source=str(checkpoint))
        model.eval()
    else:
        model = instantiate(entry.name, cfg)
        model.init_pretrained()
    if device is not None:
        model.to(device)
    return model


def load(directory: str | Path, device: str | torch.device | None = None, **overrides: Any) -> torch.nn.Module:
    """Load a native checkpoint directory written by ``model.save_pretrained``."""
    from .native import load_pretrained

    return load_pretrained(directory, device=device, **overrides)
