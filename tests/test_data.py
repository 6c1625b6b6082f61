"""SyntheticShapes, SCAN vocabulary and offline tokenisation, tokenizers, transforms, collate and loaders."""

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_utils import WORDS, bert_tokenizer_folder

from itmzoo.data import RetrievalSplit, SyntheticShapes, load_pil
from itmzoo.data.collate import ImageCollate, TextCollate, eval_loaders, pad_sequences
from itmzoo.data.synthetic import COLOURS, SHAPES
from itmzoo.data.transforms import CLIP_MEAN, CLIP_STD, RegionTransform, image_transform
from itmzoo.data.vocab import Vocab, word_tokenize

# -- SyntheticShapes ------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_independent_of_split_sizes():
    a = SyntheticShapes({"train": 5, "test": 4}, seed=7, region_dim=32, image_size=32)
    b = SyntheticShapes({"train": 50, "dev": 3, "test": 4}, seed=7, region_dim=32, image_size=32)
    sa, sb = a.split("test"), b.split("test")
    assert sa.captions == sb.captions
    for i in range(4):
        np.testing.assert_array_equal(sa.images[i], sb.images[i])
        assert np.array_equal(np.asarray(a.render("test", i)), np.asarray(b.render("test", i)))
    c = SyntheticShapes({"test": 4}, seed=8, region_dim=32)
    assert c.split("test").captions != sa.captions
    assert a.split("train").captions != sa.captions[:20]  # splits differ


def test_synthetic_split_layout_and_features():
    ds = SyntheticShapes(120, seed=0, region_dim=48)
    assert ds.sizes == {"train": 100, "dev": 10, "test": 10}
    s = ds.split("dev")
    assert isinstance(s, RetrievalSplit) and s.kind == "regions" and s.name == "synthetic_dev"
    assert (s.num_images, s.num_captions) == (10, 50)
    assert s.caption_to_image.tolist() == [i for i in range(10) for _ in range(5)]
    x = s.images[3]
    assert x.shape == (36, 48) and x.dtype == np.float32 and (x >= 0).all()
    assert len(s.image_ids) == 10 and s.image_ids[0] == "shapes_dev_000000"
    full = SyntheticShapes({"test": 1}).split("test").images[0]
    assert full.shape == (36, 2048)  # BUTD-like default


def test_synthetic_captions_are_distinct_and_describe_the_scene():
    ds = SyntheticShapes({"train": 60}, seed=1, region_dim=8)
    colour_words = {w: k for k, (_, _, ws) in enumerate(COLOURS) for w in ws}
    shape_words = {w: k for k, (_, ws) in enumerate(SHAPES) for w in ws}
    for i in range(60):
        objs = ds.scene("train", i)
        assert 1 <= len(objs) <= 3
        assert len({o.cell for o in objs}) == len(objs) and len({(o.colour, o.shape) for o in objs}) == len(objs)
        caps = ds.captions("train", i)
        assert len(caps) == len(set(caps)) == 5
        for c in caps:
            text = c.lower()
            # every colour / shape word in a caption belongs to an object of the scene (never wrong)
            for w, k in colour_words.items():
                if re.search(rf"\b{w}\b", text):
                    assert any(o.colour == k for o in objs), (c, [o.describe() for o in objs])
            for w, k in shape_words.items():
                if re.search(rf"\b{w}\b", text):
                    assert any(o.shape == k for o in objs), (c, [o.describe() for o in objs])


def test_synthetic_pixels_and_lazy_pickling():
    ds = SyntheticShapes({"test": 6}, seed=2, image_size=40, region_dim=2048)
    pix = ds.split("test", kind="pixels")
    img = pix.images[0]
    assert img.size == (40, 40) and img.mode == "RGB"
    sub = pix.subset([4, 1])
    assert type(sub.images).__name__ == "SyntheticImages"  # still lazy
    assert np.array_equal(np.asarray(sub.images[0]), np.asarray(pix.images[4]))
    reg = ds.split("test")
    reg.images[0]  # builds the code tables
    blob = pickle.dumps(reg.images)
    assert len(blob) < 5000  # tables are rebuilt from the seed, not shipped to every worker
    np.testing.assert_array_equal(pickle.loads(blob)[2], reg.images[2])


