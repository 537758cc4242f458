"""Private-fit kernel: Enc(Ẑ_A) chunks in, Enc(Ẑ_Aᵀ Ẑ_B) out; plans, ordering and hostile chunk bytes."""
from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest
import tenseal.sealapi as seal

from encrypted import (N8192, N8192_PRIVATE, ClientKeys, EncryptedError, GramAccumulator, GramPlan, InvalidCiphertext,
                       InvalidKeys, InvalidLayout, ParameterMismatch, PublicKeys, decrypt_gram, encrypt_chunk,
                       plan_gram, plan_layout)
from encrypted import messages, wire

pytestmark = pytest.mark.he

# chunk_rows 32 (not the default 128): lanes 256, so source_dim 300 leaves a partial last group (44 columns);
# target_dim 40 is two blocks of 32 rows (the second partial); parts of 100 and 45 rows end in partial chunks.
SOURCE, TARGET, PARTS, CHUNK_ROWS = 300, 40, (100, 45), 32
RNG = np.random.default_rng(14)
_SETUP: dict = {}


def setup():
    """(plan, client keys, server-side public keys, Ẑ_A, Ẑ_B) of the small fit, built once."""
    if not _SETUP:
        plan = plan_gram(N8192, SOURCE, TARGET, PARTS, chunk_rows=CHUNK_ROWS)
        keys = ClientKeys.generate(plan.layout.profile, plan.layout.rotation_steps)
        public = PublicKeys.from_bytes(keys.public_bytes(), plan.layout)
        rows = sum(PARTS)
        _SETUP.update(plan=plan, keys=keys, public=public, A=RNG.normal(0, 1, (rows, SOURCE)),
                      B=RNG.normal(0, 1, (rows, TARGET)))
    return _SETUP["plan"], _SETUP["keys"], _SETUP["public"], _SETUP["A"], _SETUP["B"]


def part_slice(part: int) -> slice:
    start = sum(PARTS[:part])
    return slice(start, start + PARTS[part])


def chunk_states(plan: GramPlan, A: np.ndarray, part: int, chunk: int) -> np.ndarray:
    start = part_slice(part).start + chunk * plan.chunk_rows
    return A[start:start + plan.rows(part, chunk)]


def messages_of(part: int) -> list[bytes]:
    plan, keys, _, A, _ = setup()
    return [encrypt_chunk(keys, plan, part, c, chunk_states(plan, A, part, c)) for c in range(plan.chunks(part))]


def fit_part(part: int, B: np.ndarray) -> np.ndarray:
    plan, keys, public, _, _ = setup()
    acc = GramAccumulator(plan, part, B[part_slice(part)])
    for c, message in enumerate(messages_of(part)):
        acc.add(message, c, public)
    assert acc.complete
    return decrypt_gram(keys, plan, acc.results(public))


def assert_gram(G: np.ndarray, A: np.ndarray, B: np.ndarray) -> None:
    ref = A.T @ B
    assert G.shape == ref.shape
    assert np.max(np.abs(G - ref)) <= 1e-6 * np.max(np.abs(ref))


def test_plan_shapes_for_partial_chunks_and_groups():
    plan, *_ = setup()
    assert plan.chunk_rows == 32 and plan.layout.lanes == 256 and plan.groups == 2
    assert plan.group_columns(1) == 44 and plan.layout.blocks == 2
    assert [plan.chunks(p) for p in (0, 1)] == [4, 2] and plan.rows(0, 3) == 4 and plan.rows(1, 1) == 13
    assert plan.upload_ciphertexts == 12


@pytest.mark.parametrize("part", [0, 1])
def test_decrypted_gram_equals_the_plaintext_product(part):
    plan, _, _, A, B = setup()
    assert_gram(fit_part(part, B), A[part_slice(part)], B[part_slice(part)])


