"""`two_stage`: any registered model as the first stage of any other, evaluated by re-ranking.

``itmzoo.build("two_stage", first="esa_bigru", second="lhsc", k=64, first_checkpoint=...,
second_checkpoint=...)`` composes two registered models that take the same images: the first scores
every pair cheaply (usually an embedding model: one matrix product), and the evaluator re-scores each
query's top k candidates with the second (usually a cross-interaction model, whose cost grows with the
number of pairs). This is the ALBEF/BLIP retrieval recipe with the first stage and the second stage
being separate models; `itmzoo.eval.rerank` describes the protocol.

Each part keeps its own tokenizer, config and checkpoint: text batches carry both tokenisations under
``first.*`` and ``second.*`` keys, feature sets carry both parts' features under the same prefixes, and
`init_pretrained` loads each part's checkpoint (an authors' file or a native directory). A saved
composition (``save_pretrained``) stores both parts' resolved configs and weights in one directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Optional

import torch

from ..config import ConfigError, ModelConfig, config_to_dict
from ..data.synthetic import SYNTHETIC_VOCAB
from ..features import Features
from ..registry import RegistryError, instantiate, register_model, resolve_config
from .base import EvalSettings, ITMModel, pair_scores_by_blocks

__all__ = ["TwoStage", "TwoStageConfig"]

PARTS = ("first", "second")


@dataclasses.dataclass
class TwoStageConfig(ModelConfig):
    first: str = "esa_bigru"  # registry name of the first stage (scores every pair)
    second: str = "lhsc"  # registry name of the second stage (re-scores each query's top k)
    first_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the first's config
    second_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the second's config
    first_checkpoint: Optional[str] = None  # official file or native directory, loaded by init_pretrained
    second_checkpoint: Optional[str] = None
    k: int = 128  # candidates per query (ALBEF/BLIP: 128 on Flickr30K, 256 on COCO; Multi-SEA: 64)
    # "second": the second stage's score alone (ALBEF); "sum": second + first (BLIP and Multi-SEA add
    # the first-stage similarity)
    combine: Literal["second", "sum"] = "second"
    # second-stage blocks may hold up to this many times the pairs asked for (1: one query per call)
    block_waste: float = 4.0

    def validate(self) -> None:
        if self.k <= 0:
            raise ConfigError(f"two_stage: k must be positive, got {self.k}")
        if self.block_waste < 1:
            raise ConfigError(f"two_stage: block_waste must be >= 1, got {self.block_waste}")
        for part in PARTS:
            name = getattr(self, part)
            if not isinstance(name, str) or not name or name.partition(".")[0] in ("two_stage",):
                raise ConfigError(f"two_stage: {part} must name a registered single-stage model, got {name!r}")


class _PartTokenizer:
    """Both parts' tokenisations of the same captions, under ``first.*`` and ``second.*`` keys."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def __call__(self, captions: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for part, tok in (("first", self.first), ("second", self.second)):
            out.update({f"{part}.{k}": v for k, v in tok(list(captions), train=train).items()})
        return out


class _SharedTransform:
    """One image input for both parts: their transforms must agree on every image."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def __call__(self, image: Any) -> torch.Tensor:
        a, b = self.first(image), self.second(image)
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(f"two_stage: the parts transform images differently ({self.first!r} gives "
                             f"{tuple(a.shape)}, {self.second!r} gives {tuple(b.shape)}); compose models that "
                             "take the same image input (same region count and dim, or the same pixel transform)")
        return a


def _sub_batch(batch: Mapping[str, Any], part: str) -> dict[str, Any]:
    """Image keys as they are, plus this part's text keys without their prefix."""
    out = {k: v for k, v in batch.items() if not any(k.startswith(f"{p}.") for p in PARTS)}
    out.update({k[len(part) + 1:]: v for k, v in batch.items() if k.startswith(f"{part}.")})
    return out


def _pack(feats: Features, part: str) -> dict[str, torch.Tensor]:
    if isinstance(feats, torch.Tensor):
        return {part: feats}
    return {f"{part}.{k}": v for k, v in feats.items()}


def _unpack(feats: Mapping[str, torch.Tensor], part: str) -> Features:
    if part in feats:
        return feats[part]
    out = {k[len(part) + 1:]: v for k, v in feats.items() if k.startswith(f"{part}.")}
    if not out:
        raise KeyError(f"two_stage: no '{part}' features in {sorted(feats)}")
    return out


def _build_part(name: str, overrides: Mapping[str, Any]) -> ITMModel:
    entry, cfg = resolve_config(name, overrides)
    return instantiate(entry.name, cfg)


