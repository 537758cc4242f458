"""What every folder xsilo writes shares: a JSON document with a format name, a version and every file's sha256,
written atomically, and float32 linear layers in safetensors (and ONNX).

    {"format": str, "version": int, ..., "files": {FILENAME: {"sha256": 64 hex digits, "bytes": int}}}

Readers call `read_json_doc` (size bounded), `migrate` (an older version brought up to the current one, step by
step), `check_header` (format, version, 'files') and `verify_file` (a listed file's sha256) before they touch a
tensor; writers stage the folder in a temp folder and rename it into place (`staged_folder`), so a folder is never
half-written. Every problem is an `ExportError` whose one-line message names the file, the key and the fix.
The export family's names live here too (an export is fused or a head: `exports` and `heads` read both).
numpy, json and hashlib only (safetensors and onnx imported where a tensor is read or written).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .digests import sha256_file

# The export family (`exports` reads and writes fused exports, `heads` head exports): one manifest format.
MANIFEST = "manifest.json"
FORMAT = "xsilo-export"
FORMAT_VERSION = 1
PARTS = ("fused", "map", "head")
HEAD_KIND = "head"
REEXPORT = "re-run `xsilo export`"
REFIT_HEAD = "re-run `xsilo head fit`"
# What a provider publishes about the states a layer reads (never its local cache path or dataset).
SPEC_KEYS = ("model", "model_identity", "pooling", "layer", "max_length", "dtype", "hidden_size")
MAX_MANIFEST_BYTES = 16 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")

Migration = Callable[[dict[str, Any]], dict[str, Any]]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import (os.umask can only be read by setting it)


class ExportError(ValueError):
    """An export or map folder is missing, tampered with or does not match what it is used with."""


def is_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value: Any) -> bool:
    """A finite JSON number (huge ints would overflow a float: refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)


# --- reading ------------------------------------------------------------------------------------------------

def read_json_doc(path: Path, what: str, create: str, fix: str) -> Any:
    """A folder's JSON document, bounded in size; ExportError naming `what`, how to `create` it and the `fix`."""
    if not path.is_file():
        raise ExportError(f"{path.parent} is not {what}: {path.name} is missing; {create}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is over {MAX_MANIFEST_BYTES} bytes, far more than a {path.name}; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path} is not valid JSON ({str(e)[:200]}); {fix}") from None


def migrate(doc: Any, fmt: str, version: int, migrations: Mapping[int, Migration]) -> Any:
    """`doc` brought up to `version` when it is an older version of format `fmt`: `migrations[v]` turns a version
    v document into a version v + 1 one. Anything else (another format, a newer or unknown version) is returned
    as it is, for `check_header` to refuse with its message."""
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        return doc
    found = doc.get("version")
    while is_int(found) and found < version and found in migrations:
        doc = {**migrations[found](dict(doc)), "version": found + 1}
        found += 1
    return doc


def check_header(doc: Any, path: Path | str, fmt: str, version: int, fix: str, *, what: str, writer: str) -> None:
    """`doc` is a JSON object of format `fmt`, at `version`, whose 'files' records are well formed. `what` and
    `writer` name the document and the command that writes it in messages."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {fix}")

    if not isinstance(doc, dict):
        raise bad(what, f"must be a JSON object, got a JSON {type(doc).__name__}")
    if doc.get("format") != fmt:
        raise ExportError(f"{path} is not an xsilo {fmt!r} file (format={repr(doc.get('format'))[:60]}); pass "
                          f"the folder {writer} wrote")
    if doc.get("version") != version:
        raise ExportError(f"{path}: {fmt} version {doc.get('version')!r} is not the version {version} this xsilo "
                          f"reads; use the xsilo that wrote it, or {fix} with this one")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("'files'", "must be a non-empty object {filename: {\"sha256\": ..., \"bytes\": ...}}")
    for name, record in files.items():
        if not isinstance(record, dict):
            raise bad(f"files[{name!r}]", "must be an object with 'sha256' and 'bytes'")
        if not isinstance(record.get("sha256"), str) or not _SHA256.fullmatch(record["sha256"]):
            raise bad(f"files[{name!r}]['sha256']", "is missing or not 64 lowercase hex digits")
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise bad(f"files[{name!r}]", "must name a file inside the folder")
    for key in ("source", "target", "metrics"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise bad(f"{key!r}", "must be an object or null")


def verify_file(directory: str | Path, manifest: dict[str, Any], filename: str,
                listed_in: str = MANIFEST, fix: str = REEXPORT) -> Path:
    """The path of `filename`, after checking it is listed in the folder's JSON and matches its sha256."""
    directory = Path(directory)
    record = manifest["files"].get(filename)
    path = directory / filename
    if record is None:
        raise ExportError(f"{filename} is not listed in {directory / listed_in} 'files'; {fix}")
    if not path.is_file():
        raise ExportError(f"{path} is missing; {fix}")
    if sha256_file(path) != record["sha256"]:
        raise ExportError(f"{path} does not match its sha256 in {listed_in}: the file was modified or "
                          f"corrupted; {fix} or restore the original file")
    return path


def read_linear(path: Path, expected: tuple[int, int], listed_in: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """`weight` and `bias` of a verified safetensors file, their shapes checked against `expected`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({e}); {fix}") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.shape != expected or bias.shape != expected[:1]:
        raise ExportError(f"{path} holds shapes {None if weight is None else weight.shape} / "
                          f"{None if bias is None else bias.shape}, but {listed_in} says {expected}; {fix}")
    return weight.astype(np.float32), bias.astype(np.float32)


# --- writing ------------------------------------------------------------------------------------------------

def now() -> str:
    """The UTC time a folder records as 'created'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def float32(t: Any) -> np.ndarray:
    """A contiguous float32 copy, rounded once from float64."""
    return np.ascontiguousarray(np.asarray(t, dtype=np.float64).astype(np.float32))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{filename: {"sha256", "bytes"}} for every file in `folder` (what the reader verifies)."""
    return {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in sorted(folder.iterdir())}


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
        # mkdtemp's 0700 (and writers' 0600 files, safetensors' among them) would hide a served folder from a
        # service running as another user: a folder gets the permissions mkdir and open() would give it.
        for path in (tmp, *tmp.rglob("*")):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~UMASK)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def write_part(folder: Path, name: str, weight: np.ndarray, bias: np.ndarray) -> dict[str, Any]:
    """`NAME.safetensors` (float32 `weight`, `bias`) and `NAME.onnx` in `folder`; the manifest's 'parts' entry."""
    from safetensors.numpy import save_file

    save_file({"weight": weight, "bias": bias}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.onnx").write_bytes(gemm_onnx(weight, bias).SerializeToString())
    return {"shape": list(weight.shape), "safetensors": f"{name}.safetensors", "onnx": f"{name}.onnx"}


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


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temp file in the same folder (with `mode` from its first byte, e.g. 0o600 for a secret; default
    what open() would give: 0o666 less the umask), fsync, then rename over `path`: a reader sees the old file or
    the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def xsilo_home() -> Path:
    """Root of everything xsilo stores on this machine: $XSILO_HOME, default ~/.cache/xsilo."""
    return Path(os.environ.get("XSILO_HOME") or Path.home() / ".cache" / "xsilo").expanduser()
