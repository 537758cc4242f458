"""Export: fuse a fitted aligner and a target head into one linear layer and write the export folder.

An export directory holds, for each of `fused` (map then head: what the encrypted server
runs), `map` (the aligner alone) and `head` (the classifier alone, for split mode where the
client maps locally), `NAME.safetensors` and `NAME.onnx`, plus `manifest.json`: the format is
`serve.formats.exports` (reader and writer, numpy only). This module adds the fusion (torch) and the
LightningModules' side: `FusedExport.from_modules` / `from_checkpoints` and `xsilo export` (`export_checkpoints`).
Head exports are `serve.formats.heads`'; map folders `serve.formats.maps`' (`AffineMap.save_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.models.aligner import AffineAligner
from lightning_modules.models.classifier import LinearClassifier
from serve.formats.digests import sha256_file
from serve.formats.exports import ExportConfig
from serve.formats.exports import write_export as write_export_folder
from serve.formats.folders import ExportError


# --- writing ----------------------------------------------------------------------------

def fuse(map_weight, map_bias, head_weight, head_bias):
    """W_f = W_c·A and b_f = W_c·b_A + b_c (in float64)."""
    import torch

    a, b_a = torch.as_tensor(map_weight, dtype=torch.float64), torch.as_tensor(map_bias, dtype=torch.float64)
    w_c, b_c = torch.as_tensor(head_weight, dtype=torch.float64), torch.as_tensor(head_bias, dtype=torch.float64)
    if w_c.shape[1] != a.shape[0]:
        raise ExportError(f"the head reads {w_c.shape[1]}-d states but the map writes {a.shape[0]}-d ones")
    return w_c @ a, w_c @ b_a + b_c


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
    """Fuse map and head and write the three parts and the manifest into `out`, atomically
    (`serve.formats.exports.write_export`).

    `ood`, when given, is stored as `manifest["ood"]`: the logit detector thresholds a client
    applies to decrypted logits (`serve.ood_client.ood_from_logits`).
    """
    fused_w, fused_b = fuse(map_weight, map_bias, head_weight, head_bias)
    parts = {"fused": (fused_w, fused_b), "map": (map_weight, map_bias), "head": (head_weight, head_bias)}
    return write_export_folder(out, parts, ExportConfig(source, target, label_names, metrics or {}, ood), overwrite)


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
    def from_modules(cls, aligner: AffineAligner, head: LinearClassifier, metrics: dict[str, Any] | None = None,
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
