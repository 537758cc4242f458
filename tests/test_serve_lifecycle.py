"""`xsilo serve` as the demo runs it: a subprocess stopped with SIGTERM exits promptly and removes its HE scratch
folder (/dev/shm/xsilo-he-*)."""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from encrypted import ClientKeys, LinearLayout, encrypt

from serve_support import write_small_export

ROOT = Path(__file__).resolve().parents[1]


def scratch_dirs() -> set[str]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return set(glob.glob(os.path.join(base, "xsilo-he-*")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_stops_xsilo_serve_and_removes_its_scratch_folder(tmp_path):
    export = write_small_export(tmp_path / "export", d=32, k=2)
    port = free_port()
    before = scratch_dirs()
    process = subprocess.Popen([sys.executable, "-m", "lightning_modules.cli", "serve", "--export", str(export),
                                "--port", str(port), "--log_level", "warning"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(f"{url}/v1/model", timeout=2).json()
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "xsilo serve did not start"
                time.sleep(0.2)
        layout = LinearLayout.from_dict(info["layout"])
        keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
        session = httpx.post(f"{url}/v1/sessions", content=keys.public_bytes(), timeout=30).json()["session_id"]
        [query] = encrypt(keys, layout, np.ones((1, 32)))
        assert httpx.post(f"{url}/v1/sessions/{session}/infer", content=query, timeout=30).status_code == 200
        made = scratch_dirs() - before
        assert made, "the server made no scratch folder (SEAL loads and saves go through one)"
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        stopped_s = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = process.stdout.read()
    assert stopped_s < 5, stopped_s
    assert code == 128 + signal.SIGTERM and "Traceback" not in output, output[-2000:]
    assert not (made & scratch_dirs()), f"left behind: {made & scratch_dirs()}"
