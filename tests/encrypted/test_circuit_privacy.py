"""Circuit-private replies and output noise: what a client holding the secret key can learn from a reply."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp

from encrypted import (N8192, ClientKeys, EncryptedLinear, InvalidKeys, InvalidLayout, PublicKeys, decode_slots,
                       decrypt, encrypt)
from encrypted.profiles import N8192_PRIVATE

pytestmark = pytest.mark.he

D, K = 64, 4


def ideal_slots(layer: EncryptedLinear, Y: np.ndarray) -> np.ndarray:
    """The exact complex slot vector of a reply whose lanes hold outputs Y (lanes, k): pairing "outputs"."""
    L = layer.layout
    kc = L.complex_rows
    rows = np.zeros((L.stride, L.block_rows), dtype=np.complex128)
    rows[:, :kc] = Y[:, :kc]
    rows[:, :K - kc] += 1j * Y[:, kc:]
    return rows[:, np.arange(L.padded_input) % L.block_rows].T.ravel()


@pytest.fixture(scope="module")
def pair():
    """Two weight matrices that agree on x (W2 = W1 + M, rows of M orthogonal to x), the same bias, and a client."""
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, D)
    W1 = rng.normal(0, 1, (K, D))
    W1 *= 600 / np.linalg.norm(W1, axis=1, keepdims=True)
    M = rng.normal(0, 1, (K, D))
    M -= np.outer(M @ x, x) / (x @ x)
    M *= 500 / np.linalg.norm(M, axis=1, keepdims=True)
    W2 = W1 + M
    b = rng.normal(0, 0.5, K)
    X = np.tile(x, (N8192_PRIVATE.slots // D, 1))  # x in every lane
    assert np.max(np.abs(X @ W1.T - X @ W2.T)) < 1e-9
    layers = {(w, flood): EncryptedLinear(W, b, N8192_PRIVATE, circuit_privacy=30 if flood else None,
                                          input_norm_bound=float(np.linalg.norm(x)) + 1)
              for w, W in (("W1", W1), ("W2", W2)) for flood in (False, True)}
    keys = ClientKeys.generate(N8192_PRIVATE, layers["W1", False].rotation_steps)
    public = PublicKeys.from_bytes(keys.public_bytes(), layers["W1", False].layout)
    return layers, keys, public, X


def errors(layer, keys, public, X, n: int) -> np.ndarray:
    """Decoded slot error (reply minus the exact outputs) of n replies, each to a fresh encryption of X."""
    ideal = ideal_slots(layer, layer.plain(X))
    out = []
    for _ in range(n):
        query = encrypt(keys, layer.layout, X)[0]
        out.append(decode_slots(keys, layer.apply(query, public), layer.layout)[0] - ideal)
    return np.array(out)


def test_flooded_replies_hide_weights_that_agree_on_the_query(pair):
    layers, keys, public, X = pair
    assert layers["W1", True].flood_sigma == layers["W2", True].flood_sigma  # same rounded row norm: same flood
    # the best linear distinguisher: project onto the difference of the unflooded mean errors (a separate sample)
    calib = {w: errors(layers[w, False], keys, public, X, 10) for w in ("W1", "W2")}
    u = (calib["W2"] - calib["W1"]).mean(axis=0).real
    u /= np.linalg.norm(u)
    for w in ("W1", "W2"):  # the W-dependent noise stays inside the bound the flood is sized for
        noise_norm = np.sqrt(np.mean(np.abs(calib[w]) ** 2, axis=1)).max() * N8192_PRIVATE.scale
        assert noise_norm < layers[w, True].noise_bound, (noise_norm, layers[w, True].noise_bound)

    def statistics(flood: bool) -> tuple[float, float]:
        e1, e2 = (errors(layers[w, flood], keys, public, X, 40) for w in ("W1", "W2"))
        size = ks_2samp(np.log(np.abs(e1).std(axis=1)), np.log(np.abs(e2).std(axis=1))).pvalue
        direction = ks_2samp(e1.real @ u, e2.real @ u).pvalue
        return size, direction

    off = statistics(False)
    assert max(off) < 1e-6, off  # without flooding both statistics tell W1 from W2 at once
    on = statistics(True)
    assert min(on) > 1e-5, on  # with flooding neither does (a false alarm: about 2e-5 per run)


def test_flood_std_is_what_the_layer_states(pair):
    layers, keys, public, X = pair
    layer = layers["W1", True]
    e = errors(layer, keys, public, X, 3)
    assert 0.003 < layer.flood_std < 0.3
    assert abs(e.real.std() / layer.flood_std - 1) < 0.05 and abs(e.imag.std() / layer.flood_std - 1) < 0.05
    Y = decrypt(keys, layer.layout, [layer.apply(encrypt(keys, layer.layout, X)[0], public)], len(X))
    assert np.argmax(Y, axis=1).tolist() == np.argmax(layer.plain(X), axis=1).tolist()


def test_replies_are_rerandomised(pair):
    layers, keys, public, X = pair
    query = encrypt(keys, layers["W1", True].layout, X)[0]
    assert layers["W1", True].apply(query, public) != layers["W1", True].apply(query, public)
    assert layers["W1", False].apply(query, public) == layers["W1", False].apply(query, public)


def test_circuit_privacy_needs_the_clients_public_key(pair):
    layers, keys, public, X = pair
    layer = layers["W1", True]
    without = PublicKeys(public.profile, public.rotation_steps, public.galois_keys, public.nbytes)
    with pytest.raises(InvalidKeys, match="PUBK"):
        layer.apply(encrypt(keys, layer.layout, X)[0], without)


def test_public_key_section_is_bounded_and_checked(pair):
    from encrypted import wire
    layers, keys, public, X = pair
    layout = layers["W1", False].layout
    kind, fp, sections = wire.unpack(keys.public_bytes(), wire.Kind.PUBLIC_KEYS, ValueError)
    def swap(payload: bytes) -> bytes:
        return wire.pack(kind, fp, [(t, payload if t == b"PUBK" else bytes(p)) for t, p in sections])
    pubk = bytes(dict(sections)[b"PUBK"])
    with pytest.raises(InvalidKeys, match="public key"):
        PublicKeys.from_bytes(swap(pubk[:-100]), layout)  # truncated
    _, _, query_sections = wire.unpack(encrypt(keys, layout, X)[0], wire.Kind.QUERY, ValueError)
    with pytest.raises(InvalidKeys, match="public key"):  # a query-level ciphertext is not a key-level public key
        PublicKeys.from_bytes(swap(bytes(dict(query_sections)[b"CTXT"])), layout)
    forged = bytearray(pubk)
    forged[8:16] = (10**9).to_bytes(8, "little")  # header claims a 1 GB object
    with pytest.raises(InvalidKeys, match="public key"):
        PublicKeys.from_bytes(swap(bytes(forged)), layout)


def test_default_profile_refuses_a_flood_it_cannot_carry():
    W = np.random.default_rng(0).normal(0, 0.1, (3, 16))
    with pytest.raises(InvalidLayout, match="N8192_PRIVATE"):
        EncryptedLinear(W, None, N8192, circuit_privacy=40)
    with pytest.raises(ValueError, match="circuit_privacy"):
        EncryptedLinear(W, None, N8192_PRIVATE, circuit_privacy=True)


@pytest.mark.parametrize("pairing", ["outputs", "inputs"])
def test_output_noise_has_the_stated_std_in_every_replica(pairing):
    sigma = 0.05
    rng = np.random.default_rng(3)
    W, b = rng.normal(0, 0.2, (5, 100)), rng.normal(0, 1, 5)
    layer = EncryptedLinear(W, b, N8192, pairing=pairing, output_noise=sigma)
    plain = EncryptedLinear(W, b, N8192, pairing=pairing)
    keys = ClientKeys.generate(N8192, layer.rotation_steps)
    public = PublicKeys.from_bytes(keys.public_bytes(), layer.layout)
    X = rng.normal(0, 1, (layer.lanes, 100))
    query = encrypt(keys, layer.layout, X)[0]
    replies = [layer.apply(query, public) for _ in range(8)]
    noise = np.concatenate([decrypt(keys, layer.layout, [r], len(X)) - layer.plain(X) for r in replies])
    m = noise.size
    assert abs(noise.std() / sigma - 1) < 5 / np.sqrt(2 * m)  # 5 standard errors of a std estimate
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(m)
    assert np.max(np.abs(decrypt(keys, plain.layout, [plain.apply(query, public)], len(X)) - plain.plain(X))) < 1e-4
    # a row's replicas carry the same noise, so averaging them cannot remove it
    L = layer.layout
    slots = decode_slots(keys, replies[0], L)[0].reshape(L.padded_input // L.block_rows, L.block_rows, L.stride)
    assert np.max(np.abs(slots - slots[0])) < 1e-4
    with pytest.raises(ValueError, match="output_noise"):
        EncryptedLinear(W, b, N8192, output_noise=-1.0)
