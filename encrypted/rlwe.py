"""Ring-LWE over R_q = Z_q[X]/(X^N + 1) with q = 2^k: the samplers, exact products and bit packing of the
private fit's kernel (`encrypted.gram`).

A ciphertext of a message m (integers at positions 0..d-1) under the secret s is (b, a) with a uniform in R_q and
b = -a·s + m + e; decryption is b + a·s = m + e. A product with a plaintext integer matrix P is P·[b | a], one
BLAS product over the ciphertexts' components (Bae, Cheon, Hanrot, Park & Stehlé, eprint 2024/1284): no rotations,
no NTT, no keys beyond s.

Randomness: secrets, noise and seeds from the OS (`secrets.token_bytes`); public uniform polynomials expanded
from a 32-byte seed with SHAKE-128. The noise is centred binomial with η = 21 (std 3.24, SEAL's 3.2). The ring
degree and the largest modulus follow SEAL's own 128-bit table (`CoeffModulus.MaxBitCount`).
"""
from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np

RING_DEGREE = 2048
SEED_BYTES = 32
NOISE_ETA = 21
EXACT_BITS = 53  # float64 holds every integer below 2^53 exactly


def random_bytes(n: int) -> bytes:
    """The kernel's only source of secret randomness (secrets, noise, mask seeds): the OS's CSPRNG."""
    return secrets.token_bytes(n)


def mask(bits: int) -> int:
    return (1 << bits) - 1


def uniform(seed: bytes, domain: bytes, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Uniform integers in [0, 2^bits) expanded from `seed` with SHAKE-128 (domain-separated), int64."""
    count = int(np.prod(shape))
    width = (bits + 7) // 8
    raw = np.frombuffer(hashlib.shake_128(domain + b"\x00" + seed).digest(count * width), dtype=np.uint8)
    wide = np.zeros((count, 8), dtype=np.uint8)
    wide[:, :width] = raw.reshape(count, width)
    return (wide.view("<i8").reshape(shape) & mask(bits)).astype(np.int64, copy=False)


def ternary(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform in {-1, 0, 1} from the OS's randomness (rejection of the byte 255 keeps it exact), int64."""
    count = int(np.prod(shape))
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        draw = np.frombuffer(random_bytes(count - out.size + 64), dtype=np.uint8)
        out = np.concatenate([out, draw[draw < 255].astype(np.int64) % 3 - 1])
    return out[:count].reshape(shape)


def noise(shape: tuple[int, ...]) -> np.ndarray:
    """Centred binomial noise, η = NOISE_ETA, from the OS's randomness, int64."""
    count = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(random_bytes(count * 6), dtype=np.uint8)).reshape(count, 48)
    out = bits[:, :NOISE_ETA].sum(axis=1, dtype=np.int64) - bits[:, NOISE_ETA:2 * NOISE_ETA].sum(axis=1, dtype=np.int64)
    return out.reshape(shape)


def ring_multiply(small: np.ndarray, p: np.ndarray, bits: int) -> np.ndarray:
    """small_r · p in R_{2^bits} for every row r of `small` (r, N) with entries in {-1, 0, 1}; p (N,) in
    [0, 2^bits). A negacyclic FFT over 24-bit limbs of p: every sum stays below 2^35, far inside float64's
    exact rounding."""
    n = p.shape[-1]
    twist = np.exp(1j * np.pi * np.arange(n) / n)
    small_hat = np.fft.fft(small * twist, axis=-1)
    out = np.zeros(small.shape, dtype=np.int64)
    for shift in range(0, bits, 24):
        limb = (p >> shift) & mask(min(24, bits - shift))
        product = np.fft.ifft(small_hat * np.fft.fft(limb * twist), axis=-1) * twist.conj()
        out += (np.rint(product.real).astype(np.int64) & mask(bits - shift)) << shift
        out &= mask(bits)
    return out


