"""The public-set and private-fit routes (the provider's side is `serve.fit_service.FitService`): see that module
for the messages. Each answers 404 `no_public_set` on a server without a public set."""
from __future__ import annotations

import logging
from typing import Any, Callable

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse, Response

from .api import BODY_ERRORS, ERROR_RESPONSES, OCTET_REPLY, ApiError, raw_body, read_body
from .fit_service import FitService
from .observability import session_tag
from .identity import Identity
from .protocol import API_PREFIX, OCTET_STREAM, SERVER_TIMING_HEADER
from .settings import ServerSettings

log = logging.getLogger("serve")


def no_public_set() -> ApiError:
    return ApiError(404, "no_public_set", "this server publishes no public set, so it offers no private fit; ask its "
                                          "operator to serve one (xsilo serve --public DIR)")


def add_fit_routes(app: FastAPI, fit: FitService | None, identify: Callable[..., Identity],
                   settings: ServerSettings) -> None:
    """Register the public-set and private-fit routes on `app` (each answers 404 `no_public_set` without one)."""
    auth = [Depends(identify)]

    def service() -> FitService:
        if fit is None:
            raise no_public_set()
        return fit

    def page(texts: list[str], offset: int, limit: int | None, what: str) -> dict[str, Any]:
        if offset > len(texts):
            raise ApiError(400, "invalid_offset", f"offset {offset} is past the {len(texts)} rows of the {what}")
        end = min(offset + min(limit or settings.max_public_texts, settings.max_public_texts), len(texts))
        return {"texts": texts[offset:end], "offset": offset, "next": end if end < len(texts) else None}

    @app.get(f"{API_PREFIX}/public-set/texts", dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def public_texts(offset: int = Query(0, ge=0, le=1 << 40),
                           limit: int | None = Query(None, ge=1, le=1 << 40)) -> dict[str, Any]:
        """A page of the public set's texts in public-set order (at most `max_public_texts` per page)."""
        return page(service().public.texts, offset, limit, "public set")

    @app.get(f"{API_PREFIX}/public-set/anchors", dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def anchor_texts(offset: int = Query(0, ge=0, le=1 << 40),
                           limit: int | None = Query(None, ge=1, le=1 << 40)) -> dict[str, Any]:
        """A page of the public set's anchor texts, in order: the last part of every private fit (404 `no_anchors`
        when the set has none)."""
        anchors = service().public.anchors
        if anchors is None:
            raise ApiError(404, "no_anchors", "this server's public set has no anchors (GET /v1/model "
                                              "public_set.anchors is null); fit on its train and val parts only")
        return page(anchors.texts, offset, limit, "anchors")

    @app.get(f"{API_PREFIX}/public-set/split", dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def public_split() -> dict[str, Any]:
        """Which public rows form each part of a private fit: the val part's text indices, ascending; the train
        part is every other row, ascending. Part p's states go to the fit in this order."""
        public = service().public
        return {"rows": public.rows, "val": [int(i) for i in public.indices[1]]}

    def source_dim_query() -> Any:
        return Query(..., ge=1, le=1 << 40, description="the client's state dimension d_A")

    @app.get(f"{API_PREFIX}/fit/plan", dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def fit_plan(source_dim: int = source_dim_query()) -> dict[str, Any]:
        """The GramPlan (chunking, moduli, message sizes) of a private fit for a source_dim-d client."""
        return service().plan(source_dim).to_dict()

    @app.post(f"{API_PREFIX}/fit/sessions", status_code=201, tags=["private fit"],
              responses={**BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("FitKeys.public_bytes() for the plan (GET /v1/fit/plan)."))
    async def open_fit(request: Request, source_dim: int = source_dim_query(),
                       fingerprint: str = Query(..., max_length=128, description="the public set's fingerprint "
                                                                                 "the client extracted on"),
                       anchors: str | None = Query(None, max_length=128, description="the anchor texts' "
                                                   "fingerprint, required when the public set has anchors"),
                       identity: Identity = Depends(identify)) -> dict[str, Any]:
        """Open a private fit: upload the fit key; the answer has the plan and the provider's statistics."""
        fits = service()
        plan = fits.plan(source_dim)
        fits.check_fingerprint(fingerprint, anchors)
        # The keys arrive before any slot is held: a slow upload holds a connection, never a fit slot.
        body = await read_body(request, plan.keys_max_bytes, "a fit key", settings.body_timeout_s)
        session_id = fits.open(plan, identity)
        try:
            try:
                session = await fits.run_cpu(fits.start, session_id, plan, body, kind="fit_keys")
            except ApiError:
                fits.abandon(session_id, identity)  # no fit was opened: nothing was revealed
                raise
            fits.add(session)
        finally:
            fits.opened()
        if fits.metrics is not None:
            fits.metrics.fit_bytes("in", len(body))
        return {"session_id": session.session_id, "plan": plan.to_dict(), "stats": fits.stats,
                "session_ttl_s": settings.fit_session_ttl_s}

    def index() -> Any:  # one Path() per parameter: FastAPI names a shared one after the first parameter it serves
        return PathParam(..., ge=0, le=1 << 40)

    @app.post(f"{API_PREFIX}/fit/sessions/{{session_id}}/parts/{{part}}/chunks/{{chunk}}", dependencies=auth,
              tags=["private fit"], responses={**BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("One chunk message from encrypted.encrypt_chunk(keys, plan, part, chunk, Z)."))
    async def add_chunk(session_id: str, request: Request, part: int = index(), chunk: int = index()) -> JSONResponse:
        """Add one chunk of part `part` (chunks in order); the part's results are ready after its last chunk."""
        fits = service()
        session = fits.session(session_id)
        fits.check_chunk(session, part, chunk)
        body = await read_body(request, session.plan.chunk_max_bytes, "a chunk", settings.body_timeout_s)
        fits.check_chunk(session, part, chunk)  # another request may have moved on while this body arrived
        session.busy = True
        try:
            ms = await fits.run_cpu(fits.add_chunk, session, part, chunk, body, kind="fit_chunk")
        finally:
            session.busy = False
        fits.progressed(session)
        progress = session.progress(fits.clock())
        if fits.metrics is not None:
            fits.metrics.fit_bytes("in", len(body))
            fits.metrics.fit_rows(session.plan.rows(part, chunk))
        log.info("fit %s: %d/%d rows, %.0f rows/s", session_tag(session_id), progress["rows_done"],
                 progress["rows_total"], progress["rows_per_s"], extra={"fit": {"id": session_tag(session_id), **progress}})
        complete = session.part > part
        payload = {"part": part, "chunk": chunk, "part_complete": complete,
                   "next": None if session.part >= len(session.plan.part_rows) else
                   {"part": session.part, "chunk": session.accumulator.next_chunk}}
        return JSONResponse(payload, headers={SERVER_TIMING_HEADER: f"he;dur={ms:.2f}"})

    @app.get(f"{API_PREFIX}/fit/sessions/{{session_id}}", dependencies=auth, responses=ERROR_RESPONSES,
             tags=["private fit"])
    async def fit_progress(session_id: str) -> dict[str, Any]:
        """The fit's progress: the part and chunk the server expects next (a client resumes there after a lost
        answer), rows done of rows in all, rate and time left."""
        fits = service()
        return fits.session(session_id).progress(fits.clock())

    @app.get(f"{API_PREFIX}/fit/sessions/{{session_id}}/parts/{{part}}/result/{{group}}", response_class=Response,
             dependencies=auth, tags=["private fit"],
             responses={200: {**OCTET_REPLY, "description": "Enc(G_p) of one group of target columns: read with "
                                                            "decrypt_gram"},
                        **ERROR_RESPONSES})
    async def fit_result(session_id: str, part: int = index(), group: int = index()) -> Response:
        """One group's reply of a complete part: handed out once, then freed."""
        fits = service()
        blob = fits.result(fits.session(session_id), part, group)
        if fits.metrics is not None:
            fits.metrics.fit_bytes("out", len(blob))
        return Response(blob, media_type=OCTET_STREAM)

    @app.delete(f"{API_PREFIX}/fit/sessions/{{session_id}}", status_code=204, response_class=Response,
                dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def close_fit(session_id: str) -> Response:
        """Forget the fit session: its keys, accumulators and unfetched results (on any replica: its record in the
        store, and its slot, are released everywhere)."""
        if not service().remove(session_id):
            raise ApiError(404, "fit_session_not_found", f"fit session {session_id[:48]!r} does not exist on this "
                                                         "server")
        return Response(status_code=204)