def test_synthetic_argument_errors():
    with pytest.raises(ValueError, match="unknown splits"):
        SyntheticShapes({"val": 3})
    with pytest.raises(ValueError, match="unknown synthetic split 'val'"):
        SyntheticShapes(24).split("val")
    with pytest.raises(IndexError, match="has 2 images"):
        SyntheticShapes(24).scene("dev", 5)


def test_synthetic_is_learnable_but_not_trivial():
    """Mean-pooled regions + bag of words, hinge loss: far above chance, far from 100 %."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a busy machine
    try:
        r = _train_tiny_model()  # about 22 % t2i R@5 and 7 % R@1 on 100 test images
    finally:
        torch.set_num_threads(threads)
    assert r["t2i_r5"] > 12.0 and r["t2i_r1"] > 3.0 and r["i2t_r1"] > 3.0, r  # chance: 5 % and 1 %
    assert max(r.values()) < 90.0, r


def _train_tiny_model() -> dict[str, float]:
    ds = SyntheticShapes({"train": 400, "test": 100}, seed=0, region_dim=256)
    tr, te = ds.split("train"), ds.split("test")
    X = torch.from_numpy(np.stack(list(tr.images))).mean(1)
    Xt = torch.from_numpy(np.stack(list(te.images))).mean(1)
    vocab = Vocab.from_captions(tr.captions, threshold=1)
    b, bt = vocab.encode_batch(tr.captions), vocab.encode_batch(te.captions)
    img, emb = torch.nn.Linear(256, 64), torch.nn.Embedding(len(vocab), 64)
    opt = torch.optim.Adam([*img.parameters(), *emb.parameters()], lr=1e-2)

    def txt(ids, mask):
        m = mask.float()
        return torch.nn.functional.normalize((emb(ids) * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1)

    c2i = torch.from_numpy(tr.caption_to_image)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        perm = torch.randperm(tr.num_captions, generator=g)
        for k in range(0, len(perm) - 99, 100):
            j = perm[k:k + 100]
            s = torch.nn.functional.normalize(img(X[c2i[j]]), dim=-1) @ txt(b["input_ids"][j], b["attention_mask"][j]).T
            d, pos = s.diag(), c2i[j][:, None] == c2i[j][None, :]
            loss = ((0.2 + s - d[:, None]).clamp(min=0).masked_fill(pos, 0).sum()
                    + (0.2 + s - d[None, :]).clamp(min=0).masked_fill(pos, 0).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        S = torch.nn.functional.normalize(img(Xt), dim=-1) @ txt(bt["input_ids"], bt["attention_mask"]).T
    c2i_te = torch.from_numpy(te.caption_to_image)
    gt = S[c2i_te, torch.arange(S.shape[1])]
    t2i = (S > gt[None]).sum(0)  # rank of the right image for each caption
    best = torch.full((S.shape[0],), -2.0).scatter_reduce(0, c2i_te, gt, "amax")
    i2t = (S > best[:, None]).sum(1)  # rank of the best right caption for each image
    return {"i2t_r1": (i2t < 1).float().mean().item() * 100, "t2i_r1": (t2i < 1).float().mean().item() * 100,
            "t2i_r5": (t2i < 5).float().mean().item() * 100}


# -- vocabulary and offline tokenisation ------------------------------------------------------------------

def scan_vocab_json(tmp_path):
    # the layout of SCAN's vocab/*_precomp_vocab.json: specials first, idx2word keys are strings
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "man", "with", "red", "helmet", "'s", "."]
    data = {"word2idx": {w: i for i, w in enumerate(words)},
            "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}
    p = tmp_path / "f30k_precomp_vocab.json"
    p.write_text(json.dumps(data))
    return p


def test_vocab_ids_exactly_as_scan(tmp_path):
    v = Vocab.load(scan_vocab_json(tmp_path))
    assert [v(w) for w in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]
    # [<start>] + vocab(tokens of caption.lower()) + [<end>]; unknown words -> <unk> = 3
    assert v.encode("A man's red helmet, with a dog.") == [1, 4, 5, 9, 7, 8, 3, 6, 4, 3, 10, 2]
    b = v.encode_batch(["a man", "a red helmet ."])
    assert b["input_ids"].tolist() == [[1, 4, 5, 2, 0, 0], [1, 4, 7, 8, 10, 2]]
    assert b["lengths"].tolist() == [4, 6] and b["attention_mask"].sum(1).tolist() == [4, 6]
    assert v.add_word("<mask>") == 11 and len(v) == 12  # VSE-infinity / ESA append <mask> at run time
    out = tmp_path / "saved.json"
    v.save(out)
    data = json.loads(out.read_text())
    assert data["idx"] == 12 and data["idx2word"]["11"] == "<mask>" and Vocab.load(out).word2idx == v.word2idx


def test_vocab_from_captions_threshold_and_errors(tmp_path):
    v = Vocab.from_captions(["a dog", "A dog runs", "a cat"], threshold=2)
    assert list(v.word2idx) == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"word2idx": {"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3}}))
    with pytest.raises(ValueError, match="<pad> must have id 0"):
        Vocab.load(bad)
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        Vocab.load(tmp_path / "none.json")


def test_word_tokenize_needs_no_nltk_data(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no punkt anywhere
    assert word_tokenize("A man with a red helmet on a small moped on a dirt road.") == \
        ["a", "man", "with", "a", "red", "helmet", "on", "a", "small", "moped", "on", "a", "dirt", "road", "."]
    assert word_tokenize("Two dogs don't play in a \"t-shirt\".") == \
        ["two", "dogs", "do", "n't", "play", "in", "a", "``", "t-shirt", "''", "."]
    # an abbreviation keeps its period (Punkt knows "d.c"), with or without the sentence splitter
    for split_sentences in (True, False):
        assert word_tokenize("Washington D.C. at night.", sentence_split=split_sentences) == [
            "washington", "d.c.", "at", "night", "."]


def _punkt_cases() -> list[dict]:
    path = Path(__file__).parent / "fixtures" / "punkt" / "word_tokenize.json"
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


def test_word_tokenize_equals_nltk_with_punkt(monkeypatch, tmp_path):
    """Against real `nltk.word_tokenize(caption.lower())` outputs recorded with the punkt_tab English model
    (tests/fixtures/punkt/make_fixtures.py): multi-sentence captions and abbreviations (mr., st., u.s., d.c.)."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no nltk data anywhere: the shipped asset is used
    cases = _punkt_cases()
    for case in cases:
        assert word_tokenize(case["caption"]) == case["tokens"], case["caption"]
        assert word_tokenize(case["caption"], sentence_split=False) == case["treebank_only"], case["caption"]
    # the cases exercise the sentence splitter: Punkt changes the tokens of about half of them
    assert sum(c["tokens"] != c["treebank_only"] for c in cases) >= 15
    assert word_tokenize("A man in a red shirt. He is climbing")[5:8] == ["shirt", ".", "he"]
    assert word_tokenize("Mr. Smith on St. Mark street in the U.S. and D.C. Look.")[:2] == ["mr.", "smith"]


