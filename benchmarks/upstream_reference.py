"""The authors' code as a timing reference: ESA and LHSC training steps and LHSC's evaluation scoring.

Each public function builds everything once and returns a zero-argument callable that runs one timed
unit of the authors' code on the CPU, with torch's current thread settings:

* `esa_step`: ``KevinLight831/ESA @ c94e9b892b437a6bfd2e69b4ca6cae9b60489ca1`` (``ESA_BIGRU``), the
  model of a demo configuration's ``model:`` section, one training batch: zero_grad, the authors'
  ``forward_emb`` + ``forward_loss`` (SEL), backward; no clipping, no optimizer step.
* `lhsc_step`: ``lDarryll/LHSC @ 1aa2753b88c99eb7900c12402f4087bc5c709bd7``, the same for LHSC:
  ``forward_emb`` + ``forward_sim`` + ``forward_loss``, backward.
* `lhsc_sim`: LHSC at the paper's sizes, the authors' ``evaluation.shard_attn_scores`` over
  ``n_images x n_captions`` pre-encoded pairs (``torch.no_grad``; ``EncoderSimilarity.forward`` loops
  over the captions).

The inputs are those of ``benchmarks/bench_under_load.py`` (the same demo data and batch size, the same
generator seeds); the weights are the authors' random initialisation after ``torch.manual_seed(0)``.
The authors' code is imported from a checkout given as an argument, never copied here; the import and
the Python-3/CPU patches are the fixture generators' (tests/fixtures/esa/make_fixtures.py,
tests/fixtures/lhsc/make_fixtures.py). Importing ESA installs that generator's module stubs
(``torchtext``, ``cv2``, ``imageio``, ``tensorboard_logger``) and its nltk patch in this process.

Smoke test (run from the repository root: the demo configurations name their files relative to it):

    python benchmarks/upstream_reference.py --esa-upstream DIR --lhsc-upstream DIR
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import importlib.util
import io
import random
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import itmzoo

__all__ = ["esa_step", "lhsc_sim", "lhsc_sim_inputs", "lhsc_step"]

ROOT = Path(__file__).resolve().parents[1]
Timed = Callable[[], None]
# a callable that returns what the check inspects, and the parameters whose gradients it checks
_Built = tuple[Callable[[], Any], list[torch.nn.Parameter]]


# ------------------------------------------------------------------------------------- loading upstream


@functools.cache
def _generator(name: str) -> types.ModuleType:
    """tests/fixtures/<name>/make_fixtures.py as a module (they are scripts, not a package)."""
    path = ROOT / "tests" / "fixtures" / name / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location(f"{name}_make_fixtures", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def _esa_upstream(upstream: Path) -> types.SimpleNamespace:
    """ESA_BIGRU's ``lib.encoders``, ``lib.loss``, ``lib.evaluation`` (which imports ``lib.vse``), ..."""
    gen = _generator("esa")
    if not (upstream / "ESA_BIGRU" / "lib" / "vse.py").is_file():
        raise SystemExit(f"{upstream}: no ESA_BIGRU/lib/vse.py (expected a KevinLight831/ESA checkout)")
    gen.install_stubs()
    return gen.import_upstream(upstream, "ESA_BIGRU")


