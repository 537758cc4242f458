"""Hostile bytes at the `encrypted` API: the issue-13 inputs, and a fuzz of every parser.

Every malformed input must raise an EncryptedError subclass (a server turns it into a 4xx), quickly, and
must never make the process build a SEAL context for parameters that came from the bytes.
"""
from __future__ import annotations

import json
import struct
import time
import zlib
from typing import Callable, Iterator

import numpy as np
import pytest
import tenseal.sealapi as seal

from encrypted import (N8192, ClientKeys, CkksProfile, EncryptedError, EncryptedLinear, InvalidCiphertext,
                       InvalidKeys, InvalidLayout, LinearLayout, ParameterMismatch, PublicKeys, decrypt, encrypt,
                       plan_layout, wire)
from encrypted.messages import read_query, read_reply
from encrypted.profiles import context_stats, galois_element

pytestmark = pytest.mark.he

LAYOUT = plan_layout(N8192, 4096, 20)  # the issue's server: d=4096, k=20, 10 rotation steps
FOREIGN_PROF = {"name": "xl", "poly_modulus_degree": 32768, "coeff_modulus_bits": [55] * 16, "scale_bits": 40}
NESTED = b"[" * 1000


def public_container(sections: list[tuple[bytes, bytes]], fingerprint: bytes = N8192.fingerprint) -> bytes:
    return wire.pack(wire.Kind.PUBLIC_KEYS, fingerprint, sections)


def foreign_prof_upload() -> bytes:
    """Defect 1: the server's public fingerprint, but a PROF of N=32768 with 16 primes of 55 bits (186 bytes)."""
    return public_container([(b"PROF", wire.dump_json(FOREIGN_PROF)), (b"STEP", b"[]")])


# --- a zstd writer (raw and RLE blocks only) and zero-filled SEAL Galois keys -----------------------------

ZSTD_BLOCK = 128 * 1024
SEAL_VERSION = wire.seal_to_bytes(seal.Plaintext())[3:5]  # (major, minor) as this SEAL writes them


def seal_header(compression: int, total_size: int) -> bytes:
    return struct.pack("<HBBBBHQ", wire.SEAL_MAGIC, 16, *SEAL_VERSION, compression, 0, total_size)


def zstd_frame(segments: list[bytes | int]) -> bytes:
    """A zstd frame whose content is `segments` (bytes, or an int: that many zero bytes), as raw and RLE blocks."""
    blocks: list[tuple[int, bytes | int]] = []  # (type, payload): 0 raw bytes, 1 RLE run length
    for segment in segments:
        if isinstance(segment, int):
            blocks += [(1, min(ZSTD_BLOCK, segment - start)) for start in range(0, segment, ZSTD_BLOCK)]
        else:
            blocks += [(0, segment[start:start + ZSTD_BLOCK]) for start in range(0, len(segment), ZSTD_BLOCK)]
    out = [struct.pack("<IBB", wire.ZSTD_MAGIC, 0x00, 8 << 3)]  # no content size; window 2^(10+8) = 256 KiB
    for i, (kind, payload) in enumerate(blocks):
        last = int(i == len(blocks) - 1)
        size = payload if kind == 1 else len(payload)
        out.append((size << 3 | kind << 1 | last).to_bytes(3, "little"))
        out.append(b"\0" if kind == 1 else payload)
    return b"".join(out)


def seal_zstd_blob(segments: list[bytes | int]) -> bytes:
    """A SEAL object blob (header, zstd-compressed body)."""
    frame = zstd_frame(segments)
    return seal_header(2, 16 + len(frame)) + frame


def _zero_key_members(profile: CkksProfile) -> tuple[bytes, int]:
    """A zero key-level ciphertext as SEAL 4 saves it (Ciphertext::save_members): (bytes before its data, data size)."""
    n, primes = profile.poly_modulus_degree, len(profile.coeff_modulus_bits)
    words = 2 * primes * n  # 2 polynomials over every prime
    array = seal_header(0, 16 + 8 + 8 * words) + struct.pack("<Q", words)
    key_parms = struct.pack("<4Q", *profile.context().key_parms_id())
    return key_parms + b"\x01" + struct.pack("<QQQdQ", 2, n, primes, 1.0, 1) + array, 8 * words