def test_scan_vocab_encodes_inner_sentence_periods(tmp_path):
    vocab = Vocab(["a", "man", "in", "red", "shirt", ".", "he", "is", "climbing"])
    ids = vocab.encode("A man in a red shirt. He is climbing")
    assert 3 not in ids and ids[7] == vocab(".")         # `shirt.` would have been <unk> (3)


def test_punkt_asset_checksum_and_rebuild(tmp_path):
    import gzip

    from itmzoo.data import punkt

    assert punkt._read_asset()["abbrev_types"]                      # the shipped file passes its check
    bad = tmp_path / "bad.json.gz"
    data = gzip.decompress(punkt.ASSET.read_bytes()).replace(b'"mr"', b'"xx"')
    bad.write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match="sha256"):
        punkt._read_asset(bad)
    # a punkt_tab folder -> asset -> the same parameters, byte-reproducibly
    src = tmp_path / "english"
    src.mkdir()
    (src / "abbrev_types.txt").write_text("mr\nst\nu.s\n")
    (src / "collocations.tab").write_text("##number##\tinternational\n")
    (src / "sent_starters.txt").write_text("he\nthe\n")
    (src / "ortho_context.tab").write_text("he\t110\nshirt\t32\n")
    sha = punkt.write_asset(src, tmp_path / "a.json.gz")
    assert punkt.write_asset(src, tmp_path / "b.json.gz") == sha
    got = punkt._read_asset(tmp_path / "a.json.gz", sha)
    assert got["abbrev_types"] == ["mr", "st", "u.s"] and got["ortho_context"] == {"he": 110, "shirt": 32}
    assert got["collocations"] == [["##number##", "international"]]
    (src / "collocations.tab").write_text("oops\n")
    with pytest.raises(ValueError, match="two tab-separated fields"):
        punkt.write_asset(src, tmp_path / "c.json.gz")


