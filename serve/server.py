"""HTTP server for one exported linear layer evaluated under CKKS encryption (FastAPI + uvicorn).

The server holds W and b in plaintext and sees only ciphertexts and public keys: never a client's text,
hidden state or logits. Routes (JSON unless noted; errors are ``{"error": {"code", "message"}}``):

    GET    /healthz                      liveness, open without an API key
    GET    /v1/model                     labels, dims, client extraction spec, CKKS layout, export sha256
    POST   /v1/sessions                  raw public keys in (octet-stream) -> {"session_id": ...}
    POST   /v1/sessions/{id}/infer       raw query ciphertext in -> raw reply ciphertext out
    DELETE /v1/sessions/{id}             forget the session's keys
    GET    /docs, /openapi.json          FastAPI's docs

HE work runs in worker threads behind a capacity limiter, so the event loop keeps answering. Starting the
server imports no torch, lightning, transformers, `lightning_modules` or `datamodules`: the export is read by
`serve.export_format` (numpy + safetensors).
"""
from __future__ import annotations

import hmac
import logging
import logging.config
import math
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import anyio
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from encrypted import (DEFAULT_PROFILE, N8192_PRIVATE, EncryptedError, EncryptedLinear, InvalidCiphertext,
                       InvalidKeys, ParameterMismatch, PublicKeys, public_bytes_max, query_max_bytes)

from .budget import QueryBudget
from .export_format import ExportError, load_export
from .ood_client import check_ood_manifest
from .protocol import (API_KEY_HEADER, API_PREFIX, BUDGET_HEADER, OCTET_STREAM, REOPEN_HINT, SERVER_TIMING_HEADER,
                       SESSION_NOT_FOUND)
from .sessions import Session, SessionStore
from .transport import HeaderLimit, limited_protocol

log = logging.getLogger("serve")

CLIENT_SPEC_KEYS = ("model", "model_identity", "pooling", "layer", "max_length", "dtype", "hidden_size")
OOD_KEYS = ("detector", "threshold", "tpr", "all")  # what a client needs to flag OOD inputs from its logits


# --- errors -----------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered as JSON ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def input_error(exc: ValueError) -> ApiError:
    """Bad bytes from a client: 422 when well-formed but made for other parameters, else 400."""
    if isinstance(exc, ParameterMismatch):
        return ApiError(422, "parameter_mismatch", str(exc))
    if isinstance(exc, InvalidKeys):
        return ApiError(400, "invalid_keys", str(exc))
    if isinstance(exc, InvalidCiphertext):
        return ApiError(400, "invalid_ciphertext", str(exc))
    return ApiError(400, "invalid_input", str(exc) if isinstance(exc, EncryptedError) else
                    "the request body could not be used; send the bytes that the xsilo client produces")


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, SESSION_NOT_FOUND, f"session {session_id[:48]!r} does not exist on this server (it expired, "
                                            f"was evicted, or the server restarted); {REOPEN_HINT}")


# --- documentation models -----------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ClientSpec(BaseModel):
    """How the client must extract h_A so that the server's layer applies to it."""
    model: str | None
    model_identity: str | None
    pooling: str | None
    layer: int | None
    max_length: int | None
    dtype: str | None
    hidden_size: int | None


class Limits(BaseModel):
    max_key_bytes: int
    max_query_bytes: int
    max_sessions: int
    session_ttl_s: float
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    rows_per_session: int | None  # rows (query lanes) answered per session; null: no limit
    rows_per_client: int | None  # per API key, or per address when the server has no key


class ModelInfo(BaseModel):
    label_names: list[str]
    input_dim: int
    output_dim: int
    client: ClientSpec
    layout: dict[str, Any]
    rotation_steps: list[int]
    lanes: int
    export_sha256: str
    limits: Limits
    output_noise: float  # std of the Gaussian noise added to every output (0: exact answers)
    circuit_privacy: int | None  # statistical security (bits) of circuit-private replies; null: off
    ood: dict[str, Any] | None = None  # calibrated logit-detector thresholds, applied by the client


class SessionOpened(BaseModel):
    session_id: str
    session_ttl_s: float
    lanes: int