def test_a_target_block_of_zero_columns_decrypts_to_zeros():
    """Constant provider dims normalise to zero columns; a whole block of them must not crash and gives zeros."""
    plan, _, _, A, B = setup()
    B = B.copy()
    B[:, 32:] = 0.0  # the whole second block of W (rows 32..39) is zero in every chunk
    B[part_slice(0).start:part_slice(0).start + 32, :32] = 0.0  # and the first block is zero in chunk 0 only
    G = fit_part(0, B)
    assert_gram(G, A[part_slice(0)], B[part_slice(0)])
    assert np.max(np.abs(G[:, 32:])) < 1e-6


def test_the_full_size_plan_matches_the_design():
    """576 -> 640 over 3584 + 512 rows: 288 uploads, 9 groups of 5 blocks, no fold, accumulators under the cap."""
    plan = plan_gram(N8192, 576, 640, (3584, 512))
    L = plan.layout
    assert (plan.upload_ciphertexts, plan.groups, L.blocks, L.fold, L.pairing) == (288, 9, 5, (), "inputs")
    assert plan.accumulator_bytes <= 256 << 20 and plan.result_ciphertexts == 90
    assert plan.layer_bytes == 640 * 2 * 8192 * 8  # 640 diagonals over 2 primes, while one chunk is added
    small = plan_gram(N8192, 576, 640, (3584, 512), max_accumulator_bytes=64 << 20)
    assert small.accumulator_bytes <= 64 << 20 and small.layout.baby > L.baby  # a lower cap takes more baby steps
    with pytest.raises(InvalidLayout, match="max_accumulator_bytes"):
        plan_gram(N8192, 576, 640, (3584, 512), max_accumulator_bytes=1 << 20)


def test_plan_dict_round_trip_and_tampered_dicts_are_refused():
    plan, *_ = setup()
    data = json.loads(json.dumps(plan.to_dict()))
    assert GramPlan.from_dict(data) == plan
    other = plan_layout(N8192, CHUNK_ROWS, TARGET, pairing="inputs", baby=plan.layout.baby % 8 + 1).to_dict()
    tampered = [
        {**data, "groups": 3},
        {**data, "part_rows": [100, 80]},  # 3 chunks, the dict says 2
        {**data, "source_dim": 10**9},
        {**data, "version": 2},
        {**data, "extra": 1},
        {**data, "layout": json.loads(json.dumps(other))},  # another baby step: the derived sizes no longer match
        {**data, "layout": {**data["layout"], "blocks": 1}},
        {**data, "part_rows": list(range(1, 100))},
        {**data, "chunk_rows": 64},
        [1, 2],
    ]
    for bad in tampered:
        with pytest.raises(InvalidLayout):
            GramPlan.from_dict(bad)


@pytest.mark.parametrize("args,match", [
    ((0, 40, (10,)), "source_dim"), ((True, 40, (10,)), "source_dim"), ((10, 0, (10,)), "target_dim"),
    ((10, 40, ()), "part_rows"), ((10, 40, (0,)), "part_rows"), ((10, 40, (2**30,)), "part_rows"),
    ((10, 40, (10,) * 9), "part_rows"), ((10, 40, "12"), "part_rows"),
])
def test_plan_gram_validates_every_int(args, match):
    with pytest.raises(InvalidLayout, match=match):
        plan_gram(N8192, *args)
    with pytest.raises(InvalidLayout, match="chunk_rows"):
        plan_gram(N8192, 10, 40, (10,), chunk_rows=100)


def test_out_of_order_repeated_and_past_the_end_chunks_are_refused_and_add_nothing():
    plan, keys, public, A, B = setup()
    messages = messages_of(1)
    acc = GramAccumulator(plan, 1, B[part_slice(1)])
    with pytest.raises(ParameterMismatch, match="out of order"):
        acc.add(messages[1], 1, public)
    with pytest.raises(ParameterMismatch, match="chunk 0 of part 1 is expected"):
        acc.add(messages[1], 0, public)  # chunk 1's bytes under chunk 0's index
    with pytest.raises(EncryptedError, match="send the rest"):
        acc.results(public)
    acc.add(messages[0], 0, public)
    with pytest.raises(ParameterMismatch, match="out of order"):
        acc.add(messages[0], 0, public)  # repeated
    acc.add(messages[1], 1, public)
    with pytest.raises(ParameterMismatch, match="past the end"):
        acc.add(messages[1], 2, public)
    assert acc.next_chunk == 2 and acc.complete
    assert_gram(decrypt_gram(keys, plan, acc.results(public)), A[part_slice(1)], B[part_slice(1)])
    with pytest.raises(EncryptedError, match="already returned"):
        acc.results(public)
    with pytest.raises(EncryptedError, match="already returned"):
        acc.add(messages[0], 0, public)


