"""Label-only answers on the server: a masked reply, then the secure argmax (`encrypted.argmax`) run with the client.

`POST /v1/sessions/{id}/label` takes the client's argmax public keys and one query; it answers the circuit-private
CKKS reply of z + r (`EncryptedLinear.apply_masked`) and opens a run holding r. Each `POST /v1/label-runs/{run}`
then answers one message of the argmax, of the exact size its stage expects, until the last one carries the labels.
Runs live in this replica's memory (their Paillier state cannot move): at most `max_label_runs` at once, at most
`label_runs_per_client` per client, each dropped after `label_run_ttl_s` idle seconds or at its first bad message.
Nothing is built from the client's bytes before its keys and query are checked.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from encrypted import PublicKeys, query_rows
from encrypted.argmax_spec import MAX_PUBLIC_BYTES

from .api import ApiError, input_error
from .identity import Identity
from .layers import ServedLayer
from .protocol import LABEL_KEYS_PREFIX_BYTES
from .sessions import SessionStore
from .settings import ServerSettings

if TYPE_CHECKING:  # the secure argmax loads TNO's packages; a server loads them with its first label request
    from encrypted import ArgmaxPublicKeys, ProviderArgmax

def run_not_found(run_id: str) -> ApiError:
    return ApiError(404, "label_run_not_found", f"label run {run_id[:48]!r} does not exist on this replica (it "
                                                "finished, idled out, failed, or another replica holds it); send "
                                                "the query again (POST /v1/sessions/{id}/label)")


@dataclass
class LabelRun:
    session_id: str  # the run's id (`SessionStore` keys what it holds by `session_id`)
    client: str  # the identity that opened it; no other may step it
    argmax: "ProviderArgmax"
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def run_id(self) -> str:
        return self.session_id


class LabelService:
    """The runs of label-only answers on this replica."""

    def __init__(self, settings: ServerSettings, run_cpu: Callable[..., Any]):
        self.settings, self.run_cpu = settings, run_cpu
        self.runs = SessionStore(settings.max_label_runs, settings.label_run_ttl_s, id_prefix="lr-", evict=False)
        self._opening = threading.Lock()

    def max_body(self, served: ServedLayer) -> int:
        return LABEL_KEYS_PREFIX_BYTES + MAX_PUBLIC_BYTES + served.max_query_bytes

    @staticmethod
    def split(body: bytes, served: ServedLayer) -> tuple["ArgmaxPublicKeys", bytes, int]:
        """(the client's argmax keys, its query, the rows the query declares): framing, keys and the query's header
        checked, before anything is charged or evaluated."""
        size = int.from_bytes(body[:LABEL_KEYS_PREFIX_BYTES], "big") if len(body) >= LABEL_KEYS_PREFIX_BYTES else -1
        if not 0 < size <= MAX_PUBLIC_BYTES or len(body) <= LABEL_KEYS_PREFIX_BYTES + size:
            raise ApiError(400, "invalid_label_request", "a label request is a 4-byte big-endian length, the argmax "
                                                         "public keys (ArgmaxKeys.public_bytes()) and one query; see "
                                                         "docs/protocol.md, section 8")
        from encrypted import ArgmaxPublicKeys

        query = bytes(body[LABEL_KEYS_PREFIX_BYTES + size:])
        try:
            keys = ArgmaxPublicKeys.from_bytes(bytes(body[LABEL_KEYS_PREFIX_BYTES:LABEL_KEYS_PREFIX_BYTES + size]))
            rows = query_rows(query, served.layer.layout)
        except ValueError as exc:
            raise input_error(exc) from None
        most = served.argmax.rows_per_query(served.layer.lanes)
        if rows > most:
            raise ApiError(400, "invalid_label_request", f"a label query may declare at most {most} rows for this "
                                                         f"{served.argmax.classes}-class head (each row costs "
                                                         f"{served.argmax.classes - 1} comparisons); send several "
                                                         "queries")
        return keys, query, rows

    def check_room(self, identity: Identity) -> None:
        """503 when this replica holds as many runs as it may, 429 when this client holds its share."""
        runs = self.runs.values()
        if len(runs) >= self.settings.max_label_runs:
            raise ApiError(503, "busy", f"{len(runs)} label-only answers are in progress on this replica; retry "
                                        "shortly", {"Retry-After": "1"})
        mine = sum(run.client == identity.client for run in runs)
        if mine >= self.settings.label_runs_per_client:
            raise ApiError(429, "label_runs_exhausted", f"this client has {mine} label-only answers in progress, the "
                                                        "most it may; finish them (or let them idle out after "
                                                        f"{self.settings.label_run_ttl_s:g} s) first")

    @staticmethod
    def masked(served: ServedLayer, keys: PublicKeys, query: bytes) -> tuple[bytes, Any, int, float]:
        start = time.perf_counter()
        try:
            reply, masks, count = served.layer.apply_masked(query, keys, served.argmax.fraction_bits)
        except ValueError as exc:
            raise input_error(exc) from None
        except RuntimeError:
            raise ApiError(400, "invalid_ciphertext", "the ciphertext could not be evaluated (SEAL refused it); "
                                                      "send the bytes that encrypted.encrypt returns") from None
        return reply, masks, count, (time.perf_counter() - start) * 1000

    async def start(self, served: ServedLayer, keys: PublicKeys, argmax_keys: "ArgmaxPublicKeys", query: bytes,
                    identity: Identity) -> tuple[bytes, str, float]:
        """(masked reply, run id, HE ms) for one label request (`split`) whose rows the caller has charged."""
        from encrypted import ProviderArgmax

        self.check_room(identity)
        reply, masks, count, ms = await self.run_cpu(self.masked, served, keys, query, kind="label")
        with self._opening:  # the room check and the put are one step against concurrent starts
            self.check_room(identity)
            run = LabelRun(self.runs.new_id(), identity.client, ProviderArgmax(argmax_keys, served.argmax,
                                                                               masks[:count]))
            self.runs.put(run)
        return reply, run.run_id, ms

    def run(self, run_id: str, identity: Identity) -> LabelRun:
        run = self.runs.get(run_id)
        if run is None or run.client != identity.client:
            raise run_not_found(run_id)
        return run

    async def step(self, run: LabelRun, body: bytes) -> tuple[bytes, bool, float]:
        """(the provider's message, whether the run is complete, ms) for the client's next message."""
        def handle() -> tuple[bytes, float]:
            start = time.perf_counter()
            if not run.lock.acquire(blocking=False):
                raise ApiError(409, "label_run_busy", "this label run is already answering a message; send each "
                                                      "message after the previous reply")
            try:
                return run.argmax.handle(body), (time.perf_counter() - start) * 1000
            except ValueError as exc:
                self.runs.remove(run.run_id)  # a run that saw a bad message is over
                raise input_error(exc) from None
            finally:
                run.lock.release()
        reply, ms = await self.run_cpu(handle, kind="label")
        if run.argmax.done:
            self.runs.remove(run.run_id)
        return reply, run.argmax.done, ms
