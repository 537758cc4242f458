"""HTTP server for linear layers evaluated under CKKS encryption, and the private fit (FastAPI + uvicorn).

The server holds its layers (a fused export, named heads) and its public-set states in plaintext and sees
only ciphertexts and public keys: never a client's text, hidden state or logits. Routes (JSON unless
noted; errors are ``{"error": {"code", "message"}}``):

    GET    /healthz                           liveness, open without an API key
    GET    /readyz, /metrics                  readiness and Prometheus metrics (`serve.observability`), open
    GET    /v1/model                          fused export (or nulls), heads, public set, limits
    POST   /v1/sessions[?head=NAME]           raw public keys in (octet-stream) -> {"session_id": ...}
    POST   /v1/sessions/{id}/infer            raw query ciphertext in -> raw reply ciphertext out
    POST   /v1/sessions/{id}/label            label-only layers: argmax keys + query in -> masked reply, a run
    POST   /v1/label-runs/{run}               one message of the run's secure argmax (`serve.label_routes`)
    DELETE /v1/sessions/{id}                  forget the session's keys
    GET    /v1/heads/{name}/feature-ood       a head's published OOD detector (npz)
    GET    /v1/public-set/texts, /v1/fit/...  the public set and the private fit (`serve.fit_service`)
    GET    /v1/public-set/val-logits?head=    a head's logits on the public val rows (opt-in, paged, charged)
    GET    /docs, /openapi.json               FastAPI's docs

HE work runs in worker threads behind a capacity limiter, so the event loop keeps answering. Starting the
server imports no torch, lightning, transformers, `lightning_modules` or `datamodules`: folders are read by
`serve.formats` (numpy + safetensors).

This module holds the routes (`create_app`); the request log and metrics are `serve.observability`'s, running
under uvicorn (`run`) is `serve.running`'s; what they answer with is
`serve.service.EncryptedService`'s (layers, sessions, budgets, the worker pool), the JSON bodies `serve.schemas`',
and `serve.harness.ServerThread` runs the app in a thread of this process (tests, benchmarks, demos).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import BODY_ERRORS, ERROR_RESPONSES, OCTET_REPLY, ApiError, error_response, raw_body, read_body
from .fit_routes import add_fit_routes
from .label_routes import add_label_routes
from .formats.public_states import load_public_states
from .identity import Identity, identity_dependency
from .pins import check_pins
from .layers import load_fused, load_head
from .observability import ObservabilityMiddleware, ServerMetrics, add_operation_routes, loggable, track_service
from .protocol import API_PREFIX, BUDGET_HEADER, OCTET_STREAM, SERVER_TIMING_HEADER
from .schemas import Health, ModelInfo, SessionOpened
from .service import EncryptedService
from .settings import ServerSettings
from .store import StoreError
from .transport import HeaderLimit

log = logging.getLogger("serve")


# --- the app --------------------------------------------------------------------------------------------

def create_app(export_dir: str | Path | None = None, *, heads: Sequence[str | Path] = (),
               public: str | Path | None = None, name: str = "fused", **options: Any) -> FastAPI:
    """A FastAPI app serving, under encryption, `<export_dir>/<name>.safetensors` (a fused export), the heads
    in `heads` (head export folders, named by folder name) and the public set `public` for private fits; at least
    one of them. `options` are `ServerSettings` fields. Raises ExportError if a folder is unusable or not pinned, ValueError for a bad
    setting or an empty configuration, StoreError for a store that cannot be opened."""
    settings = ServerSettings(**options)
    heads = [heads] if isinstance(heads, (str, Path)) else list(heads)  # one folder, or a list of them
    if export_dir is None and not heads and public is None:
        raise ValueError("nothing to serve: pass an export (--export DIR), heads (--heads DIR or '[DIR,...]') "
                         "and/or a public set (--public DIR)")
    layer_options = {"output_noise": settings.output_noise, "circuit_privacy": settings.circuit_privacy,
                     "max_key_bytes": settings.max_key_bytes, "max_query_bytes": settings.max_query_bytes,
                     "answers": settings.answers}
    fused = load_fused(export_dir, name, **layer_options) if export_dir is not None else None
    served_heads = [load_head(path, **layer_options) for path in heads]
    if isinstance(settings.answers, dict):
        unknown = set(settings.answers) - {layer.name for layer in served_heads} - ({"fused"} if fused else set())
        if unknown:
            raise ValueError(f"--answers names layers this server does not serve: {sorted(unknown)}; name 'fused' "
                             f"or one of the heads {sorted(layer.name for layer in served_heads)}")
    public_states = load_public_states(public) if public is not None else None
    check_pins([p for p in (export_dir, *heads, public) if p is not None], settings.expect_sha256)
    service = EncryptedService(settings, fused, served_heads, public_states)

    app = FastAPI(title="xsilo encrypted inference",
                  description="Evaluates linear layers on CKKS-encrypted hidden states and computes encrypted "
                              "cross products for private fits. The server never sees a client's text, hidden "
                              "state or logits; the client never sees the layers or the server's states.",
                  version="1", redirect_slashes=False)  # no redirects built from a client's Host header
    app.state.service = service
    identify = identity_dependency(settings, service.store)
    auth = [Depends(identify)]

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

    @app.exception_handler(StoreError)
    async def on_store_error(request: Request, exc: StoreError) -> JSONResponse:
        log.error("state store error on %s %s: %s", request.method, loggable(request.scope), exc)
        return error_response(503, "store_unavailable", "the server's state store does not answer; retry shortly",
                              {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", f"invalid request ({problems[:500]}); see /docs")

    app.add_middleware(HeaderLimit, max_header_bytes=settings.max_header_bytes)
    app.state.metrics = metrics = ServerMetrics()
    track_service(metrics, service)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: logs every request, refused ones too
    add_operation_routes(app, service, metrics)  # GET /metrics, GET /readyz

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> dict[str, Any]:
        """Liveness and what is served; needs no API key."""
        try:  # liveness does not depend on the store (readiness does: /readyz)
            sessions = service.session_count()
        except StoreError:
            sessions = None
        return {"status": "ok", "sessions": sessions,
                "export_sha256": service.fused.sha256 if service.fused else None, "heads": sorted(service.heads),
                "public_set": service.public.fingerprint if service.public else None,
                "replica_id": service.replica}

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
        return await service.open_session(served, body)

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/infer", response_class=Response, dependencies=auth,
              tags=["sessions"],
              responses={200: {**OCTET_REPLY, "description": "Reply ciphertext: Enc(W h + b) for every input the "
                                                             "query packs"}, **BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("One query from encrypted.encrypt(keys, layout, X) for the session's layer: up "
                                     "to `lanes` hidden states in one ciphertext."))
    async def infer(session_id: str, request: Request, identity: Identity = Depends(identify)) -> Response:
        """Evaluate the session's layer on one encrypted query; the reply is encrypted under the client's key."""
        record, served = service.session(session_id)
        if served.argmax is not None:
            raise ApiError(409, "label_only", "this layer answers labels only (GET /v1/model 'answers'): send the "
                                              "query with your argmax keys to POST /v1/sessions/{id}/label "
                                              "(docs/protocol.md, section 8)")
        body = await read_body(request, served.max_query_bytes, "a query", settings.body_timeout_s)
        keys = await service.session_keys(record, served)
        remaining = service.reserve_rows(record, served, identity)
        try:
            reply, ms = await service.run_cpu(service.apply, served, keys, body, kind="infer")
        except ApiError:
            service.refund_rows(record, served, identity)  # no answer: nothing was revealed
            raise
        return Response(reply, media_type=OCTET_STREAM,
                        headers={SERVER_TIMING_HEADER: f"he;dur={ms:.2f}", BUDGET_HEADER: remaining})

    @app.delete(f"{API_PREFIX}/sessions/{{session_id}}", status_code=204, response_class=Response,
                dependencies=auth, responses=ERROR_RESPONSES, tags=["sessions"])
    async def close_session(session_id: str) -> Response:
        """Forget the session's keys (on every replica: they share the store)."""
        service.close_session(session_id)
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
                         limit: int | None = Query(None, ge=1, le=1 << 40),
                         identity: Identity = Depends(identify)) -> JSONResponse:
        """A page of head `head`'s plaintext logits on the public set's val rows, in val-index order (at most
        `max_public_texts` rows per page); only when the provider opted in (--publish_val_logits true). Every row
        of the page is charged to the client's row budget of the head, as a query's rows are (a page fetched
        twice is charged twice); 429 `budget_exhausted`, and no page, when it would exceed it."""
        logits = service.val_logits(head)
        rows = logits.shape[0]
        if offset > rows:
            raise ApiError(400, "invalid_offset", f"offset {offset} is past the public set's {rows} val rows")
        end = min(offset + min(limit or settings.max_public_texts, settings.max_public_texts), rows)
        remaining = service.charge_val_rows(head, identity, end - offset)
        return JSONResponse({"head": head, "rows": rows, "offset": offset, "next": end if end < rows else None,
                             "logits": logits[offset:end].tolist()}, headers={BUDGET_HEADER: remaining})

    add_fit_routes(app, service.fit, identify, settings)
    add_label_routes(app, service, identify, settings)
    return app