def zero_public_key(profile: CkksProfile) -> bytes:
    """A SEAL PublicKey whose polynomials are all zero."""
    members, zeros = _zero_key_members(profile)
    return seal_zstd_blob([members, zeros])


def zero_galois_keys(profile: CkksProfile, steps: list[int]) -> bytes:
    """SEAL GaloisKeys for `steps` with every polynomial zero, written as SEAL 4 does (KSwitchKeys::save_members)."""
    n, primes = profile.poly_modulus_degree, len(profile.coeff_modulus_bits)
    key_parms = struct.pack("<4Q", *profile.context().key_parms_id())
    members, zeros = _zero_key_members(profile)
    public_key = seal_header(0, 16 + len(members) + zeros) + members
    indices = {(galois_element(s, n) - 1) >> 1 for s in steps}
    segments: list[bytes | int] = [key_parms + struct.pack("<Q", n)]
    for index in range(n):
        if index in indices:
            for _ in range(primes - 1):  # one key-switching pair per data prime
                segments += [struct.pack("<Q", primes - 1) if _ == 0 else b"", public_key, zeros]
        else:
            segments.append(8)  # an empty entry: a zero count
    merged: list[bytes | int] = []  # adjacent zero runs become one RLE run
    for segment in segments:
        if segment == b"":
            continue
        if isinstance(segment, int) and merged and isinstance(merged[-1], int):
            merged[-1] += segment
        else:
            merged.append(segment)
    return seal_zstd_blob(merged)


def amplified_upload(galois_steps: list[int], listed_steps: list[int]) -> bytes:
    """Defect 2: public keys listing `listed_steps`, with zero Galois keys for `galois_steps`."""
    return public_container([(b"PROF", wire.dump_json(N8192.to_dict())), (b"STEP", wire.dump_json(listed_steps)),
                             (b"GALK", zero_galois_keys(N8192, galois_steps))])


def refused_quickly(call: Callable[[], object], error: type[Exception], match: str) -> Exception:
    """Run `call`; it must raise `error` (message matching `match`) in well under 0.1 s and build no context."""
    before = context_stats()
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        call()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1, f"refusal took {elapsed:.3f} s"
    assert context_stats() == before, "a SEAL context was built from the bytes"
    return info.value


# --- regression tests: the exact inputs of issue 13 -------------------------------------------------------

def test_defect1_foreign_prof_with_the_servers_fingerprint_builds_nothing():
    body = foreign_prof_upload()
    assert len(body) == 186
    N8192.context()  # the server's own context exists before any client arrives
    error = refused_quickly(lambda: PublicKeys.from_bytes(body, LAYOUT), ParameterMismatch, "PROF section")
    assert "32768" in str(error) and "n8192" in str(error)
    refused_quickly(lambda: PublicKeys.from_bytes(body), ParameterMismatch, "not a built-in profile")
    secret = wire.pack(wire.Kind.SECRET_KEYS, N8192.fingerprint, [(b"PROF", wire.dump_json(FOREIGN_PROF)),
                                                                   (b"STEP", b"[]"), (b"SECK", b"")])
    refused_quickly(lambda: ClientKeys.from_bytes(secret), ParameterMismatch, "not a built-in profile")
    refused_quickly(lambda: ClientKeys.from_bytes(secret, LAYOUT), ParameterMismatch, "32768")


def test_defect1_a_consistent_foreign_profile_is_refused_as_data_too():
    foreign = CkksProfile.from_dict(FOREIGN_PROF)  # plain data: constructing a profile builds no context
    body = public_container([(b"PROF", wire.dump_json(FOREIGN_PROF)), (b"STEP", b"[]")], foreign.fingerprint)
    refused_quickly(lambda: PublicKeys.from_bytes(body, LAYOUT), ParameterMismatch, "other CKKS parameters")
    refused_quickly(lambda: PublicKeys.from_bytes(body), ParameterMismatch, "not a built-in profile")


