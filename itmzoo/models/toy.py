"""`toy_vse`: a tiny embedding model for tests and the demo (not a published method).

Image: mean of the region features through one linear layer. Text: mean of hashed word embeddings
(the hashing trick needs no vocabulary file, so the model is fully described by its config).
Loss: the VSE++ hinge loss, all negatives in epoch 0 and the hardest negative afterwards.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Mapping

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..data.transforms import RegionTransform
from ..data.vocab import pad_ids, word_tokenize
from ..features import sequence_mask
from ..losses import hinge_triplet_loss, l2norm
from ..registry import register_model
from .base import ITMModel


@dataclasses.dataclass
class ToyVSEConfig(ModelConfig):
    img_dim: int = 2048
    embed_size: int = 256
    hash_buckets: int = 4096
    word_dim: int = 256
    margin: float = 0.2
    warmup_epochs: int = 1  # epochs with all negatives before the hardest-negative loss

    def validate(self) -> None:
        for f in ("img_dim", "embed_size", "hash_buckets", "word_dim"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"toy_vse: {f} must be positive, got {getattr(self, f)}")


class HashingTokenizer:
    """Words -> ``1 + crc32(word) % buckets`` (0 is padding)."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets

    def __call__(self, captions: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        seqs = [[1 + zlib.crc32(w.encode()) % self.buckets for w in word_tokenize(c)] or [0] for c in captions]
        return pad_ids(seqs, 0)


class ToyVSE(ITMModel):
    input_kind = "regions"
    scoring = "embedding"

    def __init__(self, config: ToyVSEConfig) -> None:
        super().__init__(config)
        self.img_fc = nn.Linear(config.img_dim, config.embed_size)
        self.word_emb = nn.Embedding(config.hash_buckets + 1, config.word_dim, padding_idx=0)
        self.txt_fc = nn.Linear(config.word_dim, config.embed_size)
        self._tokenizer = HashingTokenizer(config.hash_buckets)

    @property
    def tokenizer(self) -> HashingTokenizer:
        return self._tokenizer

    def image_transform_for(self, train: bool) -> RegionTransform:
        return RegionTransform(train=False)  # no region dropping: the demo model needs no augmentation

    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x, n = batch["regions"], batch["region_lengths"]
        if x.shape[-1] != self.config.img_dim:
            raise ValueError(f"toy_vse expects region features of dim {self.config.img_dim}, got {x.shape[-1]}")
        mask = sequence_mask(n, x.shape[1]).to(x.dtype)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return l2norm(self.img_fc(pooled))

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"].to(torch.float32)
        e = self.word_emb(ids) * mask[..., None]
        pooled = e.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return l2norm(self.txt_fc(pooled))

    # the loss split at the embeddings: lets the trainer accumulate gradients exactly (cached features)
    accumulation = "exact"

    def train_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": self.encode_image(batch), "text": self.encode_text(batch)}

    def train_loss(self, feats: Mapping[str, torch.Tensor],
                   batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hinge loss over the global batch: under DDP the embeddings of every rank are gathered."""
        from ..distributed import gather_features

        img, txt = gather_features(feats["image"]), gather_features(feats["text"])
        # scores and hinge in fp32 even under autocast: near-ties decide the hardest negative
        with torch.autocast(img.device.type, enabled=False):
            scores = img.float() @ txt.float().t()
        pos = None
        if "image_index" in batch:
            idx = gather_features(batch["image_index"])
            pos = idx[:, None] == idx[None, :]
        loss = hinge_triplet_loss(scores, self.config.margin, max_violation=self.epoch >= self.config.warmup_epochs,
                                  pos_mask=pos)
        return {"loss": loss}


@register_model("toy_vse", config=ToyVSEConfig, input_kind="regions", scoring="embedding",
                paper="itmzoo demo model (mean-pooled regions + bag of words)", text_backbone="bow",
                image_backbone="regions", demo=True,
                tiny={"img_dim": 16, "embed_size": 8, "hash_buckets": 64, "word_dim": 8})
def toy_vse(config: ToyVSEConfig) -> ToyVSE:
    return ToyVSE(config)
