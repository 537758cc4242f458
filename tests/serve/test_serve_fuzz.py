"""Fuzz every route of a live loopback server: at least 1,000 malformed requests each, no 5xx, JSON errors only.

Cases: random bytes, truncations, bit flips, nested JSON in key containers, foreign CKKS parameters, extra
rotation steps, other sessions' ciphertexts, oversize bodies, hostile ids, headers and query strings.
Most are refused before any HE work, so the run stays short; the loop is bounded by count and by time.
"""
from __future__ import annotations

import re
import socket
import time

import httpx
import numpy as np
import pytest

from encrypted import ClientKeys, CkksProfile, EncryptedLinear, LinearLayout, encrypt, wire
from serve.harness import ServerThread
from serve.server import create_app

from tests.serve.serve_support import json_error, split_response, write_small_export

pytestmark = [pytest.mark.network, pytest.mark.he]

PER_ROUTE = 1000
TIME_LIMIT_S = 240.0
ALLOWED = {200, 201, 204, 400, 401, 404, 405, 408, 413, 422, 429}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    export = write_small_export(tmp_path_factory.mktemp("fuzz") / "export", d=64, k=3)
    app = create_app(export, max_sessions=8, header_timeout_s=2, body_timeout_s=2, keep_alive_s=1)
    with ServerThread(app, max_lifetime_s=TIME_LIMIT_S + 60) as srv:
        layout = LinearLayout.from_dict(httpx.get(f"{srv.url}/v1/model").json()["layout"])
        keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
        yield srv, layout, keys, export


