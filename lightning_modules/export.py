"""Export: fuse the aligner and the target head into one linear layer; write exports and map folders.

An export directory holds, for each of `fused` (map then head: what the encrypted server
runs), `map` (the aligner alone) and `head` (the classifier alone, for split mode where the
client maps locally):

    NAME.safetensors   tensors `weight` (out, in) and `bias` (out,), float32
    NAME.onnx          one Gemm node: output = input @ weightᵀ + bias

plus `manifest.json` with the source and target states' specs, dimensions, label names,
normalisation, metrics and every file's sha256 (`FusedExport.save_pretrained`, `write_export`).
A head export (`write_head_export`, `xsilo head fit`) holds only `head`: a provider's classifier on its own
states, with `"kind": "head"` and, when the provider opts in, a feature-space Mahalanobis detector
(`feature-ood.npz`: class means and shared precision). A map folder is `config.json` + `model.safetensors`
(`write_map_folder`, under `AffineAligner.save_pretrained`). The reader of each (`load_export`,
`LinearExport.from_pretrained`, `load_map_folder`, ...) is `serve.export_format`, re-exported here; it needs no training code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

# The reader lives in serve.export_format (numpy only, no training code): one reader for the server and here.
from serve.export_format import (FORMAT, FORMAT_VERSION, MANIFEST, MAP_CONFIG, MAP_FORMAT,  # noqa: F401
                                 FEATURE_OOD_DETECTOR, MAP_VERSION, MAP_WEIGHTS, PARTS, ExportError, LinearExport,
                                 load_export, load_map_folder, read_manifest, read_map_config, resolve_pretrained,
                                 sha256_file, verify_file)
from serve.public_format import SPEC_KEYS  # what a provider publishes about the states it reads

if TYPE_CHECKING:
    from lightning_modules.aligner import AffineAligner
    from lightning_modules.classifier import LinearClassifier


# --- writing ----------------------------------------------------------------------------

def fuse(map_weight, map_bias, head_weight, head_bias):
    """W_f = W_c·A and b_f = W_c·b_A + b_c (in float64)."""
    import torch

    a, b_a = torch.as_tensor(map_weight, dtype=torch.float64), torch.as_tensor(map_bias, dtype=torch.float64)
    w_c, b_c = torch.as_tensor(head_weight, dtype=torch.float64), torch.as_tensor(head_bias, dtype=torch.float64)
    if w_c.shape[1] != a.shape[0]:
        raise ExportError(f"the head reads {w_c.shape[1]}-d states but the map writes {a.shape[0]}-d ones")
    return w_c @ a, w_c @ b_a + b_c


def gemm_onnx(weight: np.ndarray, bias: np.ndarray, input_name: str = "hidden", output_name: str = "output"):
    """A one-node ONNX graph: output = input @ weightᵀ + bias, any batch size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_dim, in_dim = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", [input_name, "weight", "bias"], [output_name], transB=1)],
        "xsilo_linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_dim])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "weight"),
                     numpy_helper.from_array(bias.astype(np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="xsilo")
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    return model


@contextmanager
def staged_folder(out: Path, replaceable: bool) -> Iterator[Path]:
    """A temp folder beside `out`, renamed onto `out` when the block succeeds and removed when it fails, so
    `out` is never half-written. An existing non-empty `out` is replaced only when `replaceable`."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; choose a folder path for the output")
    if out.exists() and any(out.iterdir()) and not replaceable:
        raise ExportError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{filename: {"sha256", "bytes"}} for every file in `folder` (what the reader verifies)."""
    return {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in sorted(folder.iterdir())}


def _float32(t) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(t, dtype=np.float64).astype(np.float32))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_export(
    out: str | Path,
    map_weight, map_bias, head_weight, head_bias,
    source: dict[str, Any],
    target: dict[str, Any],
    label_names: list[str] | None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    ood: dict[str, Any] | None = None,
) -> Path:
    """Write the three parts and the manifest into `out`, atomically (temp dir, then rename).

    `ood`, when given, is stored as `manifest["ood"]`: the logit detector thresholds a client
    applies to decrypted logits (`serve.ood_client.ood_from_logits`).
    """
    from safetensors.numpy import save_file

    from serve.ood_client import check_ood_manifest

    if ood is not None:
        try:
            check_ood_manifest(ood)
        except ValueError as e:
            raise ExportError(str(e)) from e

    out = Path(out)
    fused_w, fused_b = fuse(map_weight, map_bias, head_weight, head_bias)
    parts = {"fused": (_float32(fused_w), _float32(fused_b)), "map": (_float32(map_weight), _float32(map_bias)),
             "head": (_float32(head_weight), _float32(head_bias))}
    with staged_folder(out, overwrite) as tmp:
        for name, (w, b) in parts.items():
            save_file({"weight": w, "bias": b}, str(tmp / f"{name}.safetensors"))
            (tmp / f"{name}.onnx").write_bytes(gemm_onnx(w, b).SerializeToString())
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": _now(),
            "source": source,
            "target": target,
            "input_dim": int(parts["fused"][0].shape[1]),
            "output_dim": int(parts["fused"][0].shape[0]),
            "target_dim": int(parts["map"][0].shape[0]),
            "label_names": label_names,
            "parts": {name: {"shape": list(w.shape), "safetensors": f"{name}.safetensors", "onnx": f"{name}.onnx"}
                      for name, (w, _) in parts.items()},
            "normalisation": {
                "input": "raw source hidden states, pooled and truncated as in `source`",
                "map": "centering/standardisation folded into the map's weight and bias",
                "head": "the classifier's standardisation folded into the head's weight and bias",
            },
            "metrics": metrics or {},
            **({"ood": ood} if ood is not None else {}),
            "files": file_records(tmp),
        }
        _write_json(tmp / MANIFEST, manifest)
    return out


