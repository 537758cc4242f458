"""A client of one served head on the provider's own states (no map): the head probe of a private fit."""
from __future__ import annotations

import httpx

from .client import Client
from .http_client import Traffic


class HeadClient(Client):
    """Queries one served head on states of the provider's own space (no map): the head-aware λ of a private fit
    probes the head on the directions its maps can reach (`lightning_modules.parties.head_probe`). Each query is an
    ordinary encrypted session query, counted against the server's row budgets. Its session is its own (no session
    cache) and is deleted on close; `traffic` counts its bytes and queries in a command's account."""

    def __init__(self, url: str, head: str, api_key: str | None = None, timeout: float = 60.0, *,
                 traffic: Traffic | None = None, transport: httpx.BaseTransport | None = None):
        super().__init__(url, api_key, timeout, transport=transport, cache=False, traffic=traffic)
        self.head = head  # no map: `state_dim` is the head's input_dim and `map_states` is the identity
