"""Running the provider as a service: forwarded headers, per-client connections, metrics, JSON logs, readiness,
drain on SIGTERM and TLS (`serve.running`, `serve.observability`, `serve.transport`)."""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import socket
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from encrypted import decrypt
from serve.harness import ServerThread
from serve.observability import JsonFormatter, ServerMetrics
from serve.server import create_app
from serve.settings import ServerSettings

from tests.serve.operations_support import (EncryptedClient, read_response, self_signed_cert, send_partial_infer,
                                            start_tls_serve, wait_for)
from tests.serve.serve_support import json_error, split_response, start_xsilo_serve, write_small_export

pytestmark = [pytest.mark.network]

KEY = "ops-secret-api-key-7f3a"
INFER = "/v1/sessions/{session_id}/infer"
XSILO_NAMES = {"xsilo_requests", "xsilo_request_seconds", "xsilo_he_seconds", "xsilo_queue_depth", "xsilo_sessions",
               "xsilo_budget_rejections", "xsilo_fit_sessions", "xsilo_fit_bytes", "xsilo_draining", "xsilo_label_runs"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_small_export(tmp_path_factory.mktemp("operations") / "export", d=64, k=3, seed=5)


@pytest.fixture
def env(tmp_path):
    """The subprocess environment: its own XSILO_HOME (a fresh default state store), one thread."""
    return {**os.environ, "XSILO_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def stop(process) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


# --- settings and the pieces, in process -----------------------------------------------------------------

def test_settings_refuse_bad_operations_values(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    assert ServerSettings(ssl_certfile=str(cert), ssl_keyfile=str(key)).ssl_certfile == str(cert)
    for bad in ({"ssl_certfile": str(cert)}, {"ssl_keyfile": str(key)},
                {"ssl_certfile": str(tmp_path / "missing.pem"), "ssl_keyfile": str(key)},
                {"drain_delay_s": -1.0}, {"drain_timeout_s": float("inf")}, {"max_connections_per_client": 0},
                {"trusted_proxies": ["not-an-address"]}):
        with pytest.raises(ValueError):
            ServerSettings(**bad)
    assert ServerSettings(trusted_proxies=["10.0.0.5", "10.1.0.0/16", "::1"]).trusted_proxies


def test_json_formatter_writes_one_object_per_record():
    record = logging.LogRecord("serve", logging.INFO, __file__, 1, "GET %s %d", ("/healthz", 200), None)
    record.request_id, record.status = "abc", 200
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "GET /healthz 200" and line["request_id"] == "abc" and line["status"] == 200
    assert {"ts", "level", "logger"} <= set(line) and line["logger"] == "serve"
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        import sys
        record = logging.LogRecord("serve", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text and "RuntimeError" in json.loads(text)["exc"]


def test_server_logs_go_to_the_stderr_of_the_moment_not_the_one_configured(monkeypatch):
    """A server configured under one stderr (a redirect, a test's capture) that has since closed keeps logging."""
    import io
    import logging.config
    import sys

    from serve.observability import json_log_config

    configured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", configured)
    saved = logging.getLogger("serve").handlers[:], logging.getLogger("serve").propagate
    try:
        logging.config.dictConfig(json_log_config())
        configured.close()
        now = io.StringIO()
        monkeypatch.setattr(sys, "stderr", now)
        logging.getLogger("serve").info("GET %s %d", "/healthz", 200)
        assert json.loads(now.getvalue())["msg"] == "GET /healthz 200"
    finally:
        logging.getLogger("serve").handlers[:], logging.getLogger("serve").propagate = saved


def test_request_ids_are_kept_when_well_formed_and_name_the_500(export, caplog):
    app = create_app(export)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("unexpected")

    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.INFO, logger="serve"):
        assert client.get("/healthz", headers={"X-Request-Id": "trace-1.a_B"}).headers["x-request-id"] == "trace-1.a_B"
        for bad in ("has space", "x" * 65, "semi;colon", ""):
            rid = client.get("/healthz", headers={"X-Request-Id": bad}).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
        failed = client.get("/boom")
        assert failed.status_code == 500
        assert failed.headers["x-request-id"] in json_error(failed.content)["message"]
    lines = [r for r in caplog.records if getattr(r, "route", None) == "/boom"]
    assert lines and lines[-1].status == 500 and lines[-1].request_id == failed.headers["x-request-id"]


def test_metrics_methods_and_their_own_registry():
    first, second = ServerMetrics(), ServerMetrics()  # two apps' metrics never collide
    first.observe_he("infer", 0.02)
    first.budget_rejected("client")
    first.fit_bytes("in", 100)
    first.fit_bytes("out", 7)
    first.track(lambda: 3, lambda: 2, lambda: 1 / 0, lambda: True, lambda: 4)  # a failing reader gives NaN
    with pytest.raises(ValueError):
        first.fit_bytes("sideways", 1)
    body, content_type = first.render()
    assert content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("xsilo_he_seconds_count", (("kind", "infer"),))] == 1
    assert samples[("xsilo_budget_rejections_total", (("scope", "client"),))] == 1
    assert samples[("xsilo_fit_bytes_total", (("direction", "in"),))] == 100
    assert (samples[("xsilo_queue_depth", ())], samples[("xsilo_sessions", ())], samples[("xsilo_draining", ())],
            samples[("xsilo_label_runs", ())]) == (3, 2, 1, 4)
    assert np.isnan(samples[("xsilo_fit_sessions", ())])
    assert b"xsilo_he_seconds_count" not in second.render()[0]


# --- a server in a thread ---------------------------------------------------------------------------------

def test_per_client_connection_cap_refuses_then_recovers_without_leaking(export):
    cap = 4
    with ServerThread(create_app(export, max_connections_per_client=cap), max_lifetime_s=120) as srv:
        counts = srv.server.config.http.open_per_client
        for _ in range(3):
            held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(cap)]
            assert wait_for(lambda: counts().get("127.0.0.1") == cap), counts()
            refused = httpx.get(f"{srv.url}/healthz", timeout=10)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            assert json_error(refused.content)["code"] == "too_many_connections_from_client"
            for sock in held:
                sock.close()
            assert wait_for(lambda: counts() == {}), counts()
            assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
        with httpx.Client(base_url=srv.url) as keep_alive:  # one connection, many requests: never capped
            assert [keep_alive.get("/healthz").status_code for _ in range(2 * cap)] == [200] * 2 * cap
        assert wait_for(lambda: counts() == {}), counts()


def test_a_trusted_proxy_is_not_capped(export):
    app = create_app(export, max_connections_per_client=1, trusted_proxies=["127.0.0.0/8"])
    with ServerThread(app, max_lifetime_s=60) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
        try:
            assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
            assert srv.server.config.http.open_per_client() == {}
        finally:
            for sock in held:
                sock.close()


@pytest.mark.he
def test_metrics_count_requests_by_route_template_and_hold_no_ids_or_keys(export):
    auth = {"Authorization": f"Bearer {KEY}"}
    with ServerThread(create_app(export, api_key=KEY), max_lifetime_s=120) as srv:
        info = httpx.get(f"{srv.url}/v1/model", headers=auth).json()
        client = EncryptedClient(srv.url, info, headers=auth)
        query = client.query()
        assert [client.infer(query).status_code for _ in range(2)] == [200, 200]
        assert client.http.post("/v1/sessions/nosuchsession/infer", content=query).status_code == 404
        assert httpx.get(f"{srv.url}/readyz").json() == {"status": "ready"}  # no API key needed
        page = httpx.get(f"{srv.url}/metrics")  # no API key needed
        client.close()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(page.text)}
    assert XSILO_NAMES <= set(families), sorted(families)
    requests = {(s.labels["route"], s.labels["method"], s.labels["code"]): s.value
                for s in families["xsilo_requests"].samples if s.name == "xsilo_requests_total"}
    assert requests[(INFER, "POST", "200")] == 2 and requests[(INFER, "POST", "404")] == 1
    assert requests[("/v1/sessions", "POST", "201")] == 1
    assert [s.value for s in families["xsilo_sessions"].samples] == [1]
    for secret in (client.session_id, "nosuchsession", KEY):
        assert secret not in page.text