@functools.cache
def _lhsc_upstream(upstream: Path) -> types.SimpleNamespace:
    """LHSC's ``model`` and ``evaluation`` from a patched temporary copy (kept until the process exits)."""
    gen = _generator("lhsc")
    if not (upstream / "model.py").is_file():
        raise SystemExit(f"{upstream}: no model.py (expected an lDarryll/LHSC checkout)")
    tmp = Path(tempfile.mkdtemp(prefix="lhsc_upstream_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    copy = gen.patched_copy(upstream.resolve(), tmp / "LHSC")
    sys.path.insert(0, str(copy))
    try:
        mods = {k: importlib.import_module(k) for k in ("model", "evaluation")}
    finally:
        sys.path.remove(str(copy))
    for k, m in mods.items():  # upstream's modules are top-level: another `model` would shadow them
        if not Path(m.__file__ or "").resolve().is_relative_to(copy.resolve()):
            raise RuntimeError(f"import {k} found {m.__file__}, not LHSC's")
    return types.SimpleNamespace(**mods)


# ------------------------------------------------------------------------------------------ inputs


def lhsc_sim_inputs(n_images: int, n_captions: int, num_regions: int = 36, embed: int = 1024
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoded LHSC features of the scoring benchmarks (the same draws for itmzoo and the authors):
    l2-normalised regions ``[n_images, R, D]``, caption tokens ``[n_captions, L, D]`` (zero past each
    length), the lengths (8..22) and the token mask."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 23, (n_captions,), generator=g)
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    regions = torch.nn.functional.normalize(torch.randn(n_images, num_regions, embed, generator=g), dim=-1)
    tokens = torch.nn.functional.normalize(torch.randn(n_captions, mask.shape[1], embed, generator=g), dim=-1)
    return regions, tokens * mask[..., None], lengths, mask


def _demo_batch(config: str) -> tuple[dict, Any, list[str], torch.Tensor]:
    """(config, itmzoo model, captions, regions ``[n, R, D]``): the batch of bench_under_load's ``_demo``."""
    import yaml

    from itmzoo.data import load_split

    with open(config) as f:
        cfg = yaml.safe_load(f)
    torch.manual_seed(0)
    model = itmzoo.build(cfg["model"]["name"], **{k: v for k, v in cfg["model"].items() if k != "name"})
    n = cfg["train"]["batch_size"]
    spec = {k: v for k, v in cfg["data"].items() if k not in ("train", "dev", "test", "num_images")}
    split = load_split({**spec, "num_images": {"train": n}, "split": "train"})
    caps = [split.captions[5 * i] for i in range(n)]
    regions = torch.stack([torch.as_tensor(np.asarray(split.images[i], dtype=np.float32)) for i in range(n)])
    return cfg, model, caps, regions


# ------------------------------------------------------------------------------------------ builders


def _esa(upstream: Path, config: str) -> _Built:
    cfg, model, caps, regions = _demo_batch(config)
    c = model.config
    if cfg["model"]["name"] != "esa_bigru":
        raise ValueError(f"{config}: esa_step runs ESA_BIGRU, the config builds {cfg['model']['name']}")
    gen, up = _generator("esa"), _esa_upstream(upstream)
    # the warm-up epoch: upstream's train.py turns max_violation on only from epoch
    # vse_mean_warmup_epochs; itmzoo's bench step runs at epoch 0 (all negatives summed) as well
    max_violation = model.use_max_violation()
    # the authors' collate_fn layout: captions [B, hardnum, T] (augmented copies), float lengths [B, hardnum]
    n, h = regions.shape[0], c.hardnum
    views = model.tokenizer(caps, train=True, rng=random.Random(0))
    captions = views["views_input_ids"].reshape(n, h, -1)
    cap_lens = views["views_lengths"].reshape(n, h).float()
    img_lens = torch.full((n,), float(regions.shape[1]))
    opt = argparse.Namespace(
        img_dim=c.img_dim, embed_size=c.embed_size, word_dim=c.word_dim, num_layers=c.num_layers,
        vocab_size=c.vocab_size, hardnum=h, margin=c.margin, max_violation=max_violation,
        no_imgnorm=c.no_imgnorm, no_txtnorm=c.no_txtnorm, precomp_enc_type=c.precomp_enc_type,
        grad_clip=cfg["train"].get("grad_clip", 2.0), learning_rate=cfg["train"]["lr"], optim="adam",
        data_name="f30k")
    vocab = model.tokenizer.vocab
    words = [w for w, _ in sorted(vocab.word2idx.items(), key=lambda kv: kv[1]) if w != "<mask>"]
    # no GloVe file: every embedding row keeps its random init (the stand-in finds no word)
    gen.set_glove([], np.zeros((0, c.word_dim), np.float32))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        gen.write_vocab(Path(tmp), words)  # the text encoder reads it at init (GloVe lookup)
        opt.vocab_path = tmp
        torch.manual_seed(0)
        vse = up.evaluation.VSEModel(opt)
    vse.logger = up.evaluation.LogCollector()  # train.py sets it before train_emb
    vse.train_start()
    # train_emb's reshapes, done once
    captions_all, caption_lens = captions.reshape(n * h, -1), cap_lens.reshape(-1)
    params = list(vse.params)

    def run() -> torch.Tensor:
        for m in (vse.img_enc, vse.txt_enc):
            m.zero_grad(set_to_none=True)
        # cuda_shim (generator patch 4): the SEL loss builds its positive mask only under CUDA, and
        # forward_emb calls .cuda() on the lengths unconditionally; .cuda() is the identity here
        with gen.cuda_shim():
            img_emb, cap_emb = vse.forward_emb(regions, captions_all, caption_lens, image_lengths=img_lens)
            loss = vse.forward_loss(img_emb, cap_emb)
        loss.backward()
        return loss.detach()

    return run, params


def _lhsc(upstream: Path, config: str) -> _Built:
    cfg, model, caps, regions = _demo_batch(config)
    c = model.config
    if cfg["model"]["name"] != "lhsc":
        raise ValueError(f"{config}: lhsc_step needs an lhsc config, got {cfg['model']['name']}")
    up = _lhsc_upstream(upstream)
    # itmzoo's bench step runs at epoch 0: hardest negatives only once the warm-up (an itmzoo option,
    # upstream has none) is over, else the sum over all negatives
    hardest = c.max_violation and c.vse_mean_warmup_epochs <= 0
    tok = model.tokenizer(caps, train=True)
    lengths = tok["lengths"].tolist()
    # the authors' collate_fn: pairs sorted by caption length, longest first (pack_padded_sequence needs it)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    images = regions[order]
    captions = tok["input_ids"][order][:, : max(lengths)]
    lens = [lengths[i] for i in order]
    opt = argparse.Namespace(
        img_dim=c.img_dim, word_dim=c.word_dim, embed_size=c.embed_size, sim_dim=c.sim_dim,
        num_layers=c.num_layers, bi_gru=c.bi_gru, no_imgnorm=c.no_imgnorm, no_txtnorm=c.no_txtnorm,
        drop_out=c.text_attn_dropout, margin=c.margin, max_violation=hardest,
        grad_clip=cfg["train"].get("grad_clip", 2.0), learning_rate=cfg["train"]["lr"], vocab_size=c.vocab_size)
    torch.manual_seed(0)
    lhsc = up.model.LHSC(opt)
    if regions.shape[1] != 36:
        # patch: EncoderSimilarity hard-codes VisualSA(embed_size, 0.4, 36), whose BatchNorm1d(36) runs over
        # the region axis; the demo data has fewer regions, so that module is rebuilt (authors' class) for them
        lhsc.sim_enc.v_global_w = up.model.VisualSA(opt.embed_size, 0.4, regions.shape[1])
    lhsc.logger = up.evaluation.LogCollector()  # train.py sets it before train_emb
    lhsc.train_start()
    mods = (lhsc.img_enc, lhsc.txt_enc, lhsc.sim_enc)
    params = [p for m in mods for p in m.parameters()]

    def run() -> torch.Tensor:
        for m in mods:
            m.zero_grad(set_to_none=True)
        img_embs, cap_embs, cap_lens = lhsc.forward_emb(images, captions, lens)
        sims = lhsc.forward_sim(img_embs, cap_embs, cap_lens)
        loss = lhsc.forward_loss(sims)
        loss.backward()
        return loss.detach()

    return run, params


def _lhsc_scores(upstream: Path, n_images: int, n_captions: int, shard_size: int) -> _Built:
    from itmzoo.models.lhsc import LHSCConfig

    up = _lhsc_upstream(upstream)
    c = LHSCConfig()  # the release's opts.py defaults: embed 1024, sim_dim 256, f30k vocabulary
    opt = argparse.Namespace(
        img_dim=c.img_dim, word_dim=c.word_dim, embed_size=c.embed_size, sim_dim=c.sim_dim,
        num_layers=c.num_layers, bi_gru=c.bi_gru, no_imgnorm=c.no_imgnorm, no_txtnorm=c.no_txtnorm,
        drop_out=c.text_attn_dropout, margin=c.margin, max_violation=c.max_violation, grad_clip=2.0,
        learning_rate=2e-4, vocab_size=c.vocab_size)
    torch.manual_seed(0)
    lhsc = up.model.LHSC(opt)
    lhsc.val_start()
    regions, tokens, lengths, _mask = lhsc_sim_inputs(n_images, n_captions, c.num_regions, c.embed_size)
    # what encode_data hands to shard_attn_scores: numpy embeddings and a list of caption lengths
    img_embs, cap_embs, cap_lens = regions.numpy(), tokens.numpy(), lengths.tolist()

    def run() -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):  # it writes a progress line per shard
            return up.evaluation.shard_attn_scores(lhsc, img_embs, cap_embs, cap_lens, opt, shard_size=shard_size)

    return run, []


def _discard(built: _Built) -> Timed:
    run = built[0]

    def timed() -> None:
        run()

    return timed


# ------------------------------------------------------------------------------------------- public


def esa_step(upstream: Path, config: str = "configs/esa_demo_synthetic.yaml") -> Timed:
    """One training step of the authors' ESA-BiGRU on a demo configuration's batch.

    `upstream`: a ``KevinLight831/ESA @ c94e9b892b437a6bfd2e69b4ca6cae9b60489ca1`` checkout. The model
    has the config's ``model:`` sizes (random init after ``torch.manual_seed(0)``; no GloVe file, so the
    word embeddings keep their random init); the batch is ``train.batch_size`` images of the config's
    data with one caption each, as itmzoo's bench, tokenised by itmzoo's ``esa_bigru`` training tokenizer
    (ESA's word augmentation, ``random.Random(0)``) into the authors' ``collate_fn`` layout
    (``[B, hardnum, T]`` ids, float lengths). The loss is that of the first epoch, as itmzoo's step at
    epoch 0: with the demo's ``vse_mean_warmup_epochs`` (2) ``max_violation`` is off (all negatives
    summed), as in upstream's train.py before that epoch. Patches: the ESA generator's stubs and
    ``cuda_shim`` (CUDA-only mask, ``.cuda()`` calls), an empty GloVe stand-in.
    """
    return _discard(_esa(Path(upstream), config))


def lhsc_step(upstream: Path, config: str = "configs/lhsc_demo_synthetic.yaml") -> Timed:
    """One training step of the authors' LHSC on a demo configuration's batch.

    `upstream`: an ``lDarryll/LHSC @ 1aa2753b88c99eb7900c12402f4087bc5c709bd7`` checkout, imported from a
    temporary copy with the LHSC generator's ``PATCHES`` (integer division, CPU placement). Sizes from
    the config's ``model:`` section (random init after ``torch.manual_seed(0)``), the batch as itmzoo's
    bench (``train.batch_size`` pairs, itmzoo's ``lhsc`` tokenizer = the authors' ids), sorted by caption
    length as the authors' ``collate_fn``. Loss: hardest negatives only if the config's
    ``vse_mean_warmup_epochs`` is 0, else all negatives, as itmzoo's step at epoch 0. One more patch when
    the data has other than 36 regions: ``sim_enc.v_global_w`` is rebuilt as ``VisualSA(embed, 0.4, R)``.
    """
    return _discard(_lhsc(Path(upstream), config))


def lhsc_sim(upstream: Path, n_images: int = 40, n_captions: int = 200, shard_size: int = 100) -> Timed:
    """The authors' evaluation scoring of ``n_images x n_captions`` LHSC pairs at the paper's sizes.

    ``evaluation.shard_attn_scores`` (``shard_size`` 100, as evalrank and train.py call it) on random
    l2-normalised regions ``[n_images, 36, 1024]`` and caption tokens (lengths 8..22, zero past each
    length) from `lhsc_sim_inputs`, the inputs of itmzoo's side too; eval mode, ``torch.no_grad``, random
    weights after ``torch.manual_seed(0)``. Unlike itmzoo's side there, the VisualSA/TextSA global vectors
    are computed inside the timed call (the authors' forward does that per shard and per caption).
    """
    return _discard(_lhsc_scores(Path(upstream), n_images, n_captions, shard_size))


# -------------------------------------------------------------------------------------------- check


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--esa-upstream", required=True, type=Path, help="KevinLight831/ESA checkout")
    ap.add_argument("--lhsc-upstream", required=True, type=Path, help="lDarryll/LHSC checkout")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    cases = {"esa_step": lambda: _esa(args.esa_upstream, "configs/esa_demo_synthetic.yaml"),
             "lhsc_step": lambda: _lhsc(args.lhsc_upstream, "configs/lhsc_demo_synthetic.yaml"),
             "lhsc_sim": lambda: _lhsc_scores(args.lhsc_upstream, 40, 200, 100)}
    for name, build in cases.items():
        t0 = time.perf_counter()
        run, params = build()
        t1 = time.perf_counter()
        out = run()
        t2 = time.perf_counter()
        values = torch.as_tensor(out)
        assert bool(torch.isfinite(values).all()), f"{name}: non-finite output"
        grads = [p.grad for p in params if p.grad is not None]
        assert all(bool(torch.isfinite(g).all()) for g in grads), f"{name}: non-finite gradient"
        assert not params or grads, f"{name}: no gradient reached the parameters"
        desc = f"loss {values.item():.4f}, {len(grads)}/{len(params)} grads finite" if params else \
            f"scores {tuple(values.shape)} in [{values.min().item():.4f}, {values.max().item():.4f}]"
        print(f"{name:<10} build {t1 - t0:6.2f} s, one call {t2 - t1:6.3f} s  ({desc})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
