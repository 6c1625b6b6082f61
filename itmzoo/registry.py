"""Model registry: names -> builders, with capabilities as metadata and lazy module imports.

Built-in methods are listed in `_BUILTIN` as ``"module:function"`` strings plus their capabilities, so
`import itmzoo` imports no model module (and hence no transformers). The module is imported the first
time a name is built or inspected; its `@register_model` decorator then attaches the builder and the
config class to the entry that was declared here.

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
    "get_entry",
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

    @property
    def has_weights(self) -> bool:
        return any(t.source for t in self.tags.values())

    def capabilities(self) -> dict[str, Any]:
        return {
            "input_kind": self.input_kind,
            "scoring": self.scoring,
            "text_backbone": self.text_backbone,
            "image_backbone": self.image_backbone,
            "has_weights": self.has_weights,
            "demo": self.demo,
        }


def _b(name: str, target: str, **kw: Any) -> ModelEntry:
    return ModelEntry(name=name, target=target, **kw)


# The built-in table: capabilities live here so listing and filtering need no imports.
_BUILTIN: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        _b("toy_vse", "itmzoo.models.toy:toy_vse", input_kind="regions", scoring="embedding",
           paper="itmzoo demo model (mean-pooled regions + bag of words)", text_backbone="bow",
           image_backbone="regions", demo=True),
        _b("esa_bigru", "itmzoo.models.esa:esa_bigru", input_kind="regions", scoring="embedding",
           paper="ESA: External Space Attention Aggregation for Image-Text Retrieval (TCSVT 2023)",
           upstream="KevinLight831/ESA @ c94e9b892b437a6bfd2e69b4ca6cae9b60489ca1",
           text_backbone="bigru", image_backbone="butd-regions", aliases=("esa",)),
        _b("esa_bert", "itmzoo.models.esa:esa_bert", input_kind="regions", scoring="embedding",
           paper="ESA: External Space Attention Aggregation for Image-Text Retrieval (TCSVT 2023)",
           upstream="KevinLight831/ESA @ c94e9b892b437a6bfd2e69b4ca6cae9b60489ca1",
           text_backbone="bert-base-uncased", image_backbone="butd-regions"),
        _b("lhsc", "itmzoo.models.lhsc:lhsc", input_kind="regions", scoring="cross",
           paper="LHSC: Learning Hierarchical Semantic Correspondences (ICMR 2022, on SGRAF)",
           upstream="lDarryll/LHSC @ 1aa2753b88c99eb7900c12402f4087bc5c709bd7",
           text_backbone="bigru", image_backbone="butd-regions"),
        _b("esl", "itmzoo.models.esl:esl", input_kind="regions", scoring="cross",
           paper="ESL: Enhanced Semantic Similarity Learning Framework for Image-Text Matching (TCSVT 2023)",
           upstream="CrossmodalGroup/ESL @ b91e287b238fcf6dd7dc784c04e7bf1ac53404ae",
           text_backbone="bert-base-uncased", image_backbone="butd-regions"),
        _b("esl_clip", "itmzoo.models.esl:esl_clip", input_kind="pixels", scoring="embedding",
           paper="ESL: Enhanced Semantic Similarity Learning Framework for Image-Text Matching (TCSVT 2023), CLIP branch",
           upstream="kkzhang95/ESL @ 7edd3da0b404b3262d54b8304f36b615c282d705",
           text_backbone="clip-text", image_backbone="clip-vit-b16"),
    ]
}
_ALIASES: dict[str, str] = {a: e.name for e in _BUILTIN.values() for a in e.aliases}
_REGISTRY: dict[str, ModelEntry] = dict(_BUILTIN)


def _known_names() -> list[str]:
    names = set(_REGISTRY) | set(_ALIASES)
    for e in _REGISTRY.values():
        names |= {f"{e.name}.{t}" for t in e.tags}
    return sorted(names)


def register_model(
    name: str,
    *,
    config: type,
    input_kind: str | None = None,
    scoring: str | None = None,
    tags: Mapping[str, Tag] | None = None,
    default_tag: str | None = None,
    converter: Callable[..., Any] | None = None,
    **metadata: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(config) -> model`` under `name`.

    For a built-in name this completes the lazily declared entry (only from its declared module);
    registering a name that already has a builder raises, as in LAVIS, instead of overwriting.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        entry = _REGISTRY.get(name)
        if entry is not None and entry.fn is not None:
            raise RegistryError(f"model '{name}' is already registered (by {entry.fn.__module__}); names are unique")
        if name in _ALIASES:
            raise RegistryError(f"'{name}' is already an alias of '{_ALIASES[name]}'")
        if entry is not None and entry.target is not None:
            module = entry.target.split(":")[0]
            if fn.__module__ != module:
                raise RegistryError(f"'{name}' is a built-in name reserved for {module}; choose another name")
        else:
            if input_kind not in INPUT_KINDS:
                raise RegistryError(f"register_model('{name}'): input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
            if scoring not in SCORING_KINDS:
                raise RegistryError(f"register_model('{name}'): scoring must be one of {SCORING_KINDS}, got {scoring!r}")
            fields = {f.name for f in dataclasses.fields(ModelEntry)}
            unknown = set(metadata) - fields
            if unknown:
                raise RegistryError(f"register_model('{name}'): unknown metadata {sorted(unknown)}")
            entry = ModelEntry(name=name, target=None, input_kind=input_kind, scoring=scoring, **metadata)
            _REGISTRY[name] = entry
            for a in entry.aliases:
                _ALIASES[a] = name
        if not dataclasses.is_dataclass(config):
            raise RegistryError(f"register_model('{name}'): config must be a dataclass type")
        entry.fn = fn
        entry.config_cls = config
        entry.tags = dict(tags or {})
        entry.default_tag = default_tag
        entry.converter = converter
        if default_tag is not None and default_tag not in entry.tags:
            raise RegistryError(f"register_model('{name}'): default tag '{default_tag}' is not among its tags")
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
                raise RegistryError(f"model '{method}' is declared but its module {module} is not available in this install") from e
            raise
        if entry.fn is None:
            raise RegistryError(f"{module} did not register '{method}' (expected @register_model on {func})")
    return entry


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
    want_weights = capabilities.pop("has_weights", None)
    if want_weights is not None or include_tags:
        for e in list(_REGISTRY.values()):  # tags are only known once the module is imported
            if e.fn is None:
                try:
                    get_entry(e.name)
                except RegistryError:
                    continue
    out: list[str] = []
    for entry in _REGISTRY.values():
        caps = entry.capabilities()
        if (entry.demo and not include_demo) or any(caps[k] != v for k, v in capabilities.items()):
            continue
        if want_weights is not None and entry.has_weights != want_weights:
            continue
        names = [entry.name]
        if want_weights:  # the tags that carry weights
            names = [f"{entry.name}.{t}" for t, tg in entry.tags.items() if tg.source]
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
