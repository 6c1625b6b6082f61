"""Caption normalisation of the ALBEF / BLIP family (``pre_caption``)."""

from __future__ import annotations

import re

__all__ = ["pre_caption"]


def pre_caption(caption: str, max_words: int | None = 30, style: str = "albef") -> str:
    """Lower-case, clean and truncate a caption exactly as ALBEF's or BLIP's ``pre_caption``.

    * ``albef``: delete ``,.'!?"()*#:;~``; ``-`` and ``/`` become spaces; ``<person>`` -> ``person``.
    * ``blip``: ``.!"()*#:;~`` become spaces (commas and apostrophes stay).

    Then runs of 2+ whitespace characters collapse to one space, the ends are stripped and the
    caption is cut to its first `max_words` space-separated words (``None``: no limit).
    """
    if style == "albef":
        caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
        caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    elif style == "blip":
        caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    else:
        raise ValueError(f"pre_caption style must be 'albef' or 'blip', got {style!r}")
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if max_words is not None and len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
