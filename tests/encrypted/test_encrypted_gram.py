"""Private-fit kernel (ring-LWE, plaintext-matrix x ciphertext-matrix): Enc(Ẑ_A) chunks in, Enc(Ẑ_Aᵀ Ẑ_B) out;
plans and sizes, ordering, hostile bytes, what the provider sees and what a client can read from an answer."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from encrypted import (EncryptedError, FitKeys, GramAccumulator, GramPlan, InsecureParameters, InvalidCiphertext,
                       InvalidKeys, InvalidLayout, ParameterMismatch, decrypt_gram, encrypt_chunk, key_seed_for,
                       plan_gram, read_fit_key)
from encrypted import gram_wire, wire
from encrypted.gram import chunk_masks, key_mask
from encrypted.gram_plan import META_SLACK, precision_bits
from encrypted.profiles import max_modulus_bits
from encrypted.rlwe import (NOISE_ETA, RING_DEGREE, SEED_BYTES, centre, mask, matmul_mod, ring_multiply,
                            switch_modulus)
from encrypted.wire import Kind

pytestmark = pytest.mark.he

# Parts of 100 and 45 rows in chunks of 32 end in partial chunks (4 and 13 rows); 40 target columns in result
# groups of 16 end in a partial group (8 rows). The big plan (2100 source columns) needs two secrets per key.
SOURCE, TARGET, PARTS, CHUNK_ROWS, RESULT_ROWS = 300, 40, (100, 45), 32, 16
BIG_SOURCE, BIG_TARGET, BIG_PARTS, BIG_CHUNK_ROWS = 2100, 8, (60, 28), 16
SEED = key_seed_for("test public set")
MAX_ABS_ERROR = 0.01  # the plan keeps output_bits = 10 fraction bits of G: about 2^-10.6 rms
MAX_REL_ERROR = 1e-4
_SETUP: dict = {}


def normalise(X: np.ndarray, train_rows: int) -> np.ndarray:
    """States normalised by the train part's mean and std, as both parties of a fit do."""
    mean, std = X[:train_rows].mean(axis=0), X[:train_rows].std(axis=0)
    return (X - mean) / std


def random_states(rng: np.random.Generator, parts: tuple[int, ...], source: int, target: int):
    """Ẑ_A, Ẑ_B: two encoders' states of the same rows (shared latent factors, offsets and scales), normalised."""
    rows = sum(parts)
    latent = rng.normal(0, 1, (rows, 6))
    A = latent @ rng.normal(0, 1, (6, source)) + rng.normal(0, 1, (rows, source)) + rng.normal(0, 3, source)
    B = (latent @ rng.normal(0, 1, (6, target)) + rng.normal(0, 1, (rows, target))) * rng.uniform(0.1, 10, target)
    return normalise(A, parts[0]), normalise(B + 5, parts[0])


def setup():
    """(plan, client keys, the provider's view of the key, Ẑ_A, Ẑ_B) of the small fit, built once."""
    if not _SETUP:
        plan = GramPlan(SOURCE, TARGET, PARTS, SEED, chunk_rows=CHUNK_ROWS, result_rows=RESULT_ROWS)
        keys = FitKeys.generate(plan)
        A, B = random_states(np.random.default_rng(14), PARTS, SOURCE, TARGET)
        _SETUP.update(plan=plan, keys=keys, key=read_fit_key(keys.public_bytes(), plan), A=A, B=B)
    return _SETUP["plan"], _SETUP["keys"], _SETUP["key"], _SETUP["A"], _SETUP["B"]


def part_rows(plan: GramPlan, X: np.ndarray, part: int) -> np.ndarray:
    start = sum(plan.part_rows[:part])
    return X[start:start + plan.part_rows[part]]


def chunk_rows(plan: GramPlan, Z: np.ndarray, chunk: int) -> np.ndarray:
    """Rows of chunk `chunk` of one part's states Z."""
    return Z[chunk * plan.chunk_rows:chunk * plan.chunk_rows + plan.chunk_rows]


def encrypt_part(keys: FitKeys, plan: GramPlan, part: int, Z: np.ndarray) -> list[bytes]:
    return [encrypt_chunk(keys, plan, part, c, chunk_rows(plan, Z, c)) for c in range(plan.chunks(part))]


def answer(plan: GramPlan, part: int, target: np.ndarray, messages: list[bytes], key: np.ndarray) -> list[bytes]:
    """The provider's side of one part: add every chunk in order, then answer."""
    acc = GramAccumulator(plan, part, target)
    for c, message in enumerate(messages):
        assert not acc.complete
        acc.add(message, c, key)
    assert acc.complete and acc.next_chunk == plan.chunks(part)
    return acc.results(key)


def small_fit(part: int):
    """(messages, results, Ẑ_A, Ẑ_B) of one part of the small fit."""
    plan, keys, key, A, B = setup()
    Za, Zb = part_rows(plan, A, part), part_rows(plan, B, part)
    messages = encrypt_part(keys, plan, part, Za)
    return messages, answer(plan, part, Zb, messages, key), Za, Zb


def assert_gram(G: np.ndarray, Za: np.ndarray, Zb: np.ndarray) -> None:
    ref = Za.T @ Zb
    assert G.shape == ref.shape
    assert np.max(np.abs(G - ref)) < MAX_ABS_ERROR
    assert np.linalg.norm(G - ref) / np.linalg.norm(ref) < MAX_REL_ERROR


def sections(message: bytes) -> list[tuple[bytes, bytes]]:
    _, _, found = wire.unpack(message, Kind(message[5]), EncryptedError, max_sections=wire.MAX_SECTIONS)
    return [(tag, bytes(payload)) for tag, payload in found]


