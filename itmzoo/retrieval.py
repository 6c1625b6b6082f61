"""Retrieval for people: encode raw captions and images, search a gallery, save and load an index.

* `encode_captions(model, ["a red circle", ...])` and `encode_images(model, [PIL image | path | array])`
  run the model's own tokenizer and evaluation transform in batches (``encode_text`` / ``encode_image``
  take batches of tensors; these take what a person has).
* `Retriever(model, images=..., captions=...)` encodes a gallery once and answers text -> images
  (`search_images`) and image -> captions (`search_captions`) with the top k and their scores:

  - embedding models: one product (exact in torch, or a FAISS inner-product index when faiss is
    installed and the model scores by the plain dot product);
  - cross models: every pair (small galleries), or an embedding ``first_stage`` model's top
    ``rerank_k`` re-scored by the cross model;
  - two-stage models: their own first stage, then their second stage on the top ``rerank_k``.

  Re-scoring uses the evaluator's second-stage code (`itmzoo.eval.rerank.score_candidates`).
* `Retriever.save(dir)` / `Retriever.load(dir)`: embeddings (safetensors), ids, the model's name and
  config, the FAISS index where one applies; written atomically.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .eval.options import DEFAULT_BLOCK, DEFAULT_RERANK_K, EvalOptions
from .eval.similarity import encode_batches, similarity_matrix
from .features import Features, features_len

__all__ = ["Retriever", "SearchResult", "encode_captions", "encode_images", "faiss_available", "prepare_image"]

DEFAULT_BATCH = EvalOptions.batch_size  # the evaluator's default, so search encodes as evaluation does
INDEX_FORMAT = "itmzoo-index-1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package (extra ``itmzoo[faiss]``) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# -- raw inputs -> batches -> features ------------------------------------------------------------

def _as_caption_list(captions: Any) -> list[str]:
    if isinstance(captions, str):
        return [captions]
    if isinstance(captions, (list, tuple)) and all(isinstance(c, str) for c in captions):
        return list(captions)
    got = type(captions).__name__
    if isinstance(captions, (list, tuple)):
        bad = next(c for c in captions if not isinstance(c, str))
        got = f"a {type(captions).__name__} holding a {type(bad).__name__}"
    raise TypeError(f"captions must be a string or a list of strings, got {got}")


def prepare_image(model: Any, image: Any) -> Any:
    """One raw image as the model's evaluation transform takes it (a region array or a PIL image).

    Region models take ``[R, D]`` arrays/tensors or ``.npy`` paths; pixel models take PIL images,
    paths, encoded bytes or ``[H, W, 3]`` uint8 arrays.
    """
    kind = model.input_kind
    if kind == "regions":
        if isinstance(image, (str, Path)):
            if Path(image).suffix != ".npy":
                raise TypeError(f"{type(model).__name__} takes region features ([R, D] arrays or .npy files), "
                                f"got the path {image}; a picture needs a pixel model")
            image = np.load(image, allow_pickle=False)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(f"{type(model).__name__} takes region features ([R, D] arrays), got "
                            f"{type(image).__name__}")
        if image.ndim != 2:
            raise ValueError(f"region features must be [R, D], got shape {tuple(image.shape)}")
        return image
    from PIL import Image

    from .data.split import load_pil

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a picture array must be [H, W, 3] uint8, got shape {tuple(image.shape)} "
                             f"{image.dtype}" + ("; region features need a region model" if image.ndim == 2 else ""))
        return Image.fromarray(image, "RGB")
    if isinstance(image, (str, Path, bytes, Image.Image)):
        return load_pil(image)
    raise TypeError(f"{type(model).__name__} takes pictures (PIL images, paths, bytes or [H, W, 3] uint8 arrays), "
                    f"got {type(image).__name__}")


def _as_image_list(model: Any, images: Any) -> Sequence[Any]:
    if isinstance(images, (str, Path, bytes)) or _is_one_image(model, images):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)) or isinstance(images, Sequence):
        return images  # a stack [N, R, D] / [N, H, W, 3] or a list
    raise TypeError(f"images must be a list of images (or one image), got {type(images).__name__}")


def _is_one_image(model: Any, x: Any) -> bool:
    from PIL import Image

    if isinstance(x, Image.Image):
        return True
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == (2 if model.input_kind == "regions" else 3)
    return False


def _batches(n: int, size: int) -> Iterable[range]:
    for a in range(0, n, size):
        yield range(a, min(a + size, n))


@torch.no_grad()
def _encode(model: Any, fn: Any, make_batch: Any, n: int, batch_size: int, device: Any, desc: str,
            progress: bool) -> Features:
    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    if n == 0:
        raise ValueError(f"nothing to encode ({desc}: an empty list)")
    try:
        return encode_batches(fn, map(make_batch, _batches(n, batch_size)), device, None, "cpu", desc, progress)
    finally:
        model.train(was_training)


def encode_captions(model: Any, captions: str | Sequence[str], batch_size: int | None = None,
                    device: str | torch.device | None = None, progress: bool = False) -> Features:
    """Features of raw captions (N rows, on the CPU), through the model's tokenizer, in batches.

    The batch size defaults to the model's ``eval_settings().text_batch_size`` (text encoders whose
    features depend on batch padding), else 128.
    """
    caps = _as_caption_list(captions)
    bs = batch_size or model.eval_settings().text_batch_size or DEFAULT_BATCH
    tok = model.tokenizer
    return _encode(model, model.encode_text, lambda idx: tok([caps[i] for i in idx], train=False), len(caps), bs,
                   device, "encode captions", progress)


def encode_images(model: Any, images: Any, batch_size: int | None = None,
                  device: str | torch.device | None = None, progress: bool = False) -> Features:
    """Features of raw images (N rows, on the CPU), through the model's evaluation transform, in batches.

    Region models: ``[R, D]`` arrays/tensors, ``.npy`` paths, or one ``[N, R, D]`` stack. Pixel models:
    PIL images, paths, encoded bytes, ``[H, W, 3]`` uint8 arrays. One image alone is accepted too.
    """
    from .data.collate import collate_images

    items = _as_image_list(model, images)
    bs = batch_size or model.eval_settings().image_batch_size or DEFAULT_BATCH
    transform = model.image_transform_for(False)

    def make(idx: range) -> dict[str, torch.Tensor]:
        return collate_images([transform(prepare_image(model, items[i])) for i in idx], model.input_kind)

    return _encode(model, model.encode_image, make, len(items), bs, device, "encode images", progress)


# -- search ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class SearchResult:
    """Top-k gallery items of each query, best first: ``indices``/``scores`` are ``[n_queries, k]``."""

    indices: torch.Tensor
    scores: torch.Tensor
    ids: list[list[Any]]
    captions: list[list[str]] | None = None  # image -> caption searches: the captions' text

    def to_list(self) -> list[list[dict[str, Any]]]:
        """Per query, ``[{"rank", "index", "id", "score"(, "caption")}, ...]`` (JSON-ready)."""
        out = []
        for q in range(len(self.indices)):
            hits = []
            for r, (i, s) in enumerate(zip(self.indices[q].tolist(), self.scores[q].tolist())):
                hit = {"rank": r + 1, "index": int(i), "id": self.ids[q][r], "score": float(s)}
                if self.captions is not None:
                    hit["caption"] = self.captions[q][r]
                hits.append(hit)
            out.append(hits)
        return out


def _is_plain_product(model: Any) -> bool:
    from .models.base import ITMModel

    return model.scoring == "embedding" and type(model).similarity is ITMModel.similarity


class Retriever:
    """A gallery of images and/or captions encoded once; search it by text or by image.

    Args:
        model: any itmzoo model (embedding, cross or two-stage scoring).
        images, captions: the gallery (raw inputs as `encode_images` / `encode_captions` take them).
        image_ids, caption_ids: what a result names (default: the gallery positions).
        first_stage: cross models only: an embedding model taking the same images whose top
            ``rerank_k`` candidates the cross model re-scores; without it a cross model scores every pair.
        rerank_k: candidates re-scored per query (cross with a first stage, two-stage); default: the
            model's ``eval_settings().rerank_k``, else 128.
        backend: ``"auto"`` (FAISS for plain-product embedding models when installed, else torch),
            ``"torch"`` or ``"faiss"``.
    """

    def __init__(self, model: Any, images: Any = None, captions: Any = None, *, image_ids: Sequence[Any] | None = None,
                 caption_ids: Sequence[Any] | None = None, first_stage: Any = None, rerank_k: int | None = None,
                 backend: str = "auto", batch_size: int | None = None, device: str | torch.device | None = None,
                 progress: bool = False, _features: dict[str, Any] | None = None) -> None:
        if model.scoring not in ("embedding", "cross", "two-stage"):
            raise ValueError(f"unknown scoring kind {model.scoring!r}")
        if first_stage is not None:
            if model.scoring != "cross":
                raise ValueError(f"first_stage is for cross models; {type(model).__name__} scores by "
                                 f"{model.scoring!r} and ranks on its own")
            if first_stage.scoring != "embedding" or first_stage.input_kind != model.input_kind:
                raise ValueError(f"first_stage must be an embedding model taking {model.input_kind}, got a "
                                 f"{first_stage.scoring} model taking {first_stage.input_kind}")
        if backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
        if backend == "faiss":
            if not _is_plain_product(model):
                raise ValueError(f"backend='faiss' needs an embedding model scored by the plain dot product; "
                                 f"{type(model).__name__} scores by {model.scoring!r}")
            if not faiss_available():
                raise ImportError("backend='faiss' needs the faiss package: pip install 'itmzoo[faiss]' (faiss-cpu)")
        self.model, self.first_stage = model, first_stage
        self.backend = ("faiss" if backend == "auto" and _is_plain_product(model) and faiss_available()
                        else "torch" if backend == "auto" else backend)
        self.rerank_k = rerank_k or model.eval_settings().rerank_k or DEFAULT_RERANK_K
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self._faiss: dict[str, Any] = {}
        if _features is not None:  # from load()
            self.features = _features
        else:
            self.features = {}
            if images is not None:
                self.features["image"] = self._encode_images(images)
            if captions is not None:
                self.features["caption"] = self._encode_captions(captions)
        self.image_ids = self._ids("image", image_ids)
        self.caption_ids = self._ids("caption", caption_ids)
        self.captions = list(_as_caption_list(captions)) if captions is not None else None

    @classmethod
    def from_split(cls, model: Any, split: Any, **kwargs: Any) -> "Retriever":
        """A gallery of every image and caption of a `RetrievalSplit` (ids: its image ids and captions)."""
        return cls(model, images=split.images, captions=split.captions,
                   image_ids=list(split.image_ids) if split.image_ids is not None else None, **kwargs)

    @classmethod
    def from_features(cls, model: Any, image_features: Features | None = None, caption_features: Features | None = None,
                      **kwargs: Any) -> "Retriever":
        """A gallery of features already encoded by `model` (e.g. by `encode_images`, or exported earlier).

        Not for cross models with a first stage, which need both models' features (build those from inputs).
        """
        if kwargs.get("first_stage") is not None:
            raise ValueError("from_features does not take first_stage; give the raw gallery to Retriever(...)")
        feats = {w: {"model": f} for w, f in (("image", image_features), ("caption", caption_features))
                 if f is not None}
        return cls(model, _features=feats, **kwargs)

    # -- encoding: the model's own features plus, for cross + first stage, the first stage's ---------
    def _encode_images(self, images: Any) -> dict[str, Features]:
        out = {"model": encode_images(self.model, images, self.batch_size, self.device, self.progress)}
        if self.first_stage is not None:
            out["first"] = encode_images(self.first_stage, images, self.batch_size, self.device, self.progress)
        return out

    def _encode_captions(self, captions: Any) -> dict[str, Features]:
        out = {"model": encode_captions(self.model, captions, self.batch_size, self.device, self.progress)}
        if self.first_stage is not None:
            out["first"] = encode_captions(self.first_stage, captions, self.batch_size, self.device, self.progress)
        return out

    def _ids(self, what: str, ids: Sequence[Any] | None) -> list[Any] | None:
        if what not in self.features:
            return None
        n = features_len(self.features[what]["model"])
        if ids is None:
            return list(range(n))
        if len(ids) != n:
            raise ValueError(f"{len(ids)} {what}_ids for a gallery of {n} {what}s")
        return list(ids)

    def __len__(self) -> int:
        return sum(features_len(f["model"]) for f in self.features.values())

    def __repr__(self) -> str:
        n = {k: features_len(v["model"]) for k, v in self.features.items()}
        return (f"Retriever({type(self.model).__name__}, {self.model.scoring}, images={n.get('image', 0)}, "
                f"captions={n.get('caption', 0)}, backend={self.backend!r})")

    # -- queries -----------------------------------------------------------------------------------
    def search_images(self, queries: str | Sequence[str], k: int = 5) -> SearchResult:
        """Text -> images: the top `k` gallery images of each caption query."""
        if "image" not in self.features:
            raise ValueError("this Retriever holds no images; build it with images=...")
        q = self._encode_captions(queries)
        return self._search(self.features["image"], q, k, "t2i", self.image_ids)

    def search_captions(self, images: Any, k: int = 5) -> SearchResult:
        """Image -> captions: the top `k` gallery captions of each image query."""
        if "caption" not in self.features:
            raise ValueError("this Retriever holds no captions; build it with captions=...")
        q = self._encode_images(images)
        res = self._search(q, self.features["caption"], k, "i2t", self.caption_ids)
        if self.captions is not None:
            res.captions = [[self.captions[i] for i in row] for row in res.indices.tolist()]
        return res

    def _scores(self, model: Any, img: Features, txt: Features, direction: str) -> torch.Tensor:
        """All first-stage (or single-stage) scores ``[n_queries, n_gallery]``."""
        block = model.eval_settings().block or DEFAULT_BLOCK
        device = torch.device(self.device) if self.device is not None else model.device
        s = similarity_matrix(model, img, txt, block=block, device=device, progress=False)
        return s if direction == "i2t" else s.t()

    def _product_topk(self, img: torch.Tensor, txt: torch.Tensor, k: int, direction: str):
        """Exact top k by one product per chunk of queries (scores of at most 2**26 pairs at a time)."""
        gallery, queries = (txt, img) if direction == "i2t" else (img, txt)
        device = torch.device(self.device) if self.device is not None else self.model.device
        g = gallery.to(device)
        step = max(1, (1 << 26) // max(len(g), 1))
        scores, idx = [], []
        for a in range(0, len(queries), step):
            top = (queries[a:a + step].to(device) @ g.t()).topk(k, dim=1)
            scores.append(top.values.cpu())
            idx.append(top.indices.cpu())
        return torch.cat(scores), torch.cat(idx)

    def _search(self, img: dict[str, Features], txt: dict[str, Features], k: int, direction: str,
                ids: list[Any]) -> SearchResult:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        gallery = txt if direction == "i2t" else img
        k = min(k, features_len(gallery["model"]))
        scoring = self.model.scoring
        if scoring == "embedding" or (scoring == "cross" and self.first_stage is None):
            if self.backend == "faiss":
                scores, idx = self._faiss_search(img["model"], txt["model"], k, direction)
            elif _is_plain_product(self.model):
                scores, idx = self._product_topk(img["model"], txt["model"], k, direction)
            else:
                scores, idx = self._scores(self.model, img["model"], txt["model"], direction).topk(k, dim=1)
        else:
            first_model, part = (self.model, "model") if scoring == "two-stage" else (self.first_stage, "first")
            first = self._scores(first_model, img[part], txt[part], direction)
            n_cand = min(max(self.rerank_k, k), first.shape[1])
            cand = first.topk(n_cand, dim=1).indices
            # a cross model's default score_pairs scores dense blocks of queries x candidates
            rescored = self._rerank(img["model"], txt["model"], cand, direction)
            scores, order = rescored.topk(k, dim=1)
            idx = cand.gather(1, order)
        return SearchResult(indices=idx, scores=scores.float(),
                            ids=[[ids[i] for i in row] for row in idx.tolist()])

    def _rerank(self, img: Features, txt: Features, cand: torch.Tensor, direction: str) -> torch.Tensor:
        from .eval.rerank import _query_batches, score_candidates

        device = torch.device(self.device) if self.device is not None else self.model.device
        queries = _query_batches(cand.shape[0], cand.shape[1], EvalOptions.pair_batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            return score_candidates(self.model, img, txt, cand, direction, queries, device)
        finally:
            self.model.train(was_training)

    def build_index(self) -> "Retriever":
        """Build the FAISS index of each gallery now (otherwise on its first query); a no-op for torch search."""
        if self.backend == "faiss":
            for what, parts in self.features.items():
                if what not in self._faiss:
                    self._faiss[what] = _faiss_index(parts["model"])
        return self

    def _faiss_search(self, img: torch.Tensor, txt: torch.Tensor, k: int, direction: str):
        queries = img if direction == "i2t" else txt
        index = self.build_index()._faiss["caption" if direction == "i2t" else "image"]
        scores, idx = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(idx).long()

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path, model_source: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """Write the index directory atomically (see docs/retrieval.md for its layout).

        `model_source` says how `load` rebuilds the model: ``{"pretrained": DIR}`` or ``{"name": NAME,
        "checkpoint": FILE}``; without it a native copy of the model is written into ``DIR/model``.
        """
        from safetensors.torch import save_file

        from .checkpoints.atomic import atomic_dir

        if self.first_stage is not None and model_source is None:
            raise ValueError("saving a Retriever with a first_stage model needs model_source with both models' "
                             "sources ({'pretrained': DIR, 'first_stage': {'pretrained': DIR}})")
        tensors: dict[str, torch.Tensor] = {}
        for what, parts in self.features.items():
            for part, feats in parts.items():
                if isinstance(feats, torch.Tensor):
                    tensors[f"{what}/{part}"] = feats.contiguous()
                else:
                    tensors.update({f"{what}/{part}/{key}": v.contiguous() for key, v in feats.items()})
        meta = {"format": INDEX_FORMAT, "model": self.model.registry_name, "scoring": self.model.scoring,
                "input_kind": self.model.input_kind, "config": self.model.config.to_dict(),
                "model_source": model_source or {"pretrained": "model"}, "backend": self.backend,
                "rerank_k": self.rerank_k, "counts": {w: features_len(p["model"]) for w, p in self.features.items()},
                "extra": extra or {}}
        if self.first_stage is not None:
            meta["first_stage"] = self.first_stage.registry_name
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            save_file(tensors, str(tmp / "embeddings.safetensors"))
            ids = {"image_ids": self.image_ids, "caption_ids": self.caption_ids, "captions": self.captions}
            (tmp / "ids.json").write_text(json.dumps(ids, indent=1, default=str), encoding="utf-8")
            (tmp / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
            if model_source is None:
                self.model.save_pretrained(tmp / "model")
            if self.backend == "faiss":
                import faiss

                for what, index in self.build_index()._faiss.items():
                    faiss.write_index(index, str(tmp / f"{what}.faiss"))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: Any = None, first_stage: Any = None, **kwargs: Any) -> "Retriever":
        """Open an index directory written by `save`; the model is rebuilt from its recorded source."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not an itmzoo index: {meta_path.name} is missing")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
        if model is None:
            model = _model_from_source(meta["model_source"], directory)
        src = meta["model_source"]
        if first_stage is None and isinstance(src, dict) and src.get("first_stage"):
            first_stage = _model_from_source(src["first_stage"], directory)
        if model.registry_name != meta["model"]:
            raise ValueError(f"{directory} was built with '{meta['model']}', not '{model.registry_name}'")
        flat = load_file(str(directory / "embeddings.safetensors"))
        feats: dict[str, dict[str, Any]] = {}
        for key, t in flat.items():
            what, part, *rest = key.split("/")
            slot = feats.setdefault(what, {})
            if rest:
                slot.setdefault(part, {})[rest[0]] = t
            else:
                slot[part] = t
        ids = json.loads((directory / "ids.json").read_text(encoding="utf-8"))
        kwargs.setdefault("rerank_k", meta.get("rerank_k"))
        kwargs.setdefault("backend", "faiss" if meta.get("backend") == "faiss" and faiss_available() else "torch")
        r = cls(model, image_ids=ids["image_ids"], caption_ids=ids["caption_ids"], first_stage=first_stage,
                _features=feats, **kwargs)
        r.captions = ids.get("captions")
        if r.backend == "faiss":
            import faiss

            for what in feats:
                if (directory / f"{what}.faiss").is_file():
                    r._faiss[what] = faiss.read_index(str(directory / f"{what}.faiss"))
        return r


def _faiss_index(vectors: torch.Tensor) -> Any:
    import faiss

    x = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _model_from_source(source: dict[str, Any], directory: Path) -> Any:
    from . import api

    if "pretrained" in source:
        p = Path(source["pretrained"])
        return api.load(p if p.is_absolute() else directory / p)
    if "name" in source:
        return api.build(source["name"], checkpoint=source.get("checkpoint"), **source.get("overrides", {})).eval()
    raise ValueError(f"{directory}/index.json: model_source needs 'pretrained' or 'name', got {sorted(source)}")


def image_files(folder: str | Path) -> list[Path]:
    """The pictures in `folder` (recursively, by suffix), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + (".npy",) and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}, or .npy region arrays)")
    return files
