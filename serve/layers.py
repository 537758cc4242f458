"""The layers a server evaluates under encryption: a fused export (map and head) and any number of named heads.

Each is read by `serve.formats.exports` (checksums and shapes checked) and laid out for CKKS once, at start-up.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encrypted import (DEFAULT_PROFILE, N8192_LABEL, N8192_PRIVATE, ArgmaxSpec, EncryptedError, EncryptedLinear,
                       public_bytes_max, query_max_bytes)

from .formats.exports import check_ood_manifest, load_export, read_manifest
from .formats.folders import HEAD_KIND, SPEC_KEYS, ExportError
from .formats.heads import FeatureOod
from .settings import answers_for

OOD_KEYS = ("detector", "threshold", "tpr", "all")  # what a client needs to flag OOD inputs from its logits
HEAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LABEL_PRIVACY = 30  # a label-only layer's circuit privacy when --circuit_privacy is unset


@dataclass
class ServedLayer:
    """One layer with what the server publishes about it and the body caps of its sessions."""

    name: str  # the head's folder name, or "fused"
    kind: str  # "fused" or "head"
    layer: EncryptedLinear
    manifest: dict[str, Any]
    sha256: str  # of the layer's safetensors file
    feature_ood: FeatureOod | None
    max_key_bytes: int
    max_query_bytes: int
    argmax: ArgmaxSpec | None = None  # label-only answers (None: logits)

    @property
    def answers(self) -> str:
        return "logits" if self.argmax is None else "label"

    @property
    def label_margin(self) -> float | None:
        """Top-two logit gaps below this may be answered either way in label mode: six standard deviations of the
        difference of two noisy outputs (the flood and any output noise), plus the comparisons' resolution."""
        if self.argmax is None:
            return None
        noise = math.hypot(self.layer.flood_std, self.layer.output_noise)
        return 6 * math.sqrt(2) * noise + 2.0 ** -self.argmax.fraction_bits

    @property
    def label_names(self) -> list[str]:
        labels = self.manifest.get("label_names") or [str(i) for i in range(self.layer.output_dim)]
        return [str(label) for label in labels]

    def head_info(self) -> dict[str, Any]:
        """The layer's entry in GET /v1/model "heads"."""
        target = self.manifest.get("target") or {}
        ood = self.feature_ood
        return {"label_names": self.label_names, "input_dim": self.layer.input_dim,
                "output_dim": self.layer.output_dim, "layout": self.layer.layout.to_dict(),
                "rotation_steps": self.layer.rotation_steps, "lanes": self.layer.lanes, "sha256": self.sha256,
                "target": {key: target.get(key) for key in SPEC_KEYS},
                "metrics": self.manifest.get("metrics") or {},
                "answers": self.answers, "argmax": None if self.argmax is None else self.argmax.to_dict(),
                "label_margin": self.label_margin,
                "feature_ood": None if ood is None else {"detector": self.manifest["feature_ood"]["detector"],
                                                         "threshold": ood.threshold, "tpr": ood.tpr,
                                                         "sha256": ood.sha256}}

    def logit_ood(self) -> dict[str, Any] | None:
        """A fused export's calibrated logit detectors (applied by the client to decrypted logits)."""
        ood = self.manifest.get("ood")
        return {key: ood[key] for key in OOD_KEYS} if ood else None


def encrypted_layer(export: Any, where: str | Path, output_noise: float, circuit_privacy: int | None,
                    answers: str) -> EncryptedLinear:
    """The layer under CKKS: label-only layers are always circuit-private, at the wider-reply profile its masks
    need (`N8192_LABEL`)."""
    try:
        if answers == "label":
            return EncryptedLinear(export.weight, export.bias, N8192_LABEL, output_noise=output_noise,
                                   circuit_privacy=circuit_privacy or LABEL_PRIVACY)
        profile = N8192_PRIVATE if circuit_privacy is not None else DEFAULT_PROFILE
        return EncryptedLinear(export.weight, export.bias, profile, output_noise=output_noise,
                               circuit_privacy=circuit_privacy)
    except EncryptedError as exc:
        raise ExportError(f"{where} cannot be served under encryption: {exc}") from None


def served(name: str, kind: str, export: Any, directory: Path, output_noise: float, circuit_privacy: int | None,
           max_key_bytes: int | None, max_query_bytes: int | None, answers: str) -> ServedLayer:
    layer = encrypted_layer(export, directory, output_noise, circuit_privacy, answers)
    sha256 = str(export.manifest["files"][f"{export.name}.safetensors"]["sha256"])
    argmax = None
    if answers == "label":
        try:
            argmax = ArgmaxSpec(layer.output_dim)
        except EncryptedError as exc:
            raise ExportError(f"{directory} cannot answer labels only: {exc}") from None
    return ServedLayer(name, kind, layer, export.manifest, sha256, export.feature_ood,
                       max_key_bytes or public_bytes_max(layer.layout),
                       max_query_bytes or query_max_bytes(layer.layout), argmax)


def load_fused(export_dir: str | Path, name: str = "fused", *, output_noise: float = 0.0,
               circuit_privacy: int | None = None, max_key_bytes: int | None = None,
               max_query_bytes: int | None = None, answers: str | dict[str, str] = "logits") -> ServedLayer:
    """The export's layer `name` (fused by default), its logit-OOD thresholds and labels checked."""
    directory = Path(export_dir)
    if read_manifest(directory).get("kind") == HEAD_KIND:
        raise ExportError(f"{directory} is a head export; serve it with --heads {directory}, not --export")
    export = load_export(directory, name)
    if export.manifest.get("ood") is not None:
        try:
            check_ood_manifest(export.manifest["ood"])
        except ValueError as exc:
            raise ExportError(f"{directory}/manifest.json: {exc}") from None
    labels = export.manifest.get("label_names")
    if labels is not None and len(labels) != export.output_dim:
        raise ExportError(f"{directory}/manifest.json: 'label_names' has {len(labels)} names for "
                          f"{export.output_dim} outputs; re-run `xsilo export`")
    return served("fused", "fused", export, directory, output_noise, circuit_privacy, max_key_bytes, max_query_bytes,
                  answers_for(answers, "fused"))


def load_head(head_dir: str | Path, *, output_noise: float = 0.0, circuit_privacy: int | None = None,
              max_key_bytes: int | None = None, max_query_bytes: int | None = None,
              answers: str | dict[str, str] = "logits") -> ServedLayer:
    """A head export (`xsilo head fit`), named by its folder's name."""
    directory = Path(head_dir)
    name = directory.resolve().name if directory.exists() else directory.name
    if not HEAD_NAME.fullmatch(name):
        raise ExportError(f"head folder name {name[:80]!r} cannot name a head in URLs; rename the folder to letters, "
                          "digits, '.', '_' or '-' (at most 64, starting with a letter or digit)")
    export = load_export(directory, "head")
    if export.manifest.get("kind") != HEAD_KIND:
        raise ExportError(f"{directory} is a fused export, not a head; serve it with --export {directory}, or "
                          "write a head with `xsilo head fit`")
    return served(name, "head", export, directory, output_noise, circuit_privacy, max_key_bytes, max_query_bytes,
                  answers_for(answers, name))