def test_concurrent_copies_of_one_chunk_are_added_once():
    plan, _, public, _, B = setup()
    message = messages_of(1)[0]
    acc = GramAccumulator(plan, 1, B[part_slice(1)])
    errors: list[Exception] = []

    def send() -> None:
        try:
            acc.add(message, 0, public)
        except ParameterMismatch as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert acc.next_chunk == 1 and len(errors) == 2


def _repack(message: bytes, fingerprint: bytes | None = None, edit=None) -> bytes:
    _, fp, sections = wire.unpack(message, wire.Kind.CHUNK, EncryptedError, max_sections=wire.MAX_SECTIONS)
    sections = [(tag, bytes(payload)) for tag, payload in sections]
    if edit is not None:
        sections = edit(sections)
    return wire.pack(wire.Kind.CHUNK, fingerprint or fp, sections)


def _meta(**changes):
    def edit(sections):
        meta = {**json.loads(sections[0][1]), **changes}
        return [(b"META", wire.dump_json(meta))] + sections[1:]
    return edit


def transparent_ciphertext() -> bytes:
    """A query-level SEAL ciphertext whose polynomials are all zero (uncompressed), as Ciphertext::save writes it."""
    profile, version = N8192, wire.seal_to_bytes(seal.Plaintext())[3:5]
    n, primes = profile.poly_modulus_degree, len(profile.coeff_modulus_bits) - 1
    words = 2 * primes * n

    def header(total: int) -> bytes:
        return struct.pack("<HBBBBHQ", wire.SEAL_MAGIC, 16, *version, 0, 0, total)

    array = header(16 + 8 + 8 * words) + struct.pack("<Q", words) + bytes(8 * words)
    body = (struct.pack("<4Q", *messages.query_parms_id(profile)) + b"\x01"
            + struct.pack("<QQQdQ", 2, n, primes, profile.scale, 1) + array)
    return header(16 + len(body)) + body


