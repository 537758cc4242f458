"""Encrypted affine layer: correctness, what a reply reveals, byte validation, keys."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from encrypted import (N8192, N16384, ClientKeys, CkksProfile, EncryptedError, EncryptedLinear, InsecureParameters,
                       InvalidCiphertext, InvalidKeys, InvalidLayout, LinearLayout,
                       ParameterMismatch, PublicKeys, decode_slots, decrypt, encrypt)
from encrypted import wire

pytestmark = pytest.mark.he

RNG = np.random.default_rng(1234)
_CACHE: dict = {}


def setup(d: int, k: int, pairing: str = "outputs"):
    """(layer, client keys, server-side public keys) for a random (k, d) layer, cached per shape."""
    if (d, k, pairing) not in _CACHE:
        rng = np.random.default_rng(d * 1000 + k)
        layer = EncryptedLinear(rng.normal(0, 1 / np.sqrt(d), (k, d)), rng.normal(0, 0.5, k), pairing=pairing)
        keys = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
        _CACHE[d, k, pairing] = (layer, keys, PublicKeys.from_bytes(keys.public_bytes(), layer.layout))
    return _CACHE[d, k, pairing]


def roundtrip(d: int, k: int, n: int, pairing: str = "outputs"):
    layer, keys, public = setup(d, k, pairing)
    X = RNG.normal(0, 1, (n, d))
    queries = encrypt(keys, layer.layout, X)
    replies = [layer.apply(q, public) for q in queries]
    return layer, X, queries, replies, decrypt(keys, layer.layout, replies, n)


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("d,k,pairing", [(100, 3, "outputs"), (384, 2, "outputs"), (576, 5, "outputs"),
                                         (640, 20, "outputs"), (384, 384, "outputs"), (8, 40, "outputs"),
                                         (100, 3, "inputs"), (576, 5, "inputs"), (4096, 1, "inputs"),
                                         (8, 40, "inputs")])
def test_matches_plaintext(d, k, pairing):
    layer, X, queries, replies, Y = roundtrip(d, k, 3, pairing)
    assert Y.shape == (3, k)
    assert rel_err(Y, layer.plain(X)) < 1e-3
    for y, ref in zip(Y, layer.plain(X)):  # each query on its own, too
        assert rel_err(y, ref) < 1e-3


def test_k_beyond_two_padded_inputs_splits_reply_blocks():
    layer, *_ = setup(8, 40)
    assert layer.layout.blocks == 3 and layer.layout.block_rows == 8


@pytest.mark.parametrize("d,k,pairing", [(100, 3, "outputs"), (640, 20, "outputs"), (384, 384, "outputs"),
                                         (8, 40, "outputs"), (100, 3, "inputs"), (8, 40, "inputs")])
def test_every_reply_slot_holds_an_output_or_zero(d, k, pairing):
    layer, X, queries, replies, Y = roundtrip(d, k, 2, pairing)
    L = layer.layout
    ref = np.concatenate([layer.plain(X), np.tile(layer.bias, (L.lanes - 2, 1))])  # empty lanes encrypt x = 0
    rows = np.zeros((L.stride, L.blocks * L.block_rows), dtype=complex)
    if pairing == "outputs":  # complex row r carries output r (real part) and output r + k' (imaginary part)
        rows[:, :L.complex_rows] = ref[:, :L.complex_rows]
        rows[:, :k - L.complex_rows] += 1j * ref[:, L.complex_rows:]
    else:  # lane q carries inputs q (real part) and q + Q (imaginary part)
        rows[:, :k] = ref[:L.stride] + 1j * ref[L.stride:]
    i = np.arange(L.padded_input)
    _, keys, _ = setup(d, k, pairing)
    slots = decode_slots(keys, replies[0], L)  # (blocks, slots), every slot decoded
    for block in range(L.blocks):
        expected = rows[:, block * L.block_rows + i % L.block_rows].T.ravel()  # slot i*Q + q
        assert np.max(np.abs(slots[block] - expected)) < 1e-4 * max(1.0, np.max(np.abs(ref)))


@pytest.mark.parametrize("pairing,lanes", [("outputs", 32), ("inputs", 64)])
def test_many_queries_pack_into_lanes_and_ciphertexts(pairing, lanes):
    layer, X, queries, replies, Y = roundtrip(100, 3, 2 * lanes + 5, pairing)
    assert layer.lanes == lanes and len(queries) == 3
    assert rel_err(Y, layer.plain(X)) < 1e-3
    assert np.max(np.abs(Y - layer.plain(X))) < 1e-3
    other_layer, other_keys, _ = setup(100, 3, "outputs" if pairing == "inputs" else "inputs")
    with pytest.raises(ParameterMismatch, match="pairing"):
        other_layer.apply(queries[0], setup(100, 3, pairing)[2])


def test_another_clients_key_cannot_decrypt():
    layer, X, queries, replies, Y = roundtrip(384, 2, 2)
    other = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
    garbage = decrypt(other, layer.layout, replies, 2)
    assert rel_err(garbage, layer.plain(X)) > 10


def test_sizes_and_key_count_at_d4096_k20():
    layer, keys, public = setup(4096, 20)
    assert len(layer.rotation_steps) == 10
    assert public.galois_keys.size() == len(layer.rotation_steps) == len(keys.rotation_steps)
    assert len(keys.public_bytes()) <= 4_000_000
    X = RNG.normal(0, 1, (1, 4096))
    query = encrypt(keys, layer.layout, X)[0]
    reply = layer.apply(query, public)
    assert len(query) + len(reply) <= 250 * 1024  # ~115 kB seeded query + 131 kB reply
    assert rel_err(decrypt(keys, layer.layout, [reply], 1), layer.plain(X)) < 1e-3


def test_client_generates_exactly_the_requested_galois_keys():
    layer, keys, public = setup(576, 5)
    assert public.rotation_steps == tuple(layer.rotation_steps)
    assert public.galois_keys.size() == len(layer.rotation_steps)
    few = ClientKeys.generate(layer.layout.profile, layer.rotation_steps[:2])
    assert PublicKeys.from_bytes(few.public_bytes()).galois_keys.size() == 2


# --- bad bytes --------------------------------------------------------------------------------------

def test_bad_query_bytes_are_refused_with_clear_errors():
    layer, keys, public = setup(100, 3)
    query = encrypt(keys, layer.layout, RNG.normal(0, 1, (1, 100)))[0]
    bad = {
        "truncated": query[: len(query) // 2],
        "header only": query[:20],
        "random": RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "public keys": keys.public_bytes(),
        "trailing": query + b"\0",
    }
    ctxt_start = len(query) - len(bytes(dict(wire.unpack(query, wire.Kind.QUERY, InvalidCiphertext)[2])[b"CTXT"]))
    flipped = bytearray(query)
    flipped[ctxt_start + 17] ^= 0xFF  # in the zstd frame magic inside the SEAL blob
    bad["flipped"] = bytes(flipped)
    for name, data in bad.items():
        with pytest.raises(InvalidCiphertext) as info:
            layer.apply(data, public)
        assert len(str(info.value)) > 20, name
    with pytest.raises(InvalidCiphertext, match="must be bytes"):
        layer.apply("not bytes", public)
    for offset in range(ctxt_start + 40, len(query), 7919):  # corrupt compressed data: refused or garbage, no crash
        corrupt = bytearray(query)
        corrupt[offset] ^= 0x5A
        try:
            assert isinstance(layer.apply(bytes(corrupt), public), bytes)
        except InvalidCiphertext:
            pass


def _replace_ctxt(blob: bytes, new_ctxt: bytes) -> bytes:
    kind, fingerprint, sections = wire.unpack(blob, wire.Kind.QUERY, InvalidCiphertext)
    return wire.pack(kind, fingerprint, [(t, new_ctxt if t == b"CTXT" else bytes(p)) for t, p in sections])


def test_forged_seal_payloads_are_refused():
    layer, keys, public = setup(100, 3)
    query = encrypt(keys, layer.layout, RNG.normal(0, 1, (1, 100)))[0]
    _, _, sections = wire.unpack(query, wire.Kind.QUERY, InvalidCiphertext)
    ctxt = bytes(dict(sections)[b"CTXT"])
    # a zstd "bomb": many RLE blocks of 128 KiB each, far beyond a ciphertext's size
    frame = struct.pack("<IBB", wire.ZSTD_MAGIC, 0x00, 0x58)
    rle = ((128 * 1024) << 3 | 1 << 1).to_bytes(3, "little") + b"\0"
    frame += rle * 200 + ((128 * 1024) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\0"
    bomb = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 0, 2, 0, 16 + len(frame)) + frame
    wrong_size = bytearray(ctxt)
    wrong_size[8:16] = struct.pack("<Q", len(ctxt) + 7)
    for forged in (bomb, bytes(wrong_size), ctxt[:16], b"\x5e\xa1" + bytes(40)):
        with pytest.raises(InvalidCiphertext):
            layer.apply(_replace_ctxt(query, forged), public)


def test_query_for_other_parameters_or_layout_is_refused():
    layer, keys, public = setup(100, 3)
    other_layer, other_keys, _ = setup(384, 2)
    query_384 = encrypt(other_keys, other_layer.layout, RNG.normal(0, 1, (1, 384)))[0]
    with pytest.raises(ParameterMismatch, match="expects"):
        layer.apply(query_384, public)
    big = EncryptedLinear(RNG.normal(0, 1, (3, 100)), profile=N16384)
    big_keys = ClientKeys.generate(N16384, big.rotation_steps)
    query_n16384 = encrypt(big_keys, big.layout, RNG.normal(0, 1, (1, 100)))[0]
    with pytest.raises(ParameterMismatch, match="other CKKS parameters"):
        layer.apply(query_n16384, public)
    with pytest.raises(ParameterMismatch, match="profile"):
        layer.apply(encrypt(keys, layer.layout, RNG.normal(0, 1, (1, 100)))[0],
                    PublicKeys.from_bytes(big_keys.public_bytes()))
    with pytest.raises(ParameterMismatch, match="other CKKS parameters"):
        PublicKeys.from_bytes(big_keys.public_bytes(), layer.layout)
    with pytest.raises(ParameterMismatch, match=r"shape \(n, 100\)"):
        encrypt(keys, layer.layout, RNG.normal(0, 1, (2, 99)))


def test_reply_validation():
    layer, keys, public = setup(100, 3)
    query = encrypt(keys, layer.layout, RNG.normal(0, 1, (1, 100)))[0]
    with pytest.raises(InvalidCiphertext, match="expected a reply"):
        decrypt(keys, layer.layout, [query], 1)
    with pytest.raises(InvalidCiphertext):
        decrypt(keys, layer.layout, [layer.apply(query, public)[:-10]], 1)
    with pytest.raises(EncryptedError, match="replies"):
        decrypt(keys, layer.layout, [layer.apply(query, public)], 40)
    X = RNG.normal(0, 1, (40, 100))  # 32 + 8 inputs: replies swapped are caught by their counts
    replies = [layer.apply(q, public) for q in encrypt(keys, layer.layout, X)]
    with pytest.raises(ParameterMismatch, match="order"):
        decrypt(keys, layer.layout, replies[::-1], 40)


# --- keys -------------------------------------------------------------------------------------------

def test_public_material_never_carries_a_secret_key():
    layer, keys, public = setup(100, 3)
    with pytest.raises(InvalidKeys, match="secret key"):
        PublicKeys.from_bytes(keys.to_bytes())
    kind, fingerprint, sections = wire.unpack(keys.public_bytes(), wire.Kind.PUBLIC_KEYS, InvalidKeys)
    smuggled = wire.pack(kind, fingerprint, [(t, bytes(p)) for t, p in sections] +
                         [(b"SECK", wire.seal_to_bytes(keys.secret_key))])
    with pytest.raises(InvalidKeys, match="secret key"):
        PublicKeys.from_bytes(smuggled)
    assert b"SECK" not in [t for t, _ in sections]


def test_bad_public_key_bytes():
    layer, keys, public = setup(100, 3)
    data = keys.public_bytes()
    for bad in (data[:100], data[:-1], b"XSHE" + bytes(36), RNG.integers(0, 256, 999, dtype=np.uint8).tobytes()):
        with pytest.raises(InvalidKeys):
            PublicKeys.from_bytes(bad)
    with pytest.raises(InvalidKeys, match="lack Galois keys"):
        few = ClientKeys.generate(layer.layout.profile, layer.rotation_steps[:1])
        layer.apply(encrypt(keys, layer.layout, np.ones((1, 100)))[0], PublicKeys.from_bytes(few.public_bytes()))
    with pytest.raises(InvalidKeys, match="PublicKeys"):
        layer.apply(encrypt(keys, layer.layout, np.ones((1, 100)))[0], data)


def test_secret_keys_roundtrip_and_seeded_generation():
    layer, X, queries, replies, Y = roundtrip(100, 3, 2)
    _, keys, _ = setup(100, 3)
    restored = ClientKeys.from_bytes(keys.to_bytes())
    assert np.allclose(decrypt(restored, layer.layout, replies, 2), Y)
    a = ClientKeys.generate(layer.layout.profile, layer.rotation_steps, seed=7)
    b = ClientKeys.generate(layer.layout.profile, layer.rotation_steps, seed=7)
    c = ClientKeys.generate(layer.layout.profile, layer.rotation_steps, seed=8)
    secret = wire.seal_to_bytes
    assert secret(a.secret_key) == secret(b.secret_key) != secret(c.secret_key)
    assert a.galois_blob != b.galois_blob  # key-switching randomness stays fresh
    reply = layer.apply(encrypt(a, layer.layout, X)[0], PublicKeys.from_bytes(b.public_bytes()))
    assert rel_err(decrypt(b, layer.layout, [reply], 2), layer.plain(X)) < 1e-3


# --- profiles and layouts -----------------------------------------------------------------------------

def test_profiles_pass_the_128_bit_check_and_insecure_ones_raise():
    import tenseal.sealapi as seal
    for profile in (N8192, N16384):
        assert profile.context().parameters_set()
    with pytest.raises(InsecureParameters, match="218"):
        CkksProfile("too-big", 8192, (60, 60, 60, 60), 40)
    with pytest.raises(InsecureParameters):
        CkksProfile("one-prime", 8192, (60, 60), 40)
    params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    params.set_poly_modulus_degree(8192)
    params.set_coeff_modulus(seal.CoeffModulus.Create(8192, [60, 40, 60]))
    assert seal.SEALContext(params, True, seal.SEC_LEVEL_TYPE.TC128).parameters_set()


def test_layout_is_plain_json_data():
    layer, *_ = setup(640, 20)
    data = json.loads(json.dumps(layer.layout.to_dict()))
    assert LinearLayout.from_dict(data) == layer.layout
    assert data["rotation_steps"] == layer.rotation_steps
    data["lanes"] = 8
    with pytest.raises(InvalidLayout):
        LinearLayout.from_dict(data)
    with pytest.raises(InvalidLayout):
        LinearLayout.from_dict({"version": 1})
    with pytest.raises(InvalidLayout, match="N16384"):
        EncryptedLinear(np.ones((2, 5000)))


def test_bad_weights_are_refused():
    with pytest.raises(EncryptedError, match="NaN"):
        EncryptedLinear(np.full((2, 8), np.nan))
    with pytest.raises(EncryptedError, match="bias"):
        EncryptedLinear(np.ones((2, 8)), np.ones(3))
    with pytest.raises(EncryptedError, match="all zero"):
        EncryptedLinear(np.zeros((2, 8)))


@pytest.mark.parametrize("pairing", ["outputs", "inputs"])
def test_sparse_weight_skips_zero_diagonals(pairing):
    W = np.zeros((6, 64))
    W[np.arange(6), np.arange(6) * 7] = np.arange(1, 7)  # most generalised diagonals are all zero
    layer = EncryptedLinear(W, np.arange(6.0), pairing=pairing)
    keys = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
    X = RNG.normal(0, 1, (3, 64))
    reply = layer.apply(encrypt(keys, layer.layout, X)[0], PublicKeys.from_bytes(keys.public_bytes()))
    assert rel_err(decrypt(keys, layer.layout, [reply], 3), layer.plain(X)) < 1e-3