def test_defect1_the_context_cache_is_bounded():
    stats = context_stats()
    layer = EncryptedLinear(np.eye(2, 8))
    keys = ClientKeys.generate(N8192, layer.rotation_steps)
    public = PublicKeys.from_bytes(keys.public_bytes(), layer.layout)
    for bits in ((40, 20, 40), (40, 21, 40), (40, 22, 40), (40, 23, 40), (40, 24, 40), (40, 25, 40)):
        CkksProfile("tiny", 4096, bits, 20).context()  # code-chosen profiles, one context each
    after = context_stats()
    assert after["built"] >= stats["built"] + 6 and after["cached"] <= after["max_cached"]
    # N8192's context was evicted: objects made with it keep working beside a rebuilt one
    X = np.arange(16.0).reshape(2, 8) / 10
    reply = layer.apply(encrypt(keys, layer.layout, X)[0], public)
    assert np.allclose(decrypt(keys, layer.layout, [reply], 2), layer.plain(X), atol=1e-3)


def test_defect2_extra_steps_with_zero_galois_keys_are_refused():
    layout_steps = LAYOUT.rotation_steps
    steps = sorted(set(layout_steps) | set([s for s in range(3, 4096, 2) if s not in layout_steps][:54]))
    assert len(layout_steps) == 10 and len(steps) == 64
    body = amplified_upload(steps, steps)
    assert len(body) < 20_000  # 18 kB in raw and RLE blocks (3.5 kB in the issue, real zstd); 50 MB once loaded
    # the bytes are real SEAL Galois keys: SEAL loads all 64 when given room for 64
    galois = seal.GaloisKeys()
    blob = wire.unpack(body, wire.Kind.PUBLIC_KEYS, InvalidKeys)[2][2][1]
    wire.seal_from_bytes(galois, N8192.context(), blob, 10**9, "Galois keys", InvalidKeys)
    assert galois.size() == 64
    del galois
    error = refused_quickly(lambda: PublicKeys.from_bytes(body, LAYOUT), InvalidKeys, "exactly the layout's")
    assert "extra [3, 5, 7" in str(error)


def test_defect2_decompression_is_bounded_by_the_layouts_step_count():
    steps = sorted(set(LAYOUT.rotation_steps) | set(range(3, 200, 2)))[:64]
    body = amplified_upload(steps, LAYOUT.rotation_steps)  # STEP lists the layout's 10, GALK holds 64 keys
    refused_quickly(lambda: PublicKeys.from_bytes(body, LAYOUT), InvalidKeys, "inflate beyond")


def test_defect2_zero_keys_for_exactly_the_layouts_steps_are_refused():
    layout = plan_layout(N8192, 8, 2, max_galois_keys=2)
    body = amplified_upload(layout.rotation_steps, layout.rotation_steps)
    with pytest.raises(InvalidKeys, match="zero"):
        PublicKeys.from_bytes(body, layout)


def test_a_zero_public_key_is_refused():
    layer = EncryptedLinear(np.eye(2, 8))
    keys = ClientKeys.generate(N8192, layer.rotation_steps)
    kind, fingerprint, sections = wire.unpack(keys.public_bytes(), wire.Kind.PUBLIC_KEYS, InvalidKeys)
    assert b"PUBK" in [t for t, _ in sections]
    zero = wire.pack(kind, fingerprint,
                     [(t, zero_public_key(N8192) if t == b"PUBK" else bytes(p)) for t, p in sections])
    with pytest.raises(InvalidKeys, match="zero"):
        PublicKeys.from_bytes(zero, layer.layout)


def test_defect2_keys_with_extra_steps_are_refused_by_require():
    layer = EncryptedLinear(np.eye(2, 8))
    more = ClientKeys.generate(N8192, sorted(set(layer.rotation_steps) | {3}))
    keys = PublicKeys.from_bytes(more.public_bytes(), N8192)  # a profile alone does not fix the steps
    with pytest.raises(InvalidKeys, match=r"rotation steps \[3\]"):
        layer.apply(b"", keys)
    with pytest.raises(InvalidKeys, match="exactly the layout's"):
        PublicKeys.from_bytes(more.public_bytes(), layer.layout)


def _nested(section: bytes, kind: wire.Kind = wire.Kind.PUBLIC_KEYS) -> bytes:
    sections = {b"PROF": wire.dump_json(N8192.to_dict()), b"STEP": wire.dump_json(LAYOUT.rotation_steps)}
    sections[section] = NESTED
    return wire.pack(kind, N8192.fingerprint, list(sections.items()) +
                     ([(b"SECK", b"")] if kind == wire.Kind.SECRET_KEYS else []))


