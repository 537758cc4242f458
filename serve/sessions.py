"""Per-replica session memory: the private fits a replica holds (their accumulators cannot move), and a bounded
cache of deserialised inference-session keys (the sessions themselves live in the state store, `serve.store`).

Deserialising Galois keys costs tens of milliseconds and a few MB each, so a replica keeps the latest ones; a
session whose keys are not cached here (another replica opened it, or this one restarted) is read back from the
store.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, Callable


class SessionStore:
    """Sessions (anything with `session_id` and `last_used`) by id, least recently used first. `ttl_s` counts
    from a session's last use, which `get(..., touch=True)` or `touch` marks. When full, `put` evicts the least
    recently used (`evict=True`) or refuses (`evict=False`: the caller checks `free_slots` first)."""

    def __init__(self, max_sessions: int, ttl_s: float, *, id_prefix: str = "", evict: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if ttl_s <= 0:
            raise ValueError(f"session_ttl_s must be positive, got {ttl_s}")
        self.max_sessions, self.ttl_s, self.id_prefix, self.clock = max_sessions, ttl_s, id_prefix, clock
        self.evict = evict
        self._sessions: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0
        self.expired = 0

    def new_id(self) -> str:
        return self.id_prefix + secrets.token_urlsafe(24)

    def _purge_expired(self, now: float) -> None:
        for session in [s for s in self._sessions.values() if now - s.last_used >= self.ttl_s]:
            del self._sessions[session.session_id]
            self.expired += 1

    def put(self, session: Any) -> Any:
        """Store `session` (evicting the least recently used when full and `evict`); returns it."""
        with self._lock:
            self._purge_expired(self.clock())
            while len(self._sessions) >= self.max_sessions:
                if not self.evict:
                    raise RuntimeError("SessionStore is full; check free_slots() before put()")
                self._sessions.popitem(last=False)
                self.evicted += 1
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str, *, touch: bool = True) -> Any | None:
        """The live session (marked as used now when `touch`); None if unknown, evicted or expired."""
        now = self.clock()
        with self._lock:
            self._purge_expired(now)
            session = self._sessions.get(session_id)
            if session is not None and touch:
                session.last_used = now
                self._sessions.move_to_end(session_id)
            return session

    def touch(self, session_id: str) -> None:
        """Mark a session as used now (for fits: only on progress)."""
        self.get(session_id, touch=True)

    def remove(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def values(self) -> list[Any]:
        """The live sessions, least recently used first (a snapshot)."""
        with self._lock:
            self._purge_expired(self.clock())
            return list(self._sessions.values())

    def free_slots(self) -> int:
        with self._lock:
            self._purge_expired(self.clock())
            return self.max_sessions - len(self._sessions)

    def __len__(self) -> int:
        return self.max_sessions - self.free_slots()


class KeyCache:
    """Deserialised public keys by session id, at most `capacity`, least recently used dropped first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"max_cached_keys must be at least 1, got {capacity}")
        self.capacity = capacity
        self._keys: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Any | None:
        with self._lock:
            keys = self._keys.get(session_id)
            if keys is not None:
                self._keys.move_to_end(session_id)
            return keys

    def put(self, session_id: str, keys: Any) -> None:
        with self._lock:
            self._keys[session_id] = keys
            self._keys.move_to_end(session_id)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._keys.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)