# -- HF and CLIP tokenizers --------------------------------------------------------------------------------

def test_hf_tokenizer_from_local_folder(tmp_path):
    from itmzoo.data.tokenizers import HFTokenizer

    folder = str(bert_tokenizer_folder(tmp_path / "tok", WORDS))  # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 a=5 ...
    ids = {w: i for i, w in enumerate(WORDS)}
    tok = HFTokenizer(folder)
    b = tok(["A man riding a horse.", "hi"])
    assert b["input_ids"][0].tolist() == [2, ids["a"], ids["man"], ids["riding"], ids["a"], ids["horse"], ids["."], 3]
    assert b["input_ids"][1].tolist()[:3] == [2, ids["hi"], 3] and b["input_ids"][1, 3:].eq(0).all()
    assert b["lengths"].tolist() == [8, 3] and b["attention_mask"].sum(1).tolist() == [8, 3]
    assert tok(["zebra"])["input_ids"].tolist() == [[2, 1, 3]]  # unknown word -> [UNK]
    cut = HFTokenizer(folder, max_length=5, pad_to_max_length=True)(["a b c d e f g", "x"])
    assert cut["input_ids"].shape == (2, 5) and cut["input_ids"][0, -1].item() == 3
    assert cut["input_ids"][1].tolist() == [2, ids["x"], 3, 0, 0]
    assert pickle.loads(pickle.dumps(tok))(["hi"])["input_ids"].tolist() == [[2, ids["hi"], 3]]


def test_hf_tokenizer_offline_errors_are_clear(tmp_path):
    from itmzoo.data.tokenizers import HFTokenizer, TokenizerError

    with pytest.raises(TokenizerError, match="tokenizer folder not found"):
        HFTokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="pass the local folder"):
        HFTokenizer("itmzoo-no-such-org/no-such-tokenizer")


def test_clip_tokenizer_matches_upstream_ids(tmp_path):
    import hashlib

    from itmzoo.data.tokenizers import CLIP_BPE_PATH, CLIP_BPE_SHA256, CLIPTokenizer

    assert hashlib.sha256(CLIP_BPE_PATH.read_bytes()).hexdigest() == CLIP_BPE_SHA256
    tok = CLIPTokenizer()
    b = tok(["a man riding a horse on a beach", "Hello, World!"])
    # ids produced by ESL's SimpleTokenizer (OpenAI CLIP's BPE, as ESL ships it)
    assert b["input_ids"][0, :11].tolist() == [49406, 320, 786, 6765, 320, 4558, 525, 320, 2117, 49407, 0]
    assert b["input_ids"].shape == (2, 77) and b["lengths"].tolist() == [10, 6]
    assert tok.decode(b["input_ids"][1, 1:5].tolist()) == "hello , world ! "
    long = " ".join(["dog"] * 100)
    assert tok([long])["input_ids"][0, -1].item() == 49407  # open_clip / clip.tokenize(truncate=True)
    assert CLIPTokenizer(truncate="cut")([long])["input_ids"][0, -1].item() != 49407  # ESL
    # Hugging Face layout: a folder with merges.txt ("#version: 0.2" header)
    import gzip

    lines = gzip.open(CLIP_BPE_PATH).read().decode("utf-8").split("\n")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1:49152 - 256 - 2 + 1]) + "\n")
    assert torch.equal(CLIPTokenizer(tmp_path)(["a man riding"])["input_ids"], tok(["a man riding"])["input_ids"])
    assert CLIPTokenizer(pad_to_context=False)(["a dog"])["input_ids"].shape == (1, 4)


