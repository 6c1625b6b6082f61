"""Training recipes of the pixel methods: HF AdamW, per-step schedules, epochs over images, tiny CLIP / ViT runs."""

import dataclasses
import math
from collections import Counter
from typing import Mapping

import numpy as np
import pytest
import torch
from torch import nn

from itmzoo.config import ConfigError, ModelConfig
from itmzoo.data.synthetic import SyntheticShapes
from itmzoo.data.tokenizers import CLIPTokenizer
from itmzoo.data.transforms import image_transform
from itmzoo.encoders.clip import CLIP, CLIPConfig
from itmzoo.encoders.vit import build_vit
from itmzoo.losses import contrastive_loss, l2norm
from itmzoo.models.base import ITMModel
from itmzoo.train.config import TrainConfig
from itmzoo.train.data import make_train_loader
from itmzoo.train.optim import HFAdamW, LRSchedule, build_optimizer

# -- HF AdamW ------------------------------------------------------------------------------------------


def hand_hf_adamw(p, grads, lr, b1, b2, eps, wd):
    """transformers < 5 AdamW, written out in float64 Python."""
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            p[i] = p[i] - step * m[i] / (math.sqrt(v[i]) + eps)
            p[i] = p[i] - lr * wd * p[i]
    return p


def run_optimizer(cls, p0, grads, **kw):
    p = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    frozen = nn.Parameter(torch.ones(2, dtype=torch.float64))  # never gets a gradient
    opt = cls([p, frozen], **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().tolist(), opt, frozen


def test_hf_adamw_matches_the_hand_computation_and_differs_from_torch():
    p0 = [1.0, -2.0, 0.5, 3e-4]
    grads = [[0.1, -0.2, 0.3, 1e-7], [-0.05, 0.4, 0.0, 2e-7], [0.2, 0.1, -0.3, -1e-7]]
    kw = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.2}
    ours, opt, frozen = run_optimizer(HFAdamW, p0, grads, **kw)
    expected = hand_hf_adamw(p0, grads, kw["lr"], *kw["betas"], kw["eps"], kw["weight_decay"])
    assert np.allclose(ours, expected, rtol=0, atol=1e-12)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 3
    assert frozen not in opt.state and torch.equal(frozen, torch.ones(2, dtype=torch.float64))
    torch_adamw, _, _ = run_optimizer(torch.optim.AdamW, p0, grads, **kw)
    assert max(abs(a - b) for a, b in zip(torch_adamw, expected)) > 1e-3  # decay order and eps placement differ


def test_hf_adamw_from_config_and_first_step_at_lr_zero_still_moves_moments():
    model = nn.Linear(3, 2)
    cfg = TrainConfig(optimizer="hf_adamw", lr=1e-2, eps=1e-6, weight_decay=0.2, schedule="hf_cosine",
                      warmup_ratio=0.1, epochs=1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, HFAdamW)
    sched = LRSchedule(opt, cfg, steps_per_epoch=20)
    assert sched.warmup == 2 and sched.apply(0) == 0.0
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert torch.equal(model.weight, before)  # lr 0: no update, no decay ...
    assert opt.state[model.weight]["exp_avg"].abs().sum() > 0  # ... but the moments moved, as upstream


# -- schedules -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_cycles, warmup_ratio, total", [(0.5, 0.1, 97), (0.3, 0.15, 120)])
def test_hf_cosine_equals_transformers_schedule_stepped_per_iteration(num_cycles, warmup_ratio, total):
    from transformers import get_cosine_schedule_with_warmup

    warm = int(warmup_ratio * total)
    w = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([w], lr=1.0)
    ref = get_cosine_schedule_with_warmup(ref_opt, warm, total, num_cycles=num_cycles)
    used = []
    for _ in range(total + 10):  # ESL / Lightning order: optimizer.step (at the current lr), then scheduler.step
        used.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    cfg = TrainConfig(schedule="hf_cosine", warmup_ratio=warmup_ratio, num_cycles=num_cycles, epochs=1)
    ours = LRSchedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), cfg, steps_per_epoch=total)
    assert ours.warmup == warm
    assert np.allclose([ours.factor(s) for s in range(total + 10)], used, rtol=0, atol=1e-12)
    assert used[0] == 0.0


def test_multisea_cosine_end_values_and_overshoot():
    f30k = LRSchedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                      TrainConfig(schedule="hf_cosine", warmup_steps=1800, num_cycles=0.3, schedule_steps=12000,
                                  epochs=200), steps_per_epoch=60)
    assert round(f30k.factor(12000), 4) == 0.3455
    coco = LRSchedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                      TrainConfig(schedule="hf_cosine", warmup_steps=6796, num_cycles=0.3, schedule_steps=45312,
                                  epochs=200), steps_per_epoch=227)
    assert coco.total_steps == 45312 and round(coco.factor(45400), 4) == 0.3434  # Lightning's 88 extra steps


def test_cosine_num_cycles_default_is_the_half_cosine_and_config_checks():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    half = LRSchedule(opt, TrainConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1, epochs=1), 12)
    expected = [(s + 1) / 2 if s < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 10)) for s in range(12)]
    assert np.allclose([half.factor(s) for s in range(12)], expected)
    for bad in ({"warmup_ratio": 1.0}, {"warmup_ratio": 0.1, "warmup_steps": 3}, {"num_cycles": 0.0},
                {"schedule_steps": 0}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).validate()


