"""Keys of the label-only argmax (Paillier and DGK, from TNO MPC Lab's packages): made and kept by the client, sent
public to the provider, which validates every field before it builds anything on them.

Wire format of the public keys (`ArgmaxKeys.public_bytes`): the magic b"XSAK1", then six unsigned big-endian
integers, each a 2-byte length and its bytes: Paillier n (g = n + 1), DGK n, g, h, u (the plaintext prime) and t
(the bit length of DGK's hidden subgroup orders).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

from .argmax_spec import MAGIC, MAX_KEY_BITS, MAX_PUBLIC_BYTES, MAX_VALUE_BITS
from .errors import EncryptedError, InvalidKeys

# TNO's network package registers serialisers for torch and pandas when it is imported, which would load torch into
# a server that must start without it. xsilo never uses TNO's own networking, so those two plugins are replaced by
# no-ops before the first TNO import.
for _plugin in ("torch", "pandas"):
    sys.modules.setdefault(f"tno.mpc.communication.serializer_plugins.{_plugin}",
                           types.SimpleNamespace(register=lambda: None))  # type: ignore[arg-type]

import gmpy2  # noqa: E402
from tno.mpc.encryption_schemes.dgk import DGK, DGKPublicKey, DGKSecretKey  # noqa: E402
from tno.mpc.encryption_schemes.paillier import Paillier, PaillierPublicKey, PaillierSecretKey  # noqa: E402
from tno.mpc.encryption_schemes.utils import next_prime  # noqa: E402

warnings.filterwarnings("ignore", module=r"tno\.mpc\..*")  # efficiency hints about randomness, not errors

KEY_BITS = 2048  # the client's default: its keys protect its own logits' comparisons
MIN_KEY_BITS = 512  # below this the masks and offsets of the protocol no longer fit the plaintext space
DGK_T_BITS = 160
SMALL_PRIMES = [int(p) for p in range(3, 2000, 2) if gmpy2.is_prime(p)]


def plaintext_prime() -> int:
    """DGK's plaintext modulus u for comparisons of up to MAX_VALUE_BITS bits (the same for every client)."""
    return int(next_prime(1 << (MAX_VALUE_BITS + 2)))


def _modulus(value: int, what: str) -> None:
    bits = value.bit_length()
    if not MIN_KEY_BITS <= bits <= MAX_KEY_BITS:
        raise InvalidKeys(f"{what} has {bits} bits; use {MIN_KEY_BITS} to {MAX_KEY_BITS} (ArgmaxKeys.generate makes "
                          f"{KEY_BITS})")
    if value % 2 == 0 or any(value % p == 0 for p in SMALL_PRIMES) or gmpy2.is_square(value):
        raise InvalidKeys(f"{what} is not an RSA-type modulus (even, a small factor, or a square); send the public "
                          "part of keys made by ArgmaxKeys.generate")


@dataclass(frozen=True)
class ArgmaxPublicKeys:
    """The client's public Paillier and DGK keys, as the provider holds them (checked by `from_bytes`)."""

    paillier: Paillier
    dgk: DGK

    @classmethod
    def from_bytes(cls, blob: bytes) -> ArgmaxPublicKeys:
        """Parse and check hostile bytes: bounded length, six bounded integers, moduli of RSA type, DGK's u the
        agreed prime and its g, h units other than 1. A key is the client's own protection, so the checks
        ensure only that the protocol's masks fit and that nothing degenerate reaches the arithmetic."""
        if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_PUBLIC_BYTES or not blob.startswith(MAGIC):
            raise InvalidKeys(f"argmax keys must be at most {MAX_PUBLIC_BYTES} bytes starting with {MAGIC!r}; send "
                              "ArgmaxKeys.public_bytes()")
        values, pos = [], len(MAGIC)
        for _ in range(6):
            if pos + 2 > len(blob):
                raise InvalidKeys("argmax keys are truncated; send ArgmaxKeys.public_bytes() whole")
            size = int.from_bytes(blob[pos:pos + 2], "big")
            if size == 0 or size > MAX_KEY_BITS // 8 or pos + 2 + size > len(blob):
                raise InvalidKeys("argmax keys hold an integer of bad length; send ArgmaxKeys.public_bytes()")
            values.append(int.from_bytes(blob[pos + 2:pos + 2 + size], "big"))
            pos += 2 + size
        if pos != len(blob):
            raise InvalidKeys(f"argmax keys carry {len(blob) - pos} bytes past their six integers; send "
                              "ArgmaxKeys.public_bytes() unchanged")
        n, dn, g, h, u, t = values
        _modulus(n, "the Paillier modulus")
        _modulus(dn, "the DGK modulus")
        if u != plaintext_prime():
            raise InvalidKeys(f"the DGK plaintext modulus must be next_prime(2^{MAX_VALUE_BITS + 2}) = "
                              f"{plaintext_prime()}, got {str(u)[:40]}; make keys with ArgmaxKeys.generate")
        if not 80 <= t <= 512 or 2 * t + u.bit_length() >= dn.bit_length():
            raise InvalidKeys(f"the DGK subgroup bit length t={str(t)[:20]} must be in [80, 512] and leave room in the "
                              "modulus; make keys with ArgmaxKeys.generate")
        for name, value in (("g", g), ("h", h)):
            if not 1 < value < dn - 1 or math.gcd(value, dn) != 1:
                raise InvalidKeys(f"the DGK generator {name} must be a unit of the modulus other than +-1; make keys "
                                  "with ArgmaxKeys.generate")
        return cls(Paillier(PaillierPublicKey(n, n + 1), None),
                   DGK(DGKPublicKey(g, h, u, dn, t), None, full_decryption=False))