def repack(message: bytes, edit=None, kind: Kind | None = None, fingerprint: bytes | None = None) -> bytes:
    """`message` rebuilt with its sections passed through `edit` and/or another kind or fingerprint."""
    found = sections(message)
    return wire.pack(kind or Kind(message[5]), fingerprint or message[8:40], edit(found) if edit else found)


def with_section(tag: bytes, payload: bytes):
    return lambda found: [(t, payload if t == tag else p) for t, p in found]


def with_meta(**changes):
    def edit(found):
        meta = {**json.loads(dict(found)[b"META"]), **changes}
        return with_section(b"META", wire.dump_json(meta))(found)
    return edit


# --- correctness ---------------------------------------------------------------------------------------------


def test_the_small_plan_has_partial_chunks_and_a_partial_result_group():
    plan, keys, key, *_ = setup()
    assert [plan.chunks(p) for p in (0, 1)] == [4, 2] and plan.rows(0, 3) == 4 and plan.rows(1, 1) == 13
    assert plan.groups == 3 and [plan.group_rows(g) for g in range(3)] == [16, 16, 8]
    assert plan.secrets == 1 and key.shape == (1, RING_DEGREE)
    assert keys.matrix.shape == (RING_DEGREE, SOURCE)


@pytest.mark.parametrize("part", [0, 1])
def test_decrypted_gram_equals_the_plaintext_product(part):
    plan, keys, *_ = setup()
    _, results, Za, Zb = small_fit(part)
    assert len(results) == plan.groups
    assert_gram(decrypt_gram(keys, plan, part, results), Za, Zb)


def test_independent_states_keep_the_plans_absolute_precision():
    """Uncorrelated states give a small G (about sqrt(rows)); its error stays at the plan's ~2^-10 all the same."""
    plan, keys, key, *_ = setup()
    rng = np.random.default_rng(3)
    Za, Zb = rng.normal(0, 1, (PARTS[1], SOURCE)), rng.normal(0, 1, (PARTS[1], TARGET))
    G = decrypt_gram(keys, plan, 1, answer(plan, 1, Zb, encrypt_part(keys, plan, 1, Za), key))
    error = G - Za.T @ Zb
    assert np.max(np.abs(error)) < MAX_ABS_ERROR and np.sqrt(np.mean(error ** 2)) < 2.0 ** -9


def test_more_source_columns_than_the_ring_degree_use_two_secrets():
    """2100 > 2048 message positions: columns 2048.. lie under the key's second secret and decrypt as well."""
    plan = plan_gram(BIG_SOURCE, BIG_TARGET, BIG_PARTS, SEED, chunk_rows=BIG_CHUNK_ROWS)
    assert plan.secrets == 2 and [plan.chunks(p) for p in (0, 1)] == [4, 2] and plan.groups == 1
    assert (plan.rows(0, 3), plan.rows(1, 1)) == (12, 12)
    keys = FitKeys.generate(plan)
    key = read_fit_key(keys.public_bytes(), plan)
    assert key.shape == (2, RING_DEGREE) and not np.array_equal(keys.secret[0], keys.secret[1])
    A, B = random_states(np.random.default_rng(5), BIG_PARTS, BIG_SOURCE, BIG_TARGET)
    for part in (0, 1):
        Za, Zb = part_rows(plan, A, part), part_rows(plan, B, part)
        G = decrypt_gram(keys, plan, part, answer(plan, part, Zb, encrypt_part(keys, plan, part, Za), key))
        assert_gram(G, Za, Zb)
        assert np.max(np.abs(G[RING_DEGREE:] - Za[:, RING_DEGREE:].T @ Zb)) < MAX_ABS_ERROR


# --- plans and sizes -----------------------------------------------------------------------------------------


def test_plan_dict_round_trips_through_json():
    plan, *_ = setup()
    data = json.loads(json.dumps(plan.to_dict()))
    again = GramPlan.from_dict(data)
    assert again == plan and again.fingerprint == plan.fingerprint
    big = plan_gram(BIG_SOURCE, BIG_TARGET, BIG_PARTS, SEED, chunk_rows=BIG_CHUNK_ROWS)
    assert GramPlan.from_dict(json.loads(json.dumps(big.to_dict()))) == big
    bits = precision_bits(PARTS)  # 145 rows: more bits than the defaults (what 4,096 rows need, and margin)
    assert bits == (20, 18) and precision_bits((3584, 512)) == (16, 10) == precision_bits((45000, 5000))
    assert plan_gram(SOURCE, TARGET, PARTS, SEED, chunk_rows=CHUNK_ROWS) == GramPlan(
        SOURCE, TARGET, PARTS, SEED, chunk_rows=CHUNK_ROWS, value_bits=bits[0], output_bits=bits[1])
    assert key_seed_for("test public set") == SEED != key_seed_for("another public set")


DERIVED = ("ring_degree", "modulus_bits", "c0_bits", "c1_bits", "chunks", "groups", "accumulator_bytes")
# target_shifts is an input (the provider's, from its states): changing it gives another plan


def _changed(value):
    if isinstance(value, list):
        return [v + 1 for v in value]
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    return value + 1


