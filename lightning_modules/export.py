"""Export: fuse the aligner and the target head into one linear layer, and read exports back.

An export directory holds, for each of `fused` (map then head: what the encrypted server
runs), `map` (the aligner alone) and `head` (the classifier alone, for split mode where the
client maps locally):

    NAME.safetensors   tensors `weight` (out, in) and `bias` (out,), float32
    NAME.onnx          one Gemm node: output = input @ weightᵀ + bias

plus `manifest.json` with the source and target states' specs, dimensions, label names,
normalisation, metrics and every file's sha256. The reader (`load_export`, `read_manifest`,
`verify_file`) is `serve.export_format`, re-exported here; it needs no training code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.assets import sha256_file

# The reader lives in serve.export_format (numpy only, no training code): one reader for the server and here.
from serve.export_format import (FORMAT, FORMAT_VERSION, MANIFEST, PARTS, ExportError, LinearExport,  # noqa: F401
                                 load_export, read_manifest, verify_file)


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
