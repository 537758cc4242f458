"""What the server serves and how it answers: the layers, the published model info, the sessions, the row budgets
and the bounded pool of worker threads that runs the HE work (`EncryptedService`); the routes are `serve.server`'s.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from typing import Any, Callable, Sequence

import anyio
import numpy as np

from encrypted import PublicKeys

from .api import ApiError, input_error
from .budget import Budgets
from .fit_service import FitService
from .formats.folders import SPEC_KEYS, ExportError
from .formats.public_states import PublicStates
from .layers import ServedLayer
from .protocol import BUDGET_HEADER, REOPEN_HINT, SESSION_NOT_FOUND
from .identity import Identity
from .label_service import LabelService
from .sessions import KeyCache
from .settings import ServerSettings, store_url
from .store import SessionRecord, StateStore, open_store


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, SESSION_NOT_FOUND, f"session {session_id[:48]!r} does not exist on this server (it expired, "
                                            f"was evicted, or the server restarted); {REOPEN_HINT}")


class EncryptedService:
    """The served layers, the published model info, the sessions, the budgets and the bounded HE worker pool."""

    def __init__(self, settings: ServerSettings, fused: ServedLayer | None = None,
                 heads: Sequence[ServedLayer] = (), public: PublicStates | None = None):
        if fused is None and not heads and public is None:
            raise ValueError("nothing to serve: pass an export (--export DIR), heads (--heads DIR or "
                             "'[DIR,...]') and/or a public set (--public DIR)")
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
        self.store: StateStore = open_store(store_url(settings))
        self.replica = settings.replica_id or secrets.token_hex(6)
        self.keys = KeyCache(min(settings.max_cached_keys, settings.max_sessions))
        self.budgets = Budgets(self.store, settings)
        self.metrics: Any = None  # serve.observability.ServerMetrics, set by create_app
        self.draining = False  # set on SIGTERM: /readyz answers 503 while in-flight work finishes
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self.pending = 0  # HE jobs running or queued; touched on the event loop only
        self.fit = (FitService(public, settings, self.run_cpu, self.store, self.budgets, self.replica)
                    if public is not None else None)
        self.labels = LabelService(settings, self.run_cpu)
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
            "answers": fused.answers if fused else None,
            "argmax": fused.argmax.to_dict() if fused and fused.argmax else None,
            "label_margin": fused.label_margin if fused else None,
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
        if served.argmax is not None:
            raise ApiError(409, "label_only", f"head {head!r} answers labels only, so its logits are published "
                                              "nowhere, the public val rows included; align without --head")
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

    async def run_cpu(self, fn: Callable[..., Any], *args: Any, kind: str = "other") -> Any:
        """Run CPU-bound work off the event loop, at most `max_concurrency` at a time (its seconds observed as
        `xsilo_he_seconds{kind}`)."""
        if self.pending >= self.settings.max_pending:
            raise ApiError(503, "busy", f"{self.pending} HE requests are already queued; retry shortly",
                           {"Retry-After": "1"})
        self.pending += 1
        start = time.perf_counter()
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self.pending -= 1
            if self.metrics is not None:
                self.metrics.observe_he(kind, time.perf_counter() - start)

    def session_count(self) -> int:
        return self.store.count_sessions()

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
    def accept_keys(served: ServedLayer, body: bytes) -> PublicKeys:
        """`load_keys`, then what answering needs (`EncryptedLinear.check_keys`: a circuit-private layer refuses keys
        without a PUBK, or with one that does not re-randomise): at upload, so a session is never opened only to
        have every query refused."""
        keys = EncryptedService.load_keys(served, body)
        try:
            served.layer.check_keys(keys)
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

    # --- sessions: records and keys in the store, deserialised keys cached per replica -------------------------

    async def open_session(self, served: ServedLayer, body: bytes) -> dict[str, Any]:
        """Check and deserialise uploaded keys, store them as a new session; its POST /v1/sessions answer."""
        keys = await self.run_cpu(self.accept_keys, served, body, kind="session_keys")
        session_id = secrets.token_urlsafe(24)
        record = SessionRecord(session_id, None if served.kind == "fused" else served.name, layer_digest(served),
                               len(body), time.time())
        self.store.put_session(record, body, max_sessions=self.settings.max_sessions,
                               ttl_s=self.settings.session_ttl_s)
        self.keys.put(session_id, keys)
        return {"session_id": session_id, "session_ttl_s": self.settings.session_ttl_s,
                "lanes": served.layer.lanes, "head": record.layer}

    def session(self, session_id: str) -> tuple[SessionRecord, ServedLayer]:
        """The live session (marked as used) and the layer it evaluates; 404 when it is gone, or when the layer it
        was opened for is no longer served as it was (the server restarted with other weights)."""
        record = self.store.get_session(session_id, ttl_s=self.settings.session_ttl_s)
        served = None
        if record is not None:
            served = self.fused if record.layer is None else self.heads.get(record.layer)
        if record is None or served is None or record.layer_sha256 != layer_digest(served):
            self.keys.drop(session_id)
            raise session_not_found(session_id)
        return record, served

    async def session_keys(self, record: SessionRecord, served: ServedLayer) -> PublicKeys:
        """The session's deserialised keys: from this replica's cache, else read back from the store."""
        keys = self.keys.get(record.session_id)
        if keys is None:
            body = self.store.session_keys(record.session_id)
            if body is None:
                raise session_not_found(record.session_id)
            keys = await self.run_cpu(self.load_keys, served, body, kind="session_keys")
            self.keys.put(record.session_id, keys)
        return keys

    def close_session(self, session_id: str) -> None:
        self.keys.drop(session_id)
        if not self.store.delete_session(session_id):
            raise session_not_found(session_id)

    def reserve_rows(self, record: SessionRecord, served: ServedLayer, identity: Identity,
                     rows: int | None = None) -> str:
        """Charge one query's rows (default: every lane, each of which a logits reply answers) to the session and to
        the client on this layer (each layer's W is a separate secret); the remaining budget, for the header.
        Raises a 429 when a budget would be exceeded."""
        rows = served.layer.lanes if rows is None else rows
        refusal, left = self.budgets.charge_rows(record.session_id, identity, budget_layer(served), rows)
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.budget_rejected(refusal.scope)
            raise ApiError(429, "budget_exhausted", refusal.message, {BUDGET_HEADER: "0"})
        return "unlimited" if left is None else str(left)

    def charge_val_rows(self, head: str, identity: Identity, rows: int) -> str:
        """Charge a page of `rows` val logits of head `head` to the client's row budget of that head (the one its
        queries spend: a logit is a row of W h + b, whichever route it leaves by); the remaining budget, for the
        header. Raises a 429 when the page would exceed it (nothing of the page is sent)."""
        layer = budget_layer(self.layer(head))
        if rows <= 0:  # an empty page (offset = rows) answers nothing
            left = self.budgets.client_rows_left(identity, layer)
            return "unlimited" if left is None else str(left)
        refusal, left = self.budgets.charge_client_rows(identity, layer, rows)
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.budget_rejected(refusal.scope)
            raise ApiError(429, "budget_exhausted", refusal.message, {BUDGET_HEADER: "0"})
        return "unlimited" if left is None else str(left)

    def refund_rows(self, record: SessionRecord, served: ServedLayer, identity: Identity,
                    rows: int | None = None) -> None:
        """Give back `rows` (default: a whole query's lanes) of a query that answered fewer or none."""
        self.budgets.refund_rows(record.session_id, identity, budget_layer(served),
                                 served.layer.lanes if rows is None else rows)


def budget_layer(served: ServedLayer) -> str:
    """The budget a layer's rows count against: each head's W is its own secret, named by the head."""
    return "fused" if served.kind == "fused" else f"head:{served.name}"


def layer_digest(served: ServedLayer) -> str:
    """What a session's keys were made for: the layer's weights and its CKKS layout."""
    layout = json.dumps(served.layer.layout.to_dict(), sort_keys=True)
    return hashlib.sha256(f"{served.sha256}|{layout}".encode()).hexdigest()[:32]


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
