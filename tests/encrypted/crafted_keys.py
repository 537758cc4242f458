"""Public keys a malicious client could craft: SEAL PublicKey blobs with chosen polynomials, put in real uploads."""
from __future__ import annotations

import struct

import numpy as np
import tenseal.sealapi as seal

from encrypted import CkksProfile, wire
from encrypted.key_checks import coefficients

SEAL_VERSION = wire.seal_to_bytes(seal.Plaintext())[3:5]  # (major, minor) as this SEAL writes them


def seal_header(compression: int, total_size: int) -> bytes:
    return struct.pack("<HBBBBHQ", wire.SEAL_MAGIC, 16, *SEAL_VERSION, compression, 0, total_size)


def public_key_blob(profile: CkksProfile, p0: np.ndarray, p1: np.ndarray) -> bytes:
    """An uncompressed SEAL PublicKey (a key-level ciphertext in NTT form, as Ciphertext::save_members writes it)
    whose two polynomials have the NTT-form words `p0` and `p1`, each (primes, N) or broadcastable to it."""
    n, primes = profile.poly_modulus_degree, len(profile.coeff_modulus_bits)
    data = np.concatenate([np.broadcast_to(np.asarray(p, dtype=np.uint64), (primes, n)).ravel() for p in (p0, p1)])
    array = seal_header(0, 16 + 8 + 8 * data.size) + struct.pack("<Q", data.size)
    key_parms = struct.pack("<4Q", *profile.context().key_parms_id())
    body = key_parms + b"\x01" + struct.pack("<QQQdQ", 2, n, primes, 1.0, 1) + array + data.astype("<u8").tobytes()
    return seal_header(0, 16 + len(body)) + body


def with_public_key(public_bytes: bytes, blob: bytes | None) -> bytes:
    """`public_bytes` (ClientKeys.public_bytes()) with its PUBK section replaced by `blob`, or dropped (None)."""
    kind, fingerprint, sections = wire.unpack(public_bytes, wire.Kind.PUBLIC_KEYS, ValueError)
    kept = [(tag, blob if tag == b"PUBK" else bytes(payload)) for tag, payload in sections
            if tag != b"PUBK" or blob is not None]
    return wire.pack(kind, fingerprint, kept)


def real_key_words(public_key: object) -> np.ndarray:
    """A loaded PUBK's words (2, primes, N), NTT form."""
    return coefficients(public_key.data())


def crafted_keys(profile: CkksProfile, real_public_key: object) -> dict[str, bytes]:
    """The audit's PUBK (0, 1), and keys that keep one honest part and break the other: (real p0, 1) leaves the
    reply's c1 bare, (0, real p1) its c0 (under a flood far smaller than the modulus)."""
    words = real_key_words(real_public_key)
    zero, one = np.uint64(0), np.uint64(1)  # the constant 1 is all ones in NTT form
    return {"(0, 1)": public_key_blob(profile, zero, one),
            "(p0, 1)": public_key_blob(profile, words[0], one),
            "(0, p1)": public_key_blob(profile, zero, words[1])}