def test_tampered_plan_dicts_are_refused():
    plan, *_ = setup()
    data = json.loads(json.dumps(plan.to_dict()))
    assert set(DERIVED) < set(data)
    for name, value in data.items():
        tampered = {**data, name: _changed(value)}
        if name in DERIVED or name == "version":  # nothing else follows from these: any change is inconsistent
            with pytest.raises(InvalidLayout):
                GramPlan.from_dict(tampered)
            continue
        try:  # an input field: either inconsistent with the derived ones, or a different plan altogether
            other = GramPlan.from_dict(tampered)
        except InvalidLayout:
            continue
        assert other != plan and other.fingerprint != plan.fingerprint, name
    without_seed = {k: v for k, v in data.items() if k != "key_seed"}
    bad = [
        {**data, "extra": 1}, without_seed, {**data, "version": 1}, {**data, "version": None},
        {**data, "key_seed": "zz" * SEED_BYTES}, {**data, "key_seed": data["key_seed"][:-2]},
        {**data, "key_seed": data["key_seed"].upper()}, {**data, "key_seed": list(SEED)},
        {**data, "part_rows": [100, 80]},  # 3 chunks, the dict says 2
        {**data, "part_rows": list(range(1, 20))}, {**data, "part_rows": []}, {**data, "part_rows": "100"},
        {**data, "part_rows": [100, "45"]}, {**data, "source_dim": 10 ** 9}, {**data, "chunk_rows": 32.0},
        {**data, "value_bits": True}, {**data, "part_rows": [2 ** 21, 45]},  # over SEAL's bound (InsecureParameters)
        [1, 2], None, json.dumps(data),
    ]
    for tampered in bad:
        with pytest.raises(InvalidLayout):
            GramPlan.from_dict(tampered)


@pytest.mark.parametrize("args,match", [
    ((0, 40, (10,)), "source_dim"), ((True, 40, (10,)), "source_dim"), ((10, 0, (10,)), "target_dim"),
    ((10, 2.0, (10,)), "target_dim"), ((10, 40, ()), "part_rows"), ((10, 40, (0,)), "part_rows"),
    ((10, 40, (2 ** 31,)), "part_rows"), ((10, 40, (10,) * 9), "part_rows"), ((10, 40, "12"), "part_rows"),
])
def test_plan_gram_validates_every_int(args, match):
    with pytest.raises(InvalidLayout, match=match):
        plan_gram(*args, SEED)


def test_plan_gram_validates_the_seed_and_chunk_rows():
    for seed in (SEED[:-1], SEED.hex(), None):
        with pytest.raises(InvalidLayout, match="key_seed"):
            plan_gram(10, 40, (10,), seed)
    for rows in (0, 4097, True):
        with pytest.raises(InvalidLayout, match="chunk_rows"):
            plan_gram(10, 40, (10,), SEED, chunk_rows=rows)


def test_every_modulus_is_within_seals_128_bit_bound_and_a_too_large_part_names_the_fix():
    limit = max_modulus_bits(RING_DEGREE)
    assert limit == 54  # SEAL's CoeffModulus.MaxBitCount(2048, tc128)
    plans = [setup()[0], plan_gram(BIG_SOURCE, BIG_TARGET, BIG_PARTS, SEED),
             plan_gram(4, 4, (2 ** 20, 2 ** 19), SEED)]  # the largest parts allowed (train, val)
    for plan in plans:
        bits = [plan.modulus_bits(p) for p in range(len(plan.part_rows))]
        assert max(bits) <= limit and plan.key_bits == max(bits)
        assert all(plan.c0_bits(p) <= plan.c1_bits(p) <= plan.modulus_bits(p) for p in range(len(bits)))
    assert plans[2].key_bits == limit
    for rows in [(2 ** 20 + 1,), (1000, 2 ** 19 + 1)]:
        with pytest.raises(InsecureParameters, match="split the public set into parts of at most 524288 rows"):
            plan_gram(4, 4, rows, SEED)
    plan_gram(4, 4, (1000, 2 ** 19, 1), SEED)  # the advice works
    with pytest.raises(InsecureParameters, match="at most 2048 rows"):
        GramPlan(4, 4, (2 ** 13,), SEED, value_bits=20)


def test_max_accumulator_bytes_caps_the_providers_memory():
    plan, *_ = setup()
    assert plan.accumulator_bytes == TARGET * (SOURCE + RING_DEGREE) * 8
    for cap in (plan.accumulator_bytes, None):
        plan_gram(SOURCE, TARGET, PARTS, SEED, chunk_rows=CHUNK_ROWS, max_accumulator_bytes=cap)
    with pytest.raises(InvalidLayout, match="max_accumulator_bytes"):
        plan_gram(SOURCE, TARGET, PARTS, SEED, chunk_rows=CHUNK_ROWS, max_accumulator_bytes=plan.accumulator_bytes - 1)
    with pytest.raises(InvalidLayout, match="max_accumulator_bytes"):
        plan_gram(16384, 4096, (1000,), SEED)  # the default cap: 256 MiB (this needs 604 MiB)


def test_message_sizes_match_the_plan():
    plan, keys, *_ = setup()
    key_message = keys.public_bytes()
    assert len(key_message) <= plan.keys_max_bytes
    uploads, downloads = [key_message], []
    for part in (0, 1):
        messages, results, *_ = small_fit(part)
        assert len(messages) == plan.chunks(part) and len(results) == plan.groups
        uploads += messages
        downloads += results
        for c, message in enumerate(messages):
            assert len(message) <= plan.chunk_max_bytes
            assert len(dict(sections(message))[b"BODY"]) == plan.chunk_bytes(part, c)
        for g, result in enumerate(results):
            assert len(result) <= plan.result_max_bytes
            found = dict(sections(result))
            assert (len(found[b"CT_0"]), len(found[b"CT_1"])) == plan.result_bytes(part, g)
    bodies = {b"BODY", b"PKEY", b"CT_0", b"CT_1"}
    assert sum(len(p) for m in uploads for t, p in sections(m) if t in bodies) == plan.upload_bytes
    assert sum(len(p) for m in downloads for t, p in sections(m) if t in bodies) == plan.download_bytes
    measured_up, measured_down = sum(map(len, uploads)), sum(map(len, downloads))
    assert plan.upload_bytes < measured_up <= plan.upload_bytes + len(uploads) * (SEED_BYTES + META_SLACK)
    assert plan.download_bytes < measured_down <= plan.download_bytes + len(downloads) * META_SLACK


