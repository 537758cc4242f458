"""Client of `serve.server`: extract h_A locally, encrypt it, send ciphertexts, decrypt the logits.

The secret key never leaves this machine; the server sees public keys and ciphertexts only. An application holds
one Client: it loads the model once, opens the session once, and classifies texts in batches::

    from serve import Client

    client = Client(server="http://127.0.0.1:8000", aligner="aligner/", head="bbc")
    client.classify(["some text", ...])  # [{"label", "probabilities", "logits", "ood", "timings"}, ...]

Split mode (`head=` and `aligner=`): the client maps its own states with its map (`xsilo align`), encrypts the
mapped state, and the server applies only its head; the map never leaves the client. Without them the server's
fused export is queried. When the head publishes a feature-space detector, `classify` flags mapped states whose
Mahalanobis score is above its threshold.

The session lasts (`cache=True`, `serve.client_cache`): keys, the session id and the published detector are kept
under $XSILO_HOME per server and layer, so the next process uploads no keys and fetches no detector. When the
server has lost the session (idle expiry, eviction, a restart, another replica), the client re-opens it with the
same keys and retries once; refused or reset connections and 503 answers are retried with backoff
(`serve.http_client.Retry`). A Client is not thread-safe: use one per thread.

Beside it: `serve.client_model` (the parsed /v1/model entry and the checks that the client's states are the ones
the layer reads), `serve.client_ood` (the OOD rule), `serve.http_client` (HTTP, typed errors, retries, traffic)
and `serve.head_client.HeadClient` (one head on the provider's own states, for a private fit's head probe).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import httpx
import numpy as np

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt

from .client_cache import ClientCacheError, SessionCache, SessionEntry
from .client_label import LabelOnly, default_keys_path, label_only_error, label_query, load_or_make_keys
from .client_model import ModelInfo, ModelMismatch, build_encoder, check_encoder, check_map
from .client_ood import fetch_feature_detector, ood_flags
from .formats.exports import LinearExport
from .formats.folders import ExportError
from .formats.heads import FeatureOod
from .http_client import (NO_RETRY, BudgetExhausted, Connection, Retry, ServeError, ServerBusy, ServerReplyError,
                          ServerUnreachable, SessionLost, Traffic, Unauthorized, server_ms)
from .protocol import API_PREFIX

if TYPE_CHECKING:
    from encrypted import ArgmaxKeys

__all__ = ["BudgetExhausted", "Client", "ClientCacheError", "LabelOnly", "ModelMismatch", "ServeError", "ServerBusy",
           "ServerReplyError", "ServerUnreachable", "SessionLost", "Unauthorized", "softmax"]

IdentityCheck = Literal["refuse", "warn", "off"]
OodRule = str | float | Callable[[np.ndarray, np.ndarray], Any]
STAGES = ("extract_ms", "map_ms", "encrypt_ms", "http_ms", "server_ms", "decrypt_ms", "total_ms")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class Client:
    """Talks to one xsilo encrypted server (or a load balancer in front of replicas), about one layer."""

    def __init__(self, server: str, api_key: str | None = None, timeout: float = 60.0, *,
                 head: str | None = None, aligner: str | Path | None = None,
                 client_model: str | None = None, identity_check: IdentityCheck = "refuse",
                 threads: int | None = None, ood: OodRule | None = None, cache: bool | str | Path = True,
                 retry: Retry = Retry(), traffic: Traffic | None = None,
                 transport: httpx.BaseTransport | None = None, argmax_keys: "ArgmaxKeys | str | Path | None" = None):
        """
        Args:
            server: the server's base URL, e.g. http://127.0.0.1:8000 (or a load balancer's).
            api_key: sent as `Authorization: Bearer <key>` when the server requires one.
            timeout: seconds per HTTP request.
            head: split mode: the served head to query (GET /v1/model "heads"); needs `aligner`.
            aligner: split mode: the client's map folder (`xsilo align --out`, `save_pretrained`) or hub id. Its
                source spec says how this client extracts its states; its target must be the head's.
            client_model: local folder, registry name or hub id of the client model; default the
                server's `client.model` (split mode: the map's source model). Its identity is checked.
            identity_check: "refuse" (raise ModelMismatch), "warn" or "off" when identities differ.
            threads: torch threads for extraction.
            ood: how `classify` flags out-of-distribution texts. None: the detector the server publishes, if any
                (a fused export's calibrated logit detector; a head's feature-space Mahalanobis detector on the
                mapped states); a name: another calibrated logit detector (msp, max_logit, energy) or
                "mahalanobis"; a float t: top probability below t; a callable (states, logits) -> bool array:
                any detector on the client's plaintext states.
            cache: keep keys, session and the published detector across processes (True: under
                $XSILO_HOME/client/sessions; a folder: there; False: a fresh session per Client, deleted on close).
            retry: how transient failures (refused or reset connections, 503) are retried.
            traffic: a `Traffic` to count this client's bytes and requests in (shared with other clients).
            argmax_keys: for layers that answer labels only: this client's Paillier/DGK keys, or the file that
                holds them (default $XSILO_HOME/client/argmax-keys.json, made on first use, about a minute).
        """
        if identity_check not in ("refuse", "warn", "off"):
            raise ValueError(f"identity_check must be 'refuse', 'warn' or 'off', got {identity_check!r}")
        if (head is None) != (aligner is None):
            raise ValueError("split mode needs both head= (the served head) and aligner= (your map folder); pass "
                             "neither for the server's fused export")
        self.connection = Connection(server, api_key, timeout, transport, traffic=traffic, retry=retry)
        self.url, self.api_key, self.head = self.connection.url, api_key, head
        self.map: LinearExport | None = None
        if aligner is not None:
            try:
                self.map = LinearExport.from_pretrained(aligner, "map")
            except ExportError as exc:
                raise ServeError(f"cannot load the aligner: {exc}") from None
        self.client_model, self.identity_check = client_model, identity_check
        self.threads, self.ood = threads, ood
        self.cache = (None if cache is False else SessionCache(None if cache is True else cache))
        self._entry: SessionEntry | None = None
        self._info: ModelInfo | None = None
        self._feature_ood: FeatureOod | None = None
        self._keys: ClientKeys | None = None
        self.session_id: str | None = None
        self._encoder: Callable[[list[str]], np.ndarray] | None = None
        self._checked_encoders: set[int] = set()
        self.reopened = 0  # sessions re-opened (or taken over from another process) after the server lost one
        self.keys_uploaded = 0  # public key uploads by this Client (0 when a cached session was reused)
        self.session_reused = False  # the session came from the cache
        self.last_timings: dict[str, float] = {}
        self._argmax_keys = argmax_keys

    @property
    def traffic(self) -> Traffic:
        return self.connection.traffic

    # --- the served layer ---------------------------------------------------------------------------

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served layer this client queries: the fused export, or in split mode the head (its target spec
        checked against the map's)."""
        if self._info is None or refresh:
            data = self.connection.json("GET", f"{API_PREFIX}/model")
            if not isinstance(data, dict):
                raise ServeError("the server's /v1/model answer is not a JSON object; is it an xsilo server?")
            source = dict(self.map.manifest.get("source") or {}) if self.map is not None else None
            info = ModelInfo.from_json(data, self.head, source)
            if self.map is not None:
                check_map(self.map, info, self.head)
            self._info = info
        return self._info

    @property
    def layout(self) -> LinearLayout:
        return self.model_info().layout

    # --- the session --------------------------------------------------------------------------------

    def cache_entry(self) -> SessionEntry | None:
        """This server's and layer's entry of the session cache (None with cache=False)."""
        if self.cache is not None and self._entry is None:
            info = self.model_info()
            self._entry = self.cache.entry(self.url, self.api_key, self.head, info.export_sha256, info.layout)
        return self._entry

    def _load_or_make_keys(self, entry: SessionEntry | None) -> ClientKeys:
        if self._keys is None:
            layout = self.model_info().layout
            self._keys = entry.load_keys(layout) if entry is not None else None
            if self._keys is None:
                self._keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
                if entry is not None:
                    entry.save_keys(self._keys)  # on disk (0600) before anything is sent
                    entry.save_session(None)
        return self._keys

    def _upload_keys(self) -> str:
        params = {"head": self.head} if self.head is not None else None
        response = self.connection.request("POST", f"{API_PREFIX}/sessions", content=self._keys.public_bytes(),
                                           params=params, expect=(201,))
        try:
            opened = response.json()
            self.session_id = str(opened["session_id"])
        except (ValueError, KeyError, TypeError):
            raise ServeError("the server's session answer has no session_id; is it an xsilo server?") from None
        self.keys_uploaded += 1
        if self._entry is not None:
            ttl = opened.get("session_ttl_s")
            self._entry.save_session(self.session_id, float(ttl) if isinstance(ttl, (int, float)) else None)
        return self.session_id

    def open_session(self) -> str:
        """Upload this client's public keys: a new session (the cached keys are reused; new ones are made once)."""
        entry = self.cache_entry()
        if entry is None:
            self._load_or_make_keys(None)
            return self._upload_keys()
        with entry.locked():
            self._load_or_make_keys(entry)
            return self._upload_keys()

    def ensure_session(self) -> str:
        """The session to query: this Client's, else the cached one (no upload), else a new one."""
        if self.session_id is not None:
            return self.session_id
        entry = self.cache_entry()
        if entry is None:
            return self.open_session()
        with entry.locked():
            self._load_or_make_keys(entry)
            if entry.session_id is not None:
                self.session_id, self.session_reused = entry.session_id, True
                return self.session_id
            return self._upload_keys()

    def _reopen(self, lost: str | None) -> None:
        """The server lost session `lost`: check it still serves the same layer, then take over a session another
        process already re-opened, or upload the keys again."""
        before = self.model_info()
        after = self.model_info(refresh=True)
        if after.export_sha256 != before.export_sha256 or after.layout != before.layout:
            what = "export" if self.head is None else f"layer under head {self.head!r}"
            raise ServeError(f"the server now serves another {what} (sha256 {after.export_sha256[:16]}, was "
                             f"{before.export_sha256[:16]}); create a new Client for it")
        self.reopened += 1
        entry = self.cache_entry()
        if entry is None:
            self._upload_keys()
            return
        with entry.locked():
            if entry.session_id is not None and entry.session_id != lost:
                self.session_id = entry.session_id  # another process re-opened it meanwhile
            else:
                self._upload_keys()

    def _session_call(self, call: Callable[[str], Any], rows: int | None = None) -> Any:
        """`call(session id)` for one query; re-opens a lost session once. Counts its charged rows (default: lanes)."""
        self.ensure_session()
        for attempt in range(2):
            try:
                result = call(self.session_id)
                break
            except SessionLost:
                if attempt:
                    raise
                self._reopen(self.session_id)
        self.traffic.rows_charged += self.model_info().layout.lanes if rows is None else rows
        if self._entry is not None and time.time() - float(self._entry.meta.get("used") or 0) > 60:
            self._entry.touch()
        return result

    def _infer_query(self, query: bytes) -> tuple[bytes, float]:
        """One query ciphertext -> (reply bytes, server HE ms); re-opens a lost session once."""
        response = self._session_call(lambda session: self.connection.request(
            "POST", f"{API_PREFIX}/sessions/{session}/infer", content=query))
        return response.content, server_ms(response)

    # --- inference ----------------------------------------------------------------------------------

    @property
    def state_dim(self) -> int:
        """The dimension of the client's own states: the map's input in split mode, else the layer's input."""
        return self.map.input_dim if self.map is not None else self.model_info().input_dim

    def map_states(self, X: Any) -> np.ndarray:
        """The states the served layer reads: X itself, or in split mode X mapped by the client's map."""
        X = np.asarray(X, dtype=np.float64)
        if self.map is None:
            return X
        return X @ self.map.weight.T.astype(np.float64) + self.map.bias.astype(np.float64)

    def infer_states(self, X: Any) -> np.ndarray:
        """Logits (n, k) of the client's hidden states X (n, d): mapped first in split mode, then packed `lanes`
        per ciphertext, one request each. A layer that answers labels only raises LabelOnly (use `label_states`)."""
        if self.model_info().argmax is not None:
            raise label_only_error("infer_states")
        return self._run_states(X, label=False)

    def label_states(self, X: Any) -> np.ndarray:
        """Class indices (n,) of the client's hidden states X (n, d), in either mode: a label-only layer runs the
        secure argmax for each query (the client learns the class, nothing else of the logits); a logits layer's
        argmax is taken here."""
        if self.model_info().argmax is None:
            return np.argmax(self._run_states(X, label=False), axis=1)
        return self._run_states(X, label=True)

    def argmax_keys(self) -> "ArgmaxKeys":
        """This client's argmax keys (see `argmax_keys` in the constructor), loaded or made once."""
        if self._argmax_keys is None or isinstance(self._argmax_keys, (str, Path)):
            self._argmax_keys = load_or_make_keys(Path(self._argmax_keys or default_keys_path()))
        return self._argmax_keys

    def _run_states(self, X: Any, label: bool) -> np.ndarray:
        info = self.model_info()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] != self.state_dim:
            where = "the aligner's input_dim" if self.map is not None else "the server's input_dim"
            raise ModelMismatch(f"states must have shape (n, {self.state_dim}) with n >= 1 ({where}), got {X.shape}; "
                                "extract them with the model and settings of "
                                + ("the aligner's source" if self.map is not None else "/v1/model 'client'"))
        self.ensure_session()
        t0 = time.perf_counter()
        mapped = self.map_states(X)
        tm = time.perf_counter()
        rows_per_query = info.argmax.rows_per_query(info.layout.lanes) if label else info.layout.lanes
        queries = [blob for start in range(0, len(mapped), rows_per_query)
                   for blob in encrypt(self._keys, info.layout, mapped[start:start + rows_per_query])]
        t1 = time.perf_counter()
        replies, total_server_ms = [], 0.0
        for index, query in enumerate(queries):
            if label:  # the rows this query declares, each answered by the secure argmax
                rows = min(rows_per_query, X.shape[0] - index * rows_per_query)
                reply, ms = self._session_call(lambda session: label_query(
                    self.connection, session, self._keys, info.layout, info.argmax, self.argmax_keys(), query, rows),
                    rows)
            else:
                reply, ms = self._infer_query(query)
            replies.append(reply)
            total_server_ms += ms
        t2 = time.perf_counter()
        logits = np.concatenate(replies) if label else decrypt(self._keys, info.layout, replies, X.shape[0])
        t3 = time.perf_counter()
        self.last_timings = {"map_ms": (tm - t0) * 1000, "encrypt_ms": (t1 - tm) * 1000, "http_ms": (t2 - t1) * 1000,
                             "server_ms": total_server_ms, "decrypt_ms": (t3 - t2) * 1000, "ciphertexts": len(queries)}
        return logits

    @property
    def encoder(self) -> Callable[[list[str]], np.ndarray]:
        """A StateEncoder with the server's pooling, layer, max_length and dtype (loaded on first use)."""
        if self._encoder is None:
            self._encoder = build_encoder(self.model_info(), self.client_model, self.threads, self.identity_check,
                                          split=self.map is not None)
            self._checked_encoders.add(id(self._encoder))
        return self._encoder

    def batch_rows(self, batch_size: int | None = None) -> int:
        """Rows per batch: `batch_size` rounded up to whole ciphertexts (default 16 rows, rounded the same way)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive number of rows, got {batch_size!r}")
        lanes = max(self.layout.lanes, 1)
        return -(-(batch_size or 16) // lanes) * lanes

    def classify(self, texts: Sequence[str] | str, encoder: Callable[[list[str]], np.ndarray] | None = None,
                 batch_size: int | None = None) -> list[dict[str, Any]]:
        """Per text: label, probabilities (by label), logits, ood (and ood_score with a calibrated detector) when
        there is an OOD rule (see `Client`), and the timings in ms of the batch it was sent in (extract, map,
        encrypt, http, server, decrypt, total; and its rows and ciphertexts). All texts are one batch unless
        `batch_size` is given (then batches of that many rows, rounded up to whole ciphertexts)."""
        texts = self._texts(texts)
        results: list[dict[str, Any]] = []
        totals: dict[str, float] = {}
        for batch in self.classify_batches(texts, encoder, batch_size or len(texts)):
            results += batch
            for key, value in batch[0]["timings"].items():
                totals[key] = totals.get(key, 0) + value
        self.last_timings = totals
        return results

    @staticmethod
    def _texts(texts: Sequence[str] | str) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        return texts

    def classify_batches(self, texts: Sequence[str] | str, encoder: Callable[[list[str]], np.ndarray] | None = None,
                         batch_size: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """`classify`, one batch at a time (batches of `batch_size` rows rounded up to whole ciphertexts; default
        16): each batch's results as soon as they are decrypted, for a stream of answers."""
        texts = self._texts(texts)
        if encoder is None:
            encoder = self.encoder
        elif id(encoder) not in self._checked_encoders:
            check_encoder(encoder, self.model_info(), self.identity_check)
            self._checked_encoders.add(id(encoder))
        rows = self.batch_rows(batch_size)
        for start in range(0, len(texts), rows):
            yield self._classify_batch(texts[start:start + rows], encoder)

    def _classify_batch(self, texts: list[str], encoder: Callable[[list[str]], np.ndarray]) -> list[dict[str, Any]]:
        """Per text: the label, with probabilities and logits from a logits layer, and the OOD flags."""
        t0 = time.perf_counter()
        states = np.asarray(encoder(texts))
        extract_ms = (time.perf_counter() - t0) * 1000
        info = self.model_info()
        logits = probabilities = None
        if info.argmax is None:
            logits = self.infer_states(states)
            probabilities = softmax(logits)
            indices = np.argmax(logits, axis=1)
        elif isinstance(self.ood, (int, float)) or (isinstance(self.ood, str) and self.ood != "mahalanobis"):
            raise label_only_error(f"ood={self.ood!r}")
        else:
            indices = self.label_states(states)
        scores, flags = ood_flags(self.ood, info, states, logits, probabilities, self.map_states,
                                  self.feature_detector)
        timings = {"extract_ms": extract_ms, **self.last_timings, "total_ms": (time.perf_counter() - t0) * 1000,
                   "rows": len(texts)}
        self.last_timings = timings
        results = []
        for i, index in enumerate(indices):
            result: dict[str, Any] = {"label": info.label_names[int(index)], "timings": timings}
            if logits is not None and probabilities is not None:
                result["probabilities"] = {name: float(v) for name, v in zip(info.label_names, probabilities[i])}
                result["logits"] = [float(v) for v in logits[i]]
            if flags is not None:
                result["ood"] = bool(flags[i])
            if scores is not None:
                result["ood_score"] = float(scores[i])
            results.append(result)
        return results

    def feature_detector(self) -> FeatureOod:
        """The head's published feature-space detector: from the session cache when its sha256 is the one
        /v1/model publishes, else fetched once (size bounded, sha256 checked, arrays validated) and cached."""
        if self._feature_ood is None:
            entry = self.cache_entry()
            published = (self.model_info().feature_ood or {}).get("sha256")
            cached = entry.detector(published) if entry is not None and isinstance(published, str) else None
            self._feature_ood = fetch_feature_detector(self.connection, self.model_info(), cached)
            if entry is not None and cached is None:
                entry.save_detector(self._feature_ood.data)
        return self._feature_ood

    # --- lifetime -----------------------------------------------------------------------------------

    def forget(self) -> None:
        """Delete the session on the server (best effort) and this layer's entry of the session cache."""
        self._delete_session()
        if self._entry is not None:
            self._entry.clear()

    def _delete_session(self) -> None:
        if self.session_id is not None:
            try:
                self.connection.request("DELETE", f"{API_PREFIX}/sessions/{self.session_id}", expect=(204, 404),
                                        retry=NO_RETRY)
            except ServeError:
                pass  # it expires on the server anyway
            self.session_id = None

    def close(self) -> None:
        """Close the connection. A cached session stays open on the server for the next process (it expires when
        idle); without the cache it is deleted (best effort)."""
        if self._entry is None:
            self._delete_session()
        self.connection.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
