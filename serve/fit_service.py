"""The provider's side of the private fit, and the public set's texts (routes under /v1/fit and /v1/public-set).

The client uploads Enc(Ẑ_A) of each public-set part in chunks of rows; the provider multiplies every chunk by
its own normalised states Ẑ_B (`encrypted.GramAccumulator`) and returns Enc(Ẑ_Aᵀ Ẑ_B) per part, plus the
statistics the client needs to undo the normalisation and solve the ridge map itself (`fit_stats`):

    GET    /v1/public-set/texts?offset=&limit=           {"texts", "offset", "next"}
    GET    /v1/public-set/anchors?offset=&limit=         the same, for the anchor texts (a set that has them)
    GET    /v1/fit/plan?source_dim=D                     the GramPlan for a D-dimensional client
    POST   /v1/fit/sessions?source_dim=D&fingerprint=F[&anchors=A]   public keys in -> {"session_id", "plan", "stats"}
    POST   /v1/fit/sessions/{id}/parts/{p}/chunks/{c}    one chunk message, in order -> progress
    GET    /v1/fit/sessions/{id}/parts/{p}/result/{g}    reply blob of group g, once part p is complete
    DELETE /v1/fit/sessions/{id}

A session holds the client's public keys, its plan, the current part's accumulators and finished result blobs
until fetched; the rows and ciphertexts it accepts are exactly the plan's. Everything a client chooses
(source_dim, fingerprint, budget, capacity) is checked before keys are deserialised or accumulators built.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from encrypted import EncryptedError, GramAccumulator, GramPlan, key_seed_for, plan_gram, read_fit_key

from .api import ApiError, input_error
from .budget import Budgets
from .fit_stats import normalise, provider_stats, train_normaliser
from .formats.folders import ExportError
from .formats.public_states import PublicStates
from .identity import Identity
from .protocol import FIT_SESSION_LOST
from .sessions import SessionStore
from .settings import ServerSettings
from .store import FitRecord, StateStore

PLAN_CACHE = 16  # plans kept by source_dim (each is a few small dicts)
FIT_REOPEN = "open a new fit session (POST /v1/fit/sessions)"


@dataclass
class FitSession:
    session_id: str
    plan: GramPlan
    keys: Any = field(repr=False)  # the client's fit key p_B (encrypted.read_fit_key)
    last_used: float  # the last progress (an accepted chunk, a fetched result); refused requests do not count
    created: float
    part: int = 0  # the part whose chunks are being accepted; len(plan.part_rows) when all are done
    accumulator: Any = field(default=None, repr=False)  # GramAccumulator of `part`
    results: dict[tuple[int, int], bytes] = field(default_factory=dict, repr=False)  # (part, group) -> reply
    busy: bool = False  # a chunk is being added (touched on the event loop only)
    rows_done: int = 0  # public rows accumulated so far, over every part

    def progress(self, now: float) -> dict[str, Any]:
        """What the client and the operator see of this fit: the next chunk, rows done, rate and time left."""
        parts, total = len(self.plan.part_rows), sum(self.plan.part_rows)
        rate = self.rows_done / max(now - self.created, 1e-9)
        return {"part": self.part, "next_chunk": None if self.part >= parts else self.accumulator.next_chunk,
                "rows_done": self.rows_done, "rows_total": total, "rows_per_s": round(rate, 1),
                "eta_s": round((total - self.rows_done) / rate, 1) if rate > 0 else None}


class FitService:
    """The public set's normalised states, the published statistics, the plans and the fit sessions."""

    def __init__(self, public: PublicStates, settings: ServerSettings, run_cpu: Callable[..., Awaitable[Any]],
                 store: StateStore, budgets: Budgets, replica: str, clock: Callable[[], float] = time.monotonic):
        self.public, self.settings, self.run_cpu, self.clock = public, settings, run_cpu, clock
        self.store, self.budgets, self.replica = store, budgets, replica
        self.metrics: Any = None  # serve.observability.ServerMetrics, set by create_app
        mean, scale = train_normaliser(public.parts[0])
        self.targets = [normalise(part, mean, scale) for part in public.fit_parts]  # Ẑ_B per part, float64
        self.stats = provider_stats(list(public.fit_parts), mean, scale)
        self.part_rows = tuple(len(part) for part in public.fit_parts)
        self.key_seed = key_seed_for(public.fingerprint)
        try:  # the public set itself must fit the kernel's moduli (rows per part), whatever the client
            probe = plan_gram(1, public.hidden_size, self.part_rows, self.key_seed, max_accumulator_bytes=None)
            self.target_shifts = tuple(probe.column_shift(p, np.einsum("ij,ij->j", t, t))
                                       for p, t in enumerate(self.targets))
        except EncryptedError as exc:
            raise ExportError(f"{public.directory} cannot be served for private fits: {exc}") from None
        self.sessions = SessionStore(settings.max_fit_sessions, settings.fit_session_ttl_s, evict=False, clock=clock)
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
            plan = plan_gram(source_dim, self.public.hidden_size, self.part_rows, self.key_seed,
                             target_shifts=self.target_shifts,
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

    def check_fingerprint(self, fingerprint: str, anchors: str | None = None) -> None:
        """The texts the client extracted on are this server's: the public texts' fingerprint and, for a set with
        anchors, the anchor texts' (409 otherwise, before any work)."""
        if fingerprint != self.public.fingerprint:
            raise ApiError(409, "public_set_mismatch",
                           f"your public set's fingerprint {fingerprint[:64]!r} is not this server's "
                           f"{self.public.fingerprint!r} (public set {self.public.name!r}, {self.public.rows} rows); "
                           "fetch the texts again from GET /v1/public-set/texts, extract your states on exactly "
                           "those rows in that order, and retry")
        expected = None if self.public.anchors is None else self.public.anchors.fingerprint
        if anchors != expected:
            raise ApiError(409, "anchors_mismatch",
                           f"this server's public set has {'no anchors' if expected is None else 'anchors'} "
                           f"(fingerprint {expected!r}), but the fit was opened with anchors={str(anchors)[:64]!r}; "
                           + ("drop the anchors parameter" if expected is None else
                              "fetch the anchor texts again from GET /v1/public-set/anchors, extract your states on "
                              "them, and pass their fingerprint as anchors=") + ", and retry")

    def open(self, plan: GramPlan, identity: Identity) -> str:
        """Charge the fit, claim the client's slot in the store (across replicas) and one of this replica's
        `max_fit_sessions` slots; the new session's id. Undo with `abandon` if the session is not opened after all.
        Fit sessions are never evicted for a newcomer (each holds a client's half-finished fit); they end when
        finished, idle for `fit_session_ttl_s`, or `fit_session_max_s` after they opened."""
        self.expire_overdue()
        refusal = self.budgets.charge_fit(identity)
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.budget_rejected("fits")
            raise ApiError(429, "budget_exhausted", refusal.message)
        session_id = secrets.token_urlsafe(24)
        record = FitRecord(session_id, identity.client, self.replica, time.time())
        if not self.store.claim_fit(record, per_client=self.settings.fit_slots_per_client,
                                    ttl_s=self.settings.fit_session_ttl_s):
            self.budgets.refund_fit(identity)
            raise ApiError(429, "fit_slots_exhausted",
                           f"this client already holds {self.settings.fit_slots_per_client} open private fit(s); "
                           f"finish or DELETE it (DELETE /v1/fit/sessions/ID), or wait {self.settings.fit_session_ttl_s:g}"
                           f" s after its last progress")
        with self._lock:
            if self.sessions.free_slots() - self._opening <= 0:
                self.store.release_fit(session_id)
                self.budgets.refund_fit(identity)
                raise ApiError(503, "busy", f"{self.settings.max_fit_sessions} private fits are running on this "
                                            "server; retry in a few minutes", {"Retry-After": "30"})
            self._opening += 1
        return session_id

    def abandon(self, session_id: str, identity: Identity) -> None:
        """A session claimed by `open` was refused before it opened (bad keys, busy): nothing was revealed."""
        self.store.release_fit(session_id)
        self.budgets.refund_fit(identity)

    def opened(self) -> None:
        """The session claimed by `open` was added, or abandoned: its slot reservation ends."""
        with self._lock:
            self._opening -= 1

    def start(self, session_id: str, plan: GramPlan, body: bytes) -> FitSession:
        """Read the client's fit key for the plan and build part 0's accumulator (CPU: run via run_cpu)."""
        try:
            keys = read_fit_key(body, plan)
        except ValueError as exc:
            raise input_error(exc) from None
        now = self.clock()
        session = FitSession(session_id, plan, keys, now, now)
        session.accumulator = GramAccumulator(plan, 0, self.targets[0])
        return session

    def add(self, session: FitSession) -> None:
        self.sessions.put(session)

    def expire_overdue(self) -> None:
        """Drop sessions past `fit_session_max_s`, however they progress (one client cannot hold a slot forever)."""
        now = self.clock()
        for session in self.sessions.values():
            if now - session.created >= self.settings.fit_session_max_s:
                self.remove(session.session_id)

    def session(self, session_id: str) -> FitSession:
        """This replica's live session (not marked as used: only progress is). 409 `fit_session_lost` when the
        store knows it but this replica does not hold its accumulators (another replica, or a restart)."""
        self.expire_overdue()
        session = self.sessions.get(session_id, touch=False)
        record = self.store.get_fit(session_id)
        if session is not None and record is None:  # closed on another replica, or expired in the store
            self.sessions.remove(session_id)
            session = None
        if session is not None:
            return session
        if record is not None:
            raise ApiError(409, FIT_SESSION_LOST, f"fit session {session_id[:48]!r} is not held by this replica (its "
                                                  f"encrypted accumulators live in one replica's memory, which "
                                                  f"restarted or is another one); DELETE it and {FIT_REOPEN}")
        raise ApiError(404, "fit_session_not_found", f"fit session {session_id[:48]!r} does not exist on this "
                                                     f"server (it finished, expired or was closed); {FIT_REOPEN}")

    def progressed(self, session: FitSession) -> None:
        """Mark progress: the only thing that keeps a fit session (and its slot) alive."""
        self.sessions.touch(session.session_id)
        self.store.touch_fit(session.session_id, ttl_s=self.settings.fit_session_ttl_s)

    def remove(self, session_id: str) -> bool:
        """Forget a fit session here and in the store; whether it existed in either."""
        held = self.sessions.remove(session_id)
        known = self.store.get_fit(session_id) is not None
        self.store.release_fit(session_id)
        return held or known

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
            session.rows_done += session.plan.rows(part, chunk)
            if session.accumulator.complete:
                replies = session.accumulator.results(session.keys)
                session.results.update({(part, group): blob for group, blob in enumerate(replies)})
                session.part = part + 1
                session.accumulator = (GramAccumulator(session.plan, session.part, self.targets[session.part])
                                       if session.part < len(session.plan.part_rows) else None)
        except ValueError as exc:  # the accumulator refuses bad bytes, and a broken part, with a clear message
            raise input_error(exc) from None
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
        if session.part >= parts and not session.results:
            self.remove(session.session_id)  # every result handed out: the fit is over and its slot is free
        else:
            self.progressed(session)
        return blob
