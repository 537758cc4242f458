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
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import httpx
import numpy as np

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt

from .export_format import (FEATURE_OOD_DETECTOR, ExportError, FeatureOod, LinearExport, feature_ood_max_bytes,
                            read_feature_ood_npz)
from .http_client import Connection, ServeError, ServerReplyError, reply_error, server_ms  # noqa: F401
from .protocol import API_PREFIX, SESSION_NOT_FOUND

IdentityCheck = Literal["refuse", "warn", "off"]
OodRule = str | float | Callable[[np.ndarray, np.ndarray], Any]
SPEC_CHECKED = ("model_identity", "hidden_size")  # a map's target must equal the head's on these


class ModelMismatch(ServeError):
    """The local client model or its states do not match what the server's layer was fitted on."""


@dataclass(frozen=True)
class ModelInfo:
    """The served layer a Client talks to, parsed from GET /v1/model (the fused export, or one head)."""

    label_names: list[str]
    input_dim: int
    output_dim: int
    client: dict[str, Any]  # how the client extracts its states: model, model_identity, pooling, layer, ...
    layout: LinearLayout
    export_sha256: str
    limits: dict[str, Any]
    ood: dict[str, Any] | None = None  # calibrated thresholds for `serve.ood_client.ood_from_logits`
    head: str | None = None  # split mode: the head's name
    target: dict[str, Any] | None = None  # split mode: the provider's extraction spec the head reads
    feature_ood: dict[str, Any] | None = None  # split mode: {detector, threshold, tpr, sha256} when published

    @classmethod
    def from_json(cls, data: dict[str, Any], head: str | None = None,
                  client_spec: dict[str, Any] | None = None) -> "ModelInfo":
        """The fused export's info (head None), or head `head`'s, whose states come from `client_spec`."""
        try:
            if head is None:
                if data.get("export_sha256") is None:
                    raise ServeError(f"the server serves no fused export, only heads {sorted(data.get('heads') or {})};"
                                     " pass head= and aligner= (split mode)")
                return cls(list(data["label_names"]), int(data["input_dim"]), int(data["output_dim"]),
                           dict(data["client"]), LinearLayout.from_dict(data["layout"]), str(data["export_sha256"]),
                           dict(data.get("limits") or {}), data.get("ood"))
            heads = data.get("heads") or {}
            if head not in heads:
                raise ServeError(f"the server serves no head {head!r}; it serves {sorted(heads)}")
            entry = heads[head]
            return cls(list(entry["label_names"]), int(entry["input_dim"]), int(entry["output_dim"]),
                       dict(client_spec or {}), LinearLayout.from_dict(entry["layout"]), str(entry["sha256"]),
                       dict(data.get("limits") or {}), None, head, dict(entry["target"]),
                       dict(entry["feature_ood"]) if entry.get("feature_ood") else None)
        except ServeError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ServeError(f"the server's /v1/model answer is not what this client understands ({exc}); "
                             "use a client of the same xsilo version as the server") from None


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
                self._check_map(info)
            self._info = info
        return self._info

    def _check_map(self, info: ModelInfo) -> None:
        """Refuse a map whose target space is not the head's input space (dimension, provider model)."""
        amap, target = self.map, self.map.manifest.get("target") or {}
        if amap.output_dim != info.input_dim:
            raise ModelMismatch(f"the aligner maps into {amap.output_dim}-d states but head {self.head!r} reads "
                                f"{info.input_dim}-d ones; fit the map against this server (xsilo align)")
        for key in SPEC_CHECKED:
            ours, theirs = target.get(key), (info.target or {}).get(key)
            if ours is not None and theirs is not None and ours != theirs:
                raise ModelMismatch(f"the aligner's target {key} is {str(ours)[:16]!r} but head {self.head!r} reads "
                                    f"states with {key} {str(theirs)[:16]!r}: the map targets another model; fit "
                                    "it against this server (xsilo align)")

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
            self._encoder = self._build_encoder()
            self._checked_encoders.add(id(self._encoder))
        return self._encoder

    def _build_encoder(self) -> Callable[[list[str]], np.ndarray]:
        from datamodules.assets import AssetError
        from datamodules.extraction import StateEncoder

        spec = self.model_info().client
        model = self.client_model or spec.get("model")
        if not model:
            where = "the aligner's source spec" if self.map is not None else "the server"
            raise ServeError(f"{where} does not name the client model; pass client_model= (a local folder)")
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
        info = self.model_info()
        rule, calibrated = self.ood, info.ood
        if callable(rule):
            flags = np.asarray(rule(states, logits), dtype=bool).reshape(-1)
            if flags.shape != (len(logits),):
                raise ValueError(f"the ood callable must return one flag per text ({len(logits)}), got {flags.shape}")
            return None, flags
        if isinstance(rule, (int, float)) and not isinstance(rule, bool):
            return None, probabilities.max(axis=1) < float(rule)
        if rule == FEATURE_OOD_DETECTOR or (rule is None and info.feature_ood):
            if not info.feature_ood:
                raise ServeError(f"ood={rule!r} needs a feature-space detector, but this server's "
                                 f"{'head' if self.head else 'export'} publishes none; pass a float or a callable")
            from serve.ood_client import mahalanobis_scores

            detector = self.feature_detector()
            scores = mahalanobis_scores(self.map_states(states), detector.means, detector.precision)
            return scores, scores > detector.threshold
        if rule is None and not calibrated:
            return None, None
        if not calibrated:
            raise ServeError(f"ood={rule!r} names a calibrated logit detector, but this server's "
                             f"{'head' if self.head else 'export'} has none; pass a float threshold or a callable")
        from serve.ood_client import ood_from_logits

        try:
            return ood_from_logits(logits, calibrated, detector=rule)
        except ValueError as exc:
            raise ServeError(f"cannot flag OOD inputs: {exc}") from None

    def feature_detector(self) -> FeatureOod:
        """The head's published feature-space detector, fetched once (size bounded, sha256 checked against
        /v1/model, arrays validated)."""
        if self._feature_ood is None:
            info = self.model_info()
            published = info.feature_ood
            if not published or self.head is None:
                raise ServeError("the server publishes no feature-space OOD detector for this layer")
            limit = feature_ood_max_bytes(info.output_dim, info.input_dim)
            data = self._request("GET", f"{API_PREFIX}/heads/{self.head}/feature-ood", max_bytes=limit).content
            if hashlib.sha256(data).hexdigest() != published.get("sha256"):
                raise ServeError("the feature-OOD detector the server sent does not match the sha256 in /v1/model; "
                                 "retry, or ask the operator")
            try:
                means, precision = read_feature_ood_npz(data, info.output_dim, info.input_dim,
                                                        "the server's feature-OOD detector", "ask the operator")
                threshold = float(published["threshold"])
            except (ExportError, KeyError, TypeError, ValueError) as exc:
                raise ServeError(str(exc)) from None
            if not math.isfinite(threshold):
                raise ServeError("the server's feature-OOD threshold is not a finite number")
            self._feature_ood = FeatureOod(means, precision, threshold, float(published.get("tpr") or 0.0), data,
                                           published["sha256"])
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


class HeadClient(Client):
    """Queries one served head on states of the provider's own space (no map): the head-aware λ of a private fit
    probes the head on the directions its maps can reach (`lightning_modules.head_probe`). Each query is an
    ordinary encrypted session query, counted against the server's row budgets."""

    def __init__(self, url: str, head: str, api_key: str | None = None, timeout: float = 60.0, *,
                 transport: httpx.BaseTransport | None = None):
        super().__init__(url, api_key, timeout, transport=transport)
        self.head = head  # no map: `state_dim` is the head's input_dim and `map_states` is the identity
