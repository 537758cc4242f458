"""Server hardening, over real loopback sockets: slow clients, connection cap, protocol errors as JSON, bad
export manifests, API keys, and what starting the server imports."""
from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.formats.exports import load_export
from serve.formats.folders import ExportError
from serve.harness import ServerThread
from serve.server import create_app
from serve.settings import ServerSettings

from tests.serve.serve_support import exchange, json_error, split_response, write_small_export

pytestmark = [pytest.mark.network, pytest.mark.he]

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.0


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return write_small_export(tmp_path_factory.mktemp("hardening") / "export")


@pytest.fixture(scope="module")
def server(export_dir):
    app = create_app(export_dir, header_timeout_s=HEADER_TIMEOUT, body_timeout_s=BODY_TIMEOUT, max_connections=600,
                     max_connections_per_client=600)  # the slow clients all come from 127.0.0.1
    with ServerThread(app, max_lifetime_s=300) as srv:
        yield srv


# --- slow clients ---------------------------------------------------------------------------------------

def test_partial_headers_are_cut_off_at_the_header_timeout(server):
    # a slowloris: one header line every 0.25 s, never the blank line that ends the headers
    trickle = [f"X-Slow-{i}: {i}\r\n".encode() for i in range(40)]
    received, seconds, closed = exchange(server.port, b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n", trickle=trickle)
    assert closed and seconds < HEADER_TIMEOUT + 1.5, seconds
    status, headers, body = split_response(received)
    assert status == 408 and headers["connection"] == "close"
    assert json_error(body)["code"] == "header_timeout"


def test_partial_body_is_cut_off_at_the_body_timeout(server):
    head = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    received, seconds, closed = exchange(server.port, head + b"XSHE", trickle=[b"\0" * 10] * 40)
    assert closed and seconds < BODY_TIMEOUT + 1.5, seconds
    status, headers, body = split_response(received)
    assert status == 408 and headers["connection"] == "close"
    assert json_error(body)["code"] == "body_timeout"


def test_idle_keep_alive_connection_with_a_slow_second_request_is_closed(server):
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    received, seconds, closed = exchange(server.port, first + b"GET /healthz HTTP/1.1\r\n",
                                         trickle=[b"X-A: b\r\n"] * 40)
    assert closed and seconds < HEADER_TIMEOUT + 1.5, seconds
    assert received.startswith(b"HTTP/1.1 200") and b"header_timeout" in received


def test_four_hundred_slow_connections_are_all_closed_within_the_timeouts(server):
    """The issue's attack: 400 connections with partial headers or bodies held open. All must be closed by the
    server within the header/body timeout (plus slack), and the server must keep answering meanwhile."""
    selector = selectors.DefaultSelector()
    partial_head = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nX-Pad: "
    partial_body = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\nXSHE"
    socks = []
    start = time.monotonic()
    try:
        for i in range(400):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(partial_head if i % 2 else partial_body)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        open_socks = set(socks)
        deadline = start + HEADER_TIMEOUT + BODY_TIMEOUT + 5
        while open_socks and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    open_socks.discard(key.fileobj)
        assert not open_socks, f"{len(open_socks)} of 400 slow connections still open after {deadline - start:.1f} s"
    finally:
        for sock in socks:
            sock.close()
        selector.close()


def test_connections_beyond_the_cap_get_a_json_503(export_dir):
    app = create_app(export_dir, max_connections=3, header_timeout_s=5)
    with ServerThread(app, max_lifetime_s=60) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)
            received, _, closed = exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", max_wait_s=5)
            status, headers, body = split_response(received)
            assert status == 503 and closed and headers["retry-after"] == "1"
            assert json_error(body)["code"] == "too_many_connections"
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200  # capacity is back


# --- protocol errors are JSON ---------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GARBAGE\r\n\r\n", 400, "malformed_http"),  # malformed request line
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400, "malformed_http"),  # bad header
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "malformed_http"),
    (b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed_http"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000, 431, "headers_too_large"),  # never ends
])
def test_http_level_errors_are_json(server, request_bytes, status, code):
    received, seconds, closed = exchange(server.port, request_bytes, max_wait_s=5)
    got, headers, body = split_response(received)
    assert (got, closed) == (status, True) and headers["content-type"] == "application/json"
    assert json_error(body)["code"] == code


def test_over_cap_body_closes_the_connection(server):
    limit = httpx.get(f"{server.url}/v1/model").json()["limits"]["max_key_bytes"]
    head = f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n\r\n".encode()
    received, seconds, closed = exchange(server.port, head + b"XSHE", trickle=[b"\0" * 100] * 20)
    status, headers, body = split_response(received)
    assert status == 413 and closed and seconds < 2 and json_error(body)["code"] == "body_too_large"


# --- export manifests -------------------------------------------------------------------------------------

