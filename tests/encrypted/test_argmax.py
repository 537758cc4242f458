"""Label-only answers: the secure argmax over masked CKKS replies (`encrypted.argmax`), what a client holding every
key learns from it, and the hostile bytes either side may send."""
from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
from scipy.stats import ks_2samp

from encrypted import (N8192_LABEL, ArgmaxKeys, ArgmaxPublicKeys, ArgmaxSpec, ClientArgmax, ClientKeys,
                       EncryptedError, EncryptedLinear, InvalidCiphertext, InvalidKeys, InvalidLayout, ProviderArgmax,
                       PublicKeys, decrypt, encrypt)
from encrypted.argmax_keys import MAGIC, plaintext_prime

pytestmark = pytest.mark.he

KEY_BITS = 512  # the protocol is the same at 2,048 bits (the default); small keys keep the tests fast


@pytest.fixture(scope="module")
def keys() -> ArgmaxKeys:
    return ArgmaxKeys.generate(KEY_BITS)


def run(keys: ArgmaxKeys, spec: ArgmaxSpec, masked: np.ndarray, masks: np.ndarray) -> ClientArgmax:
    """One label-only answer in process: the client's and the provider's messages, each checked for its size."""
    provider = ProviderArgmax(keys.public(), spec, masks)
    client = ClientArgmax(keys, spec, masked)
    message = client.first_message()
    while message is not None:
        assert len(message) == provider.expected_bytes()
        message = client.handle(provider.handle(message))
    assert provider.done
    return client


