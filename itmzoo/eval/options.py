"""One typed set of evaluation options, shared by `evaluate`, `evaluate_ensemble`, the trainer and the CLI.

A run file's ``eval:`` section parses into `EvalOptions`; ``evaluate(model, split, **fields)`` takes the
same field names as keywords. Fields left at ``None`` fall back to what the model asks for in
``model.eval_settings()`` (its authors' batching, block size, seed and re-rank depth), then to the
evaluator's defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Optional

from ..config import ConfigError, ModelConfig, apply_overrides, config_from_dict

__all__ = ["DEFAULT_BLOCK", "PROTOCOLS", "EvalOptions", "Protocol", "ResolvedSettings", "eval_options", "get_protocol",
           "resolve_settings"]

DEFAULT_BLOCK = (256, 1024)
DEFAULT_RERANK_K = 128


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    n_folds: int
    n_images: int | None  # required split size, None = any
    description: str


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol("f30k-1k", 1, 1000, "Flickr30K test, 1,000 images, one pass"),
        Protocol("coco-5k", 1, 5000, "COCO Karpathy test (testall), 5,000 images, one pass"),
        Protocol("coco-1k-5fold", 5, 5000, "COCO testall, mean over 5 contiguous folds of 1,000 images"),
        Protocol("5fold", 5, None, "mean over 5 contiguous folds of equal size"),
        Protocol("full", 1, None, "the whole split, one pass"),
    ]
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


@dataclasses.dataclass
class EvalOptions(ModelConfig):
    """How a split is scored; every field is also a keyword of `itmzoo.evaluate`."""

    protocol: str = "full"  # see itmzoo.eval.PROTOCOLS
    dev_protocol: Optional[str] = None  # trainer only: protocol of the dev split (None: "full")
    batch_size: int = 128  # images and captions per encode call, unless the model or the fields below say otherwise
    image_batch_size: Optional[int] = None  # overrides the model's eval_settings().image_batch_size
    text_batch_size: Optional[int] = None  # overrides the model's eval_settings().text_batch_size
    block: Optional[tuple[int, int]] = None  # (images, captions) per similarity() call; None: model's, else 256 x 1024
    rerank_k: Optional[int] = None  # two-stage models: candidates re-scored per query; None: the model's, else 128
    pair_batch_size: int = 4096  # two-stage models: second-stage pairs per score_pairs() call (whole queries)
    # drop repeated captions of an image before scoring: "stable" (first occurrences) or "hash_order"
    # (ViLT/Multi-SEA's list(set(...))); "none" keeps them; None: the model's eval_settings(), else "none"
    dedup_captions: Optional[Literal["none", "stable", "hash_order"]] = None
    seed: Optional[int] = None  # seeds torch before scoring; None: the model's eval_settings().seed (often none)
    amp: Optional[Literal["bf16", "fp16"]] = None  # autocast on CUDA for encoding and scoring
    sims_dtype: Literal["float32", "float64"] = "float32"  # float64: the VSE family's numpy matrices
    tie_mode: Literal["optimistic", "pessimistic"] = "optimistic"
    device: Optional[str] = None  # None: the model's device
    num_workers: int = 0
    progress: bool = True
    distributed: Optional[bool] = None  # None: share the work among the ranks of an initialised process group
    return_sims: bool = False  # add the score matrices to the result (rank 0)

    def validate(self) -> None:
        for f in ("protocol", "dev_protocol"):
            v = getattr(self, f)
            if v is not None and v not in PROTOCOLS:
                raise ConfigError(f"eval.{f} must be one of {sorted(PROTOCOLS)}, got {v!r}")
        for f in ("batch_size", "pair_batch_size"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"eval.{f} must be positive, got {getattr(self, f)}")
        for f in ("image_batch_size", "text_batch_size", "rerank_k"):
            v = getattr(self, f)
            if v is not None and v <= 0:
                raise ConfigError(f"eval.{f} must be positive or null, got {v}")
        if self.block is not None and min(self.block) <= 0:
            raise ConfigError(f"eval.block must be two positive ints, got {list(self.block)}")
        if self.num_workers < 0:
            raise ConfigError(f"eval.num_workers must be >= 0, got {self.num_workers}")


def eval_options(options: EvalOptions | Mapping[str, Any] | None = None, **overrides: Any) -> EvalOptions:
    """`options` (or the defaults) with keyword `overrides`, validated; ``dtype=torch.float64`` is accepted too."""
    if "dtype" in overrides:  # the older keyword: a torch dtype
        dtype = overrides.pop("dtype")
        if dtype is not None:
            overrides["sims_dtype"] = str(dtype).replace("torch.", "")
    if isinstance(options, Mapping):
        options = config_from_dict(EvalOptions, options, prefix="eval.")
    elif options is None:
        options = EvalOptions()
    elif not isinstance(options, EvalOptions):
        raise TypeError(f"options must be an EvalOptions or a dict of its fields, got {type(options).__name__}")
    if not overrides:
        options.validate()
        return options
    fields = {f.name for f in dataclasses.fields(EvalOptions)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown evaluation option(s) {unknown}; EvalOptions has {sorted(fields)}")
    return apply_overrides(options, overrides)


@dataclasses.dataclass(frozen=True)
class ResolvedSettings:
    """The settings one model is evaluated with: user options over ``model.eval_settings()`` over defaults."""

    image_batch_size: int
    text_batch_size: int
    block: tuple[int, int]
    rerank_k: int | None  # None for single-stage models
    seed: int | None


def resolve_settings(model: Any, opts: EvalOptions) -> ResolvedSettings:
    s = model.eval_settings()
    two_stage = model.scoring == "two-stage"
    return ResolvedSettings(
        image_batch_size=opts.image_batch_size or s.image_batch_size or opts.batch_size,
        text_batch_size=opts.text_batch_size or s.text_batch_size or opts.batch_size,
        block=tuple(opts.block or s.block or DEFAULT_BLOCK),
        rerank_k=(opts.rerank_k or s.rerank_k or DEFAULT_RERANK_K) if two_stage else None,
        seed=opts.seed if opts.seed is not None else s.seed,
    )
