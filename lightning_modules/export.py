"""Export: fuse the aligner and the target head into one linear layer, and read exports back.

An export directory holds, for each of `fused` (map then head: what the encrypted server
runs), `map` (the aligner alone) and `head` (the classifier alone, for split mode where the
client maps locally):

    NAME.safetensors   tensors `weight` (out, in) and `bias` (out,), float32
    NAME.onnx          one Gemm node: output = input @ weightᵀ + bias

plus `manifest.json` with the source and target states' specs, dimensions, label names,
normalisation, metrics and every file's sha256. The reader (`load_export`) needs only numpy,
safetensors and json, so a server loads an export with no training code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.assets import sha256_file

MANIFEST = "manifest.json"
FORMAT = "xsilo-export"
FORMAT_VERSION = 1
PARTS = ("fused", "map", "head")


class ExportError(ValueError):
    """An export is missing, tampered with or does not match what it is used with."""


# --- reading (numpy only) ---------------------------------------------------------------

@dataclass
class LinearExport:
    """One exported linear layer: logits = x @ weight.T + bias."""

    name: str
    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray  # (out,) float32
    manifest: dict[str, Any]

    @property
    def input_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def output_dim(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not an xsilo export: {MANIFEST} is missing; create one with `xsilo export`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON ({e}); re-run `xsilo export`") from e
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not an xsilo export manifest (format={manifest.get('format')!r})")
    return manifest


def verify_file(directory: Path, manifest: dict[str, Any], filename: str) -> Path:
    record = manifest.get("files", {}).get(filename)
    path = directory / filename
    if record is None:
        raise ExportError(f"{filename} is not listed in {directory / MANIFEST}; re-run `xsilo export`")
    if not path.is_file():
        raise ExportError(f"{path} is missing; re-run `xsilo export`")
    if sha256_file(path) != record["sha256"]:
        raise ExportError(f"{path} does not match its sha256 in {MANIFEST}: the file was modified or "
                          "corrupted; re-run `xsilo export` or restore the original file")
    return path


def load_export(directory: str | Path, name: str = "fused") -> LinearExport:
    """Load one part of an export, checking its checksum and its dimensions against the manifest."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if name not in PARTS:
        raise ExportError(f"unknown export part {name!r}; use one of {PARTS}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = verify_file(directory, manifest, f"{name}.safetensors")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({e}); re-run `xsilo export`") from e
    weight, bias = tensors.get("weight"), tensors.get("bias")
    expected = tuple(manifest["parts"][name]["shape"])
    if weight is None or bias is None or weight.shape != expected or bias.shape != expected[:1]:
        raise ExportError(f"{path} holds shapes {None if weight is None else weight.shape} / "
                          f"{None if bias is None else bias.shape}, but {MANIFEST} says {expected}")
    return LinearExport(name, weight.astype(np.float32), bias.astype(np.float32), manifest)


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
    applies to decrypted logits (`lightning_modules.ood_client.ood_from_logits`).
    """
    from safetensors.numpy import save_file

    from lightning_modules.ood_client import check_ood_manifest

    if ood is not None:
        try:
            check_ood_manifest(ood)
        except ValueError as e:
            raise ExportError(str(e)) from e

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    fused_w, fused_b = fuse(map_weight, map_bias, head_weight, head_bias)
    as32 = lambda t: np.ascontiguousarray(np.asarray(t, dtype=np.float64).astype(np.float32))  # noqa: E731
    parts = {"fused": (as32(fused_w), as32(fused_b)), "map": (as32(map_weight), as32(map_bias)),
             "head": (as32(head_weight), as32(head_bias))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        files = {}
        for name, (w, b) in parts.items():
            save_file({"weight": w, "bias": b}, str(tmp / f"{name}.safetensors"))
            (tmp / f"{name}.onnx").write_bytes(gemm_onnx(w, b).SerializeToString())
            for suffix in (".safetensors", ".onnx"):
                file = tmp / f"{name}{suffix}"
                files[file.name] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoints(aligner_ckpt: str | Path, classifier_ckpt: str | Path, out: str | Path,
                       metrics: dict[str, Any] | None = None, overwrite: bool = False,
                       ood: dict[str, Any] | None = None) -> Path:
    """Fuse a fitted AffineAligner checkpoint with a target LinearClassifier checkpoint.

    `ood` (from `xsilo evaluate_ood`'s ood-threshold.json) must have been calibrated on these
    two checkpoints when it records their sha256.
    """
    from lightning_modules.aligner import AffineAligner
    from lightning_modules.classifier import LinearClassifier

    for path in (aligner_ckpt, classifier_ckpt):
        if not Path(path).is_file():
            raise ExportError(f"checkpoint {path} does not exist")
    for role, path in (("aligner", aligner_ckpt), ("classifier", classifier_ckpt)):
        expected = (ood or {}).get("checkpoints", {}).get(role)
        if expected is not None and sha256_file(Path(path)) != expected:
            raise ExportError(f"the OOD thresholds were calibrated with another {role} than {path}; export the "
                              "checkpoints written by the same `xsilo evaluate_ood` run, or re-run it")
    aligner = AffineAligner.load_from_checkpoint(aligner_ckpt, map_location="cpu")
    head = LinearClassifier.load_from_checkpoint(classifier_ckpt, map_location="cpu")
    if not bool(aligner.fitted):
        raise ExportError(f"{aligner_ckpt} holds an aligner that was never fitted; run `xsilo fit` first")
    target, head_states = aligner.target_spec, head.states_spec
    for key in ("model_identity", "pooling", "layer", "max_length"):
        if target.get(key) is not None and head_states.get(key) is not None and target[key] != head_states[key]:
            raise ExportError(f"the aligner maps into {key}={target[key]!r} states but the classifier was "
                              f"trained on {key}={head_states[key]!r}; train both on the same target states")
    amap, hmap = aligner.affine_map, head.affine_map
    return write_export(out, amap.weight, amap.bias, hmap.weight, hmap.bias, source=aligner.source_spec,
                        target=target, label_names=head.hparams.label_names, metrics=metrics,
                        overwrite=overwrite, ood=ood)