class Health(BaseModel):
    status: str
    sessions: int
    export_sha256: str
    replica_id: str | None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key"},
    404: {"model": ErrorBody, "description": "Unknown session: open a new one"},
    408: {"model": ErrorBody, "description": "Headers or body arrived too slowly"},
    413: {"model": ErrorBody, "description": "Body over this route's cap"},
    503: {"model": ErrorBody, "description": "Too many requests waiting for HE workers, or too many connections; retry"},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed bytes, or secret-key material"},
    422: {"model": ErrorBody, "description": "Well-formed bytes made for other CKKS parameters or layout"},
}


def raw_body(description: str) -> dict[str, Any]:
    """OpenAPI for a raw octet-stream request body (FastAPI cannot infer it: the route reads the stream)."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}}


# --- the service ----------------------------------------------------------------------------------------

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


def check_api_key(key: str) -> None:
    """Refuse a key that would disable or defeat authentication. Non-ASCII keys are fine: compared as UTF-8."""
    if not isinstance(key, str) or key == "":
        raise ValueError("the API key is empty, which would turn authentication off; pass a non-empty --api_key "
                         "(or XSILO_API_KEY), or leave it unset to serve without a key")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError("the API key has leading/trailing whitespace or control characters, which HTTP headers "
                         "cannot carry; choose a key of visible characters")


def load_layer(export_dir: str | Path, name: str = "fused", *, output_noise: float = 0.0,
               circuit_privacy: int | None = None) -> tuple[EncryptedLinear, dict[str, Any]]:
    """The export's layer (sha256 and shapes checked against its manifest) laid out for CKKS, and the manifest.

    `circuit_privacy=λ` serves circuit-private replies on the `N8192_PRIVATE` profile (see `EncryptedLinear`)."""
    export = load_export(export_dir, name)
    if export.manifest.get("ood") is not None:
        try:
            check_ood_manifest(export.manifest["ood"])
        except ValueError as exc:
            raise ExportError(f"{export_dir}/manifest.json: {exc}") from None
    labels = export.manifest.get("label_names")
    if labels is not None and len(labels) != export.output_dim:
        raise ExportError(f"{export_dir}/manifest.json: 'label_names' has {len(labels)} names for "
                          f"{export.output_dim} outputs; re-run `xsilo export`")
    try:
        profile = N8192_PRIVATE if circuit_privacy is not None else DEFAULT_PROFILE
        layer = EncryptedLinear(export.weight, export.bias, profile, output_noise=output_noise,
                                circuit_privacy=circuit_privacy)
    except EncryptedError as exc:
        raise ExportError(f"{export_dir} cannot be served under encryption: {exc}") from None
    return layer, export.manifest


class EncryptedService:
    """The layer, the published model info, the sessions and the bounded HE worker pool."""

    def __init__(self, layer: EncryptedLinear, manifest: dict[str, Any], settings: ServerSettings,
                 name: str = "fused"):
        self.layer, self.settings = layer, settings
        layout = layer.layout.to_dict()
        self.max_key_bytes = settings.max_key_bytes or public_bytes_max(layer.layout)
        self.max_query_bytes = settings.max_query_bytes or query_max_bytes(layer.layout)
        self.sessions = SessionStore(settings.max_sessions, settings.session_ttl_s,
                                     id_prefix=f"{settings.replica_id}." if settings.replica_id else "")
        self.budget = QueryBudget(settings.rows_per_session, settings.rows_per_client, settings.max_clients)
        self.export_sha256 = str(manifest["files"][f"{name}.safetensors"]["sha256"])
        source = manifest.get("source") or {}
        labels = manifest.get("label_names") or [str(i) for i in range(layer.output_dim)]
        self.info = {
            "label_names": [str(label) for label in labels],
            "input_dim": layer.input_dim,
            "output_dim": layer.output_dim,
            "client": {key: source.get(key) for key in CLIENT_SPEC_KEYS},
            "layout": layout,
            "rotation_steps": layer.rotation_steps,
            "lanes": layer.lanes,
            "export_sha256": self.export_sha256,
            "limits": {"max_key_bytes": self.max_key_bytes, "max_query_bytes": self.max_query_bytes,
                       "max_sessions": settings.max_sessions, "session_ttl_s": settings.session_ttl_s,
                       "header_timeout_s": settings.header_timeout_s, "body_timeout_s": settings.body_timeout_s,
                       "max_connections": settings.max_connections, "rows_per_session": settings.rows_per_session,
                       "rows_per_client": settings.rows_per_client},
            "output_noise": settings.output_noise,
            "circuit_privacy": settings.circuit_privacy,
            "ood": {key: manifest["ood"][key] for key in OOD_KEYS} if manifest.get("ood") else None,
        }
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self._pending = 0  # touched on the event loop only

    async def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU-bound work off the event loop, at most `max_concurrency` at a time."""
        if self._pending >= self.settings.max_pending:
            raise ApiError(503, "busy", f"{self._pending} HE requests are already queued; retry shortly",
                           {"Retry-After": "1"})
        self._pending += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self._pending -= 1

    def load_keys(self, body: bytes) -> PublicKeys:
        try:
            keys = PublicKeys.from_bytes(body, self.layer.layout)
            keys.require(self.layer.layout)
        except ValueError as exc:
            raise input_error(exc) from None
        return keys

    def apply(self, keys: PublicKeys, query: bytes) -> tuple[bytes, float]:
        start = time.perf_counter()
        try:
            reply = self.layer.apply(query, keys)
        except ValueError as exc:
            raise input_error(exc) from None
        except RuntimeError:
            # SEAL refuses some well-formed but degenerate ciphertexts (e.g. transparent ones) mid-evaluation.
            raise ApiError(400, "invalid_ciphertext", "the ciphertext could not be evaluated (SEAL refused it); "
                                                      "send the bytes that encrypted.encrypt returns") from None
        return reply, (time.perf_counter() - start) * 1000

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise session_not_found(session_id)
        return session

    def reserve_rows(self, session: Session, client: str) -> str:
        """Charge one query's `lanes` rows to the session and the client; the remaining budget, for the header.

        Raises a 429 when a budget would be exceeded."""
        rows = self.layer.lanes
        refusal, left = self.budget.reserve(session.rows, client, rows)
        if refusal is not None:
            raise ApiError(429, "budget_exhausted", refusal.message, {BUDGET_HEADER: "0"})
        session.rows += rows
        return "unlimited" if left is None else str(left)

    def refund_rows(self, session: Session, client: str) -> None:
        session.rows -= self.layer.lanes
        self.budget.refund(client, self.layer.lanes)


