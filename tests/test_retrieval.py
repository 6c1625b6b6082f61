"""Retrieval for people: raw-input encoding, the Retriever for every scoring kind, index/search CLI, eval dumps."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import itmzoo
from itmzoo.cli import main, parse_data_spec
from itmzoo.config import ModelConfig
from itmzoo.data import SYNTHETIC_VOCAB, SyntheticShapes
from itmzoo.data.collate import PairCollate, PairDataset
from itmzoo.eval import chance_metrics, encode_split, evaluate, similarity_matrix
from itmzoo.eval.rerank import two_stage_scores
from itmzoo.models.base import ITMModel
from itmzoo.registry import get_entry
from itmzoo.retrieval import Retriever, encode_captions, encode_images, faiss_available

DIM = 16


def tiny(name: str, **extra) -> ITMModel:
    torch.manual_seed(0)
    overrides = {**get_entry(name).tiny, **extra}
    return itmzoo.build(name, **overrides).eval()


@pytest.fixture(scope="module")
def data() -> SyntheticShapes:
    # 36 regions: LHSC's transform takes BUTD's fixed region count
    return SyntheticShapes({"train": 64, "test": 12}, seed=0, region_dim=DIM, num_regions=36)


@pytest.fixture(scope="module")
def trained_toy(data) -> ITMModel:
    """toy_vse after 60 steps on 64 synthetic images (above chance on the test split)."""
    torch.manual_seed(0)
    model = itmzoo.build("toy_vse", img_dim=DIM, embed_size=32, word_dim=32, hash_buckets=97)
    split = data.split("train")
    pairs = PairDataset(split, model.image_transform_for(True))
    collate = PairCollate("regions", model.tokenizer, train=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        idx = torch.randperm(len(pairs), generator=g)[:32].tolist()
        loss = model(collate([pairs[j] for j in idx]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -- encoding raw inputs --------------------------------------------------------------------------

def test_encode_captions_equals_encode_text_in_any_batching(trained_toy):
    caps = ["a red circle", "a small blue square at the top left", "two shapes"]
    want = trained_toy.encode_text(trained_toy.tokenizer(caps))
    torch.testing.assert_close(encode_captions(trained_toy, caps), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(encode_captions(trained_toy, caps, batch_size=2), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(encode_captions(trained_toy, "a red circle"), want[:1], rtol=0, atol=1e-6)


def test_encode_images_takes_arrays_tensors_stacks_and_npy_files(trained_toy, data, tmp_path):
    arrays = [data.regions("test", i) for i in range(3)]
    want = encode_images(trained_toy, arrays)
    assert want.shape == (3, 32)
    np.save(tmp_path / "r0.npy", arrays[0])
    torch.testing.assert_close(encode_images(trained_toy, [torch.from_numpy(a) for a in arrays]), want)
    torch.testing.assert_close(encode_images(trained_toy, np.stack(arrays), batch_size=2), want)
    torch.testing.assert_close(encode_images(trained_toy, tmp_path / "r0.npy"), want[:1])
    torch.testing.assert_close(encode_images(trained_toy, arrays[1]), want[1:2])


def test_wrong_inputs_raise_one_clear_error(trained_toy, data, tmp_path):
    with pytest.raises(TypeError, match="captions must be a string or a list of strings.*holding a int"):
        encode_captions(trained_toy, ["a red circle", 3])
    with pytest.raises(TypeError, match="takes region features.*got Image"):
        encode_images(trained_toy, [data.render("test", 0)])
    with pytest.raises(TypeError, match="takes region features.*path.*pixel model"):
        encode_images(trained_toy, [tmp_path / "cat.jpg"])
    with pytest.raises(ValueError, match=r"must be \[R, D\], got shape \(16,\)"):
        encode_images(trained_toy, [np.zeros(16, np.float32)])
    with pytest.raises(ValueError, match="empty list"):
        encode_captions(trained_toy, [])


class MeanColour(ITMModel):
    """A pixel embedding model with a known answer: the image's mean colour, the caption's colour word."""

    input_kind = "pixels"
    COLOURS = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0]}

    def __init__(self) -> None:
        super().__init__(ModelConfig())
        self.scale = torch.nn.Parameter(torch.ones(()))

    @property
    def tokenizer(self):
        return lambda caps, train=False: {"rgb": torch.tensor([self.COLOURS[c.split()[-1]] for c in caps])}

    def image_transform_for(self, train):
        return lambda img: torch.from_numpy(np.asarray(img.resize((8, 8)), np.float32) / 255).permute(2, 0, 1)

    def encode_image(self, batch):
        return batch["pixels"].mean((2, 3)) * self.scale

    def encode_text(self, batch):
        return batch["rgb"]


def test_pixel_model_takes_pil_paths_bytes_and_arrays_and_finds_the_colour(tmp_path):
    from PIL import Image

    model = MeanColour()
    pics = {c: Image.new("RGB", (20, 20), tuple(int(255 * v) for v in rgb)) for c, rgb in MeanColour.COLOURS.items()}
    pics["blue"].save(tmp_path / "blue.png")
    buf = io.BytesIO()
    pics["green"].save(buf, format="PNG")
    gallery = [pics["red"], tmp_path / "blue.png", buf.getvalue(), np.asarray(pics["red"])]
    feats = encode_images(model, gallery)
    torch.testing.assert_close(feats, torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]))
    r = Retriever(model, images=gallery, image_ids=["red", "blue.png", "green", "red2"])
    res = r.search_images(["something blue", "something green"], k=1)
    assert res.ids == [["blue.png"], ["green"]]
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8.*region model"):
        encode_images(model, [np.zeros((4, 4), np.float32)])


# -- the Retriever for each scoring kind ------------------------------------------------------------

def test_embedding_retriever_ranks_as_the_evaluator(trained_toy, data):
    split = data.split("test")
    r = Retriever.from_split(trained_toy, split, backend="torch")
    metrics = evaluate(trained_toy, split, progress=False)
    assert metrics["rsum"] > chance_metrics(split.caption_to_image)["rsum"]  # the ranking means something
    res = r.search_images(split.captions, k=5)
    hit1 = (res.indices[:, 0].numpy() == split.caption_to_image).mean() * 100
    hit5 = (res.indices.numpy() == split.caption_to_image[:, None]).any(1).mean() * 100
    assert hit1 == pytest.approx(metrics["t2i_r1"]) and hit5 == pytest.approx(metrics["t2i_r5"])
    assert res.ids[0][0] == split.image_ids[int(res.indices[0, 0])]
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()
    caps = r.search_captions([split.images[i] for i in range(split.num_images)], k=1)
    i2t1 = (split.caption_to_image[caps.indices[:, 0].numpy()] == np.arange(split.num_images)).mean() * 100
    assert i2t1 == pytest.approx(metrics["i2t_r1"])
    assert caps.captions[0][0] == split.captions[int(caps.indices[0, 0])]


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (optional extra itmzoo[faiss])")
def test_faiss_backend_equals_exact_torch(trained_toy, data, tmp_path):
    split = data.split("test")
    exact = Retriever.from_split(trained_toy, split, backend="torch")
    fast = Retriever.from_split(trained_toy, split, backend="faiss")
    a, b = exact.search_images(split.captions, k=5), fast.search_images(split.captions, k=5)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    q = [split.images[i] for i in range(4)]
    assert torch.equal(exact.search_captions(q, k=5).indices, fast.search_captions(q, k=5).indices)
    trained_toy.registry_name = "toy_vse"
    fast.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "image.faiss").is_file() and (tmp_path / "idx" / "caption.faiss").is_file()
    back = Retriever.load(tmp_path / "idx")
    assert back.backend == "faiss" and set(back._faiss) == {"image", "caption"}
    assert torch.equal(back.search_images(split.captions, k=5).indices, a.indices)


def test_faiss_backend_is_refused_for_cross_models():
    with pytest.raises(ValueError, match="plain dot product"):
        Retriever(tiny("lhsc", vocab_path=SYNTHETIC_VOCAB), backend="faiss")


def test_cross_model_all_pairs_and_with_a_first_stage(data, trained_toy):
    split = data.split("test")
    lhsc = tiny("lhsc", vocab_path=SYNTHETIC_VOCAB, text_padding="masked")  # query batches pad differently
    img, txt = encode_split(lhsc, split, progress=False)
    full = similarity_matrix(lhsc, img, txt, progress=False)  # [n_img, n_cap]
    queries = split.captions[:7]
    all_pairs = Retriever.from_split(lhsc, split).search_images(queries, k=4)
    want = full[:, :7].t().topk(4, dim=1)
    assert torch.equal(all_pairs.indices, want.indices)
    torch.testing.assert_close(all_pairs.scores, want.values, rtol=0, atol=1e-5)
    # re-scoring every image after a first stage is the all-pairs answer
    every = Retriever.from_split(lhsc, split, first_stage=trained_toy, rerank_k=split.num_images)
    got = every.search_images(queries, k=4)
    assert torch.equal(got.indices, all_pairs.indices)
    torch.testing.assert_close(got.scores, all_pairs.scores, rtol=0, atol=1e-5)
    # with k = 3 candidates the answer is the first stage's top 3, ordered by the cross model
    few = Retriever.from_split(lhsc, split, first_stage=trained_toy, rerank_k=3).search_images(queries, k=3)
    first = Retriever.from_split(trained_toy, split, backend="torch").search_images(queries, k=3)
    assert [sorted(r) for r in few.indices.tolist()] == [sorted(r) for r in first.indices.tolist()]
    for q, row in enumerate(few.indices.tolist()):
        torch.testing.assert_close(few.scores[q], full[row, q], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="first_stage is for cross models"):
        Retriever(trained_toy, first_stage=trained_toy)
    # a gallery of exported features answers as the one encoded from inputs
    again = Retriever.from_features(lhsc, image_features=encode_images(lhsc, split.images))
    assert torch.equal(again.search_images(queries, k=4).indices, all_pairs.indices)


def test_two_stage_model_ranks_as_the_re_ranked_evaluation(data):
    split = data.split("test")
    model = tiny("two_stage", k=4)
    img, txt = encode_split(model, split, progress=False)
    ref = two_stage_scores(model, img, txt, 4, block=(256, 1024), progress=False)
    r = Retriever.from_split(model, split)
    assert r.rerank_k == 4
    t2i = r.search_images(split.captions, k=3)
    want = ref.t2i.t().topk(3, dim=1)
    assert torch.equal(t2i.indices, want.indices)
    torch.testing.assert_close(t2i.scores, want.values, rtol=0, atol=1e-5)
    i2t = r.search_captions([split.images[i] for i in range(5)], k=3)
    want = ref.i2t[:5].topk(3, dim=1)
    assert torch.equal(i2t.indices, want.indices)
    torch.testing.assert_close(i2t.scores, want.values, rtol=0, atol=1e-5)


def test_save_and_load_answer_the_same(trained_toy, data, tmp_path):
    split = data.split("test")
    r = Retriever.from_split(trained_toy, split, backend="torch")
    trained_toy.registry_name = "toy_vse"
    r.save(tmp_path / "idx")
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {"embeddings.safetensors", "ids.json", "index.json",
                                                                "model"}
    assert not list(tmp_path.glob(".idx*"))  # no temporary left beside it
    back = Retriever.load(tmp_path / "idx")
    a, b = r.search_images(split.captions[:4], k=3), back.search_images(split.captions[:4], k=3)
    assert torch.equal(a.indices, b.indices) and a.ids == b.ids
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)
    q = [split.images[0]]
    assert r.search_captions(q, k=2).to_list() == back.search_captions(q, k=2).to_list()
    with pytest.raises(FileNotFoundError, match="not an itmzoo index"):
        Retriever.load(tmp_path)


def test_search_refuses_a_missing_gallery_and_bad_k(trained_toy):
    r = Retriever(trained_toy, captions=["a red circle"])
    with pytest.raises(ValueError, match="holds no images"):
        r.search_images("a red circle")
    with pytest.raises(ValueError, match="k must be positive"):
        r.search_captions(np.zeros((3, DIM), np.float32), k=0)


# -- command line -----------------------------------------------------------------------------------

SPEC = "format=synthetic,region_dim=16,num_regions=4,num_images={test: 10},split=test"


def test_cli_index_then_search_by_text_and_by_image(tmp_path, capsys, data):
    out = tmp_path / "idx"
    assert main(["index", str(out), "--model", "toy_vse", "--set", "img_dim=16", "--data", SPEC, "--quiet"]) == 0
    assert "indexed 10 images, 50 captions with toy_vse" in capsys.readouterr().out
    # the directory exists now: refused without --force
    assert main(["index", str(out), "--model", "toy_vse", "--set", "img_dim=16", "--data", SPEC]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["search", str(out), "a red circle", "-k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in got["results"]] == [1, 2, 3] and got["direction"] == "t2i"
    assert all(h["id"].startswith("shapes_test_") for h in got["results"])
    np.save(tmp_path / "q.npy", SyntheticShapes({"test": 10}, region_dim=16, num_regions=4).regions("test", 0))
    assert main(["search", str(out), "--image", str(tmp_path / "q.npy"), "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1"
    assert main(["search", str(out)]) == 1
    assert "give one query" in capsys.readouterr().err


def test_cli_index_folder_and_captions_file(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    shapes = SyntheticShapes({"test": 3}, region_dim=16, num_regions=4)
    for i in range(3):
        np.save(tmp_path / "imgs" / f"im{i}.npy", shapes.regions("test", i))
    (tmp_path / "caps.txt").write_text("a red circle\n\na blue square\n")
    assert main(["index", str(tmp_path / "idx"), "--model", "toy_vse", "--set", "img_dim=16", "--images",
                 str(tmp_path / "imgs"), "--captions", str(tmp_path / "caps.txt"), "--quiet"]) == 0
    ids = json.loads((tmp_path / "idx" / "ids.json").read_text())
    assert ids["image_ids"] == ["im0.npy", "im1.npy", "im2.npy"]
    assert ids["captions"] == ["a red circle", "a blue square"]
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--image", str(tmp_path / "imgs" / "im1.npy"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {h["caption"] for h in got["results"]} == {"a red circle", "a blue square"}


# LHSC's transform takes BUTD's fixed 36 regions
SPEC36 = "format=synthetic,region_dim=16,num_regions=36,num_images={test: 12},split=test"


@pytest.fixture(scope="module")
def cross_and_first(tmp_path_factory) -> Path:
    """A tiny LHSC (cross) in ``lhsc/`` and a tiny toy_vse (embedding) in ``toy/``, both native directories."""
    tmp = tmp_path_factory.mktemp("first_stage")
    tiny("lhsc", vocab_path=SYNTHETIC_VOCAB, text_padding="masked").save_pretrained(tmp / "lhsc")
    tiny("toy_vse", img_dim=DIM).save_pretrained(tmp / "toy")
    return tmp


def test_cli_index_with_a_first_stage_searches_as_the_python_retriever(cross_and_first, tmp_path, capsys):
    from itmzoo.data import load_split

    lhsc_dir, toy_dir, out = cross_and_first / "lhsc", cross_and_first / "toy", tmp_path / "idx"
    assert main(["index", str(out), "--pretrained", str(lhsc_dir), "--first-stage-pretrained", str(toy_dir),
                 "--rerank-k", "3", "--data", SPEC36, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "indexed 12 images, 60 captions with lhsc (cross, first stage toy_vse, rerank_k 3)" in printed
    meta = json.loads((out / "index.json").read_text())
    assert meta["model_source"] == {"pretrained": str(lhsc_dir.resolve()),
                                    "first_stage": {"pretrained": str(toy_dir.resolve())}}
    assert meta["first_stage"] == "toy_vse" and meta["rerank_k"] == 3 and "model" not in {
        p.name for p in out.iterdir()}  # both models are found again from their directories, not copied
    # the same gallery in Python
    lhsc, toy = itmzoo.load(lhsc_dir), itmzoo.load(toy_dir)
    split = load_split(parse_data_spec(SPEC36))
    want = Retriever.from_split(lhsc, split, first_stage=toy, rerank_k=3)
    query = split.captions[7]
    assert main(["search", str(out), query, "-k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    ref = want.search_images([query], k=3).to_list()[0]
    assert [h["index"] for h in got] == [h["index"] for h in ref] and [h["id"] for h in got] == [h["id"] for h in ref]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in ref], abs=1e-5)
    # a re-ranking, not all pairs: the results are the first stage's top 3 of 12 images
    first = Retriever.from_split(toy, split, backend="torch").search_images([query], k=3)
    assert sorted(h["index"] for h in got) == sorted(first.indices[0].tolist())
    # image -> captions
    np.save(tmp_path / "q.npy", np.asarray(split.images[4]))
    assert main(["search", str(out), "--image", str(tmp_path / "q.npy"), "-k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    ref = want.search_captions([split.images[4]], k=3).to_list()[0]
    assert [(h["index"], h["caption"]) for h in got] == [(h["index"], h["caption"]) for h in ref]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in ref], abs=1e-5)


def test_cli_index_first_stage_from_a_name_and_checkpoint(cross_and_first, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(out), "--model", "lhsc", "--checkpoint", str(cross_and_first / "lhsc"),
                 "--first-stage-model", "toy_vse", "--first-stage-checkpoint", str(cross_and_first / "toy"),
                 "--data", SPEC36, "--quiet"]) == 0
    src = json.loads((out / "index.json").read_text())["model_source"]
    assert src["first_stage"] == {"name": "toy_vse", "checkpoint": str((cross_and_first / "toy").resolve()),
                                  "overrides": {}}
    back = Retriever.load(out)
    assert back.first_stage.registry_name == "toy_vse" and back.rerank_k == 128  # lhsc's default: no eval rerank_k


def test_cli_index_first_stage_errors_are_one_line(cross_and_first, tmp_path, capsys):
    lhsc, toy = str(cross_and_first / "lhsc"), str(cross_and_first / "toy")
    out = str(tmp_path / "idx")

    def error(*args: str) -> str:
        assert main(["index", out, *args, "--data", SPEC36, "--quiet"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("itmzoo index: error: ValueError: ")
        return err

    # a first stage for a model that ranks on its own
    assert "--first-stage-pretrained {}: a first stage is for cross models; toy_vse scores by 'embedding'".format(
        toy) in error("--pretrained", toy, "--first-stage-pretrained", toy)
    # both forms, or a checkpoint without its name
    assert "give either --first-stage-pretrained DIR or --first-stage-model NAME --first-stage-checkpoint PATH, " \
           "not both" in error("--pretrained", lhsc, "--first-stage-pretrained", toy, "--first-stage-model", "toy_vse")
    assert "say which model: --first-stage-pretrained DIR, or --first-stage-model NAME" in error(
        "--pretrained", lhsc, "--first-stage-checkpoint", toy)
    assert "--first-stage-model toy_vse needs --first-stage-checkpoint FILE" in error(
        "--pretrained", lhsc, "--first-stage-model", "toy_vse")
    assert "--model lhsc without --checkpoint (random weights) cannot take a first stage" in error(
        "--model", "lhsc", "--first-stage-pretrained", toy)
    # a first stage that is not an embedding model
    assert f"--first-stage-pretrained {lhsc}: expected an embedding model taking regions (as lhsc does), got lhsc, " \
           "a cross model taking regions" in error("--pretrained", lhsc, "--first-stage-pretrained", lhsc)
    # --rerank-k where nothing is re-ranked, or not a count
    assert "--rerank-k re-scores candidates" in error("--pretrained", lhsc, "--rerank-k", "3")
    assert "--rerank-k: expected a positive number of candidates, got 0" in error(
        "--pretrained", lhsc, "--first-stage-pretrained", toy, "--rerank-k", "0")
    assert not (tmp_path / "idx").exists()  # nothing written by a refused command


def test_cli_eval_saves_sims_and_ranks_that_give_its_metrics(tmp_path, capsys):
    args = ["eval", "--model", "toy_vse", "--set", "img_dim=16", "--data", SPEC, "--quiet",
            "--out", str(tmp_path / "m.json"), "--save-sims", str(tmp_path / "s.npz"),
            "--save-ranks", str(tmp_path / "r.json")]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        sims, c2i = z["sims"], z["caption_to_image"]
    assert sims.shape == (10, 50)
    assert (sims.argmax(0) == c2i).mean() * 100 == pytest.approx(metrics["t2i_r1"], abs=1e-6)
    ranks = json.loads((tmp_path / "r.json").read_text())["folds"][0]
    assert np.mean([q["rank"] <= 5 for q in ranks["t2i"]]) * 100 == pytest.approx(metrics["t2i_r5"], abs=1e-6)
    assert np.mean([q["rank"] == 1 for q in ranks["i2t"]]) * 100 == pytest.approx(metrics["i2t_r1"], abs=1e-6)
    # and an independent count from the saved matrix: an image's top caption is one of its own
    own_top = np.array([c2i[sims[i].argmax()] == i for i in range(sims.shape[0])])
    assert own_top.mean() * 100 == pytest.approx(metrics["i2t_r1"], abs=1e-6)
    assert [q["rank"] == 1 for q in ranks["i2t"]] == own_top.tolist()
    assert ranks["t2i"][7]["caption_text"] and ranks["i2t"][0]["image_id"] == "shapes_test_000000"


# -- HTML report ------------------------------------------------------------------------------------

class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def _check_report(directory: Path) -> _Refs:
    page = (directory / "index.html").read_text(encoding="utf-8")
    p = _Refs()
    p.feed(page)
    p.close()
    assert p.refs, "the report references no files"
    for ref in p.refs:
        assert not ref.startswith(("/", "http:", "https:", "file:")), ref  # relative links only
        assert (directory / ref).is_file(), f"{ref} is referenced but missing"
    return p


def test_eval_report_is_self_contained_and_agrees_with_the_metrics(tmp_path, capsys):
    from itmzoo.eval.html import recall_curves

    assert main(["eval", "--model", "toy_vse", "--set", "img_dim=16", "--data", SPEC, "--quiet",
                 "--out", str(tmp_path / "m.json"), "--report", str(tmp_path / "rep")]) == 0
    assert f"report: {tmp_path / 'rep' / 'index.html'}" in capsys.readouterr().out
    p = _check_report(tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert f"{metrics['t2i_r1']:.2f}" in page and "protocol <b>full</b>" in page
    assert ("svg" in p.tags) != (tmp_path / "rep" / "recall_at_k.png").is_file()  # one plot, either form
    # 8 caption queries x 5 images + 8 image queries: one thumbnail per distinct image shown, rendered
    thumbs = [r for r in p.refs if r.startswith("thumbs/")]
    assert len(thumbs) == 8 * 5 + 8 and len(set(thumbs)) == len(list((tmp_path / "rep" / "thumbs").iterdir()))
    # the curve at K = 1, 5, 10 is the metrics' recall; a ✓ marks exactly the hits of the top 5
    with np.load(_sims_for(tmp_path), allow_pickle=False) as z:
        sims = torch.from_numpy(z["sims"])
    split = SyntheticShapes({"test": 10}, region_dim=16, num_regions=4).split("test")
    curves = recall_curves(sims, split)
    for d in ("i2t", "t2i"):
        assert [curves[d][k - 1] for k in (1, 5, 10)] == pytest.approx([metrics[f"{d}_r{k}"] for k in (1, 5, 10)])
    c2i = torch.as_tensor(split.caption_to_image)  # R@1 counted by hand, not through the rank code
    assert curves["t2i"][0] == pytest.approx((sims.argmax(0) == c2i).double().mean().item() * 100)
    assert curves["i2t"][0] == pytest.approx((c2i[sims.argmax(1)] == torch.arange(10)).double().mean().item() * 100)
    picks = np.linspace(0, 49, 8).round().astype(int)
    hits = sum(int(split.caption_to_image[j] in sims[:, j].topk(5).indices.tolist()) for j in picks)
    caption_rows = page.split("Caption &rarr; images")[1].split("Image &rarr; captions")[0]
    assert caption_rows.count("✓") == hits


def _sims_for(tmp_path: Path) -> Path:
    assert main(["eval", "--model", "toy_vse", "--set", "img_dim=16", "--data", SPEC, "--quiet",
                 "--save-sims", str(tmp_path / "s.npz")]) == 0
    return tmp_path / "s.npz"


def test_train_ends_with_a_report(tmp_path, capsys):
    import yaml

    run = {"model": {"name": "toy_vse", "img_dim": 16, "embed_size": 8, "word_dim": 8, "hash_buckets": 31},
           "data": {"format": "synthetic", "region_dim": 16, "num_regions": 4,
                    "num_images": {"train": 16, "dev": 6, "test": 6},
                    "train": {"split": "train"}, "dev": {"split": "dev"}, "test": {"split": "test"}},
           "train": {"epochs": 1, "batch_size": 8, "progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"report: {tmp_path / 'out' / 'report' / 'index.html'}")
    _check_report(tmp_path / "out" / "report")


# -- expected metrics of a tag ----------------------------------------------------------------------

def test_eval_of_a_tag_prints_the_difference_to_its_expected_metrics(tmp_path, capsys):
    from itmzoo.models.toy import ToyVSE, ToyVSEConfig
    from itmzoo.registry import Tag, register_model

    expected = {"full.t2i_r1": 50.0, "full.rsum": 300.0, "f30k-1k.t2i_r1": 90.0}
    register_model("expected_toy", config=ToyVSEConfig, input_kind="regions", scoring="embedding",
                   tags={"demo": Tag(overrides={"img_dim": 16}, expected=expected)})(lambda cfg: ToyVSE(cfg))
    assert main(["eval", "--model", "expected_toy.demo", "--data", SPEC, "--quiet",
                 "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    rows = {r["metric"]: r for r in metrics["expected_comparison"]["rows"]}
    assert set(rows) == {"t2i_r1", "rsum"}  # the f30k-1k number belongs to another protocol
    assert rows["t2i_r1"]["difference"] == pytest.approx(metrics["t2i_r1"] - 50.0)
    assert "expected by expected_toy.demo (under full)" in out
    assert f"{metrics['rsum']:>10.2f}{metrics['rsum'] - 300:>+9.2f}" in out
    assert main(["eval", "--model", "expected_toy.demo", "--data", SPEC, "--quiet", "--protocol", "5fold"]) == 0
    assert "states expected metrics for other protocols (f30k-1k, full), not 5fold" in capsys.readouterr().out
