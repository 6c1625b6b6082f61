"""itmzoo's CLIP against the authors' (openai/CLIP) outputs and gradients, stored in tests/fixtures/clip."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from itmzoo.encoders.clip import CLIP, CLIPConfig, load_clip_pretrained

FIX = Path(__file__).parent / "fixtures" / "clip"


@pytest.fixture(scope="module")
def fixture():
    meta = json.loads((FIX / "clip_parity.json").read_text())
    with np.load(FIX / "clip_parity.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def config(arch: dict, attention: str) -> CLIPConfig:
    return CLIPConfig(embed_dim=arch["embed_dim"], image_size=arch["image_resolution"],
                      patch_size=arch["vision_patch_size"], vision_width=arch["vision_width"],
                      vision_layers=arch["vision_layers"], vision_heads=arch["vision_width"] // 64,
                      context_length=arch["context_length"], vocab_size=arch["vocab_size"],
                      text_width=arch["transformer_width"], text_layers=arch["transformer_layers"],
                      text_heads=arch["transformer_heads"], attention=attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["s1", "s2"])
def test_outputs_and_gradients_match_openai_clip(fixture, case, attention):
    meta, a = fixture
    scale = meta["cases"][case]["weight_scale"]
    state = {k[2:]: torch.from_numpy(v.astype(np.float32)) * scale for k, v in a.items() if k.startswith("w/")}
    model = CLIP(config(meta["arch"], attention)).eval()
    assert load_clip_pretrained(model, "fixture", state=state) == []
    pixels = torch.from_numpy(a[f"{case}/pixels"]).requires_grad_(True)
    ids = torch.from_numpy(a[f"{case}/ids"])
    assert 119 not in ids[-1].tolist()  # the cut caption without EOT is part of the fixture
    img = model.encode_image(pixels)
    txt = model.encode_text(ids)
    # upstream CLIP.forward: plain division by the norm, logit_scale.exp()
    logits = model.logit_scale.exp() * (img / img.norm(dim=1, keepdim=True)) @ (txt / txt.norm(dim=1, keepdim=True)).t()
    loss = ((img * torch.from_numpy(a[f"{case}/r_img"])).sum() + (txt * torch.from_numpy(a[f"{case}/r_txt"])).sum()
            + logits.mean())
    loss.backward()

    def close(ours: torch.Tensor, key: str) -> None:
        ref = torch.from_numpy(a[key])
        assert ours.shape == ref.shape, key
        tol = 1e-5 * max(1.0, float(ref.abs().max()))  # 1e-5, relative where values exceed 1
        assert (ours.detach() - ref).abs().max().item() <= tol, (key, (ours.detach() - ref).abs().max().item())

    close(img, f"{case}/image_features")
    close(txt, f"{case}/text_features")
    close(logits, f"{case}/logits_per_image")
    close(pixels.grad, f"{case}/grad/pixels")
    params = dict(model.named_parameters())
    for k in meta["grad_keys"]:
        close(params[k].grad, f"{case}/grad/{k}")