async def read_body(request: Request, limit: int, what: str, timeout_s: float) -> bytes:
    """The raw body, refused with 413 past `limit` (by Content-Length first, then while streaming) and with 408
    when it has not all arrived within `timeout_s`. Both close the connection: its unread rest is dropped."""
    too_large = ApiError(413, "body_too_large", f"{what} may be at most {limit} bytes on this route; send the "
                                                f"bytes the xsilo client produces for this server's layout",
                         {"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {declared[:32]!r} is not a byte count")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", f"the client closed the connection while sending {what}") from None
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"{what} did not arrive within {timeout_s:g} s of the headers "
                                            f"({len(body)} bytes came); send the body at once",
                       {"Connection": "close"}) from None
    if not body:
        raise ApiError(400, "empty_body", f"the request has no body; send {what} as raw {OCTET_STREAM} bytes")
    return bytes(body)


# --- middleware: request log and catch-all -------------------------------------------------------------

def loggable(scope: dict) -> str:
    """The request path, escaped (a decoded path may hold newlines) and shortened."""
    return str(scope.get("path", "")).encode("unicode_escape").decode("ascii")[:200]


class RequestLogMiddleware:
    """Logs method, path, status, bytes in/out and ms (never payloads); turns unhandled errors into a bare 500."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = {"status": 0, "in": 0, "out": 0, "started": False}

        async def counting_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        except Exception:
            reference = uuid.uuid4().hex[:12]
            log.exception("unhandled error %s on %s %s", reference, scope.get("method"), loggable(scope))
            if not state["started"]:
                response = error_response(500, "internal", f"internal server error (reference {reference}); "
                                                           "the server log has the details")
                await response(scope, receive, counting_send)
        finally:
            log.info("%s %s %d in=%dB out=%dB %.1fms", scope.get("method"), loggable(scope), state["status"],
                     state["in"], state["out"], (time.perf_counter() - start) * 1000)


# --- the app --------------------------------------------------------------------------------------------

def presented_key(request: Request) -> bytes | None:
    """The API key the request carries, as the raw header bytes (HTTP headers are bytes; Starlette decodes them
    as latin-1, so re-encoding as latin-1 gives the bytes back: a UTF-8 key arrives as its UTF-8 bytes)."""
    given = request.headers.get(API_KEY_HEADER)
    if given is None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    return None if given is None else given.encode("latin-1")


def api_key_dependency(expected: str) -> Callable[..., Any]:
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the API key")
    expected_bytes = expected.encode("utf-8")

    async def require_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                              api_key: str | None = Security(header)) -> None:
        given = presented_key(request)
        if given is None or not hmac.compare_digest(given, expected_bytes):
            raise ApiError(401, "unauthorized", f"missing or wrong API key; send 'Authorization: Bearer <key>' "
                                                f"or '{API_KEY_HEADER}: <key>'", {"WWW-Authenticate": "Bearer"})

    return require_api_key


def create_app(export_dir: str | Path, *, name: str = "fused", **options: Any) -> FastAPI:
    """A FastAPI app serving `<export_dir>/<name>.safetensors` under encryption; `options` are `ServerSettings`
    fields. Raises ExportError if the export is unusable, ValueError for a bad setting."""
    settings = ServerSettings(**options)
    layer, manifest = load_layer(export_dir, name, output_noise=settings.output_noise,
                                 circuit_privacy=settings.circuit_privacy)
    service = EncryptedService(layer, manifest, settings, name)

    app = FastAPI(title="xsilo encrypted inference",
                  description="Evaluates W h + b on CKKS-encrypted hidden states. The server never sees a "
                              "client's text, hidden state or logits; the client never sees W or b.",
                  version="1", redirect_slashes=False)  # no redirects built from a client's Host header
    app.state.service = service
    auth = [Depends(api_key_dependency(settings.api_key))] if settings.api_key is not None else []

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
        else:
            message = str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", f"invalid request ({problems[:500]}); see /docs")

    app.add_middleware(HeaderLimit, max_header_bytes=settings.max_header_bytes)
    app.add_middleware(RequestLogMiddleware)  # outermost: logs every request, the refused ones too

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> dict[str, Any]:
        """Liveness and the export served; needs no API key."""
        return {"status": "ok", "sessions": len(service.sessions), "export_sha256": service.export_sha256,
                "replica_id": settings.replica_id}

    @app.get(f"{API_PREFIX}/model", response_model=ModelInfo, dependencies=auth, responses=ERROR_RESPONSES,
             tags=["model"])
    async def model_info() -> dict[str, Any]:
        """What a client needs: labels, dims, how to extract h_A, the CKKS layout and rotation steps."""
        return service.info

    @app.post(f"{API_PREFIX}/sessions", status_code=201, response_model=SessionOpened, dependencies=auth,
              responses={**BODY_ERRORS, **ERROR_RESPONSES}, tags=["sessions"],
              openapi_extra=raw_body("ClientKeys.public_bytes(): CKKS parameters, rotation steps and Galois keys. "
                                     "Bytes that carry a secret key are refused."))
    async def open_session(request: Request) -> dict[str, Any]:
        """Upload public keys once; later queries name the session instead of re-sending them."""
        body = await read_body(request, service.max_key_bytes, "public keys", settings.body_timeout_s)
        keys = await service.run_cpu(service.load_keys, body)
        session = service.sessions.add(keys, len(body))
        return {"session_id": session.session_id, "session_ttl_s": settings.session_ttl_s, "lanes": layer.lanes}

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/infer", response_class=Response, dependencies=auth,
              tags=["sessions"],
              responses={200: {"content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
                               "description": "Reply ciphertext: Enc(W h + b) for every input the query packs"},
                         **BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("One query from encrypted.encrypt(keys, layout, X): up to `lanes` "
                                     "hidden states in one ciphertext."))
    async def infer(session_id: str, request: Request) -> Response:
        """Evaluate the layer on one encrypted query; the reply is encrypted under the client's key."""
        session = service.session(session_id)
        body = await read_body(request, service.max_query_bytes, "a query", settings.body_timeout_s)
        client = QueryBudget.client_id(presented_key(request) if settings.api_key is not None else None,
                                       request.client.host if request.client else None)
        remaining = service.reserve_rows(session, client)
        try:
            reply, ms = await service.run_cpu(service.apply, session.keys, body)
        except ApiError:
            service.refund_rows(session, client)  # no answer: nothing was revealed
            raise
        return Response(reply, media_type=OCTET_STREAM,
                        headers={SERVER_TIMING_HEADER: f"he;dur={ms:.2f}", BUDGET_HEADER: remaining})

    @app.delete(f"{API_PREFIX}/sessions/{{session_id}}", status_code=204, response_class=Response,
                dependencies=auth, responses=ERROR_RESPONSES, tags=["sessions"])
    async def close_session(session_id: str) -> Response:
        """Forget the session's keys."""
        if not service.sessions.remove(session_id):
            raise session_not_found(session_id)
        return Response(status_code=204)

    return app