def shares(spec: ArgmaxSpec, logits: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(masked logits the client holds, fixed-point masks the provider holds), as a CKKS reply would leave them."""
    masks = np.random.default_rng(seed).integers(-2**43, 2**43, logits.shape)
    return logits + masks / 2.0**spec.fraction_bits, masks


@pytest.mark.parametrize("k", [2, 3, 7, 20])
def test_the_label_is_the_argmax_for_any_class_count(keys, k):
    spec = ArgmaxSpec(k)
    logits = np.random.default_rng(k).normal(0, 4, (3, k))
    client = run(keys, spec, *shares(spec, logits))
    np.testing.assert_array_equal(client.labels, logits.argmax(1))


def test_ties_go_to_the_higher_class_index_and_extremes_inside_the_range_are_exact(keys):
    spec = ArgmaxSpec(6)
    limit = 2.0**spec.logit_bits - 1
    logits = np.array([[1.0, 3.0, 3.0, -2.0, 3.0, 0.0],  # a three-way tie: the highest index of them
                       [-limit, -limit + 1, -limit, -limit, -limit, -limit],
                       [limit, limit - 0.01, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 2.0**-spec.fraction_bits]])  # one step of the fixed point apart
    np.testing.assert_array_equal(run(keys, spec, *shares(spec, logits)).labels, [4, 1, 0, 5])


def test_the_spec_refuses_what_it_cannot_compare():
    for bad in ({"classes": 1}, {"classes": 300}, {"classes": 4, "logit_bits": 30}, {"classes": True}):
        with pytest.raises(InvalidLayout):
            ArgmaxSpec(**bad)
    with pytest.raises(InvalidLayout, match="version"):
        ArgmaxSpec.from_dict({"classes": 4})
    assert ArgmaxSpec.from_dict(ArgmaxSpec(9).to_dict()) == ArgmaxSpec(9)


@pytest.fixture(scope="module")
def served():
    """A label-only layer (N8192_LABEL, circuit-private) over a random head, and a CKKS client for it."""
    rng = np.random.default_rng(3)
    d, k = 32, 3
    layer = EncryptedLinear(rng.normal(0, 1, (k, d)), rng.normal(0, 0.5, k), N8192_LABEL, circuit_privacy=30)
    ckks = ClientKeys.generate(layer.layout.profile, layer.layout.rotation_steps)
    public = PublicKeys.from_bytes(ckks.public_bytes(), layer.layout)
    layer.check_keys(public)
    return layer, ckks, public


def label_answer(layer, ckks, public, argmax_keys, X: np.ndarray) -> tuple[np.ndarray, ClientArgmax, np.ndarray]:
    """(labels, the client's argmax, the masked logits it decrypted) for rows X (at most `lanes`)."""
    spec = ArgmaxSpec(layer.output_dim)
    [query] = encrypt(ckks, layer.layout, X)
    reply, masks, count = layer.apply_masked(query, public, spec.fraction_bits)
    assert count == len(X) and masks.shape == (layer.lanes, layer.output_dim)
    masked = decrypt(ckks, layer.layout, [reply], len(X))
    client = run(argmax_keys, spec, masked, masks[:count])
    return client.labels, client, masked


def test_labels_equal_the_plaintext_argmax_on_1000_random_states_outside_the_margin(served, keys):
    layer, ckks, public = served
    X = np.random.default_rng(11).normal(0, 1, (1000, layer.input_dim))
    labels = np.concatenate([label_answer(layer, ckks, public, keys, X[i:i + layer.lanes])[0]
                             for i in range(0, len(X), layer.lanes)])
    logits = layer.plain(X)
    top = np.sort(logits, axis=1)
    margin = 6 * math.sqrt(2) * layer.flood_std + 2.0**-10  # what a server publishes as label_margin
    clear = top[:, -1] - top[:, -2] > margin
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(labels[clear], logits[clear].argmax(1))  # every row outside the margin
    # inside the margin the flood may flip a near-tie: ~2.8 of these 1,000 rows on average (simulated from the
    # noise model); 15 would take a noise far wider than the published flood_std
    assert np.sum(labels != logits.argmax(1)) <= 15


def test_a_masked_reply_decrypts_to_the_logits_plus_the_masks_the_provider_keeps(served):
    layer, ckks, public = served
    X = np.random.default_rng(5).normal(0, 1, (2, layer.input_dim))
    [query] = encrypt(ckks, layer.layout, X)
    reply, masks, count = layer.apply_masked(query, public, 10)
    masked = decrypt(ckks, layer.layout, [reply], 2)
    assert count == 2 and np.abs(masks).max() > 2.0**(layer.mask_bits + 10 - 4)  # masks span their range
    error = masked - masks[:2] / 1024 - layer.plain(X)
    assert np.abs(error).max() < 8 * layer.flood_std  # the flood's noise, nothing else
    plain = EncryptedLinear(layer.weight, layer.bias, N8192_LABEL)  # not circuit-private: refused
    with pytest.raises(EncryptedError, match="circuit-private"):
        plain.apply_masked(query, public, 10)


def client_view(layer, ckks, public, keys, x: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """What a client decrypts over n label-only answers for state x: the masked logits and every argmax value."""
    view: dict[str, list] = {"masked": [], "comparison": [], "delta": [], "difference": [], "label_high": []}
    for _ in range(n):
        labels, client, masked = label_answer(layer, ckks, public, keys, x[None, :])
        view["masked"].append(masked[0])
        for kind in ("comparison", "delta", "difference"):
            view[kind] += client.seen[kind]
        view["label_high"] += [v >> client.spec.label_bits for v in client.seen["label_value"]]
        view.setdefault("labels", []).append(int(labels[0]))
    return {key: np.asarray(value, dtype=np.float64) for key, value in view.items()}


def test_heads_that_agree_on_the_argmax_give_answers_a_client_cannot_tell_apart(served, keys):
    """Two heads with the same argmax on x but other logits everywhere: KS tests on everything the client decrypts
    (masked logits, comparison values, selection bits and values, the label's high bits) find nothing, while the
    same test on logits replies tells them apart at once."""
    layer, ckks, public = served
    x = np.random.default_rng(9).normal(0, 1, layer.input_dim)
    first = layer.plain(x)
    second = first.copy()
    winner = int(first.argmax())
    second[winner] += 3.0
    second[[i for i in range(layer.output_dim) if i != winner]] -= np.array([2.5, -1.0])  # other logits moved
    assert second.argmax() == winner and np.all(np.abs(second - first) > 0.9)
    W2 = layer.weight + np.outer(second - first, x) / (x @ x)
    other = EncryptedLinear(W2, layer.bias, N8192_LABEL, circuit_privacy=30)
    np.testing.assert_allclose(other.plain(x), second)
    views = [client_view(head, ckks, public, keys, x, 40) for head in (layer, other)]
    for j in range(layer.output_dim):  # each class's masked logit
        p = ks_2samp(views[0]["masked"][:, j], views[1]["masked"][:, j]).pvalue
        assert p > 1e-4, ("masked", j, p)
    for key in ("comparison", "difference", "label_high"):
        p = ks_2samp(views[0][key], views[1][key]).pvalue
        assert p > 1e-4, (key, p)
    assert abs(views[0]["delta"].mean() - views[1]["delta"].mean()) < 0.3  # the bits' rate: shuffled alike (3.8 std)
    assert set(views[0]["labels"]) == set(views[1]["labels"]) == {winner}
    # the control: logits replies of the same two heads are told apart at once
    logits = [np.array([decrypt(ckks, head.layout, [head.apply(encrypt(ckks, head.layout, x[None])[0], public)], 1)[0]
                        for _ in range(10)]) for head in (layer, other)]
    assert ks_2samp(logits[0][:, winner], logits[1][:, winner]).pvalue < 1e-4


def test_hostile_messages_get_typed_errors_at_every_stage(keys):
    """Wrong sizes, non-units and random ciphertexts of the right size: an EncryptedError, or garbage labels for the
    sender, never another exception; a provider answer that decodes to no class is refused by the client."""
    spec = ArgmaxSpec(5)
    masked, masks = shares(spec, np.random.default_rng(1).normal(0, 2, (2, 5)))
    rng = np.random.default_rng(2)
    for stage_to_break in range(6):
        provider, client = ProviderArgmax(keys.public(), spec, masks), ClientArgmax(keys, spec, masked)
        message, step = client.first_message(), 0
        while message is not None and not provider.done:
            if step == stage_to_break:
                size = provider.expected_bytes()
                for bad in (message[:-1], message + b"\0", b"\0" * size, b"\xff" * size):
                    with pytest.raises(InvalidCiphertext):
                        ProviderArgmax(keys.public(), spec, masks).handle(bad) if step == 0 else provider.handle(bad)
                message = bytes(rng.integers(0, 256, size, dtype=np.uint8))  # random, right-sized
                try:
                    reply = provider.handle(message)
                except EncryptedError:
                    break
                try:
                    message = client.handle(reply)
                except EncryptedError:
                    break
            else:
                message = client.handle(provider.handle(message))
            step += 1
    bogus = ArgmaxSpec(3)  # a provider that sends a class beyond the head's: refused by the client
    client = ClientArgmax(keys, bogus, np.zeros((1, 3)))
    client.first_message()
    client.stage = "label"
    label = keys.paillier.unsafe_encrypt(3, apply_encoding=False).get_value()  # class 3 of 3
    with pytest.raises(InvalidCiphertext, match="beyond"):
        client.handle(label.to_bytes((keys.paillier.public_key.n_squared.bit_length() + 7) // 8, "big"))


def test_public_keys_are_parsed_bounded_and_checked(keys):
    blob = keys.public_bytes()
    assert ArgmaxPublicKeys.from_bytes(blob).paillier.public_key.n == keys.paillier.public_key.n

    def with_field(index: int, value: int) -> bytes:
        parts, pos = [], len(MAGIC)
        for _ in range(6):
            size = int.from_bytes(blob[pos:pos + 2], "big")
            parts.append(int.from_bytes(blob[pos + 2:pos + 2 + size], "big"))
            pos += 2 + size
        parts[index] = value
        out = [MAGIC]
        for part in parts:
            raw = part.to_bytes(max(1, (part.bit_length() + 7) // 8), "big")
            out.append(len(raw).to_bytes(2, "big") + raw)
        return b"".join(out)

    n = keys.paillier.public_key.n
    bad = {"truncated": blob[:-3], "trailing": blob + b"\0", "magic": b"XXXX1" + blob[5:], "empty": b"",
           "oversize": blob + b"\0" * 5000, "even modulus": with_field(0, n + 1), "small modulus": with_field(0, 3 * 5),
           "square": with_field(0, (2**300 + 7) ** 2), "small factor": with_field(0, n * 3),
           "u": with_field(4, plaintext_prime() + 2), "t": with_field(5, 8), "g = 1": with_field(2, 1),
           "h = -1": with_field(3, keys.dgk.public_key.n - 1)}
    for name, body in bad.items():
        with pytest.raises(InvalidKeys) as caught:
            ArgmaxPublicKeys.from_bytes(body)
        assert "ArgmaxKeys" in str(caught.value) or "bits" in str(caught.value), name


def test_keys_are_saved_for_the_owner_only_and_load_back(keys, tmp_path):
    path = tmp_path / "client" / "argmax-keys.json"
    keys.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = ArgmaxKeys.load(path)
    assert loaded.public_bytes() == keys.public_bytes()
    spec = ArgmaxSpec(4)
    logits = np.array([[0.5, -1.0, 2.0, 1.9]])
    assert run(loaded, spec, *shares(spec, logits)).labels.tolist() == [2]
    path.write_text("{}")
    with pytest.raises(InvalidKeys, match="generate new keys"):
        ArgmaxKeys.load(path)
