"""Every server setting, declared once: `create_app(..., **settings)` and the `xsilo serve` flags take these."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .formats.folders import xsilo_home
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
        replica_id: this replica's name in logs, /healthz and fit records (null: a random one per process).
        header_timeout_s: seconds a client has to send a request's headers (from connect, or the previous
            response).
        body_timeout_s: seconds a client has to send a request's body, after its headers.
        keep_alive_s: idle keep-alive connections are closed after this many seconds.
        max_connections: open connections; beyond it a request gets 503 and its connection is closed.
        max_header_bytes: largest request line + headers.
        rows_per_session: query budget: rows (query lanes) answered per session (null: no limit).
        rows_per_client: query budget per client identity (API key, or address without one) and layer (null: no
            limit); an issued key may carry its own (`xsilo keys add --rows_per_client`).
        output_noise: standard deviation of Gaussian noise added to every output, against model extraction.
        circuit_privacy: statistical security in bits (e.g. 30) of circuit-private replies, independent of W
            beyond W x + b (profile n8192-private; needs the client's public key, checked at upload). Off by
            default in logits mode: logits already give W with d + 1 rows (serve/README.md, Threat model); a
            label-only layer is always circuit-private, at this level or 30.
        answers: what a layer's replies reveal: 'logits' (W h + b, the default) or 'label' (the argmax class
            only, through a secure two-party argmax: `encrypted.argmax`), for every layer, or a mapping from
            layer ('fused' or a head's name) to either, e.g. '{bbc: label}' (unnamed layers answer logits).
        max_label_runs: label-only answers in progress on this replica at once (each holds a few hundred KB of
            Paillier ciphertexts); beyond it 503.
        label_run_ttl_s: idle seconds before a label-only answer in progress is dropped.
        label_runs_per_client: label-only answers one client (API key or address) may have in progress at once.
        max_fit_sessions: private fits running at once (each holds one part's encrypted accumulators); beyond it
            503 (never evicted: each holds a client's work).
        fit_session_ttl_s: idle seconds before a fit session and its accumulators are dropped.
        max_fit_source_dim: the largest client state dimension a private fit accepts.
        max_fit_accumulator_bytes: memory of one fit session's accumulators (GramPlan.accumulator_bytes).
        fits_per_client: private fits opened per client identity (null: no limit); an issued key may carry its
            own.
        max_public_texts: texts per page of GET /v1/public-set/texts.
        publish_val_logits: publish each head's logits on the public set's val rows (GET
            /v1/public-set/val-logits), so clients can choose λ through the head (`xsilo align --head NAME`);
            each row is charged to the client's row budget of the head, as a query row is.
        store: where budgets, sessions (with their public keys), fit records and API keys live: 'sqlite:///PATH'
            (null: sqlite under $XSILO_HOME/serve/state.db, which survives restarts), 'redis://HOST:PORT/DB' (several
            replicas share it), or 'memory://' (this process only).
        api_keys: require an API key issued with `xsilo keys add` (kept in the store; one identity and budget
            each, revoked with `xsilo keys revoke` while the server runs). --api_key still works beside them.
        max_cached_keys: deserialised session keys kept per replica (a few MB each, least recently used dropped;
            a dropped one is read back from the store).
        fit_slots_per_client: private-fit sessions one client may hold open at once, across replicas.
        fit_session_max_s: a fit session's whole lifetime, however it progresses; then it is dropped.
        trusted_proxies: addresses whose X-Forwarded-For / X-Forwarded-Proto are believed (e.g. '[10.0.0.5]');
            empty: the peer address is the client, whatever the headers say.
        max_connections_per_client: open connections per peer address (a trusted proxy is not limited).
        drain_delay_s: on SIGTERM, seconds the server keeps serving while /readyz answers 503, so that the
            balancer stops sending traffic; then it stops accepting.
        drain_timeout_s: after it stops accepting, seconds in-flight requests have to finish before it exits.
        ssl_certfile: serve HTTPS with this PEM certificate (with ssl_keyfile).
        ssl_keyfile: the PEM private key of ssl_certfile.
        expect_sha256: pin the served folders: each folder's content digest (logged at start, and printed by
            `xsilo serve` when one differs) must be in this list, else the server refuses to start.
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
    output_noise: float = 0.0
    circuit_privacy: int | None = None
    answers: str | dict[str, str] = "logits"
    max_label_runs: int = 64
    label_run_ttl_s: float = 60.0
    label_runs_per_client: int = 4
    max_fit_sessions: int = 2
    fit_session_ttl_s: float = 600.0
    max_fit_source_dim: int = 4096
    max_fit_accumulator_bytes: int = 256 << 20
    fits_per_client: int | None = 2
    max_public_texts: int = 512
    publish_val_logits: bool = False
    store: str | None = None
    api_keys: bool = False
    max_cached_keys: int = 32
    fit_slots_per_client: int = 1
    fit_session_max_s: float = 3600.0
    trusted_proxies: list[str] = field(default_factory=list)
    max_connections_per_client: int = 32
    drain_delay_s: float = 0.0
    drain_timeout_s: float = 30.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    expect_sha256: list[str] | None = None

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
        limited_protocol(self.header_timeout_s, self.max_connections, self.max_header_bytes,
                         self.max_connections_per_client, self.trusted_proxies)  # validates them
        for name in ("drain_delay_s", "drain_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {getattr(self, name)}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both --ssl_certfile and --ssl_keyfile (PEM files), or neither")
        for name in ("ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_file():
                raise ValueError(f"--{name} {getattr(self, name)!r} is not a readable file")
        for name in ("rows_per_session", "rows_per_client", "fits_per_client"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive count or unset (no limit), got {value}")
        check_answers(self.answers)
        for name in ("max_fit_sessions", "max_fit_source_dim", "max_fit_accumulator_bytes", "max_public_texts",
                     "max_cached_keys", "fit_slots_per_client", "max_label_runs", "label_runs_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("fit_session_ttl_s", "fit_session_max_s", "label_run_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.api_keys and self.store == "memory://":
            raise ValueError("--api_keys true reads keys issued with `xsilo keys add` from the store, which a "
                             "memory:// store cannot hold; use the sqlite default or a redis:// store")
        for pin in self.expect_sha256 or ():
            if not (isinstance(pin, str) and len(pin) == 64 and all(c in "0123456789abcdef" for c in pin)):
                raise ValueError(f"--expect_sha256 takes folder digests of 64 lowercase hex characters (as `xsilo "
                                 f"serve` logs them), got {str(pin)[:80]!r}")


ANSWERS = ("logits", "label")


def answers_for(answers: str | dict[str, str], layer: str) -> str:
    """'logits' or 'label' for layer `layer` ('fused' or a head's name) under the --answers setting."""
    return answers if isinstance(answers, str) else answers.get(layer, "logits")


def check_answers(answers: object) -> None:
    modes = [answers] if isinstance(answers, str) else list(answers.values()) if isinstance(answers, dict) else None
    if modes is None or not all(isinstance(mode, str) and mode in ANSWERS for mode in modes) or (
            isinstance(answers, dict) and not all(isinstance(name, str) for name in answers)):
        raise ValueError(f"--answers takes 'logits' or 'label', or a mapping from layer ('fused' or a head's name) to "
                         f"either, e.g. '{{bbc: label}}'; got {str(answers)[:80]!r}")


def check_api_key(key: str) -> None:
    """Refuse a key that would disable or defeat authentication. Non-ASCII keys are fine: compared as UTF-8."""
    if not isinstance(key, str) or key == "":
        raise ValueError("the API key is empty, which would turn authentication off; pass a non-empty --api_key "
                         "(or XSILO_API_KEY), or leave it unset to serve without a key")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError("the API key has leading/trailing whitespace or control characters, which HTTP headers "
                         "cannot carry; choose a key of visible characters")


def store_url(settings: ServerSettings) -> str:
    """The store a server opens: `settings.store`, else a SQLite file under $XSILO_HOME, which survives restarts."""
    if settings.store is not None:
        return settings.store
    return f"sqlite:///{xsilo_home().resolve() / 'serve' / 'state.db'}"
