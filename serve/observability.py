"""What an operator watches: JSON-line logs, Prometheus metrics, request ids, and the /metrics and /readyz routes.

* Logs: one JSON object per line (`JsonFormatter`; ts, level, logger, msg, and for the request log request_id,
  method, route, path, status, bytes_in, bytes_out, ms, client). They hold paths, sizes and statuses, never bodies,
  headers, keys, ciphertexts or API keys.
* Request ids: an incoming `X-Request-Id` of at most 64 characters of [A-Za-z0-9._-] is kept, any other is
  replaced by a fresh one; every response echoes it, and a bare 500 names it as its reference.
* Metrics (`ServerMetrics`): in a registry of the app's own (never prometheus_client's global one), labelled
  by route *template* (`/v1/sessions/{session_id}/infer`), never by a raw path: no session id reaches them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .api import error_response

log = logging.getLogger("serve")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LOG_FIELDS = ("request_id", "method", "route", "path", "status", "bytes_in", "bytes_out", "ms", "client", "fit")
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PING_TIMEOUT_S = 5.0


# --- logs ----------------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: ts (UTC, ISO 8601), level, logger, msg, the request fields it carries
    (`LOG_FIELDS`, passed as `extra=`) and exc (the traceback) when it has one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for field in LOG_FIELDS:
            if hasattr(record, field):
                line[field] = getattr(record, field)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when each record is written, not when logging was configured:
    a server started under a redirect or a test's capture that has since closed still logs."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def json_log_config(level: str = "info") -> dict[str, Any]:
    """A logging.config dict: JSON lines on stderr for the "serve" and uvicorn loggers (and the root's warnings)."""
    level = level.upper()
    handler = {"handlers": ["json"], "level": level, "propagate": False}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonFormatter}},
            "handlers": {"json": {"()": StderrHandler, "formatter": "json"}},
            "loggers": {"serve": handler, "uvicorn": handler, "uvicorn.error": {"level": level},
                        "uvicorn.access": handler},
            "root": {"handlers": ["json"], "level": "WARNING"}}


SESSION_IN_PATH = re.compile(r"(/sessions/)([^/]+)")


def session_tag(session_id: str) -> str:
    """A session's name in logs: a digest prefix, never the id itself (the id is the client's capability)."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def loggable(scope: dict) -> str:
    """The request path with session ids replaced by their `session_tag`, escaped (a decoded path may hold
    newlines) and shortened."""
    path = SESSION_IN_PATH.sub(lambda m: m.group(1) + session_tag(m.group(2)), str(scope.get("path", "")))
    return path.encode("unicode_escape").decode("ascii")[:200]


def request_id(scope: dict) -> str:
    """The request's X-Request-Id when well-formed, else a fresh one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return uuid.uuid4().hex


