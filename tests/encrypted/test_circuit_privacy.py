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


# --- keys a malicious client crafts (the audit of issue 25) -----------------------------------------------------

def reply_c1(layout, reply: bytes) -> list[np.ndarray]:
    """Each reply block's second polynomial, coefficient form, (primes, N) uint64."""
    import tenseal.sealapi as seal

    from encrypted.key_checks import coefficients
    from encrypted.messages import read_reply

    evaluator = seal.Evaluator(layout.profile.context())
    blocks, _ = read_reply(reply, layout)
    out = []
    for ct in blocks:
        evaluator.transform_from_ntt_inplace(ct)
        out.append(coefficients(ct)[1])
    return out


def distance(a: list[np.ndarray], b: list[np.ndarray], moduli: list[int]) -> int:
    """The largest centred difference between two replies' polynomials, modulo each prime."""
    worst = 0
    for x, y in zip(a, b):
        for prime, q in enumerate(moduli):
            q64 = np.uint64(q)
            d = np.where(x[prime] >= y[prime], x[prime] - y[prime], q64 - (y[prime] - x[prime]))
            worst = max(worst, int(np.minimum(d, q64 - d).max()))
    return worst


def test_a_crafted_public_key_tells_weights_apart_in_one_reply_and_is_refused(pair):
    """The audit's PUBK (0, 1): the reply's c1 is then the deterministic one, which the client recomputes for each
    candidate W (it has the query and the Galois keys); `check_keys` refuses that key, and the keys that leave
    either part bare."""
    from encrypted.messages import reply_parms_id
    from tests.encrypted.crafted_keys import crafted_keys, with_public_key

    layers, keys, public, X = pair
    layout = layers["W1", True].layout
    crafted = {name: PublicKeys.from_bytes(with_public_key(keys.public_bytes(), blob), layout)  # the parser accepts
               for name, blob in crafted_keys(N8192_PRIVATE, public.public_key).items()}
    context = N8192_PRIVATE.context()
    moduli = [m.value() for m in context.get_context_data(reply_parms_id(N8192_PRIVATE)).parms().coeff_modulus()]
    query = encrypt(keys, layout, X)[0]
    candidates = {w: reply_c1(layout, layers[w, False].apply(query, crafted["(0, 1)"])) for w in ("W1", "W2")}
    for truth in ("W1", "W2"):  # the provider serves `truth`, circuit-private, to the crafted key
        seen = reply_c1(layout, layers[truth, True].apply(query, crafted["(0, 1)"]))
        gaps = {w: distance(seen, c1, moduli) for w, c1 in candidates.items()}
        assert min(gaps, key=gaps.get) == truth and gaps[truth] < 2**8 and max(gaps.values()) > 2**40, gaps
    for name, crafted_key in crafted.items():
        with pytest.raises(InvalidKeys, match="does not re-randomise") as refused:
            layers["W1", True].check_keys(crafted_key)
        assert "ClientKeys.public_bytes()" in str(refused.value), name
    honest = [public] + [PublicKeys.from_bytes(ClientKeys.generate(N8192_PRIVATE, layout.rotation_steps).public_bytes(),
                                               layout) for _ in range(2)]
    for key in honest:
        layers["W1", True].check_keys(key)  # real keys pass (a false refusal is far below 2^-40)
    without = PublicKeys(public.profile, public.rotation_steps, public.galois_keys, public.nbytes)
    with pytest.raises(InvalidKeys, match="no PUBK"):
        layers["W1", True].check_keys(without)
    layers["W1", False].check_keys(without)  # a layer without circuit privacy never uses the PUBK


def test_the_uniformity_statistic_passes_uniform_residues_and_flags_structured_ones():
    from encrypted.key_checks import uniformity_problem

    rng = np.random.default_rng(0)
    n = N8192_PRIVATE.poly_modulus_degree
    for q in ((1 << 30) - 35, (1 << 60) - 93):  # a 30-bit and a 60-bit modulus (primality does not matter here)
        assert all(uniformity_problem(rng.integers(0, q, n, dtype=np.uint64), q) is None for _ in range(20))
        small = rng.integers(-2**20, 2**20, n) % q  # a small polynomial in coefficient form: both ends of [0, q)
        sparse = np.where(rng.random(n) < 0.3, rng.integers(0, q, n, dtype=np.uint64), 0)
        half = rng.integers(0, q // 2, n, dtype=np.uint64)  # one bit short of entropy
        for structured in (small.astype(np.uint64), sparse.astype(np.uint64), half, np.full(n, 7, np.uint64)):
            assert uniformity_problem(structured, q) is not None
