"""No single request raises the server's RSS by more than its route's documented cap (serve/README.md, "Limits").

The server runs as `xsilo serve` in a subprocess; RSS is VmRSS from /proc/<pid>/status before and after each
request of a burst of worst-case accepted and refused requests.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from encrypted import ClientKeys, LinearLayout, encrypt, wire

from tests.serve.serve_support import start_xsilo_serve, write_small_export

pytestmark = [pytest.mark.network, pytest.mark.he]

MB = 1 << 20
MAX_SESSIONS = 3


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def caps(limits: dict) -> dict[str, int]:
    """The per-request caps that serve/README.md documents."""
    return {"sessions": 3 * limits["max_key_bytes"], "infer": 3 * limits["max_query_bytes"] + 2 * MB,
            "small": 2 * MB}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_no_single_request_raises_rss_beyond_its_cap(tmp_path):
    export = write_small_export(tmp_path / "export", d=256, k=5)
    process, url, info = start_xsilo_serve(export, "--max_sessions", str(MAX_SESSIONS),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        layout = LinearLayout.from_dict(info["layout"])
        limit = caps(info["limits"])
        rng = np.random.default_rng(0)
        keys = [ClientKeys.generate(layout.profile, layout.rotation_steps) for _ in range(2)]
        X = rng.normal(0, 1, (layout.lanes, layout.input_dim))
        fp = layout.profile.fingerprint
        nested = wire.pack(wire.Kind.PUBLIC_KEYS, fp, [(b"PROF", b"[" * 60000), (b"STEP", b"[" * 60000)])
        big = dict(layout.profile.to_dict(), poly_modulus_degree=32768, coeff_modulus_bits=[55] * 16)
        foreign = wire.pack(wire.Kind.PUBLIC_KEYS, fp, [(b"PROF", wire.dump_json(big)),
                                                        (b"STEP", wire.dump_json(layout.rotation_steps))])
        with httpx.Client(base_url=url, timeout=60) as http:
            warm = http.post("/v1/sessions", content=keys[0].public_bytes()).json()["session_id"]
            [query] = encrypt(keys[0], layout, X)
            assert http.post(f"/v1/sessions/{warm}/infer", content=query).status_code == 200  # lazy state loaded
            burst = []
            for i in range(3 * MAX_SESSIONS):  # accepted uploads: eviction keeps MAX_SESSIONS of them
                burst.append(("sessions", "POST", "/v1/sessions", keys[i % 2].public_bytes(), {201}))
            for _ in range(3):  # refused uploads of the largest size, and the hostile containers
                burst += [("sessions", "POST", "/v1/sessions", rng.bytes(info["limits"]["max_key_bytes"]), {400}),
                          ("sessions", "POST", "/v1/sessions", nested, {400}),
                          ("sessions", "POST", "/v1/sessions", foreign, {400, 422}),
                          ("sessions", "POST", "/v1/sessions", b"\0" * (info["limits"]["max_key_bytes"] + 1), {413})]
            start_rss = rss(process.pid)
            growth: dict[str, int] = {}

            def run(burst: list) -> None:
                for route, method, path, body, statuses in burst:
                    before = rss(process.pid)
                    response = http.request(method, path, content=body)
                    assert response.status_code in statuses, (path, response.status_code, response.text[:200])
                    delta = rss(process.pid) - before
                    growth[route] = max(growth.get(route, 0), delta)
                    assert delta <= limit[route], \
                        f"{method} {path} raised RSS by {delta / MB:.1f} MB > {limit[route] / MB:.1f}"

            run(burst)
            session = http.post("/v1/sessions", content=keys[1].public_bytes()).json()["session_id"]
            [query] = encrypt(keys[1], layout, X)
            burst = []
            for _ in range(10):
                burst += [("infer", "POST", f"/v1/sessions/{session}/infer", query, {200}),
                          ("infer", "POST", f"/v1/sessions/{session}/infer",
                           rng.bytes(info["limits"]["max_query_bytes"]), {400}),
                          ("small", "GET", "/v1/model", None, {200}), ("small", "GET", "/healthz", None, {200}),
                          ("small", "DELETE", "/v1/sessions/nope", None, {404})]
            run(burst)
            total = rss(process.pid) - start_rss
        # everything the burst kept: at most MAX_SESSIONS sessions' keys, whatever the number of uploads
        assert total <= MAX_SESSIONS * limit["sessions"] + limit["infer"], total / MB
        print({k: round(v / MB, 2) for k, v in growth.items()}, "total MB", round(total / MB, 2))
    finally:
        process.terminate()
        process.wait(15)
