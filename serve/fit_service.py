"""The provider's side of the private fit, and the public set's texts (routes under /v1/fit and /v1/public-set).

The client uploads Enc(Ẑ_A) of each public-set part in chunks of rows; the provider multiplies every chunk by
its own normalised states Ẑ_B (`encrypted.GramAccumulator`) and returns Enc(Ẑ_Aᵀ Ẑ_B) per part, plus the
statistics the client needs to undo the normalisation and solve the ridge map itself (`fit_stats`):

    GET    /v1/public-set/texts?offset=&limit=           {"texts", "offset", "next"}
    GET    /v1/fit/plan?source_dim=D                     the GramPlan for a D-dimensional client
    POST   /v1/fit/sessions?source_dim=D&fingerprint=F   public keys in -> {"session_id", "plan", "stats"}
    POST   /v1/fit/sessions/{id}/parts/{p}/chunks/{c}    one chunk message, in order -> progress
    GET    /v1/fit/sessions/{id}/parts/{p}/result/{g}    reply blob of group g, once part p is complete
    DELETE /v1/fit/sessions/{id}

A session holds the client's public keys, its plan, the current part's accumulators and finished result blobs
until fetched; the rows and ciphertexts it accepts are exactly the plan's. Everything a client chooses
(source_dim, fingerprint, budget, capacity) is checked before keys are deserialised or accumulators built.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse, Response

from encrypted import (DEFAULT_PROFILE, EncryptedError, GramAccumulator, GramPlan, PublicKeys, plan_gram,
                       public_bytes_max)

from .api import BODY_ERRORS, ERROR_RESPONSES, OCTET_REPLY, ApiError, client_id, input_error, raw_body, read_body
from .budget import FitBudget
from .formats.folders import ExportError
from .fit_stats import normalise, provider_stats, train_normaliser
from .protocol import API_PREFIX, OCTET_STREAM, SERVER_TIMING_HEADER
from .formats.public_states import PublicStates
from .sessions import SessionStore
from .settings import ServerSettings

PLAN_CACHE = 16  # plans kept by source_dim (each is a few small dicts)
FIT_REOPEN = "open a new fit session (POST /v1/fit/sessions)"


@dataclass
class FitSession:
    session_id: str
    plan: GramPlan
    keys: Any = field(repr=False)  # encrypted.PublicKeys for plan.layout
    last_used: float
    part: int = 0  # the part whose chunks are being accepted; len(plan.part_rows) when all are done
    accumulator: Any = field(default=None, repr=False)  # GramAccumulator of `part`
    results: dict[tuple[int, int], bytes] = field(default_factory=dict, repr=False)  # (part, group) -> reply
    busy: bool = False  # a chunk is being added (touched on the event loop only)


class FitService:
    """The public set's normalised states, the published statistics, the plans and the fit sessions."""

    def __init__(self, public: PublicStates, settings: ServerSettings,
                 run_cpu: Callable[..., Awaitable[Any]], clock: Callable[[], float] = time.monotonic):
        self.public, self.settings, self.run_cpu, self.clock = public, settings, run_cpu, clock
        mean, scale = train_normaliser(public.parts[0])
        self.targets = [normalise(part, mean, scale) for part in public.parts]  # Ẑ_B per part, float64
        self.stats = provider_stats(list(public.parts), mean, scale)
        try:  # the public set itself must fit the CKKS profile (rows per part), whatever the client
            plan_gram(DEFAULT_PROFILE, 1, public.hidden_size, public.part_rows, max_accumulator_bytes=None)
        except EncryptedError as exc:
            raise ExportError(f"{public.directory} cannot be served for private fits: {exc}") from None
        self.budget = FitBudget(settings.fits_per_client, settings.max_clients)
        self.sessions = SessionStore(settings.max_fit_sessions, settings.fit_session_ttl_s, evict=False, clock=clock,
                                     id_prefix=f"{settings.replica_id}." if settings.replica_id else "")
        self._plans: OrderedDict[int, GramPlan] = OrderedDict()
        self._opening = 0  # sessions whose keys are being read (they hold a slot)
        self._lock = threading.Lock()

    # --- plans ------------------------------------------------------------------------------------------

    def plan(self, source_dim: int) -> GramPlan:
        """The plan for a `source_dim`-dimensional client: validated, bounded in memory, cached."""
        limit = self.settings.max_fit_source_dim
        if not 1 <= source_dim <= limit:
            raise ApiError(400, "invalid_source_dim", f"source_dim must be the client's state dimension, 1 to {limit} "
                                                      f"on this server, got {source_dim}")
        with self._lock:
            plan = self._plans.get(source_dim)
            if plan is not None:
                self._plans.move_to_end(source_dim)
                return plan
        try:
            plan = plan_gram(DEFAULT_PROFILE, source_dim, self.public.hidden_size, self.public.part_rows,
                             max_accumulator_bytes=self.settings.max_fit_accumulator_bytes)
        except (EncryptedError, ValueError) as exc:
            raise ApiError(400, "fit_too_large", f"a private fit of {source_dim}-d states against this public set "
                                                 f"does not fit this server's limits ({str(exc)[:300]})") from None
        if plan.accumulator_bytes > self.settings.max_fit_accumulator_bytes:
            raise ApiError(400, "fit_too_large", f"a private fit of {source_dim}-d states needs "
                                                 f"{plan.accumulator_bytes} bytes of accumulators, over this server's "
                                                 f"{self.settings.max_fit_accumulator_bytes}")
        with self._lock:
            self._plans[source_dim] = plan
            while len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        return plan

    # --- sessions -----------------------------------------------------------------------------------------

    def check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.public.fingerprint:
            raise ApiError(409, "public_set_mismatch",
                           f"your public set's fingerprint {fingerprint[:64]!r} is not this server's "
                           f"{self.public.fingerprint!r} (public set {self.public.name!r}, {self.public.rows} rows); "
                           "fetch the texts again from GET /v1/public-set/texts, extract your states on exactly "
                           "those rows in that order, and retry")

    def claim_slot(self) -> None:
        """Hold one of `max_fit_sessions` slots for a session being opened; 503 when all are taken. Fit sessions are
        never evicted for a newcomer: each holds another client's half-finished fit."""
        with self._lock:
            if self.sessions.free_slots() - self._opening <= 0:
                raise ApiError(503, "busy", f"{self.settings.max_fit_sessions} private fits are running on this "
                                            "server; retry in a few minutes", {"Retry-After": "30"})
            self._opening += 1

    def release_slot(self) -> None:
        with self._lock:
            self._opening -= 1

    def start(self, plan: GramPlan, body: bytes) -> FitSession:
        """Deserialise the keys for the plan's layout and build part 0's accumulator (CPU: run via run_cpu)."""
        try:
            keys = PublicKeys.from_bytes(body, plan.layout)
            keys.require(plan.layout)
        except ValueError as exc:
            raise input_error(exc) from None
        session = FitSession(self.sessions.new_id(), plan, keys, self.clock())
        session.accumulator = GramAccumulator(plan, 0, self.targets[0])
        return session

    def add(self, session: FitSession) -> None:
        self.sessions.put(session)

    def session(self, session_id: str) -> FitSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, "fit_session_not_found", f"fit session {session_id[:48]!r} does not exist on this "
                                                         f"server (it expired, was closed, or the server "
                                                         f"restarted); {FIT_REOPEN}")
        return session

    def remove(self, session_id: str) -> bool:
        return self.sessions.remove(session_id)

    def __len__(self) -> int:
        return len(self.sessions)

    # --- chunks and results -------------------------------------------------------------------------------

    def check_chunk(self, session: FitSession, part: int, chunk: int) -> None:
        """404 for a part or chunk the plan does not have, 409 for one out of order or while another is added."""
        plan, parts = session.plan, len(session.plan.part_rows)
        if not 0 <= part < parts:
            raise ApiError(404, "no_such_part", f"the public set has parts 0 to {parts - 1}, not {part}")
        if not 0 <= chunk < plan.chunks(part):
            raise ApiError(404, "no_such_chunk", f"part {part} has chunks 0 to {plan.chunks(part) - 1}, not {chunk}")
        if part != session.part:
            done = "all parts are complete" if session.part >= parts else f"part {session.part} is being uploaded"
            raise ApiError(409, "out_of_order", f"part {part} is not accepting chunks: {done}; send chunks part by "
                                                "part, each in order")
        expected = session.accumulator.next_chunk
        if chunk != expected:
            raise ApiError(409, "out_of_order", f"chunk {chunk} of part {part} is out of order: the server expects "
                                                f"chunk {expected}; send each part's chunks in order, once each")
        if session.busy:
            raise ApiError(409, "chunk_in_progress", "another chunk of this session is being added; send the next "
                                                     "one when its answer arrives")

    def add_chunk(self, session: FitSession, part: int, chunk: int, body: bytes) -> float:
        """Accumulate one chunk; when it completes the part, compute the part's replies and move to the next part.
        Runs in a worker thread; returns the milliseconds spent."""
        start = time.perf_counter()
        try:
            session.accumulator.add(body, chunk, session.keys)
            if session.accumulator.complete:
                replies = session.accumulator.results(session.keys)
                session.results.update({(part, group): blob for group, blob in enumerate(replies)})
                session.part = part + 1
                session.accumulator = (GramAccumulator(session.plan, session.part, self.targets[session.part])
                                       if session.part < len(session.plan.part_rows) else None)
        except ValueError as exc:  # the accumulator refuses bad bytes, and a broken part, with a clear message
            raise input_error(exc) from None
        except RuntimeError:
            # SEAL refuses some well-formed but degenerate ciphertexts mid-evaluation; the part is then unusable
            raise ApiError(400, "invalid_ciphertext", "the chunk could not be evaluated (SEAL refused it); send the "
                                                      "bytes that encrypted.encrypt_chunk returns, in a new fit "
                                                      "session") from None
        return (time.perf_counter() - start) * 1000

    def result(self, session: FitSession, part: int, group: int) -> bytes:
        """Part `part`'s reply for group `group`, handed out once (then freed)."""
        parts, groups = len(session.plan.part_rows), session.plan.groups
        if not 0 <= part < parts:
            raise ApiError(404, "no_such_part", f"the public set has parts 0 to {parts - 1}, not {part}")
        if not 0 <= group < groups:
            raise ApiError(404, "no_such_group", f"results have groups 0 to {groups - 1}, not {group}")
        if part >= session.part:
            raise ApiError(409, "part_incomplete", f"part {part} is not complete: upload its remaining chunks first "
                                                   f"(next: part {session.part}, chunk "
                                                   f"{session.accumulator.next_chunk})")
        blob = session.results.pop((part, group), None)
        if blob is None:
            raise ApiError(409, "result_fetched", f"the result of part {part}, group {group} was already fetched and "
                                                  f"freed; {FIT_REOPEN} to fit again")
        return blob