# --- ordering and state --------------------------------------------------------------------------------------


def test_out_of_order_repeated_and_past_the_end_chunks_are_refused_and_add_nothing():
    plan, keys, key, *_ = setup()
    messages, _, Za, Zb = small_fit(1)
    acc = GramAccumulator(plan, 1, Zb)
    with pytest.raises(ParameterMismatch, match="out of order"):
        acc.add(messages[1], 1, key)
    with pytest.raises(ParameterMismatch, match="chunk 0 of part 1 is expected"):
        acc.add(messages[1], 0, key)  # chunk 1's bytes under chunk 0's index
    for chunk in (-1, True, "0", None):
        with pytest.raises(ParameterMismatch):
            acc.add(messages[0], chunk, key)
    with pytest.raises(EncryptedError, match="send the rest"):
        acc.results(key)
    acc.add(messages[0], 0, key)
    with pytest.raises(ParameterMismatch, match="out of order"):
        acc.add(messages[0], 0, key)  # repeated
    acc.add(messages[1], 1, key)
    with pytest.raises(ParameterMismatch, match="past the end"):
        acc.add(messages[1], 2, key)
    assert acc.next_chunk == 2 and acc.complete
    assert_gram(decrypt_gram(keys, plan, 1, acc.results(key)), Za, Zb)
    with pytest.raises(EncryptedError, match="already returned"):
        acc.results(key)
    with pytest.raises(EncryptedError, match="already returned"):
        acc.add(messages[0], 0, key)


def test_concurrent_copies_of_one_chunk_are_added_once():
    plan, _, key, _, B = setup()
    message = small_fit(1)[0][0]
    acc = GramAccumulator(plan, 1, part_rows(plan, B, 1))
    errors: list[Exception] = []

    def send() -> None:
        try:
            acc.add(message, 0, key)
        except ParameterMismatch as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert acc.next_chunk == 1 and len(errors) == 2


# --- hostile bytes -------------------------------------------------------------------------------------------


def another_plan() -> GramPlan:
    """The same dims under another provider's seed: another fingerprint, same sizes."""
    return GramPlan(SOURCE, TARGET, PARTS, key_seed_for("another public set"), chunk_rows=CHUNK_ROWS,
                    result_rows=RESULT_ROWS)


def test_hostile_chunk_bytes_are_refused_with_the_right_error_and_add_nothing():
    plan, keys, key, *_ = setup()
    messages, _, Za, Zb = small_fit(1)
    good = messages[0]
    assert repack(good) == good  # the helper rebuilds a good message byte for byte
    acc = GramAccumulator(plan, 1, Zb)
    other = another_plan()
    body = dict(sections(good))[b"BODY"]
    cases = [
        (encrypt_chunk(FitKeys.generate(other), other, 1, 0, Za[:32]), ParameterMismatch, "another fit plan"),
        (repack(good, fingerprint=other.fingerprint), ParameterMismatch, "another fit plan"),
        (small_fit(0)[0][0], ParameterMismatch, "part 0"),  # part 0's chunk 0 has 32 rows too
        (good[:len(good) // 2], InvalidCiphertext, "truncated"),
        (good[:-1], InvalidCiphertext, "truncated"),
        (good[:20], InvalidCiphertext, "header"),
        (good + b"\x00", InvalidCiphertext, "trailing"),
        (b"\x00" * 64, InvalidCiphertext, "magic"),
        (bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)), InvalidCiphertext, "magic"),
        ("not bytes", InvalidCiphertext, "must be bytes"),
        (None, InvalidCiphertext, "must be bytes"),
        ([good], InvalidCiphertext, "must be bytes"),
        (np.frombuffer(good, dtype=np.uint8), InvalidCiphertext, "must be bytes"),
        (repack(good, kind=Kind.FIT_KEY), InvalidCiphertext, "expected a fit chunk"),
        (repack(good, kind=Kind.FIT_RESULT), InvalidCiphertext, "expected a fit chunk"),
        (good[:5] + b"\x63" + good[6:], InvalidCiphertext, "unknown kind"),
        (good[:4] + b"\x02" + good[5:], InvalidCiphertext, "container version"),
        (repack(good, edit=lambda s: s + [s[1]]), InvalidCiphertext, "at most 3"),
        (repack(good, edit=lambda s: [s[0], s[2]]), InvalidCiphertext, "SEED"),
        (repack(good, edit=lambda s: [s[0], s[0], s[2]]), InvalidCiphertext, "META"),
        (repack(good, edit=lambda s: [s[0], (b"SEEX", s[1][1]), s[2]]), InvalidCiphertext, "unexpected section"),
        (repack(good, edit=with_meta(part=0)), ParameterMismatch, "expected here"),
        (repack(good, edit=with_meta(chunk=1)), ParameterMismatch, "expected here"),
        (repack(good, edit=with_meta(rows=31)), ParameterMismatch, "rows"),
        (repack(good, edit=with_meta(rows=13)), ParameterMismatch, "rows"),
        (repack(good, edit=with_meta(extra=1)), ParameterMismatch, "extra"),
        (repack(good, edit=with_meta(part=True)), InvalidCiphertext, "JSON object of ints"),
        (repack(good, edit=with_meta(rows=32.0)), InvalidCiphertext, "JSON object of ints"),
        (repack(good, edit=with_section(b"META", b"[1, 2]")), InvalidCiphertext,
         "META section must be a JSON object"),
        (repack(good, edit=with_section(b"META", b"{\"part\": 1,")), InvalidCiphertext, "malformed"),
        (repack(good, edit=with_section(b"META", b"[" * 50 + b"]" * 50)), InvalidCiphertext, "nests"),
        (repack(good, edit=with_section(b"META", b"{\"part\": 1, \"part\": 1}")), InvalidCiphertext, "repeats"),
        (repack(good, edit=with_section(b"SEED", b"\x00" * (SEED_BYTES - 1))), InvalidCiphertext, "SEED must be"),
        (repack(good, edit=with_section(b"SEED", b"\x00" * (SEED_BYTES + 1))), InvalidCiphertext, "SEED must be"),
        (repack(good, edit=with_section(b"BODY", body[:-1])), InvalidCiphertext, "BODY holds"),
        (repack(good, edit=with_section(b"BODY", body + b"\x00")), InvalidCiphertext, "BODY holds"),
        (repack(good, edit=with_section(b"BODY", b"")), InvalidCiphertext, "BODY holds"),
        (good + b"\x00" * plan.chunk_max_bytes, InvalidCiphertext, "exceeds"),
    ]
    for data, error, match in cases:
        with pytest.raises(error, match=match):
            acc.add(data, 0, key)
        assert acc.next_chunk == 0
    acc.add(bytearray(good), 0, key)  # bytes-like views are accepted
    acc.add(memoryview(messages[1]), 1, key)
    assert_gram(decrypt_gram(keys, plan, 1, acc.results(key)), Za, Zb)  # nothing refused above was added


