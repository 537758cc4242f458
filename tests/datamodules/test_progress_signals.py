"""Progress lines when output is not a terminal, and clean stops on SIGTERM (issue 17)."""

from __future__ import annotations

import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datamodules.cache import StateCache, shard_name, valid_shard
from datamodules.encoder import StateEncoder
from datamodules.extraction import ExtractionConfig, extract, resolve
from datamodules.progress import Progress

from tests.tiny import WORDS, build_tiny_model, write_tiny_csv

LINE = re.compile(r": (\d+)/(\d+) rows \(\d+%\), [\d.]+ rows/s, ~\S+ left, \S+ elapsed")
ROOT = Path(__file__).resolve().parents[2]


def test_extraction_to_a_pipe_prints_periodic_progress_lines(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XSILO_PROGRESS_S", "0")  # a line per batch
    data = write_tiny_csv(tmp_path / "rows.csv", n=100)
    result = extract(ExtractionConfig(model=str(tiny_models["llama"]), data=str(data), batch_size=16), threads=1)
    lines = [l for l in capsys.readouterr().err.splitlines() if LINE.search(l)]
    assert result.n_rows == 100 and not result.hit
    assert len(lines) >= 100 // 16, lines  # captured stderr is not a TTY, so lines instead of a bar
    done = [int(LINE.search(l).group(1)) for l in lines]
    assert done == sorted(done) and done[-1] == 100 and {int(LINE.search(l).group(2)) for l in lines} == {100}
    assert lines[-1].endswith("done") and lines[0].startswith(f"extract {tiny_models['llama']}")


def test_progress_estimates_time_left_and_stays_quiet_between_intervals():
    out = io.StringIO()
    progress = Progress("queries", total=10, unit="queries", stream=out, every_s=3600)
    progress.last -= 3601  # the first interval has passed
    progress.t0 -= 10  # 10 s in
    progress.update(5)
    progress.update(1)  # within the interval: no line
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"queries: 5/10 queries \(50%\), 0\.5 queries/s, ~10s left, 10s elapsed", lines[0])
    assert lines[1].startswith("queries: 6/10") and lines[1].endswith("done")


def test_a_bad_progress_interval_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("XSILO_PROGRESS_S", "soon")
    with pytest.raises(ValueError, match="XSILO_PROGRESS_S='soon' is not a number of seconds"):
        Progress("x", 1)


def test_sigterm_stops_extraction_promptly_keeps_finished_shards_and_a_rerun_resumes(tmp_path):
    model = build_tiny_model("llama", tmp_path / "model", hidden=256)  # slow enough to stop midway
    rng = random.Random(0)
    rows = ["text,label"] + [f"\"{' '.join(rng.choice(WORDS) for _ in range(120))} {i}\",c{i % 3}"
                             for i in range(2000)]
    data = tmp_path / "long.csv"
    data.write_text("\n".join(rows) + "\n")
    config = ExtractionConfig(model=str(model), data=str(data))
    directory = resolve(config).directory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_modules.cli", "extract", "--model", str(model),
                             "--data", str(data), "--shard_size", "256", "--threads", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (directory / shard_name(0)).exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard written within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=10)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert stopped_in < 5, f"took {stopped_in:.1f}s to stop"
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("stopped by SIGTERM: ") and "of 8 shard(s) finished" in message
    assert "rerun the same command to resume" in message
    finished = [i for i in range(8) if (directory / shard_name(i)).exists()]
    assert 1 <= len(finished) < 8
    assert all(valid_shard(directory, i, 256, 256) for i in finished)
    assert not list(directory.glob(".tmp-*")) and not (directory / "manifest.json").exists()
    kept = {i: np.load(directory / shard_name(i)) for i in finished}

    result = extract(config, shard_size=256, threads=1, progress=False)
    assert not result.hit and result.computed_shards == 8 - len(finished)
    cache = StateCache(directory, verify=True)
    assert cache.n_rows == 2000
    for i, states in kept.items():
        np.testing.assert_array_equal(cache.rows(slice(256 * i, 256 * (i + 1))), states)
    texts = resolve(config).texts
    encoder = StateEncoder(str(model), threads=1)
    np.testing.assert_allclose(cache.rows([0, 1999]), encoder([texts[0], texts[1999]]), atol=1e-4)