# --- running --------------------------------------------------------------------------------------------

def uvicorn_config(app: FastAPI, **options: Any) -> Any:
    """A uvicorn.Config for `app` with its ServerSettings' connection limits (header deadline, connection cap,
    header size, keep-alive) on the h11 protocol; `options` are other uvicorn.Config arguments."""
    import uvicorn

    settings: ServerSettings = app.state.service.settings
    protocol = limited_protocol(settings.header_timeout_s, settings.max_connections, settings.max_header_bytes)
    return uvicorn.Config(app, http=protocol, h11_max_incomplete_event_size=settings.max_header_bytes,
                          timeout_keep_alive=settings.keep_alive_s, server_header=False, access_log=False, **options)


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as SystemExit, so that `finally` blocks and atexit handlers (the HE scratch folder) run.

    uvicorn catches SIGTERM, shuts down gracefully, then re-raises it with the handler it found: with the
    default one the process would die at once, skipping atexit."""
    raise SystemExit(128 + signum)


def run(export_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        **app_options: Any) -> None:
    """Serve an export with uvicorn until interrupted or sent SIGTERM (options as in `create_app`)."""
    import copy

    import uvicorn

    app = create_app(export_dir, **app_options)
    info = app.state.service.info
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    logging.config.dictConfig(log_config)
    log.info("serving %s: %d -> %d (%s), sha256 %s, CKKS N=%d, %d lanes per ciphertext; docs at http://%s:%d/docs",
             export_dir, info["input_dim"], info["output_dim"], ", ".join(info["label_names"]),
             info["export_sha256"][:16], info["layout"]["profile"]["poly_modulus_degree"], info["lanes"], host, port)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    config = uvicorn_config(app, host=host, port=port, log_level=log_level, log_config=log_config,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


class ServerThread:
    """uvicorn in a daemon thread on a loopback port (0: any free one), for tests, benchmarks and demos.

    Stops when `stop()` is called, when its `with` block ends, or by itself after `max_lifetime_s`.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, max_lifetime_s: float = 600.0,
                 log_level: str = "warning"):
        import uvicorn

        # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets, and without it
        # Nagle's algorithm and delayed ACKs add ~40 ms to every response.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn_config(app, log_level=log_level, log_config=None, lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.watchdog = threading.Timer(max_lifetime_s, self.stop_soon)
        self.watchdog.daemon = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread.start()
        self.watchdog.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self.url} within {timeout_s:.0f}s")
            time.sleep(0.01)
        return self

    def stop_soon(self) -> None:
        self.server.should_exit = True

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_soon()
        self.watchdog.cancel()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