def test_hostile_key_bytes_are_refused():
    plan, keys, *_ = setup()
    good = keys.public_bytes()
    pkey = dict(sections(good))[b"PKEY"]
    other = another_plan()
    cases = [
        (FitKeys.generate(other).public_bytes(), ParameterMismatch, "another fit plan"),
        (good[:-1], InvalidKeys, "truncated"),
        (good + b"\x00", InvalidKeys, "trailing"),
        (b"\x00" * 64, InvalidKeys, "magic"),
        ("not bytes", InvalidKeys, "must be bytes"),
        (None, InvalidKeys, "must be bytes"),
        (repack(good, kind=Kind.CHUNK), InvalidKeys, "expected a fit key"),
        (repack(good, kind=Kind.PUBLIC_KEYS), InvalidKeys, "expected a fit key"),
        (repack(good, edit=with_meta(secrets=2)), InvalidKeys, "secrets"),
        (repack(good, edit=with_meta(extra=0)), InvalidKeys, "secrets"),
        (repack(good, edit=with_meta(secrets=True)), InvalidKeys, "JSON object of ints"),
        (repack(good, edit=with_section(b"PKEY", pkey[:-1])), InvalidKeys, "PKEY holds"),
        (repack(good, edit=with_section(b"PKEY", pkey + b"\x00")), InvalidKeys, "PKEY holds"),
        (repack(good, edit=lambda s: s + [s[0]]), InvalidKeys, "at most 2"),
        (repack(good, edit=lambda s: [s[1]]), InvalidKeys, "META"),
        (repack(good, edit=lambda s: [s[0], s[0]]), InvalidKeys, "2 b.META. sections"),
        (good + b"\x00" * plan.keys_max_bytes, InvalidKeys, "exceeds"),
    ]
    for data, error, match in cases:
        with pytest.raises(error, match=match):
            read_fit_key(data, plan)
    with pytest.raises(EncryptedError, match="GramPlan"):
        read_fit_key(good, plan.to_dict())
    assert np.array_equal(read_fit_key(good, plan), keys.public)


def test_hostile_result_bytes_are_refused():
    plan, keys, *_ = setup()
    _, results, Za, Zb = small_fit(1)
    results0 = small_fit(0)[1]
    ct0 = dict(sections(results[0]))[b"CT_0"]
    ct1 = dict(sections(results[0]))[b"CT_1"]

    def replaced(first: bytes) -> list[bytes]:
        return [first] + results[1:]

    cases = [
        (results[:-1], EncryptedError, "3 messages"),
        (results + results[:1], EncryptedError, "3 messages"),
        (results[0], EncryptedError, "3 messages"),
        ([results[1], results[0], results[2]], ParameterMismatch, "expected part 1, group 0"),
        (results0, ParameterMismatch, "expected part 1"),  # part 0's answer read as part 1's
        (replaced(repack(results[0], fingerprint=another_plan().fingerprint)), ParameterMismatch,
         "another fit plan"),
        (replaced(results[0][:-1]), InvalidCiphertext, "truncated"),
        (replaced(results[0] + b"\x00"), InvalidCiphertext, "trailing"),
        (replaced(b"\x00" * 100), InvalidCiphertext, "magic"),
        (replaced(None), InvalidCiphertext, "must be bytes"),
        (replaced(small_fit(1)[0][0]), InvalidCiphertext, "expected a fit result"),
        (replaced(repack(results[0], edit=with_meta(rows=15))), ParameterMismatch, "expected part 1"),
        (replaced(repack(results[0], edit=with_meta(group=1))), ParameterMismatch, "expected part 1"),
        (replaced(repack(results[0], edit=with_section(b"CT_0", ct0[:-1]))), InvalidCiphertext, "CT_0 holds"),
        (replaced(repack(results[0], edit=with_section(b"CT_1", ct1 + b"\x00"))), InvalidCiphertext, "CT_1 holds"),
        (replaced(repack(results[0], edit=lambda s: [s[0], s[1], s[1]])), InvalidCiphertext, "CT_0"),
        (replaced(repack(results[0], edit=lambda s: s + [s[0]])), InvalidCiphertext, "at most 3"),
        (replaced(results[0] + b"\x00" * plan.result_max_bytes), InvalidCiphertext, "exceeds"),
    ]
    for data, error, match in cases:
        with pytest.raises(error, match=match):
            decrypt_gram(keys, plan, 1, data)
    with pytest.raises(ParameterMismatch, match="part 2"):
        decrypt_gram(keys, plan, 2, results)
    assert_gram(decrypt_gram(keys, plan, 1, results), Za, Zb)