@pytest.mark.parametrize("section", [b"PROF", b"STEP"])
def test_defect3_deeply_nested_json_in_key_sections(section):
    error = refused_quickly(lambda: PublicKeys.from_bytes(_nested(section), LAYOUT), InvalidKeys,
                            "nests arrays/objects 1000 levels deep")
    assert section.decode() in str(error)
    refused_quickly(lambda: PublicKeys.from_bytes(_nested(section)), InvalidKeys, "1000 levels deep")
    refused_quickly(lambda: ClientKeys.from_bytes(_nested(section, wire.Kind.SECRET_KEYS)), InvalidKeys,
                    "1000 levels deep")


def test_defect3_deeply_nested_json_in_a_query_does_not_blame_seal():
    layer = EncryptedLinear(np.eye(2, 8), profile=N8192)
    keys = ClientKeys.generate(N8192, layer.rotation_steps)
    public = PublicKeys.from_bytes(keys.public_bytes(), layer.layout)
    query = encrypt(keys, layer.layout, np.ones((1, 8)))[0]
    _, fingerprint, sections = wire.unpack(query, wire.Kind.QUERY, InvalidCiphertext)
    nested = wire.pack(wire.Kind.QUERY, fingerprint, [(t, NESTED if t == b"META" else bytes(p)) for t, p in sections])
    error = refused_quickly(lambda: layer.apply(nested, public), InvalidCiphertext, "1000 levels deep")
    assert "SEAL" not in str(error)


def test_keys_for_a_custom_profile_are_read_only_against_the_expected_layout():
    small = CkksProfile("small", 4096, (40, 20, 40), 20)
    layout = plan_layout(small, 8, 2, max_galois_keys=2)
    keys = ClientKeys.generate(small, layout.rotation_steps)
    with pytest.raises(ParameterMismatch, match="not a built-in profile"):
        PublicKeys.from_bytes(keys.public_bytes())
    with pytest.raises(ParameterMismatch, match="not a built-in profile"):
        ClientKeys.from_bytes(keys.to_bytes())
    assert PublicKeys.from_bytes(keys.public_bytes(), layout).rotation_steps == tuple(layout.rotation_steps)
    assert ClientKeys.from_bytes(keys.to_bytes(), layout).rotation_steps == keys.rotation_steps
    with pytest.raises(ParameterMismatch, match="other CKKS parameters"):
        PublicKeys.from_bytes(keys.public_bytes(), LAYOUT)


def test_a_layout_read_from_a_server_is_plain_data():
    """A client parses GET /v1/model's layout: that builds no context, and non-int fields are refused."""
    before = context_stats()
    foreign = CkksProfile.from_dict(FOREIGN_PROF)
    data = json.loads(json.dumps(plan_layout(foreign, 4096, 20).to_dict()))
    assert LinearLayout.from_dict(data).profile == foreign
    assert context_stats() == before
    for fold in ([[float("inf"), 2]], [[1.5, 2]], [["64", 2]], [[True, 2]]):
        with pytest.raises(InvalidLayout):
            LinearLayout.from_dict(dict(data, fold=fold))


# --- fuzz: at least 1,000 malformed inputs per parser --------------------------------------------------

FUZZ_COUNT = 1000
_ZLIB_ZEROS = zlib.compress(bytes(16 << 20), 9)  # 16 MiB of zeros in 16 kB
BOMBS = [seal_header(1, 16 + len(_ZLIB_ZEROS)) + _ZLIB_ZEROS,
         seal_zstd_blob([2 << 30]), seal_zstd_blob([3 << 20]), seal_zstd_blob([b"\1" * 100, 40 << 20])]
FUZZ_DEADLINE_S = 120.0  # per parser; the loop stops at the count or the deadline, and the count must be met


