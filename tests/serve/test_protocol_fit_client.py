"""A private-fit client written from `docs/protocol.md` alone, run against a live server.

It proves that an outside team can run the private fit (section 6, the container of section 2 and the HTTP
table of section 9) with nothing but numpy, hashlib and httpx: everything below (the container, the bit
packing, the SHAKE-128 expansion, the key p_B, the negacyclic products, the encryption of the rows, the
decryption and centring of the results) is written here from the document, not imported. From the repo it
uses only `create_app` and `ServerThread` (a real server in a thread) and `write_public_states` /
`load_public_states` / `Anchors` (to make the public set and to know the provider's states, for the check only).

The decrypted G_p of every part must equal Ẑ_Aᵀ Ẑ_B of that part (each side normalised by its own train
mean and std) within the precision section 6 states. Where the document left a choice open, the reading that
works is the one written here, and a comment marked `DOC:` says which sentence was insufficient (the document
has since been made explicit at each of them; the parts' rows now come from GET /v1/public-set/split).
"""
from __future__ import annotations

import hashlib
import json
import math
import secrets
import struct

import httpx
import numpy as np
import pytest

from serve.formats.public_states import Anchors, load_public_states, write_public_states
from serve.harness import ServerThread
from serve.server import create_app

pytestmark = [pytest.mark.he, pytest.mark.network]

ROWS, D_B, D_A = 640, 24, 40  # 560 train rows: two chunks, the last one short