def route_template(scope: dict) -> str:
    """The matched route's path template (`/v1/sessions/{session_id}/infer`), 'other' when none matched."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "other"


# --- metrics -------------------------------------------------------------------------------------------

def safely(read: Callable[[], Any]) -> Callable[[], float]:
    """A gauge's reader that answers NaN rather than failing the whole /metrics page."""
    def value() -> float:
        try:
            return float(read())
        except Exception:  # noqa: BLE001 - a gauge must not break the scrape
            return math.nan
    return value


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of their own (`render` gives the exposition text)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("xsilo_requests_total", "HTTP requests answered, by route template, method and "
                                "status code", ["route", "method", "code"], registry=registry)
        self.request_seconds = Histogram("xsilo_request_seconds", "Time to answer a request, by route template",
                                         ["route"], buckets=SECONDS, registry=registry)
        self.he_seconds = Histogram("xsilo_he_seconds", "Time of one piece of HE work in a worker thread, by kind",
                                    ["kind"], buckets=SECONDS, registry=registry)
        self.queue_depth = Gauge("xsilo_queue_depth", "HE jobs running or waiting for a worker", registry=registry)
        self.sessions = Gauge("xsilo_sessions", "Inference sessions held", registry=registry)
        self.budget_rejections = Counter("xsilo_budget_rejections_total", "Requests refused by a budget, by budget",
                                         ["scope"], registry=registry)
        self.fit_sessions = Gauge("xsilo_fit_sessions", "Private-fit sessions open", registry=registry)
        self.fit_bytes_total = Counter("xsilo_fit_bytes_total", "Bytes of private-fit ciphertexts, by direction "
                                       "(in, out)", ["direction"], registry=registry)
        self.fit_rows_total = Counter("xsilo_fit_rows_total", "Public rows accumulated by private fits",
                                      registry=registry)
        self.draining = Gauge("xsilo_draining", "1 while the server drains (after SIGTERM)", registry=registry)
        self.label_runs = Gauge("xsilo_label_runs", "Label-only answers in progress on this replica",
                                registry=registry)

    def track(self, queue_depth: Callable[[], int], sessions: Callable[[], int], fit_sessions: Callable[[], int],
              draining: Callable[[], bool], label_runs: Callable[[], int]) -> None:
        """Read the gauges through these callables at every scrape (call once)."""
        for gauge, read in ((self.queue_depth, queue_depth), (self.sessions, sessions),
                            (self.fit_sessions, fit_sessions), (self.draining, draining),
                            (self.label_runs, label_runs)):
            gauge.set_function(safely(read))

    def observe_request(self, route: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(route, method if method in METHODS else "other", str(code)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_he(self, kind: str, seconds: float) -> None:
        """One piece of HE work (kind: infer, session_keys, fit_chunk, ...) took `seconds`."""
        self.he_seconds.labels(kind).observe(seconds)

    def budget_rejected(self, scope: str) -> None:
        """A request was refused by the budget `scope` (session, client, fit, ...)."""
        self.budget_rejections.labels(scope).inc()

    def fit_bytes(self, direction: str, n: int) -> None:
        """`n` bytes of private-fit ciphertexts came in (direction 'in') or went out ('out')."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
        self.fit_bytes_total.labels(direction).inc(n)

    def fit_rows(self, n: int) -> None:
        """`n` more public rows were accumulated by a private fit."""
        self.fit_rows_total.inc(n)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- middleware ----------------------------------------------------------------------------------------

class ObservabilityMiddleware:
    """Outermost ASGI middleware: request id (kept or made, echoed), one JSON log line and the metrics per request,
    and any unhandled error turned into a bare JSON 500 naming the request id."""

    def __init__(self, app: Any, metrics: ServerMetrics | None = None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        state = {"status": 0, "in": 0, "out": 0, "started": False}

        async def counting_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode("ascii"))]}
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        except Exception:
            log.exception("unhandled error %s on %s %s", rid, scope.get("method"), loggable(scope),
                          extra={"request_id": rid})
            if not state["started"]:
                response = error_response(500, "internal", f"internal server error (reference {rid}); the server "
                                                           "log has the details")
                await response(scope, receive, counting_send)
        finally:
            seconds = time.perf_counter() - start
            route, method = route_template(scope), str(scope.get("method", ""))
            if self.metrics is not None:
                self.metrics.observe_request(route, method, int(state["status"]), seconds)
            client = scope.get("client")
            log.info("%s %s %d", method, route, state["status"], extra={
                "request_id": rid, "method": method, "route": route, "path": loggable(scope),
                "status": state["status"], "bytes_in": state["in"], "bytes_out": state["out"],
                "ms": round(seconds * 1000, 2), "client": client[0] if client else None})


# --- routes --------------------------------------------------------------------------------------------

def track_service(metrics: ServerMetrics, service: Any) -> None:
    """Point the gauges at the service's counts, and the service's HE, budget and fit events at the metrics."""
    service.metrics = metrics
    if service.fit is not None:
        service.fit.metrics = metrics
    metrics.track(queue_depth=lambda: service.pending, sessions=service.session_count,
                  fit_sessions=lambda: len(service.fit) if service.fit is not None else 0,
                  draining=lambda: service.draining, label_runs=lambda: len(service.labels.runs))


async def readiness(service: Any) -> JSONResponse:
    """200 ready, or 503 `draining` (after SIGTERM) / `store_unavailable` (the state store's ping failed)."""
    if service.draining:
        return error_response(503, "draining", "the server is shutting down and takes no new work; use another "
                                               "replica", {"Retry-After": "5"})
    try:
        with anyio.fail_after(PING_TIMEOUT_S):
            await anyio.to_thread.run_sync(service.store.ping, abandon_on_cancel=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the store means not ready
        log.warning("readiness: the state store did not answer (%s)", type(exc).__name__)
        return error_response(503, "store_unavailable", "the server's state store does not answer; retry "
                              "shortly or use another replica", {"Retry-After": "5"})
    return JSONResponse({"status": "ready"})


def add_operation_routes(app: FastAPI, service: Any, metrics: ServerMetrics) -> None:
    """GET /metrics (Prometheus text) and GET /readyz, both open without an API key, like /healthz."""

    @app.get("/metrics", response_class=Response, tags=["operations"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}})
    async def metrics_page() -> Response:
        """The server's Prometheus metrics; needs no API key."""
        body, content_type = await anyio.to_thread.run_sync(metrics.render)  # gauges may ask the store
        return Response(body, media_type=content_type)

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "draining or store_unavailable"}})
    async def readyz() -> JSONResponse:
        """Readiness: 503 while draining or when the state store does not answer; needs no API key."""
        return await readiness(service)
