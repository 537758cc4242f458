"""What the Python clients share: the HTTP connection to one xsilo server, its typed errors, retries of transient
failures, and the count of every byte and request a client spends (`Traffic`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx

from .protocol import OCTET_STREAM, SERVER_TIMING_HEADER, SESSION_NOT_FOUND

MAX_RESPONSE_BYTES = 64 << 20  # any answer of an xsilo server is far smaller; a bigger one is refused unread


class ServeError(Exception):
    """A client-side failure: the server is unreachable, refused a request, or the client setup is wrong."""


class ServerUnreachable(ServeError):
    """No answer from the server, after the retries (connection refused or reset, DNS, TLS)."""


class ServerReplyError(ServeError):
    """The server answered with an error ``{"error": {"code", "message"}}``."""

    hint = ""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"server answered {status} {code}: {message}" + (f"; {self.hint}" if self.hint else ""))
        self.status, self.code, self.message = status, code, message


class Unauthorized(ServerReplyError):
    """401/403: the API key is missing, wrong or revoked."""

    hint = "pass the server's API key (--api_key, or $XSILO_API_KEY)"


class BudgetExhausted(ServerReplyError):
    """429: a row or fit budget of the server ran out (the message says which)."""


class ServerBusy(ServerReplyError):
    """503: the server stayed busy (or draining) through every retry."""

    hint = "retry later, or ask the operator for more capacity (--max_concurrency, replicas)"


class SessionLost(ServerReplyError):
    """404 session_not_found: the server no longer holds the session (the Client re-opens it by itself)."""


ERRORS_BY_STATUS: dict[int, type[ServerReplyError]] = {401: Unauthorized, 403: Unauthorized, 429: BudgetExhausted,
                                                      503: ServerBusy}


def reply_error(response: httpx.Response) -> ServerReplyError:
    """The server's JSON error as its typed exception, or a plain HTTP one when the body is not xsilo's error shape."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"])[:100], str(error["message"])[:2000]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {response.status_code} {response.reason_phrase} from {response.url}"
    kind = SessionLost if (response.status_code, code) == (404, SESSION_NOT_FOUND) else \
        ERRORS_BY_STATUS.get(response.status_code, ServerReplyError)
    return kind(response.status_code, code, message)


def server_ms(response: httpx.Response) -> float:
    """The server's HE milliseconds from `Server-Timing: he;dur=MS` (0 when absent or malformed)."""
    timing = response.headers.get(SERVER_TIMING_HEADER, "")
    if "dur=" not in timing:
        return 0.0
    try:
        value = float(timing.split("dur=")[1].split(",")[0].split(";")[0])
    except ValueError:
        return 0.0
    return value if value >= 0 and value < 1e9 else 0.0


# --- traffic -----------------------------------------------------------------------------------------------

def route_kind(method: str, path: str) -> str:
    """What a request is, for the traffic account: keys, query, fit chunk, fit result, public texts, ..."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    tail = parts[1:] if parts[:1] == ["v1"] else parts
    if method == "DELETE":
        return "session close"
    if tail[:1] == ["sessions"]:
        return {"infer": "query", "label": "label query"}.get(tail[-1], "keys")
    if tail[:1] == ["label-runs"]:
        return "argmax"
    if tail[:2] == ["fit", "sessions"]:
        return "fit chunk" if "chunks" in tail else "fit result" if "result" in tail else "keys"
    names = {"model": "model info", "fit": "fit plan", "heads": "detector"}
    if tail[:2] == ["public-set", "texts"]:
        return "public texts"
    if tail[:2] == ["public-set", "val-logits"]:
        return "val logits"
    return names.get(tail[0], "other") if tail else "other"


class Traffic:
    """Bytes (request and response bodies, as the server's request log counts them) and requests, per kind of
    request, over every Connection that shares it: one account for a whole command."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[int]] = {}  # kind -> [requests, bytes sent, bytes received]
        self.rows_charged = 0  # rows charged: `lanes` per logits query, the answered rows per label query, one
        # per val logit row

    def add(self, kind: str, sent: int, received: int) -> None:
        entry = self.kinds.setdefault(kind, [0, 0, 0])
        entry[0] += 1
        entry[1] += sent
        entry[2] += received

    @property
    def requests(self) -> int:
        return sum(v[0] for v in self.kinds.values())

    @property
    def bytes_sent(self) -> int:
        return sum(v[1] for v in self.kinds.values())

    @property
    def bytes_received(self) -> int:
        return sum(v[2] for v in self.kinds.values())

    def count(self, kind: str) -> int:
        return self.kinds.get(kind, [0, 0, 0])[0]

    @property
    def queries(self) -> int:
        """Encrypted queries, logits and label ones alike (a label query's argmax messages are not queries)."""
        return self.count("query") + self.count("label query")

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "queries": self.queries, "rows_charged": self.rows_charged,
                "by_kind": {k: {"requests": v[0], "bytes_sent": v[1], "bytes_received": v[2]}
                            for k, v in sorted(self.kinds.items())}}

    def describe(self) -> str:
        """One line: totals, then each kind's requests and bytes."""
        parts = [f"{k} {v[0]}x {mb(v[1])} up / {mb(v[2])} down" for k, v in sorted(self.kinds.items(),
                                                                                  key=lambda kv: -kv[1][1] - kv[1][2])]
        queries = (f", {self.queries} encrypted queries ({self.rows_charged} rows charged)"
                   if self.queries or self.rows_charged else "")
        return (f"traffic: {self.requests} requests{queries}, sent {self.bytes_sent:,} B ({mb(self.bytes_sent)}), "
                f"received {self.bytes_received:,} B ({mb(self.bytes_received)}): " + "; ".join(parts))


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"


