"""HTTP server for linear layers evaluated under CKKS encryption, and the private fit (FastAPI + uvicorn).

The server holds its layers (a fused export, named heads) and its public-set states in plaintext and sees
only ciphertexts and public keys: never a client's text, hidden state or logits. Routes (JSON unless
noted; errors are ``{"error": {"code", "message"}}``):

    GET    /healthz                           liveness, open without an API key
    GET    /v1/model                          fused export (or nulls), heads, public set, limits
    POST   /v1/sessions[?head=NAME]           raw public keys in (octet-stream) -> {"session_id": ...}
    POST   /v1/sessions/{id}/infer            raw query ciphertext in -> raw reply ciphertext out
    DELETE /v1/sessions/{id}                  forget the session's keys
    GET    /v1/heads/{name}/feature-ood       a head's published OOD detector (npz)
    GET    /v1/public-set/texts, /v1/fit/...  the public set and the private fit (`serve.fit_service`)
    GET    /v1/public-set/val-logits?head=    a head's logits on the public val rows (opt-in, paged)
    GET    /docs, /openapi.json               FastAPI's docs

HE work runs in worker threads behind a capacity limiter, so the event loop keeps answering. Starting the
server imports no torch, lightning, transformers, `lightning_modules` or `datamodules`: folders are read by
`serve.export_format` and `serve.public_format` (numpy + safetensors).
"""
from __future__ import annotations

import logging
import logging.config
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from encrypted import PublicKeys

from .api import (BODY_ERRORS, ERROR_RESPONSES, OCTET_REPLY, ApiError, api_key_dependency, client_id,
                  error_response, input_error, raw_body, read_body)
from .budget import QueryBudget
from .export_format import ExportError
from .fit_service import FitService, add_fit_routes
from .layers import ServedLayer, load_fused, load_head
from .protocol import API_PREFIX, BUDGET_HEADER, OCTET_STREAM, REOPEN_HINT, SERVER_TIMING_HEADER, SESSION_NOT_FOUND
from .public_format import SPEC_KEYS, PublicStates, load_public_states
from .sessions import Session, SessionStore
from .settings import ServerSettings, check_api_key  # noqa: F401  (public here: `from serve.server import ...`)
from .transport import HeaderLimit, limited_protocol

log = logging.getLogger("serve")


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, SESSION_NOT_FOUND, f"session {session_id[:48]!r} does not exist on this server (it expired, "
                                            f"was evicted, or the server restarted); {REOPEN_HINT}")


# --- documentation models -----------------------------------------------------------------------------

class ClientSpec(BaseModel):
    """How a state must be extracted so that a layer applies to it (a fused export's client; a head's target)."""
    model: str | None
    model_identity: str | None
    pooling: str | None
    layer: int | None
    max_length: int | None
    dtype: str | None
    hidden_size: int | None


class Limits(BaseModel):
    max_key_bytes: int | None  # the fused export's session body caps; null without one
    max_query_bytes: int | None
    max_sessions: int
    session_ttl_s: float
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    rows_per_session: int | None  # rows (query lanes) answered per session and layer; null: no limit
    rows_per_client: int | None  # per API key (or address when the server has no key) and layer
    max_fit_sessions: int
    fit_session_ttl_s: float
    max_fit_source_dim: int
    fits_per_client: int | None
    max_public_texts: int


class FeatureOodInfo(BaseModel):
    detector: str
    threshold: float
    tpr: float
    sha256: str  # of the npz GET /v1/heads/{name}/feature-ood answers


class HeadInfo(BaseModel):
    label_names: list[str]
    input_dim: int
    output_dim: int
    layout: dict[str, Any]
    rotation_steps: list[int]
    lanes: int
    sha256: str
    target: ClientSpec  # the provider's extraction spec: the states this head reads
    metrics: dict[str, Any]
    feature_ood: FeatureOodInfo | None  # published only when the provider opted in


class PublicSetInfo(BaseModel):
    name: str
    rows: int
    fingerprint: str
    val_fraction: float
    seed: int
    parts: dict[str, int]
    model: ClientSpec
    hidden_size: int
    val_logits: bool = False  # GET /v1/public-set/val-logits answers (xsilo serve --publish_val_logits true)