def negacyclic(p: np.ndarray, columns: int | None = None) -> np.ndarray:
    """The N x columns matrix M with (u·p)[t] = (u @ M)[t] in Z[X]/(X^N + 1), for the first `columns` positions."""
    n = p.shape[-1]
    columns = n if columns is None else columns
    j = np.arange(n)[:, None]
    t = np.arange(columns)[None, :]
    return np.where(t >= j, 1, -1) * p[(t - j) % n]


def secret_matrix(secrets_: np.ndarray, positions: int) -> np.ndarray:
    """The N x positions matrix of ℓ ternary secrets (ℓ, N), int8: message position t lies in block t // N,
    whose secret is secrets_[t // N]; so (a @ M)[t] = (a·s_{t//N})[t mod N] for one shared mask a per row."""
    n = secrets_.shape[-1]
    blocks = [negacyclic(s.astype(np.int8), min(n, positions - i * n)).astype(np.int8)
              for i, s in enumerate(secrets_)]
    return np.concatenate(blocks, axis=1)


def matmul_mod(small: np.ndarray, big: np.ndarray, bits: int, small_bound: int) -> np.ndarray:
    """(small @ big) mod 2^bits exactly, int64 in [0, 2^bits): |small| <= small_bound, 0 <= big < 2^bits.

    `big` is split into limbs and the inner dimension into blocks so that no float64 sum reaches 2^53."""
    rows, inner = small.shape
    out = np.zeros((rows, big.shape[1]), dtype=np.int64)
    small_bits = max(1, math.ceil(math.log2(small_bound + 1)))
    if small_bits > 40 or not 1 <= bits <= 62:  # the kernel's operands are far inside these
        raise ValueError(f"matmul_mod takes |small| < 2^40 and a modulus of 1 to 62 bits, got {small_bits}, {bits}")
    block = inner
    while True:  # the widest limb that the block allows, at most 3 limbs (else halve the block)
        limb = EXACT_BITS - 1 - small_bits - max(1, math.ceil(math.log2(block)))
        if limb * 3 >= bits or block == 1:
            break
        block = (block + 1) // 2
    limb = max(1, min(limb, bits))
    limbs = -(-bits // limb)
    for start in range(0, inner, block):
        left = small[:, start:start + block].astype(np.float64)
        part = big[start:start + block]
        for index in range(limbs):
            shift = index * limb
            digits = ((part >> shift) & mask(limb)).astype(np.float64)
            product = (left @ digits).astype(np.int64)
            out += (product & mask(bits - shift)) << shift
            out &= mask(bits)
    return out


def centre(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^bits as signed integers in [-2^(bits-1), 2^(bits-1))."""
    values = values & mask(bits)
    return values - ((values >> (bits - 1)) << bits)


def switch_modulus(values: np.ndarray, bits: int, to_bits: int) -> np.ndarray:
    """round(values · 2^to_bits / 2^bits) mod 2^to_bits (values in [0, 2^bits))."""
    shift = bits - to_bits
    if shift <= 0:
        return values & mask(bits)
    return ((values + (1 << (shift - 1))) >> shift) & mask(to_bits)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Integers in [0, 2^bits), each as `bits` little-endian bits, concatenated (the last byte zero-padded)."""
    flat = np.ascontiguousarray(values, dtype="<i8").reshape(-1)
    if bits % 8 == 0:
        return flat.view(np.uint8).reshape(-1, 8)[:, :bits // 8].tobytes()
    unpacked = np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(unpacked.reshape(-1), bitorder="little").tobytes()


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def unpack_bits(data: memoryview | bytes, count: int, bits: int) -> np.ndarray:
    """The inverse of `pack_bits` for exactly `count` values (the caller checks the length first), int64."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits % 8 == 0:
        wide = np.zeros((count, 8), dtype=np.uint8)
        wide[:, :bits // 8] = raw.reshape(count, bits // 8)
        return wide.view("<i8").reshape(count)
    unpacked = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits)
    wide = np.zeros((count, 64), dtype=np.uint8)
    wide[:, :bits] = unpacked
    return np.packbits(wide, axis=1, bitorder="little").view("<i8").reshape(count)
