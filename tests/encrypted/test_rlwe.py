"""The ring-LWE kernel's arithmetic (`encrypted.rlwe`) against exact Python-integer references: the limb-split
BLAS product at the extremes of its operands, the negacyclic FFT product, bit packing, modulus switching,
centring, and the samplers' distributions."""
from __future__ import annotations

import numpy as np
import pytest

from encrypted.rlwe import (NOISE_ETA, centre, mask, matmul_mod, negacyclic, noise, pack_bits, packed_size,
                            ring_multiply, secret_matrix, switch_modulus, ternary, uniform, unpack_bits)

pytestmark = pytest.mark.he


def exact_product(small: np.ndarray, big: np.ndarray, bits: int) -> np.ndarray:
    product = small.astype(object) @ big.astype(object)
    return np.vectorize(lambda v: v % (1 << bits), otypes=[object])(product).astype(np.int64)


@pytest.mark.parametrize("bits,small_bits,inner", [(54, 1, 2048), (47, 24, 512), (47, 31, 300), (20, 12, 7),
                                                   (54, 24, 4096), (1, 1, 3)])
def test_matmul_mod_is_exact_at_the_extremes_of_its_operands(bits, small_bits, inner):
    rng = np.random.default_rng(bits * 1000 + small_bits)
    bound = (1 << small_bits) - 1
    small = rng.integers(-bound, bound + 1, (5, inner), dtype=np.int64)
    small[0] = bound  # the largest sums: every term at its bound
    small[1] = -bound
    big = rng.integers(0, 1 << bits, (inner, 9), dtype=np.int64)
    big[:, 0] = (1 << bits) - 1
    np.testing.assert_array_equal(matmul_mod(small, big, bits, bound), exact_product(small, big, bits))


def test_matmul_mod_refuses_operands_beyond_its_exact_range():
    with pytest.raises(ValueError, match="2\\^40"):
        matmul_mod(np.ones((1, 2), np.int64), np.ones((2, 1), np.int64), 47, 1 << 45)
    with pytest.raises(ValueError, match="62 bits"):
        matmul_mod(np.ones((1, 2), np.int64), np.ones((2, 1), np.int64), 63, 1)


def schoolbook(u: np.ndarray, p: np.ndarray, bits: int) -> np.ndarray:
    n = len(p)
    out = [0] * n
    for i, a in enumerate(u.tolist()):
        for j, b in enumerate(p.tolist()):
            k = i + j
            out[k % n] += a * b if k < n else -a * b
    return np.array([v % (1 << bits) for v in out], dtype=np.int64)


@pytest.mark.parametrize("bits", [54, 47, 24, 5])
def test_ring_multiply_and_negacyclic_equal_the_schoolbook_product(bits):
    rng = np.random.default_rng(bits)
    n = 64
    u = ternary((3, n))
    p = rng.integers(0, 1 << bits, n, dtype=np.int64)
    p[0] = (1 << bits) - 1
    expected = np.stack([schoolbook(row, p, bits) for row in u])
    np.testing.assert_array_equal(ring_multiply(u, p, bits), expected)
    np.testing.assert_array_equal(matmul_mod(u, negacyclic(p) & mask(bits), bits, 1), expected)
    # at the kernel's ring degree too, against the matrix form
    u2, p2 = ternary((2, 2048)), rng.integers(0, 1 << bits, 2048, dtype=np.int64)
    np.testing.assert_array_equal(ring_multiply(u2, p2, bits), matmul_mod(u2, negacyclic(p2) & mask(bits), bits, 1))


def test_a_secret_matrix_applies_each_block_its_own_secret():
    s = ternary((2, 8))
    a = np.random.default_rng(3).integers(0, 1 << 20, 8, dtype=np.int64)
    matrix = secret_matrix(s, 11)  # positions 0..7 in block 0, 8..10 in block 1
    assert matrix.shape == (8, 11) and matrix.dtype == np.int8
    got = matmul_mod(matrix.T.astype(np.int64), a[:, None], 20, 1)[:, 0]
    want = np.concatenate([schoolbook(a, s[0], 20), schoolbook(a, s[1], 20)[:3]])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [1, 7, 8, 16, 23, 29, 47, 48, 54, 63])
def test_bit_packing_round_trips_and_has_the_documented_layout(bits):
    rng = np.random.default_rng(bits)
    count = 37
    values = rng.integers(0, 1 << bits, count, dtype=np.int64) if bits < 63 else \
        rng.integers(0, np.iinfo(np.int64).max, count, dtype=np.int64)
    values[0] = (1 << bits) - 1
    data = pack_bits(values, bits)
    assert len(data) == packed_size(count, bits) == (count * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(data, count, bits), values)
    whole = int.from_bytes(data, "little")  # value j at bits j·K ... j·K + K - 1, least significant first
    assert [(whole >> (j * bits)) & ((1 << bits) - 1) for j in range(count)] == values.tolist()
    assert whole >> (count * bits) == 0  # the last byte's high bits are zero


def test_modulus_switching_rounds_to_nearest_and_centring_is_twos_complement():
    values = np.array([0, 1, (1 << 9) - 1, 1 << 9, (1 << 10) + (1 << 9), (1 << 20) - 1], dtype=np.int64)
    switched = switch_modulus(values, 20, 10)  # divide by 2^10, round, mod 2^10
    assert switched.tolist() == [0, 0, 0, 1, 2, 0]
    assert centre(np.array([0, 5, (1 << 19) - 1, 1 << 19, (1 << 20) - 1]), 20).tolist() == \
        [0, 5, (1 << 19) - 1, -(1 << 19), -1]


def test_samplers_have_the_documented_distributions():
    e = noise((200_000,))
    assert np.abs(e).max() <= NOISE_ETA and abs(e.mean()) < 0.03 and abs(e.std() - np.sqrt(NOISE_ETA / 2)) < 0.03
    s = ternary((300_000,))
    assert set(np.unique(s)) == {-1, 0, 1}
    assert all(abs(np.mean(s == v) - 1 / 3) < 0.005 for v in (-1, 0, 1))
    a = uniform(b"\x01" * 32, b"domain", (100_000,), 47)
    assert a.min() >= 0 and a.max() < 1 << 47 and abs(a.mean() / (1 << 47) - 0.5) < 0.01
    assert np.array_equal(a, uniform(b"\x01" * 32, b"domain", (100_000,), 47))  # a seed expands the same way
    assert not np.array_equal(a[:100], uniform(b"\x01" * 32, b"other", (100,), 47))  # domains separate
