"""`xsilo align` prints every byte and every query it spends (issue 27): the head-aware λ's encrypted queries, the
detector of --private, the public texts and the fit's chunks included; the printed account equals the provider's
own request log (`xsilo serve --log_level info`: one JSON line per request with its bytes in and out)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_modules.cli import main
from serve.harness import wait_for_server

from tests.serve.serve_support import free_port
from tests.tiny import write_tiny_csv

pytestmark = [pytest.mark.network, pytest.mark.he]

ROOT = Path(__file__).resolve().parents[3]
LEGACY = re.compile(r"(GET|POST|DELETE|PUT|HEAD) (\S+) (\d{3}) in=(\d+)B out=(\d+)B")


def request_log(text: str) -> list[dict]:
    """The server's request-log records: JSON lines with bytes_in/bytes_out (or the older plain format)."""
    records = []
    for line in text.splitlines():
        start = line.find("{")
        if start >= 0:
            try:
                record = json.loads(line[start:])
            except ValueError:
                record = None
            if isinstance(record, dict) and "bytes_in" in record:
                records.append(record)
                continue
        match = LEGACY.search(line)
        if match:
            records.append({"method": match[1], "path": match[2], "status": int(match[3]),
                            "bytes_in": int(match[4]), "bytes_out": int(match[5])})
    return records


def start_provider(args: list[str], home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "XSILO_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "lightning_modules.cli", "serve", *args, "--port", str(port),
                                "--log_level", "info"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process)
    except RuntimeError as exc:
        process.kill()
        raise AssertionError(f"xsilo serve did not start ({exc}): {log.read_text()[-2000:]}") from None
    return process, url


def test_align_prints_the_bytes_and_queries_the_provider_counts(tiny_models, tmp_path, monkeypatch, capsys):
    provider, client = str(tiny_models["gpt2"]), str(tiny_models["llama"])
    public_csv = write_tiny_csv(tmp_path / "public.csv", n=120, seed=8)
    task = write_tiny_csv(tmp_path / "task.csv", n=90, seed=9)
    private = write_tiny_csv(tmp_path / "private.csv", n=40, seed=10)
    monkeypatch.setenv("XSILO_HOME", str(tmp_path / "provider-home"))
    main(["public-set", "export", "--model", provider, "--data", str(public_csv), "--out", str(tmp_path / "pub"),
          "--accelerator", "cpu"])
    main(["head", "fit", "--model", provider, "--task", str(task), "--out", str(tmp_path / "heads" / "topics"),
          "--head.epochs", "10", "--publish_ood", "true", "--accelerator", "cpu"])
    log = tmp_path / "serve.log"
    process, url = start_provider(["--heads", str(tmp_path / "heads" / "topics"), "--public", str(tmp_path / "pub"),
                                   "--publish_val_logits", "true", "--store", "memory://"],
                                  tmp_path / "provider-home", log)
    try:
        monkeypatch.setenv("XSILO_HOME", str(tmp_path / "client-home"))
        capsys.readouterr()
        main(["align", "--server", url, "--model", client, "--out", str(tmp_path / "map"), "--head", "topics",
              "--private", str(private), "--fit.lambdas", "[1.0e-2,1.0,100.0]", "--accelerator", "cpu"])
        err = capsys.readouterr().err
        deadline = time.monotonic() + 10
        printed = next(line for line in err.splitlines() if line.startswith("align in all: "))
        numbers = re.match(r"align in all: (\d+) requests, (\d+) encrypted queries \((\d+) rows of the provider's "
                           r"budget\), sent ([\d,]+) B \([^)]*\), received ([\d,]+) B", printed)
        assert numbers, printed
        requests, queries, rows, sent, received = (int(g.replace(",", "")) for g in numbers.groups())
        while True:  # the server logs a request as it ends: wait for the last line
            served = [r for r in request_log(log.read_text()) if r.get("path") not in ("/healthz",)]
            if len(served) >= requests or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert len(served) == requests, [r.get("path") for r in served]
    assert sum(r["bytes_in"] for r in served) == sent
    assert sum(r["bytes_out"] for r in served) == received
    infers = [r for r in served if str(r.get("path", "")).endswith("/infer")]
    assert len(infers) == queries >= 1
    config = json.loads((tmp_path / "map" / "config.json").read_text())["metrics"]["private_fit"]
    assert config["traffic"]["bytes_sent"] == sent and config["traffic"]["queries"] == queries
    assert rows == config["head"]["rows_charged"]  # the probe's rows and the val logits', as the budget counts them
    kinds = config["traffic"]["by_kind"]
    assert {"keys", "query", "fit chunk", "fit result", "public texts", "val logits", "detector", "model info"} <= \
        set(kinds)
    assert kinds["keys"]["requests"] == 2  # the fit's keys and the head probe's session keys
    assert any(line.startswith("time per stage: ") and "encrypted fit" in line and "head probe" in line
               for line in err.splitlines()), err
    for banner in ("GPU available", "TPU available", "litlogger"):
        assert banner not in err
