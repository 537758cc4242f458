"""The client's lasting session: keys, session id and the provider's published files, kept across processes.

One entry per server, API key (its sha256; the key itself is never written), served layer (the fused export, or
a head) and layout, under ``$XSILO_HOME/client/sessions/<entry>/``:

    keys.bin         ClientKeys.to_bytes(): the secret key with the Galois keys; mode 0600, never sent
    session.json     the server, head, layer sha256, session id and when it was opened and last used
    feature-ood.npz  the head's published detector, as the server sent it (its sha256 is checked on every read)

A process that finds an entry uploads no keys and fetches no detector: it reuses the session until the server
answers 404 session_not_found (idle expiry, eviction, a restart without a store), and then re-opens it with the
same keys. The folder is 0700, every file is written atomically (temp file, fsync, rename), an entry is locked
while a process opens its session, and at most `MAX_ENTRIES` entries are kept (the least recently used go).
numpy-free and torch-free.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from encrypted import ClientKeys, EncryptedError, LinearLayout

from .formats.folders import atomic_write_bytes, xsilo_home
from .http_client import ServeError

MAX_ENTRIES = 32
KEYS, SESSION, DETECTOR, LOCK = "keys.bin", "session.json", "feature-ood.npz", ".lock"
FORMAT = 1


class ClientCacheError(ServeError):
    """The client's session cache cannot be used as it is; the message names the file and the fix."""


def cache_root() -> Path:
    return xsilo_home() / "client" / "sessions"


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically (temp + fsync + rename), readable by the owner only from its first byte."""
    atomic_write_bytes(path, data, mode)


def entry_key(url: str, api_key: str | None, head: str | None, layer_sha256: str, layout: LinearLayout) -> str:
    """The entry's name: a digest of the server, the API key's sha256, the layer and its layout."""
    blob = json.dumps({"server": url.rstrip("/"), "head": head, "layer": layer_sha256, "layout": layout.to_dict(),
                       "api_key": hashlib.sha256(api_key.encode("utf-8")).hexdigest() if api_key else None},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class SessionEntry:
    """One cached session: its keys, its session id and the published detector (see the module)."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder, self.meta = folder, meta

    # --- keys ---------------------------------------------------------------------------------------

    def load_keys(self, layout: LinearLayout) -> ClientKeys | None:
        """The cached keys for `layout`, or None when there are none (or they were unreadable: then the entry is
        started again, with a warning). A key file others can read is refused: it may have leaked."""
        path = self.folder / KEYS
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ClientCacheError(f"the client's secret key file {path} is readable by others (mode "
                                   f"{stat.S_IMODE(info.st_mode):04o}): it may have leaked. Delete {self.folder} to "
                                   "make new keys (or chmod 600 it if no one else could read it)")
        try:
            return ClientKeys.from_bytes(path.read_bytes(), layout)
        except (EncryptedError, OSError, ValueError) as exc:
            warnings.warn(f"the cached client keys in {path} are unusable ({str(exc)[:200]}); making new ones",
                          stacklevel=3)
            self.clear()
            return None

    def save_keys(self, keys: ClientKeys) -> None:
        write_private(self.folder / KEYS, keys.to_bytes())

    # --- session ------------------------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        value = self.meta.get("session_id")
        return value if isinstance(value, str) and value else None

    def save_session(self, session_id: str | None, ttl_s: float | None = None) -> None:
        now = time.time()
        self.meta.update(session_id=session_id, opened=now if session_id else None, used=now,
                         session_ttl_s=ttl_s if session_id else None)
        self._write_meta()

    def touch(self) -> None:
        """Record a use (the least recently used entries are the ones dropped)."""
        self.meta["used"] = time.time()
        self._write_meta()

    def _write_meta(self) -> None:
        write_private(self.folder / SESSION, (json.dumps(self.meta, indent=1, sort_keys=True) + "\n").encode())

    # --- the provider's published files -------------------------------------------------------------

    def detector(self, sha256: str) -> bytes | None:
        """The cached detector bytes when their sha256 is `sha256` (the one /v1/model publishes), else None."""
        try:
            data = (self.folder / DETECTOR).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha256 else None

    def save_detector(self, data: bytes) -> None:
        write_private(self.folder / DETECTOR, data)

    # --- lifetime -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator["SessionEntry"]:
        """Hold the entry's lock (another process opening the same session waits), then re-read its state."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the files are still replaced atomically)
            yield self
            return
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.meta = read_meta(self.folder) or self.meta
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def clear(self) -> None:
        """Forget the keys, the session and the detector (the next use starts afresh)."""
        for name in (KEYS, DETECTOR):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
        self.save_session(None)


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / SESSION).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


class SessionCache:
    """The entries under `root` (default $XSILO_HOME/client/sessions), at most `max_entries` of them."""

    def __init__(self, root: str | Path | None = None, max_entries: int = MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.root, self.max_entries = Path(root) if root is not None else cache_root(), max_entries

    def entry(self, url: str, api_key: str | None, head: str | None, layer_sha256: str,
              layout: LinearLayout) -> SessionEntry:
        """The entry of this server, API key, layer and layout (made when missing; older ones beyond
        `max_entries` are dropped)."""
        folder = self.root / entry_key(url, api_key, head, layer_sha256, layout)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(folder, 0o700)
        except OSError as exc:
            raise ClientCacheError(f"cannot write the client's session cache under {self.root} ({exc.strerror or exc});"
                                   " set XSILO_HOME to a writable folder, or pass cache=False") from None
        meta = read_meta(folder)
        if meta is None or meta.get("format") != FORMAT:
            meta = {"format": FORMAT, "server": url.rstrip("/"), "head": head, "layer_sha256": layer_sha256,
                    "session_id": None, "created": time.time(), "used": time.time()}
        entry = SessionEntry(folder, meta)
        entry.touch()
        self.prune(keep=folder)
        return entry

    def entries(self) -> list[tuple[float, Path]]:
        """(last use, folder) of every entry, most recent first."""
        found = []
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.is_dir():
                    meta = read_meta(folder) or {}
                    used = meta.get("used")
                    found.append((float(used) if isinstance(used, (int, float)) else 0.0, folder))
        return sorted(found, reverse=True)

    def prune(self, keep: Path | None = None) -> None:
        """Drop the least recently used entries beyond `max_entries` (their servers' sessions just expire)."""
        entries = [f for _, f in self.entries() if f != keep]
        for folder in entries[self.max_entries - (1 if keep is not None else 0):]:
            shutil.rmtree(folder, ignore_errors=True)
