"""Model registry: names -> builders, with capabilities as metadata and lazy module imports.

A method is declared once, in its own module, by ``@register_model(name, config=..., input_kind=...,
scoring=..., tags=..., converter=..., tiny=...)``. So that `import itmzoo` and `list_models()` import
no model module (and hence no torch or transformers), the built-in declarations are also kept in a
generated index, ``itmzoo/models/index.json``: name -> ``"module:function"`` plus the declared
capabilities. The module is imported the first time a name is built or inspected; its declaration is
then compared with the index (a stale index is an error). After adding or changing a declaration run
``python -m itmzoo.models --write-index``; ``tests/test_models_generic.py`` checks the index is current.

Name grammar: ``method[.tag]``; ``local-dir:PATH`` reads a native checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import ConfigError, apply_overrides

__all__ = [
    "ModelEntry",
    "RegistryError",
    "Tag",
    "add_model_config",
    "expected_recalls",
    "get_entry",
    "instantiate",
    "list_models",
    "model_info",
    "register_model",
    "split_name",
]

INPUT_KINDS = ("regions", "pixels")
SCORING_KINDS = ("embedding", "cross", "two-stage")


class RegistryError(KeyError):
    """Unknown, malformed or duplicate model name."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Tag:
    """A weight/config variant of a method: config overrides plus where weights come from.

    `source` is a description of the official file (URL or drive id) or None when the tag only fixes a
    configuration; weights are never downloaded by itmzoo, the user passes the file to `build`.
    """

    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str | None = None
    source: str | None = None
    expected: Mapping[str, float] = dataclasses.field(default_factory=dict)
    preprocessing: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    license: str | None = None
    note: str = ""


RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def expected_recalls(protocol: str, values: Any, keys: tuple[str, ...] = RECALL_KEYS) -> dict[str, float]:
    """A tag's expected metrics from a paper's table row: ``{"f30k-1k.i2t_r1": 84.3, ...}``."""
    values = tuple(values)
    if len(values) != len(keys):
        raise RegistryError(f"expected_recalls('{protocol}'): {len(values)} values for the {len(keys)} keys {keys}")
    return {f"{protocol}.{k}": float(v) for k, v in zip(keys, values)}


@dataclasses.dataclass
class ModelEntry:
    """Everything the registry knows about one method, before and after its module is imported."""

    name: str
    target: str | None  # "module:function" for lazy built-ins; None for user registrations
    input_kind: str
    scoring: str
    paper: str = ""
    upstream: str = ""
    text_backbone: str = ""
    image_backbone: str = ""
    aliases: tuple[str, ...] = ()
    demo: bool = False
    base_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fn: Callable[..., Any] | None = None
    config_cls: type | None = None
    tags: dict[str, Tag] = dataclasses.field(default_factory=dict)
    default_tag: str | None = None
    converter: Callable[..., Any] | None = None
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # overrides of a tiny test build
    # extra globals the authors' pickled files may hold, read as data: classes or (stand-in, "module.Name")
    checkpoint_globals: tuple[Any, ...] = ()
    weight_tags: tuple[str, ...] | None = None  # from the index, before the module is imported

    @property
    def has_weights(self) -> bool:
        return bool(self.tags_with_weights())

    def tags_with_weights(self) -> list[str]:
        if self.fn is None and self.weight_tags is not None:
            return list(self.weight_tags)
        return [t for t, tg in self.tags.items() if tg.source]

    def index_record(self) -> dict[str, Any]:
        """What the generated index stores about a built-in entry (JSON-compatible)."""
        return {
            "target": self.target, "input_kind": self.input_kind, "scoring": self.scoring, "paper": self.paper,
            "upstream": self.upstream, "text_backbone": self.text_backbone, "image_backbone": self.image_backbone,
            "aliases": list(self.aliases), "demo": self.demo, "tags": sorted(self.tags),
            "weight_tags": self.tags_with_weights(), "default_tag": self.default_tag,
        }

    def capabilities(self) -> dict[str, Any]:
        return {
            "input_kind": self.input_kind,
            "scoring": self.scoring,
            "text_backbone": self.text_backbone,
            "image_backbone": self.image_backbone,
            "has_weights": self.has_weights,
            "demo": self.demo,
        }