# --- `xsilo serve` subprocesses ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.he
def test_forwarded_for_is_ignored_by_default_and_honoured_from_trusted_proxies(export, env):
    """A client cannot pick its own budget identity with X-Forwarded-For; a trusted proxy's header is believed."""
    lanes = 64  # d = 64 at N = 8192: one query spends the whole budget
    process, url, info = start_xsilo_serve(export, "--rows_per_client", str(lanes), env=env)
    try:
        assert info["lanes"] == lanes
        client = EncryptedClient(url, info)
        query = client.query()
        assert client.infer(query).status_code == 200
        for i in range(5):
            refused = client.infer(query, **{"X-Forwarded-For": f"203.0.113.{i}", "X-Real-IP": f"203.0.113.{i}"})
            assert refused.status_code == 429 and json_error(refused.content)["code"] == "budget_exhausted"
        client.close()
    finally:
        stop(process)
    process, url, info = start_xsilo_serve(export, "--rows_per_client", str(lanes), "--trusted_proxies",
                                           "[127.0.0.1]", env=env)
    try:
        client = EncryptedClient(url, info)
        query = client.query()
        forwarded = [client.infer(query, **{"X-Forwarded-For": ip}).status_code
                     for ip in ("203.0.113.1", "203.0.113.1", "203.0.113.2")]
        assert forwarded == [200, 429, 200]  # one budget per forwarded client
        client.close()
    finally:
        stop(process)


