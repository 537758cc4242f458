"""What a client knows of the served layer and of its own model: the parsed GET /v1/model entry (`ModelInfo`),
and the checks that its states are the ones the layer reads (the map's target, the encoder's settings and model
identity). The encoder (`datamodules.encoder.StateEncoder`, torch) is imported only when one is built."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from encrypted import ArgmaxSpec, LinearLayout

from .formats.exports import LinearExport
from .http_client import ServeError

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
    argmax: ArgmaxSpec | None = None  # label-only layers: the argmax encoding (None: the layer answers logits)

    @property
    def answers(self) -> str:
        return "logits" if self.argmax is None else "label"

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
                           dict(data.get("limits") or {}), data.get("ood"),
                           argmax=ArgmaxSpec.from_dict(data["argmax"]) if data.get("argmax") else None)
            heads = data.get("heads") or {}
            if head not in heads:
                raise ServeError(f"the server serves no head {head!r}; it serves {sorted(heads)}")
            entry = heads[head]
            return cls(list(entry["label_names"]), int(entry["input_dim"]), int(entry["output_dim"]),
                       dict(client_spec or {}), LinearLayout.from_dict(entry["layout"]), str(entry["sha256"]),
                       dict(data.get("limits") or {}), None, head, dict(entry["target"]),
                       dict(entry["feature_ood"]) if entry.get("feature_ood") else None,
                       ArgmaxSpec.from_dict(entry["argmax"]) if entry.get("argmax") else None)
        except ServeError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ServeError(f"the server's /v1/model answer is not what this client understands ({exc}); "
                             "use a client of the same xsilo version as the server") from None


def check_map(amap: LinearExport, info: ModelInfo, head: str | None) -> None:
    """Refuse a map whose target space is not the head's input space (dimension, provider model)."""
    target = amap.manifest.get("target") or {}
    if amap.output_dim != info.input_dim:
        raise ModelMismatch(f"the aligner maps into {amap.output_dim}-d states but head {head!r} reads "
                            f"{info.input_dim}-d ones; fit the map against this server (xsilo align)")
    for key in SPEC_CHECKED:
        ours, theirs = target.get(key), (info.target or {}).get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise ModelMismatch(f"the aligner's target {key} is {str(ours)[:16]!r} but head {head!r} reads "
                                f"states with {key} {str(theirs)[:16]!r}: the map targets another model; fit "
                                "it against this server (xsilo align)")


def build_encoder(info: ModelInfo, client_model: str | None, threads: int | None, identity_check: str,
                  split: bool) -> Callable[[list[str]], np.ndarray]:
    """A StateEncoder of the client model (`client_model`, else the one `info.client` names) with the server's
    pooling, layer, max_length and dtype, its identity checked (`check_encoder`)."""
    from datamodules.encoder import StateEncoder
    from datamodules.registry import AssetError

    spec = info.client
    model = client_model or spec.get("model")
    if not model:
        where = "the aligner's source spec" if split else "the server"
        raise ServeError(f"{where} does not name the client model; pass client_model= (a local folder)")
    try:
        encoder = StateEncoder(model, pooling=spec.get("pooling"),
                               layer=-1 if spec.get("layer") is None else int(spec["layer"]),
                               max_length=int(spec.get("max_length") or 128), dtype=spec.get("dtype") or "float32",
                               threads=threads)
    except (AssetError, OSError) as exc:
        raise ServeError(f"cannot load the client model {model!r} ({exc}); pass client_model= a local copy of "
                         f"the model the server names ({spec.get('model')!r})") from None
    check_encoder(encoder, info, identity_check)
    return encoder


def check_encoder(encoder: Any, info: ModelInfo, identity_check: str) -> None:
    """Refuse an encoder whose model identity or extraction settings differ from the server's."""
    spec = info.client
    for key in ("pooling", "layer", "max_length"):
        ours, theirs = getattr(encoder, key, None), spec.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise ModelMismatch(f"the encoder uses {key}={ours!r} but the server's layer expects {key}={theirs!r}; "
                                "build it with the settings of /v1/model 'client', or pass no encoder")
    if identity_check == "off" or not hasattr(encoder, "model_path"):
        return
    expected = spec.get("model_identity")
    problem = None
    if not expected:
        problem = "the server publishes no client model identity, so the client model cannot be checked"
    else:
        from datamodules.models import model_identity

        try:
            actual = model_identity(encoder.model_path)
        except Exception as exc:  # e.g. a hub id while offline: the identity is not computable here
            problem = f"the identity of {encoder.model_path} could not be computed ({exc})"
        else:
            if actual != expected:
                message = (f"client model {encoder.model_path} has identity {actual[:16]}, but the server's layer "
                           f"was fitted on states of {spec.get('model')!r} with identity {expected[:16]}: its "
                           "predictions would be meaningless. Pass client_model= the same checkpoint")
                if identity_check == "refuse":
                    raise ModelMismatch(message + " (or identity_check='warn' to go on anyway)")
                problem = message
    if problem:
        warnings.warn(problem, stacklevel=3)