def broken_manifests(manifest: dict) -> dict[str, tuple[object, str]]:
    """The issue's four shapes (and neighbours): manifest -> the key its one-line error must name."""
    no_sha = json.loads(json.dumps(manifest))
    del no_sha["files"]["fused.safetensors"]["sha256"]
    no_parts = {k: v for k, v in manifest.items() if k != "parts"}
    return {
        "files as a list": ({**manifest, "files": list(manifest["files"])}, "'files'"),
        "an entry without sha256": (no_sha, "files['fused.safetensors']['sha256']"),
        "no parts": (no_parts, "'parts'"),
        "a JSON list": ([manifest], "the manifest"),
        "parts shape strings": ({**manifest, "parts": {"fused": {"shape": ["3", "64"]}}}, "parts['fused']['shape']"),
        "files entry a string": ({**manifest, "files": {"fused.safetensors": "abc"}}, "files['fused.safetensors']"),
        "label_names a string": ({**manifest, "label_names": "abc"}, "'label_names'"),
        "ood all a list": ({**manifest, "ood": {"detector": "energy", "threshold": 1, "tpr": 0.9, "all": []}},
                           "manifest['ood']"),
    }


def test_malformed_manifests_give_one_line_errors(export_dir, tmp_path):
    import shutil

    manifest = json.loads((export_dir / "manifest.json").read_text())
    for name, (bad, key) in broken_manifests(manifest).items():
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(export_dir, copy)
        (copy / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ExportError) as caught:
            create_app(copy)
        message = str(caught.value)
        assert "\n" not in message and key in message and "xsilo export" in message, (name, message)
        if name != "ood all a list":
            with pytest.raises(ExportError):
                load_export(copy)
    (tmp_path / "deep").mkdir()
    shutil.copytree(export_dir, tmp_path / "deep" / "e")
    (tmp_path / "deep" / "e" / "manifest.json").write_text("[" * 100000)
    with pytest.raises(ExportError, match="not valid JSON"):
        load_export(tmp_path / "deep" / "e")


def test_xsilo_serve_prints_one_line_for_a_malformed_manifest(export_dir, tmp_path):
    import shutil

    copy = tmp_path / "files-list"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "files": list(manifest["files"])}))
    done = subprocess.run([PYTHON, "-m", "lightning_modules.cli", "serve", "--export", str(copy), "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'files'" in lines[0], done.stderr


# --- API keys ---------------------------------------------------------------------------------------------

def test_empty_api_key_is_refused_at_start(export_dir):
    with pytest.raises(ValueError, match="empty"):
        create_app(export_dir, api_key="")
    for bad in (" key", "key\n", "a\x00b"):
        with pytest.raises(ValueError, match="whitespace or control"):
            ServerSettings(api_key=bad)
    env = {**os.environ, "XSILO_API_KEY": ""}
    done = subprocess.run([PYTHON, "-m", "lightning_modules.cli", "serve", "--export", str(export_dir),
                           "--api_key", ""], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "API key is empty" in done.stderr and "Traceback" not in done.stderr


def test_non_ascii_api_key_is_compared_as_utf8(export_dir):
    from serve.client import Client, ServerReplyError

    key = "ключ-é-🔑"
    with ServerThread(create_app(export_dir, api_key=key), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        assert http.get("/v1/model", headers={"X-API-Key": key.encode("utf-8")}).status_code == 200
        assert http.get("/v1/model", headers={"Authorization": b"Bearer " + key.encode("utf-8")}).status_code == 200
        for wrong in (key.encode("utf-8")[:-1], "ключ-é-".encode("utf-8"), b"\xd0\xba\xd0\xbb\xd1\x8e\xd1\x87"):
            assert json_error(http.get("/v1/model", headers={"X-API-Key": wrong}).content)["code"] == "unauthorized"
        # the same characters sent as latin-1 bytes are other bytes: refused
        assert http.get("/v1/model", headers={"X-API-Key": "é".encode("latin-1")}).status_code == 401
        X = np.random.default_rng(0).normal(0, 1, (2, 64))
        with Client(srv.url, api_key=key) as client:
            assert client.infer_states(X).shape == (2, 3)
        with Client(srv.url, api_key="ключ") as client, pytest.raises(ServerReplyError, match="401"):
            client.model_info()


# --- what starting the server imports ---------------------------------------------------------------------

HEAVY = ("torch", "lightning", "transformers", "datamodules", "lightning_modules")


def test_starting_the_server_imports_no_training_code(export_dir, tmp_path):
    from tests.serve.serve_support import write_small_head, write_small_public_states

    head, public = write_small_head(tmp_path / "topics", d=12), write_small_public_states(tmp_path / "public", d=12)
    code = f"""
import sys
from lightning_modules.cli import main
try:
    main(["serve", "--help"])
except SystemExit:
    pass
import serve.server, serve.client, serve.fit_client
serve.server.create_app({str(export_dir)!r}, heads=[{str(head)!r}], public={str(public)!r})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
# the console script itself (its table and how a signature becomes options) and the settings dataclasses
allowed = {{"lightning_modules", "lightning_modules.cli", "lightning_modules.signatures", "lightning_modules.settings"}}
print("LOADED", [m for m in loaded if m not in allowed])
"""
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout, done.stdout[-2000:]
