"""The provider server's shared state: budget counters, inference sessions, private-fit records and API keys.

`open_store(url)` picks a backend: 'memory://' (this process only), 'sqlite:///path.db' (the processes of one
machine), 'redis://host:port/db' (replicas on several machines). Every backend has the same semantics.
"""
from __future__ import annotations

from pathlib import Path

from .base import ApiKeyRecord, Charge, FitRecord, Refused, SessionRecord, StateStore, StoreError, redact

__all__ = ["ApiKeyRecord", "Charge", "FitRecord", "Refused", "SessionRecord", "StateStore", "StoreError",
           "open_store"]

ACCEPTED = ("'memory://' (this process only), 'sqlite:///relative/path.db' or 'sqlite:////absolute/path.db', "
            "'redis://[:password@]host:port/db' or 'rediss://...'")


def open_store(url: str) -> StateStore:
    """'memory://' (this process only: tests and benchmarks), 'sqlite:///relative/or/abs/path.db'
    (sqlite:////abs/path also works; parent folders are created), 'redis://[:password@]host:port/db' or
    'rediss://...'. StoreError (naming the accepted forms) for anything else, or when the store is unusable."""
    if not isinstance(url, str):
        raise StoreError(f"a store URL is a string, got {type(url).__name__}; accepted: {ACCEPTED}")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory" and url.lower() == "memory://":
        from .memory import MemoryStore

        return MemoryStore(url)
    if scheme == "sqlite" and url.lower().startswith("sqlite:///") and len(url) > len("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url, Path(url[len("sqlite:///"):]))
    if scheme in ("redis", "rediss"):
        from .redis import RedisStore

        store = RedisStore(url, redact(url))
        try:
            store.ping()
        except StoreError:
            store.close()
            raise
        return store
    raise StoreError(f"cannot open a store from {redact(url)!r}; accepted: {ACCEPTED}")
