"""Every writer -> reader round trip on synthetic data, the load_split dispatcher, and clear errors."""

import json
import pickle

import numpy as np
import pytest

from itmzoo.data import DataError, RetrievalSplit, SyntheticShapes, load_pil, load_split
from itmzoo.data import readers as R
from itmzoo.data import writers as W
from itmzoo.data.text import pre_caption

DIM = 16


@pytest.fixture(scope="module")
def data():
    return SyntheticShapes({"train": 6, "dev": 4, "test": 3}, seed=3, region_dim=DIM, image_size=24)


def pixels_equal(a, b):
    return np.array_equal(np.asarray(load_pil(a)), np.asarray(load_pil(b)))


def same_text(a: RetrievalSplit, b: RetrievalSplit):
    assert a.captions == b.captions
    assert np.array_equal(a.caption_to_image, b.caption_to_image)


# -- precomp ------------------------------------------------------------------------------------------

def test_precomp_round_trip(data, tmp_path):
    src = data.split("test")
    W.write_precomp(src, tmp_path, "testall")
    got = R.read_precomp(tmp_path, "testall", region_dim=DIM)
    same_text(got, src)
    assert got.kind == "regions" and got.name == "testall"
    assert isinstance(got.images, np.memmap)  # features stay on disk
    for i in range(src.num_images):
        np.testing.assert_array_equal(got.images[i], src.images[i])
    # VSE-infinity's <data>/precomp layout is found from the parent folder
    W.write_precomp(src, tmp_path / "vse" / "precomp", "test")
    assert R.read_precomp(tmp_path / "vse", "test").num_images == 3


def test_precomp_dev_keeps_first_5000_captions_like_upstream(data, tmp_path):
    dev = data.split("dev")  # 4 images x 5 captions
    W.write_precomp(dev, tmp_path, "dev")
    assert R.read_precomp(tmp_path, "dev").num_images == 4  # fewer than 5000: all
    cut = R.read_precomp(tmp_path, "dev", dev_captions=10)
    assert (cut.num_images, cut.num_captions) == (2, 10)
    W.write_precomp(dev, tmp_path, "test")
    assert R.read_precomp(tmp_path, "test", dev_captions=10).num_images == 4  # only `dev` is cut


