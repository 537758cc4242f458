"""When two texts are the same text: the comparison key of the no-leakage guarantee (standard library only).

A public set drops every text of a task's val and test split, and a task's splits drop texts that an earlier split
holds, both after `normalize_text`: Unicode NFKC, case folded, runs of whitespace made one space, stripped. So a
duplicate or a whitespace or case variant of a held-out text is dropped too.
"""
from __future__ import annotations

import re
import unicodedata

NORMALIZATION = "NFKC, casefold, whitespace collapsed, stripped"
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The comparison key of a text: NFKC, case folded, runs of whitespace made one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def drop_seen(texts: list[str], seen: list[str]) -> list[int]:
    """Positions of `texts` whose normalised form (case, whitespace, NFKC) is not among `seen`'s."""
    keys = {normalize_text(t) for t in seen}
    return [i for i, t in enumerate(texts) if normalize_text(t) not in keys]
