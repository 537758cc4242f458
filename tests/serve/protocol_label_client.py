"""A label-only client written from docs/protocol.md section 8 alone: the key holder's side of the secure argmax in
plain integer arithmetic. Only the key pairs come from a library (TNO's, whose DGK primes take care to make); every
message is built and read here, as the page describes it."""
from __future__ import annotations

import secrets

import numpy as np

from tests.serve.protocol_client import ProtocolClient


def big_endian(value: int, width: int) -> bytes:
    return value.to_bytes(width, "big")


class LabelKeys:
    """The client's Paillier (n, λ, μ) and DGK (n', g, h, u, t, p, v_p v_q) numbers."""

    def __init__(self, bits: int = 512):
        from tno.mpc.encryption_schemes.dgk import DGK
        from tno.mpc.encryption_schemes.paillier import Paillier
        from tno.mpc.encryption_schemes.utils import next_prime

        paillier = Paillier.from_security_parameter(key_length=bits)
        dgk = DGK.from_security_parameter(v_bits=160, n_bits=bits, u=int(next_prime(1 << 42)), full_decryption=False)
        self.n, self.lam, self.mu = (int(v) for v in (paillier.public_key.n, paillier.secret_key.lambda_,
                                                      paillier.secret_key.mu))
        pk, sk = dgk.public_key, dgk.secret_key
        self.dn, self.g, self.h, self.u, self.t = (int(v) for v in (pk.n, pk.g, pk.h, pk.u, pk.t))
        self.p, self.vpvq = int(sk.p), int(sk.v_p) * int(sk.v_q)
        self.n2 = self.n * self.n
        self.pw, self.dw = (self.n2.bit_length() + 7) // 8, (self.dn.bit_length() + 7) // 8

    def public_bytes(self) -> bytes:
        out = b"XSAK1"
        for value in (self.n, self.dn, self.g, self.h, self.u, self.t):
            raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
            out += len(raw).to_bytes(2, "big") + raw
        return out

    def encrypt(self, m: int) -> int:  # [[m]] = (1 + m n) ρ^n mod n²
        rho = secrets.randbelow(self.n - 2) + 2
        return (1 + (m % self.n) * self.n) * pow(rho, self.n, self.n2) % self.n2

    def decrypt(self, c: int) -> int:
        return (pow(c, self.lam, self.n2) - 1) // self.n * self.mu % self.n

    def dgk(self, m: int) -> int:  # [m] = g^m h^ρ mod n', ρ of 2.5 (t + 1) bits
        return pow(self.g, m, self.dn) * pow(self.h, secrets.randbits(int(2.5 * (self.t + 1))), self.dn) % self.dn

    def is_zero(self, c: int) -> bool:
        return pow(c, self.vpvq, self.p) == 1


def schedule(k: int) -> list[int]:
    counts, n = [], k
    while n > 1:
        counts.append(n)
        n = (n + 1) // 2
    return counts


def label(client: ProtocolClient, keys: LabelKeys, X: np.ndarray) -> list[int]:
    """The argmax class of each row of X (at most `lanes` rows), by section 8's messages."""
    spec = client.model["argmax"]
    k, f, L, kappa = spec["classes"], spec["fraction_bits"], spec["logit_bits"], spec["statistical_bits"]
    s = (k - 1).bit_length()
    ell = 1 + L + f + s
    rows = len(X)
    masked = client.masked(X, keys.public_bytes())
    run = client.last.headers["X-Xsilo-Label-Run"]

    def post(parts: list[int], width: int) -> bytes:
        body = b"".join(big_endian(v, width) for v in parts)
        return client._ok(client.http.post(f"/v1/label-runs/{run}", content=body,
                                           headers={"Content-Type": "application/octet-stream"}), 200).content

    def ints(blob: bytes, width: int) -> list[int]:
        return [int.from_bytes(blob[i:i + width], "big") for i in range(0, len(blob), width)]

    values = [keys.encrypt(int(np.rint(a * 2**f))) for a in masked.ravel()]
    reply = post(values, keys.pw)
    for _ in schedule(k):
        xs = [keys.decrypt(c) for c in ints(reply, keys.pw)]
        bits = []
        for x in xs:
            beta = x % (1 << ell)
            bits += [keys.dgk(int(x < (keys.n - 1) // 2))] + [keys.dgk((beta >> i) & 1) for i in range(ell)]
        cs = ints(post(bits, keys.dw), keys.dw)
        ends = []
        for index, x in enumerate(xs):
            delta_b = int(any(keys.is_zero(c) for c in cs[index * (ell + 1):(index + 1) * (ell + 1)]))
            second = (x + keys.n) >> ell if x < (keys.n - 1) // 2 else x >> ell
            ends += [keys.encrypt(x >> ell), keys.encrypt(second), keys.encrypt(delta_b)]
        shown = [keys.decrypt(c) for c in ints(post(ends, keys.pw), keys.pw)]
        assert all(u >> 1 < 1 << (64 + kappa + 1) for u in shown)
        reply = post([keys.encrypt((u & 1) * (u >> 1)) for u in shown], keys.pw)
    labels = [keys.decrypt(c) % (1 << s) for c in ints(reply, keys.pw)]
    assert len(labels) == rows and all(v < k for v in labels)
    return labels

