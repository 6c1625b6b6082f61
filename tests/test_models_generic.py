"""The contract test every registered model must pass (a new family gets this safety net for free).

Each name of `itmzoo.list_models()` is built from the `tiny` overrides declared beside its tags, with
random weights and no downloads (word-vocabulary models use the package's synthetic vocabulary); a
config field `tokenizer` (an HF tokenizer folder or hub id) gets the package's synthetic WordPiece folder.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import pickle

import pytest
import torch

import itmzoo
from itmzoo.data import SYNTHETIC_WORDPIECE, SyntheticShapes
from itmzoo.data.collate import ImageCollate, PairCollate, PairDataset, TextCollate, eval_loaders
from itmzoo.eval import encode_split, similarity_matrix
from itmzoo.models.base import ACCUMULATION_POLICIES, ITMModel
from itmzoo.registry import get_entry

NAMES = itmzoo.list_models()


@pytest.fixture(scope="module")
def hf_tokenizer_dir() -> str:
    """The package's WordPiece folder over the synthetic captions' words (76 ids)."""
    return SYNTHETIC_WORDPIECE


def tiny_model(name: str, hf_tokenizer_dir: str) -> ITMModel:
    entry = get_entry(name)
    overrides = dict(entry.tiny)
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    if "tokenizer" in fields and "tokenizer" not in overrides:
        overrides["tokenizer"] = hf_tokenizer_dir
    torch.manual_seed(0)
    return itmzoo.build(name, **overrides)


def _find(tree, key: str):
    """The first value of `key` in a nested config dict (a composition keeps its parts' configs inside)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def tiny_split(model: ITMModel, n_images: int = 6):
    if model.input_kind == "regions":
        data = SyntheticShapes({"test": n_images}, seed=0, region_dim=_find(model.config.to_dict(), "img_dim"))
        return data.split("test")
    return SyntheticShapes({"test": n_images}, seed=0, image_size=32).split("test", kind="pixels")


def train_batch(model: ITMModel, split, n: int = 8) -> dict:
    pairs = PairDataset(split, model.image_transform_for(True))
    collate = PairCollate(model.input_kind, model.tokenizer, train=True)
    return collate([pairs[j] for j in range(min(n, len(pairs)))])


class _NoModules(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"a collate pickles a module ({type(obj).__name__})")
        return None


@pytest.mark.parametrize("name", NAMES)
def test_declared_capabilities_equal_the_model(name, hf_tokenizer_dir):
    entry = get_entry(name)
    model = tiny_model(name, hf_tokenizer_dir)
    assert isinstance(model, ITMModel)
    assert (model.input_kind, model.scoring) == (entry.input_kind, entry.scoring)
    assert model.accumulation in ACCUMULATION_POLICIES
    assert model.registry_name == entry.name
    model.eval_settings()  # validated on construction


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_json(name, hf_tokenizer_dir):
    model = tiny_model(name, hf_tokenizer_dir)
    cfg = type(model.config).from_dict(json.loads(model.config.to_json()))
    assert cfg == model.config


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_reach_every_trainable_parameter(name, hf_tokenizer_dir):
    model = tiny_model(name, hf_tokenizer_dir).train()
    batch = train_batch(model, tiny_split(model))
    torch.manual_seed(1)  # the same dropout masks and random draws for the split below
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    out["loss"].backward()
    allowed = type(model).unused_parameters
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and p.grad is None and not any(fnmatch.fnmatchcase(n, g) for g in allowed)]
    assert not missing, f"no gradient reaches {missing} (declare weights dead upstream in unused_parameters)"
    if model.accumulation == "exact":  # the trainer's exact accumulation relies on: the split is the same loss
        torch.manual_seed(1)
        split_out = model.train_loss(model.train_features(batch), batch)
        torch.testing.assert_close(split_out["loss"], out["loss"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_blockwise_scores_and_picklable_collates(name, hf_tokenizer_dir, tmp_path):
    model = tiny_model(name, hf_tokenizer_dir).eval()
    split = tiny_split(model)
    img, txt = encode_split(model, split, batch_size=4, progress=False)
    declared = model.eval_settings().block
    whole = similarity_matrix(model.eval(), img, txt, block=declared or (1000, 1000), progress=False)
    assert whole.shape == (split.num_images, split.num_captions) and torch.isfinite(whole).all()
    if declared is None:  # scores must not depend on how the evaluator cuts the matrix
        blocks = similarity_matrix(model, img, txt, block=(4, 7), progress=False)
        torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-6)
    else:  # a model whose scores depend on its shards (a random layer per call) declares them: repeatable
        again = similarity_matrix(model.eval(), img, txt, block=declared, progress=False)
        torch.testing.assert_close(again, whole, rtol=0, atol=0)

    model.save_pretrained(tmp_path / "native")
    again = itmzoo.load(tmp_path / "native")
    # tokenizer files travel inside the directory: those fields point at its copies, the rest is equal
    assets = json.loads((tmp_path / "native" / "config.json").read_text()).get("assets", {})
    assert all(str(getattr(again.config, k)).startswith(str((tmp_path / "native").resolve())) for k in assets)
    same = dataclasses.replace(again.config, **{k: getattr(model.config, k) for k in assets})
    assert type(again) is type(model) and same == model.config
    img2, txt2 = encode_split(again, split, batch_size=4, progress=False)
    torch.testing.assert_close(similarity_matrix(again.eval(), img2, txt2, block=declared or (1000, 1000),
                                                 progress=False), whole, rtol=0, atol=0)

    images, captions = eval_loaders(split, model, batch_size=4)
    collates = [images.collate_fn, captions.collate_fn, PairCollate(model.input_kind, model.tokenizer, train=True)]
    assert isinstance(collates[0], ImageCollate) and isinstance(collates[1], TextCollate)
    for c in collates:
        _NoModules(io.BytesIO()).dump(c)


def test_the_lazy_model_index_is_current():
    """`import itmzoo` lists models from a generated index; it must equal the modules' declarations."""
    from itmzoo.models import builtin_index
    from itmzoo.registry import INDEX_COMMAND, INDEX_PATH

    committed = json.loads(INDEX_PATH.read_text(encoding="utf-8"))
    assert committed == json.loads(json.dumps(builtin_index())), f"stale itmzoo/models/index.json: run {INDEX_COMMAND}"


def test_a_stale_index_entry_is_refused(monkeypatch):
    import itmzoo.registry as R

    stale = dataclasses.replace(R._INDEX["toy_vse"], paper="something else")
    monkeypatch.setitem(R._INDEX, "toy_vse", stale)
    with pytest.raises(R.RegistryError, match="out of date.*--write-index"):
        R.check_against_index(R.get_entry("toy_vse"))


@pytest.mark.parametrize("name", ["toy_vse", "lhsc"])
def test_raw_inputs_to_the_encoders_get_a_clear_error(name, hf_tokenizer_dir):
    model = tiny_model(name, hf_tokenizer_dir)
    with pytest.raises(TypeError, match=r"encode_text takes a collated batch.*itmzoo\.encode_captions"):
        model.encode_text(["a red circle"])
    with pytest.raises(TypeError, match=r"encode_image takes a collated batch.*itmzoo\.encode_images"):
        model.encode_image(torch.zeros(2, 36, 16))
