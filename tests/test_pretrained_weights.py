"""Strict local pretrained loading: TorchScript archives read as data, HF / timm / open_clip files, clear errors."""

import dataclasses
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from hf_utils import tiny_hf_clip_config

from itmzoo.checkpoints.safe import CheckpointError
from itmzoo.checkpoints.torchscript import read_torchscript_state
from itmzoo.encoders.backbones import (
    BackboneError,
    hf_config,
    load_pretrained_weights,
    read_state_file,
)
from itmzoo.encoders.clip import CLIP, CLIPConfig, load_clip_pretrained

TINY = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=3, vision_heads=2,
            context_length=12, vocab_size=100, text_width=24, text_layers=2, text_heads=2)
MULTISEA = dict(vision_blocks=2, vision_output="tokens", text_tower="embeddings", logit_scale=False)


def tiny_clip(**kw) -> CLIP:
    return CLIP(CLIPConfig(**{**TINY, **kw})).eval()


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory):
    """A TorchScript archive laid out like OpenAI's: OpenAI names, fp16 weights, three int entries."""
    torch.manual_seed(0)
    model = tiny_clip()
    for name, value in (("input_resolution", 32), ("context_length", 12), ("vocab_size", 100)):
        model.register_buffer(name, torch.tensor(value))
    pixels, ids = torch.randn(1, 3, 32, 32), torch.zeros(1, 12, dtype=torch.long)
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated; it only writes the test archive here
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (pixels, ids), check_trace=False).half()
        torch.jit.save(traced, str(path))
    return path


def test_torchscript_state_equals_jit_load_without_running_code(openai_archive):
    state = read_torchscript_state(openai_archive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.jit.load(str(openai_archive)).state_dict()
    assert list(state) == list(ref)
    for k in ref:
        assert state[k].dtype == ref[k].dtype and torch.equal(state[k], ref[k]), k
    assert state["visual.conv1.weight"].dtype == torch.float16 and state["input_resolution"].item() == 32


def test_openai_archive_loads_strictly_full_and_multisea(openai_archive):
    state = read_torchscript_state(openai_archive)
    full = tiny_clip()
    assert load_clip_pretrained(full, openai_archive) == []
    for k, v in full.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k].float()), k
    part = tiny_clip(**MULTISEA)
    dropped = load_clip_pretrained(part, openai_archive)
    assert "visual.transformer.resblocks.2.attn.in_proj_weight" in dropped and "visual.proj" in dropped
    assert "transformer.resblocks.0.ln_1.weight" in dropped and "text_projection" in dropped
    assert "logit_scale" in dropped and "token_embedding.weight" not in dropped
    assert torch.equal(part.visual.transformer.resblocks[1].mlp.c_fc.weight,
                       state["visual.transformer.resblocks.1.mlp.c_fc.weight"].float())


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": os.system}))
        z.writestr("evil/code/__torch__/m.py", "class M(Module):\n  __parameters__ = []\n")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|nt)\.system"):
        read_torchscript_state(path)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match="not a TorchScript archive"):
        read_torchscript_state(plain)
    assert torch.equal(read_state_file(plain)["w"], torch.ones(2))  # plain torch.save files: weights_only


def test_wrong_architecture_and_missing_file_are_one_line_errors(openai_archive, tmp_path):
    wider = CLIP(CLIPConfig(**{**TINY, "vision_width": 64})).eval()
    with pytest.raises(BackboneError, match=r"shape mismatches \['visual.class_embedding") as e:
        load_clip_pretrained(wider, openai_archive)
    assert "\n" not in str(e.value) and "different CLIP architecture" in str(e.value)
    deeper = CLIP(CLIPConfig(**{**TINY, "vision_layers": 4})).eval()
    with pytest.raises(BackboneError, match=r"missing keys \['visual.transformer.resblocks.3"):
        load_clip_pretrained(deeper, openai_archive)
    with pytest.raises(BackboneError, match="not found"):
        load_clip_pretrained(tiny_clip(), tmp_path / "ViT-B-16.pt")
    with pytest.raises(BackboneError, match="no weights file"):
        load_clip_pretrained(tiny_clip(), tmp_path)
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(BackboneError, match="not a CLIP checkpoint"):
        load_clip_pretrained(tiny_clip(), tmp_path / "x.safetensors")