def test_precomp_errors_name_the_file(data, tmp_path):
    src = data.split("test")
    with pytest.raises(FileNotFoundError, match=r"test_ims\.npy"):
        R.read_precomp(tmp_path, "test")
    W.write_precomp(src, tmp_path, "test")
    with pytest.raises(DataError, match=rf"dim {DIM}, expected 2048"):
        R.read_precomp(tmp_path, "test", region_dim=2048)
    caps = tmp_path / "test_caps.txt"
    caps.write_text(caps.read_text() + "one caption too many\n")
    with pytest.raises(DataError, match=r"test_caps\.txt has 16 captions but .*test_ims\.npy has 3 images"):
        R.read_precomp(tmp_path, "test")
    np.save(tmp_path / "flat_ims.npy", np.zeros((3, DIM), np.float32))
    (tmp_path / "flat_caps.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError,
                       match=r"flat_ims\.npy: features of shape \(3, 16\); expected \(images, regions, dim\)"):
        R.read_precomp(tmp_path, "flat")
    (tmp_path / "bad_ims.npy").write_bytes(b"not numpy")
    (tmp_path / "bad_caps.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"bad_ims\.npy: not a readable \.npy"):
        R.read_precomp(tmp_path, "bad")


def test_precomp_ids_file_gives_image_ids(data, tmp_path):
    src = data.split("test")
    W.write_precomp(src, tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("".join(f"{i}\n" for i in (7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9)))
    assert R.read_precomp(tmp_path, "test").image_ids == ["7", "8", "9"]


# -- Karpathy json ------------------------------------------------------------------------------------

@pytest.mark.parametrize("coco_style", [False, True])
def test_karpathy_round_trip(data, tmp_path, coco_style):
    splits = {s: data.split(s, kind="pixels") for s in ("train", "dev", "test")}
    js = W.write_karpathy(splits, tmp_path / "dataset.json", tmp_path / "images", coco_style=coco_style, ext="png")
    for name, alias in (("test", "test"), ("dev", "val"), ("dev", "dev")):
        got = R.read_karpathy(js, tmp_path / "images", alias)
        same_text(got, splits[name])
        assert got.kind == "pixels"
        assert all(pixels_equal(got.images[i], splits[name].images[i]) for i in range(got.num_images))
    both = R.read_karpathy(js, tmp_path / "images", ["train", "test"])
    assert both.num_images == 9
    entry = json.loads(js.read_text())["images"][0]
    assert ("cocoid" in entry and entry["filepath"] == "train2014") if coco_style else "filepath" not in entry
    tok = R.read_karpathy(js, tmp_path / "images", "test", text="tokens", max_captions_per_image=2)
    assert tok.num_captions == 6 and tok.captions[0] == tok.captions[0].lower()


def test_karpathy_errors(data, tmp_path):
    js = W.write_karpathy({"test": data.split("test", kind="pixels")}, tmp_path / "k.json", tmp_path / "img")
    with pytest.raises(DataError, match=r"no images in split \['restval'\]; the file has splits \['test'\]"):
        R.read_karpathy(js, tmp_path / "img", "restval")
    with pytest.raises(FileNotFoundError, match="3 of 3 images listed in .*k.json are missing"):
        R.read_karpathy(js, tmp_path / "elsewhere", "test")
    with pytest.raises(FileNotFoundError, match="Karpathy split json not found"):
        R.read_karpathy(tmp_path / "nope.json", tmp_path / "img", "test")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        R.read_karpathy(tmp_path / "broken.json", tmp_path / "img", "test")


def test_unreadable_image_names_the_file(data, tmp_path):
    js = W.write_karpathy({"test": data.split("test", kind="pixels")}, tmp_path / "k.json", tmp_path / "img")
    split = R.read_karpathy(js, tmp_path / "img", "test")
    bad = split.images[1]
    with open(bad, "wb") as f:
        f.write(b"\x00garbage, not a jpeg")
    with pytest.raises(ValueError, match=rf"cannot decode image {bad}"):
        load_pil(split.images[1])
    from itmzoo.data.collate import ImageDataset
    from itmzoo.data.transforms import image_transform

    ds = ImageDataset(split, image_transform("clip", size=32))
    assert ds[0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="cannot decode image"):
        ds[1]


# -- ids/caps + id_mapping.json ---------------------------------------------------------------------------

@pytest.mark.parametrize("per_caption", [False, True])
def test_ids_caps_round_trip(data, tmp_path, per_caption):
    test, dev = data.split("test", kind="pixels"), data.split("dev", kind="pixels")
    W.write_ids_caps(test, tmp_path, "test", per_caption_ids=per_caption, ext="png")
    W.write_ids_caps(dev, tmp_path, "dev", ext="png")  # merges into the same id_mapping.json
    got = R.read_ids_caps(tmp_path, "test")
    same_text(got, test)
    assert got.image_ids == ["0", "1", "2"]
    assert all(pixels_equal(got.images[i], test.images[i]) for i in range(3))
    d = R.read_ids_caps(tmp_path, "dev", tmp_path / "images")
    assert d.image_ids == ["3", "4", "5", "6"]
    assert R.read_ids_caps(tmp_path, "dev", dev_captions=10).num_images == 2
    assert len(json.loads((tmp_path / "id_mapping.json").read_text())) == 7


def test_ids_caps_errors(data, tmp_path):
    W.write_ids_caps(data.split("test", kind="pixels"), tmp_path, "test")
    (tmp_path / "id_mapping.json").write_text(json.dumps({"0": "a.jpg"}))
    with pytest.raises(DataError,
                       match=r"id_mapping\.json: no image path for 2 ids of .*test_ids\.txt, e\.g\. \['1', '2'\]"):
        R.read_ids_caps(tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("0\n1\n2\n3\n")
    with pytest.raises(DataError, match=r"test_caps\.txt has 15 captions but .*test_ids\.txt has 4 images"):
        R.read_ids_caps(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"image ids of split 'val' not found: .*val_ids\.txt"):
        R.read_ids_caps(tmp_path, "val")


# -- ALBEF / BLIP json -----------------------------------------------------------------------------------

@pytest.mark.parametrize("train_form", [False, True])
def test_albef_json_round_trip(data, tmp_path, train_form):
    src = data.split("test", kind="pixels")
    js = W.write_albef_json(src, tmp_path / "ann.json", tmp_path, train=train_form, ext="png")
    got = R.read_albef_json(js, tmp_path)
    same_text(got, src)
    assert all(pixels_equal(got.images[i], src.images[i]) for i in range(3))
    cleaned = R.read_albef_json(js, tmp_path, pre_caption="albef", max_words=4)
    assert cleaned.captions == [pre_caption(c, 4, "albef") for c in src.captions]


def test_pre_caption_matches_albef_and_blip():
    s = "A man's  dog, (running) on the T-shirt/grass!  <person> "
    assert pre_caption(s, 30, "albef") == "a mans dog running on the t shirt grass person"
    assert pre_caption(s, 30, "blip") == "a man's dog, running on the t-shirt/grass <person>"
    assert pre_caption("one two three four", 2, "albef") == "one two"
    with pytest.raises(ValueError):
        pre_caption(s, 30, "vilt")


def test_albef_json_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(DataError, match=r"entry 0 lacks 'caption'"):
        R.read_albef_json(tmp_path / "a.json", tmp_path)
    (tmp_path / "b.json").write_text(json.dumps([{"image": "x.jpg", "caption": ["a"]}]))
    with pytest.raises(FileNotFoundError, match=r"1 of 1 images .* missing, e\.g\. .*x\.jpg"):
        R.read_albef_json(tmp_path / "b.json", tmp_path)


# -- COCO captions -------------------------------------------------------------------------------------

def test_coco_captions_round_trip(data, tmp_path):
    src = data.split("test", kind="pixels")
    ann = W.write_coco_captions(src, tmp_path / "captions_val2014.json", tmp_path / "val2014", ext="png")
    got = R.read_coco_captions(ann, tmp_path / "val2014")
    same_text(got, src)
    assert got.image_ids == [1, 2, 3]
    assert all(pixels_equal(got.images[i], src.images[i]) for i in range(3))
    two = R.read_coco_captions(ann, tmp_path / "val2014", image_ids=[3, 1], max_captions_per_image=2)
    assert two.captions == src.captions[10:12] + src.captions[0:2] and two.image_ids == [3, 1]
    by_ann = R.read_coco_captions(ann, tmp_path / "val2014", ann_ids=[6, 7, 1])  # VSE++ style
    assert by_ann.captions == [src.captions[5], src.captions[6], src.captions[0]]
    assert by_ann.caption_to_image.tolist() == [0, 0, 1]
    with pytest.raises(DataError, match="annotation id 999 not found"):
        R.read_coco_captions(ann, tmp_path / "val2014", ann_ids=[999])


# -- ViLT arrow ----------------------------------------------------------------------------------------

def test_arrow_round_trip(data, tmp_path):
    pa = pytest.importorskip("pyarrow")
    test, dev = data.split("test", kind="pixels"), data.split("dev", kind="pixels")
    W.write_arrow(test, tmp_path / "f30k_caption_karpathy_test.arrow", ext="png")
    W.write_arrow(dev, tmp_path / "f30k_caption_karpathy_val.arrow", ext="png")
    got = R.read_arrow(tmp_path / "f30k_caption_karpathy_test.arrow")
    same_text(got, test)
    assert isinstance(got.images[0], bytes)
    assert all(pixels_equal(got.images[i], test.images[i]) for i in range(3))
    both = R.read_arrow([tmp_path / "f30k_caption_karpathy_test.arrow", tmp_path / "f30k_caption_karpathy_val.arrow"])
    assert both.num_images == 7 and pixels_equal(both.images[3], dev.images[0])
    sub = both.subset([5, 0])  # lazy subset, pickles as file paths (worker processes reopen the files)
    again = pickle.loads(pickle.dumps(sub.images))
    assert len(pickle.dumps(sub.images)) < 2000 and pixels_equal(again[0], dev.images[2])
    # pandas >= 3 writes large_string ids; duplicates are removed keeping their order
    table = pa.table({"image": pa.array([b"x"], pa.binary()), "caption": pa.array([["b", "a", "b"]]),
                      "image_id": pa.array(["1.jpg"], pa.large_string()), "split": pa.array(["test"])})
    with pa.OSFile(str(tmp_path / "dup.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    assert R.read_arrow(tmp_path / "dup.arrow", remove_duplicate=True).captions == ["b", "a"]
    assert R.read_arrow(tmp_path / "dup.arrow").captions == ["b", "a", "b"]


def test_arrow_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"image": pa.array([b"x"], pa.binary()), "text": pa.array(["a"])})
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError, match=r"t\.arrow: missing columns \['caption', 'image_id'\]"):
        R.read_arrow(tmp_path / "t.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.arrow: not an Arrow IPC file"):
        R.read_arrow(tmp_path / "junk.arrow")
    with pytest.raises(FileNotFoundError, match="arrow table not found"):
        R.read_arrow(tmp_path / "none.arrow")


# -- the dispatcher ---------------------------------------------------------------------------------------

def test_load_split_every_format(data, tmp_path):
    reg, pix = data.split("test"), data.split("test", kind="pixels")
    W.write_precomp(reg, tmp_path / "pre", "test")
    W.write_karpathy({"test": pix}, tmp_path / "k.json", tmp_path / "kimg")
    W.write_ids_caps(pix, tmp_path / "ic", "test")
    W.write_albef_json(pix, tmp_path / "a.json", tmp_path / "aimg")
    W.write_coco_captions(pix, tmp_path / "c.json", tmp_path / "cimg")
    specs = [
        {"format": "synthetic", "split": "test", "num_images": {"test": 3}, "seed": 3, "region_dim": DIM},
        {"format": "precomp", "path": str(tmp_path / "pre"), "split": "test", "region_dim": DIM},
        {"format": "karpathy", "path": str(tmp_path / "k.json"), "image_root": str(tmp_path / "kimg"), "split": "test"},
        {"format": "ids_caps", "path": str(tmp_path / "ic"), "split": "test"},
        {"format": "albef_json", "path": str(tmp_path / "a.json"), "image_root": str(tmp_path / "aimg")},
        {"format": "coco_captions", "path": str(tmp_path / "c.json"), "image_root": str(tmp_path / "cimg")},
    ]
    for spec in specs:
        got = load_split(spec)
        same_text(got, reg)
    assert load_split({**specs[1], "limit": 2}).num_images == 2
    assert load_split({**specs[0], "kind": "pixels"}).kind == "pixels"


def test_load_split_arrow(data, tmp_path):
    # a reported skip, not a silent one: pyarrow is in the dev extra
    pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'itmzoo[arrow]')")
    reg, pix = data.split("test"), data.split("test", kind="pixels")
    W.write_arrow(pix, tmp_path / "t.arrow")
    got = load_split({"format": "arrow", "path": str(tmp_path / "t.arrow")})
    same_text(got, reg)
    assert got.kind == "pixels"
    assert load_split({"format": "arrow", "path": str(tmp_path / "t.arrow"), "limit": 2}).num_images == 2


def test_load_split_errors(tmp_path):
    with pytest.raises(DataError, match=r"needs 'format' in \['albef_json', 'arrow', 'coco_captions'"):
        load_split({"format": "parquet"})
    with pytest.raises(DataError, match=r"unknown keys \['colour'\] for data format 'precomp'; accepted: .*region_dim"):
        load_split({"format": "precomp", "path": str(tmp_path), "split": "test", "colour": "red"})
    with pytest.raises(DataError, match="needs 'path'"):
        load_split({"format": "karpathy", "split": "test"})
    with pytest.raises(DataError, match="gives regions, but the spec asks for kind='pixels'"):
        SyntheticShapes({"test": 2}, region_dim=4)  # precomp written below
        W.write_precomp(SyntheticShapes({"test": 2}, region_dim=4).split("test"), tmp_path, "test")
        load_split({"format": "precomp", "path": str(tmp_path), "split": "test", "kind": "pixels"})


def test_writers_refuse_what_the_format_cannot_hold(data, tmp_path):
    with pytest.raises(ValueError, match="needs a split of regions"):
        W.write_precomp(data.split("test", kind="pixels"), tmp_path, "test")
    uneven = RetrievalSplit(images=np.zeros((2, 3, 4), np.float32), captions=["a", "b", "c"],
                            caption_to_image=np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="the same number per image"):
        W.write_precomp(uneven, tmp_path, "x")
