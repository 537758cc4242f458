"""Query budgets against model extraction: rows answered per session and per client.

Every reply answers `lanes` rows of W h + b (all lanes of the query ciphertext are evaluated, whatever
count the client declares), and d + 1 independent rows determine W and b exactly. A budget caps the rows a
session, and a client (its API key, or its address when the server has no key), may be answered. Counts
live in this process only: they reset on restart and are not shared between replicas.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a query was refused: which budget ran out and what the client can do."""

    scope: str  # "session" or "client"
    limit: int
    message: str


class QueryBudget:
    """Reserve rows per session and per client; None means no limit. The client table holds `max_clients`
    entries, least recently used evicted (an evicted client starts again from zero: size it above the number
    of clients)."""

    def __init__(self, rows_per_session: int | None, rows_per_client: int | None, max_clients: int = 10_000):
        for name, value in (("rows_per_session", rows_per_session), ("rows_per_client", rows_per_client)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of rows or unset (no limit), got {value}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        self.rows_per_session, self.rows_per_client, self.max_clients = rows_per_session, rows_per_client, max_clients
        self._clients: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def client_id(api_key: bytes | None, address: str | None) -> str:
        """Accounting key: a digest of the API key (never the key itself), else the peer address."""
        if api_key is not None:
            return "key:" + hashlib.sha256(api_key).hexdigest()[:32]
        return f"addr:{address or 'unknown'}"

    def reserve(self, session_used: int, client: str, rows: int) -> tuple[Refusal | None, int | None]:
        """(refusal or None, rows left afterwards or None when unlimited). On success the client is charged;
        the caller adds `rows` to the session's own count."""
        with self._lock:
            client_used = self._clients.get(client, 0)
            if self.rows_per_session is not None and session_used + rows > self.rows_per_session:
                return Refusal("session", self.rows_per_session,
                               f"this session has used {session_used} of its {self.rows_per_session} rows and a "
                               f"query costs {rows}; open a new session (POST /v1/sessions), which the per-client "
                               f"budget still bounds"), 0
            if self.rows_per_client is not None and client_used + rows > self.rows_per_client:
                return Refusal("client", self.rows_per_client,
                               f"this client (API key or address) has used {client_used} of its "
                               f"{self.rows_per_client} rows and a query costs {rows}; ask the server's operator "
                               f"for a larger budget"), 0
            if self.rows_per_client is not None:
                self._clients[client] = client_used + rows
                self._clients.move_to_end(client)
                while len(self._clients) > self.max_clients:
                    self._clients.popitem(last=False)
            left = [limit - used for limit, used in ((self.rows_per_session, session_used + rows),
                                                      (self.rows_per_client, client_used + rows)) if limit is not None]
            return None, min(left) if left else None

    def refund(self, client: str, rows: int) -> None:
        """Give back rows reserved for a query that got no answer (refused bytes, server busy)."""
        with self._lock:
            if self.rows_per_client is not None and client in self._clients:
                self._clients[client] = max(0, self._clients[client] - rows)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)


class FitBudget:
    """Private fits (fit sessions opened) per client; None means no limit. A fit with source dimension d_A tells
    the client d_A linear combinations of the provider's public rows per part, so fits × d_A bounds what one
    client learns of them. The table holds `max_clients` entries, least recently used evicted."""

    def __init__(self, fits_per_client: int | None, max_clients: int = 10_000):
        if fits_per_client is not None and fits_per_client < 1:
            raise ValueError(f"fits_per_client must be a positive number of fits or unset (no limit), got "
                             f"{fits_per_client}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        self.fits_per_client, self.max_clients = fits_per_client, max_clients
        self._clients: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, client: str) -> Refusal | None:
        """Charge one fit to `client`; a Refusal when its budget is spent."""
        if self.fits_per_client is None:
            return None
        with self._lock:
            used = self._clients.get(client, 0)
            if used >= self.fits_per_client:
                return Refusal("client", self.fits_per_client,
                               f"this client (API key or address) has opened {used} of its {self.fits_per_client} "
                               f"private fits; ask the server's operator for a larger --fits_per_client")
            self._clients[client] = used + 1
            self._clients.move_to_end(client)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        return None

    def refund(self, client: str) -> None:
        """Give back a fit whose session was refused before it was opened (bad keys, a busy server)."""
        with self._lock:
            if client in self._clients:
                self._clients[client] = max(0, self._clients[client] - 1)
