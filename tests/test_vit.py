"""HF ViT built offline: both transformers key layouts load strictly; SDPA == eager."""

import pytest
import torch

from itmzoo.encoders.vit import (
    _rename_layer_key,
    build_vit,
    vit_key_layout,
    vit_state_for,
)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 8}


def tiny(attention="sdpa"):
    torch.manual_seed(0)
    return build_vit(TINY, attention=attention).eval()


def test_full_size_architecture_on_meta():
    with torch.device("meta"):
        model = build_vit()
    assert sum(p.numel() for p in model.parameters()) == 86_389_248  # pooler included
    assert model.config.layer_norm_eps == 1e-12 and model.config.hidden_act == "gelu"


def test_v4_names_map_onto_the_installed_layout_and_back():
    model = tiny()
    state = model.state_dict()
    installed = vit_key_layout(state)
    other = "v4" if installed == "v5" else "v5"
    renamed = {_rename_layer_key(k, other): v for k, v in state.items()}
    assert vit_key_layout(renamed) == other
    v4 = renamed if other == "v4" else state
    # the transformers 4.x names SCTA's checkpoints carry
    for k in ["encoder.layer.0.attention.attention.query.weight", "encoder.layer.1.attention.attention.value.bias",
              "encoder.layer.0.attention.output.dense.weight", "encoder.layer.0.intermediate.dense.bias",
              "encoder.layer.1.output.dense.weight", "encoder.layer.1.layernorm_after.bias", "pooler.dense.weight"]:
        assert k in v4, k
    fresh = build_vit(TINY).eval()
    fresh.load_state_dict(vit_state_for(fresh, {"vit." + k: v for k, v in renamed.items()}), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_equals_eager(seed):
    sdpa, eager = tiny("sdpa"), tiny("eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = sdpa(pixel_values=x), eager(pixel_values=x)
    assert a.last_hidden_state.shape == (3, 17, 32)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() < 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["bert-base-uncased", "roberta-base"])
def test_hf_text_sdpa_equals_eager_with_padding(arch):
    """BERT / RoBERTa (Multi-SEA's text tower, pooler included) through the HF path: SDPA == eager."""
    from itmzoo.encoders.hf_text import build_hf_text_model

    tiny = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
            "vocab_size": 60, "max_position_embeddings": 44}
    torch.manual_seed(0)
    sdpa = build_hf_text_model(arch, tiny, attention="sdpa").eval()
    eager = build_hf_text_model(arch, tiny, attention="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert "pooler.dense.weight" in sdpa.state_dict()
    ids = torch.randint(3, 60, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 5:] = 0  # long padding (Multi-SEA pads every caption to 40)
    mask[2, 30:] = 0
    with torch.no_grad():
        a, b = sdpa(input_ids=ids, attention_mask=mask), eager(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    assert (a.last_hidden_state - b.last_hidden_state)[valid].abs().max().item() < 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max().item() < 1e-5
