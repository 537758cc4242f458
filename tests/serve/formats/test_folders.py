"""Files and folders written atomically get the permissions a plain open()/mkdir would give (the umask's), so a
service running as another user can read a served folder; a secret asks for its own mode."""
from __future__ import annotations

import os
import stat

from serve.formats.folders import UMASK, atomic_write_bytes

from tests.serve.serve_support import write_small_export


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_folders_and_files_follow_the_umask_and_secrets_are_owner_only(tmp_path):
    export = write_small_export(tmp_path / "export")
    assert mode(export) == 0o777 & ~UMASK  # not mkdtemp's 0700
    for path in export.iterdir():
        assert mode(path) == 0o666 & ~UMASK, path  # not mkstemp's 0600
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert mode(tmp_path / "report.json") == 0o666 & ~UMASK
    atomic_write_bytes(tmp_path / "secret.key", b"k", mode=0o600)
    assert mode(tmp_path / "secret.key") == 0o600
