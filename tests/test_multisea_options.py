"""Multi-SEA: the authors' YAML settings, the faithful step count per epoch and caption de-duplication."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from itmzoo.config import ConfigError, apply_overrides, load_run_config
from itmzoo.data.split import RetrievalSplit
from itmzoo.data.synthetic import SyntheticShapes
from itmzoo.eval import evaluate
from itmzoo.eval.recall import METRIC_KEYS
from itmzoo.losses import sample_hard_negatives
from itmzoo.models.multisea import (
    TINY_OVERRIDES,
    MultiSEA,
    MultiSEAConfig,
    convert_official,
    official_overrides,
    read_official_config,
)
from itmzoo.train import fit
from itmzoo.train.config import TrainConfig
from itmzoo.train.data import ResumableBatchSampler
from itmzoo.train.engine import steps_per_epoch

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


# ------------------------------------------------------------------------- steps per epoch, 1-image batches

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name, images, steps", [("coco", 113_287, 227), ("f30k", 30_014, 60)])
def test_paper_configs_give_upstreams_optimizer_steps_per_epoch(name: str, images: int, steps: int) -> None:
    """Upstream: DataLoader(drop_last=True) of 20, and Lightning steps on the incomplete window of 25."""
    run = load_run_config(ROOT / "configs" / f"multisea_{name}.yaml")
    cfg = TrainConfig.from_dict(run["train"])
    micro = cfg.batch_size // cfg.accum_steps
    batches = ResumableBatchSampler(images, micro, drop_last=cfg.drop_last).batches_per_epoch
    assert (micro, batches) == (20, images // 20)
    assert steps_per_epoch(cfg, batches) == steps
    assert cfg.schedule_steps == batches * cfg.epochs // cfg.accum_steps  # upstream's max_steps (floor)


def test_sampling_leaves_rows_without_a_candidate_out() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.3, 0.7], [0.5, 0.0, 0.5]])
    with pytest.raises(ValueError, match=r"rows \[0\] have no candidate"):
        sample_hard_negatives(w)
    got = sample_hard_negatives(w, torch.Generator().manual_seed(3), allow_empty=True)
    assert got[0] == -1
    assert got[1:].tolist() == sample_hard_negatives(w[1:], torch.Generator().manual_seed(3)).tolist()


def tiny(**kw) -> MultiSEA:
    torch.manual_seed(0)
    return MultiSEA(apply_overrides(MultiSEAConfig(), {**TINY_OVERRIDES["multisea"], **kw}))


def one_image_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    return {"pixels": torch.randn(1, 3, 32, 32, generator=g), "input_ids": torch.randint(3, 100, (1, 12), generator=g),
            "attention_mask": mask, "lengths": mask.sum(1), "image_index": torch.tensor([4])}


def test_a_one_image_micro_batch_trains_on_its_positive_pair() -> None:
    model = tiny()
    model.train()
    out = model(one_image_batch())
    assert out["neg_image_for_text"].tolist() == [-1] and out["neg_text_for_image"].tolist() == [-1]
    assert torch.isfinite(out["loss"]) and out["itm"] > 0
    out["loss"].backward()
    assert model.itm_head.weight.grad.abs().sum() > 0  # ITM on the positive pair still trains
    assert model.text_proj_f.weight.grad.abs().sum() > 0  # and so does ITC (queue negatives)
    with pytest.raises(ValueError, match="no candidate with another image id"):
        tiny(missing_negative="error").train()(one_image_batch())


def test_an_epoch_ending_in_a_one_image_micro_batch_trains_through_the_trainer() -> None:
    """5 images in micro-batches of 2 (drop_last false): windows [2, 2] and [1]; both steps train."""
    tok = ROOT / "configs" / "vocab" / "multisea_synthetic_tokenizer"
    split = SyntheticShapes({"train": 5}, seed=0, image_size=32).split("train", "pixels")
    model = tiny(tokenizer=str(tok), max_text_len=24,
                 text_overrides={**TINY_OVERRIDES["multisea"]["text_overrides"], "vocab_size": 74,
                                 "max_position_embeddings": 32})
    before = model.itm_head.weight.detach().clone()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0]["image_index"])))
    result = fit(model, split, {"epochs": 1, "batch_size": 4, "accum_steps": 2, "drop_last": False,
                                "optimizer": "adamw", "lr": 1e-3, "progress": False, "log_every": 1})
    assert seen == [2, 2, 1] and result.steps == 2  # epoch over images: one random caption each
    assert math.isfinite(result.history[0]["train_loss"])
    assert not torch.equal(model.itm_head.weight, before)


# --------------------------------------------------------------------------------- caption de-duplication

def dup_split() -> RetrievalSplit:
    """3 pictures; image 0 has 'a red square' twice, image 2 'a blue disc' three times (interleaved)."""
    base = SyntheticShapes({"test": 3}, seed=0, image_size=32).split("test", "pixels").subset([0, 1, 2])
    caps = ["a red square", "a small red square", "a green ring", "a red square", "a blue disc",
            "a green ring at the top", "a blue disc", "a big blue disc", "a blue disc"]
    return RetrievalSplit(images=base.images, captions=caps, caption_to_image=[0, 0, 1, 0, 2, 1, 2, 2, 2],
                          kind="pixels", name="dups")


def test_dedup_stable_keeps_first_occurrences_in_order() -> None:
    d = dup_split().dedup_captions("stable")
    assert d.captions == ["a red square", "a small red square", "a green ring", "a blue disc",
                          "a green ring at the top", "a big blue disc"]
    assert d.caption_to_image.tolist() == [0, 0, 1, 2, 1, 2]
    assert dup_split().dedup_captions("stable").captions == d.captions  # deterministic


def test_dedup_hash_order_is_upstreams_list_set_per_image() -> None:
    s = dup_split()
    d = s.dedup_captions("hash_order")
    per_image = [[c for c, i in zip(s.captions, s.caption_to_image) if i == k] for k in range(3)]
    assert d.captions == [c for texts in per_image for c in list(set(texts))]
    assert d.caption_to_image.tolist() == [0, 0, 1, 1, 2, 2]
    stable = s.dedup_captions("stable")
    for k in range(3):  # the same captions per image, only the order may differ
        assert sorted(np.asarray(d.captions)[d.caption_to_image == k]) == \
            sorted(np.asarray(stable.captions)[stable.caption_to_image == k])
    with pytest.raises(ValueError, match="order must be 'stable' or 'hash_order'"):
        s.dedup_captions("sorted")


def test_evaluation_dedups_by_option_or_model_setting() -> None:
    tok = ROOT / "configs" / "vocab" / "multisea_synthetic_tokenizer"
    model = tiny(tokenizer=str(tok), max_text_len=24,
                 text_overrides={**TINY_OVERRIDES["multisea"]["text_overrides"], "vocab_size": 74,
                                 "max_position_embeddings": 32}).eval()
    opts = {"progress": False, "rerank_k": 9, "return_sims": True}  # k >= captions: no -100 ties
    split = dup_split()
    kept = evaluate(model, split, "full", **opts)
    assert kept["sims"].i2t.shape == (3, 9) and "dedup_captions" not in kept
    stable = evaluate(model, split, "full", dedup_captions="stable", **opts)
    direct = evaluate(model, split.dedup_captions("stable"), "full", **opts)
    assert stable["dedup_captions"] == {"captions_before": 9, "captions": 6}
    assert torch.equal(torch.as_tensor(stable["sims"].i2t), torch.as_tensor(direct["sims"].i2t))
    model.config.eval_dedup = "hash_order"  # the model's setting applies when the option is left out
    hashed = evaluate(model, split, "full", **opts)
    assert hashed["dedup_captions"]["captions"] == 6
    for key in METRIC_KEYS:  # caption order does not change the metrics (no ties with k >= captions)
        assert hashed[key] == pytest.approx(stable[key]), key
    assert evaluate(model, split, "full", dedup_captions="none", **opts)["sims"].i2t.shape == (3, 9)
