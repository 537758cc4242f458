"""Every server setting, declared once: `create_app(..., **settings)` and the `xsilo serve` flags take these."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .budget import FitBudget, QueryBudget
from .transport import limited_protocol


@dataclass(frozen=True)
class ServerSettings:
    """Every server setting, declared once: `create_app(export_dir, **settings)`, and `xsilo serve` takes it
    whole (each field is a flag: --max_sessions, --rows_per_client, ...).

    Args:
        api_key: require this key as 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (null: no authentication;
            `xsilo serve` defaults to $XSILO_API_KEY; an empty key is refused).
        max_sessions: sessions kept at once (each holds the client's Galois keys: a few MB at N=8192); beyond it
            the least recently used is evicted.
        session_ttl_s: idle seconds before a session is dropped.
        max_key_bytes: largest key upload (null: a bound derived from the layout).
        max_query_bytes: largest query upload (null: a bound derived from the layout).
        max_concurrency: HE evaluations running at once (threads).
        max_pending: HE jobs running or waiting; beyond it 503.
        replica_id: prefix of session ids, for routing by session id behind a load balancer.
        header_timeout_s: seconds a client has to send a request's headers (from connect, or the previous
            response).
        body_timeout_s: seconds a client has to send a request's body, after its headers.
        keep_alive_s: idle keep-alive connections are closed after this many seconds.
        max_connections: open connections; beyond it a request gets 503 and its connection is closed.
        max_header_bytes: largest request line + headers.
        rows_per_session: query budget: rows (query lanes) answered per session (null: no limit).
        rows_per_client: query budget per API key, or per client address without a key (null: no limit).
        max_clients: entries of the per-client budget table (least recently used evicted).
        output_noise: standard deviation of Gaussian noise added to every output, against model extraction.
        circuit_privacy: statistical security in bits (e.g. 30) of circuit-private replies, independent of W
            beyond W x + b (profile n8192-private; needs the client's public key).
        max_fit_sessions: private fits running at once (each holds one part's encrypted accumulators); beyond it
            503 (never evicted: each holds a client's work).
        fit_session_ttl_s: idle seconds before a fit session and its accumulators are dropped.
        max_fit_source_dim: the largest client state dimension a private fit accepts.
        max_fit_accumulator_bytes: memory of one fit session's accumulators (GramPlan.accumulator_bytes).
        fits_per_client: private fits opened per API key, or per client address without one (null: no limit).
        max_public_texts: texts per page of GET /v1/public-set/texts.
        publish_val_logits: publish each head's logits on the public set's val rows (GET
            /v1/public-set/val-logits), so clients can choose λ through the head (`xsilo align --head NAME`).
    """

    api_key: str | None = None
    max_sessions: int = 64
    session_ttl_s: float = 1800.0
    max_key_bytes: int | None = None
    max_query_bytes: int | None = None
    max_concurrency: int = 2
    max_pending: int = 256
    replica_id: str | None = None
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5
    max_connections: int = 256
    max_header_bytes: int = 16384
    rows_per_session: int | None = None
    rows_per_client: int | None = None
    max_clients: int = 10_000
    output_noise: float = 0.0
    circuit_privacy: int | None = None
    max_fit_sessions: int = 2
    fit_session_ttl_s: float = 600.0
    max_fit_source_dim: int = 4096
    max_fit_accumulator_bytes: int = 256 << 20
    fits_per_client: int | None = 2
    max_public_texts: int = 512
    publish_val_logits: bool = False

    def __post_init__(self) -> None:
        if self.api_key is not None:
            check_api_key(self.api_key)
        if self.max_concurrency < 1 or self.max_pending < 1:
            raise ValueError(f"max_concurrency and max_pending must be at least 1, got {self.max_concurrency}, "
                             f"{self.max_pending}")
        if not self.body_timeout_s > 0 or self.keep_alive_s < 1:
            raise ValueError(f"body_timeout_s must be positive and keep_alive_s at least 1, got "
                             f"{self.body_timeout_s}, {self.keep_alive_s}")
        if not (math.isfinite(self.output_noise) and self.output_noise >= 0):
            raise ValueError(f"output_noise must be a finite standard deviation >= 0, got {self.output_noise}")
        limited_protocol(self.header_timeout_s, self.max_connections, self.max_header_bytes)  # validates them
        QueryBudget(self.rows_per_session, self.rows_per_client, self.max_clients)  # validates them
        FitBudget(self.fits_per_client, self.max_clients)  # validates them
        for name in ("max_fit_sessions", "max_fit_source_dim", "max_fit_accumulator_bytes", "max_public_texts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.fit_session_ttl_s > 0:
            raise ValueError(f"fit_session_ttl_s must be positive, got {self.fit_session_ttl_s}")


def check_api_key(key: str) -> None:
    """Refuse a key that would disable or defeat authentication. Non-ASCII keys are fine: compared as UTF-8."""
    if not isinstance(key, str) or key == "":
        raise ValueError("the API key is empty, which would turn authentication off; pass a non-empty --api_key "
                         "(or XSILO_API_KEY), or leave it unset to serve without a key")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError("the API key has leading/trailing whitespace or control characters, which HTTP headers "
                         "cannot carry; choose a key of visible characters")