class ModelInfo(BaseModel):
    label_names: list[str] | None  # the fused export's fields: null when the server serves none
    input_dim: int | None
    output_dim: int | None
    client: ClientSpec | None
    layout: dict[str, Any] | None
    rotation_steps: list[int] | None
    lanes: int | None
    export_sha256: str | None
    ood: dict[str, Any] | None = None  # calibrated logit-detector thresholds, applied by the client
    limits: Limits
    output_noise: float  # std of the Gaussian noise added to every output (0: exact answers)
    circuit_privacy: int | None  # statistical security (bits) of circuit-private replies; null: off
    heads: dict[str, HeadInfo]
    public_set: PublicSetInfo | None


class SessionOpened(BaseModel):
    session_id: str
    session_ttl_s: float
    lanes: int
    head: str | None  # the layer the session is bound to; null: the fused export


class Health(BaseModel):
    status: str
    sessions: int
    export_sha256: str | None
    heads: list[str]
    public_set: str | None  # its fingerprint
    replica_id: str | None


# --- the service ----------------------------------------------------------------------------------------

class EncryptedService:
    """The served layers, the published model info, the sessions, the budgets and the bounded HE worker pool."""

    def __init__(self, settings: ServerSettings, fused: ServedLayer | None = None,
                 heads: Sequence[ServedLayer] = (), public: PublicStates | None = None):
        if fused is None and not heads and public is None:
            raise ValueError("nothing to serve: pass an export (--export DIR), heads (--heads DIR ...) and/or a "
                             "public set (--public DIR)")
        self.settings, self.fused, self.public = settings, fused, public
        self.heads: dict[str, ServedLayer] = {}
        for head in heads:
            if head.name in self.heads:
                raise ExportError(f"two head folders are named {head.name!r}; heads are named by their folder, so "
                                  "rename one")
            self.heads[head.name] = head
        if public is not None:
            for head in self.heads.values():
                check_head_reads_public(head, public)
        self.sessions = SessionStore(settings.max_sessions, settings.session_ttl_s,
                                     id_prefix=f"{settings.replica_id}." if settings.replica_id else "")
        self.budget = QueryBudget(settings.rows_per_session, settings.rows_per_client, settings.max_clients)
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self._pending = 0  # touched on the event loop only
        self.fit = FitService(public, settings, self.run_cpu) if public is not None else None
        self._val_logits: dict[str, np.ndarray] = {}  # at most one (n_val, k) array per served head
        self._val_logits_lock = threading.Lock()
        self.info = self.model_info()

    def model_info(self) -> dict[str, Any]:
        """GET /v1/model: today's fused fields (null without an export), the heads, the public set, the limits."""
        settings, fused = self.settings, self.fused
        source = (fused.manifest.get("source") or {}) if fused else {}
        return {
            "label_names": fused.label_names if fused else None,
            "input_dim": fused.layer.input_dim if fused else None,
            "output_dim": fused.layer.output_dim if fused else None,
            "client": {key: source.get(key) for key in SPEC_KEYS} if fused else None,
            "layout": fused.layer.layout.to_dict() if fused else None,
            "rotation_steps": fused.layer.rotation_steps if fused else None,
            "lanes": fused.layer.lanes if fused else None,
            "export_sha256": fused.sha256 if fused else None,
            "ood": fused.logit_ood() if fused else None,
            "limits": {"max_key_bytes": fused.max_key_bytes if fused else None,
                       "max_query_bytes": fused.max_query_bytes if fused else None,
                       "max_sessions": settings.max_sessions, "session_ttl_s": settings.session_ttl_s,
                       "header_timeout_s": settings.header_timeout_s, "body_timeout_s": settings.body_timeout_s,
                       "max_connections": settings.max_connections, "rows_per_session": settings.rows_per_session,
                       "rows_per_client": settings.rows_per_client, "max_fit_sessions": settings.max_fit_sessions,
                       "fit_session_ttl_s": settings.fit_session_ttl_s,
                       "max_fit_source_dim": settings.max_fit_source_dim, "fits_per_client": settings.fits_per_client,
                       "max_public_texts": settings.max_public_texts},
            "output_noise": settings.output_noise,
            "circuit_privacy": settings.circuit_privacy,
            "heads": {name: head.head_info() for name, head in self.heads.items()},
            "public_set": ({**self.public.info(), "val_logits": settings.publish_val_logits}
                           if self.public is not None else None),
        }

    def val_logits(self, head: str) -> np.ndarray:
        """Head `head`'s logits (n_val, k) on the public set's val states, computed once (the head-aware λ of a
        client's private fit scores its maps through the head against them). 404/409 when they are not published."""
        if self.public is None:
            raise ApiError(404, "no_public_set", "this server publishes no public set, so no validation logits; ask "
                                                 "its operator to serve one (xsilo serve --public DIR)")
        if not self.settings.publish_val_logits:
            raise ApiError(404, "val_logits_not_published", "this server does not publish its heads' logits on the "
                                                            "public validation rows; ask its operator to serve with "
                                                            "--publish_val_logits true, or align without --head")
        served = self.layer(head)
        ours = (served.manifest.get("target") or {}).get("model_identity")
        theirs = self.public.manifest["model"].get("model_identity")
        if not ours or ours != theirs:
            raise ApiError(409, "head_model_mismatch", f"head {head!r} does not record that it reads the public set's "
                                                       "model (model_identity missing or different), so its logits on "
                                                       "the public states would mean nothing; refit the head with "
                                                       "`xsilo head fit` on the public set's model")
        with self._val_logits_lock:
            logits = self._val_logits.get(head)
            if logits is None:
                layer = served.layer
                logits = self.public.parts[1].astype(np.float64) @ layer.weight.T + layer.bias
                logits.setflags(write=False)
                self._val_logits[head] = logits
        return logits

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

    def layer(self, head: str | None) -> ServedLayer:
        """The fused export (head None) or the head called `head`; 404 naming what is served otherwise."""
        if head is None:
            if self.fused is None:
                raise ApiError(404, "no_fused_export", f"this server serves no fused export; name one of its heads "
                                                       f"with ?head=NAME ({self.head_list()})")
            return self.fused
        served = self.heads.get(head)
        if served is None:
            raise ApiError(404, "head_not_found", f"no head named {head[:64]!r} on this server; {self.head_list()}")
        return served

    def head_list(self) -> str:
        return f"it serves heads {sorted(self.heads)}" if self.heads else "it serves no heads"

    @staticmethod
    def load_keys(served: ServedLayer, body: bytes) -> PublicKeys:
        try:
            keys = PublicKeys.from_bytes(body, served.layer.layout)
            keys.require(served.layer.layout)
        except ValueError as exc:
            raise input_error(exc) from None
        return keys

    @staticmethod
    def apply(served: ServedLayer, keys: PublicKeys, query: bytes) -> tuple[bytes, float]:
        start = time.perf_counter()
        try:
            reply = served.layer.apply(query, keys)
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

    def reserve_rows(self, session: Session, served: ServedLayer, client: str) -> str:
        """Charge one query's `lanes` rows to the session and to the client on this layer (each layer's W is a
        separate secret); the remaining budget, for the header. Raises a 429 when a budget would be exceeded."""
        rows = served.layer.lanes
        refusal, left = self.budget.reserve(session.rows, budget_key(client, served), rows)
        if refusal is not None:
            raise ApiError(429, "budget_exhausted", refusal.message, {BUDGET_HEADER: "0"})
        session.rows += rows
        return "unlimited" if left is None else str(left)

    def refund_rows(self, session: Session, served: ServedLayer, client: str) -> None:
        session.rows -= served.layer.lanes
        self.budget.refund(budget_key(client, served), served.layer.lanes)


