"""In-memory sessions: one client's deserialised public keys for one layer, bounded by count (LRU) and idle time (TTL).

Deserialising Galois keys costs tens of milliseconds and a few MB each, so a session keeps them for
its later requests. Nothing here survives a restart: clients re-open sessions (see `serve.client`).
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Session:
    session_id: str
    keys: Any = field(repr=False)  # encrypted.PublicKeys
    key_bytes: int
    created: float
    last_used: float
    rows: int = 0  # rows (query lanes) answered, for the query budget
    layer: str | None = None  # the head the session evaluates; None: the fused export


class SessionStore:
    """Sessions (anything with `session_id` and `last_used`) by id, least recently used first. `ttl_s` counts
    from a session's last use. When full, `put` evicts the least recently used (`evict=True`, inference
    sessions: the client re-opens) or refuses (`evict=False`: the caller checks `free_slots` first)."""

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
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_used < self.ttl_s:
                break
            del self._sessions[oldest.session_id]
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

    def add(self, keys: Any, key_bytes: int, layer: str | None = None) -> Session:
        """A new inference session for `keys` (evaluating `layer`)."""
        now = self.clock()
        return self.put(Session(self.new_id(), keys, key_bytes, now, now, layer=layer))

    def get(self, session_id: str) -> Any | None:
        """The live session, marked as used now; None if unknown, evicted or expired."""
        now = self.clock()
        with self._lock:
            self._purge_expired(now)
            session = self._sessions.get(session_id)
            if session is not None:
                session.last_used = now
                self._sessions.move_to_end(session_id)
            return session

    def remove(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def free_slots(self) -> int:
        with self._lock:
            self._purge_expired(self.clock())
            return self.max_sessions - len(self._sessions)

    def __len__(self) -> int:
        return self.max_sessions - self.free_slots()
