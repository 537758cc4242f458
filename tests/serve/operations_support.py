"""Helpers of the operations tests: `xsilo serve` over TLS, a self-signed certificate, real encrypted queries."""
from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from encrypted import ClientKeys, LinearLayout, encrypt
from serve.harness import wait_for_server

from tests.serve.serve_support import ROOT, free_port


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 / localhost and its key: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xsilo test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def start_tls_serve(export: Path, cert: Path, key: Path, *args: str,
                    **popen: object) -> tuple[subprocess.Popen, str, ssl.SSLContext]:
    """`xsilo serve --export EXPORT` over TLS with `cert`/`key` on a free loopback port, once /healthz answers:
    (process, https url, an SSL context trusting `cert`). The caller stops the process."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lightning_modules.cli", "serve", "--export", str(export),
                                "--port", str(port), "--log_level", "warning", "--ssl_certfile", str(cert),
                                "--ssl_keyfile", str(key), *args], cwd=ROOT, **popen)
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, verify=context)
    except RuntimeError as exc:
        process.kill()
        raise AssertionError(f"xsilo serve over TLS did not start: {exc}") from None
    return process, url, context


class EncryptedClient:
    """One real session on a served fused export: keys made here, queries encrypted here."""

    def __init__(self, url: str, info: dict, **http: object):
        self.layout = LinearLayout.from_dict(info["layout"])
        self.keys = ClientKeys.generate(self.layout.profile, self.layout.rotation_steps)
        self.http = httpx.Client(base_url=url, timeout=60, **http)
        response = self.http.post("/v1/sessions", content=self.keys.public_bytes())
        assert response.status_code == 201, response.text
        self.session_id: str = response.json()["session_id"]

    def query(self, seed: int = 0) -> bytes:
        rows = np.random.default_rng(seed).normal(0, 1, (1, self.layout.input_dim))
        [query] = encrypt(self.keys, self.layout, rows)
        return query

    def infer(self, query: bytes, **headers: str) -> httpx.Response:
        return self.http.post(f"/v1/sessions/{self.session_id}/infer", content=query, headers=headers)

    def close(self) -> None:
        self.http.close()


def send_partial_infer(port: int, session_id: str, query: bytes, split: int) -> socket.socket:
    """A raw connection carrying an infer request's headers and the first `split` bytes of its body: the request
    is in flight until the caller sends the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /v1/sessions/{session_id}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(query)}\r\n\r\n")
    sock.sendall(head.encode("ascii") + query[:split])
    return sock


def read_response(sock: socket.socket, max_wait_s: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (or `max_wait_s` pass)."""
    sock.settimeout(max_wait_s)
    received = b""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def wait_for(predicate, timeout_s: float = 10.0, every_s: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout_s` pass; its last answer."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(every_s)
    return True
