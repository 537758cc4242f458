"""Who a request is: the identity a budget charges, from its API key or its address.

Three ways in, checked in this order:

* an API key issued with `xsilo keys add NAME` (kept in the state store, as its sha256 only): identity
  `name:NAME`, with the key's own row and fit budgets when it has them; a replica keeps a key it found for
  `KEY_CACHE_S` (1 s), so a revoked key is refused within a second on every replica, without a restart;
* the server's single `--api_key`: identity `key:<digest>`;
* no key, on a server that requires none: identity `addr:<peer address>`. The address is the socket's peer unless
  the operator names trusted proxies (`--trusted_proxies`), whose X-Forwarded-For is then believed.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .api import ApiError
from .protocol import API_KEY_HEADER
from .settings import ServerSettings
from .store import ApiKeyRecord, StateStore, StoreError

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_CACHE_S = 1.0  # how long a replica trusts a key it found in the store (a revocation takes this long at most)
KEY_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Identity:
    """The client a request is charged to, and its budgets (None: no limit)."""

    client: str
    rows_per_client: int | None
    fits_per_client: int | None


def key_digest(key: bytes) -> str:
    """The stored form of an API key: its sha256, hex (the key itself is never stored or logged)."""
    return hashlib.sha256(key).hexdigest()


class KeyLookups:
    """Issued keys found in the store, kept `KEY_CACHE_S` per replica (at most KEY_CACHE_SIZE, oldest dropped): one
    store round trip per key and second instead of one per request. Keys not found are never kept."""

    def __init__(self, store: StateStore):
        self.store = store
        self._found: OrderedDict[str, tuple[float, ApiKeyRecord]] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, digest: str) -> ApiKeyRecord | None:
        now = time.monotonic()
        with self._lock:
            hit = self._found.get(digest)
            if hit is not None and now - hit[0] < KEY_CACHE_S:
                return hit[1]
        record = self.store.find_api_key(digest)
        with self._lock:
            if record is not None and not record.revoked:
                self._found[digest] = (now, record)
                self._found.move_to_end(digest)
                while len(self._found) > KEY_CACHE_SIZE:
                    self._found.popitem(last=False)
            else:
                self._found.pop(digest, None)
        return record


def presented_key(request: Request) -> bytes | None:
    """The API key the request carries, as the raw header bytes (HTTP headers are bytes; Starlette decodes them
    as latin-1, so re-encoding as latin-1 gives the bytes back: a UTF-8 key arrives as its UTF-8 bytes)."""
    given = request.headers.get(API_KEY_HEADER)
    if given is None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    return None if given is None else given.encode("latin-1")


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", f"missing, wrong or revoked API key; send 'Authorization: Bearer <key>' or "
                                         f"'{API_KEY_HEADER}: <key>' with a key the server's operator issued",
                    {"WWW-Authenticate": "Bearer"})


def identity_dependency(settings: ServerSettings, store: StateStore) -> Callable[..., Identity]:
    """A FastAPI dependency resolving each request to its Identity (401 when a key is required and not valid)."""
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the API key")
    single = settings.api_key.encode("utf-8") if settings.api_key is not None else None
    required = single is not None or settings.api_keys
    issued = KeyLookups(store)

    def identify(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                 api_key: str | None = Security(header)) -> Identity:
        given = presented_key(request)
        if given is not None and required:
            if settings.api_keys:
                try:
                    record = issued.find(key_digest(given))
                except StoreError:
                    raise ApiError(503, "store_unavailable", "the server's state store does not answer; retry "
                                                             "shortly", {"Retry-After": "1"}) from None
                if record is not None and not record.revoked:
                    rows = record.rows_per_client if record.rows_per_client is not None else settings.rows_per_client
                    fits = record.fits_per_client if record.fits_per_client is not None else settings.fits_per_client
                    return Identity(f"name:{record.name}", rows, fits)
            if single is not None and hmac.compare_digest(given, single):
                return Identity("key:" + key_digest(given)[:32], settings.rows_per_client, settings.fits_per_client)
            raise unauthorized()
        if required:
            raise unauthorized()
        address = request.client.host if request.client else "unknown"
        return Identity(f"addr:{address}", settings.rows_per_client, settings.fits_per_client)

    return identify


def check_key_name(name: str) -> str:
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise ValueError(f"API key name {str(name)[:80]!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit")
    return name
