"""The model contract shared by every registered method (see docs/contract.md)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..features import Features, cat_features, features_len, features_to, slice_features

__all__ = ["ACCUMULATION_POLICIES", "EvalSettings", "Features", "ITMModel", "cat_features", "features_len",
           "features_to", "pair_scores_by_blocks", "slice_features"]

@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a method must be evaluated to match its authors' numbers (``ITMModel.eval_settings()``).

    ``None`` means "the evaluator's default". The evaluator reads these; a user may override them.
    """

    text_batch_size: int | None = None  # captions per encode_text call (padding-dependent text encoders)
    image_batch_size: int | None = None  # images per encode_image call
    block: tuple[int, int] | None = None  # (images, captions) per similarity() call
    seed: int | None = None  # for methods that draw random numbers while scoring
    rerank_k: int | None = None  # two-stage models: candidates re-scored per query
    dedup_captions: str | None = None  # "stable" / "hash_order": drop repeated captions of an image first

    def __post_init__(self) -> None:
        for name in ("text_batch_size", "image_batch_size", "rerank_k"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"EvalSettings.{name} must be a positive int or None, got {v!r}")
        if self.block is not None and (len(self.block) != 2 or min(self.block) <= 0):
            raise ValueError(f"EvalSettings.block must be two positive ints, got {self.block!r}")
        if self.dedup_captions not in (None, "none", "stable", "hash_order"):
            raise ValueError(f"EvalSettings.dedup_captions must be 'none', 'stable', 'hash_order' or None, "
                             f"got {self.dedup_captions!r}")


ACCUMULATION_POLICIES = ("exact", "naive", "refuse")