# -- tiny pixel models -------------------------------------------------------------------------------------

TINY_CLIP = {"embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 2,
             "vision_heads": 2, "context_length": 24, "text_width": 32, "text_layers": 2, "text_heads": 2}
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 32, "patch_size": 8}


@dataclasses.dataclass
class TinyPixelConfig(ModelConfig):
    backbone: str = "clip"  # "clip": CLIP image tower; "vit": HF ViT CLS + linear


class TinyPixelRetrieval(ITMModel):
    """CLIP text tower + a CLIP or ViT image tower, symmetric InfoNCE: a test stand-in for the pixel methods."""

    input_kind = "pixels"
    scoring = "embedding"
    train_epoch_over = "images"

    def __init__(self, config: TinyPixelConfig) -> None:
        super().__init__(config)
        self.clip = CLIP(CLIPConfig(**TINY_CLIP))
        if config.backbone == "vit":
            self.vit = build_vit(TINY_VIT)
            self.vit_proj = nn.Linear(32, 32)
        with torch.no_grad():  # a lower start than CLIP's 1/0.07: tiny random towers leave the plateau sooner
            self.clip.logit_scale.fill_(math.log(5.0))
        self._tok = CLIPTokenizer(context_length=24)

    @property
    def tokenizer(self):
        return self._tok

    def image_transform_for(self, train: bool):
        return image_transform(self.config.backbone, 32, train=train)

    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.config.backbone == "vit":
            return l2norm(self.vit_proj(self.vit(pixel_values=batch["pixels"]).last_hidden_state[:, 0]))
        return l2norm(self.clip.encode_image(batch["pixels"]))

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return l2norm(self.clip.encode_text(batch["input_ids"]))

    def forward(self, batch):
        loss = contrastive_loss(self.encode_image(batch), self.encode_text(batch), self.clip.logit_scale.exp())
        return {"loss": loss}


@pytest.fixture(scope="module")
def pixels_split():
    return SyntheticShapes(num_images={"train": 48, "dev": 8, "test": 8}, seed=0,
                           image_size=32).split("train", "pixels")


def test_epochs_over_images_draw_one_seeded_caption_per_image(pixels_split):
    model = TinyPixelRetrieval(TinyPixelConfig())
    split = pixels_split

    def epoch_items(loader, epoch):
        loader.sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            seen += list(zip(batch["image_index"].tolist(), batch["input_ids"].tolist()))
        return seen

    loader = make_train_loader(split, model, 8, seed=5)  # the model asks for epochs over images
    assert len(loader) == 48 // 8
    e0, e1 = epoch_items(loader, 0), epoch_items(loader, 1)
    assert sorted(i for i, _ in e0) == list(range(48))  # every image exactly once per epoch
    tok = model.tokenizer
    for i, ids in e0 + e1:  # the caption belongs to its image
        own = [tok([split.captions[j]])["input_ids"][0].tolist() for j in np.flatnonzero(split.caption_to_image == i)]
        assert ids in own
    assert e0 != e1  # a new draw each epoch
    again = make_train_loader(split, model, 8, seed=5, num_workers=2)  # decoded in worker processes
    assert epoch_items(again, 0) == e0
    captions = make_train_loader(split, model, 8, seed=5, epoch_over="captions")
    assert len(captions) == split.num_captions // 8
    # over many epochs, the draws spread over an image's captions
    drawn = Counter()
    for epoch in range(12):
        drawn.update(tuple(ids) for i, ids in epoch_items(loader, epoch) if i == 0)
    assert sum(drawn.values()) == 12 and len(drawn) >= 3


@pytest.mark.parametrize("backbone", ["clip", "vit"])
def test_tiny_pixel_backbones_train_and_loss_falls(backbone):
    """ESL-CLIP's recipe (HF AdamW, HF cosine with 10 % warm-up, clip 1.0) on 16 synthetic pictures, epochs
    over images: the InfoNCE loss leaves chance level (ln 16 = 2.77); measured last-5 means 1.76 / 2.10."""
    from itmzoo.train.engine import fit

    split = SyntheticShapes(num_images={"train": 16, "dev": 8, "test": 8}, seed=0,
                            image_size=32).split("train", "pixels")
    torch.manual_seed(0)
    model = TinyPixelRetrieval(TinyPixelConfig(backbone))
    freeze = ["clip.visual.*"] if backbone == "vit" else ["clip.token_embedding.*"]
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(freeze[0][:-2])}
    cfg = TrainConfig(epochs=40, batch_size=16, optimizer="hf_adamw", lr=3e-3, eps=1e-6, weight_decay=0.0,
                      schedule="hf_cosine", warmup_ratio=0.1, grad_clip=1.0, freeze=freeze, progress=False, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and far faster on a busy machine
    try:
        result = fit(model, split, cfg, verbose=False)
    finally:
        torch.set_num_threads(threads)
    losses = [r["train_loss"] for r in result.history]
    assert result.steps == 40 and len(losses) == 40
    last = sum(losses[-5:]) / 5
    assert last < math.log(16) - 0.3 and last < 0.85 * losses[0], losses
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in frozen_before.items())  # frozen by glob: bit-identical