@pytest.mark.slow
@pytest.mark.he
def test_logs_are_json_lines_with_request_ids_and_no_secrets(export, env, tmp_path):
    log_file = tmp_path / "stderr.log"
    with log_file.open("w") as stderr:
        process, url, _ = start_xsilo_serve(export, "--log_level", "info", "--api_key", KEY, env=env, stderr=stderr)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        echoed = httpx.get(f"{url}/healthz", headers={"X-Request-Id": "ops-trace.1"}).headers["x-request-id"]
        assert echoed == "ops-trace.1"
        assert httpx.get(f"{url}/v1/model", headers={"Authorization": "Bearer wrong-key-zzz"}).status_code == 401
        info = httpx.get(f"{url}/v1/model", headers=auth).json()
        client = EncryptedClient(url, info, headers=auth)
        query = client.query()
        reply = client.infer(query, **{"X-Request-Id": "x" * 80})
        assert reply.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", reply.headers["x-request-id"])
        assert httpx.get(f"{url}/no/such/route").status_code == 404
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        stop(process)
    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    assert lines and all(isinstance(line, dict) and {"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    requests = [line for line in lines if "request_id" in line]
    assert {"/healthz", "/v1/model", "/v1/sessions", INFER, "other"} <= {line["route"] for line in requests}
    for line in requests:
        assert {"method", "route", "status", "bytes_in", "bytes_out", "ms", "client"} <= set(line), line
    traced = [line for line in requests if line["request_id"] == "ops-trace.1"]
    assert len(traced) == 1 and traced[0]["status"] == 200 and traced[0]["client"] == "127.0.0.1"
    uploaded = [line for line in requests if line["route"] == "/v1/sessions"]
    assert uploaded[0]["bytes_in"] == len(client.keys.public_bytes()) and uploaded[0]["status"] == 201
    secrets = [KEY, "wrong-key-zzz"]
    for blob in (client.keys.public_bytes(), query):
        middle = len(blob) // 2
        secrets.append(blob[middle:middle + 32].hex())
        secrets += [base64.b64encode(blob[middle + i:middle + i + 48]).decode() for i in range(3)]
        secrets.append(base64.urlsafe_b64encode(blob[middle:middle + 48]).decode())
    for secret in secrets:
        assert secret not in text, secret[:20]


@pytest.mark.slow
@pytest.mark.he
def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(export, env):
    process, url, info = start_xsilo_serve(export, "--drain_timeout_s", "10", env=env)
    try:
        client = EncryptedClient(url, info)
        query = client.query()
        client.close()
        sock = send_partial_infer(port_of(url), client.session_id, query, len(query) // 2)
        time.sleep(0.5)  # the headers are parsed: the request is in flight, waiting for the rest of its body
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: refuses_connections(port_of(url)), timeout_s=5), "still accepting connections"
        sock.sendall(query[len(query) // 2:])
        status, headers, body = split_response(read_response(sock))
        sock.close()
        assert status == 200  # and the server closed the connection (read_response returned)
        assert decrypt(client.keys, client.layout, [body], 1).shape == (1, 3)
        assert process.wait(10) == 0
        assert time.monotonic() - start < 10
    finally:
        stop(process)


@pytest.mark.slow
def test_drain_delay_keeps_serving_while_readyz_answers_503(export, env):
    process, url, _ = start_xsilo_serve(export, "--drain_delay_s", "2", env=env)
    try:
        assert httpx.get(f"{url}/readyz").status_code == 200
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout_s=1.5)
        assert json_error(httpx.get(f"{url}/readyz").content)["code"] == "draining"
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive, still serving
        assert "xsilo_draining 1.0" in httpx.get(f"{url}/metrics").text
        assert time.monotonic() - start < 1.8  # all of the above inside the delay
        assert process.wait(15) == 0
        assert time.monotonic() - start >= 1.9
    finally:
        stop(process)


@pytest.mark.slow
def test_a_second_signal_exits_at_once(export, env):
    process, url, _ = start_xsilo_serve(export, "--drain_delay_s", "60", env=env)
    try:
        process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout_s=5)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 5
    finally:
        stop(process)


@pytest.mark.slow
def test_tls_serves_https_and_refuses_plain_http(export, env, tmp_path):
    cert, key = self_signed_cert(tmp_path / "tls")
    process, url, context = start_tls_serve(export, cert, key, env=env)
    try:
        assert url.startswith("https://")
        health = httpx.get(f"{url}/healthz", verify=context, timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url.replace('https://', 'http://')}/healthz", timeout=10)
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is not trusted by default
            httpx.get(f"{url}/healthz", timeout=10)
    finally:
        stop(process)
