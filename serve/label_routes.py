"""The label-only routes (the provider's side is `serve.label_service.LabelService`; the messages are
`encrypted.argmax`'s, laid out in docs/protocol.md, section 8)."""
from __future__ import annotations

from typing import Callable

from fastapi import Depends, FastAPI, Path as PathParam, Request
from fastapi.responses import Response

from .api import BODY_ERRORS, ERROR_RESPONSES, OCTET_REPLY, ApiError, raw_body, read_body
from .identity import Identity
from .protocol import (API_PREFIX, BUDGET_HEADER, LABEL_RUN_HEADER, LABEL_STAGE_HEADER, OCTET_STREAM,
                       SERVER_TIMING_HEADER)
from .service import EncryptedService
from .settings import ServerSettings


def logits_layer() -> ApiError:
    return ApiError(409, "logits_layer", "this layer answers logits (GET /v1/model 'answers'); send queries to POST "
                                         "/v1/sessions/{id}/infer")


def add_label_routes(app: FastAPI, service: EncryptedService, identify: Callable[..., Identity],
                     settings: ServerSettings) -> None:
    auth = [Depends(identify)]

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/label", response_class=Response, dependencies=auth,
              tags=["sessions"],
              responses={200: {**OCTET_REPLY, "description": "Reply ciphertext Enc(W h + b + r) for every input "
                                                             f"the query packs; header {LABEL_RUN_HEADER} names "
                                                             "the argmax run"}, **BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("4-byte big-endian length of the argmax public keys, the keys "
                                     "(ArgmaxKeys.public_bytes()), then one query (encrypted.encrypt)."))
    async def label(session_id: str, request: Request, identity: Identity = Depends(identify)) -> Response:
        """Start a label-only answer: the masked reply, then the argmax run at POST /v1/label-runs/{run}."""
        record, served = service.session(session_id)
        if served.argmax is None:
            raise logits_layer()
        body = await read_body(request, service.labels.max_body(served), "a label request", settings.body_timeout_s)
        argmax_keys, query, rows = service.labels.split(body, served)
        keys = await service.session_keys(record, served)
        # only the rows the query declares get an argmax (the other lanes stay masked), so only they are charged
        remaining = service.reserve_rows(record, served, identity, rows)
        try:
            reply, run_id, ms = await service.labels.start(served, keys, argmax_keys, query, identity)
        except ApiError:
            service.refund_rows(record, served, identity, rows)  # no answer: nothing was revealed
            raise
        return Response(reply, media_type=OCTET_STREAM,
                        headers={LABEL_RUN_HEADER: run_id, LABEL_STAGE_HEADER: "values",
                                 SERVER_TIMING_HEADER: f"he;dur={ms:.2f}", BUDGET_HEADER: remaining})

    @app.post(f"{API_PREFIX}/label-runs/{{run_id}}", response_class=Response, dependencies=auth,
              tags=["sessions"], responses={200: {**OCTET_REPLY, "description": "The provider's next argmax "
                                                                                "message"},
                                            **BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("The client's argmax message for the run's stage (exactly its size)."))
    async def label_step(request: Request, run_id: str = PathParam(..., max_length=64),
                         identity: Identity = Depends(identify)) -> Response:
        """One message of the secure argmax; the run ends with the message carrying the labels."""
        run = service.labels.run(run_id, identity)
        body = await read_body(request, run.argmax.expected_bytes(), "an argmax message", settings.body_timeout_s)
        reply, done, ms = await service.labels.step(run, body)
        return Response(reply, media_type=OCTET_STREAM,
                        headers={LABEL_STAGE_HEADER: "done" if done else run.argmax.stage,
                                 SERVER_TIMING_HEADER: f"he;dur={ms:.2f}"})