class TwoStage(ITMModel):
    """A first-stage model (``self.first``) and a second-stage model (``self.second``) used as one."""

    scoring = "two-stage"
    accumulation = "refuse"  # the parts' losses are summed over the whole batch; train the parts separately

    def __init__(self, config: TwoStageConfig) -> None:
        super().__init__(config)
        try:
            self.first = _build_part(config.first, config.first_config)
            self.second = _build_part(config.second, config.second_config)
        except (RegistryError, ConfigError) as e:
            raise ConfigError(f"two_stage: {e}") from e
        for part in PARTS:
            if getattr(self, part).scoring == "two-stage":
                raise ConfigError(f"two_stage: {part}={getattr(config, part)!r} is itself two-stage")
        if self.first.input_kind != self.second.input_kind:
            raise ConfigError(f"two_stage: first={config.first!r} takes {self.first.input_kind} but "
                              f"second={config.second!r} takes {self.second.input_kind}")
        self.input_kind = self.first.input_kind

    # -- data plumbing -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> _PartTokenizer:
        return _PartTokenizer(self.first.tokenizer, self.second.tokenizer)

    def image_transform_for(self, train: bool) -> _SharedTransform:
        return _SharedTransform(self.first.image_transform_for(train), self.second.image_transform_for(train))

    def eval_settings(self) -> EvalSettings:
        """The parts' caption batch (one tokenisation feeds both), the first stage's block, k from the config."""
        a, b = self.first.eval_settings(), self.second.eval_settings()
        for f in ("text_batch_size", "image_batch_size"):
            va, vb = getattr(a, f), getattr(b, f)
            if va is not None and vb is not None and va != vb:
                raise ConfigError(f"two_stage: the parts need different eval {f} ({va} vs {vb}); "
                                  "their features cannot both match their authors'")
        return EvalSettings(text_batch_size=a.text_batch_size or b.text_batch_size,
                            image_batch_size=a.image_batch_size or b.image_batch_size,
                            block=a.block, seed=b.seed if b.seed is not None else a.seed, rerank_k=self.config.k)

    # -- encoding and scoring ------------------------------------------------------------------
    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**_pack(self.first.encode_image(batch), "first"), **_pack(self.second.encode_image(batch), "second")}

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**_pack(self.first.encode_text(_sub_batch(batch, "first")), "first"),
                **_pack(self.second.encode_text(_sub_batch(batch, "second")), "second")}

    def similarity(self, image_feats: Mapping[str, torch.Tensor],
                   text_feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The first stage: the first model's scores of every pair."""
        return self.first.similarity(_unpack(image_feats, "first"), _unpack(text_feats, "first"))

    def score_pairs(self, image_feats: Mapping[str, torch.Tensor], text_feats: Mapping[str, torch.Tensor],
                    image_index: torch.Tensor, text_index: torch.Tensor, direction: str) -> torch.Tensor:
        """The second model's scores of the given pairs (plus the first's with ``combine="sum"``).

        Consecutive queries share one ``similarity`` call on the block of them x the union of their
        candidates, as long as the block holds at most ``config.block_waste`` times the pairs needed.
        """
        if direction not in ("i2t", "t2i"):
            raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
        parts = ["second", "first"] if self.config.combine == "sum" else ["second"]
        total = None
        for part in parts:
            s = pair_scores_by_blocks(getattr(self, part), _unpack(image_feats, part), _unpack(text_feats, part),
                                      image_index, text_index, direction, self.config.block_waste)
            total = s if total is None else total + s
        return total

    # -- training: both parts' losses on the same batch --------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out1 = self.first(_sub_batch(batch, "first"))
        out2 = self.second(_sub_batch(batch, "second"))
        return {"loss": out1["loss"] + out2["loss"], "first_loss": out1["loss"].detach(),
                "second_loss": out2["loss"].detach()}

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.first.on_epoch_start(epoch)
        self.second.on_epoch_start(epoch)

    def on_step_start(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.first.on_step_start(epoch, step, steps_per_epoch)
        self.second.on_step_start(epoch, step, steps_per_epoch)

    def after_optimizer_step(self) -> None:
        self.first.after_optimizer_step()
        self.second.after_optimizer_step()

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        groups = []
        for part in PARTS:
            for g in getattr(self, part).param_groups(base_lr):
                groups.append({**g, "name": f"{part}.{g.get('name', 'all')}"})
        return groups

    def init_pretrained(self) -> None:
        """Load each part's checkpoint (or its pretrained backbones when it has none).

        A loaded part's resolved config replaces the overrides in this config, so `save_pretrained`
        records the architecture the checkpoint implied.
        """
        for part in PARTS:
            ckpt = getattr(self.config, f"{part}_checkpoint")
            if ckpt is None:
                getattr(self, part).init_pretrained()
                continue
            from ..checkpoints.build import build  # lazily: it reads checkpoint files

            name = getattr(self.config, part)
            loaded = build(name, checkpoint=ckpt, **getattr(self.config, f"{part}_config"))
            setattr(self, part, loaded)
            setattr(self.config, f"{part}_config", config_to_dict(loaded.config))
        if self.first.input_kind != self.second.input_kind:
            raise ConfigError("two_stage: the loaded parts take different inputs")


@register_model("two_stage", config=TwoStageConfig, input_kind="regions", scoring="two-stage",
                paper="itmzoo composition: a first-stage model's top k re-scored by a second model (ALBEF/BLIP recipe)",
                text_backbone="per part", image_backbone="per part",
                # a tiny composition with random weights for the generic model test (no files needed)
                tiny={"first": "toy_vse", "k": 3,
                      "first_config": {"img_dim": 16, "embed_size": 8, "word_dim": 8, "hash_buckets": 31},
                      "second": "lhsc",
                      "second_config": {"img_dim": 16, "word_dim": 8, "embed_size": 8, "sim_dim": 4,
                                        "vocab_size": 74, "vocab_path": SYNTHETIC_VOCAB,
                                        "gcn_layers": 1, "text_attn_layers": 1, "text_padding": "masked"}})
def two_stage(config: TwoStageConfig) -> TwoStage:
    return TwoStage(config)
