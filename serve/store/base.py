"""The shared state store's interface: budget counters, inference sessions, private-fit records and API keys.

Every backend keeps wall-clock (time.time()) timestamps, so replicas that share a store agree on expiry.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class StoreError(ValueError):
    """The store is unusable: bad URL, unreachable, or corrupt; the message names the fix."""


@dataclass(frozen=True)
class Charge:
    """`amount` added to counter `key`, refused if it would take the counter above `limit`."""

    key: str  # a counter, e.g. "rows:addr:1.2.3.4|head:bbc", "session-rows:<session id>", "fits:key:alice"
    amount: int  # > 0
    limit: int | None  # None: counted without a limit
    ttl_s: float | None = None  # the counter is forgotten ttl_s after its last charge (None: kept forever)


@dataclass(frozen=True)
class Refused:
    """The first charge of a list that would exceed its limit."""

    index: int  # which charge of the list would exceed its limit (the first one that does)
    used: int  # that counter's value now
    limit: int


@dataclass(frozen=True)
class SessionRecord:
    """An inference session; its public-key bytes are stored beside it, fetched separately."""

    session_id: str
    layer: str | None  # head name, None = fused export
    layer_sha256: str  # digest of the served layer when the session was opened
    key_bytes: int
    created: float  # unix seconds


@dataclass(frozen=True)
class FitRecord:
    """A private-fit session: its accumulators live on one replica's memory, the record is shared."""

    session_id: str
    client: str
    replica: str
    created: float


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key issued by an operator; only its digest is stored."""

    name: str
    digest: str  # sha256 hex of the key; the key itself is never stored
    rows_per_client: int | None  # None: the server's default
    fits_per_client: int | None
    created: float
    revoked: bool = False


class StateStore(ABC):
    """State shared by the server's threads, processes and replicas. Every method raises StoreError (never a
    backend's own exception) when the store is unreachable or corrupt."""

    url: str  # the URL it was opened from, with any password removed

    # counters (budgets)
    @abstractmethod
    def charge(self, charges: Sequence[Charge]) -> tuple[Refused | None, list[int]]:
        """Atomically add every charge, or none of them when one would exceed its limit (Refused names the first).
        The list holds each charge's counter value after the whole list (or now, when refused)."""

    @abstractmethod
    def refund(self, charges: Sequence[Charge]) -> None:
        """Subtract the amounts, never below 0; missing or expired counters stay missing; expiry is unchanged."""

    @abstractmethod
    def used(self, key: str) -> int:
        """A counter's value; 0 when missing or expired."""

    # inference sessions: LRU-bounded by count, expiring ttl_s after last use
    @abstractmethod
    def put_session(self, record: SessionRecord, keys: bytes, *, max_sessions: int, ttl_s: float) -> int:
        """Store a session (replacing one with the same id); returns how many least-recently-used live sessions
        were evicted to make room (expired ones are purged without counting)."""

    @abstractmethod
    def get_session(self, session_id: str, *, ttl_s: float) -> SessionRecord | None:
        """The live session, marked used now (it expires ttl_s from now); None when unknown, expired or evicted.
        Never reads the key bytes."""

    @abstractmethod
    def session_keys(self, session_id: str) -> bytes | None:
        """The live session's public-key bytes (does not mark it used)."""

    @abstractmethod
    def delete_session(self, session_id: str) -> bool:
        """Delete a session and its keys; True when it was live."""

    @abstractmethod
    def count_sessions(self) -> int:
        """Live sessions."""

    # private-fit records
    @abstractmethod
    def claim_fit(self, record: FitRecord, *, per_client: int, ttl_s: float) -> bool:
        """Atomically insert the record unless `record.client` already holds `per_client` live fit records (False)."""

    @abstractmethod
    def get_fit(self, session_id: str) -> FitRecord | None:
        """The live fit record; None when unknown, released or expired."""

    @abstractmethod
    def touch_fit(self, session_id: str, *, ttl_s: float) -> None:
        """Extend a live fit record's expiry to ttl_s from now (a no-op for unknown or expired ones)."""

    @abstractmethod
    def release_fit(self, session_id: str) -> None:
        """Drop a fit record (a no-op when unknown)."""

    # API keys
    @abstractmethod
    def add_api_key(self, record: ApiKeyRecord) -> None:
        """Store a key; StoreError if its name or digest exists (revoked keys included)."""

    @abstractmethod
    def find_api_key(self, digest: str) -> ApiKeyRecord | None:
        """The key with this digest, revoked ones included (the caller checks `revoked`)."""

    @abstractmethod
    def revoke_api_key(self, name: str) -> bool:
        """Mark a key revoked; True when it existed and was not revoked yet."""

    @abstractmethod
    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key, revoked ones included, oldest first."""

    # lifecycle
    @abstractmethod
    def ping(self) -> None:
        """Raise StoreError when the store is unreachable."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def check_charges(charges: Sequence[Charge]) -> None:
    """ValueError for a charge no backend can honour (caller bugs, not store failures)."""
    for charge in charges:
        if charge.amount < 1:
            raise ValueError(f"a charge's amount must be positive, got {charge.amount} for {charge.key!r}")
        if charge.limit is not None and charge.limit < 0:
            raise ValueError(f"a charge's limit must be >= 0 or None, got {charge.limit} for {charge.key!r}")
        if charge.ttl_s is not None and charge.ttl_s <= 0:
            raise ValueError(f"a charge's ttl_s must be positive or None, got {charge.ttl_s} for {charge.key!r}")


def check_ttl(ttl_s: float, name: str = "ttl_s") -> None:
    if ttl_s <= 0:
        raise ValueError(f"{name} must be positive, got {ttl_s}")


def check_bound(value: int, name: str) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def redact(url: str) -> str:
    """`url` with any password removed (redis://:secret@host:6379/0 -> redis://host:6379/0)."""
    try:
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() != "password"]
        if parts.password is None and len(query) == len(parse_qsl(parts.query, keep_blank_values=True)):
            return url
    except ValueError:
        return "<unparsable URL>"
    # netloc is [user[:password]@]host[:port]: keep what follows the last '@'
    netloc = (f"{parts.username}@" if parts.username else "") + parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))
