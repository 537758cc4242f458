"""A second xsilo client written from docs/protocol.md alone: only tenseal.sealapi, numpy, httpx and the stdlib."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import httpx
import numpy as np
import tenseal.sealapi as seal

HEADER = struct.Struct("<4sBBH32s")
SECTION = struct.Struct("<4sI")
KIND_PUBLIC, KIND_QUERY, KIND_REPLY = 1, 3, 4


def fingerprint(profile: dict) -> bytes:
    body = {k: v for k, v in profile.items() if k != "name"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


def pack(kind: int, fp: bytes, sections: list[tuple[bytes, bytes]]) -> bytes:
    out = [HEADER.pack(b"XSHE", 1, kind, len(sections), fp)]
    for tag, payload in sections:
        out += [SECTION.pack(tag, len(payload)), payload]
    return b"".join(out)


def unpack(data: bytes, kind: int) -> list[tuple[bytes, bytes]]:
    magic, version, got, count, _ = HEADER.unpack_from(data, 0)
    if (magic, version, got) != (b"XSHE", 1, kind):
        raise ValueError(f"unexpected container {magic!r} v{version} kind {got}")
    pos, sections = HEADER.size, []
    for _ in range(count):
        tag, length = SECTION.unpack_from(data, pos)
        sections.append((tag, data[pos + SECTION.size:pos + SECTION.size + length]))
        pos += SECTION.size + length
    if pos != len(data):
        raise ValueError("trailing bytes after the last section")
    return sections


def dump_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def save(obj) -> bytes:
    """sealapi saves only to files."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob")
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()


def load(obj, context, blob: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob")
        with open(path, "wb") as f:
            f.write(blob)
        obj.load(context, path)
    return obj


class ProtocolClient:
    """GET the model, open a session with fresh keys, send queries, decrypt replies."""

    def __init__(self, url: str, api_key: str | None = None):
        self.http = httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": api_key} if api_key else {})
        self.model = self._ok(self.http.get("/v1/model"), 200).json()
        self.layout = L = self.model["layout"]
        profile = L["profile"]
        n = profile["poly_modulus_degree"]
        params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        params.set_poly_modulus_degree(n)
        params.set_coeff_modulus(seal.CoeffModulus.Create(n, profile["coeff_modulus_bits"]))
        self.context = seal.SEALContext(params, True, seal.SEC_LEVEL_TYPE.TC128)
        self.scale = 2.0 ** profile["scale_bits"]
        self.fp = fingerprint(profile)
        keygen = seal.KeyGenerator(self.context)
        secret = keygen.secret_key()
        self.encoder = seal.CKKSEncoder(self.context)
        self.encryptor = seal.Encryptor(self.context, secret)
        self.decryptor = seal.Decryptor(self.context, secret)
        steps = sorted(self.model["rotation_steps"])
        elements = [pow(3, s % (n // 2), 2 * n) for s in steps]  # Galois element of a left rotation by s
        sections = [(b"PROF", dump_json(profile)), (b"STEP", dump_json(steps))]
        if steps:
            sections.append((b"GALK", save(keygen.create_galois_keys(elements))))
        sections.append((b"PUBK", save(self.encryptor.encrypt_zero_symmetric(self.context.key_parms_id()))))
        opened = self._ok(self.http.post("/v1/sessions", content=pack(KIND_PUBLIC, self.fp, sections),
                                         headers={"Content-Type": "application/octet-stream"}), 201).json()
        self.session = opened["session_id"]

    @staticmethod
    def _ok(response: httpx.Response, status: int) -> httpx.Response:
        if response.status_code != status:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response

    def query(self, X: np.ndarray) -> bytes:
        """The query container for inputs X (n, d), n <= lanes."""
        L = self.layout
        d, dp, Q, lanes = L["input_dim"], L["padded_input"], L["stride"], L["lanes"]
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        n = len(X)
        assert X.shape[1] == d and 1 <= n <= lanes
        grid = np.zeros((dp, Q), dtype=np.complex128)  # slot i*Q + q holds lane q's element i
        if L["pairing"] == "inputs":
            grid[:d, :min(n, Q)] = X[:Q].T
            grid[:d, :max(0, n - Q)] += 1j * X[Q:].T
        else:
            grid[:d, :n] = X.T
        plain = seal.Plaintext()
        self.encoder.encode(grid.ravel().tolist(), self.context.first_parms_id(), self.scale, plain)
        meta = {"count": n, "input_dim": d, "lanes": lanes, "padded_input": dp, "pairing": L["pairing"]}
        return pack(KIND_QUERY, self.fp, [(b"META", dump_json(meta)),
                                          (b"CTXT", save(self.encryptor.encrypt_symmetric(plain)))])

    def infer(self, X: np.ndarray) -> np.ndarray:
        """Outputs (n, k) for inputs X (n, d), n <= lanes: one query, one reply."""
        reply = self._ok(self.http.post(f"/v1/sessions/{self.session}/infer", content=self.query(X),
                                        headers={"Content-Type": "application/octet-stream"}), 200).content
        return self.decode(reply, len(np.atleast_2d(X)))

    def masked(self, X: np.ndarray, argmax_keys: bytes) -> np.ndarray:
        """A label-only layer's masked outputs (n, k) (section 8, step 1); `last` keeps the response's headers."""
        body = len(argmax_keys).to_bytes(4, "big") + argmax_keys + self.query(X)
        self.last = self._ok(self.http.post(f"/v1/sessions/{self.session}/label", content=body,
                                            headers={"Content-Type": "application/octet-stream"}), 200)
        return self.decode(self.last.content, len(np.atleast_2d(X)))

    def decode(self, reply: bytes, n: int) -> np.ndarray:
        L = self.layout
        dp, Q, kp, kc, k = L["padded_input"], L["stride"], L["block_rows"], L["complex_rows"], L["output_dim"]
        sections = unpack(reply, KIND_REPLY)
        meta = json.loads(next(p for t, p in sections if t == b"META"))
        assert meta["count"] == n and meta["blocks"] == L["blocks"]
        rows = []
        for tag, blob in sections:
            if tag == b"CTXT":
                plain = seal.Plaintext()
                self.decryptor.decrypt(load(seal.Ciphertext(), self.context, blob), plain)
                rows.append(np.asarray(self.encoder.decode_complex(plain)).reshape(dp, Q)[:kp])
        C = np.concatenate(rows)[:kc]  # (k', Q)
        if L["pairing"] == "inputs":
            return np.concatenate([C.real.T, C.imag.T])[:n]
        Y = np.empty((Q, k))
        Y[:, :kc] = C.real.T
        Y[:, kc:] = C[:k - kc].imag.T
        return Y[:n]

    def close(self) -> None:
        self._ok(self.http.delete(f"/v1/sessions/{self.session}"), 204)
        self.http.close()
