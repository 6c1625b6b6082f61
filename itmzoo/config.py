"""Typed dataclass configs, validated overrides, JSON round-trips and YAML run files.

Configs are plain dataclasses, so they are the single source of truth for an architecture: a native
checkpoint stores `dataclasses.asdict(config)` as JSON and a YAML run file holds `model`, `data` and
`train` sections that can be changed with dotted overrides (``model.embed_size=512``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "apply_overrides",
    "check_value",
    "config_from_dict",
    "config_to_dict",
    "load_run_config",
    "parse_dotted",
    "set_dotted",
    "yaml_load",
]


class ConfigError(ValueError):
    """A config key or value is not what the config declares."""


@dataclasses.dataclass
class ModelConfig:
    """Base class of every model config; subclasses add typed fields and may override `validate`."""

    def validate(self) -> None:
        """Check cross-field constraints; raise ConfigError with a clear message."""

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return config_from_dict(cls, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def check_value(field: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to the declared type `tp`, or raise ConfigError naming the field.

    Coercions are the lossless ones a JSON/YAML round-trip needs: int -> float, list -> tuple,
    and dicts into nested dataclass configs.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(field, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config field '{field}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config field '{field}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{field}' expects {_type_name(tp)}, "
                              f"got {value!r} ({type(value).__name__})")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [check_value(f"{field}[{i}]", v, args[0]) for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"config field '{field}' expects {len(args)} items, got {len(value)}")
            items = [check_value(f"{field}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [check_value(f"{field}[{i}]", v, args[0]) if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config field '{field}' expects a mapping, got {value!r}")
        if len(args) == 2:
            return {k: check_value(f"{field}[{k!r}]", v, args[1]) for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return config_from_dict(tp, value, prefix=f"{field}.")
        raise ConfigError(f"config field '{field}' expects a {tp.__name__} mapping, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; float() spellings are numbers
            try:
                return float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{field}' expects float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field '{field}' expects int, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{field}' expects bool, got {value!r} ({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{field}' expects str, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config field '{field}' expects {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], *, prefix: str = "") -> Any:
    """A copy of dataclass `cfg` with `overrides` applied and validated.

    Unknown keys raise (with the closest known names), `None` keeps the default (timm's convention for
    "not given"), and every value is checked against the declared type. Nested dataclass fields take
    dicts, merged key by key.
    """
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = _hints(type(cfg))
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config field '{prefix}{key}' for {type(cfg).__name__}{hint} "
                f"(known: {', '.join(sorted(fields))})"
            )
        if value is None and not _allows_none(hints[key]):
            continue
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = apply_overrides(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = check_value(prefix + key, value, hints[key])
    new = dataclasses.replace(cfg, **changes)
    if hasattr(new, "validate"):
        new.validate()
    return new


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def config_from_dict(cls: type, data: Mapping[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (JSON) dict, strictly: unknown keys are an error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__} expects a mapping, got {type(data).__name__}")
    return apply_overrides(cls(), dict(data), prefix=prefix)


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` and ``1E5`` (no dot) as floats, as YAML 1.2 and JSON do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(stream: Any) -> Any:
    """`yaml.safe_load` that reads every JSON number spelling as a number (``1e-3`` included)."""
    return yaml.load(stream, Loader=_Loader)


# ---------------------------------------------------------------------------------------------------
# YAML run files: {model: {name: ..., <model fields>}, data: {...}, train: {...}}


def parse_dotted(item: str) -> tuple[str, Any]:
    """Parse ``"a.b=value"``; the value is read as YAML, so numbers, bools and lists keep their type."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.embed_size=512)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for key ``a.b``, creating intermediate dicts."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{p}' holds a value, not a section")
        node = child
    node[parts[-1]] = value


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML run file (or start empty) and apply dotted ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        with open(p, encoding="utf-8") as f:
            # JSON through json: YAML 1.1 reads JSON's 1e-08 as a string
            loaded = (json.load(f) if p.suffix == ".json" else yaml_load(f)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping with model/data/train sections, got {type(loaded).__name__}")
        tree = copy.deepcopy(loaded)
    for item in overrides:
        key, value = parse_dotted(item)
        set_dotted(tree, key, value)
    return tree