# ---------------------------------------------------------------------------------------------- section 2
def canonical_json(obj) -> bytes:
    """JSON sections: UTF-8, sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def container(kind: int, fingerprint: bytes, sections: list[tuple[bytes, bytes]]) -> bytes:
    assert len(fingerprint) == 32 and len(sections) <= 64
    out = [b"XSHE", bytes([1, kind]), struct.pack("<H", len(sections)), fingerprint]
    for tag, payload in sections:
        assert len(tag) == 4
        out += [tag, struct.pack("<I", len(payload)), payload]
    return b"".join(out)


def parse_container(data: bytes) -> tuple[int, bytes, dict[bytes, list[bytes]]]:
    assert data[:4] == b"XSHE" and data[4] == 1
    kind, (count,), fingerprint = data[5], struct.unpack_from("<H", data, 6), data[8:40]
    sections: dict[bytes, list[bytes]] = {}
    offset = 40
    for _ in range(count):
        tag, (length,) = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)
        sections.setdefault(tag, []).append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    assert offset == len(data), "no bytes may follow the last section"
    return kind, fingerprint, sections


# ------------------------------------------------------------------------------------- section 6: packing
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Value j occupies bits j·bits … j·bits + bits − 1 of the section, least significant first.

    DOC: 'bits … of the section' does not say how section bits map to bytes; the working reading is the
    little-endian one (stream bit b is bit b mod 8 of byte b div 8), i.e. the section is one little-endian
    integer, zero-padded to a whole byte."""
    values = np.ascontiguousarray(values, dtype="<u8").ravel()
    assert values.size == 0 or int(values.max()) < 2 ** bits
    stream = np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    assert len(data) == math.ceil(count * bits / 8), "every length exact for the plan"
    stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count * bits].reshape(count, bits)
    full = np.zeros((count, 64), np.uint8)
    full[:, :bits] = stream
    return np.packbits(full, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


# -------------------------------------------------------------------------------- section 6: randomness
def uniform(seed: bytes, domain: bytes, count: int, bits: int) -> np.ndarray:
    """SHAKE-128 of domain ‖ 0x00 ‖ seed, read as `count` little-endian integers of ⌈bits/8⌉ bytes, masked."""
    width = math.ceil(bits / 8)
    raw = np.frombuffer(hashlib.shake_128(domain + b"\x00" + seed).digest(count * width), np.uint8)
    padded = np.zeros((count, 8), np.uint8)
    padded[:, :width] = raw.reshape(count, width)
    return padded.view("<u8").ravel().astype(np.uint64) & np.uint64(2 ** bits - 1)


def ternary(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-1, 2, n).astype(np.int64)


def cbd(rng: np.random.Generator, shape, eta: int = 21) -> np.ndarray:
    """Centred binomial noise, η = 21 (std √(η/2) ≈ 3.24)."""
    return (rng.binomial(2 * eta, 0.5, shape) - eta).astype(np.int64)


# ---------------------------------------------------------------------- section 6: arithmetic in R_{2^k}
def negacyclic_rows(s: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The rows `positions` of the matrix M with (a·s)[t] = Σ_j M[t, j] a[j] in Z[X]/(X^N + 1)."""
    n = s.size
    j = np.arange(n)
    diff = positions[:, None] - j[None, :]
    return np.where(diff >= 0, s[diff % n], -s[diff % n]).astype(np.float64)


def times_ternary(a: np.ndarray, s: np.ndarray, positions: np.ndarray, bits: int) -> np.ndarray:
    """(a_r · s)[positions] mod 2^bits for every row a_r of `a` (uint64, < 2^bits), s ternary; exact.

    Splits a into 22-bit limbs so that a float64 matrix product over N = 2048 terms stays exact."""
    a = np.atleast_2d(a).astype(np.uint64)
    m = negacyclic_rows(s, positions)  # (len(positions), N), entries in {-1, 0, 1}
    out = np.zeros((a.shape[0], positions.size), np.uint64)
    for shift in range(0, bits, 22):
        limb = ((a >> np.uint64(shift)) & np.uint64(2 ** 22 - 1)).astype(np.float64)
        part = np.rint(limb @ m.T).astype(np.int64)  # |part| < 2^33
        out += part.astype(np.uint64) << np.uint64(shift)  # wraps mod 2^64: fine, the modulus is 2^bits
    return out & np.uint64(2 ** bits - 1)


def mod(x: np.ndarray, bits: int) -> np.ndarray:
    return np.asarray(x).astype(np.int64).astype(np.uint64) & np.uint64(2 ** bits - 1)


def centred(x: np.ndarray, bits: int) -> np.ndarray:
    x = x.astype(np.int64)
    return np.where(x >= 2 ** (bits - 1), x - 2 ** bits, x)


# ------------------------------------------------------------------------------------ section 6: client
def plan_fingerprint(plan: dict) -> bytes:
    """sha256 of the plan dict as compact JSON with sorted keys; the header takes the 32 raw digest bytes."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()).digest()


def check_plan(plan: dict, public_rows: int) -> None:
    """Every derived number of the plan, from the formulas of section 6."""
    m = max(0, 12 - math.ceil(math.log2(public_rows)))
    v = min(20, 16 + m)
    assert plan["value_bits"] == v and plan["output_bits"] == min(20, 10 + 2 * m)
    assert plan["ring_degree"] == 2048 and plan["chunk_rows"] == 512 and plan["result_rows"] == 64
    assert plan["groups"] == math.ceil(plan["target_dim"] / plan["result_rows"])
    for p, rows in enumerate(plan["part_rows"]):
        k = 2 * v + math.ceil(math.log2(rows)) + (2 if p == 0 else 3)
        assert plan["modulus_bits"][p] == k <= 54
        assert plan["c0_bits"][p] == min(k, k - 2 * v + plan["output_bits"] + 1)
        assert plan["c1_bits"][p] == min(k, k - 2 * v + plan["output_bits"] + 4)
        assert plan["chunks"][p] == math.ceil(rows / plan["chunk_rows"])


class FitClient:
    """The client's side of the private fit: secrets, key, chunks, decryption."""

    def __init__(self, plan: dict, rng: np.random.Generator):
        self.plan, self.rng = plan, rng
        self.n, self.d_a = plan["ring_degree"], plan["source_dim"]
        self.secrets_count = math.ceil(self.d_a / self.n)  # ℓ
        self.big_k = max(plan["modulus_bits"])  # K
        self.fingerprint = plan_fingerprint(plan)
        # DOC: 'uniform(`key_seed`, …)' does not say how the 64 hex digits become the seed bytes; the 32 bytes
        # they spell (bytes.fromhex) is the working reading.
        self.p_a = uniform(bytes.fromhex(plan["key_seed"]), b"xsilo/fit/key", self.n, self.big_k)
        # The document draws secrets and noise from the OS's CSPRNG; a seeded generator keeps the test reproducible.
        self.s = [ternary(rng, self.n) for _ in range(self.secrets_count)]

    def key_container(self) -> bytes:
        everywhere = np.arange(self.n)
        p_b = [mod(-times_ternary(self.p_a, s, everywhere, self.big_k)[0].astype(np.int64) + cbd(self.rng, self.n),
                   self.big_k) for s in self.s]
        return container(6, self.fingerprint, [(b"META", canonical_json({"secrets": self.secrets_count})),
                                               (b"PKEY", pack_bits(np.concatenate(p_b), self.big_k))])

    def mask_domain(self, part: int, chunk: int) -> bytes:
        # DOC: '`b"xsilo/fit/mask"` ‖ plan fingerprint ‖ p (2 bytes) ‖ c (4 bytes)' does not say whether the
        # fingerprint is the 32 digest bytes or its 64 hex digits; the raw digest is the working reading.
        return b"xsilo/fit/mask" + self.fingerprint + struct.pack("<HI", part, chunk)

    def chunk_container(self, part: int, chunk: int, messages: np.ndarray, *, fingerprint: bytes | None = None,
                        seed: bytes | None = None) -> bytes:
        """`messages` (rows, d_A) int64: round(2^v Ẑ_A) for the chunk's rows."""
        k, rows = self.plan["modulus_bits"][part], messages.shape[0]
        seed = secrets.token_bytes(32) if seed is None else seed
        a = uniform(seed, self.mask_domain(part, chunk), rows * self.n, k).reshape(rows, self.n)
        body = np.empty((rows, self.d_a), np.uint64)
        for l, s in enumerate(self.s):  # position t lives in block l = t // N at coefficient t mod N
            cols = np.arange(l * self.n, min(self.d_a, (l + 1) * self.n))
            a_s = times_ternary(a, s, cols - l * self.n, k).astype(np.int64)
            body[:, cols] = mod(messages[:, cols] + cbd(self.rng, (rows, cols.size)) - a_s, k)
        meta = {"chunk": chunk, "part": part, "rows": rows}
        return container(5, self.fingerprint if fingerprint is None else fingerprint,
                         [(b"META", canonical_json(meta)), (b"SEED", seed), (b"BODY", pack_bits(body, k))])

    def decrypt(self, part: int, group: int, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(columns j of the group, y/2^(2v) · 2^shift_p as a (d_A, columns) float array)."""
        plan = self.plan
        k, c0_bits, c1_bits = plan["modulus_bits"][part], plan["c0_bits"][part], plan["c1_bits"][part]
        kind, fingerprint, sections = parse_container(data)
        assert kind == 7 and fingerprint == self.fingerprint
        assert sorted(sections) == [b"CT_0", b"CT_1", b"META"] and all(len(v) == 1 for v in sections.values())
        meta = json.loads(sections[b"META"][0])
        first = group * plan["result_rows"]
        rows = min(plan["result_rows"], plan["target_dim"] - first)
        assert meta == {"group": group, "part": part, "rows": rows}
        c0 = unpack_bits(sections[b"CT_0"][0], rows * self.d_a, c0_bits).reshape(rows, self.d_a)
        c1 = unpack_bits(sections[b"CT_1"][0], rows * self.n, c1_bits).reshape(rows, self.n)
        y = np.empty((rows, self.d_a), np.uint64)
        for l, s in enumerate(self.s):
            cols = np.arange(l * self.n, min(self.d_a, (l + 1) * self.n))
            c1_s = times_ternary(c1, s, cols - l * self.n, c1_bits)
            y[:, cols] = ((c0[:, cols] << np.uint64(k - c0_bits)) + (c1_s << np.uint64(k - c1_bits)))
        y = centred(y & np.uint64(2 ** k - 1), k)
        g = y.astype(np.float64) * 2.0 ** plan["target_shifts"][part] / 2.0 ** (2 * plan["value_bits"])
        return np.arange(first, first + rows), g.T


def parse_container_sections(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(tag, payload) for tag, payloads in parse_container(data)[2].items() for payload in payloads]


def error_json(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"]


# --------------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = np.random.default_rng(20240917)
    z_b = rng.standard_normal((ROWS, D_B)).astype(np.float32) * rng.uniform(0.5, 3.0, D_B).astype(np.float32) + 1.5
    mixing = rng.standard_normal((D_B, D_A)) / math.sqrt(D_B)
    z_a = z_b.astype(np.float64) @ mixing + 0.3 * rng.standard_normal((ROWS, D_A)) - 4.0
    folder = tmp_path_factory.mktemp("public") / "pub"
    write_public_states(folder, [f"public text {i}" for i in range(ROWS)], z_b,
                        model={"model": "t", "hidden_size": D_B}, val_fraction=0.125, seed=0, name="t")
    public = load_public_states(folder)
    # The client's states for the public set, one row per text in `GET /v1/public-set/texts` order. A distribution
    # shift on the val rows of one column makes that part need the section-6 power-of-two scale-down.
    val_rows = public.indices[1]
    z_a[val_rows, 3] += 4.0 * z_a[:, 3].std()
    with ServerThread(create_app(public=folder, store="memory://")) as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as http:
            yield {"http": http, "public": public, "z_a": z_a, "rng": rng}


def normalise_by_train(parts: list[np.ndarray], ddof: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    train = parts[0].astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0, ddof=ddof)
    return [(p.astype(np.float64) - mean) / std for p in parts], mean, std


def test_private_fit_from_the_document_alone(world):
    http, public, z_a, rng = world["http"], world["public"], world["z_a"], world["rng"]

    model = http.get("/v1/model").json()
    public_set = model["public_set"]
    assert public_set["fingerprint"] == public.fingerprint and public_set["rows"] == ROWS
    texts, offset = [], 0
    while offset is not None:  # pages of at most `limits.max_public_texts`; `next` is null after the last
        page = http.get("/v1/public-set/texts", params={"offset": offset, "limit": 512}).json()
        texts, offset = texts + page["texts"], page["next"]
    assert len(texts) == ROWS
    assert hashlib.sha256(b"".join(t.encode() + b"\x00" for t in texts)).hexdigest() == public.fingerprint

    plan = http.get("/v1/fit/plan", params={"source_dim": D_A}).json()
    check_plan(plan, ROWS)
    assert plan["version"] == 2 and plan["source_dim"] == D_A and plan["target_dim"] == D_B
    assert plan["part_rows"] == [public_set["parts"]["train"], public_set["parts"]["val"]]
    assert plan["chunks"] == [2, 1]
    # DOC: 'sha256(b"xsilo private fit key seed\x00" ‖ fingerprint)': the fingerprint enters as its 64 hex
    # digits (ASCII), not as the 32 bytes they spell.
    seed_input = b"xsilo private fit key seed\x00" + public.fingerprint.encode()
    assert plan["key_seed"] == hashlib.sha256(seed_input).hexdigest()

    # Which rows form each part: GET /v1/public-set/split (val indices, ascending; train is every other row).
    split = http.get("/v1/public-set/split").json()
    assert split["rows"] == ROWS
    val = np.asarray(split["val"], dtype=np.int64)
    indices = [np.setdiff1d(np.arange(ROWS), val), val]
    assert all(np.array_equal(i, j) for i, j in zip(indices, public.indices))  # the provider's own split
    assert [i.size for i in indices] == plan["part_rows"] and all(np.all(np.diff(i) > 0) for i in indices)
    z_hat_a, _, _ = normalise_by_train([z_a[i] for i in indices])

    client = FitClient(plan, rng)
    key = client.key_container()
    # DOC: 'POST /v1/fit/sessions?source_dim=D&fingerprint=F' does not say which fingerprint F is; the public
    # set's (hex, as `/v1/model` public_set.fingerprint) is what the server takes.
    bad = http.post("/v1/fit/sessions", params={"source_dim": D_A, "fingerprint": "0" * 64}, content=key,
                    headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 409 and error_json(bad) == "public_set_mismatch"
    other_plan = container(6, hashlib.sha256(b"other plan").digest(), parse_container_sections(key))
    bad = http.post("/v1/fit/sessions", params={"source_dim": D_A, "fingerprint": public.fingerprint},
                    content=other_plan, headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 422 and error_json(bad) == "parameter_mismatch"
    opened = http.post("/v1/fit/sessions", params={"source_dim": D_A, "fingerprint": public.fingerprint},
                       content=key, headers={"Content-Type": "application/octet-stream"})
    assert opened.status_code == 201, opened.text
    session = opened.json()
    assert session["plan"] == plan
    sid = session["session_id"]
    stats = session["stats"]

    # The provider's side, for the check: its states per part, normalised by its own train mean and std; they
    # must agree with the session's stats (DOC: the std's ddof is not stated; ddof=0 is the one that agrees).
    z_hat_b, mu_b, s_b = normalise_by_train(list(public.parts))
    np.testing.assert_allclose(stats["mu_B"], mu_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["s_B"], s_b, rtol=1e-5)
    assert [p["rows"] for p in stats["parts"]] == plan["part_rows"]
    for p, (part, z_b) in enumerate(zip(stats["parts"], public.parts)):  # raw (not normalised) sums
        z_b = z_b.astype(np.float64)
        np.testing.assert_allclose(part["sum_y"], z_b.sum(axis=0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(part["trace"], (z_b ** 2).sum(), rtol=1e-5)
        if p == 0:
            np.testing.assert_allclose(part["yty_diag"], (z_b ** 2).sum(axis=0), rtol=1e-5)
        else:
            assert part["yty_diag"] is None

    # A chunk whose header carries another fingerprint is refused, with a JSON error, and costs nothing; so are
    # a chunk out of order and a result asked for before its part is complete.
    v = plan["value_bits"]
    first_messages = np.rint(2.0 ** v * z_hat_a[0][:plan["chunk_rows"]]).astype(np.int64)
    wrong = client.chunk_container(0, 0, first_messages, fingerprint=hashlib.sha256(b"other plan").digest())
    refused = http.post(f"/v1/fit/sessions/{sid}/parts/0/chunks/0", content=wrong,
                        headers={"Content-Type": "application/octet-stream"})
    assert refused.status_code == 422 and error_json(refused) == "parameter_mismatch"
    val_messages = np.rint(2.0 ** v * z_hat_a[1][:plan["chunk_rows"]]).astype(np.int64)
    early = http.post(f"/v1/fit/sessions/{sid}/parts/1/chunks/0", content=client.chunk_container(1, 0, val_messages),
                      headers={"Content-Type": "application/octet-stream"})
    assert early.status_code == 409 and error_json(early) == "out_of_order"
    premature = http.get(f"/v1/fit/sessions/{sid}/parts/0/result/0")
    assert premature.status_code == 409 and error_json(premature) == "part_incomplete"
    progress = http.get(f"/v1/fit/sessions/{sid}").json()
    assert progress["part"] == 0 and progress["next_chunk"] == 0 and progress["rows_done"] == 0
    assert progress["rows_total"] == sum(plan["part_rows"])

    for p, rows_p in enumerate(plan["part_rows"]):
        # Section 6: a part whose column has Σ_i Ẑ_A[i, t]² over 2^(⌈log2 rows_p⌉ + h_p − 2) is scaled down by
        # the smallest power of two that fixes it, and G_p multiplied back.
        bound = 2.0 ** (math.ceil(math.log2(rows_p)) + (2 if p == 0 else 3) - 2)
        worst = float((z_hat_a[p] ** 2).sum(axis=0).max())
        scale = 0
        while worst / 4.0 ** scale > bound:
            scale += 1
        messages = np.rint(2.0 ** v * z_hat_a[p] / 2.0 ** scale).astype(np.int64)
        for c in range(plan["chunks"][p]):
            progress = http.get(f"/v1/fit/sessions/{sid}").json()
            assert progress["part"] == p and progress["next_chunk"] == c
            rows = messages[c * plan["chunk_rows"]:(c + 1) * plan["chunk_rows"]]
            sent = http.post(f"/v1/fit/sessions/{sid}/parts/{p}/chunks/{c}", content=client.chunk_container(p, c, rows),
                             headers={"Content-Type": "application/octet-stream"})
            assert sent.status_code == 200, sent.text
            answer = sent.json()
            assert answer["part"] == p and answer["chunk"] == c
            last = c == plan["chunks"][p] - 1
            assert answer["part_complete"] == last
            following = ({"part": p, "chunk": c + 1} if not last else
                         {"part": p + 1, "chunk": 0} if p + 1 < len(plan["part_rows"]) else None)
            assert answer["next"] == following
        if p == 1:
            assert scale > 0, "the shifted val column should exercise the scale-down rule"
            progress = http.get(f"/v1/fit/sessions/{sid}").json()
            assert progress["next_chunk"] is None and progress["rows_done"] == progress["rows_total"] == ROWS

        # The part is complete: fetch and decrypt its result groups (part 0's before part 1 is sent).
        decrypted = np.full((D_A, D_B), np.nan)
        for g in range(plan["groups"]):
            response = http.get(f"/v1/fit/sessions/{sid}/parts/{p}/result/{g}")
            assert response.status_code == 200, response.text
            columns, block = client.decrypt(p, g, response.content)
            decrypted[:, columns] = block * 2.0 ** scale
            again = http.get(f"/v1/fit/sessions/{sid}/parts/{p}/result/{g}")
            if p == 0:  # handed out once
                assert again.status_code == 409 and error_json(again) == "result_fetched"
            else:
                # DOC: not in the document: once the last result of the last part is fetched, the server closes
                # the fit session, so a second fetch (or a DELETE) is answered 404 `fit_session_not_found`.
                assert again.status_code == 404 and error_json(again) == "fit_session_not_found"
        expected = z_hat_a[p].T @ z_hat_b[p]
        # Section 6's precision, per entry: encryption noise about 3.2·√rows·2^−v and rounding about
        # 2^−output_bits, both in units of the encrypted (scaled-down) Ẑ's, times 2^(shift_p + scale).
        sigma = (3.2 * math.sqrt(rows_p) * 2.0 ** -v + 2.0 ** -plan["output_bits"]) \
            * 2.0 ** (plan["target_shifts"][p] + scale)
        error = np.abs(decrypted - expected)
        assert np.isfinite(decrypted).all()
        assert error.max() < 6 * sigma, (p, error.max(), sigma)
        assert np.abs(expected).max() > 1000 * sigma  # the check is not vacuous

    gone = http.delete(f"/v1/fit/sessions/{sid}")
    assert gone.status_code == 404 and error_json(gone) == "fit_session_not_found"


def test_bit_packing_and_expansion_as_the_document_reads():
    """Value j at bits j·K …, least significant first; SHAKE-128 of domain ‖ 0x00 ‖ seed, little-endian words."""
    assert pack_bits(np.array([1, 2, 7]), 3) == bytes([0b11010001, 0b1])
    values = np.random.default_rng(0).integers(0, 2 ** 47, 101).astype(np.uint64)
    assert len(pack_bits(values, 47)) == math.ceil(101 * 47 / 8)
    np.testing.assert_array_equal(unpack_bits(pack_bits(values, 47), 101, 47), values)
    words = uniform(b"seed", b"dom", 3, 12)
    raw = hashlib.shake_128(b"dom\x00seed").digest(6)
    assert words.tolist() == [int.from_bytes(raw[i:i + 2], "little") & 0xFFF for i in (0, 2, 4)]
    # the negacyclic product against a schoolbook one
    rng = np.random.default_rng(1)
    a, s = rng.integers(0, 2 ** 40, 2048).astype(np.uint64), ternary(rng, 2048)
    full = np.convolve(a.astype(object), s.astype(object))
    want = [(full[t] - (full[t + 2048] if t + 2048 < full.size else 0)) % 2 ** 40 for t in (0, 1, 777, 2047)]
    assert times_ternary(a, s, np.array([0, 1, 777, 2047]), 40)[0].tolist() == want


def send_part(http: httpx.Client, sid: str, client: FitClient, plan: dict, p: int, z_hat: np.ndarray
              ) -> tuple[np.ndarray, int]:
    """Section 6 for one part: scale down as the rule says, send its chunks in order, decrypt every group;
    (G_p in units of Ẑ, the client's scale-down power)."""
    bound = 2.0 ** (math.ceil(math.log2(plan["part_rows"][p])) + (2 if p == 0 else 3) - 2)
    scale = 0
    while float((z_hat ** 2).sum(axis=0).max()) / 4.0 ** scale > bound:
        scale += 1
    messages = np.rint(2.0 ** plan["value_bits"] * z_hat / 2.0 ** scale).astype(np.int64)
    for c in range(plan["chunks"][p]):
        rows = messages[c * plan["chunk_rows"]:(c + 1) * plan["chunk_rows"]]
        sent = http.post(f"/v1/fit/sessions/{sid}/parts/{p}/chunks/{c}", content=client.chunk_container(p, c, rows),
                         headers={"Content-Type": "application/octet-stream"})
        assert sent.status_code == 200, sent.text
    gram = np.full((z_hat.shape[1], plan["target_dim"]), np.nan)
    for g in range(plan["groups"]):
        response = http.get(f"/v1/fit/sessions/{sid}/parts/{p}/result/{g}")
        assert response.status_code == 200, response.text
        columns, block = client.decrypt(p, g, response.content)
        gram[:, columns] = block * 2.0 ** scale
    return gram, scale


def test_a_fit_with_anchors_from_the_document_alone(tmp_path):
    """Section 6, **Anchors**: the anchor texts are paged like the public texts and fingerprinted the same way,
    they are part 2 of the plan, normalised by the train part's mean and std like every part, and their stats
    carry yty_diag."""
    rng = np.random.default_rng(7)
    rows, anchors = 300, 40
    z_b = rng.standard_normal((rows + anchors, D_B)).astype(np.float32) * 2.0 + 1.0
    z_a = z_b.astype(np.float64) @ (rng.standard_normal((D_B, D_A)) / math.sqrt(D_B)) - 2.0
    folder = write_public_states(tmp_path / "pub", [f"public text {i}" for i in range(rows)], z_b[:rows],
                                 model={"model": "t", "hidden_size": D_B}, val_fraction=0.2, seed=0, name="t",
                                 anchors=Anchors([f"written text {i}" for i in range(anchors)], z_b[rows:]))
    public = load_public_states(folder)
    with ServerThread(create_app(public=folder, store="memory://", max_public_texts=16)) as server, \
            httpx.Client(base_url=server.url, timeout=60.0) as http:
        info = http.get("/v1/model").json()["public_set"]["anchors"]
        texts, offset = [], 0
        while offset is not None:
            page = http.get("/v1/public-set/anchors", params={"offset": offset}).json()
            texts, offset = texts + page["texts"], page["next"]
        assert len(texts) == info["rows"] == anchors
        assert hashlib.sha256(b"".join(t.encode() + b"\x00" for t in texts)).hexdigest() == info["fingerprint"]
        plan = http.get("/v1/fit/plan", params={"source_dim": D_A}).json()
        check_plan(plan, rows + anchors)
        val = np.asarray(http.get("/v1/public-set/split").json()["val"], dtype=np.int64)
        indices = [np.setdiff1d(np.arange(rows), val), val]
        assert plan["part_rows"] == [len(indices[0]), len(indices[1]), anchors]
        z_hat_a, _, _ = normalise_by_train([z_a[i] for i in indices] + [z_a[rows:]])
        client = FitClient(plan, rng)
        params = {"source_dim": D_A, "fingerprint": public.fingerprint}
        octets = {"Content-Type": "application/octet-stream"}
        for wrong in ({}, {"anchors": "0" * 64}):  # the anchors' fingerprint is required, and must be theirs
            refused = http.post("/v1/fit/sessions", params={**params, **wrong}, content=client.key_container(),
                                headers=octets)
            assert refused.status_code == 409 and error_json(refused) == "anchors_mismatch"
        opened = http.post("/v1/fit/sessions", params={**params, "anchors": info["fingerprint"]},
                           content=client.key_container(), headers=octets)
        assert opened.status_code == 201, opened.text
        sid, stats = opened.json()["session_id"], opened.json()["stats"]
        anchor_y = z_b[rows:].astype(np.float64)
        np.testing.assert_allclose(stats["parts"][2]["yty_diag"], (anchor_y ** 2).sum(axis=0), rtol=1e-5)
        np.testing.assert_allclose(stats["parts"][2]["sum_y"], anchor_y.sum(axis=0), rtol=1e-5, atol=1e-4)
        z_hat_b, _, _ = normalise_by_train(list(public.fit_parts))
        for p in range(3):
            gram, scale = send_part(http, sid, client, plan, p, z_hat_a[p])
            expected = z_hat_a[p].T @ z_hat_b[p]
            sigma = (3.2 * math.sqrt(plan["part_rows"][p]) * 2.0 ** -plan["value_bits"]
                     + 2.0 ** -plan["output_bits"]) * 2.0 ** (plan["target_shifts"][p] + scale)
            assert np.abs(gram - expected).max() < 6 * sigma, (p, np.abs(gram - expected).max(), sigma)
