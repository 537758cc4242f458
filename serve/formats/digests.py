"""Content digests: the sha256 of a file, and the fingerprint of a list of texts (with their labels, a dataset's).

One digest for every folder xsilo writes (exports, maps, heads, public states, the state cache, prepared assets)
and one fingerprint of texts, which names a dataset in the state cache and which both parties of a private fit
compare. hashlib only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in `chunk`-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def texts_digest(texts: Iterable[str]) -> "hashlib._Hash":
    """sha256 over each text's UTF-8 bytes followed by a NUL byte: the start of every fingerprint."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest


def texts_fingerprint(texts: Iterable[str], labels: Sequence[int] | None = None,
                      label_names: Sequence[str] | None = None) -> str:
    """The fingerprint of texts: label-free (what both parties of a private fit compare), or with `labels` (one
    int per text) and their `label_names` (None when the labels have no names), a labelled dataset's
    (`datamodules.text.dataset_fingerprint`). The same rows give the same fingerprint anywhere."""
    digest = texts_digest(texts)
    if labels is not None:
        digest.update(repr(None if label_names is None else list(label_names)).encode())
        digest.update(bytes(str(list(labels)), "ascii"))
    return digest.hexdigest()


def folder_sha256(folder: str | Path) -> str:
    """The hex sha256 of a folder's content: every regular file under it (sorted by relative path), as its path and
    its sha256. Any edit (labels in a manifest, weights, an added file) changes it; a provider pins served folders
    with it (`xsilo serve --expect_sha256`)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\x00")
        digest.update(sha256_file(path).encode("ascii") + b"\n")
    return digest.hexdigest()