def mutations(valid: bytes, json_tags: tuple[bytes, ...], rng: np.random.Generator, extras: list[bytes],
              optional: tuple[bytes, ...] = ()) -> Iterator[tuple[str, bytes, bool]]:
    """(name, bytes, may_be_accepted): malformed variants of a valid container, forever.

    Only a flip inside a SEAL blob's compressed data may yield bytes that SEAL accepts (they are then a
    valid-looking object, as CKKS data has no checksum), and dropping an `optional` section; every other
    variant must be refused.
    """
    kind, fingerprint, sections = wire.unpack(valid, wire.Kind(valid[5]), EncryptedError)
    sections = [(t, bytes(p)) for t, p in sections]
    offsets, pos = {}, wire.HEADER.size
    for tag, payload in sections:
        offsets[tag] = (pos + wire.SECTION.size, pos + wire.SECTION.size + len(payload))
        pos += wire.SECTION.size + len(payload)
    seal_spans = [span for tag, span in offsets.items() if tag not in json_tags]

    def rebuild(new: dict[bytes, bytes], fp: bytes = fingerprint) -> bytes:
        return wire.pack(kind, fp, [(t, new.get(t, p)) for t, p in sections])

    junk_json = [b"[" * 5000, b"{" * 3000, b'{"a":' * 900, b"[1," * 1300 + b"]", b"NaN", b"[Infinity]", b"1e999",
                 b'{"a":1,"a":1}', b"9" * 4000, b"\xff\xfe", b"", b"null", b"true", b"[]", b"{}", b'"x"',
                 b'{"name":"n8192"}', json.dumps(list(range(100))).encode(), b"[" * 4 + b"]" * 4]
    foreign = [dict(N8192.to_dict(), poly_modulus_degree=n) for n in (4096, 16384, 32768, 2**20, 0, -8192)]
    foreign += [dict(N8192.to_dict(), coeff_modulus_bits=b) for b in ([55] * 16, [60, 40], [60] * 40, [61, 40, 60],
                                                                      [True, 40, 60], ["60", 40, 60])]
    foreign += [dict(FOREIGN_PROF), dict(N8192.to_dict(), scale_bits=10**100), dict(N8192.to_dict(), extra=1)]
    while True:
        choice = rng.integers(0, 10)
        if choice == 0:
            yield "random", rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes(), False
        elif choice == 1:
            yield "truncated", valid[:int(rng.integers(0, len(valid)))], False
        elif choice == 2:  # a flip in the container header or a section header
            data = bytearray(valid)
            cuts = [0] + [a - wire.SECTION.size for a, _ in offsets.values()]
            start = int(rng.choice(cuts))
            data[start + int(rng.integers(0, wire.HEADER.size if start == 0 else wire.SECTION.size))] ^= \
                1 << int(rng.integers(0, 8))
            yield "header flip", bytes(data), False
        elif choice == 3 and seal_spans:  # flips inside a SEAL blob
            start, end = seal_spans[int(rng.integers(0, len(seal_spans)))]
            data = bytearray(valid)
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(start, end))] ^= 1 << int(rng.integers(0, 8))
            yield "seal flip", bytes(data), True
        elif choice == 4 and json_tags:
            tag = json_tags[int(rng.integers(0, len(json_tags)))]
            yield f"json {tag!r}", rebuild({tag: junk_json[int(rng.integers(0, len(junk_json)))]}), False
        elif choice == 5 and b"PROF" in json_tags:
            prof = foreign[int(rng.integers(0, len(foreign)))]
            lying = rng.integers(0, 2) == 0  # the server's fingerprint with a lying PROF, or a matching one
            try:
                fp = fingerprint if lying else CkksProfile.from_dict(prof).fingerprint
            except EncryptedError:
                fp = bytes(rng.integers(0, 256, 32, dtype=np.uint8))
            yield "foreign PROF", rebuild({b"PROF": wire.dump_json(prof)}, fp), False
        elif choice == 6:  # oversize, duplicate, unknown or missing sections
            tag, payload = sections[int(rng.integers(0, len(sections)))]
            variant = int(rng.integers(0, 4))
            may_pass = variant == 2 and tag in optional
            if variant == 0:
                data = wire.pack(kind, fingerprint, sections + [(tag, payload)])
            elif variant == 1:
                data = wire.pack(kind, fingerprint, sections + [(b"JUNK", b"x" * int(rng.integers(0, 100)))])
            elif variant == 2:
                data = wire.pack(kind, fingerprint, [s for s in sections if s[0] != tag])
            else:
                data = rebuild({tag: payload + bytes(int(rng.integers(1, 70000)))})
            yield "sections", data, may_pass
        elif choice == 7:  # a zlib or zstd bomb in place of a SEAL blob
            if not seal_spans:
                continue
            tag = [t for t in offsets if t not in json_tags][int(rng.integers(0, len(seal_spans)))]
            yield "bomb", rebuild({tag: BOMBS[int(rng.integers(0, len(BOMBS)))]}), False
        elif choice == 8 and extras:
            yield "crafted", extras[int(rng.integers(0, len(extras)))], False
        elif choice == 9:  # the wrong container kind, or trailing bytes
            data = bytearray(valid)
            if rng.integers(0, 2):
                data[5] = int(rng.choice([k for k in (1, 2, 3, 4, 0, 9) if k != valid[5]]))
            else:
                data += bytes(int(rng.integers(1, 50)))
            yield "kind/trailing", bytes(data), False


