"""A model's own reading of its states: its default pooling and max_length, its identity, its layer range.

torch-free (transformers is imported inside the functions that read a config): what resolving an extraction needs
before any model is loaded. Running a model is `datamodules.encoder`'s; extracting into the cache
`datamodules.extraction`'s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datamodules.registry import AssetError, xsilo_home
from datamodules.cache import atomic_write_json
from serve.formats.digests import sha256_file

Pooling = Literal["mean", "last", "first"]
POOLINGS = ("mean", "last", "first")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def check_options(pooling: str | None, max_length: int | None, dtype: str, batch_size: int) -> None:
    """One-line errors for extraction options that no model accepts."""
    if max_length is not None and max_length <= 0:
        raise AssetError(f"max_length must be a positive number of tokens, got {max_length}")
    if batch_size <= 0:
        raise AssetError(f"batch_size must be positive, got {batch_size}")
    if pooling is not None and pooling not in POOLINGS:
        raise AssetError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if dtype not in DTYPE_NAMES:
        raise AssetError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")


def check_layer(layer: int, n_layers: int) -> None:
    if not -(n_layers + 1) <= layer <= n_layers:
        raise AssetError(
            f"layer {layer} is out of range for a model with {n_layers} layers; "
            f"use -1 for the final layer, or {-(n_layers + 1)}..{n_layers}"
        )


# --- pooling and max_length -------------------------------------------------------------

def is_causal_lm(config) -> bool:
    """Decoder-only LMs pool their last token; encoders pool the mean."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    model_type = getattr(config, "model_type", "")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def default_pooling(config) -> str:
    return "last" if is_causal_lm(config) else "mean"


# sentence-transformers `1_Pooling/config.json` modes → xsilo's poolings (max pooling has no equivalent).
ST_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first",
                    "pooling_mode_lasttoken": "last"}
MAX_LENGTH_CAP = 128  # the longest default truncation: a model's own limit only ever lowers it


@dataclass(frozen=True)
class ModelDefaults:
    """Pooling and max_length as the model's own files state them, and where each came from."""

    pooling: str
    max_length: int
    sources: dict[str, str]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_defaults(model_path: str, config) -> ModelDefaults:
    """The pooling and max_length a model declares: sentence-transformers' `1_Pooling/config.json`
    and `sentence_bert_config.json` when the folder has them, else `max_position_embeddings`,
    capped at `MAX_LENGTH_CAP`; else last-token pooling for causal LMs and mean for encoders."""
    folder = Path(model_path)
    pooling, sources = default_pooling(config), {"pooling": "causal LM: last token" if is_causal_lm(config)
                                                              else "encoder: mean"}
    st_pooling = _read_json(folder / "1_Pooling" / "config.json")
    chosen = [mode for key, mode in ST_POOLING_MODES.items() if st_pooling.get(key) is True]
    if len(chosen) == 1:
        pooling, sources["pooling"] = chosen[0], "1_Pooling/config.json"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = {"sentence_bert_config.json max_seq_length": _read_json(folder / "sentence_bert_config.json").get("max_seq_length"),
              "config max_position_embeddings": getattr(text_config, "max_position_embeddings", None)}
    limits = {k: v for k, v in limits.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}
    max_length, sources["max_length"] = MAX_LENGTH_CAP, f"cap {MAX_LENGTH_CAP}"
    if limits:
        where, limit = next(iter(limits.items()))
        if limit < MAX_LENGTH_CAP:
            max_length, sources["max_length"] = limit, where
        else:
            sources["max_length"] = f"{where} {limit}, capped at {MAX_LENGTH_CAP}"
    return ModelDefaults(pooling, max_length, sources)


# --- identity ---------------------------------------------------------------------------

def model_identity(model_path: str) -> str:
    """sha256 over a checkpoint folder's config and weight files (memoised by size+mtime).

    A hub id is first resolved to its local snapshot, so a hub model and the same files in
    a local folder share an identity.
    """
    path = Path(model_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_path))
    memo_path = xsilo_home() / "identity-memo.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest_parts = []
    changed = False
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix not in WEIGHT_SUFFIXES and file.name != "config.json":
            continue
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(file)
            changed = True
        digest_parts.append(f"{file.name}={memo[key]}")
    if not digest_parts:
        raise AssetError(f"{path} holds no config.json or weight files; is it a model checkpoint folder?")
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_path, memo)
        except OSError:
            pass  # the memo only saves time
    return hashlib.sha256("\n".join(digest_parts).encode()).hexdigest()