def mutations(good: bytes, rng: np.random.Generator, count: int):
    """`count` corruptions of `good`: byte flips (half of them in the header, section headers, META and SEED),
    truncations, appended bytes and overwritten length fields."""
    head = min(len(good), 200)
    for _ in range(count):
        kind = rng.integers(0, 5)
        data = bytearray(good)
        if kind == 0:
            data[rng.integers(0, head)] ^= int(rng.integers(1, 256))
        elif kind == 1:
            data[rng.integers(0, len(data))] ^= int(rng.integers(1, 256))
        elif kind == 2:
            del data[rng.integers(0, len(data)):]
        elif kind == 3:
            data += rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
        else:
            at = int(rng.integers(wire.HEADER.size, head - 4))
            data[at:at + 4] = int(rng.integers(0, 2 ** 32)).to_bytes(4, "little")
        yield bytes(data)


def test_fuzzed_chunk_key_and_result_bytes_raise_only_encrypted_errors():
    plan, keys, key, *_ = setup()
    messages, results, _, Zb = small_fit(1)
    rng = np.random.default_rng(2024)
    outcomes = {"accepted": 0, "refused": 0}
    acc = GramAccumulator(plan, 1, Zb)
    for data in mutations(messages[0], rng, 200):
        try:  # anything but an EncryptedError fails the test
            acc.add(data, 0, key)
            outcomes["accepted"] += 1  # a flipped body or seed byte is still a well-formed chunk
            acc = GramAccumulator(plan, 1, Zb)
        except EncryptedError:
            outcomes["refused"] += 1
            assert acc.next_chunk == 0
    assert outcomes["refused"] >= 80 and outcomes["accepted"] >= 20, outcomes
    for data in mutations(keys.public_bytes(), rng, 100):
        try:
            read_fit_key(data, plan)
        except EncryptedError:
            pass
    for data in mutations(results[2], rng, 60):
        try:
            decrypt_gram(keys, plan, 1, results[:2] + [data])
        except EncryptedError:
            pass


# --- what the provider sees ----------------------------------------------------------------------------------


def structure(message: bytes) -> list[tuple[bytes, int | bytes]]:
    """What a chunk's shape tells: its header, its META and every section's tag and length."""
    return [(message[:40], 0)] + [(tag, payload if tag == b"META" else len(payload)) for tag, payload in
                                  sections(message)]


def test_the_providers_view_does_not_depend_on_the_clients_data():
    plan, keys, *_ = setup()
    rng = np.random.default_rng(9)
    for part, chunk in [(0, 0), (0, 3), (1, 1)]:
        rows = plan.rows(part, chunk)
        Zs = [np.zeros((rows, SOURCE)), rng.normal(0, 1, (rows, SOURCE)), rng.normal(0, 50, (rows, SOURCE))]
        encrypted = [encrypt_chunk(keys, plan, part, chunk, Z) for Z in Zs]
        assert len({len(m) for m in encrypted}) == 1
        assert all(structure(m) == structure(encrypted[0]) for m in encrypted)
    # two encryptions of the same states share no seed and no body
    Z = rng.normal(0, 1, (CHUNK_ROWS, SOURCE))
    first, second = (dict(sections(encrypt_chunk(keys, plan, 0, 0, Z))) for _ in range(2))
    assert first[b"SEED"] != second[b"SEED"]
    body1, body2 = (gram_wire.read_chunk(encrypt_chunk(keys, plan, 0, 0, Z), plan, 0, 0)[1] for _ in range(2))
    assert np.mean(body1 == body2) < 1e-3
    # every key of a plan has the same length and structure; two keys differ
    key_messages = [keys.public_bytes()] + [FitKeys.generate(plan).public_bytes() for _ in range(2)]
    assert len({len(m) for m in key_messages}) == 1 and len(set(key_messages)) == 3
    assert all(structure(m) == structure(key_messages[0]) for m in key_messages)


def test_chunks_and_keys_carry_fresh_noise_of_seals_width():
    """Without its noise e an RLWE sample b = -a·s + m is linear algebra away from s: every chunk row and the key
    carry centred binomial noise of std sqrt(η/2) = 3.24 (SEAL's 3.2), bounded by η."""
    plan, keys, key, A, _ = setup()
    bits, Z = plan.modulus_bits(0), part_rows(plan, A, 0)[:CHUNK_ROWS]
    seed, b = gram_wire.read_chunk(encrypt_chunk(keys, plan, 0, 0, Z), plan, 0, 0)
    a_s = matmul_mod(keys.matrix.T, chunk_masks(plan, 0, 0, seed).T, bits, 1).T
    m = np.rint(Z * 2.0 ** plan.value_bits).astype(np.int64)
    key_noise = centre(key + ring_multiply(keys.secret, key_mask(plan, plan.key_bits), plan.key_bits),
                       plan.key_bits)
    width = np.sqrt(NOISE_ETA / 2)
    for e in (centre(b + a_s - m, bits), key_noise):
        assert abs(e.std() - width) < 0.35 and abs(e.mean()) < 0.3 and np.max(np.abs(e)) <= NOISE_ETA
    assert 0.6 < np.mean(keys.secret != 0) < 0.73  # ternary secret: two thirds non-zero


