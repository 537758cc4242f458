"""Budgets against model extraction: rows answered per session and per client, private fits per client.

Every reply answers `lanes` rows of W h + b (all lanes of the query ciphertext are evaluated, whatever count the
client declares), every page of a head's published val logits answers its rows, and d + 1 independent rows
determine W and b exactly. A budget caps the rows a session, and a client (its identity: API key or address,
`serve.identity`), may be answered on each layer, whatever route they leave by, and the private fits a client may
open. Counts live in the state store (`serve.store`): they survive restarts, replicas share them, and one charge is
atomic across the session and the client, so two replicas spending one budget at once never let more rows through
than it allows.
"""
from __future__ import annotations

from dataclasses import dataclass

from .identity import Identity
from .settings import ServerSettings
from .store import Charge, StateStore


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: which budget ran out and what the client can do."""

    scope: str  # "session" or "client"
    limit: int
    message: str


class Budgets:
    """Charges and refunds in the store, by the settings' and the identity's limits."""

    def __init__(self, store: StateStore, settings: ServerSettings):
        self.store, self.settings = store, settings

    def row_charges(self, session_id: str, identity: Identity, layer: str, rows: int) -> list[Charge]:
        # The session's counter expires with the session; the client's is kept (a budget must outlive restarts).
        return [Charge(f"session-rows:{session_id}", rows, self.settings.rows_per_session,
                       ttl_s=self.settings.session_ttl_s),
                Charge(f"rows:{identity.client}|{layer}", rows, identity.rows_per_client)]

    def charge_rows(self, session_id: str, identity: Identity, layer: str,
                    rows: int) -> tuple[Refusal | None, int | None]:
        """(refusal or None, rows left afterwards or None when unlimited) for one query of `rows` rows."""
        charges = self.row_charges(session_id, identity, layer, rows)
        refused, used = self.store.charge(charges)
        if refused is not None:
            if refused.index == 0:
                return Refusal("session", refused.limit,
                               f"this session has used {refused.used} of its {refused.limit} rows and a query costs "
                               f"{rows}; open a new session (POST /v1/sessions), which the per-client budget still "
                               f"bounds"), 0
            return Refusal("client", refused.limit,
                           f"this client (API key or address) has used {refused.used} of its {refused.limit} rows "
                           f"and a query costs {rows}; ask the server's operator for a larger budget"), 0
        left = [charge.limit - value for charge, value in zip(charges, used) if charge.limit is not None]
        return None, min(left) if left else None

    def charge_client_rows(self, identity: Identity, layer: str, rows: int) -> tuple[Refusal | None, int | None]:
        """(refusal or None, rows left or None when unlimited) for `rows` plaintext outputs of `layer` answered
        outside a session (a page of val logits): the same per-client counter as queries, no session counter."""
        charge = Charge(f"rows:{identity.client}|{layer}", rows, identity.rows_per_client)
        refused, used = self.store.charge([charge])
        if refused is not None:
            return Refusal("client", refused.limit,
                           f"this client (API key or address) has used {refused.used} of its {refused.limit} rows of "
                           f"this head and this page costs {rows}; every row of a head's outputs counts, queries "
                           "and val logits alike: ask for fewer rows (?limit=N) or ask the server's operator for a "
                           "larger budget"), 0
        return None, None if charge.limit is None else charge.limit - used[0]

    def client_rows_left(self, identity: Identity, layer: str) -> int | None:
        """Rows the client may still be answered on `layer` (None: no limit)."""
        if identity.rows_per_client is None:
            return None
        return max(identity.rows_per_client - self.store.used(f"rows:{identity.client}|{layer}"), 0)

    def refund_rows(self, session_id: str, identity: Identity, layer: str, rows: int) -> None:
        """Give back rows charged for a query that got no answer (refused bytes, server busy)."""
        self.store.refund(self.row_charges(session_id, identity, layer, rows))

    def charge_fit(self, identity: Identity) -> Refusal | None:
        """Charge one private fit. A fit with source dimension d_A tells the client d_A linear combinations of the
        provider's public rows per part, so fits × d_A bounds what one client learns of them."""
        refused, _ = self.store.charge([Charge(f"fits:{identity.client}", 1, identity.fits_per_client)])
        if refused is None:
            return None
        return Refusal("client", refused.limit,
                       f"this client (API key or address) has opened {refused.used} of its {refused.limit} private "
                       f"fits; ask the server's operator for a larger --fits_per_client")

    def refund_fit(self, identity: Identity) -> None:
        """Give back a fit refused before it was opened (bad keys, a busy server)."""
        self.store.refund([Charge(f"fits:{identity.client}", 1, identity.fits_per_client)])