def fuzz(parse: Callable[[bytes], object], valid: bytes, json_tags: tuple[bytes, ...], seed: int,
         extras: list[bytes] = (), optional: tuple[bytes, ...] = ()) -> dict[str, int]:
    """Feed FUZZ_COUNT variants of `valid` (which `parse` accepts) to `parse`: every refusal is a one-line
    EncryptedError, no input takes a second, and none builds a SEAL context. Returns inputs per kind."""
    parse(valid)
    generator = mutations(valid, json_tags, np.random.default_rng(seed), list(extras), optional)
    before, start, counts, slowest = context_stats(), time.perf_counter(), {"accepted": 0}, 0.0
    for _ in range(FUZZ_COUNT):
        assert time.perf_counter() - start < FUZZ_DEADLINE_S, f"fuzz ran out of time after {sum(counts.values())}"
        name, data, may_pass = next(generator)
        t0 = time.perf_counter()
        try:
            parse(data)
            assert may_pass, f"{name} input of {len(data)} bytes was accepted"
            counts["accepted"] += 1
        except EncryptedError as exc:
            assert 10 < len(str(exc)) < 1000 and "\n" not in str(exc), (name, str(exc))
        slowest = max(slowest, time.perf_counter() - t0)
        counts[name] = counts.get(name, 0) + 1
    assert context_stats()["built"] == before["built"], "a SEAL context was built from fuzzed bytes"
    assert slowest < 1.0, f"one input took {slowest:.2f} s"
    assert min(counts.values()) > 0 and len(counts) >= 8, counts
    print(counts)
    return counts


@pytest.fixture(scope="module")
def small():
    """A small layer (2 rotation steps) and its client's keys, so each valid-looking input is cheap."""
    rng = np.random.default_rng(5)
    layer = EncryptedLinear(rng.normal(0, 0.3, (2, 8)), rng.normal(0, 1, 2), max_galois_keys=2)
    keys = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
    return layer, keys, PublicKeys.from_bytes(keys.public_bytes(), layer.layout)


def test_fuzz_public_keys(small):
    layer, keys, _ = small
    steps = layer.rotation_steps
    crafted = [foreign_prof_upload(), amplified_upload(steps + [3, 5], steps + [3, 5]),
               amplified_upload(steps + list(range(3, 200, 2)), steps), amplified_upload(steps, steps),
               _nested(b"PROF"), _nested(b"STEP"), keys.to_bytes()]
    counts = fuzz(lambda data: PublicKeys.from_bytes(data, layer.layout), keys.public_bytes(), (b"PROF", b"STEP"),
                  11, crafted, (b"PUBK",))
    assert min(counts[k] for k in ("random", "truncated", "foreign PROF", "bomb", "json b'STEP'", "crafted")) > 20


def test_fuzz_query(small):
    layer, keys, public = small
    query = encrypt(keys, layer.layout, np.ones((1, 8)))[0]
    fuzz(lambda data: layer.apply(data, public), query, (b"META",), 12, [keys.public_bytes(), foreign_prof_upload()])
    fuzz(lambda data: read_query(data, layer.layout), query, (b"META",), 13)


def test_fuzz_secret_keys_and_reply(small):
    layer, keys, public = small
    fuzz(lambda data: ClientKeys.from_bytes(data, layer.layout), keys.to_bytes(), (b"PROF", b"STEP"), 14,
         [_nested(b"PROF"), foreign_prof_upload()], (b"PUBK",))
    reply = layer.apply(encrypt(keys, layer.layout, np.ones((1, 8)))[0], public)
    assert np.allclose(decrypt(keys, layer.layout, [reply], 1), layer.plain(np.ones((1, 8))), atol=1e-3)
    fuzz(lambda data: read_reply(data, layer.layout), reply, (b"META",), 15)