# --- what the client can read from an answer -----------------------------------------------------------------


def unmasked_sums(plan: GramPlan, part: int, Zb: np.ndarray, messages: list[bytes]) -> tuple[np.ndarray, ...]:
    """Σ_i P_i b_i and Σ_i P_i a_i mod q (P = the provider's scaled states): the answer before re-randomisation.
    A client knows every a_i (it chose the seeds) and b_i, so Σ P a_i alone would let it solve for P."""
    bits = plan.modulus_bits(part)
    c0 = np.zeros((plan.target_dim, plan.source_dim), dtype=np.int64)
    c1 = np.zeros((plan.target_dim, RING_DEGREE), dtype=np.int64)
    for chunk, message in enumerate(messages):
        seed, b = gram_wire.read_chunk(message, plan, part, chunk)
        P = np.rint(chunk_rows(plan, Zb, chunk).T * 2.0 ** plan.value_bits).astype(np.int64)
        bound = int(np.abs(P).max())
        c0 = (c0 + matmul_mod(P, b, bits, bound)) & mask(bits)
        c1 = (c1 + matmul_mod(P, chunk_masks(plan, part, chunk, seed), bits, bound)) & mask(bits)
    return c0, c1


def read_results(plan: GramPlan, part: int, results: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [gram_wire.read_result(r, plan, part, g) for g, r in enumerate(results)]
    return np.concatenate([c0 for c0, _ in pairs]), np.concatenate([c1 for _, c1 in pairs])


def test_answers_are_rerandomised_so_the_mask_half_hides_the_providers_states():
    plan, keys, key, *_ = setup()
    messages, results, Za, Zb = small_fit(1)
    again = answer(plan, 1, Zb, messages, key)  # the same chunks, key and states
    bits, b1 = plan.modulus_bits(1), plan.c1_bits(1)
    _, c1 = read_results(plan, 1, results)
    _, c1_again = read_results(plan, 1, again)
    assert np.mean(c1 == c1_again) < 0.01  # fresh randomness in every answer
    for answer_ in (results, again):
        assert_gram(decrypt_gram(keys, plan, 1, answer_), Za, Zb)
    # CT_1 is not Σ P a_i (which the client could invert) switched down: it is off by a uniform-looking u·p_A + e
    _, mask_sum = unmasked_sums(plan, 1, Zb, messages)
    offset = centre(c1 - switch_modulus(mask_sum, bits, b1), b1)
    assert np.mean(np.abs(offset)) > 2.0 ** (b1 - 4)  # uniform in [-2^(b1-1), 2^(b1-1)): mean |x| = 2^(b1-2)


def test_a_crafted_zero_key_is_accepted_but_cannot_strip_the_mask():
    """A client sends p_B = 0 instead of -p_A·s + e. Then CT_0 = Σ P b_i + e: a linear function of Ẑ_B against
    the client's own b_i (Ẑ_Bᵀ X for an X it chose, as any fit gives). CT_1 = Σ P a_i + u·p_A + e still hides
    Σ P a_i, and with p_B = 0 nothing cancels u·p_A·s: decrypting with the honest secret gives noise, not G."""
    plan, keys, *_ = setup()
    crafted = gram_wire.write_key(plan, np.zeros((plan.secrets, RING_DEGREE), dtype=np.int64))
    zero = read_fit_key(crafted, plan)
    assert not zero.any()
    messages, _, Za, Zb = small_fit(1)
    results = answer(plan, 1, Zb, messages, zero)
    bits, b0, b1 = plan.modulus_bits(1), plan.c0_bits(1), plan.c1_bits(1)
    c0, c1 = read_results(plan, 1, results)
    b_sum, mask_sum = unmasked_sums(plan, 1, Zb, messages)
    assert np.max(np.abs(centre(c0 - switch_modulus(b_sum, bits, b0), b0))) <= 1  # G-like: Ẑ_Bᵀ X, X = b
    assert np.mean(np.abs(centre(c1 - switch_modulus(mask_sum, bits, b1), b1))) > 2.0 ** (b1 - 4)  # still masked
    error = decrypt_gram(keys, plan, 1, results) - Za.T @ Zb
    span = 2.0 ** (bits - 2 * plan.value_bits - 1)  # |G| that the part's modulus holds
    # uniform over the modulus: median |error| = span / 2, against a median |G| of about 13
    assert np.median(np.abs(error)) > span / 4 and np.median(np.abs(error)) > 5 * np.median(np.abs(Za.T @ Zb))


# --- bad states and arguments --------------------------------------------------------------------------------


def test_bad_states_and_arguments_are_refused():
    plan, keys, key, A, B = setup()
    Zb = part_rows(plan, B, 1)
    with pytest.raises(EncryptedError, match=r"shape \(45, 40\)"):
        GramAccumulator(plan, 1, Zb[:10])
    with pytest.raises(EncryptedError, match=r"shape \(45, 40\)"):
        GramAccumulator(plan, 1, Zb.T)
    for value in (np.nan, np.inf, -np.inf):
        bad = Zb.copy()
        bad[3, 4] = value
        with pytest.raises(EncryptedError, match="NaN or infinity"):
            GramAccumulator(plan, 1, bad)
    with pytest.raises(ParameterMismatch, match="part 2"):
        GramAccumulator(plan, 2, Zb)
    with pytest.raises(EncryptedError, match="GramPlan"):
        GramAccumulator(plan.to_dict(), 1, Zb)
    with pytest.raises(EncryptedError, match="GramPlan"):
        FitKeys.generate(plan.to_dict())
    Za = part_rows(plan, A, 0)
    with pytest.raises(ParameterMismatch, match=r"\(32, 300\)"):
        encrypt_chunk(keys, plan, 0, 0, Za[:31])
    with pytest.raises(ParameterMismatch, match=r"\(4, 300\)"):
        encrypt_chunk(keys, plan, 0, 3, Za[:32])  # the partial last chunk
    with pytest.raises(ParameterMismatch, match="chunk 4"):
        encrypt_chunk(keys, plan, 0, 4, Za[:4])
    with pytest.raises(ParameterMismatch, match="part 2"):
        encrypt_chunk(keys, plan, 2, 0, Za[:32])
    for value in (np.nan, np.inf, 1e30):
        bad = Za[:32].copy()
        bad[0, 0] = value
        with pytest.raises(EncryptedError, match="finite and below"):
            encrypt_chunk(keys, plan, 0, 0, bad)
    with pytest.raises(ParameterMismatch, match="another fit plan"):
        encrypt_chunk(FitKeys.generate(another_plan()), plan, 0, 0, Za[:32])
    with pytest.raises(EncryptedError, match="FitKeys"):
        encrypt_chunk(key, plan, 0, 0, Za[:32])


def test_a_part_whose_states_would_wrap_is_scaled_down_by_a_power_of_two_and_decrypts_exactly():
    """A val part whose spread far exceeds the train part's (a near-constant train dimension that moves in val)
    would wrap mod q: each side scales the part down by 2^shift (`column_shift`), the provider's shift in the
    plan, and G comes out exact; an accumulator whose plan lacks the shift refuses the states."""
    unshifted = plan_gram(4, 1, (100, 8), SEED, chunk_rows=8)
    Zb, Za = np.full((8, 1), 3.0), np.full((8, 4), 3.0)
    with pytest.raises(EncryptedError, match="need a shift of 2 but the plan has 0"):
        GramAccumulator(unshifted, 1, Zb)
    shift_b = unshifted.column_shift(1, (Zb * Zb).sum(axis=0))
    plan = plan_gram(4, 1, (100, 8), SEED, chunk_rows=8, target_shifts=(0, shift_b))
    assert GramPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    keys = FitKeys.generate(plan)
    key = read_fit_key(keys.public_bytes(), plan)
    shift_a = plan.column_shift(1, (Za * Za).sum(axis=0))
    assert (shift_a, shift_b) == (2, 2)
    acc = GramAccumulator(plan, 1, Zb)
    acc.add(encrypt_chunk(keys, plan, 1, 0, Za * 2.0 ** -shift_a), 0, key)
    G = decrypt_gram(keys, plan, 1, acc.results(key)) * 2.0 ** shift_a
    np.testing.assert_allclose(G, Za.T @ Zb, atol=0.1)  # 72, not the wrapped 8
    # honest normalised states need no shift on either part
    plan, _, _, A, B = setup()
    for part in (0, 1):
        for X in (part_rows(plan, A, part), part_rows(plan, B, part)):
            assert plan.column_shift(part, (X * X).sum(axis=0)) == 0


def test_a_key_that_is_not_read_fit_keys_output_is_refused_without_losing_the_part():
    plan, keys, key, A, B = setup()
    acc = GramAccumulator(plan, 1, part_rows(plan, B, 1))
    messages = encrypt_part(keys, plan, 1, part_rows(plan, A, 1))
    for bad in (keys.public_bytes(), key[:, :5], key.astype(np.float64), key + (1 << plan.key_bits), None):
        with pytest.raises(InvalidKeys, match="read_fit_key"):
            acc.add(messages[0], 0, bad)
    for c, message in enumerate(messages):
        acc.add(message, c, key)
    with pytest.raises(InvalidKeys, match="read_fit_key"):
        acc.results(keys.public_bytes())
    assert_gram(decrypt_gram(keys, plan, 1, acc.results(key)), part_rows(plan, A, 1), part_rows(plan, B, 1))


def test_misused_arguments_raise_encrypted_errors():
    plan, keys, key, A, B = setup()
    with pytest.raises(EncryptedError, match="list of"):
        decrypt_gram(keys, plan, 0, None)
    with pytest.raises(EncryptedError, match="list of"):
        decrypt_gram(keys, plan, 0, (b for b in []))
    with pytest.raises(EncryptedError, match="numbers of shape"):
        GramAccumulator(plan, 1, np.full((45, 40), "x"))
    with pytest.raises(EncryptedError, match="must be numbers"):
        encrypt_chunk(keys, plan, 1, 1, np.full((13, 300), "x"))
    strided = memoryview(np.zeros((64, 64), dtype=np.uint8)[:, ::2])
    with pytest.raises(InvalidKeys, match="contiguous"):
        read_fit_key(strided, plan)
    with pytest.raises(InvalidCiphertext, match="contiguous"):
        GramAccumulator(plan, 0, part_rows(plan, B, 0)).add(strided, 0, key)


def test_results_decrypt_only_with_the_keys_of_their_plan():
    plan, keys, key, A, B = setup()
    with pytest.raises(ParameterMismatch, match="FitKeys made for this plan"):
        decrypt_gram(FitKeys.generate(another_plan()), plan, 0, [b""] * plan.groups)
    with pytest.raises(ParameterMismatch, match="FitKeys made for this plan"):
        decrypt_gram(key, plan, 0, [b""] * plan.groups)
