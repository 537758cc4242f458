"""Every server setting, declared once: `create_app(..., **settings)` and the `xsilo serve` flags take these."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .budget import FitBudget, QueryBudget
from .transport import limited_protocol


@dataclass(frozen=True)
class ServerSettings:
    """Every server setting, declared once (`create_app(export_dir, **settings)`; `xsilo serve` flags)."""

    api_key: str | None = None  # None: no authentication; never empty
    max_sessions: int = 64  # each holds the client's Galois keys: a few MB at N=8192
    session_ttl_s: float = 1800.0  # idle time before a session is dropped
    max_key_bytes: int | None = None  # None: bound derived from the layout
    max_query_bytes: int | None = None
    max_concurrency: int = 2  # HE jobs running at once (threads)
    max_pending: int = 256  # HE jobs running or waiting; beyond it, 503
    replica_id: str | None = None  # prefixes session ids, for routing by id behind a load balancer
    header_timeout_s: float = 10.0  # from connect (or the previous response) until the headers are complete
    body_timeout_s: float = 30.0  # from the headers until the whole body has arrived
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this
    max_connections: int = 256  # open connections; beyond it a request gets 503 and its connection is closed
    max_header_bytes: int = 16384  # request line + headers
    rows_per_session: int | None = None  # query budget in rows (lanes answered); None: no limit
    rows_per_client: int | None = None  # per API key, or per client address without one
    max_clients: int = 10_000  # entries of the per-client budget table (LRU)
    output_noise: float = 0.0  # std of Gaussian noise added to every output, against extraction
    circuit_privacy: int | None = None  # λ bits: replies independent of W beyond W x + b (needs the client's PUBK)
    # private fit (needs a public set): each session holds one part's encrypted accumulators
    max_fit_sessions: int = 2  # fit sessions at once; beyond it 503 (never evicted: each holds a client's work)
    fit_session_ttl_s: float = 600.0  # idle time before a fit session and its accumulators are dropped
    max_fit_source_dim: int = 4096  # largest client state dimension a fit accepts
    max_fit_accumulator_bytes: int = 256 << 20  # memory of one session's accumulators (GramPlan.accumulator_bytes)
    fits_per_client: int | None = 2  # fit sessions opened per API key (or address); None: no limit
    max_public_texts: int = 512  # texts per page of GET /v1/public-set/texts
    publish_val_logits: bool = False  # GET /v1/public-set/val-logits: each head's logits on the public val rows

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