@dataclass(frozen=True)
class ArgmaxKeys:
    """The client's Paillier and DGK key pairs. `generate` at 2,048 bits takes about a minute (DGK's primes), so a
    client makes them once and keeps them (`save`, `load`)."""

    paillier: Paillier
    dgk: DGK

    @classmethod
    def generate(cls, key_bits: int = KEY_BITS) -> ArgmaxKeys:
        if not isinstance(key_bits, int) or not MIN_KEY_BITS <= key_bits <= MAX_KEY_BITS:
            raise EncryptedError(f"key_bits must be an int in [{MIN_KEY_BITS}, {MAX_KEY_BITS}], got {key_bits!r}")
        return cls(Paillier.from_security_parameter(key_length=key_bits),
                   DGK.from_security_parameter(v_bits=DGK_T_BITS, n_bits=key_bits, u=plaintext_prime(),
                                               full_decryption=False))

    def public_bytes(self) -> bytes:
        pk, dk = self.paillier.public_key, self.dgk.public_key
        parts = [MAGIC]
        for value in (pk.n, dk.n, dk.g, dk.h, dk.u, dk.t):
            raw = int(value).to_bytes((int(value).bit_length() + 7) // 8, "big")
            parts.append(len(raw).to_bytes(2, "big") + raw)
        return b"".join(parts)

    def public(self) -> ArgmaxPublicKeys:
        """The provider's view of these keys (what `ArgmaxPublicKeys.from_bytes(public_bytes())` gives)."""
        return ArgmaxPublicKeys.from_bytes(self.public_bytes())

    def save(self, path: str | Path) -> None:
        """Write both key pairs, secret parts included, atomically and readable by the owner only."""
        pk, psk, dk, dsk = (self.paillier.public_key, self.paillier.secret_key, self.dgk.public_key,
                            self.dgk.secret_key)
        body = {"version": 1, "paillier": {"n": str(pk.n), "lambda": str(psk.lambda_), "mu": str(psk.mu)},
                "dgk": {"g": str(dk.g), "h": str(dk.h), "u": str(dk.u), "n": str(dk.n), "t": str(dk.t),
                        "p": str(dsk.p), "q": str(dsk.q), "v_p": str(dsk.v_p), "v_q": str(dsk.v_q)}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                os.fchmod(handle.fileno(), 0o600)
                json.dump(body, handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ArgmaxKeys:
        try:
            body = json.loads(Path(path).read_text())
            p, d = body["paillier"], body["dgk"]
            n = int(p["n"])
            paillier = Paillier(PaillierPublicKey(n, n + 1),
                                PaillierSecretKey(int(p["lambda"]), int(p["mu"]), n))
            public = DGKPublicKey(*(int(d[key]) for key in ("g", "h", "u", "n", "t")))
            secret = DGKSecretKey(*(int(d[key]) for key in ("v_p", "v_q", "p", "q")))
            return cls(paillier, DGK(public, secret, full_decryption=False))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidKeys(f"{path} does not hold argmax keys written by ArgmaxKeys.save ({exc}); delete it and "
                              "generate new keys") from None
