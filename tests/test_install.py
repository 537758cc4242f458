"""The built wheel works outside the checkout: registry shipped, base install serves without torch.

The wheel is built from a copy of the sources and installed with `--no-deps` into a fresh venv
under tmp; the checkout venv's site-packages is made visible through a `.pth` path line (its
own `.pth` files, the editable install among them, are not run), so nothing is downloaded.
A startup hook in the fresh venv hides the `train` extra's modules, as a base install would.
About 4 s (a wheel build and a venv without pip), so not marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "serve", "encrypted")
HIDDEN = "torch,lightning,transformers,datasets,torchmetrics,onnx,onnxruntime,accelerate,matplotlib"
BLOCKER = '''\
import importlib.abc, os, sys
_hidden = set(filter(None, os.environ.get("XSILO_TEST_HIDE", "").split(",")))
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
if _hidden:
    sys.meta_path.insert(0, _Hide())
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel, install it into a fresh venv; return the wheel path and the venv's python."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("xsilo-*.whl")

    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "checkout_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "_xsilo_test_hide.py").write_text(BLOCKER)
    (site / "_xsilo_test_hide.pth").write_text("import _xsilo_test_hide\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr[-2000:]
    return {"wheel": wheel, "python": python, "xsilo": env_dir / "bin" / "xsilo", "cwd": tmp}


def run_xsilo(installed: dict, *args: str, hide: str = HIDDEN, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XSILO_REGISTRY")}
    environ.update(XSILO_TEST_HIDE=hide, **env)
    return subprocess.run([str(installed["xsilo"]), *args], capture_output=True, text=True, timeout=120,
                          cwd=installed["cwd"], env=environ)


def test_wheel_ships_the_registry_and_no_configs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "datamodules/registry.yaml" in names
    assert not any(n.startswith("configs/") for n in names)


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    where = subprocess.check_output([str(installed["python"]), "-c", "import datamodules; print(datamodules.__file__)"],
                                    text=True, cwd=installed["cwd"]).strip()
    assert str(ROOT) not in where and where.startswith(str(installed["python"].parents[1]))


def test_assets_list_without_training_extras(installed, tmp_path):
    from datamodules.registry import builtin_registry

    result = run_xsilo(installed, "assets", "list", XSILO_HOME=str(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert listed == set(builtin_registry())


def test_user_registry_through_the_environment(installed, tmp_path):
    (tmp_path / "sms.csv").write_text("message,spam\nhello,0\nwin cash,1\n")
    (tmp_path / "mine.yaml").write_text("datasets:\n  sms:\n    file: sms.csv\n    text_column: message\n"
                                        "    label_column: spam\n    description: my SMS file\n")
    result = run_xsilo(installed, "assets", "list", XSILO_HOME=str(tmp_path / "home"),
                       XSILO_REGISTRY=str(tmp_path / "mine.yaml"))
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:3] == ["sms", "dataset", "prepared=yes"] for line in result.stdout.splitlines())
    bad = run_xsilo(installed, "assets", "list", XSILO_REGISTRY=str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "missing.yaml" in bad.stderr and "does not exist" in bad.stderr


@pytest.mark.parametrize("args", [("serve", "--help"), ("--help",)], ids=["serve", "root"])
def test_help_without_training_extras(installed, args):
    result = run_xsilo(installed, *args)
    assert result.returncode == 0, result.stderr
    assert ("--export" if args[0] == "serve" else "serve") in result.stdout


def test_training_command_without_extras_names_the_extra(installed, tmp_path):
    result = run_xsilo(installed, "extract", "--model", "minilm", "--data", "bbc", XSILO_HOME=str(tmp_path / "home"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "pip install 'xsilo[train]'" in line
