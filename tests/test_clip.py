"""OpenAI-named CLIP towers: key names, shapes, SDPA == eager, agreement with transformers' CLIP."""

import dataclasses

import pytest
import torch
from hf_utils import tiny_hf_clip_config

from itmzoo.config import ConfigError
from itmzoo.encoders.clip import CLIP, CLIPConfig, openai_state_from_hf

TINY = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=3, vision_heads=2,
            context_length=12, vocab_size=100, text_width=24, text_layers=2, text_heads=2)


def tiny(**kw) -> CLIP:
    torch.manual_seed(0)
    return CLIP(CLIPConfig(**{**TINY, **kw})).eval()


def ids_batch(lengths, L=12, vocab=100, seed=0):
    """SOT (vocab-3) + random words + EOT (vocab-1, the largest id) + zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, 0] = vocab - 3
        ids[r, 1:n - 1] = torch.randint(1, vocab - 3, (n - 2,), generator=g)
        ids[r, n - 1] = vocab - 1
    return ids


def test_full_vit_b16_has_openai_names_and_parameter_count():
    with torch.device("meta"):
        model = CLIP(CLIPConfig())
    keys = model.state_dict().keys()
    # OpenAI's ViT-B-16 state dict, less its three int entries (input_resolution, context_length, vocab_size)
    assert sum(p.numel() for p in model.parameters()) == 149_620_737
    for k in ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
              "visual.transformer.resblocks.11.attn.in_proj_weight",
              "visual.transformer.resblocks.11.attn.in_proj_bias",
              "visual.transformer.resblocks.0.attn.out_proj.weight", "visual.transformer.resblocks.0.ln_1.bias",
              "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.0.mlp.c_proj.bias",
              "visual.transformer.resblocks.0.ln_2.weight", "visual.ln_post.weight", "visual.proj",
              "token_embedding.weight", "positional_embedding", "transformer.resblocks.11.attn.in_proj_weight",
              "ln_final.weight", "text_projection", "logit_scale"]:
        assert k in keys, k
    assert len(keys) == 302  # 2 x 12 blocks x 12 tensors + 14 others
    sd = model.state_dict()
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (2304, 768)
    assert sd["visual.proj"].shape == (768, 512) and sd["text_projection"].shape == (512, 512)
    assert sd["visual.positional_embedding"].shape == (197, 768)


def test_multisea_options_11_blocks_tokens_and_text_leftovers():
    model = tiny(vision_blocks=2, vision_output="tokens", text_tower="embeddings", logit_scale=False)
    keys = set(model.state_dict())
    assert "visual.proj" not in keys and "visual.transformer.resblocks.2.ln_1.weight" not in keys
    assert "visual.transformer.resblocks.1.ln_1.weight" in keys
    assert {k for k in keys if not k.startswith("visual.")} == {
        "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    out = model.encode_image(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 1 + 16, 32)
    # ln_post on every token: each token is normalised (LayerNorm weights at init: 1, 0)
    assert torch.allclose(out.mean(-1), torch.zeros(3, 17), atol=1e-5)
    with pytest.raises(RuntimeError, match="text_tower='embeddings'"):
        model.encode_text(ids_batch([5]))
    with pytest.raises(ConfigError, match="vision_blocks"):
        CLIP(CLIPConfig(**{**TINY, "vision_blocks": 4}))


def test_shapes_and_bad_inputs():
    model = tiny()
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert model.encode_text(ids_batch([4, 12])).shape == (2, 16)
    _, tokens = model.encode_text(ids_batch([4, 7]), return_tokens=True)
    assert tokens.shape == (2, 12, 24)
    with pytest.raises(ValueError, match="32x32 pixels"):
        model.encode_image(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="at most 12 tokens"):
        model.encode_text(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_equals_eager(seed):
    """At init scale both paths agree within 1e-5 (measured <= 1.5e-6); with 3x weights (outputs ~30) float32
    itself drifts ~1e-4 from float64, and SDPA stays as close to float64 as the eager path (measured)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    ids = ids_batch([3, 12, 5, 8], seed=seed)
    for scale in (1.0, 3.0):
        sdpa = tiny()
        with torch.no_grad():
            for p in sdpa.parameters():
                p.mul_(scale)
        eager = CLIP(dataclasses.replace(sdpa.cfg, attention="eager")).eval()
        eager.load_state_dict(sdpa.state_dict())
        ref = CLIP(dataclasses.replace(sdpa.cfg, attention="eager")).double().eval()
        ref.load_state_dict(sdpa.state_dict())
        with torch.no_grad():
            outs = zip(sdpa(pixels, ids), eager(pixels, ids), ref(pixels.double(), ids))
        for a, b, r in outs:
            if scale == 1.0:
                assert (a - b).abs().max().item() < 1e-5
            err_sdpa, err_eager = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
            assert err_sdpa <= 2 * err_eager + 1e-6, (err_sdpa, err_eager)


