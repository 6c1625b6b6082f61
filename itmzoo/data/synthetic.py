"""`SyntheticShapes`: the built-in dataset of coloured shapes, captions and region features.

Every image is a scene of 1-3 objects, each with a colour, a shape, a size and a cell of a 3x3 grid.
It comes in two forms, so region models and pixel models train on the same data:

* ``kind="regions"``: ``[num_regions, region_dim]`` float32 features (36 x 2048 by default, like BUTD
  boxes), one row per object plus background rows. An object row sums fixed random codes of its
  colour, shape, size, cell and colour-shape pair (the pair code lets a model bind colour to shape,
  which a bag of attributes cannot); background rows draw from a bank of "stuff" codes. Every row
  gets noise and a ReLU (BUTD features are non-negative) and the rows are shuffled.
* ``kind="pixels"``: a rendered RGB PIL image (``image_size`` pixels square).

Each image has ``captions_per_image`` (5) different captions from varied templates: word order,
synonyms, counts, spatial relations, and subsets of attributes. A caption may leave out an
attribute only while every object it mentions stays unambiguous inside its own image, so captions are
never wrong, but many are generic ("a circle and a square") and match other images too: recall is
far from 100 % while a small model still learns quickly.

Everything is a pure function of ``(seed, split, index)``: features and pictures are generated on
the fly per index (a 36 x 2048 float32 image is 295 KB; 10,000 of them would be 3 GB), so a split of
any size costs almost no memory and every worker process produces identical items.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .split import RetrievalSplit

__all__ = ["COLOURS", "SHAPES", "SIZES", "SYNTHETIC_VOCAB", "SYNTHETIC_WORDPIECE", "SceneObject", "SyntheticShapes"]

#: SCAN-format vocabulary of every word the synthetic captions use (shipped with the package), so
#: word-vocabulary models (ESA BiGRU, LHSC) tokenise the built-in data anywhere, offline
SYNTHETIC_VOCAB = str(Path(__file__).with_name("assets") / "synthetic_shapes_vocab.json")
#: an uncased WordPiece tokenizer folder (HF format) over the same words, for BERT-based models' demos
#: and tiny test builds (random BERT weights sized to its 76 ids)
SYNTHETIC_WORDPIECE = str(Path(__file__).with_name("assets") / "synthetic_shapes_bert")

# name, RGB, caption words (synonyms)
COLOURS: tuple[tuple[str, tuple[int, int, int], tuple[str, ...]], ...] = (
    ("red", (215, 35, 35), ("red",)),
    ("green", (40, 160, 60), ("green",)),
    ("blue", (35, 75, 215), ("blue",)),
    ("yellow", (235, 205, 30), ("yellow",)),
    ("purple", (130, 50, 180), ("purple", "violet")),
    ("orange", (245, 135, 25), ("orange",)),
    ("pink", (240, 120, 190), ("pink",)),
    ("black", (25, 25, 25), ("black", "dark")),
)
SHAPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("circle", ("circle", "disk", "round shape")),
    ("square", ("square", "box")),
    ("triangle", ("triangle",)),
    ("star", ("star",)),
    ("diamond", ("diamond", "rhombus")),
    ("cross", ("cross", "plus sign")),
)
# name, fraction of a grid cell, caption words
SIZES: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("small", 0.38, ("small", "little", "tiny")),
    ("medium", 0.62, ("medium", "medium-sized", "mid-sized")),
    ("large", 0.92, ("large", "big")),
)
# phrases for the cell (row, col) of the 3x3 grid
_CELL_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the top left", "in the upper left"),
    (0, 1): ("at the top", "at the top center", "in the upper middle"),
    (0, 2): ("in the top right corner", "at the top right", "in the upper right"),
    (1, 0): ("on the left", "at the left side", "in the middle left"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the right side", "in the middle right"),
    (2, 0): ("in the bottom left corner", "at the bottom left", "in the lower left"),
    (2, 1): ("at the bottom", "at the bottom center", "in the lower middle"),
    (2, 2): ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
_COUNT_WORDS = {1: ("one", "a single"), 2: ("two",), 3: ("three",)}
_NOUNS = ("shapes", "objects")
_GENERIC = ("shape", "object")
_PREFIXES = ("", "", "there is ", "an image of ", "a picture showing ", "we see ")
_SPLIT_CODES = {"train": 0, "dev": 1, "test": 2}
_NOISE_BANK = 512  # noise rows are mixtures of a fixed bank: cheap to draw, full-rank for small dims
_BACKGROUND_BANK = 64
_LOCAL = threading.local()  # per-thread scratch buffer of `regions`


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object of a scene: indices into COLOURS, SHAPES, SIZES and its grid cell."""

    colour: int
    shape: int
    size: int
    row: int
    col: int

    @property
    def cell(self) -> int:
        return 3 * self.row + self.col

    def describe(self) -> str:
        return f"{SIZES[self.size][0]} {COLOURS[self.colour][0]} {SHAPES[self.shape][0]} at ({self.row}, {self.col})"


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    # one independent stream per (seed, split, image, purpose): items never depend on split sizes
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, stream])


