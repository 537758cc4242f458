"""Client of `serve.server`: extract h_A locally, encrypt it, send ciphertexts, decrypt the logits.

The secret key never leaves this process; the server sees public keys and ciphertexts only::

    with Client("http://127.0.0.1:8000") as client:
        results = client.classify(["some text"])  # [{"label", "probabilities", "logits", "timings"}]

Split mode (`Client(url, head="bbc", aligner="aligner/")`): the client maps its own states with its map
(`xsilo align`), encrypts the mapped state, and the server applies only its head `bbc`; the map never leaves
the client. When the head publishes a feature-space detector, `classify` flags mapped states whose
Mahalanobis score is above its threshold.

A Client is not thread-safe: use one per thread. When the server has lost the session (idle expiry,
LRU eviction, a restart, or another replica behind a load balancer), the client re-uploads its public
keys and retries the request once.

Beside it: `serve.client_model` (the parsed /v1/model entry and the checks that the client's states are the ones
the layer reads), `serve.client_ood` (the OOD rule), `serve.http_client` (the HTTP plumbing every client shares)
and `serve.head_client.HeadClient` (one head on the provider's own states, for a private fit's head probe).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import httpx
import numpy as np

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt

from .client_model import ModelInfo, ModelMismatch, build_encoder, check_encoder, check_map
from .client_ood import fetch_feature_detector, ood_flags
from .formats.exports import LinearExport
from .formats.folders import ExportError
from .formats.heads import FeatureOod
from .http_client import Connection, ServeError, ServerReplyError, server_ms
from .protocol import API_PREFIX, SESSION_NOT_FOUND

IdentityCheck = Literal["refuse", "warn", "off"]
OodRule = str | float | Callable[[np.ndarray, np.ndarray], Any]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class Client:
    """Talks to one xsilo encrypted server (or a load balancer in front of replicas), about one layer."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, *,
                 head: str | None = None, aligner: str | Path | None = None,
                 client_model: str | None = None, identity_check: IdentityCheck = "refuse",
                 threads: int | None = None, ood: OodRule | None = None,
                 transport: httpx.BaseTransport | None = None):
        """
        Args:
            url: server base URL, e.g. http://127.0.0.1:8000.
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
        """
        if identity_check not in ("refuse", "warn", "off"):
            raise ValueError(f"identity_check must be 'refuse', 'warn' or 'off', got {identity_check!r}")
        if (head is None) != (aligner is None):
            raise ValueError("split mode needs both head= (the served head) and aligner= (your map folder); pass "
                             "neither for the server's fused export")
        self.connection = Connection(url, api_key, timeout, transport)
        self.url = self.connection.url
        self.head = head
        self.map: LinearExport | None = None
        if aligner is not None:
            try:
                self.map = LinearExport.from_pretrained(aligner, "map")
            except ExportError as exc:
                raise ServeError(f"cannot load the aligner: {exc}") from None
        self.client_model, self.identity_check = client_model, identity_check
        self.threads, self.ood = threads, ood
        self._info: ModelInfo | None = None
        self._feature_ood: FeatureOod | None = None
        self._keys: ClientKeys | None = None
        self._public_bytes = b""
        self.session_id: str | None = None
        self._encoder: Callable[[list[str]], np.ndarray] | None = None
        self._checked_encoders: set[int] = set()
        self.reopened = 0  # sessions re-opened after the server lost one
        self.last_timings: dict[str, float] = {}

    # --- HTTP ---------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        return self.connection.request(method, path, **options)

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

    def open_session(self) -> str:
        """Upload this client's public keys (generated once per Client for the layer's layout)."""
        info = self.model_info()
        if self._keys is None:
            self._keys = ClientKeys.generate(info.layout.profile, info.layout.rotation_steps)
            self._public_bytes = self._keys.public_bytes()
        params = {"head": self.head} if self.head is not None else None
        response = self._request("POST", f"{API_PREFIX}/sessions", content=self._public_bytes, params=params,
                                 expect=(201,))
        self.session_id = str(response.json()["session_id"])
        return self.session_id

    def _reopen(self) -> None:
        """The server lost our session: check it still serves the same layer, then upload the keys again."""
        before = self.model_info()
        after = self.model_info(refresh=True)
        if after.export_sha256 != before.export_sha256 or after.layout != before.layout:
            what = "export" if self.head is None else f"layer under head {self.head!r}"
            raise ServeError(f"the server now serves another {what} (sha256 {after.export_sha256[:16]}, was "
                             f"{before.export_sha256[:16]}); create a new Client for it")
        self.reopened += 1
        self.open_session()

    def _infer_query(self, query: bytes) -> tuple[bytes, float]:
        """One query ciphertext -> (reply bytes, server HE ms); re-opens a lost session once."""
        if self.session_id is None:
            self.open_session()
        for attempt in range(2):
            try:
                response = self._request("POST", f"{API_PREFIX}/sessions/{self.session_id}/infer", content=query)
                break
            except ServerReplyError as exc:
                if exc.status != 404 or exc.code != SESSION_NOT_FOUND or attempt:
                    raise
                self._reopen()
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
        per ciphertext, one request each."""
        info = self.model_info()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] != self.state_dim:
            where = "the aligner's input_dim" if self.map is not None else "the server's input_dim"
            raise ModelMismatch(f"states must have shape (n, {self.state_dim}) with n >= 1 ({where}), got {X.shape}; "
                                "extract them with the model and settings of "
                                + ("the aligner's source" if self.map is not None else "/v1/model 'client'"))
        if self._keys is None:
            self.open_session()
        t0 = time.perf_counter()
        mapped = self.map_states(X)
        tm = time.perf_counter()
        queries = encrypt(self._keys, info.layout, mapped)
        t1 = time.perf_counter()
        replies, total_server_ms = [], 0.0
        for query in queries:
            reply, ms = self._infer_query(query)
            replies.append(reply)
            total_server_ms += ms
        t2 = time.perf_counter()
        logits = decrypt(self._keys, info.layout, replies, X.shape[0])
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

    def classify(self, texts: Sequence[str] | str,
                 encoder: Callable[[list[str]], np.ndarray] | None = None) -> list[dict[str, Any]]:
        """Per text: label, probabilities (by label), logits, ood (and ood_score with a calibrated detector) when
        there is an OOD rule (see `Client`), and the batch's timings in ms (extract, encrypt, http, server,
        decrypt, total)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        if encoder is None:
            encoder = self.encoder
        elif id(encoder) not in self._checked_encoders:
            check_encoder(encoder, self.model_info(), self.identity_check)
            self._checked_encoders.add(id(encoder))
        t0 = time.perf_counter()
        states = np.asarray(encoder(texts))
        extract_ms = (time.perf_counter() - t0) * 1000
        logits = self.infer_states(states)
        timings = {"extract_ms": extract_ms, **self.last_timings}
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        self.last_timings = timings
        labels = self.model_info().label_names
        probabilities = softmax(logits)
        scores, flags = ood_flags(self.ood, self.model_info(), states, logits, probabilities, self.map_states,
                                  self.feature_detector)
        results = []
        for i, (row, p) in enumerate(zip(logits, probabilities)):
            result = {"label": labels[int(np.argmax(row))],
                      "probabilities": {name: float(v) for name, v in zip(labels, p)},
                      "logits": [float(v) for v in row], "timings": timings}
            if flags is not None:
                result["ood"] = bool(flags[i])
            if scores is not None:
                result["ood_score"] = float(scores[i])
            results.append(result)
        return results

    def feature_detector(self) -> FeatureOod:
        """The head's published feature-space detector, fetched once (size bounded, sha256 checked against
        /v1/model, arrays validated)."""
        if self._feature_ood is None:
            self._feature_ood = fetch_feature_detector(self.connection, self.model_info())
        return self._feature_ood

    # --- lifetime -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the session on the server (best effort) and close the connection."""
        if self.session_id is not None:
            try:
                self.connection.http.delete(f"{API_PREFIX}/sessions/{self.session_id}")
            except httpx.HTTPError:
                pass
            self.session_id = None
        self.connection.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