def flip(data: bytes, position: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[position % len(out)] ^= mask
    return bytes(out)


def key_containers(layout: LinearLayout, rng: np.random.Generator) -> list[bytes]:
    """Hand-made public-key containers: nested JSON, huge JSON, wrong kinds, foreign or extra parameters."""
    fp = layout.profile.fingerprint
    nested = [b"[" * 1000, b"{\"a\":" * 500, b"[" * 100000, b"1e999999", b"\"\\ud800\"", b"\xff\xfe"]
    profile = wire.dump_json(layout.profile.to_dict())
    steps = wire.dump_json(layout.rotation_steps)
    bodies = []
    for junk in nested:
        bodies.append(wire.pack(wire.Kind.PUBLIC_KEYS, fp, [(b"PROF", junk), (b"STEP", steps)]))
        bodies.append(wire.pack(wire.Kind.PUBLIC_KEYS, fp, [(b"PROF", profile), (b"STEP", junk)]))
        bodies.append(wire.pack(wire.Kind.QUERY, fp, [(b"META", junk), (b"CTXT", b"")]))
    big = dict(layout.profile.to_dict(), poly_modulus_degree=32768, coeff_modulus_bits=[55] * 16)
    bodies.append(wire.pack(wire.Kind.PUBLIC_KEYS, fp, [(b"PROF", wire.dump_json(big)), (b"STEP", steps)]))
    bodies.append(wire.pack(wire.Kind.PUBLIC_KEYS, fp, [(b"PROF", profile),
                                                        (b"STEP", wire.dump_json(list(range(1, 65))))]))
    bodies.append(wire.pack(wire.Kind.PUBLIC_KEYS, fp, [(b"PROF", profile), (b"STEP", steps)] * 40))
    bodies.append(wire.pack(wire.Kind.SECRET_KEYS, fp, [(b"PROF", profile)]))
    return bodies


def body_cases(valid: bytes, other: bytes, crafted: list[bytes], cap: int, rng: np.random.Generator, n: int):
    makers = [
        lambda: rng.bytes(int(rng.integers(0, 4096))),
        lambda: valid[:int(rng.integers(0, min(len(valid), 70000)))],
        lambda: flip(valid, int(rng.integers(0, 64))),
        lambda: flip(valid, int(rng.integers(0, 64)), 1 << int(rng.integers(0, 8))),
        lambda: valid[:40] + rng.bytes(int(rng.integers(0, 2048))),
        lambda: b"XSHE" + rng.bytes(int(rng.integers(0, 512))),
        lambda: other[:int(rng.integers(1, 8192))],
        lambda: crafted[int(rng.integers(0, len(crafted)))],
        lambda: b"[" * int(rng.integers(1, 5000)),
        lambda: b"\0" * (cap + 1),  # oversize, declared by Content-Length
    ]
    for i in range(n):
        yield makers[i % len(makers)]()


HOSTILE_IDS = ["", "x", "a" * 5000, "..%2F..%2Fetc", "%00", "%ff%fe", "r1.", "é", "\U0001F511", "%0d%0aX: y",
               "null", "[" * 300, "1e9999", "-1"]


def hostile_headers(rng: np.random.Generator) -> dict[str, bytes]:
    choices = [
        {}, {"Authorization": b"Bearer " + rng.bytes(16).hex().encode()}, {"Authorization": b"Basic \xff\xfe"},
        {"X-API-Key": bytes(rng.integers(0x80, 0xff, 20, dtype=np.uint8))}, {"Content-Type": b"application/json"},
        {"Content-Length": str(int(rng.integers(0, 1000))).encode()}, {"Range": b"bytes=0-1"},
        {"Accept-Encoding": b"gzip, br"}, {"Expect": b"100-continue"}, {"X-Forwarded-For": b", ".join([b"1.2.3.4"] * 50)},
    ]
    return choices[int(rng.integers(0, len(choices)))]


def check(response: httpx.Response, counts: dict) -> None:
    assert response.status_code in ALLOWED, (response.status_code, response.text[:300])
    counts[response.status_code] = counts.get(response.status_code, 0) + 1
    if response.status_code >= 400 and response.request.method != "HEAD":  # HEAD answers carry no body
        json_error(response.content)


def send(http: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if "Content-Length" in headers:  # only meaningful with a body of that length; let httpx frame the real one
        headers = {k: v for k, v in headers.items() if k != "Content-Length"}
    return http.request(method, url, headers=headers, **kwargs)


def test_fuzz_every_route(setup):
    srv, layout, keys, export = setup
    rng = np.random.default_rng(13)
    start = time.monotonic()
    info = httpx.get(f"{srv.url}/v1/model").json()
    valid_keys = keys.public_bytes()
    X = rng.normal(0, 1, (2, layout.input_dim))
    valid_query = encrypt(keys, layout, X)[0]
    crafted = key_containers(layout, rng)
    # foreign parameters, and the right parameters with extra rotation steps
    small = CkksProfile("small", 4096, (40, 20, 40), 20)
    small_layer = EncryptedLinear(rng.normal(size=(2, 64)), profile=small)
    small_keys = ClientKeys.generate(small, small_layer.rotation_steps)
    crafted += [small_keys.public_bytes(), encrypt(small_keys, small_layer.layout, np.ones((1, 64)))[0],
                ClientKeys.generate(layout.profile, layout.rotation_steps + [3, 5]).public_bytes(),
                keys.to_bytes()]
    counts: dict[str, dict] = {}
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        session = http.post("/v1/sessions", content=valid_keys).json()["session_id"]
        # another session's keys: its ciphertexts sent to our session are well-formed (answered, useless)
        other_keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
        other_query = encrypt(other_keys, layout, X)[0]
        routes = {
            "POST /v1/sessions": lambda body: send(http, "POST", "/v1/sessions", content=body,
                                                   headers=hostile_headers(rng)),
            "POST /infer": lambda body: send(http, "POST", f"/v1/sessions/{session}/infer", content=body,
                                             headers=hostile_headers(rng)),
        }
        for name, call in routes.items():
            valid, other = (valid_keys, valid_query) if name == "POST /v1/sessions" else (valid_query, valid_keys)
            cap = info["limits"]["max_key_bytes" if name == "POST /v1/sessions" else "max_query_bytes"]
            tally = counts.setdefault(name, {})
            for body in body_cases(valid, other, crafted, cap, rng, PER_ROUTE):
                check(call(body), tally)
                assert time.monotonic() - start < TIME_LIMIT_S
            for body in (other_query, other_query[:-1], flip(other_query, 5000)):  # other sessions' ciphertexts
                check(send(http, "POST", f"/v1/sessions/{session}/infer", content=body), tally)
        # id routes, model and health: hostile ids, methods, query strings, headers, unexpected bodies
        id_routes = {
            "DELETE /v1/sessions/{id}": lambda i: send(http, "DELETE", f"/v1/sessions/{HOSTILE_IDS[i % 14]}{i}",
                                                       headers=hostile_headers(rng)),
            "POST /v1/sessions/{id}/infer (bad ids)": lambda i: send(
                http, "POST", f"/v1/sessions/{HOSTILE_IDS[i % 14]}/infer", content=rng.bytes(int(rng.integers(0, 99))),
                headers=hostile_headers(rng)),
            "GET /v1/model": lambda i: send(http, ("GET", "POST", "PUT", "HEAD")[i % 4],
                                            f"/v1/model?{HOSTILE_IDS[i % 14]}={rng.bytes(4).hex()}",
                                            content=rng.bytes(int(rng.integers(0, 64))) if i % 4 == 1 else None,
                                            headers=hostile_headers(rng)),
            "GET /healthz": lambda i: send(http, ("GET", "DELETE", "OPTIONS", "GET")[i % 4],
                                           f"/healthz{'/' * (i % 3)}?{HOSTILE_IDS[i % 14]}",
                                           headers=hostile_headers(rng)),
        }
        for name, call in id_routes.items():
            tally = counts.setdefault(name, {})
            for i in range(PER_ROUTE):
                check(call(i), tally)
                assert time.monotonic() - start < TIME_LIMIT_S
        # the server still answers correctly
        from encrypted import decrypt

        reply = http.post(f"/v1/sessions/{session}/infer", content=valid_query)
        assert reply.status_code == 200
        from serve.formats.exports import load_export

        np.testing.assert_allclose(decrypt(keys, layout, [reply.content], 2), load_export(export)(X), atol=1e-3)
    for name, tally in counts.items():
        assert sum(tally.values()) >= PER_ROUTE, (name, tally)
        assert not any(status >= 500 for status in tally), (name, tally)
    assert counts["POST /v1/sessions"].get(413, 0) >= 90 and counts["POST /infer"].get(413, 0) >= 90


def read_response(port: int, data: bytes, max_wait_s: float = 0.5) -> bytes:
    """Send raw bytes; read until one whole response (headers + Content-Length body) or the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=max_wait_s) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        received, deadline = b"", time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
        return received


def test_fuzz_raw_http_framing(setup):
    """Mutated request lines, headers and framing on raw sockets: any answer is < 500, errors are JSON."""
    srv, *_ = setup
    rng = np.random.default_rng(17)
    base = (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
            b"Content-Type: application/octet-stream\r\n\r\nXSHE")
    start, statuses = time.monotonic(), {}
    for i in range(400):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            position = int(rng.integers(0, len(data)))
            action = i % 4
            if action == 0:
                data[position] ^= 1 << int(rng.integers(0, 8))
            elif action == 1:
                data[position:position] = rng.bytes(int(rng.integers(1, 8)))
            elif action == 2:
                del data[position:position + int(rng.integers(1, 8))]
            else:
                data[position] = int(rng.choice([0, 10, 13, 32, 58, 127, 255]))
        received = read_response(srv.port, bytes(data))
        assert time.monotonic() - start < TIME_LIMIT_S
        if not received:
            continue  # e.g. a request still incomplete when we stopped waiting
        status, _, body = split_response(received)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (bytes(data), received[:300])
        if status >= 400:
            json_error(body)
    assert statuses.get(400, 0) > 50, statuses
