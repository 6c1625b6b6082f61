"""The model contract shared by every registered method (see docs/contract.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence, Union

import torch
from torch import nn

__all__ = ["Features", "ITMModel", "cat_features", "features_len", "features_to", "slice_features"]

# One vector per item (Tensor[N, D]) or token sets with masks ({"tokens": [N, L, D], "mask": [N, L]}).
Features = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def features_len(feats: Features) -> int:
    """Number of items (rows) in a feature set."""
    if isinstance(feats, torch.Tensor):
        return feats.shape[0]
    if not feats:
        raise ValueError("empty feature dict")
    return next(iter(feats.values())).shape[0]


def slice_features(feats: Features, index: slice | torch.Tensor) -> Features:
    """Rows `index` of a feature set, keeping its form."""
    if isinstance(feats, torch.Tensor):
        return feats[index]
    return {k: v[index] for k, v in feats.items()}


def features_to(feats: Features, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Features:
    """Move a feature set; `dtype` applies to floating tensors only (masks keep theirs)."""

    def mv(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

    if isinstance(feats, torch.Tensor):
        return mv(feats)
    return {k: mv(v) for k, v in feats.items()}


def cat_features(parts: Sequence[Features]) -> Features:
    """Concatenate feature sets along rows; token sets of different lengths are right-padded with 0."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return _cat_padded(list(parts))
    return {k: _cat_padded([p[k] for p in parts]) for k in first}


def _cat_padded(ts: list[torch.Tensor]) -> torch.Tensor:
    if ts[0].dim() >= 2 and len({t.shape[1:] for t in ts}) > 1:
        # token sets from batches padded to different lengths: pad every dim to the max
        shape = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
        padded = []
        for t in ts:
            pad: list[int] = []
            for d in reversed(range(1, t.dim())):
                pad += [0, shape[d - 1] - t.shape[d]]
            padded.append(nn.functional.pad(t, pad))
        ts = padded
    return torch.cat(ts, 0)


class ITMModel(nn.Module):
    """Base class of every itmzoo model.

    Subclasses set `input_kind`, `scoring`, `registry_name` and implement `encode_image`,
    `encode_text`, `similarity` and `forward`. Embedding models get `similarity` for free
    (a matrix product of their vectors).
    """

    input_kind: ClassVar[str] = "regions"
    scoring: ClassVar[str] = "embedding"

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.registry_name: str | None = None  # set by build()
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

    def collate_images(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stack transformed images into the image part of a batch."""
        from ..data.collate import collate_images

        return collate_images(images, self.input_kind)

    # -- the contract -------------------------------------------------------------------------
    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> Features:
        raise NotImplementedError

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> Features:
        raise NotImplementedError

    def similarity(self, image_feats: Features, text_feats: Features) -> torch.Tensor:
        """Scores ``[n_images, n_texts]``; embedding models: one matrix product."""
        if self.scoring != "embedding":
            raise NotImplementedError(f"{type(self).__name__} must implement similarity()")
        return image_feats @ text_feats.t()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- training hooks (optional) -------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before every epoch (e.g. switch to hardest negatives)."""
        self.epoch = epoch

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
