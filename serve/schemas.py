"""The JSON bodies of the server's routes, as pydantic models: what /docs and /openapi.json describe."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ClientSpec(BaseModel):
    """How a state must be extracted so that a layer applies to it (a fused export's client; a head's target)."""
    model: str | None
    model_identity: str | None
    pooling: str | None
    layer: int | None
    max_length: int | None
    dtype: str | None
    hidden_size: int | None


class Limits(BaseModel):
    max_key_bytes: int | None  # the fused export's session body caps; null without one
    max_query_bytes: int | None
    max_sessions: int
    session_ttl_s: float
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    rows_per_session: int | None  # rows (query lanes) answered per session and layer; null: no limit
    rows_per_client: int | None  # per API key (or address when the server has no key) and layer
    max_fit_sessions: int
    fit_session_ttl_s: float
    max_fit_source_dim: int
    fits_per_client: int | None
    max_public_texts: int


class FeatureOodInfo(BaseModel):
    detector: str
    threshold: float
    tpr: float
    sha256: str  # of the npz GET /v1/heads/{name}/feature-ood answers


class HeadInfo(BaseModel):
    label_names: list[str]
    input_dim: int
    output_dim: int
    layout: dict[str, Any]
    rotation_steps: list[int]
    lanes: int
    sha256: str
    target: ClientSpec  # the provider's extraction spec: the states this head reads
    metrics: dict[str, Any]
    feature_ood: FeatureOodInfo | None  # published only when the provider opted in
    answers: str = "logits"  # "label": the argmax class only (POST /v1/sessions/{id}/label)
    argmax: dict[str, int] | None = None  # the label-only encoding (encrypted.argmax.ArgmaxSpec); null for logits
    label_margin: float | None = None  # label mode: top-two logit gaps below it may be answered either way


class AnchorsInfo(BaseModel):
    rows: int
    fingerprint: str


class PublicSetInfo(BaseModel):
    name: str
    rows: int
    fingerprint: str
    val_fraction: float
    seed: int
    parts: dict[str, int]
    model: ClientSpec
    hidden_size: int
    val_logits: bool = False  # GET /v1/public-set/val-logits answers (xsilo serve --publish_val_logits true)
    anchors: AnchorsInfo | None = None  # the fit's third part (GET /v1/public-set/anchors); null: none




class ModelInfo(BaseModel):
    label_names: list[str] | None  # the fused export's fields: null when the server serves none
    input_dim: int | None
    output_dim: int | None
    client: ClientSpec | None
    layout: dict[str, Any] | None
    rotation_steps: list[int] | None
    lanes: int | None
    export_sha256: str | None
    ood: dict[str, Any] | None = None  # calibrated logit-detector thresholds, applied by the client
    limits: Limits
    output_noise: float  # std of the Gaussian noise added to every output (0: exact answers)
    circuit_privacy: int | None  # statistical security (bits) of circuit-private replies; null: off
    answers: str | None = None  # the fused export's: "logits" or "label"; null without one
    argmax: dict[str, int] | None = None  # the fused export's label-only encoding; null for logits
    label_margin: float | None = None  # the fused export's, in label mode
    heads: dict[str, HeadInfo]
    public_set: PublicSetInfo | None


class SessionOpened(BaseModel):
    session_id: str
    session_ttl_s: float
    lanes: int
    head: str | None  # the layer the session is bound to; null: the fused export


class Health(BaseModel):
    status: str
    sessions: int | None  # sessions in the store; null while the store does not answer
    export_sha256: str | None
    heads: list[str]
    public_set: str | None  # its fingerprint
    replica_id: str | None