INDEX_PATH = Path(__file__).with_name("models") / "index.json"
INDEX_COMMAND = "python -m itmzoo.models --write-index"


def _read_index() -> dict[str, ModelEntry]:
    """Lazy entries of the built-in methods, from the generated index (no model module imported)."""
    if not INDEX_PATH.is_file():  # only while it is being generated for the first time
        return {}
    try:
        data = json.loads(INDEX_PATH.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:  # a broken install, not a user error
        raise RegistryError(f"cannot read the model index {INDEX_PATH}: {e}; regenerate it with {INDEX_COMMAND}") from e
    out = {}
    for name, rec in data.items():
        out[name] = ModelEntry(
            name=name, target=rec["target"], input_kind=rec["input_kind"], scoring=rec["scoring"],
            paper=rec["paper"], upstream=rec["upstream"], text_backbone=rec["text_backbone"],
            image_backbone=rec["image_backbone"], aliases=tuple(rec["aliases"]), demo=rec["demo"],
            tags={t: Tag() for t in rec["tags"]}, default_tag=rec["default_tag"],
            weight_tags=tuple(rec["weight_tags"]))
    return out


_INDEX: dict[str, ModelEntry] = _read_index()
_ALIASES: dict[str, str] = {a: e.name for e in _INDEX.values() for a in e.aliases}
_REGISTRY: dict[str, ModelEntry] = dict(_INDEX)


def _known_names() -> list[str]:
    names = set(_REGISTRY) | set(_ALIASES)
    for e in _REGISTRY.values():
        names |= {f"{e.name}.{t}" for t in e.tags}
    return sorted(names)


def register_model(
    name: str,
    *,
    config: type,
    input_kind: str,
    scoring: str,
    tags: Mapping[str, Tag] | None = None,
    default_tag: str | None = None,
    converter: Callable[..., Any] | None = None,
    tiny: Mapping[str, Any] | None = None,
    **metadata: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator declaring ``fn(config) -> model`` under `name`, with everything the registry knows of it.

    `metadata`: ``paper``, ``upstream``, ``text_backbone``, ``image_backbone``, ``aliases``, ``demo``.
    `tiny`: config overrides that build a small model with random weights and no files (the generic
    model test builds every registered name with them). Registering a name that already has a builder
    raises, as in LAVIS, instead of overwriting.
    """
    if input_kind not in INPUT_KINDS:
        raise RegistryError(f"register_model('{name}'): input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    if scoring not in SCORING_KINDS:
        raise RegistryError(f"register_model('{name}'): scoring must be one of {SCORING_KINDS}, got {scoring!r}")
    fields = {f.name for f in dataclasses.fields(ModelEntry)} - {"name", "target", "fn", "config_cls", "weight_tags"}
    unknown = set(metadata) - fields
    if unknown:
        raise RegistryError(f"register_model('{name}'): unknown metadata {sorted(unknown)}; known: {sorted(fields)}")
    if not dataclasses.is_dataclass(config):
        raise RegistryError(f"register_model('{name}'): config must be a dataclass type")
    if default_tag is not None and default_tag not in (tags or {}):
        raise RegistryError(f"register_model('{name}'): default tag '{default_tag}' is not among its tags")
    # a tag or a tiny build that names a wrong field fails here, at import, not in some later test
    for label, overrides in [("tiny", tiny or {})] + [(f"tag '{t}'", tg.overrides) for t, tg in (tags or {}).items()]:
        try:
            apply_overrides(config(), overrides)
        except ConfigError as e:
            raise RegistryError(f"register_model('{name}'), {label}: {e}") from e

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        current = _REGISTRY.get(name)
        if current is not None and current.fn is not None:
            raise RegistryError(f"model '{name}' is already registered (by {current.fn.__module__}); names are unique")
        indexed = _INDEX.get(name)
        if indexed is not None and indexed.target.split(":")[0] != fn.__module__:
            raise RegistryError(f"'{name}' is a built-in name reserved for {indexed.target.split(':')[0]}; "
                                "choose another name")
        target = f"{fn.__module__}:{fn.__name__}" if fn.__module__.startswith("itmzoo.models.") else None
        entry = ModelEntry(name=name, target=target, input_kind=input_kind, scoring=scoring, fn=fn, config_cls=config,
                           tags=dict(tags or {}), default_tag=default_tag, converter=converter, tiny=dict(tiny or {}),
                           **{k: tuple(v) if k == "aliases" else v for k, v in metadata.items()})
        for a in entry.aliases:
            if _ALIASES.get(a, name) != name or a in _REGISTRY:
                raise RegistryError(f"register_model('{name}'): alias '{a}' is already taken")
        _REGISTRY[name] = entry
        for a in entry.aliases:
            _ALIASES[a] = name
        return fn

    return deco


def split_name(name: str) -> tuple[str, str | None]:
    """``"esa_bert.coco"`` -> ``("esa_bert", "coco")``; aliases resolve to the canonical method."""
    if not isinstance(name, str) or not name:
        raise RegistryError(f"model name must be a non-empty string, got {name!r}")
    if any(c in name for c in "/\\:"):
        raise RegistryError(
            f"'{name}' looks like a path, not a registry name; use 'local-dir:{name}' to load a native "
            "checkpoint directory, or build(name, checkpoint=PATH) for an official file"
        )
    method, _, tag = name.partition(".")
    method = _ALIASES.get(method, method)
    return method, (tag or None)


def get_entry(method: str) -> ModelEntry:
    """The entry of `method` with its module imported (so `fn` and `config_cls` are set)."""
    method = _ALIASES.get(method, method)
    entry = _REGISTRY.get(method)
    if entry is None:
        close = difflib.get_close_matches(method, _known_names(), n=5, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise RegistryError(f"unknown model '{method}'.{hint} See itmzoo.list_models().")
    if entry.fn is None and entry.target is not None:
        module, _, func = entry.target.partition(":")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise RegistryError(f"model '{method}' is declared but its module {module} "
                                    "is not available in this install") from e
            raise
        entry = _REGISTRY[method]
        if entry.fn is None:
            raise RegistryError(f"{module} did not register '{method}' (expected @register_model on {func})")
        check_against_index(entry)
    return entry


def check_against_index(entry: ModelEntry) -> None:
    """Raise if the declaration of a built-in `entry` differs from what the generated index says."""
    indexed = _INDEX.get(entry.name)
    if indexed is None:
        return
    declared = entry.index_record()
    stale = {k: (v, declared[k]) for k, v in indexed.index_record().items() if declared[k] != v}
    if stale:
        raise RegistryError(f"the model index is out of date for '{entry.name}' (index vs declaration: {stale}); "
                            f"run {INDEX_COMMAND}")


def instantiate(name: str, config: Any) -> Any:
    """Build registered model `name` from a config object or a dict of fields, with random weights."""
    entry = get_entry(name)
    if isinstance(config, Mapping):
        config = apply_overrides(entry.config_cls(), config)
    model = entry.fn(config)
    model.registry_name = entry.name
    return model


def resolve_config(name: str, overrides: Mapping[str, Any] | None = None) -> tuple[ModelEntry, Any]:
    """The entry and validated config of ``method[.tag]`` with user overrides applied."""
    method, tag = split_name(name)
    entry = get_entry(method)
    cfg = entry.config_cls()
    if entry.base_overrides:
        cfg = apply_overrides(cfg, entry.base_overrides)
    tag = tag or entry.default_tag
    if tag is not None:
        if tag not in entry.tags:
            raise RegistryError(
                f"unknown tag '{tag}' for model '{method}'; known tags: {sorted(entry.tags) or 'none'}"
            )
        cfg = apply_overrides(cfg, entry.tags[tag].overrides)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return entry, cfg


def list_models(pattern: str | None = None, *, include_tags: bool = False, include_demo: bool = True,
                **capabilities: Any) -> list[str]:
    """Registered names matching a glob `pattern` and capability filters.

    Filters are entry capabilities, e.g. ``input_kind="regions"``, ``scoring="cross"``,
    ``text_backbone="bigru"``, ``has_weights=True``. With `include_tags` (implied by ``has_weights``)
    the result lists ``method.tag`` names.
    """
    known = {"input_kind", "scoring", "text_backbone", "image_backbone", "has_weights", "demo"}
    unknown = set(capabilities) - known
    if unknown:
        raise ValueError(f"unknown capability filter(s) {sorted(unknown)}; known: {sorted(known)}")
    choices = {"input_kind": INPUT_KINDS, "scoring": SCORING_KINDS, "has_weights": (True, False),
               "demo": (True, False)}
    for key, value in capabilities.items():
        accepted = choices.get(key) or sorted({getattr(e, key) for e in _REGISTRY.values()} - {""})
        if value not in accepted:
            raise ValueError(f"list_models: unknown {key}={value!r}; accepted: {', '.join(map(repr, accepted))}")
    want_weights = capabilities.pop("has_weights", None)
    out: list[str] = []
    for entry in _REGISTRY.values():
        caps = entry.capabilities()
        if (entry.demo and not include_demo) or any(caps[k] != v for k, v in capabilities.items()):
            continue
        if want_weights is not None and entry.has_weights != want_weights:
            continue
        names = [entry.name]
        if want_weights:  # the tags that carry weights
            names = [f"{entry.name}.{t}" for t in entry.tags_with_weights()]
        elif include_tags and entry.tags:
            names = [f"{entry.name}.{t}" for t in entry.tags]
        out.extend(n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern))
    return sorted(out)


def model_info(name: str) -> dict[str, Any]:
    """Paper, upstream, capabilities, default config and tags of a registered name."""
    entry, cfg = resolve_config(name)
    return {
        "name": entry.name,
        "aliases": list(entry.aliases),
        "paper": entry.paper,
        "upstream": entry.upstream,
        **entry.capabilities(),
        "config_class": entry.config_cls.__name__,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "tags": {t: {k: v for k, v in dataclasses.asdict(tg).items() if v not in (None, {}, "")}
                 for t, tg in entry.tags.items()},
        "default_tag": entry.default_tag,
        "converter": entry.converter is not None,
    }


def add_model_config(path: str | Path) -> str:
    """Register a variant of an existing method from a JSON file, without code.

    The file holds ``{"name": "my_esa", "base": "esa_bigru", "config": {...}}``; the config overrides
    are validated against the base method's config now, so a bad file fails at registration.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read model config {p}: {e}") from e
    for key in ("name", "base"):
        if not isinstance(data.get(key), str):
            raise ConfigError(f"{p}: missing string field '{key}' (expected name, base, config)")
    name, base = data["name"], data["base"]
    overrides = data.get("config", {})
    if name in _REGISTRY or name in _ALIASES:
        raise RegistryError(f"model '{name}' is already registered; names are unique")
    base_entry, _ = resolve_config(base, overrides)  # validates
    method, tag = split_name(base)
    merged = {**base_entry.base_overrides, **(base_entry.tags[tag].overrides if tag else {}), **overrides}
    entry = dataclasses.replace(base_entry, name=name, target=None, aliases=(), base_overrides=merged,
                                tags={}, default_tag=None)
    _REGISTRY[name] = entry
    return name


def builtin_records() -> dict[str, dict[str, Any]]:
    """The index records of the built-in methods registered so far (their modules imported)."""
    return {n: e.index_record() for n, e in sorted(_REGISTRY.items()) if e.target and e.fn is not None}
