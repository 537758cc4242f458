"""The in-process store ('memory://'): for tests and the in-memory benchmark baseline.

Nothing is shared with other processes and nothing survives a restart. The counters table holds at most
MAX_COUNTERS entries, least recently charged evicted (an evicted counter starts again from zero).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Sequence

from .base import (ApiKeyRecord, Charge, FitRecord, Refused, SessionRecord, StateStore, StoreError, check_bound,
                   check_charges, check_ttl)

MAX_COUNTERS = 100_000


class MemoryStore(StateStore):
    """Every table a dict behind one lock."""

    def __init__(self, url: str = "memory://", max_counters: int = MAX_COUNTERS):
        self.url = url
        self.max_counters = max_counters
        self._lock = threading.Lock()
        self._counters: OrderedDict[str, tuple[int, float | None]] = OrderedDict()  # key -> (value, expires)
        # id -> (record, keys, expires), least recently used first
        self._sessions: OrderedDict[str, tuple[SessionRecord, bytes, float]] = OrderedDict()
        self._fits: dict[str, tuple[FitRecord, float]] = {}  # id -> (record, expires)
        self._keys: dict[str, ApiKeyRecord] = {}  # name -> record
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self.url} is closed; open a new one with open_store()")

    # counters
    def _value(self, key: str, now: float) -> int:
        entry = self._counters.get(key)
        if entry is None:
            return 0
        if entry[1] is not None and entry[1] <= now:
            del self._counters[key]
            return 0
        return entry[0]

    def charge(self, charges: Sequence[Charge]) -> tuple[Refused | None, list[int]]:
        check_charges(charges)
        with self._lock:
            self._check_open()
            now = time.time()
            values = {c.key: self._value(c.key, now) for c in charges}
            pending = dict(values)
            for index, c in enumerate(charges):
                if c.limit is not None and pending[c.key] + c.amount > c.limit:
                    return Refused(index, values[c.key], c.limit), [values[c.key] for c in charges]
                pending[c.key] += c.amount
            for c in charges:
                self._counters[c.key] = (pending[c.key], None if c.ttl_s is None else now + c.ttl_s)
                self._counters.move_to_end(c.key)
            while len(self._counters) > self.max_counters:
                self._counters.popitem(last=False)
            return None, [pending[c.key] for c in charges]

    def refund(self, charges: Sequence[Charge]) -> None:
        check_charges(charges)
        with self._lock:
            self._check_open()
            now = time.time()
            for c in charges:
                self._value(c.key, now)  # drops an expired counter
                entry = self._counters.get(c.key)
                if entry is not None:
                    self._counters[c.key] = (max(0, entry[0] - c.amount), entry[1])

    def used(self, key: str) -> int:
        with self._lock:
            self._check_open()
            return self._value(key, time.time())

    # sessions
    def _purge_sessions(self, now: float) -> None:
        for session_id in [s for s, (_, _, expires) in self._sessions.items() if expires <= now]:
            del self._sessions[session_id]

    def put_session(self, record: SessionRecord, keys: bytes, *, max_sessions: int, ttl_s: float) -> int:
        check_bound(max_sessions, "max_sessions")
        check_ttl(ttl_s)
        with self._lock:
            self._check_open()
            now = time.time()
            self._purge_sessions(now)
            self._sessions.pop(record.session_id, None)
            evicted = 0
            while len(self._sessions) >= max_sessions:
                self._sessions.popitem(last=False)
                evicted += 1
            self._sessions[record.session_id] = (record, bytes(keys), now + ttl_s)
            return evicted

    def get_session(self, session_id: str, *, ttl_s: float) -> SessionRecord | None:
        check_ttl(ttl_s)
        with self._lock:
            self._check_open()
            now = time.time()
            entry = self._sessions.get(session_id)
            if entry is None:
                return None
            if entry[2] <= now:
                del self._sessions[session_id]
                return None
            self._sessions[session_id] = (entry[0], entry[1], now + ttl_s)
            self._sessions.move_to_end(session_id)
            return entry[0]

    def session_keys(self, session_id: str) -> bytes | None:
        with self._lock:
            self._check_open()
            entry = self._sessions.get(session_id)
            return entry[1] if entry is not None and entry[2] > time.time() else None

    def delete_session(self, session_id: str) -> bool:
        with self._lock:
            self._check_open()
            entry = self._sessions.pop(session_id, None)
            return entry is not None and entry[2] > time.time()

    def count_sessions(self) -> int:
        with self._lock:
            self._check_open()
            self._purge_sessions(time.time())
            return len(self._sessions)

    # fits
    def _live_fit(self, session_id: str, now: float) -> FitRecord | None:
        entry = self._fits.get(session_id)
        if entry is not None and entry[1] <= now:
            del self._fits[session_id]
            return None
        return None if entry is None else entry[0]

    def claim_fit(self, record: FitRecord, *, per_client: int, ttl_s: float) -> bool:
        check_bound(per_client, "per_client")
        check_ttl(ttl_s)
        with self._lock:
            self._check_open()
            now = time.time()
            held = sum(1 for s, (r, expires) in self._fits.items()
                       if r.client == record.client and expires > now and s != record.session_id)
            if held >= per_client:
                return False
            self._fits[record.session_id] = (record, now + ttl_s)
            return True

    def get_fit(self, session_id: str) -> FitRecord | None:
        with self._lock:
            self._check_open()
            return self._live_fit(session_id, time.time())

    def touch_fit(self, session_id: str, *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        with self._lock:
            self._check_open()
            now = time.time()
            record = self._live_fit(session_id, now)
            if record is not None:
                self._fits[session_id] = (record, now + ttl_s)

    def release_fit(self, session_id: str) -> None:
        with self._lock:
            self._check_open()
            self._fits.pop(session_id, None)

    # API keys
    def add_api_key(self, record: ApiKeyRecord) -> None:
        with self._lock:
            self._check_open()
            if record.name in self._keys:
                raise StoreError(f"an API key named {record.name!r} exists; choose another name or revoke it")
            if any(r.digest == record.digest for r in self._keys.values()):
                raise StoreError("an API key with this digest exists; generate a new key")
            self._keys[record.name] = record

    def find_api_key(self, digest: str) -> ApiKeyRecord | None:
        with self._lock:
            self._check_open()
            return next((r for r in self._keys.values() if r.digest == digest), None)

    def revoke_api_key(self, name: str) -> bool:
        with self._lock:
            self._check_open()
            record = self._keys.get(name)
            if record is None or record.revoked:
                return False
            self._keys[name] = replace(record, revoked=True)
            return True

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self._lock:
            self._check_open()
            return sorted(self._keys.values(), key=lambda r: (r.created, r.name))

    # lifecycle
    def ping(self) -> None:
        with self._lock:
            self._check_open()

    def close(self) -> None:
        with self._lock:
            self._closed = True