# --- routes ------------------------------------------------------------------------------------------------

def no_public_set() -> ApiError:
    return ApiError(404, "no_public_set", "this server publishes no public set, so it offers no private fit; ask its "
                                          "operator to serve one (xsilo serve --public DIR)")


def add_fit_routes(app: FastAPI, fit: FitService | None, auth: list, settings: ServerSettings) -> None:
    """Register the public-set and private-fit routes on `app` (each answers 404 `no_public_set` without one)."""
    authenticated = settings.api_key is not None

    def service() -> FitService:
        if fit is None:
            raise no_public_set()
        return fit

    @app.get(f"{API_PREFIX}/public-set/texts", dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def public_texts(offset: int = Query(0, ge=0, le=1 << 40),
                           limit: int | None = Query(None, ge=1, le=1 << 40)) -> dict[str, Any]:
        """A page of the public set's texts in public-set order (at most `max_public_texts` per page)."""
        public = service().public
        if offset > public.rows:
            raise ApiError(400, "invalid_offset", f"offset {offset} is past the public set's {public.rows} rows")
        count = min(limit or settings.max_public_texts, settings.max_public_texts)
        end = min(offset + count, public.rows)
        return {"texts": public.texts[offset:end], "offset": offset, "next": end if end < public.rows else None}

    def source_dim_query() -> Any:
        return Query(..., ge=1, le=1 << 40, description="the client's state dimension d_A")

    @app.get(f"{API_PREFIX}/fit/plan", dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def fit_plan(source_dim: int = source_dim_query()) -> dict[str, Any]:
        """The GramPlan (chunking, CKKS layout, rotation steps) of a private fit for a source_dim-d client."""
        return service().plan(source_dim).to_dict()

    @app.post(f"{API_PREFIX}/fit/sessions", status_code=201, dependencies=auth, tags=["private fit"],
              responses={**BODY_ERRORS, **ERROR_RESPONSES},
              openapi_extra=raw_body("ClientKeys.public_bytes() for the plan's layout (GET /v1/fit/plan)."))
    async def open_fit(request: Request, source_dim: int = source_dim_query(),
                       fingerprint: str = Query(..., max_length=128, description="the public set's fingerprint "
                                                                                 "the client extracted on")
                       ) -> dict[str, Any]:
        """Open a private fit: upload public keys; the answer has the plan and the provider's statistics."""
        fits = service()
        plan = fits.plan(source_dim)
        fits.check_fingerprint(fingerprint)
        fits.claim_slot()
        try:
            client = client_id(request, authenticated)
            refusal = fits.budget.reserve(client)
            if refusal is not None:
                raise ApiError(429, "budget_exhausted", refusal.message)
            try:
                body = await read_body(request, public_bytes_max(plan.layout), "public keys", settings.body_timeout_s)
                session = await fits.run_cpu(fits.start, plan, body)
            except ApiError:
                fits.budget.refund(client)  # no fit was opened: nothing was revealed
                raise
            fits.add(session)
        finally:
            fits.release_slot()
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
            ms = await fits.run_cpu(fits.add_chunk, session, part, chunk, body)
        finally:
            session.busy = False
        complete = session.part > part
        payload = {"part": part, "chunk": chunk, "part_complete": complete,
                   "next": None if session.part >= len(session.plan.part_rows) else
                   {"part": session.part, "chunk": session.accumulator.next_chunk}}
        return JSONResponse(payload, headers={SERVER_TIMING_HEADER: f"he;dur={ms:.2f}"})

    @app.get(f"{API_PREFIX}/fit/sessions/{{session_id}}/parts/{{part}}/result/{{group}}", response_class=Response,
             dependencies=auth, tags=["private fit"],
             responses={200: {**OCTET_REPLY, "description": "Enc(G_p) of one group: read with decrypt_gram"},
                        **ERROR_RESPONSES})
    async def fit_result(session_id: str, part: int = index(), group: int = index()) -> Response:
        """One group's reply of a complete part: handed out once, then freed."""
        fits = service()
        return Response(fits.result(fits.session(session_id), part, group), media_type=OCTET_STREAM)

    @app.delete(f"{API_PREFIX}/fit/sessions/{{session_id}}", status_code=204, response_class=Response,
                dependencies=auth, responses=ERROR_RESPONSES, tags=["private fit"])
    async def close_fit(session_id: str) -> Response:
        """Forget the fit session: its keys, accumulators and unfetched results."""
        if not service().remove(session_id):
            raise ApiError(404, "fit_session_not_found", f"fit session {session_id[:48]!r} does not exist on this "
                                                         "server")
        return Response(status_code=204)