def _takes_a_batch(fn: Callable[..., Any], name: str, helper: str) -> Callable[..., Any]:
    """Wrap an encoder so raw inputs (a list of captions, a PIL image) get a clear error, not a TypeError deep
    inside the model: the contract's encoders take collated batch dicts."""

    @functools.wraps(fn)
    def checked(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(batch, Mapping):
            raise TypeError(f"{type(self).__name__}.{name} takes a collated batch dict of tensors, got "
                            f"{type(batch).__name__}; for raw inputs use {helper}")
        return fn(self, batch, *args, **kwargs)

    checked._checks_batch = True  # type: ignore[attr-defined]
    return checked


class ITMModel(nn.Module):
    """Base class of every itmzoo model: the whole contract the trainer, evaluator and CLI use.

    Subclasses set the class attributes, implement `tokenizer`, `image_transform_for`,
    `encode_image`, `encode_text` and the training loss (`train_features` + `train_loss`, or
    `forward` alone with ``accumulation = "naive"`` or ``"refuse"``); cross-interaction models
    implement `similarity`, two-stage models also `score_pairs`. Every other hook has a default.
    docs/contract.md describes each member.
    """

    input_kind: ClassVar[str] = "regions"  # "regions" | "pixels"
    scoring: ClassVar[str] = "embedding"  # "embedding" | "cross" | "two-stage"
    # How the trainer may split a batch into micro-batches (train.accum_steps > 1):
    #   "exact":  encode every micro-batch with `train_features`, then one `train_loss` over all of
    #             them (gradients equal the full batch's, also for hardest negatives);
    #   "naive":  sum the micro-batches' losses (what recipes with queues or per-micro-batch state use);
    #   "refuse": the loss depends on the whole batch and the method does not split it.
    accumulation: ClassVar[str] = "refuse"
    # what one training epoch runs over: every caption once (with its image), or every image once with
    # one of its captions drawn at random (ALBEF/BLIP-style recipes); train.epoch_over overrides it
    train_epoch_over: ClassVar[str] = "captions"
    # parameter-name globs that get no gradient by design (weights that are dead upstream too, kept so
    # the authors' checkpoints load strictly); the generic model test allows exactly these
    unused_parameters: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, helper in (("encode_text", "itmzoo.encode_captions(model, captions)"),
                             ("encode_image", "itmzoo.encode_images(model, images)")):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_checks_batch", False):
                setattr(cls, name, _takes_a_batch(fn, name, helper))

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.registry_name: str | None = None  # set by the registry when it builds the model
        self.epoch = 0

    # -- data plumbing -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Callable[..., dict]:
        """``tokenizer(list_of_captions, train=False) -> dict`` of text batch tensors."""
        raise NotImplementedError(f"{type(self).__name__} defines no tokenizer")

    def image_transform_for(self, train: bool) -> Callable[[Any], torch.Tensor]:
        """The per-image transform for training (augmenting) or evaluation."""
        raise NotImplementedError(f"{type(self).__name__} defines no image transform")

    @property
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return self.image_transform_for(False)

    # -- encoding and scoring ------------------------------------------------------------------
    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> Features:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_image()")

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> Features:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_text()")

    def similarity(self, image_feats: Features, text_feats: Features) -> torch.Tensor:
        """Scores ``[n_images, n_texts]``; embedding models: one matrix product.

        For a two-stage model this is its first stage (cheap, every pair).
        """
        if self.scoring != "embedding":
            raise NotImplementedError(f"{type(self).__name__} must implement similarity()")
        return image_feats @ text_feats.t()

    def score_pairs(self, image_feats: Features, text_feats: Features, image_index: torch.Tensor,
                    text_index: torch.Tensor, direction: str) -> torch.Tensor:
        """Scores ``Tensor[P]`` of the pairs ``(image_index[p], text_index[p])`` (a two-stage model's second stage).

        `direction` is ``"i2t"`` (the image is the query, the caption a candidate) or ``"t2i"``.
        Two-stage models implement it and decide how to batch the pairs; by default `similarity`
        scores dense blocks of consecutive queries x their candidates (`pair_scores_by_blocks`), which
        is how a cross model re-ranks another model's candidates.
        """
        if self.scoring == "two-stage":
            raise NotImplementedError(f"{type(self).__name__} must implement score_pairs() (its second stage)")
        return pair_scores_by_blocks(self, image_feats, text_feats, image_index, text_index, direction)

    def eval_settings(self) -> EvalSettings:
        """How this model must be evaluated to match its authors (batching, blocks, seed, re-rank depth)."""
        return EvalSettings()

    # -- training ------------------------------------------------------------------------------
    def train_features(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """The part of the training loss computed per micro-batch (usually the embeddings)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its loss (accumulation={self.accumulation!r})")

    def train_loss(self, feats: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss over the features of the whole (global) batch: ``{"loss": total, ...}``."""
        raise NotImplementedError(f"{type(self).__name__} does not split its loss (accumulation={self.accumulation!r})")

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training losses ``{"loss": total, ...}`` of one batch."""
        return self.train_loss(self.train_features(batch), batch)

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before every epoch (0-based; e.g. switch to hardest negatives)."""
        self.epoch = epoch

    def on_step_start(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Called before every optimizer step (e.g. a loss warm-up factor or a clamp per step)."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (e.g. clamp a learned temperature)."""

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override to give backbones their own lr multiplier."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": base_lr, "name": "all"}]

    def init_pretrained(self) -> None:
        """Load pretrained backbone weights named by the config (build() calls it without a checkpoint)."""

    # -- persistence -----------------------------------------------------------------------------
    def save_assets(self, directory: Path) -> dict[str, Any]:
        """Copy what tokenising needs into `directory`; return the config fields that point at the copies.

        The returned values are file names relative to `directory`; `itmzoo.load` turns them back into
        paths, so a native checkpoint directory works wherever it is moved. The default handles a
        ``vocab_path`` config field (a SCAN vocabulary json), checked by the tokenizer before it is copied.
        """
        import shutil

        path = getattr(self.config, "vocab_path", None)
        if not path:
            return {}
        self.tokenizer(["a"])  # reads the vocabulary and checks it against the model (size, checksum)
        shutil.copyfile(path, Path(directory) / "vocab.json")
        return {"vocab_path": "vocab.json"}

    def save_pretrained(self, directory: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into `directory`, atomically."""
        from ..checkpoints.native import save_pretrained

        return save_pretrained(self, directory, extra=extra)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def pair_scores_by_blocks(model: ITMModel, image_feats: Features, text_feats: Features, image_index: torch.Tensor,
                          text_index: torch.Tensor, direction: str, max_waste: float = 4.0) -> torch.Tensor:
    """``model.similarity`` on dense blocks that cover the pairs, returned in pair order.

    Consecutive queries are grouped while the block (queries x the union of their candidates) holds at
    most `max_waste` times as many pairs as were asked for: a cross model scores a large block faster
    per pair than one query at a time (LHSC: 5x, see docs/evaluation.md). `direction` as in
    `ITMModel.score_pairs`.
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    i2t = direction == "i2t"
    query, cand = (image_index, text_index) if i2t else (text_index, image_index)
    out = torch.empty(query.shape[0], dtype=torch.float32, device=query.device)
    if query.numel() == 0:
        return out
    order = torch.argsort(query, stable=True)
    q_sorted = query[order]
    starts = torch.ones_like(q_sorted, dtype=torch.bool)
    starts[1:] = q_sorted[1:] != q_sorted[:-1]
    bounds = torch.nonzero(starts).flatten().tolist() + [q_sorted.numel()]
    cand_sorted = cand[order].tolist()
    groups: list[tuple[int, int, set[int]]] = []  # (first pair, end pair, union of candidates) in sorted order
    a0, union, n_q = 0, set(), 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        new = union.union(cand_sorted[a:b])
        if n_q and (n_q + 1) * len(new) > max_waste * (b - a0):
            groups.append((a0, a, union))
            a0, new, n_q = a, set(cand_sorted[a:b]), 0
        union, n_q = new, n_q + 1
    groups.append((a0, q_sorted.numel(), union))
    for a, b, union in groups:
        pos = order[a:b]
        qs = torch.unique(q_sorted[a:b])
        cs = torch.tensor(sorted(union), dtype=torch.long, device=query.device)
        if i2t:
            block = model.similarity(slice_features(image_feats, qs), slice_features(text_feats, cs))
        else:
            block = model.similarity(slice_features(image_feats, cs), slice_features(text_feats, qs)).t()
        rows = torch.searchsorted(qs, query[pos])
        cols = torch.searchsorted(cs, cand[pos])
        out[pos] = block[rows, cols].float()
    return out
