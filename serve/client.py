"""Client of `serve.server`: extract h_A locally, encrypt it, send ciphertexts, decrypt the logits.

The secret key never leaves this process; the server sees public keys and ciphertexts only::

    with Client("http://127.0.0.1:8000") as client:
        results = client.classify(["some text"])  # [{"label", "probabilities", "logits", "timings"}]

A Client is not thread-safe: use one per thread. When the server has lost the session (idle expiry,
LRU eviction, a restart, or another replica behind a load balancer), the client re-uploads its public
keys and retries the request once.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import httpx
import numpy as np

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt

from .protocol import API_PREFIX, OCTET_STREAM, SERVER_TIMING_HEADER, SESSION_NOT_FOUND

IdentityCheck = Literal["refuse", "warn", "off"]
OodRule = str | float | Callable[[np.ndarray, np.ndarray], Any]


class ServeError(Exception):
    """A client-side failure: the server is unreachable, refused a request, or the client setup is wrong."""


class ServerReplyError(ServeError):
    """The server answered with an error ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"server answered {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ModelMismatch(ServeError):
    """The local client model or its states do not match what the server's layer was fitted on."""


@dataclass(frozen=True)
class ModelInfo:
    """GET /v1/model, parsed: what the served layer expects and answers."""

    label_names: list[str]
    input_dim: int
    output_dim: int
    client: dict[str, Any]  # model, model_identity, pooling, layer, max_length, dtype, hidden_size
    layout: LinearLayout
    export_sha256: str
    limits: dict[str, Any]
    ood: dict[str, Any] | None = None  # calibrated thresholds for `serve.ood_client.ood_from_logits`

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelInfo":
        try:
            return cls(list(data["label_names"]), int(data["input_dim"]), int(data["output_dim"]),
                       dict(data["client"]), LinearLayout.from_dict(data["layout"]), str(data["export_sha256"]),
                       dict(data.get("limits") or {}), data.get("ood"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ServeError(f"the server's /v1/model answer is not what this client understands ({exc}); "
                             "use a client of the same xsilo version as the server") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _reply_error(response: httpx.Response) -> ServerReplyError:
    try:
        error = response.json()["error"]
        return ServerReplyError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return ServerReplyError(response.status_code, "http_error",
                                f"HTTP {response.status_code} {response.reason_phrase} from {response.url}")


class Client:
    """Talks to one xsilo encrypted server (or a load balancer in front of replicas)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, *,
                 client_model: str | None = None, identity_check: IdentityCheck = "refuse",
                 threads: int | None = None, ood: OodRule | None = None,
                 transport: httpx.BaseTransport | None = None):
        """
        Args:
            url: server base URL, e.g. http://127.0.0.1:8000.
            api_key: sent as `Authorization: Bearer <key>` when the server requires one.
            timeout: seconds per HTTP request.
            client_model: local folder, registry name or hub id of the client model; default the
                server's `client.model`. Its identity is checked against the server's.
            identity_check: "refuse" (raise ModelMismatch), "warn" or "off" when identities differ.
            threads: torch threads for extraction.
            ood: how `classify` flags out-of-distribution texts. None: the detector calibrated in the export
                (`/v1/model` "ood"), if the server publishes one; a name: another calibrated detector
                (msp, max_logit, energy); a float t: top probability below t; a callable
                (states, logits) -> bool array: any detector on the client's plaintext states.
        """
        if identity_check not in ("refuse", "warn", "off"):
            raise ValueError(f"identity_check must be 'refuse', 'warn' or 'off', got {identity_check!r}")
        self.url = url.rstrip("/")
        # bytes: a non-ASCII key travels as its UTF-8 bytes, which is what the server compares
        headers = {"Authorization": b"Bearer " + api_key.encode("utf-8")} if api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)
        self.client_model, self.identity_check = client_model, identity_check
        self.threads, self.ood = threads, ood
        self._info: ModelInfo | None = None
        self._keys: ClientKeys | None = None
        self._public_bytes = b""
        self.session_id: str | None = None
        self._encoder: Callable[[list[str]], np.ndarray] | None = None
        self._checked_encoders: set[int] = set()
        self.reopened = 0  # sessions re-opened after the server lost one
        self.last_timings: dict[str, float] = {}

    # --- HTTP ---------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, content: bytes | None = None,
                 expect: Sequence[int] = (200,)) -> httpx.Response:
        headers = {"Content-Type": OCTET_STREAM} if content is not None else None
        try:
            response = self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise ServeError(f"cannot reach the server at {self.url} ({type(exc).__name__}: {exc}); "
                             "is `xsilo serve` running there?") from None
        if response.status_code not in expect:
            raise _reply_error(response)
        return response

    def model_info(self, refresh: bool = False) -> ModelInfo:
        if self._info is None or refresh:
            self._info = ModelInfo.from_json(self._request("GET", f"{API_PREFIX}/model").json())
        return self._info

    @property
    def layout(self) -> LinearLayout:
        return self.model_info().layout

    def open_session(self) -> str:
        """Upload this client's public keys (generated once per Client for the server's layout)."""
        info = self.model_info()
        if self._keys is None:
            self._keys = ClientKeys.generate(info.layout.profile, info.layout.rotation_steps)
            self._public_bytes = self._keys.public_bytes()
        response = self._request("POST", f"{API_PREFIX}/sessions", content=self._public_bytes, expect=(201,))
        self.session_id = str(response.json()["session_id"])
        return self.session_id

    def _reopen(self) -> None:
        """The server lost our session: check it still serves the same layer, then upload the keys again."""
        before = self.model_info()
        after = self.model_info(refresh=True)
        if after.export_sha256 != before.export_sha256 or after.layout != before.layout:
            raise ServeError(f"the server now serves another export (sha256 {after.export_sha256[:16]}, was "
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
        server_ms = 0.0
        timing = response.headers.get(SERVER_TIMING_HEADER, "")
        if "dur=" in timing:
            try:
                server_ms = float(timing.split("dur=")[1].split(",")[0].split(";")[0])
            except ValueError:
                pass
        return response.content, server_ms

    # --- inference ----------------------------------------------------------------------------------

    def infer_states(self, X: Any) -> np.ndarray:
        """Logits (n, k) of hidden states X (n, d): packed `lanes` per ciphertext, one request each."""
        info = self.model_info()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] != info.input_dim:
            raise ModelMismatch(f"states must have shape (n, {info.input_dim}) with n >= 1 (the server's input_dim), "
                                f"got {X.shape}; extract them with the model and settings of /v1/model 'client'")
        if self._keys is None:
            self.open_session()
        t0 = time.perf_counter()
        queries = encrypt(self._keys, info.layout, X)
        t1 = time.perf_counter()
        replies, server_ms = [], 0.0
        for query in queries:
            reply, ms = self._infer_query(query)
            replies.append(reply)
            server_ms += ms
        t2 = time.perf_counter()
        logits = decrypt(self._keys, info.layout, replies, X.shape[0])
        t3 = time.perf_counter()
        self.last_timings = {"encrypt_ms": (t1 - t0) * 1000, "http_ms": (t2 - t1) * 1000, "server_ms": server_ms,
                             "decrypt_ms": (t3 - t2) * 1000, "ciphertexts": len(queries)}
        return logits

    @property
    def encoder(self) -> Callable[[list[str]], np.ndarray]:
        """A StateEncoder with the server's pooling, layer, max_length and dtype (loaded on first use)."""
        if self._encoder is None:
            self._encoder = self._build_encoder()
            self._checked_encoders.add(id(self._encoder))
        return self._encoder

    def _build_encoder(self) -> Callable[[list[str]], np.ndarray]:
        from datamodules.assets import AssetError
        from datamodules.extraction import StateEncoder

        spec = self.model_info().client
        model = self.client_model or spec.get("model")
        if not model:
            raise ServeError("the server does not name its client model; pass client_model= (a local folder)")
        try:
            encoder = StateEncoder(model, pooling=spec.get("pooling"),
                                   layer=-1 if spec.get("layer") is None else int(spec["layer"]),
                                   max_length=int(spec.get("max_length") or 128), dtype=spec.get("dtype") or "float32",
                                   threads=self.threads)
        except (AssetError, OSError) as exc:
            raise ServeError(f"cannot load the client model {model!r} ({exc}); pass client_model= a local copy of "
                             f"the model the server names ({spec.get('model')!r})") from None
        self._check_encoder(encoder)
        return encoder

    def _check_encoder(self, encoder: Any) -> None:
        """Refuse an encoder whose model identity or extraction settings differ from the server's."""
        info = self.model_info()
        spec = info.client
        for key in ("pooling", "layer", "max_length"):
            ours, theirs = getattr(encoder, key, None), spec.get(key)
            if ours is not None and theirs is not None and ours != theirs:
                raise ModelMismatch(f"the encoder uses {key}={ours!r} but the server's layer expects {key}={theirs!r}; "
                                    "build it with the settings of /v1/model 'client', or pass no encoder")
        if self.identity_check == "off" or not hasattr(encoder, "model_path"):
            return
        expected = spec.get("model_identity")
        problem = None
        if not expected:
            problem = "the server publishes no client model identity, so the client model cannot be checked"
        else:
            from datamodules.extraction import model_identity

            try:
                actual = model_identity(encoder.model_path)
            except Exception as exc:  # e.g. a hub id while offline: the identity is not computable here
                problem = f"the identity of {encoder.model_path} could not be computed ({exc})"
            else:
                if actual != expected:
                    message = (f"client model {encoder.model_path} has identity {actual[:16]}, but the server's layer "
                               f"was fitted on states of {spec.get('model')!r} with identity {expected[:16]}: its "
                               "predictions would be meaningless. Pass client_model= the same checkpoint")
                    if self.identity_check == "refuse":
                        raise ModelMismatch(message + " (or identity_check='warn' to go on anyway)")
                    problem = message
        if problem:
            warnings.warn(problem, stacklevel=3)

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
            self._check_encoder(encoder)
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
        scores, flags = self._ood_flags(states, logits, probabilities)
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

    def _ood_flags(self, states: np.ndarray, logits: np.ndarray,
                   probabilities: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(scores or None, flags or None) under this client's OOD rule."""
        rule, calibrated = self.ood, self.model_info().ood
        if callable(rule):
            flags = np.asarray(rule(states, logits), dtype=bool).reshape(-1)
            if flags.shape != (len(logits),):
                raise ValueError(f"the ood callable must return one flag per text ({len(logits)}), got {flags.shape}")
            return None, flags
        if isinstance(rule, (int, float)) and not isinstance(rule, bool):
            return None, probabilities.max(axis=1) < float(rule)
        if rule is None and not calibrated:
            return None, None
        if not calibrated:
            raise ServeError(f"ood={rule!r} names a calibrated detector, but this server's export has none; "
                             "pass a float threshold or a callable")
        from serve.ood_client import ood_from_logits

        try:
            return ood_from_logits(logits, calibrated, detector=rule)
        except ValueError as exc:
            raise ServeError(f"cannot flag OOD inputs: {exc}") from None

    # --- lifetime -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the session on the server (best effort) and close the connection."""
        if self.session_id is not None:
            try:
                self._http.delete(f"{API_PREFIX}/sessions/{self.session_id}")
            except httpx.HTTPError:
                pass
            self.session_id = None
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
