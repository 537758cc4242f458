"""Helpers shared by the serve tests: a small export, raw loopback sockets, JSON error checks."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from serve.harness import wait_for_server

ROOT = Path(__file__).resolve().parents[2]

LEAKS = ("Traceback", 'File "', "site-packages", '", line ')  # traceback frames, not JSON's "line 1 column 2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_xsilo_serve(export: Path, *args: str, **popen: object) -> tuple[subprocess.Popen, str, dict]:
    """`xsilo serve --export EXPORT ARGS` in a subprocess on a free loopback port, once it answers:
    (process, url, its GET /v1/model). The caller stops the process."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lightning_modules.cli", "serve", "--export", str(export),
                                "--port", str(port), "--log_level", "warning", *args], cwd=ROOT, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process)
    except RuntimeError as exc:
        process.kill()
        raise AssertionError(f"xsilo serve did not start: {exc}") from None
    return process, url, httpx.get(f"{url}/v1/model", timeout=10).json()


def write_small_export(out: Path, d: int = 64, k: int = 3, seed: int = 0, ood: dict | None = None) -> Path:
    """A fused export d -> k (map d -> 8, head 8 -> k) with random weights; no client model needed."""
    from lightning_modules.parties.export import write_export

    rng = np.random.default_rng(seed)
    t = 8
    source = {"model": "client-model", "model_identity": None, "pooling": "last", "layer": -1, "max_length": 32,
              "dtype": "float32", "hidden_size": d}
    return write_export(out, rng.normal(0, 1 / np.sqrt(d), (t, d)), rng.normal(0, 0.1, t), rng.normal(0, 1, (k, t)),
                        rng.normal(0, 0.1, k), source=source, target={"model": "server-model"},
                        label_names=[f"c{i}" for i in range(k)], ood=ood)


def json_error(body: bytes) -> dict:
    """The {"error": {"code", "message"}} of an error body; fails on any other shape or on a leaked traceback."""
    text = body.decode("utf-8", "replace")
    for leak in LEAKS:
        assert leak not in text, text[:500]
    data = json.loads(body)
    assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}, data
    assert data["error"]["code"] and data["error"]["message"]
    return data["error"]


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return status, headers, body


def exchange(port: int, data: bytes, *, trickle: list[bytes] = (), every_s: float = 0.25,
             max_wait_s: float = 10.0) -> tuple[bytes, float, bool]:
    """Send `data`, then `trickle` pieces every `every_s` while the server keeps the connection open; read until
    the server closes it or `max_wait_s` pass. Returns (bytes received, seconds until closed, closed?)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=max_wait_s)
    start = time.monotonic()
    received, closed = b"", False
    try:
        if data:
            sock.sendall(data)
        pieces = list(trickle)
        sock.settimeout(every_s)
        while time.monotonic() - start < max_wait_s:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                if pieces:
                    try:
                        sock.sendall(pieces.pop(0))
                    except OSError:  # the server closed while we were sending
                        closed = True
                        break
                continue
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        sock.close()
    return received, time.monotonic() - start, closed


PROVIDER_SPEC = {"model": "provider-model", "model_identity": "b" * 64, "pooling": "last", "layer": -1,
                 "max_length": 32, "dtype": "float32"}
CLIENT_SPEC = {"model": "client-model", "model_identity": "a" * 64, "pooling": "last", "layer": -1,
               "max_length": 32, "dtype": "float32"}


def write_small_head(out: Path, d: int = 16, k: int = 3, seed: int = 0, labels: list[str] | None = None,
                     feature_ood: bool = False, target: dict | None = None, priors: list[float] | None = None) -> Path:
    """A head export d -> k with random weights (the training engineer's writer); with `feature_ood`, a published
    Mahalanobis detector: class means on a sphere of radius 3 and identity precision, threshold 4 (and `priors`,
    the class priors, when given)."""
    from serve.formats.heads import write_head_export

    rng = np.random.default_rng(seed)
    ood = None
    if feature_ood:
        means = rng.normal(0, 1, (k, d))
        means *= 3 / np.linalg.norm(means, axis=1, keepdims=True)
        ood = {"means": means, "precision": np.eye(d), "threshold": 4.0, "tpr": 0.95,
               **({"priors": priors} if priors is not None else {})}
    return write_head_export(out, rng.normal(0, 1 / np.sqrt(d), (k, d)), rng.normal(0, 0.1, k),
                             target=dict(target or PROVIDER_SPEC, hidden_size=d),
                             label_names=labels or [f"h{seed}c{i}" for i in range(k)],
                             metrics={"val_accuracy": 0.5}, feature_ood=ood)


def write_small_map(out: Path, d_in: int, d_out: int, seed: int = 0, target: dict | None = None) -> Path:
    """A client's map folder d_in -> d_out (as `xsilo align` saves one), random weights."""
    from serve.formats.maps import write_map_folder

    rng = np.random.default_rng(seed)
    config = {"estimator": "ridge", "lambdas": [1.0], "chosen_lambda": 1.0, "lambda_path": [[1.0, 0.5]],
              "center": True, "standardize": True, "source": dict(CLIENT_SPEC, hidden_size=d_in),
              "target": dict(target or PROVIDER_SPEC, hidden_size=d_out), "metrics": {}}
    return write_map_folder(out, rng.normal(0, 1 / np.sqrt(d_in), (d_out, d_in)), rng.normal(0, 0.1, d_out), config)


def small_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "news", "sport", "é", "日本", "x y"]
    return [f"{i} " + " ".join(rng.choice(words, size=rng.integers(1, 6))) for i in range(n)]


def write_small_public_states(out: Path, n: int = 40, d: int = 12, seed: int = 0, val_fraction: float = 0.25,
                              states: np.ndarray | None = None, anchors: int = 0) -> Path:
    """A provider's public-states folder: n texts and random d-dim states (the training engineer's writer), and
    `anchors` anchor texts with their states when > 0."""
    from serve.formats.public_states import Anchors, write_public_states

    rng = np.random.default_rng(seed)
    states = rng.normal(0, 2, (n, d)) + rng.normal(0, 1, d) if states is None else np.asarray(states)
    n, d = states.shape
    anchor_set = (Anchors([f"anchor {i} " + t for i, t in enumerate(small_texts(anchors, seed + 1))],
                          (rng.normal(0, 2, (anchors, d)) + rng.normal(0, 1, d)).astype(np.float32))
                  if anchors else None)
    return write_public_states(out, small_texts(n, seed), states, model=dict(PROVIDER_SPEC, hidden_size=d),
                               val_fraction=val_fraction, seed=seed, name="small-public", anchors=anchor_set)