def test_causal_text_ignores_padding_width_and_pools_eot():
    model = tiny()
    ids = ids_batch([3, 6, 5], L=12)
    full = model.encode_text(ids)
    short = model.encode_text(ids[:, :6])  # padded to the longest caption only
    assert torch.allclose(full, short, atol=1e-6)
    _, tokens = model.encode_text(ids, return_tokens=True)
    eot = torch.tensor([2, 5, 4])
    assert torch.allclose(full, tokens[torch.arange(3), eot] @ model.text_projection, atol=1e-6)


def test_cut_truncation_pools_the_largest_remaining_id():
    """ESL's tokenizer cuts long captions to 77 tokens without an EOT: argmax then picks the largest id."""
    from itmzoo.data.tokenizers import CLIPTokenizer

    long_caption = "a dog " * 60 + "zebra"
    cut = CLIPTokenizer(truncate="cut")([long_caption, "a cat"])
    eot = CLIPTokenizer(truncate="eot")([long_caption])
    assert cut["input_ids"].shape == (2, 77)
    assert 49407 not in cut["input_ids"][0].tolist() and eot["input_ids"][0, 76] == 49407
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**{**TINY, "context_length": 77, "vocab_size": 49408})).eval()
    pooled, tokens = model.encode_text(cut["input_ids"], return_tokens=True)
    pos = cut["input_ids"][0].argmax().item()
    assert cut["input_ids"][0, pos] == cut["input_ids"][0].max() and pos < 76
    assert torch.allclose(pooled[0], tokens[0, pos] @ model.text_projection, atol=1e-6)
    assert not torch.allclose(pooled[0], model.encode_text(eot["input_ids"])[0], atol=1e-4)


def test_grad_checkpointing_same_values_and_grads():
    a = tiny().train()
    b = CLIP(dataclasses.replace(a.cfg, grad_checkpointing=True)).train()
    b.load_state_dict(a.state_dict())
    pixels, ids = torch.randn(2, 3, 32, 32), ids_batch([4, 9])
    for m in (a, b):
        img, txt = m(pixels, ids)
        (img.square().sum() + txt.sum() + m.logit_scale).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_matches_transformers_clip_through_the_key_map():
    """transformers' CLIPModel (an independent implementation) with the same weights gives the same features."""
    from transformers import CLIPModel

    cfg = tiny_hf_clip_config()
    torch.manual_seed(0)
    hf = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ours = CLIP(CLIPConfig(**TINY)).eval()
    ours.load_state_dict(openai_state_from_hf(hf.state_dict()), strict=True)
    pixels, ids = torch.randn(3, 3, 32, 32), ids_batch([3, 12, 7])
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=pixels)
        ref_txt = hf.get_text_features(input_ids=ids)
        ref_img = getattr(ref_img, "pooler_output", ref_img)
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
        img, txt = ours(pixels, ids)
    assert (img - ref_img).abs().max().item() < 1e-5
    assert (txt - ref_txt).abs().max().item() < 1e-5


def test_config_json_round_trip_and_validation():
    cfg = CLIPConfig(vision_blocks=11, vision_output="tokens", text_tower="embeddings")
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="vision_output"):
        CLIPConfig.from_dict({**cfg.to_dict(), "vision_output": "pooled"})
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        CLIP(CLIPConfig(image_size=30))
