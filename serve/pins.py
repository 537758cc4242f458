"""Pinning served folders: a provider that loads an export, head or public-set folder from a place others can write
names the digests it expects (`--expect_sha256`), and the server refuses to start on any other content.

A manifest's own sha256 fields only check the files against the manifest; whoever can edit the folder can edit
both. A pin is held outside the folder, so an edited label or replaced weight no longer matches it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from .formats.digests import folder_sha256
from .formats.folders import ExportError

log = logging.getLogger("serve")


def check_pins(folders: Sequence[str | Path], expected: Sequence[str] | None) -> dict[str, str]:
    """Each folder's digest (logged, so an operator can pin it); ExportError when `expected` is given and a folder's
    digest is not in it."""
    digests = {}
    for folder in folders:
        if not Path(folder).is_dir():
            continue  # the loader names a missing folder with its own message
        digest = folder_sha256(folder)
        digests[str(folder)] = digest
        if expected is not None and digest not in expected:
            raise ExportError(f"{folder} has content digest {digest}, which is not among --expect_sha256; its files "
                              "changed since it was pinned. Check who edited it, re-export it, or pin the new digest "
                              "if the change is yours")
        log.info("folder %s: content sha256 %s%s", folder, digest, " (pinned)" if expected is not None else "")
    return digests