class SyntheticShapes:
    """The synthetic retrieval dataset; ``split(name, kind)`` gives a `RetrievalSplit`.

    Args:
        num_images: total number of images (an int: ``dev = test = n // 12``, the rest train; 12,000
            gives 10,000/1,000/1,000) or a mapping ``{"train": n, "dev": n, "test": n}``.
        seed: everything (scenes, captions, features, pictures) is a function of it.
        image_size: side of the rendered pictures in pixels.
        region_dim, num_regions: shape of the region features of one image (BUTD: 2048, 36).
        captions_per_image: distinct captions per image.
        max_objects: objects per scene are drawn uniformly from ``1..max_objects`` (at most 3).
        noise: standard deviation of the per-row feature noise relative to an attribute code; the
            default keeps a small model clearly above chance but far from 100 % recall.
    """

    SPLITS = ("train", "dev", "test")

    def __init__(self, num_images: int | Mapping[str, int] = 12000, seed: int = 0, image_size: int = 64,
                 region_dim: int = 2048, num_regions: int = 36, captions_per_image: int = 5,
                 max_objects: int = 3, noise: float = 1.0) -> None:
        if isinstance(num_images, Mapping):
            unknown = set(num_images) - set(self.SPLITS)
            if unknown:
                raise ValueError(f"num_images: unknown splits {sorted(unknown)}; use {list(self.SPLITS)}")
            self.sizes = {s: int(num_images.get(s, 0)) for s in self.SPLITS}
        else:
            n = int(num_images)
            ev = max(1, n // 12)
            self.sizes = {"train": n - 2 * ev, "dev": ev, "test": ev}
        if any(v < 0 for v in self.sizes.values()) or not any(self.sizes.values()):
            raise ValueError(f"num_images gives split sizes {self.sizes}; need non-negative sizes, not all zero")
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1..3, got {max_objects}")
        if num_regions < max_objects:
            raise ValueError(f"num_regions ({num_regions}) must be >= max_objects ({max_objects})")
        if region_dim < 1 or image_size < 8 or captions_per_image < 1 or noise < 0:
            raise ValueError("region_dim >= 1, image_size >= 8, captions_per_image >= 1 and noise >= 0 are required")
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.region_dim = int(region_dim)
        self.num_regions = int(num_regions)
        self.captions_per_image = int(captions_per_image)
        self.max_objects = int(max_objects)
        self.noise = float(noise)
        self._codes: dict[str, np.ndarray] | None = None

    def __repr__(self) -> str:
        return (f"SyntheticShapes(sizes={self.sizes}, seed={self.seed}, image_size={self.image_size}, "
                f"region_dim={self.region_dim}, num_regions={self.num_regions})")

    # the code tables are rebuilt from the seed instead of pickled into every worker process
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_codes"] = None
        return state

    def _check(self, split: str, index: int | None = None) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; use one of {list(self.SPLITS)}")
        if index is not None and not 0 <= index < self.sizes[split]:
            raise IndexError(f"synthetic split {split!r} has {self.sizes[split]} images; index {index} is out of range")

    # -- scenes and captions ---------------------------------------------------------------------
    def scene(self, split: str, index: int) -> list[SceneObject]:
        """The objects of image `index` of `split` (distinct cells, distinct colour-shape pairs)."""
        self._check(split, index)
        rng = _rng(self.seed, split, index, 0)
        n = int(rng.integers(1, self.max_objects + 1))
        cells = rng.choice(9, size=n, replace=False)
        pairs = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
        sizes = rng.integers(0, len(SIZES), size=n)
        return [SceneObject(int(p) // len(SHAPES), int(p) % len(SHAPES), int(z), int(c) // 3, int(c) % 3)
                for c, p, z in zip(cells, pairs, sizes)]

    def captions(self, split: str, index: int) -> list[str]:
        """`captions_per_image` different captions of image `index`."""
        objs = self.scene(split, index)
        rng = _rng(self.seed, split, index, 1)
        out: list[str] = []
        for _ in range(200 * self.captions_per_image):
            c = _caption(objs, rng)
            if c not in out:
                out.append(c)
                if len(out) == self.captions_per_image:
                    return out
        raise RuntimeError(f"could not draw {self.captions_per_image} different captions for {split}[{index}]")

    # -- region features -------------------------------------------------------------------------
    def _tables(self) -> dict[str, np.ndarray]:
        if self._codes is None:
            rng = np.random.default_rng([self.seed, 99])
            d = self.region_dim

            def table(n: int) -> np.ndarray:
                return rng.standard_normal((n, d), dtype=np.float32)

            self._codes = {
                "colour": table(len(COLOURS)), "shape": table(len(SHAPES)), "size": table(len(SIZES)),
                "cell": table(9), "pair": table(len(COLOURS) * len(SHAPES)),
                "background": table(_BACKGROUND_BANK), "noise": table(_NOISE_BANK),
            }
        return self._codes

    def _scratch(self) -> np.ndarray:
        buf = getattr(_LOCAL, "buf", None)
        if buf is None or buf.shape != (self.num_regions, self.region_dim):
            buf = _LOCAL.buf = np.empty((self.num_regions, self.region_dim), dtype=np.float32)
        return buf

    def regions(self, split: str, index: int) -> np.ndarray:
        """``[num_regions, region_dim]`` float32 features of image `index` (objects + background rows)."""
        objs = self.scene(split, index)
        t = self._tables()
        rng = _rng(self.seed, split, index, 2)
        R, n = self.num_regions, len(objs)
        # background "stuff" boxes: one bank code each, with a random strength; the objects then
        # overwrite random rows (detectors give no fixed order)
        out = np.empty((R, self.region_dim), dtype=np.float32)
        np.take(t["background"], rng.integers(0, _BACKGROUND_BANK, size=R), axis=0, out=out)
        out *= rng.uniform(0.5, 1.5, size=(R, 1)).astype(np.float32)
        where = rng.choice(R, size=n, replace=False)
        for k, o in enumerate(objs):
            out[where[k]] = (t["colour"][o.colour] + t["shape"][o.shape] + t["size"][o.size] + t["cell"][o.cell]
                             + t["pair"][o.colour * len(SHAPES) + o.shape])
        # noise: two random bank rows with random weights per region (much cheaper than R x D normals)
        nb = rng.integers(0, _NOISE_BANK, size=(2, R))
        w = rng.standard_normal((2, R, 1), dtype=np.float32) * np.float32(self.noise * np.sqrt(2.5))
        tmp = self._scratch()
        for k in range(2):  # in place through a reused buffer: fresh 295 KB temporaries cost page faults
            np.take(t["noise"], nb[k], axis=0, out=tmp)
            tmp *= w[k]
            out += tmp
        np.maximum(out, 0, out=out)
        return out

    # -- pictures --------------------------------------------------------------------------------
    def render(self, split: str, index: int):
        """The RGB PIL image of image `index`: shapes on a noisy grey background."""
        from PIL import Image, ImageDraw

        objs = self.scene(split, index)
        rng = _rng(self.seed, split, index, 3)
        S = self.image_size
        ss = 2  # draw at twice the size and downsample, for smooth edges
        W = S * ss
        base = rng.uniform(150, 215)
        img = Image.new("RGB", (W, W), tuple(int(base + rng.uniform(-12, 12)) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        cell = W / 3
        for o in objs:
            frac = SIZES[o.size][1] * rng.uniform(0.92, 1.0)
            r = frac * cell / 2
            slack = (cell / 2 - r)
            cx = (o.col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (o.row + 0.5) * cell + rng.uniform(-slack, slack)
            rgb = np.clip(np.array(COLOURS[o.colour][1]) + rng.normal(0, 8, 3), 0, 255).astype(int)
            _draw_shape(draw, SHAPES[o.shape][0], cx, cy, r, tuple(int(v) for v in rgb))
        img = img.resize((S, S), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (S, S, 3)).astype(np.float32)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    # -- splits ----------------------------------------------------------------------------------
    def split(self, name: str = "train", kind: str = "regions") -> RetrievalSplit:
        """The split as a `RetrievalSplit` whose images are produced lazily per index."""
        self._check(name)
        if kind not in ("regions", "pixels"):
            raise ValueError(f"kind must be 'regions' or 'pixels', got {kind!r}")
        n = self.sizes[name]
        if n == 0:
            raise ValueError(f"synthetic split {name!r} is empty (sizes {self.sizes})")
        caps: list[str] = []
        for i in range(n):
            caps.extend(self.captions(name, i))
        return RetrievalSplit(
            images=SyntheticImages(self, name, kind, np.arange(n)),
            captions=caps,
            caption_to_image=np.repeat(np.arange(n), self.captions_per_image),
            kind=kind,  # type: ignore[arg-type]
            name=f"synthetic_{name}",
            image_ids=[f"shapes_{name}_{i:06d}" for i in range(n)],
        )


class SyntheticImages(Sequence):
    """A lazy, picklable sequence of the images of one synthetic split (features or PIL images)."""

    def __init__(self, dataset: SyntheticShapes, split: str, kind: str, indices: np.ndarray) -> None:
        self.dataset, self.split, self.kind = dataset, split, kind
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        if isinstance(i, (np.ndarray, list)):
            return self.select(i)
        j = int(self.indices[i])
        if self.kind == "regions":
            return self.dataset.regions(self.split, j)
        return self.dataset.render(self.split, j)

    def __iter__(self) -> Iterator[Any]:
        for k in range(len(self)):
            yield self[k]

    def picture(self, i: int):
        """The rendered PIL picture of image `i`, also for region features (reports show it as a thumbnail)."""
        return self.dataset.render(self.split, int(self.indices[i]))

    def select(self, indices: Sequence[int] | np.ndarray) -> "SyntheticImages":
        """The images at `indices` (positions in this sequence), still lazy."""
        return SyntheticImages(self.dataset, self.split, self.kind, self.indices[np.asarray(indices, dtype=np.int64)])

    def __repr__(self) -> str:
        return f"SyntheticImages({self.split!r}, kind={self.kind!r}, n={len(self)})"


# -- captions ------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _attributes(o: SceneObject, others: list[SceneObject], rng: np.random.Generator,
                allow_cell: bool = True) -> set[str]:
    """Attributes to mention: a random subset that still singles `o` out among `others`."""
    attrs = {a for a, p in (("colour", 0.85), ("shape", 0.85), ("size", 0.35), ("cell", 0.45)) if rng.random() < p}
    if not allow_cell:
        attrs.discard("cell")
    if not attrs & {"colour", "shape"}:
        attrs.add(_pick(rng, ("colour", "shape")))
    # colour + shape always single an object out (scenes have distinct pairs), so "cell" is never needed
    for extra in ("colour", "shape"):
        if not any(_same(o, q, attrs) for q in others):
            break
        attrs.add(extra)
    return attrs


def _same(a: SceneObject, b: SceneObject, attrs: set[str]) -> bool:
    return all(getattr(a, x) == getattr(b, x) for x in attrs)


def _noun_phrase(o: SceneObject, attrs: set[str], rng: np.random.Generator, with_cell: bool) -> str:
    colour = _pick(rng, COLOURS[o.colour][2]) if "colour" in attrs else ""
    size = _pick(rng, SIZES[o.size][2]) if "size" in attrs else ""
    noun = _pick(rng, SHAPES[o.shape][1]) if "shape" in attrs else _pick(rng, _GENERIC)
    if colour and "shape" in attrs and rng.random() < 0.25:
        words = [w for w in (size, noun) if w]
        phrase = f"{_article(words[0])} {' '.join(words)} that is {colour}"
    else:
        words = [w for w in (size, colour, noun) if w]
        phrase = f"{_article(words[0])} {' '.join(words)}"
    if with_cell and "cell" in attrs:
        phrase += " " + _pick(rng, _CELL_PHRASES[(o.row, o.col)])
    return phrase


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    sep = ", " if rng.random() < 0.7 else " , "
    return sep.join(parts[:-1]) + (" and " if rng.random() < 0.8 else " , and ") + parts[-1]


def _caption(objs: list[SceneObject], rng: np.random.Generator) -> str:
    order = [objs[int(k)] for k in rng.permutation(len(objs))]
    attrs = [_attributes(o, [q for q in objs if q is not o], rng) for o in order]
    style = int(rng.integers(4))
    if style == 1:  # count first: "three shapes: a red circle, ..."
        count = _pick(rng, _COUNT_WORDS[len(objs)])
        noun = _pick(rng, _NOUNS) if len(objs) > 1 else _pick(rng, _GENERIC)
        body = _join([_noun_phrase(o, a, rng, True) for o, a in zip(order, attrs)], rng)
        text = f"{count} {noun} : {body}" if rng.random() < 0.3 else f"{count} {noun}: {body}"
    elif style == 2:  # place first: "in the center there is a red circle and ..."
        parts = []
        for o, a in zip(order, attrs):
            np_ = _noun_phrase(o, a, rng, False)
            if "cell" in a:
                parts.append(f"{_pick(rng, _CELL_PHRASES[(o.row, o.col)])} there is {np_}")
            else:
                parts.append(f"there is {np_}")
        text = _join(parts, rng)
    elif style == 3 and len(order) >= 2 and (order[0].col != order[1].col or order[0].row != order[1].row):
        # a spatial relation between the first two objects, any third one appended
        a, b = order[0], order[1]
        if a.col != b.col and (a.row == b.row or rng.random() < 0.5):
            rel = "to the left of" if a.col < b.col else "to the right of"
        else:
            rel = "above" if a.row < b.row else "below"
        a_attrs = _attributes(a, [q for q in objs if q is not a], rng, allow_cell=False)
        b_attrs = _attributes(b, [q for q in objs if q is not b], rng, allow_cell=False)
        text = f"{_noun_phrase(a, a_attrs, rng, False)} {rel} {_noun_phrase(b, b_attrs, rng, False)}"
        if len(order) == 3:
            text += f" and {_noun_phrase(order[2], attrs[2], rng, True)}"
        text = _pick(rng, ("", "", "there is ")) + text
    else:  # a plain list with an optional prefix
        text = _pick(rng, _PREFIXES) + _join([_noun_phrase(o, a, rng, True) for o, a in zip(order, attrs)], rng)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.4:
        text += " ."
    return text


# -- drawing -------------------------------------------------------------------------------------

def _draw_shape(draw: Any, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            ang = -np.pi / 2 + k * np.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        draw.polygon(pts, fill=fill)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(f"unknown shape {shape!r}")
