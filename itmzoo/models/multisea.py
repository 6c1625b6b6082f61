"""Multi-SEA: Multi-stage Semantic Enhancement and Aggregation for image-text retrieval (Tian et al., IPM 2025).

Faithful reimplementation of ``jim4399266/Multi-SEA @ 3941a497683b405df5943579ca1fd4c28d9a3b45`` (arch
``aformer3_swiglu_queue_new``, the published configs), a two-stage (retrieve, then re-rank) model:

* **encoding** (both stages): CLIP ViT-B/16 with its first 11 blocks and ``ln_post`` on all 197 tokens
  (no ``proj``) -> ``V``; RoBERTa-base with pooler -> ``T``, ``P``. Projections into the fusion space:
  ``pf_i = proj_f(tanh(W V[:, 0]))``, ``pe_i = proj_e(V)``; ``pf_t = proj_f(P)``, ``pe_t = proj_e(T)``;
  one Agent-Former pass in ``image`` / ``text`` mode, then the learnable blend
  ``f = α·pooler + (1-α)·pf`` and ``E = α·last_hidden + (1-α)·pe`` (no L2 normalisation anywhere);
* **first stage**: ``S = f_i f_tᵀ / temp``;
* **second stage**: for the top-k (64) candidates of every query, an Agent-Former pass in ``i2t`` (image
  tokens query the caption's tokens, image expert) or ``t2i`` mode over ``E``; the score is the raw ITM
  logit of class "match" on ``[CLS]`` plus ``S``;
* **training** (per micro-batch, `accumulation = "naive"`): ``temp`` and ``α`` are clamped to [0.1, 3] and
  [0.2, 0.8] at the start of every micro-batch (never at evaluation); ITC against the local in-batch
  keys plus 1000-entry queues of detached current features (no momentum encoder; positives by image
  id); ALBEF-style hard negatives drawn from all ranks; hierarchical ITM on ``[CLS]`` after layers 2
  and 4 in both directions with one shared head; loss = ITC + ITM.

Parameter names follow the authors' Lightning module (``visual_encoder.*`` is OpenAI's CLIP layout with
the unused, frozen text-side embeddings; ``text_encoder.*`` is HF RoBERTa), so `convert_official` only
renames the Agent-Former. Where upstream is random, explicit seeded generators are used (`seed`).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.safe import CheckpointError, strip_prefixes
from ..config import ConfigError, ModelConfig, yaml_load
from ..data.tokenizers import HFTokenizer
from ..data.transforms import image_transform
from ..distributed import all_gather_with_grad, get_rank
from ..encoders.backbones import load_pretrained_weights
from ..encoders.clip import CLIP, CLIPConfig
from ..encoders.hf_text import build_hf_text_model
from ..layers.agent_former import ACTIVATIONS, AgentFormer
from ..losses import hierarchical_itm_loss, queue_itc_loss, sample_hard_negatives
from ..registry import Tag, register_model
from .base import EvalSettings, ITMModel

__all__ = ["TAGS", "TINY_OVERRIDES", "MultiSEA", "MultiSEAConfig", "convert_official", "multisea",
           "official_overrides", "read_official_config"]

UPSTREAM = "jim4399266/Multi-SEA @ 3941a497683b405df5943579ca1fd4c28d9a3b45"


@dataclasses.dataclass
class MultiSEAConfig(ModelConfig):
    """Multi-SEA architecture and recipe constants (defaults = the published configs)."""

    # fusion space and Agent-Former
    hidden_size: int = 768
    num_layers: int = 4
    num_heads: int = 12
    mlp_ratio: int = 4
    num_agents: int = 40  # hard-coded upstream
    attn_dropout: float = 0.1
    dropout: float = 0.1
    norm_eps: float = 1e-5
    ffn_activation: Literal["hswish_clip1", "hardswish", "swish"] = "hswish_clip1"
    # image tower: OpenAI CLIP ViT-B/16, first `vision_blocks` blocks, ln_post on every token
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_blocks: int = 11
    vision_trainable_blocks: int = 4  # the last N kept blocks (all if fewer) + ln_post train; -1: the whole tower
    clip_text_vocab: int = 49408  # shapes of the unused text-side embeddings kept in the state dict
    clip_text_width: int = 512
    clip_context_length: int = 77
    clip_attention: Literal["sdpa", "eager"] = "sdpa"
    clip_pretrained: str | None = None  # OpenAI's ViT-B-16.pt, an open_clip/timm file or a transformers CLIP folder
    # text tower: RoBERTa with pooler
    text_arch: str = "roberta-base"
    text_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    text_pretrained: str | None = None  # local folder or hub id; the pooler stays random if it has none
    tokenizer: str = "roberta-base"
    max_text_len: int = 40
    # learnable scalars and their training-time clamps
    temp_init: float = 1.0
    alpha_init: float = 0.7
    temp_range: tuple[float, float] = (0.1, 3.0)
    alpha_range: tuple[float, float] = (0.2, 0.8)
    # training
    queue_size: int = 1000
    itm_layers: tuple[int, ...] = (2, 4)  # 1-based layers whose [CLS] feeds the ITM head in training
    negatives_all_ranks: bool = True
    # a caption/image whose micro-batch (all ranks) holds no other image has no hard negative: "skip" leaves
    # its negative triplet out of ITM (a 1-image last micro-batch trains); "error" stops as upstream would
    # (upstream's loader drops the smaller last micro-batch, so it never meets one)
    missing_negative: Literal["skip", "error"] = "skip"
    seed: int | None = 0  # queue init and hard negatives; None: torch's global RNG (upstream, unseeded)
    encoder_lr_mult: float = 0.1
    alpha_lr: float = 1e-4  # absolute, as upstream (not scaled by the base lr)
    temp_lr: float = 5e-4
    # evaluation
    top_k: int = 64
    rerank_chunk: int = 64  # pairs per Agent-Former call in score_pairs (memory bound)
    matmul_precision: Literal["fp32", "tf32"] = "fp32"  # upstream ran TF32 on Ampere+ GPUs
    # repeated captions of an image at evaluation: upstream drops them with list(set(...)) ("hash_order");
    # "stable" drops them keeping the first occurrences in order; "none" keeps the split as given
    eval_dedup: Literal["none", "stable", "hash_order"] = "none"

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"multisea: hidden_size {self.hidden_size} must be divisible by "
                              f"num_heads {self.num_heads}")
        if not 0 < self.vision_blocks <= self.vision_layers:
            raise ConfigError(f"multisea: vision_blocks must lie in 1..{self.vision_layers}, got {self.vision_blocks}")
        if not self.itm_layers or any(not 1 <= i <= self.num_layers for i in self.itm_layers):
            raise ConfigError(f"multisea: itm_layers must name layers in 1..{self.num_layers}, got {self.itm_layers}")
        if self.ffn_activation not in ACTIVATIONS:
            raise ConfigError(f"multisea: ffn_activation must be one of {sorted(ACTIVATIONS)}")
        for name in ("temp_range", "alpha_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"multisea: {name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        for name in ("queue_size", "top_k", "rerank_chunk", "num_agents", "max_text_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"multisea: {name} must be >= 1, got {getattr(self, name)}")


class Pooler(nn.Module):
    """``tanh(dense(x[:, 0]))`` (upstream's ``vision_pooler``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class MultiSEA(ITMModel):
    """Multi-SEA (module docstring). Features: image ``{"feat", "embeds"}``, text ``{"feat", "embeds", "mask"}``."""

    input_kind = "pixels"
    scoring = "two-stage"
    accumulation = "naive"  # queues and hard negatives are per micro-batch, as upstream
    train_epoch_over = "images"  # an epoch visits every image once with one random caption

    def __init__(self, config: MultiSEAConfig) -> None:
        config.validate()
        super().__init__(config)
        c = config
        self.temp = nn.Parameter(torch.tensor(float(c.temp_init)))
        self.alpha = nn.Parameter(torch.tensor(float(c.alpha_init)))
        g = torch.Generator().manual_seed(c.seed) if c.seed is not None else None
        self.register_buffer("image_queue", F.normalize(torch.rand(c.hidden_size, c.queue_size, generator=g), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.rand(c.hidden_size, c.queue_size, generator=g), dim=0))
        self.register_buffer("idx_queue", torch.full((1, c.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.visual_encoder = CLIP(CLIPConfig(
            image_size=c.image_size, patch_size=c.patch_size, vision_width=c.vision_width,
            vision_layers=c.vision_layers, vision_heads=c.vision_heads, vision_blocks=c.vision_blocks,
            vision_output="tokens", text_tower="embeddings", context_length=c.clip_context_length,
            vocab_size=c.clip_text_vocab, text_width=c.clip_text_width, logit_scale=False, attention=c.clip_attention))
        self.text_encoder = build_hf_text_model(c.text_arch, c.text_overrides)
        vw, tw, d = c.vision_width, self.text_encoder.config.hidden_size, c.hidden_size
        self.vision_proj_f = nn.Linear(vw, d)
        self.vision_proj_e = nn.Linear(vw, d)
        self.vision_pooler = Pooler(vw)
        self.text_proj_f = nn.Linear(tw, d)
        self.text_proj_e = nn.Linear(tw, d)
        self.aformer = AgentFormer(d, c.num_heads, c.num_layers, d * c.mlp_ratio, c.num_agents, c.attn_dropout,
                                   c.dropout, c.norm_eps, c.ffn_activation)
        self.itm_head = nn.Linear(d, 2)
        self._freeze_clip()
        self._tokenizer: HFTokenizer | None = None
        self._neg_generators: dict[str, torch.Generator] = {}

    def _freeze_clip(self) -> None:
        """Upstream trains only the last 4 kept CLIP blocks and ``ln_post``; the text leftovers stay frozen."""
        n = self.config.vision_trainable_blocks
        if n < 0:
            for name, p in self.visual_encoder.named_parameters():
                p.requires_grad = name.startswith("visual.")
            return
        self.visual_encoder.requires_grad_(False)
        blocks = self.visual_encoder.visual.transformer.resblocks
        for block in list(blocks)[max(0, len(blocks) - n):] if n else []:
            block.requires_grad_(True)
        self.visual_encoder.visual.ln_post.requires_grad_(True)

    # -- data plumbing -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> HFTokenizer:
        """RoBERTa's fast tokenizer, padded and truncated to `max_text_len` (40) tokens."""
        if self._tokenizer is None:
            self._tokenizer = HFTokenizer(self.config.tokenizer, max_length=self.config.max_text_len,
                                          pad_to_max_length=True)
        return self._tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use a ready tokenizer (tests, offline folders) instead of loading `config.tokenizer`."""
        self._tokenizer = tokenizer

    def image_transform_for(self, train: bool):
        # no augmentation upstream: training uses the evaluation transform
        return image_transform("clip", self.config.image_size, train=train)

    def init_pretrained(self) -> None:
        """Load RoBERTa (`text_pretrained`) and CLIP (`clip_pretrained`) weights when the config names them."""
        c = self.config
        if c.text_pretrained:  # roberta-base's hub file has no pooler: it keeps HF's init, as upstream
            load_pretrained_weights(self.text_encoder, c.text_pretrained, allow_missing=("pooler.*",))
        if c.clip_pretrained:
            self.load_clip_weights(c.clip_pretrained)

    def load_clip_weights(self, source: str) -> list[str]:
        """Fill the CLIP tower from OpenAI's ``ViT-B-16.pt`` (read as data), an open_clip/timm file or an HF folder.

        Blocks past `vision_blocks`, ``visual.proj`` and the text transformer are left out (upstream's
        "keep only keys that exist" filter); they are returned. Every kept key must match strictly.
        """
        from ..encoders.clip import load_clip_pretrained

        return load_clip_pretrained(self.visual_encoder, source)

    # -- precision -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.config.matmul_precision == "fp32":
            yield
            return
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ (what the authors' main.py set)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(prev)

    # -- encoding ------------------------------------------------------------------------------
    def _blend(self, pooled: torch.Tensor, last: torch.Tensor, pf: torch.Tensor, pe: torch.Tensor):
        a = self.alpha
        return pooled * a + pf * (1 - a), last * a + pe * (1 - a)

    def image_heads(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLIP tokens ``[B, L, W]`` -> ``{"feat": [B, d], "embeds": [B, L, d]}``."""
        pf = self.vision_proj_f(self.vision_pooler(tokens))
        pe = self.vision_proj_e(tokens)
        out = self.aformer(pe, None, mode="image")
        f, e = self._blend(out.pooler_output, out.last_hidden_state, pf, pe)
        return {"feat": f, "embeds": e}

    def text_heads(self, last: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """RoBERTa outputs -> ``{"feat": [B, d], "embeds": [B, L, d], "mask": [B, L]}``."""
        pf = self.text_proj_f(pooled)
        pe = self.text_proj_e(last)
        out = self.aformer(pe, mask, mode="text")
        f, e = self._blend(out.pooler_output, out.last_hidden_state, pf, pe)
        return {"feat": f, "embeds": e, "mask": mask}

    def encode_image(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "pixels" not in batch:
            raise KeyError(f"multisea.encode_image needs batch['pixels'] [B, 3, H, W]; got keys {sorted(batch)}")
        with self._precision():
            return self.image_heads(self.visual_encoder.encode_image(batch["pixels"].to(self.device)))

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).long()
        with self._precision():
            out = self.text_encoder(input_ids=ids, attention_mask=mask, return_dict=True)
            return self.text_heads(out.last_hidden_state, out.pooler_output, mask)

    # -- scoring -------------------------------------------------------------------------------
    def similarity(self, image_feats: Mapping[str, torch.Tensor],
                   text_feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """First stage: ``f_i f_tᵀ / temp`` (temp as stored, never clamped here)."""
        with self._precision():
            return image_feats["feat"] @ text_feats["feat"].t() / self.temp

    def score_pairs(self, image_feats: Mapping[str, torch.Tensor], text_feats: Mapping[str, torch.Tensor],
                    image_index: torch.Tensor, text_index: torch.Tensor, direction: str) -> torch.Tensor:
        """Second stage: ITM logit of "match" on the last-layer ``[CLS]`` of the cross pass, plus ``S``.

        ``i2t``: the image's tokens query the caption's (image expert); ``t2i``: the reverse (text expert).
        """
        if direction not in ("i2t", "t2i"):
            raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
        image_index = image_index.to(image_feats["feat"].device).long()
        text_index = text_index.to(text_feats["feat"].device).long()
        with self._precision():
            if direction == "i2t":
                cls = self.aformer.cross_cls(image_feats["embeds"], None, text_feats["embeds"], text_feats["mask"],
                                             image_index, text_index, "i2t", self.config.rerank_chunk)
            else:
                cls = self.aformer.cross_cls(text_feats["embeds"], text_feats["mask"], image_feats["embeds"], None,
                                             text_index, image_index, "t2i", self.config.rerank_chunk)
            coarse = (image_feats["feat"][image_index] * text_feats["feat"][text_index]).sum(-1) / self.temp
            return self.itm_head(cls)[:, 1] + coarse

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(rerank_k=self.config.top_k, dedup_captions=self.config.eval_dedup)

    # -- training ------------------------------------------------------------------------------
    def train_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Clamp ``temp``/``α`` (every micro-batch, as upstream), then encode both sides."""
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(*self.config.temp_range)
                self.alpha.clamp_(*self.config.alpha_range)
        return {"image": self.encode_image(batch), "text": self.encode_text(batch)}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.config.seed is None:
            return None
        key = str(device)
        if key not in self._neg_generators:
            self._neg_generators[key] = torch.Generator(device).manual_seed(self.config.seed + 1 + 7919 * get_rank())
        return self._neg_generators[key]

    def sample_negatives(self, weights_t2i: torch.Tensor,
                         weights_i2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One negative image per caption and one negative caption per image (indices into the gathered batch)."""
        g = self._generator(weights_t2i.device)
        skip = self.config.missing_negative == "skip"  # rows without a candidate get index -1
        return (sample_hard_negatives(weights_t2i, g, allow_empty=skip),
                sample_hard_negatives(weights_i2t, g, allow_empty=skip))

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        image_feat, text_feat, idx = (all_gather_with_grad(t.detach()) for t in (image_feat, text_feat, idx))
        q = self.image_queue.shape[1]
        ptr = int(self.queue_ptr)
        n = min(image_feat.shape[0], q - ptr)  # truncated at the end, as upstream
        self.image_queue[:, ptr:ptr + n] = image_feat[:n].t()
        self.text_queue[:, ptr:ptr + n] = text_feat[:n].t()
        self.idx_queue[:, ptr:ptr + n] = idx[:n].t()
        self.queue_ptr[0] = (ptr + n) % q

    def train_loss(self, feats: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ITC (in-batch + queue) + hierarchical ITM with hard negatives, for one micro-batch."""
        if "image_index" not in batch:
            raise KeyError("multisea training batches need 'image_index' (positives and queue ids)")
        img, txt = feats["image"], feats["text"]
        fi, ei, ft, et, mt = img["feat"], img["embeds"], txt["feat"], txt["embeds"], txt["mask"]
        idx = batch["image_index"].to(fi.device).view(-1, 1).long()
        itc = queue_itc_loss(fi, ft, idx, self.image_queue, self.text_queue, self.idx_queue, self.temp)
        if self.training:
            self._enqueue(fi, ft, idx)

        gather = all_gather_with_grad if self.config.negatives_all_ranks else (lambda t: t)
        with torch.no_grad():
            idx_w = gather(idx)
            fi_w, ft_w = gather(fi.detach()), gather(ft.detach())
            same = idx == idx_w.t()
            w_i2t = F.softmax(fi @ ft_w.t() / self.temp, dim=1).masked_fill(same, 0)
            w_t2i = F.softmax(ft @ fi_w.t() / self.temp, dim=1).masked_fill(same, 0)
        ei_w, et_w, mt_w = gather(ei), gather(et), gather(mt)
        neg_img, neg_txt = self.sample_negatives(w_t2i, w_i2t)
        # rows without a negative (-1, missing_negative="skip") drop out of their triplet; else all are kept
        has_txt, has_img = neg_txt >= 0, neg_img >= 0
        ei_neg, et_neg, mt_neg = ei_w[neg_img[has_img]], et_w[neg_txt[has_txt]], mt_w[neg_txt[has_txt]]

        b = fi.shape[0]
        image_states = torch.cat([ei, ei[has_txt], ei_neg])
        text_states = torch.cat([et, et_neg, et[has_img]])
        text_mask = torch.cat([mt, mt_neg, mt[has_img]])
        n_neg = int(has_txt.sum()) + int(has_img.sum())
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(n_neg, dtype=torch.long)]).to(fi.device)
        with self._precision():
            t2i = self.aformer(text_states, text_mask, mode="t2i", context=image_states, output_hidden_states=True)
            i2t = self.aformer(image_states, None, mode="i2t", context=text_states, context_mask=text_mask,
                               output_hidden_states=True)
        layers = self.config.itm_layers
        itm = 0.5 * (hierarchical_itm_loss([t2i.hidden_states[i][:, 0] for i in layers], self.itm_head, labels)
                     + hierarchical_itm_loss([i2t.hidden_states[i][:, 0] for i in layers], self.itm_head, labels))
        return {"loss": itc + itm, "itc": itc.detach(), "itm": itm.detach(),
                "temp": self.temp.detach().clone(), "alpha": self.alpha.detach().clone(),
                "neg_image_for_text": neg_img.detach(), "neg_text_for_image": neg_txt.detach()}

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Upstream's four AdamW groups, by name: default, encoder (x0.1), alpha (1e-4), temp (5e-4)."""
        groups: dict[str, list[nn.Parameter]] = {"default": [], "encoder": [], "alpha": [], "temp": []}
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if "alpha" in n:
                groups["alpha"].append(p)
            elif "temp" in n:
                groups["temp"].append(p)
            elif "text_encoder" in n or "visual_encoder" in n:
                groups["encoder"].append(p)
            else:
                groups["default"].append(p)
        lrs = {"default": base_lr, "encoder": base_lr * self.config.encoder_lr_mult,
               "alpha": self.config.alpha_lr, "temp": self.config.temp_lr}
        return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


# ------------------------------------------------------------------------------------ official checkpoints

# saved by the authors' module but never used in a forward pass
UNUSED_OFFICIAL_KEYS = (
    "aformer.encoder.layers.*.cross_attention.attn.dwc.*",  # a 3x3 conv built and never called
    "aformer.encoder.norm.weight",  # the encoder's final RMSNorm is never applied
    "text_encoder.embeddings.position_ids",  # a persistent buffer before transformers 4.31
)

_AFORMER_RENAMES = (
    (r"self_attention\.self\.(query|key|value)\.", r"self_attn.\1."),
    (r"self_attention\.output\.dense\.", "self_attn.out."),
    (r"self_attention\.output\.attention_norm\.", "self_attn.norm."),
    (r"cross_attention\.attn\.(query|key|value)\.", r"cross_attn.\1."),
    (r"cross_attention\.output\.dense\.", "cross_attn.out."),
    (r"cross_attention\.output\.attention_norm\.", "cross_attn.norm."),
    (r"ffn\.ffn_norm\.", "ffn.norm."),
    (r"ffn\.(dense[1-4])\.", r"ffn.\1."),
)
_AFORMER_LAYER = re.compile(r"^aformer\.encoder\.layers\.(\d+)\.(text|image)_expert\.(.+)$")


def _rename(key: str) -> str:
    if key.startswith("aformer.pooler.dense."):
        return "aformer.pooler." + key[len("aformer.pooler.dense."):]
    m = _AFORMER_LAYER.match(key)
    if m is None:
        return key
    layer, expert, rest = m.groups()
    for pat, rep in _AFORMER_RENAMES:
        new, n = re.subn("^" + pat, rep, rest)
        if n:
            return f"aformer.layers.{layer}.{expert}.{new}"
    return key  # dwc / unknown: left as is (ignorable or reported by the strict load)


def convert_official(obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """The authors' Lightning ``.ckpt`` (or its bare ``state_dict``) -> ``(overrides, state, ignorable)``.

    Sizes are read from the tensors; ``num_heads`` and ``top_k`` from ``hyper_parameters['config']``
    when present (the heads are not in the tensors; upstream re-ranks with the checkpoint's ``top_k``).
    RoBERTa's architecture is not inferred: a file that does not fit ``text_arch``/``text_overrides``
    fails the strict load with the mismatching keys.
    """
    hp: Mapping[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        hparams = obj.get("hyper_parameters") or {}
        hp = read_official_config(hparams) if isinstance(hparams, Mapping) else {}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a Multi-SEA checkpoint: expected a Lightning .ckpt with 'state_dict' "
                              "or a state dict")
    sd = strip_prefixes(obj)
    need = ("vision_proj_f.weight", "visual_encoder.visual.conv1.weight", "image_queue", "itm_head.weight")
    lacking = [k for k in need if k not in sd]
    if lacking:
        raise CheckpointError(f"not a Multi-SEA checkpoint: no {lacking} (keys start {sorted(sd)[:5]})")
    hidden, vision_width = (int(x) for x in sd["vision_proj_f.weight"].shape)
    conv = sd["visual_encoder.visual.conv1.weight"]
    block_key = re.compile(r"visual_encoder\.visual\.transformer\.resblocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in sd if (m := block_key.match(k))}
    layers = {int(m.group(1)) for k in sd if (m := _AFORMER_LAYER.match(k))}
    grid = round((sd["visual_encoder.visual.positional_embedding"].shape[0] - 1) ** 0.5)
    overrides: dict[str, Any] = {
        "hidden_size": hidden, "vision_width": vision_width, "patch_size": int(conv.shape[-1]),
        "image_size": grid * int(conv.shape[-1]), "vision_blocks": len(blocks),
        "num_layers": len(layers), "queue_size": int(sd["image_queue"].shape[1]),
        "mlp_ratio": int(sd["aformer.encoder.layers.0.text_expert.ffn.dense1.weight"].shape[0]) // hidden,
    }
    if "visual_encoder.token_embedding.weight" in sd:
        vocab, width = sd["visual_encoder.token_embedding.weight"].shape
        overrides.update(clip_text_vocab=int(vocab), clip_text_width=int(width),
                         clip_context_length=int(sd["visual_encoder.positional_embedding"].shape[0]))
    if "num_heads" in hp:
        overrides["num_heads"] = int(hp["num_heads"])
    if "top_k" in hp:
        overrides["top_k"] = int(hp["top_k"])
    state = {_rename(k): v for k, v in sd.items()}
    return overrides, state, list(UNUSED_OFFICIAL_KEYS)


# ------------------------------------------------------------------------------------ the authors' YAML

_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def _cast_numbers(value: Any) -> Any:
    """Number spellings left as text become numbers (YAML 1.1 readers keep ``1e-5`` as a string), and a
    parenthesised tuple of numbers (the YAML's ``betas: (0.9, 0.98)``, which ``main.py`` evaluates) a tuple."""
    if isinstance(value, Mapping):
        return {k: _cast_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_numbers(v) for v in value)
    if isinstance(value, str):
        s = value.strip()
        if _NUMBER.match(s):
            return float(s) if any(c in s for c in ".eE") else int(s)
        if s.startswith("(") and s.endswith(")"):
            try:
                parsed = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                return value
            if isinstance(parsed, tuple) and all(isinstance(v, (int, float)) for v in parsed):
                return tuple(float(v) for v in parsed)
    return value


def read_official_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The authors' run configuration as plain numbers: a YAML file (``retrieval_{coco,flickr30k}.yaml``,
    Lightning's ``hparams.yaml``) or a checkpoint's ``hyper_parameters`` (with or without its ``config`` key).

    Exponent floats (``init_lr: 1e-5``, ``eps: 1e-8``) are floats whichever YAML reader wrote the values:
    files are read with itmzoo's YAML loader (JSON number spellings, as the authors' ruamel.yaml reads
    them), and strings that spell a number in an already loaded mapping are cast.
    """
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Multi-SEA config: no file {path}")
        with open(path, encoding="utf-8") as f:
            data = yaml_load(f)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a YAML mapping of the authors' settings, got {type(data).__name__}")
    if isinstance(data.get("config"), Mapping):  # Lightning: hyper_parameters = {"config": {...}, ...}
        data = data["config"]
    return _cast_numbers(data)


def _number(cfg: Mapping[str, Any], key: str, kind: type) -> Any:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"Multi-SEA config: '{key}' must be a number, got {value!r}")
    return kind(value)


def official_overrides(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Map the authors' settings (`read_official_config`) to itmzoo's ``{"model": ..., "train": ...}`` fields.

    Only keys present are mapped; paths (``vit``, ``tokenizer`` folders, ``data_root``) are left to the caller.
    """
    cfg = read_official_config(config)
    model: dict[str, Any] = {}
    for src, dst, kind in (("hidden_size", "hidden_size", int), ("num_top_layer", "num_layers", int),
                           ("num_heads", "num_heads", int), ("mlp_ratio", "mlp_ratio", int),
                           ("drop_rate", "attn_dropout", float),  # upstream feeds it to the attention only
                           ("queue_size", "queue_size", int), ("top_k", "top_k", int)):
        if src in cfg:
            model[dst] = _number(cfg, src, kind)
    if "negative_all_rank" in cfg:
        model["negatives_all_ranks"] = bool(cfg["negative_all_rank"])
    image = cfg.get("image_encoder_config") or {}
    for key in ("image_size", "patch_size"):
        if key in image:
            model[key] = _number(image, key, int)
    text = cfg.get("text_encoder_config") or {}
    if "max_text_len" in text:
        model["max_text_len"] = _number(text, "max_text_len", int)
    if "tokenizer_name" in text:
        model["tokenizer"] = str(text["tokenizer_name"])

    train: dict[str, Any] = {}
    if "max_epoch" in cfg:
        train["epochs"] = _number(cfg, "max_epoch", int)
    if "batch_size" in cfg:
        train["batch_size"] = _number(cfg, "batch_size", int)
        if "per_gpu_batch_size" in cfg:  # main.py: batch_size // (per_gpu x devices x nodes)
            devices = cfg.get("devices", 1)
            n_dev = devices if isinstance(devices, int) else len(devices)
            per_step = _number(cfg, "per_gpu_batch_size", int) * max(1, n_dev) * int(cfg.get("num_nodes", 1))
            train["accum_steps"] = train["batch_size"] // per_step
            train["batch_size"] = train["accum_steps"] * per_step  # what one optimizer step really sees
    if "max_grad_norm" in cfg:
        train["grad_clip"] = _number(cfg, "max_grad_norm", float)
    if "num_cycles" in cfg:
        train["num_cycles"] = _number(cfg, "num_cycles", float)
    if "warmup_steps" in cfg:  # model_base.py: a float is a fraction of the schedule, an int a step count
        w = _number(cfg, "warmup_steps", type(cfg["warmup_steps"]))
        train.update({"warmup_ratio": w} if isinstance(w, float) else {"warmup_steps": w})
    opt = cfg.get("optimizer") or {}
    for src, dst in (("init_lr", "lr"), ("eps", "eps"), ("weight_decay", "weight_decay")):
        if src in opt:
            train[dst] = _number(opt, src, float)
    if "betas" in opt:
        betas = opt["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ConfigError(f"Multi-SEA config: 'optimizer.betas' must be two numbers, got {betas!r}")
        train["betas"] = tuple(float(b) for b in betas)
    return {"model": model, "train": train}


# -------------------------------------------------------------------------------------------- tags + names

_DRIVE = "Google Drive link in the README of " + UPSTREAM
_NOTE = ("the paper's tables were not available when this was written: expected metrics are unknown; "
         "read them from the released tensorboard logs. Published evaluation: top_k 64, fp32 here vs TF32 upstream")

TAGS: dict[str, Tag] = {
    "f30k": Tag(dataset="f30k", source=f"{_DRIVE} (Flickr30K checkpoint)", license="see upstream", note=_NOTE,
                preprocessing={"image": "clip, 224 px, Resize bicubic + CenterCrop, no augmentation",
                               "tokenizer": "roberta-base fast, padding max_length 40, truncation"}),
    "coco": Tag(dataset="coco", source=f"{_DRIVE} (MSCOCO checkpoint)", license="see upstream", note=_NOTE,
                preprocessing={"image": "clip, 224 px, Resize bicubic + CenterCrop, no augmentation",
                               "tokenizer": "roberta-base fast, padding max_length 40, truncation"}),
}

#: a tiny, fast configuration with random weights (the generic model tests build it offline)
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "multisea": {
        "hidden_size": 16, "num_layers": 2, "num_heads": 4, "num_agents": 8, "itm_layers": [1, 2],
        "image_size": 32, "patch_size": 16, "vision_width": 64, "vision_layers": 3, "vision_heads": 1,
        "vision_blocks": 2, "vision_trainable_blocks": 1, "clip_text_vocab": 10, "clip_text_width": 8,
        "clip_context_length": 4, "queue_size": 8, "top_k": 2, "max_text_len": 12,
        "text_overrides": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 64, "max_position_embeddings": 16},
    },
}


@register_model("multisea", config=MultiSEAConfig, input_kind="pixels", scoring="two-stage",
                paper="Multi-SEA: Multi-stage Semantic Enhancement and Aggregation for image-text retrieval (IPM 2025)",
                upstream=UPSTREAM, text_backbone="roberta-base", image_backbone="clip-vit-b16 (11 blocks)",
                tags=TAGS, converter=convert_official, tiny=TINY_OVERRIDES["multisea"])
def multisea(config: MultiSEAConfig) -> MultiSEA:
    """Multi-SEA with CLIP ViT-B/16 (11 blocks) and RoBERTa-base, two-stage scoring."""
    return MultiSEA(config)
