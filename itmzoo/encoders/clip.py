"""OpenAI CLIP (ViT image tower and causal text tower) with OpenAI's parameter names.

The state-dict keys are those of OpenAI's ``clip/model.py`` (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, ``ln_final``,
``text_projection``, ``logit_scale`` ...), so the methods' released checkpoints (ESL's CLIP branch,
Multi-SEA) and OpenAI's ``ViT-B-16.pt`` map onto this module with a plain prefix map.

Options the methods need (`CLIPConfig`):

* ``vision_blocks``: keep only the first N residual blocks of the image tower (Multi-SEA: 11 of 12).
* ``vision_output``: ``"cls_proj"`` = ``ln_post(x[:, 0]) @ proj`` (OpenAI, ESL) or ``"tokens"`` =
  ``ln_post`` on every token and no ``proj`` parameter (Multi-SEA: ``[B, 1 + grid^2, width]``).
* ``text_tower``: ``"full"`` (OpenAI), ``"embeddings"`` (only the unused ``token_embedding``,
  ``positional_embedding`` and ``ln_final`` that Multi-SEA keeps, frozen, in its state dict) or ``"none"``.
* ``attention``: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"eager"`` (explicit softmax,
  the reference the SDPA path is tested against).
* ``grad_checkpointing``: recompute every residual block in the backward pass (training only).

The text feature is the final-LayerNorm state at ``input_ids.argmax(-1)``, i.e. the EOT token (id
49407, the largest id), projected by ``text_projection``. When a caption longer than 77 tokens is cut
without keeping its EOT (ESL's tokenizer, ``CLIPTokenizer(truncate="cut")``), the argmax falls on the
largest remaining id, as upstream. Because the text attention is causal, padding a batch to fewer than
77 columns gives the same features as padding to 77.

LayerNorms compute in float32 and cast back (OpenAI's ``LayerNorm`` subclass); activations are QuickGELU
``x * sigmoid(1.702 x)``.

Why not timm: timm's ``VisionTransformer`` can convert OpenAI weights, but renames every key
(``blocks.N.attn.qkv``, ``norm_pre`` ...), has no CLIP text tower, and the methods' checkpoints use
OpenAI's names, so every converter would need a second map back. The blocks here are short, use
``F.scaled_dot_product_attention`` (the same fused kernels timm's fused attention calls) and
``torch.utils.checkpoint`` for gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, ModelConfig

__all__ = ["CLIP", "CLIPConfig", "CLIPVisionTransformer", "LayerNormFp32", "QuickGELU", "ResidualAttentionBlock",
           "Transformer", "clip_vit_b16_config"]


@dataclasses.dataclass
class CLIPConfig(ModelConfig):
    """Architecture of a CLIP model; the defaults are OpenAI's ViT-B/16."""

    embed_dim: int = 512  # output size of visual.proj and text_projection
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12  # blocks of the pretrained architecture
    vision_heads: int = 12
    vision_blocks: Optional[int] = None  # build only the first N blocks (None: all)
    vision_output: Literal["cls_proj", "tokens"] = "cls_proj"
    text_tower: Literal["full", "embeddings", "none"] = "full"
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    logit_scale: bool = True  # keep OpenAI's learned temperature parameter
    attention: Literal["sdpa", "eager"] = "sdpa"
    grad_checkpointing: bool = False

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"clip.image_size ({self.image_size}) must be a multiple of "
                              f"patch_size ({self.patch_size})")
        for w, h, name in ((self.vision_width, self.vision_heads, "vision"),
                           (self.text_width, self.text_heads, "text")):
            if w % h:
                raise ConfigError(f"clip.{name}_width ({w}) must be divisible by {name}_heads ({h})")
        if self.vision_blocks is not None and not 0 < self.vision_blocks <= self.vision_layers:
            raise ConfigError(f"clip.vision_blocks must lie in 1..{self.vision_layers}, got {self.vision_blocks}")

    @property
    def num_vision_blocks(self) -> int:
        return self.vision_layers if self.vision_blocks is None else self.vision_blocks

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def clip_vit_b16_config(**overrides) -> CLIPConfig:
    """OpenAI's ViT-B/16 with `overrides` applied (validated)."""
    cfg = dataclasses.replace(CLIPConfig(), **overrides)
    cfg.validate()
    return cfg


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (OpenAI CLIP's ``LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if x.dtype == torch.float64 else x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PackedAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s packed parameter names.

    ``in_proj_weight [3W, W]`` (q, k, v order), ``in_proj_bias [3W]``, ``out_proj``. The softmax runs
    through ``F.scaled_dot_product_attention`` or, for ``impl="eager"``, an explicit product.
    """

    def __init__(self, width: int, heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.heads, self.impl = heads, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's init
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(B, L, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.impl == "eager":
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            if causal:
                mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            out = scores.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + c_proj(QuickGELU(c_fc(ln_2(x))))``."""

    def __init__(self, width: int, heads: int, causal: bool = False, attention: str = "sdpa") -> None:
        super().__init__()
        self.causal = causal
        self.ln_1 = LayerNormFp32(width)
        self.attn = PackedAttention(width, heads, attention)
        self.ln_2 = LayerNormFp32(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks (``resblocks.N``) over ``[B, L, W]`` (batch first)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False, attention: str = "sdpa",
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, causal, attention) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """CLIP's image tower (``visual.*``): pixels ``[B, 3, H, W]`` -> ``[B, embed_dim]`` or tokens."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.vision_width
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid ** 2 + 1, w))
        self.ln_pre = LayerNormFp32(w)
        self.transformer = Transformer(w, cfg.num_vision_blocks, cfg.vision_heads, False, cfg.attention,
                                       cfg.grad_checkpointing)
        self.ln_post = LayerNormFp32(w)
        if cfg.vision_output == "cls_proj":
            self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))
        else:
            self.proj = None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        if x.shape[-2] * x.shape[-1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"CLIP image tower expects {self.cfg.image_size}x{self.cfg.image_size} pixels, got "
                             f"{tuple(pixels.shape[-2:])}")
        x = x.flatten(2).transpose(1, 2)  # [B, grid^2, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        if self.proj is None:
            return self.ln_post(x)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """OpenAI CLIP: ``visual`` tower plus the text tower at the top level, with OpenAI's key names."""

    def __init__(self, cfg: CLIPConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or CLIPConfig()
        cfg.validate()
        self.cfg = cfg
        self.visual = CLIPVisionTransformer(cfg)
        if cfg.text_tower != "none":
            self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
            self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
            self.ln_final = LayerNormFp32(cfg.text_width)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
        if cfg.text_tower == "full":
            self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, True, cfg.attention,
                                           cfg.grad_checkpointing)
            self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
            self._init_text()
        if cfg.logit_scale:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def _init_text(self) -> None:
        # OpenAI's initialize_parameters (text tower only; the image tower keeps module defaults)
        w, n = self.cfg.text_width, self.cfg.text_layers
        proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * n) ** -0.5), w ** -0.5, (2 * w) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute residual blocks in backward (both towers)."""
        for m in self.modules():
            if isinstance(m, Transformer):
                m.grad_checkpointing = enable

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, embed_dim]`` (``cls_proj``) or ``[B, 1 + grid^2, vision_width]`` (``tokens``)."""
        return self.visual(pixels)

    def encode_text(self, input_ids: torch.Tensor, return_tokens: bool = False):
        """EOT-pooled ``[B, embed_dim]``; with `return_tokens` also the ``ln_final`` states ``[B, L, text_width]``."""
        if self.cfg.text_tower != "full":
            raise RuntimeError(f"this CLIP was built with text_tower={self.cfg.text_tower!r}; it cannot encode text")
        L = input_ids.shape[1]
        if L > self.cfg.context_length:
            raise ValueError(f"CLIP text tower takes at most {self.cfg.context_length} tokens, got {L}")
        x = self.token_embedding(input_ids) + self.positional_embedding[:L].to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x))
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)] @ self.text_projection
        return (pooled, x) if return_tokens else pooled

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image features, text features)`` (unnormalised)."""
        return self.encode_image(pixels), self.encode_text(input_ids)


# -- key maps from other layouts of the same weights -----------------------------------------------

_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_HF_TOP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}


def openai_state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict renamed to OpenAI's keys.

    q/k/v projections are stacked into ``in_proj_*``, ``visual_projection.weight`` and
    ``text_projection.weight`` are transposed into ``visual.proj`` / ``text_projection``; the
    ``position_ids`` buffers are dropped. Unknown keys are kept unchanged, so a strict load names them.
    """
    import re

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    block = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t()
        elif k == "text_projection.weight":
            out["text_projection"] = v.t()
        elif (m := block.match(k)) is not None:
            tower, i, mod, kind = m.groups()
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind), {})[mod[-6]] = v
            elif mod in _HF_BLOCK:
                out[prefix + _HF_BLOCK[mod] + "." + kind] = v
            else:
                out[k] = v
        else:
            out[k] = v
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{prefix}: the checkpoint has only the {sorted(parts)} projections ({kind})")
        out[prefix + f"attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


_TIMM_SWAPS = (("blocks.", "transformer.resblocks."), ("norm1.", "ln_1."), ("norm2.", "ln_2."),
               ("attn.qkv.", "attn.in_proj_"), ("attn.proj.", "attn.out_proj."), ("mlp.fc1.", "mlp.c_fc."),
               ("mlp.fc2.", "mlp.c_proj."))


def openai_state_from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm CLIP image tower (``vit_base_patch16_clip_224.openai`` layout) renamed to OpenAI's ``visual.*`` keys.

    timm stores ``visual.proj`` as ``head.weight`` (transposed) with a zero ``head.bias``; a non-zero bias
    has no place in CLIP and is an error.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v.reshape(v.shape[-2], v.shape[-1])
        elif k == "patch_embed.proj.weight":
            out["visual.conv1.weight"] = v
        elif k.startswith("norm_pre."):
            out["visual.ln_pre." + k[len("norm_pre."):]] = v
        elif k.startswith("norm."):
            out["visual.ln_post." + k[len("norm."):]] = v
        elif k == "head.weight":
            out["visual.proj"] = v.t()
        elif k == "head.bias":
            if v.abs().max() > 0:
                raise ValueError("timm CLIP checkpoint has a non-zero head.bias; CLIP's projection has no bias")
        elif k.startswith("blocks."):
            for a, b in _TIMM_SWAPS:
                k = k.replace(a, b)
            out["visual." + k] = v
        else:
            out[k] = v
    return out


#: int entries of OpenAI's archives (``input_resolution``, ``context_length``, ``vocab_size``), not weights
OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def clip_layout(keys) -> str:
    """``"openai"`` (OpenAI / open_clip), ``"hf"`` (transformers) or ``"timm"``; ValueError otherwise."""
    keys = set(keys)
    if "visual.conv1.weight" in keys:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in keys:
        return "hf"
    if "patch_embed.proj.weight" in keys and "cls_token" in keys:
        return "timm"
    raise ValueError("not a CLIP checkpoint: none of visual.conv1.weight (OpenAI/open_clip), "
                     "vision_model.embeddings.patch_embedding.weight (transformers), patch_embed.proj.weight (timm)")


def to_openai_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported CLIP layout (prefixes ``module.`` / ``_orig_mod.`` stripped) in OpenAI's key names."""
    from ..checkpoints.safe import strip_prefixes

    state = strip_prefixes(state)
    layout = clip_layout(state)
    if layout == "hf":
        return openai_state_from_hf(state)
    if layout == "timm":
        return openai_state_from_timm(state)
    return {k: v for k, v in state.items() if k not in OPENAI_NON_WEIGHTS}


def unused_pretrained_keys(cfg: CLIPConfig, keys) -> list[str]:
    """Keys of a full CLIP checkpoint that `cfg` deliberately does not build (dropped blocks, proj, text tower)."""
    import re

    block = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
    out = []
    for k in keys:
        m = block.match(k)
        if m and int(m.group(1)) >= cfg.num_vision_blocks and int(m.group(1)) < cfg.vision_layers:
            out.append(k)
        elif k == "visual.proj" and cfg.vision_output == "tokens":
            out.append(k)
        elif k == "logit_scale" and not cfg.logit_scale:
            out.append(k)
        elif not k.startswith("visual.") and k != "logit_scale":
            text_keep = {"full": True, "none": False,
                         "embeddings": (k in ("token_embedding.weight", "positional_embedding")
                                        or k.startswith("ln_final."))}
            if not text_keep[cfg.text_tower]:
                out.append(k)
    return out


def load_clip_pretrained(model: CLIP, source, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Load CLIP weights from a local file or folder into `model`, strictly; return the keys left out on purpose.

    `source`: OpenAI's TorchScript ``ViT-B-16.pt`` (read as data, never run), an open_clip or timm
    safetensors/bin file, or a transformers CLIP folder. Keys the config does not build (blocks past
    ``vision_blocks``, ``visual.proj`` for token output, the text tower) are left out and returned; every
    other key must match by name and shape (fp16 archives are cast to the model's dtype).
    """
    from ..checkpoints.safe import CheckpointError, load_state_strict
    from .backbones import BackboneError, read_state_file

    if state is None:
        state = read_state_file(source)
    try:
        state = to_openai_state(state)
    except (ValueError, KeyError) as e:
        raise BackboneError(f"{source}: {e}") from None
    dropped = unused_pretrained_keys(model.cfg, state)
    drop = set(dropped)
    kept = {k: v for k, v in state.items() if k not in drop}
    try:
        load_state_strict(model, kept, source=str(source),
                          hint="the file holds a different CLIP architecture than the configured one")
    except CheckpointError as e:
        raise BackboneError(str(e)) from None
    return sorted(dropped)