# --- retries -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Retry:
    """Transient failures retried with exponential backoff: a refused or reset connection (a replica restarting)
    and 503 answers (busy, draining; their Retry-After is honoured up to `max_wait_s`). A request that may have
    reached the server is repeated only when it is safe to (`idempotent`)."""

    attempts: int = 6  # retries after the first try
    backoff_s: float = 0.25
    max_wait_s: float = 10.0  # one wait
    max_total_s: float = 30.0  # all waits of one request

    def wait(self, attempt: int, retry_after: str | None) -> float:
        try:
            asked = float(retry_after) if retry_after is not None else None
        except ValueError:
            asked = None
        wait = asked if asked is not None and asked >= 0 else self.backoff_s * 2 ** attempt
        return min(wait, self.max_wait_s)


NO_RETRY = Retry(attempts=0)
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never reached the server
MAYBE_SENT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)  # a connection reset mid-request


class Connection:
    """httpx to one server (or a load balancer in front of replicas), with the API key, retries and byte counts."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, *, traffic: Traffic | None = None,
                 retry: Retry = Retry(), sleep: Callable[[float], None] = time.sleep):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ServeError(f"the server URL must start with http:// or https://, got {str(url)[:100]!r}; e.g. "
                             "http://127.0.0.1:8000")
        self.url = url.rstrip("/")
        # bytes: a non-ASCII key travels as its UTF-8 bytes, which is what the server compares
        headers = {"Authorization": b"Bearer " + api_key.encode("utf-8")} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)
        self.traffic = traffic if traffic is not None else Traffic()
        self.retry, self.sleep = retry, sleep
        self.retried = 0  # transient failures retried, over this connection's life

    @property
    def bytes_sent(self) -> int:
        return self.traffic.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.traffic.bytes_received

    def request(self, method: str, path: str, *, content: bytes | None = None, params: dict[str, Any] | None = None,
                expect: Sequence[int] = (200,), max_bytes: int = MAX_RESPONSE_BYTES,
                idempotent: bool = True, retry: Retry | None = None) -> httpx.Response:
        """One request, retried on transient failures (`Retry`, or `retry` for this one; a request that may have
        reached the server only when `idempotent`); the answer is read up to `max_bytes` (the server is the other
        party: a longer answer is refused while it streams). Raises the typed ServerReplyError for a status not in
        `expect`, ServerUnreachable when no answer came, ServeError otherwise."""
        policy = retry or self.retry
        waited = 0.0
        for attempt in range(policy.attempts + 1):
            last = attempt == policy.attempts
            try:
                response = self._once(method, path, content, params, max_bytes)
            except NOT_SENT + MAYBE_SENT as exc:
                wait = policy.wait(attempt, None)
                if not (isinstance(exc, NOT_SENT) or idempotent) or last or waited + wait > policy.max_total_s:
                    raise ServerUnreachable(f"cannot reach the server at {self.url} ({type(exc).__name__}: {exc}"
                                            f"{f', after {attempt} retries' if attempt else ''}); is `xsilo serve` "
                                            "running there?") from None
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"cannot reach the server at {self.url} ({type(exc).__name__}: {exc}); "
                                        "is `xsilo serve` running there?") from None
            else:
                if response.status_code in expect:
                    return response
                wait = policy.wait(attempt, response.headers.get("Retry-After"))
                if response.status_code != 503 or last or waited + wait > policy.max_total_s:
                    raise reply_error(response)
            self.retried += 1
            waited += wait
            self.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _once(self, method: str, path: str, content: bytes | None, params: dict[str, Any] | None,
              max_bytes: int) -> httpx.Response:
        headers = {"Content-Type": OCTET_STREAM} if content is not None else None
        body = bytearray()
        with self.http.stream(method, path, content=content, headers=headers, params=params) as streamed:
            for block in streamed.iter_bytes():
                body += block
                if len(body) > max_bytes:
                    raise ServeError(f"{method} {path} on {self.url} answered more than {max_bytes} bytes, far "
                                     "more than this route sends; refusing it (is it an xsilo server?)")
            received = streamed.num_bytes_downloaded
        self.traffic.add(route_kind(method, path), len(content or b""), received)
        kept = [(k, v) for k, v in streamed.headers.multi_items()
                if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return httpx.Response(streamed.status_code, headers=kept, content=bytes(body), request=streamed.request)

    def json(self, method: str, path: str, **options: Any) -> Any:
        response = self.request(method, path, **options)
        try:
            return response.json()
        except ValueError:
            raise ServeError(f"{method} {path} on {self.url} did not answer JSON; is it an xsilo server?") from None

    def close(self) -> None:
        self.http.close()