def test_hostile_chunk_bytes_are_refused_with_the_right_error_and_add_nothing():
    plan, keys, public, A, B = setup()
    messages = messages_of(1)
    good = messages[0]
    acc = GramAccumulator(plan, 1, B[part_slice(1)])
    ctxt = _repack(good)  # sanity: a repack of a good message is the same message
    assert ctxt == good
    cases = [
        (_repack(good, fingerprint=N8192_PRIVATE.fingerprint), ParameterMismatch, "other CKKS parameters"),
        (good[: len(good) // 2], InvalidCiphertext, "truncated"),
        (b"\x00" * 64, InvalidCiphertext, "magic"),
        (bytes(RNG.integers(0, 256, 5000, dtype=np.uint8)), InvalidCiphertext, "magic"),
        ("not bytes", InvalidCiphertext, "must be bytes"),
        (_repack(good, edit=lambda s: s + [s[1]]), InvalidCiphertext, "sections"),  # one CTXT too many
        (_repack(good, edit=lambda s: s[:2]), InvalidCiphertext, "CTXT"),  # one CTXT too few
        (_repack(good, edit=lambda s: s + [(b"CTXT", b"")] * 70), InvalidCiphertext, "at most 3"),
        (_repack(good, edit=_meta(source_dim=301)), ParameterMismatch, "source_dim"),
        (_repack(good, edit=_meta(rows=31)), ParameterMismatch, "rows"),
        (_repack(good, edit=_meta(part=0)), ParameterMismatch, "expected here"),
        (_repack(good, edit=_meta(part=True)), InvalidCiphertext, "true/false"),
        (_repack(good, edit=_meta(extra=1)), ParameterMismatch, "extra"),
        (_repack(good, edit=lambda s: [s[0], s[1], (b"CTXT", b"\x00" * 100)]), InvalidCiphertext, "SEAL"),
        (_repack(good, edit=lambda s: [s[0], s[1], (b"CTXT", transparent_ciphertext())]), InvalidCiphertext,
         "transparent"),  # SEAL would refuse its products half-way through the chunk
        (good + b"\x00" * plan.chunk_max_bytes, InvalidCiphertext, "exceeds"),
        (wire.pack(wire.Kind.QUERY, N8192.fingerprint, []), InvalidCiphertext, "expected a fit chunk"),
    ]
    for data, error, match in cases:
        with pytest.raises(error, match=match):
            acc.add(data, 0, public)
        assert acc.next_chunk == 0
    # a chunk of part 0 (a different row count) refused by part 1's accumulator
    other = encrypt_chunk(keys, plan, 0, 0, chunk_states(plan, A, 0, 0))
    with pytest.raises(ParameterMismatch, match="part 0"):
        acc.add(other, 0, public)
    # keys made for another layout are refused before the chunk is read
    foreign = ClientKeys.generate(N8192, plan_layout(N8192, 64, 2).rotation_steps)
    with pytest.raises(InvalidKeys):
        acc.add(good, 0, PublicKeys.from_bytes(foreign.public_bytes(), N8192))
    for c, message in enumerate(messages):  # nothing refused above was accumulated
        acc.add(message, c, public)
    assert_gram(decrypt_gram(keys, plan, acc.results(public)), A[part_slice(1)], B[part_slice(1)])


def test_bad_states_and_arguments_are_refused():
    plan, keys, public, A, B = setup()
    with pytest.raises(EncryptedError, match="shape"):
        GramAccumulator(plan, 1, B[:10])
    bad = B[part_slice(1)].copy()
    bad[3, 4] = np.nan
    with pytest.raises(EncryptedError, match="NaN"):
        GramAccumulator(plan, 1, bad)
    with pytest.raises(ParameterMismatch, match="part 2"):
        GramAccumulator(plan, 2, B[part_slice(1)])
    with pytest.raises(ParameterMismatch, match=r"\(32, 300\)"):
        encrypt_chunk(keys, plan, 0, 0, A[:31])
    with pytest.raises(ParameterMismatch, match="chunk 4"):
        encrypt_chunk(keys, plan, 0, 4, A[:4])
    with pytest.raises(EncryptedError, match="2 replies"):
        decrypt_gram(keys, plan, [b""])


def test_a_layer_allowed_zero_blocks_answers_its_bias_and_partials_finish_once():
    """accumulate/finish on their own: a weightless block decrypts to its bias; a second finish is refused."""
    from encrypted import EncryptedLinear, decrypt, encrypt

    W = np.zeros((12, 8))
    W[8:] = RNG.normal(0, 1, (4, 8))  # rows 0..7 (block 0 of 8 rows) have no weights, block 1 has
    bias = np.arange(12.0)
    with pytest.raises(EncryptedError, match="all zero"):
        EncryptedLinear(W, bias, pairing="inputs")
    layer = EncryptedLinear(W, bias, pairing="inputs", allow_zero_blocks=True)
    assert layer.layout.blocks == 2
    keys = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
    public = PublicKeys.from_bytes(keys.public_bytes(), layer.layout)
    X = RNG.normal(0, 1, (3, 8))
    Y = decrypt(keys, layer.layout, [layer.apply(encrypt(keys, layer.layout, X)[0], public)], 3)
    assert np.max(np.abs(Y[:, :8] - bias[:8])) < 1e-6  # the weightless block: its bias, to CKKS precision
    assert np.max(np.abs(Y - layer.plain(X))) < 1e-4 * np.max(np.abs(layer.plain(X)))
    ct, _ = messages.read_query(encrypt(keys, layer.layout, X)[0], layer.layout)
    partials = layer.accumulate(ct, public.galois_keys)
    with pytest.raises(EncryptedError, match="partials must be"):
        layer.accumulate(ct, public.galois_keys, partials[:1])
    layer.finish(partials, public.galois_keys)
    with pytest.raises(EncryptedError, match="no accumulated products"):
        layer.finish(partials, public.galois_keys)