def test_transformers_clip_folder(tmp_path):
    from transformers import CLIPModel

    cfg = tiny_hf_clip_config()
    torch.manual_seed(1)
    hf = CLIPModel(cfg).eval()
    hf.save_pretrained(tmp_path / "clip")
    ours = tiny_clip()
    assert load_clip_pretrained(ours, tmp_path / "clip") == []
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixels)
        ref = getattr(ref, "pooler_output", ref)
        assert (ours.encode_image(pixels) - ref).abs().max() < 1e-5


def test_timm_and_open_clip_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    tm = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=32, patch_size=8,
                           embed_dim=32, depth=3, num_heads=2, num_classes=16).eval()
    with torch.no_grad():
        tm.head.bias.zero_()
        for n, p in tm.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / "model.safetensors"))
    vision = tiny_clip(text_tower="none", logit_scale=False)
    assert load_clip_pretrained(vision, tmp_path) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (vision.encode_image(x) - tm(x)).abs().max() < 1e-5
    # open_clip stores OpenAI's names, here behind DataParallel's prefix
    src = tiny_clip()
    save_file({"module." + k: v for k, v in src.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    dst = tiny_clip()
    load_clip_pretrained(dst, tmp_path / "open_clip_model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def _tiny_hf(arch, **kw):
    return hf_config(arch, {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                            "intermediate_size": 32, **kw})


def test_hf_text_folders_load_strictly_and_name_every_key(tmp_path):
    from transformers import RobertaForMaskedLM, RobertaModel

    cfg = _tiny_hf("roberta-base", vocab_size=60, max_position_embeddings=20)
    torch.manual_seed(0)
    mlm = RobertaForMaskedLM(cfg)
    mlm.save_pretrained(tmp_path / "roberta")
    model = RobertaModel(cfg)
    # the hub roberta-base is an MLM checkpoint without pooler weights: refused unless allowed
    with pytest.raises(BackboneError, match=r"missing \['pooler.dense.bias', 'pooler.dense.weight'\]"):
        load_pretrained_weights(model, str(tmp_path / "roberta"))
    report = load_pretrained_weights(model, str(tmp_path / "roberta"), allow_missing=("pooler.*",))
    assert report.missing_initialised == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "lm_head.dense.weight" in report.unexpected_dropped
    assert torch.equal(model.embeddings.word_embeddings.weight, mlm.roberta.embeddings.word_embeddings.weight)
    two_layers = RobertaModel(_tiny_hf("roberta-base", vocab_size=60, max_position_embeddings=20,
                                       num_hidden_layers=2))
    with pytest.raises(BackboneError, match=r"missing keys \['encoder.layer.1"):
        load_pretrained_weights(two_layers, str(tmp_path / "roberta"), allow_missing=("pooler.*",))
    with pytest.raises(BackboneError, match="not found"):
        load_pretrained_weights(model, str(tmp_path / "nothing" / "here"))


def test_hf_vit_folder_loads_strictly(tmp_path):
    from itmzoo.encoders.vit import build_vit

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 32, "patch_size": 8}
    torch.manual_seed(3)
    src = build_vit(tiny)
    src.save_pretrained(tmp_path / "vit")
    dst = build_vit(tiny)
    report = load_pretrained_weights(dst, str(tmp_path / "vit"))
    assert report.missing_initialised == [] and report.unexpected_dropped == []
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_frozen_globs_keep_weights_bit_identical(openai_archive):
    """Multi-SEA trains only the last blocks and ln_post; AdamW with decay must leave the rest untouched."""
    from itmzoo.train.config import TrainConfig
    from itmzoo.train.optim import apply_freeze, build_optimizer

    model = tiny_clip(**MULTISEA).train()
    load_clip_pretrained(model, openai_archive)
    freeze = ["visual.conv1.*", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.*",
              "visual.transformer.resblocks.[0-0].*", "token_embedding.*", "positional_embedding", "ln_final.*"]
    frozen = apply_freeze(model, freeze)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in frozen and "ln_final.weight" in frozen
    assert not any(n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.")) for n in frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, dataclasses.replace(TrainConfig(), optimizer="adamw", lr=1e-2, weight_decay=0.1,
                                                     freeze=freeze))
    for _ in range(3):
        loss = model.encode_image(torch.randn(2, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))), k