def budget_key(client: str, served: ServedLayer) -> str:
    return client if served.kind == "fused" else f"{client}|head:{served.name}"


def check_head_reads_public(head: ServedLayer, public: PublicStates) -> None:
    """A head served beside a public set must read the states the public set holds (the client's map targets them)."""
    target, model = head.manifest.get("target") or {}, public.manifest["model"]
    if head.layer.input_dim != public.hidden_size:
        raise ExportError(f"head {head.name!r} reads {head.layer.input_dim}-d states but the public set holds "
                          f"{public.hidden_size}-d ones; serve heads and a public set of the same provider model")
    ours, theirs = target.get("model_identity"), model.get("model_identity")
    if ours and theirs and ours != theirs:
        raise ExportError(f"head {head.name!r} was fitted on model identity {str(ours)[:16]} but the public set's "
                          f"states come from {str(theirs)[:16]}; serve heads and a public set of the same model")


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


# --- the app --------------------------------------------------------------------------------------------

def create_app(export_dir: str | Path | None = None, *, heads: Sequence[str | Path] = (),
               public: str | Path | None = None, name: str = "fused", **options: Any) -> FastAPI:
    """A FastAPI app serving, under encryption, `<export_dir>/<name>.safetensors` (a fused export), the heads
    in `heads` (head export folders, named by folder name) and the public set `public` for private fits; at least
    one of them. `options` are `ServerSettings` fields. Raises ExportError if a folder is unusable, ValueError for
    a bad setting or an empty configuration."""
    settings = ServerSettings(**options)
    heads = [heads] if isinstance(heads, (str, Path)) else list(heads)  # one folder, or a list of them
    if export_dir is None and not heads and public is None:
        raise ValueError("nothing to serve: pass an export (--export DIR), heads (--heads DIR ...) and/or a public "
                         "set (--public DIR)")
    layer_options = {"output_noise": settings.output_noise, "circuit_privacy": settings.circuit_privacy,
                     "max_key_bytes": settings.max_key_bytes, "max_query_bytes": settings.max_query_bytes}
    fused = load_fused(export_dir, name, **layer_options) if export_dir is not None else None
    served_heads = [load_head(path, **layer_options) for path in heads]
    public_states = load_public_states(public) if public is not None else None
    service = EncryptedService(settings, fused, served_heads, public_states)

    app = FastAPI(title="xsilo encrypted inference",
                  description="Evaluates linear layers on CKKS-encrypted hidden states and computes encrypted "
                              "cross products for private fits. The server never sees a client's text, hidden "
                              "state or logits; the client never sees the layers or the server's states.",
                  version="1", redirect_slashes=False)  # no redirects built from a client's Host header
    app.state.service = service
    auth = [Depends(api_key_dependency(settings.api_key))] if settings.api_key is not None else []
    authenticated = settings.api_key is not None

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {loggable(request.scope)[:120]}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {loggable(request.scope)[:120]}; see /docs for the API"
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
        """Liveness and what is served; needs no API key."""
        return {"status": "ok", "sessions": len(service.sessions),
                "export_sha256": service.fused.sha256 if service.fused else None, "heads": sorted(service.heads),
                "public_set": service.public.fingerprint if service.public else None,
                "replica_id": settings.replica_id}

    @app.get(f"{API_PREFIX}/model", response_model=ModelInfo, dependencies=auth, responses=ERROR_RESPONSES,
             tags=["model"])
    async def model_info() -> dict[str, Any]:
        """What a client needs: the fused export's labels, dims, extraction spec and CKKS layout (null without
        one), every head's, the public set's, and the limits."""
        return service.info

    @app.post(f"{API_PREFIX}/sessions", status_code=201, response_model=SessionOpened, dependencies=auth,
              responses={**BODY_ERRORS, **ERROR_RESPONSES}, tags=["sessions"],
              openapi_extra=raw_body("ClientKeys.public_bytes() for the layer's layout: CKKS parameters, rotation "
                                     "steps and Galois keys. Bytes that carry a secret key are refused."))
    async def open_session(request: Request, head: str | None = Query(None, max_length=200, description=(
            "the head the session evaluates (GET /v1/model 'heads'); omitted: the fused export"))) -> dict[str, Any]:
        """Upload public keys once for one layer; later queries name the session instead of re-sending them."""
        served = service.layer(head)
        body = await read_body(request, served.max_key_bytes, "public keys", settings.body_timeout_s)
        keys = await service.run_cpu(service.load_keys, served, body)
        session = service.sessions.add(keys, len(body), layer=head)
        return {"session_id": session.session_id, "session_ttl_s": settings.session_ttl_s,
                "lanes": served.layer.lanes, "head": head}

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/infer", response_class=Response, dependencies=auth,
              tags=["sessions"],
              responses={200: {**OCTET_REPLY, "description": "Reply ciphertext: Enc(W h + b) for every input the "
                                                             "query packs"}, **BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("One query from encrypted.encrypt(keys, layout, X) for the session's layer: up "
                                     "to `lanes` hidden states in one ciphertext."))
    async def infer(session_id: str, request: Request) -> Response:
        """Evaluate the session's layer on one encrypted query; the reply is encrypted under the client's key."""
        session = service.session(session_id)
        served = service.layer(session.layer)
        body = await read_body(request, served.max_query_bytes, "a query", settings.body_timeout_s)
        client = client_id(request, authenticated)
        remaining = service.reserve_rows(session, served, client)
        try:
            reply, ms = await service.run_cpu(service.apply, served, session.keys, body)
        except ApiError:
            service.refund_rows(session, served, client)  # no answer: nothing was revealed
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

    @app.get(f"{API_PREFIX}/heads/{{head}}/feature-ood", response_class=Response, dependencies=auth,
             tags=["model"], responses={200: {**OCTET_REPLY, "description": "npz: means (k, d), precision (d, d)"},
                                        **ERROR_RESPONSES})
    async def feature_ood(head: str) -> Response:
        """The head's feature-space OOD detector, when its provider published one (sha256 in GET /v1/model)."""
        served = service.layer(head)
        if served.feature_ood is None:
            raise ApiError(404, "feature_ood_not_published", f"head {head!r} publishes no feature-space OOD "
                                                             "detector; flag OOD inputs another way")
        return Response(served.feature_ood.data, media_type=OCTET_STREAM)

    @app.get(f"{API_PREFIX}/public-set/val-logits", dependencies=auth, responses=ERROR_RESPONSES,
             tags=["private fit"])
    async def val_logits(head: str = Query(..., max_length=200, description="a served head (GET /v1/model 'heads')"),
                         offset: int = Query(0, ge=0, le=1 << 40),
                         limit: int | None = Query(None, ge=1, le=1 << 40)) -> dict[str, Any]:
        """A page of head `head`'s plaintext logits on the public set's val rows, in val-index order (at most
        `max_public_texts` rows per page); only when the provider opted in (--publish_val_logits true)."""
        logits = service.val_logits(head)
        rows = logits.shape[0]
        if offset > rows:
            raise ApiError(400, "invalid_offset", f"offset {offset} is past the public set's {rows} val rows")
        end = min(offset + min(limit or settings.max_public_texts, settings.max_public_texts), rows)
        return {"head": head, "rows": rows, "offset": offset, "next": end if end < rows else None,
                "logits": logits[offset:end].tolist()}

    add_fit_routes(app, service.fit, auth, settings)
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


