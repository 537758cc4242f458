"""What the server serves and how it answers: the layers, the published model info, the sessions, the row budgets
and the bounded pool of worker threads that runs the HE work (`EncryptedService`); the routes are `serve.server`'s.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import anyio
import numpy as np

from encrypted import PublicKeys

from .api import ApiError, input_error
from .budget import QueryBudget
from .fit_service import FitService
from .formats.folders import SPEC_KEYS, ExportError
from .formats.public_states import PublicStates
from .layers import ServedLayer
from .protocol import BUDGET_HEADER, REOPEN_HINT, SESSION_NOT_FOUND
from .sessions import Session, SessionStore
from .settings import ServerSettings


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
