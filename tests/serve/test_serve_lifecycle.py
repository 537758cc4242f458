"""`xsilo serve` as the demo runs it: a subprocess stopped with SIGTERM exits promptly and removes its HE scratch
folder (/dev/shm/xsilo-he-*)."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import tempfile
import time

import httpx
import numpy as np
import pytest

from encrypted import ClientKeys, LinearLayout, encrypt, wire

from tests.serve.serve_support import start_xsilo_serve, write_small_export

pytestmark = [pytest.mark.network, pytest.mark.he]


def scratch_dirs() -> set[str]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return set(glob.glob(os.path.join(base, "xsilo-he-*")))


def test_sigterm_stops_xsilo_serve_and_removes_its_scratch_folder(tmp_path):
    export = write_small_export(tmp_path / "export", d=32, k=2)
    wire.scratch_dir()  # this test process's own folder exists first, so `made` holds only the server's
    before = scratch_dirs()
    process, url, info = start_xsilo_serve(export, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
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
    assert code == 0 and "Traceback" not in output, output[-2000:]
    assert not (made & scratch_dirs()), f"left behind: {made & scratch_dirs()}"
