"""Backbone architectures are described offline and match the published parameter counts."""

import pytest
import torch

from itmzoo.encoders.backbones import BackboneError, hf_config, load_pretrained_weights

# parameter counts of the hub checkpoints (HF model classes, pooler included where the class has one)
EXPECTED = {
    "bert-base-uncased": 109_482_240,
    "roberta-base": 124_645_632,
    "vit-base-patch16-224": 86_389_248,
    "clip-vit-base-patch16": 149_620_737,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_architecture_parameter_count(name):
    from transformers import AutoModel, CLIPModel

    cfg = hf_config(name)
    with torch.device("meta"):  # no memory, no weights, no network
        model = CLIPModel(cfg) if name.startswith("clip") else AutoModel.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name]


def test_overrides_and_unknown_names():
    cfg = hf_config("bert-base-uncased", {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2})
    assert cfg.num_hidden_layers == 2 and cfg.vocab_size == 30522
    clip = hf_config("clip-vit-base-patch16", {"vision_config": {"num_hidden_layers": 1}})
    assert clip.vision_config.num_hidden_layers == 1 and clip.vision_config.patch_size == 16
    with pytest.raises(BackboneError, match="unknown backbone"):
        hf_config("bert-huge")


def test_unreachable_pretrained_source_is_a_clear_error(tmp_path):
    from transformers import BertModel

    tiny = BertModel(hf_config("bert-base-uncased", {"num_hidden_layers": 1, "hidden_size": 8,
                                                      "num_attention_heads": 1, "intermediate_size": 8,
                                                      "vocab_size": 10}))
    with pytest.raises(BackboneError, match="cannot load pretrained weights"):
        load_pretrained_weights(tiny, "no-such-org/no-such-model-xyz")