FEATURE_OOD_FILE = "feature-ood.npz"


def published_spec(spec: dict[str, Any], dim: int, what: str) -> dict[str, Any]:
    """The keys of an extraction spec (`ResolvedExtraction.spec()`) a provider publishes, checked against `dim`."""
    if not isinstance(spec, dict):
        raise ExportError(f"{what} must be an extraction spec (a dict such as ResolvedExtraction.spec()), "
                          f"got {type(spec).__name__}")
    out = {k: spec.get(k) for k in SPEC_KEYS}  # never the provider's local cache path or dataset
    if out["hidden_size"] is None:
        out["hidden_size"] = int(dim)
    if out["hidden_size"] != dim:
        raise ExportError(f"{what} says hidden_size={out['hidden_size']} but the states are {dim}-d; "
                          "pass the spec of the extraction these states came from")
    return out


def _check_feature_ood(ood: dict[str, Any], k: int, d: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(means, precision, threshold, tpr) of a feature-space Mahalanobis detector, shapes and values checked."""
    missing = {"means", "precision", "threshold", "tpr"} - set(ood)
    if missing:
        raise ExportError(f"feature_ood lacks {sorted(missing)}; pass means (k, d), precision (d, d), threshold, tpr")
    means, precision = np.asarray(ood["means"], np.float64), np.asarray(ood["precision"], np.float64)
    if means.shape != (k, d) or precision.shape != (d, d):
        raise ExportError(f"feature_ood needs means ({k}, {d}) and precision ({d}, {d}) for a {k}-class head on "
                          f"{d}-d states, got {means.shape} and {precision.shape}")
    if not (np.isfinite(means).all() and np.isfinite(precision).all()):
        raise ExportError("feature_ood's means or precision hold NaN/inf; refit the detector")
    threshold, tpr = float(ood["threshold"]), float(ood["tpr"])
    if not np.isfinite(threshold) or not 0 < tpr <= 1:
        raise ExportError(f"feature_ood needs a finite threshold and a tpr in (0, 1], got {threshold} and {tpr}")
    return means, precision, threshold, tpr


def write_head_export(
    out: str | Path,
    weight, bias,
    *,
    target: dict[str, Any],
    label_names: list[str] | None,
    metrics: dict[str, Any] | None = None,
    feature_ood: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a head-only export (`kind: head`): the provider's classifier on its own states `target`.

    `feature_ood` ({"means", "precision", "threshold", "tpr"}) adds feature-ood.npz, a shared-covariance
    Mahalanobis detector on those states; it reveals the class means and covariance, so it is opt-in.
    Atomic, like `write_export`; `serve.export_format.load_export(out, "head")` reads it back.
    """
    from safetensors.numpy import save_file

    out = Path(out)
    w, b = _float32(weight), _float32(bias)
    if w.ndim != 2 or b.shape != w.shape[:1]:
        raise ExportError(f"a head needs weight (classes, d) and bias (classes,), got {w.shape} and {b.shape}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ExportError("the head's weight or bias holds NaN/inf; retrain it (check the states)")
    k, d = w.shape
    if label_names is not None and len(label_names) != k:
        raise ExportError(f"the head has {k} outputs but {len(label_names)} label names; pass one name per class")
    spec = published_spec(target, d, "target")
    ood = _check_feature_ood(feature_ood, k, d) if feature_ood is not None else None
    with staged_folder(out, overwrite) as tmp:
        save_file({"weight": w, "bias": b}, str(tmp / "head.safetensors"))
        (tmp / "head.onnx").write_bytes(gemm_onnx(w, b).SerializeToString())
        if ood is not None:
            with open(tmp / FEATURE_OOD_FILE, "wb") as f:
                np.savez(f, means=ood[0], precision=ood[1])
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": "head",
            "created": _now(),
            "source": {},
            "target": spec,
            "input_dim": int(d),
            "output_dim": int(k),
            "target_dim": int(d),
            "label_names": None if label_names is None else [str(s) for s in label_names],
            "parts": {"head": {"shape": [int(k), int(d)], "safetensors": "head.safetensors", "onnx": "head.onnx"}},
            "normalisation": {"input": "raw target hidden states, pooled and truncated as in `target`",
                              "head": "the classifier's standardisation folded into the head's weight and bias"},
            "metrics": metrics or {},
            **({"feature_ood": {"detector": FEATURE_OOD_DETECTOR, "file": FEATURE_OOD_FILE, "threshold": ood[2],
                                "tpr": ood[3]}} if ood is not None else {}),
            "files": file_records(tmp),
        }
        _write_json(tmp / MANIFEST, manifest)
    return out


def write_map_folder(out: str | Path, weight, bias, config: dict[str, Any]) -> Path:
    """Write a map folder: `model.safetensors` (float32 `weight`, `bias`) and `config.json` (`config` plus
    format, version, dims and checksums), atomically. `out` may replace an earlier map folder, never
    another non-empty folder."""
    from safetensors.numpy import save_file

    out = Path(out)
    w, b = _float32(weight), _float32(bias)
    if w.ndim != 2 or b.shape != w.shape[:1]:
        raise ExportError(f"a map needs weight (out, in) and bias (out,), got {w.shape} and {b.shape}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ExportError("the map's weight or bias holds NaN/inf; refit it (a larger ridge λ, or check the states)")
    earlier = (out / MAP_CONFIG).is_file() and _is_map_config(out / MAP_CONFIG)
    if out.exists() and out.is_dir() and any(out.iterdir()) and not earlier:
        raise ExportError(f"{out} holds other files and is not a map folder; save the map into a new or empty folder")
    with staged_folder(out, replaceable=True) as tmp:
        save_file({"weight": w, "bias": b}, str(tmp / MAP_WEIGHTS))
        doc = {"format": MAP_FORMAT, "version": MAP_VERSION, "created": _now(),
               "input_dim": int(w.shape[1]), "output_dim": int(w.shape[0]),
               **{k: v for k, v in config.items() if k not in ("format", "version", "files")},
               "files": file_records(tmp)}
        _write_json(tmp / MAP_CONFIG, doc)
    return out


def _is_map_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == MAP_FORMAT
    except (ValueError, OSError, AttributeError, RecursionError):
        return False


@dataclass
class FusedExport:
    """A map and a target head, with what an export records beside them; `save_pretrained` writes the
    export folder that `LinearExport.from_pretrained` (and `xsilo serve`) read."""

    map_weight: np.ndarray  # (target_dim, input_dim)
    map_bias: np.ndarray
    head_weight: np.ndarray  # (classes, target_dim)
    head_bias: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None
    metrics: dict[str, Any] | None = None
    ood: dict[str, Any] | None = None

    @classmethod
    def from_modules(cls, aligner: "AffineAligner", head: "LinearClassifier", metrics: dict[str, Any] | None = None,
                     ood: dict[str, Any] | None = None, where: str = "the aligner") -> "FusedExport":
        """From a fitted aligner and a classifier trained on the same target states."""
        if not bool(aligner.fitted):
            raise ExportError(f"{where} holds an aligner that was never fitted; run `xsilo fit` first")
        target, head_states = aligner.target_spec, head.states_spec
        for key in ("model_identity", "pooling", "layer", "max_length"):
            if target.get(key) is not None and head_states.get(key) is not None and target[key] != head_states[key]:
                raise ExportError(f"the aligner maps into {key}={target[key]!r} states but the classifier was "
                                  f"trained on {key}={head_states[key]!r}; train both on the same target states")
        amap, hmap = aligner.affine_map, head.affine_map
        return cls(amap.weight.double().numpy(), amap.bias.double().numpy(), hmap.weight.double().numpy(),
                   hmap.bias.double().numpy(), source=aligner.source_spec, target=target,
                   label_names=head.hparams.label_names, metrics=metrics, ood=ood)

    @classmethod
    def from_checkpoints(cls, aligner_ckpt: str | Path, classifier_ckpt: str | Path,
                         metrics: dict[str, Any] | None = None, ood: dict[str, Any] | None = None) -> "FusedExport":
        """From an AffineAligner checkpoint (`*.ckpt`; else a `save_pretrained` map folder or hub id) and a
        LinearClassifier checkpoint.

        `ood` (from `xsilo evaluate_ood`'s ood-threshold.json) must have been calibrated on these two
        checkpoints when it records their sha256.
        """
        from lightning_modules.aligner import AffineAligner
        from lightning_modules.classifier import LinearClassifier

        aligner_is_folder = not (Path(aligner_ckpt).is_file() or str(aligner_ckpt).endswith(".ckpt"))
        for path in ((classifier_ckpt,) if aligner_is_folder else (aligner_ckpt, classifier_ckpt)):
            if not Path(path).is_file():
                raise ExportError(f"checkpoint {path} does not exist")
        for role, path in (("aligner", aligner_ckpt), ("classifier", classifier_ckpt)):
            expected = (ood or {}).get("checkpoints", {}).get(role)
            if expected is not None and (not Path(path).is_file() or sha256_file(Path(path)) != expected):
                raise ExportError(f"the OOD thresholds were calibrated with another {role} than {path}; export the "
                                  "checkpoints written by the same `xsilo evaluate_ood` run, or re-run it")
        aligner = (AffineAligner.from_pretrained(aligner_ckpt) if aligner_is_folder
                   else AffineAligner.load_from_checkpoint(aligner_ckpt, map_location="cpu"))
        head = LinearClassifier.load_from_checkpoint(classifier_ckpt, map_location="cpu")
        return cls.from_modules(aligner, head, metrics, ood, where=str(aligner_ckpt))

    def save_pretrained(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the export folder (fused, map and head parts, manifest.json) atomically."""
        return write_export(out, self.map_weight, self.map_bias, self.head_weight, self.head_bias,
                            source=self.source, target=self.target, label_names=self.label_names,
                            metrics=self.metrics, overwrite=overwrite, ood=self.ood)


def export_checkpoints(aligner_ckpt: str | Path, classifier_ckpt: str | Path, out: str | Path,
                       metrics: dict[str, Any] | None = None, overwrite: bool = False,
                       ood: dict[str, Any] | None = None) -> Path:
    """`xsilo export`: fuse a fitted aligner (checkpoint or map folder) with a target classifier checkpoint."""
    return FusedExport.from_checkpoints(aligner_ckpt, classifier_ckpt, metrics, ood).save_pretrained(out, overwrite)