def run(export_dir: str | Path | None = None, *, heads: Sequence[str | Path] = (), public: str | Path | None = None,
        host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_options: Any) -> None:
    """Serve with uvicorn until interrupted or sent SIGTERM (folders and options as in `create_app`)."""
    import copy

    import uvicorn

    app = create_app(export_dir, heads=heads, public=public, **app_options)
    info = app.state.service.info
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    logging.config.dictConfig(log_config)
    if info["export_sha256"] is not None:
        log.info("serving export %s: %d -> %d (%s), sha256 %s, CKKS N=%d, %d lanes per ciphertext", export_dir,
                 info["input_dim"], info["output_dim"], ", ".join(info["label_names"]), info["export_sha256"][:16],
                 info["layout"]["profile"]["poly_modulus_degree"], info["lanes"])
    for head_name, head in info["heads"].items():
        log.info("serving head %s: %d -> %d (%s), sha256 %s, %d lanes per ciphertext%s", head_name,
                 head["input_dim"], head["output_dim"], ", ".join(head["label_names"]), head["sha256"][:16],
                 head["lanes"], ", feature-space OOD detector published" if head["feature_ood"] else "")
    if info["public_set"] is not None:
        public_set = info["public_set"]
        log.info("serving public set %s for private fits: %d rows (%s), %d-d states, fingerprint %s",
                 public_set["name"], public_set["rows"], public_set["parts"], public_set["hidden_size"],
                 public_set["fingerprint"][:16])
    log.info("docs at http://%s:%d/docs", host, port)
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