# -- transforms ---------------------------------------------------------------------------------------------

def test_image_transforms_per_backbone():
    from PIL import Image

    img = Image.new("RGB", (60, 40), (255, 0, 0))
    clip = image_transform("clip", size=32)
    x = clip(img)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    assert image_transform("vit", size=32)(img).shape == (3, 32, 32)
    assert image_transform("vit", size=32, train=True)(img).shape == (3, 32, 32)
    assert image_transform("imagenet", size=32, train=True)(img).shape == (3, 32, 32)
    assert image_transform("clip", size=32, train=True)(img).shape == (3, 32, 32)
    pickle.dumps(clip)
    with pytest.raises(ValueError, match="unknown backbone"):
        image_transform("resnet")


def test_region_transform_drops_like_vse_infinity():
    x = np.arange(36 * 4, dtype=np.float32).reshape(36, 4)
    ev = RegionTransform(train=False)(x)
    assert isinstance(ev, torch.Tensor) and ev.dtype == torch.float32 and torch.equal(ev, torch.from_numpy(x))
    torch.manual_seed(0)
    kept = [len(RegionTransform(train=True)(x)) for _ in range(300)]
    assert 27.5 < np.mean(kept) < 30.1  # 36 * 0.8 = 28.8
    assert min(len(RegionTransform(train=True, drop_prob=0.99)(x)) for _ in range(50)) >= 1
    ro = np.lib.stride_tricks.as_strided(x)  # a read-only view, like a row of a memmap
    ro.flags.writeable = False
    assert RegionTransform()(ro).shape == (36, 4)


# -- collate and loaders --------------------------------------------------------------------------------

def test_pad_sequences_pads_and_stacks():
    out, n = pad_sequences([torch.ones(2, 3), torch.ones(4, 3)])
    assert out.shape == (2, 4, 3) and n.tolist() == [2, 4] and out[0, 2:].eq(0).all()
    same, n = pad_sequences([torch.ones(3, 2), torch.zeros(3, 2)])
    assert same.shape == (2, 3, 2) and n.tolist() == [3, 3]


def test_loaders_with_worker_processes():
    import itmzoo

    model = itmzoo.build("toy_vse", img_dim=16, embed_size=8, hash_buckets=64, word_dim=8)
    split = SyntheticShapes({"test": 7}, seed=0, region_dim=16).split("test")
    images, captions = eval_loaders(split, model, batch_size=4, num_workers=1)
    assert isinstance(captions.collate_fn, TextCollate) and isinstance(images.collate_fn, ImageCollate)
    model_bytes = len(pickle.dumps(model))
    for collate in (images.collate_fn, captions.collate_fn):  # what spawn/forkserver send to each worker
        assert len(pickle.dumps(collate)) < model_bytes / 10
    img_batches = list(images)
    cap_batches = list(captions)
    assert sum(len(b["regions"]) for b in img_batches) == 7 and img_batches[0]["regions"].shape == (4, 36, 16)
    assert sum(len(b["input_ids"]) for b in cap_batches) == 35
    from itmzoo.train.data import make_train_loader

    tl = make_train_loader(split, model, 5, seed=0)
    assert len(pickle.dumps(tl.dataset.collate)) < model_bytes / 10
    batch = next(iter(tl))
    assert set(batch) >= {"regions", "region_lengths", "input_ids", "attention_mask", "lengths", "image_index"}


def test_pixel_split_through_transforms():
    split = SyntheticShapes({"test": 2}, seed=0, image_size=24).split("test", kind="pixels")
    t = image_transform("clip", size=32)
    assert t(split.images[1]).shape == (3, 32, 32)
    assert load_pil(split.images[0]).size == (24, 24)
