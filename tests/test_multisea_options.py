"""Multi-SEA: the authors' YAML settings, the faithful step count per epoch and caption de-duplication."""

from __future__ import annotations

import pytest
import torch
import yaml

from itmzoo.config import ConfigError, apply_overrides
from itmzoo.models.multisea import (
    MultiSEAConfig,
    convert_official,
    official_overrides,
    read_official_config,
)
from itmzoo.train.config import TrainConfig

# the settings of the authors' retrieval_coco.yaml that matter here (same spellings)
AUTHORS_YAML = """\
top_k: 64
queue_size: 1000
negative_all_rank: True
devices: [0]
batch_size: 500
per_gpu_batch_size: 20
num_nodes: 1
max_grad_norm: 1.
max_epoch: 200
warmup_steps: 0.15
image_encoder_config:
  image_size: 224
  patch_size: 16
text_encoder_config:
  tokenizer_name: 'roberta-base'
  max_text_len: 40
num_top_layer: 4
hidden_size: 768
num_heads: 12
mlp_ratio: 4
drop_rate: 0.1 # dropout
optimizer:
  optim_type: 'adamw'
  init_lr: 1e-5
  eps: 1e-8
  betas: (0.9, 0.98)
  weight_decay: 0.05
scheduler: 'cosine'
num_cycles: 0.3
"""


def test_authors_yaml_reads_exponent_floats_as_floats(tmp_path) -> None:
    assert yaml.safe_load(AUTHORS_YAML)["optimizer"]["init_lr"] == "1e-5"  # the YAML 1.1 trap
    path = tmp_path / "retrieval_coco.yaml"
    path.write_text(AUTHORS_YAML)
    cfg = read_official_config(path)
    opt = cfg["optimizer"]
    assert type(opt["init_lr"]) is float and opt["init_lr"] == 1e-5
    assert type(opt["eps"]) is float and opt["eps"] == 1e-8
    assert opt["betas"] == (0.9, 0.98)  # main.py evaluates this string
    over = official_overrides(cfg)
    assert over["model"] == {"hidden_size": 768, "num_layers": 4, "num_heads": 12, "mlp_ratio": 4,
                             "attn_dropout": 0.1, "queue_size": 1000, "top_k": 64, "negatives_all_ranks": True,
                             "image_size": 224, "patch_size": 16, "max_text_len": 40, "tokenizer": "roberta-base"}
    assert over["train"] == {"epochs": 200, "batch_size": 500, "accum_steps": 25, "grad_clip": 1.0,
                             "num_cycles": 0.3, "warmup_ratio": 0.15, "lr": 1e-5, "eps": 1e-8,
                             "weight_decay": 0.05, "betas": (0.9, 0.98)}
    # the overrides are valid itmzoo settings
    assert apply_overrides(MultiSEAConfig(), over["model"]).top_k == 64
    assert apply_overrides(TrainConfig(), over["train"]).lr == 1e-5


def test_checkpoint_hparams_read_through_a_yaml_11_reader_are_cast() -> None:
    """A checkpoint whose hyper_parameters came from PyYAML holds '1e-5' and '64'-like strings."""
    hp = {"config": {**yaml.safe_load(AUTHORS_YAML), "top_k": "16", "num_heads": "4"}, "cur_alpha": 0.4}
    cfg = read_official_config(hp)
    assert cfg["optimizer"]["init_lr"] == 1e-5 and cfg["top_k"] == 16
    sd = {"vision_proj_f.weight": torch.zeros(8, 8), "visual_encoder.visual.conv1.weight": torch.zeros(8, 3, 4, 4),
          "visual_encoder.visual.positional_embedding": torch.zeros(5, 8), "image_queue": torch.zeros(8, 6),
          "itm_head.weight": torch.zeros(2, 8),
          "aformer.encoder.layers.0.text_expert.ffn.dense1.weight": torch.zeros(32, 8)}
    overrides, _, _ = convert_official({"state_dict": sd, "hyper_parameters": hp})
    assert overrides["top_k"] == 16 and overrides["num_heads"] == 4


def test_authors_yaml_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no file"):
        read_official_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="'top_k' must be a number"):
        official_overrides({"top_k": "sixty-four"})
    with pytest.raises(ConfigError, match="betas"):
        official_overrides({"optimizer": {"betas": "(0.9)"}})
