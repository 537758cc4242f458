"""Query and reply blobs: one query ciphertext (up to `lanes` inputs) in, one reply ciphertext per block out;
fit chunks: one query-level ciphertext per group of source columns (`encrypted.gram`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tenseal.sealapi as seal

from . import wire
from .errors import InvalidCiphertext, ParameterMismatch
from .layout import LinearLayout
from .profiles import CkksProfile
from .wire import Kind

if TYPE_CHECKING:
    from .gram import GramPlan

_SLACK = 4096


def ciphertext_max_bytes(profile: CkksProfile, primes: int) -> int:
    """Raw size of a 2-polynomial ciphertext over `primes` primes, plus one zstd block: the zstd bound counts
    every compressed block as a full 128 KiB, and a 2-prime reply's last block is short."""
    return 2 * primes * profile.poly_modulus_degree * 8 + _SLACK + wire.ZSTD_MAX_BLOCK


def query_max_bytes(layout: LinearLayout) -> int:
    """Upper bound of one query for `layout`: the container, its META JSON and one ciphertext over all but the
    special prime, uncompressed. A server caps the query body with it."""
    primes = len(layout.profile.coeff_modulus_bits) - 1
    return (wire.HEADER.size + 2 * wire.SECTION.size + wire.MAX_JSON_BYTES
            + ciphertext_max_bytes(layout.profile, primes))


def query_parms_id(profile: CkksProfile) -> list[int]:
    return profile.context().first_parms_id()


def reply_parms_id(profile: CkksProfile) -> list[int]:
    return profile.context().first_context_data().next_context_data().parms_id()


def write_query(layout: LinearLayout, ciphertext_blob: bytes, count: int) -> bytes:
    meta = {"input_dim": layout.input_dim, "padded_input": layout.padded_input, "lanes": layout.lanes,
            "pairing": layout.pairing, "count": count}
    return wire.pack(Kind.QUERY, layout.profile.fingerprint,
                     [(b"META", wire.dump_json(meta)), (b"CTXT", ciphertext_blob)])


def _open(data: Any, kind: Kind, layout: LinearLayout, ciphertexts: tuple[int, int]) -> tuple[dict, list]:
    what = wire.KIND_NAMES[kind]
    got_kind, fingerprint, sections = wire.unpack(data, kind, InvalidCiphertext)
    if got_kind != kind:
        raise InvalidCiphertext(f"expected a {what}, got {wire.KIND_NAMES[got_kind]}; {wire.FIX_HINTS[kind]}")
    if fingerprint != layout.profile.fingerprint:
        raise ParameterMismatch(f"{what} was made with other CKKS parameters than profile "
                                f"{layout.profile.to_dict()}; encrypt with keys made for layer.layout.profile")
    grouped = wire.section_map(sections, {b"META": (1, 1), b"CTXT": ciphertexts}, what, InvalidCiphertext)
    meta = wire.load_json(grouped[b"META"][0], what, InvalidCiphertext)
    if not isinstance(meta, dict):
        raise InvalidCiphertext(f"{what}: META section must be a JSON object")
    return meta, grouped[b"CTXT"]


def _count(meta: dict, layout: LinearLayout, what: str) -> int:
    count = meta.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= layout.lanes:
        raise InvalidCiphertext(f"{what}: count {count!r} must be an int in [1, {layout.lanes}]")
    return count


def _load_ciphertext(blob: memoryview, profile: CkksProfile, parms_id: list[int], primes: int, kind: Kind) -> Any:
    what, fix = wire.KIND_NAMES[kind], wire.FIX_HINTS[kind]
    ct = wire.seal_from_bytes(seal.Ciphertext(), profile.context(), blob, ciphertext_max_bytes(profile, primes),
                              what, InvalidCiphertext)
    if ct.parms_id() != parms_id:
        raise ParameterMismatch(f"{what}: ciphertext is at another modulus level or parameter set than expected; {fix}")
    if ct.size() != 2 or not ct.is_ntt_form():
        raise InvalidCiphertext(f"{what}: expected a 2-polynomial CKKS ciphertext in NTT form; {fix}")
    if kind in (Kind.QUERY, Kind.CHUNK) and ct.is_transparent():  # SEAL refuses every product with it
        raise InvalidCiphertext(f"{what}: ciphertext is transparent (its mask polynomial is zero), so it encrypts "
                                f"nothing; {fix}")
    if abs(ct.scale / profile.scale - 1.0) > 1e-9:
        raise InvalidCiphertext(f"{what}: ciphertext scale {ct.scale!r} is not the profile's 2^{profile.scale_bits}; "
                                f"{fix}")
    return ct


def read_query(data: Any, layout: LinearLayout) -> tuple[Any, int]:
    """Validate a query blob for `layout`; return (ciphertext, number of inputs it packs)."""
    meta, blobs = _open(data, Kind.QUERY, layout, (1, 1))
    expected = {"input_dim": layout.input_dim, "padded_input": layout.padded_input, "lanes": layout.lanes,
                "pairing": layout.pairing}
    got = {k: meta.get(k) for k in expected}
    if got != expected:
        raise ParameterMismatch(f"query packs {got} but this layer expects {expected}; "
                                "encrypt with this layer's layout (GET it from the server)")
    primes = len(layout.profile.coeff_modulus_bits) - 1
    count = _count(meta, layout, "query")
    ct = _load_ciphertext(blobs[0], layout.profile, query_parms_id(layout.profile), primes, Kind.QUERY)
    return ct, count


def write_reply(layout: LinearLayout, ciphertexts: list[Any], count: int) -> bytes:
    meta = {"blocks": layout.blocks, "count": count, "output_dim": layout.output_dim}
    sections = [(b"META", wire.dump_json(meta))]
    sections += [(b"CTXT", wire.seal_to_bytes(ct)) for ct in ciphertexts]
    return wire.pack(Kind.REPLY, layout.profile.fingerprint, sections)


def read_reply(data: Any, layout: LinearLayout) -> tuple[list[Any], int]:
    """Validate a reply blob for `layout`; return (one ciphertext per block, number of inputs)."""
    meta, blobs = _open(data, Kind.REPLY, layout, (layout.blocks, layout.blocks))
    if meta.get("blocks") != layout.blocks or meta.get("output_dim") != layout.output_dim:
        raise ParameterMismatch(f"reply is for output_dim={meta.get('output_dim')!r}, blocks={meta.get('blocks')!r}; "
                                f"this layout has {layout.output_dim}, {layout.blocks}: decrypt with the layer's layout")
    count = _count(meta, layout, "reply")
    primes = len(layout.profile.coeff_modulus_bits) - 2
    pid = reply_parms_id(layout.profile)
    cts = [_load_ciphertext(b, layout.profile, pid, primes, Kind.REPLY) for b in blobs]
    return cts, count


# --- private fit: one chunk of source columns up (FIT chunk), replies per group down (REPLY) -------------------

def chunk_max_bytes(plan: "GramPlan") -> int:
    """Upper bound of one fit chunk for `plan`: the container, its META JSON and `plan.groups` query-level
    ciphertexts, uncompressed. A server caps the chunk body with it."""
    primes = len(plan.layout.profile.coeff_modulus_bits) - 1
    return (wire.HEADER.size + (plan.groups + 1) * wire.SECTION.size + wire.MAX_JSON_BYTES
            + plan.groups * ciphertext_max_bytes(plan.layout.profile, primes))


def _chunk_meta(plan: "GramPlan", part: int, chunk: int) -> dict:
    L = plan.layout
    return {"part": part, "chunk": chunk, "rows": plan.rows(part, chunk), "groups": plan.groups,
            "source_dim": plan.source_dim, "target_dim": plan.target_dim, "chunk_rows": plan.chunk_rows,
            "lanes": L.lanes, "pairing": L.pairing}


def write_chunk(plan: "GramPlan", part: int, chunk: int, ciphertext_blobs: list[bytes]) -> bytes:
    sections = [(b"META", wire.dump_json(_chunk_meta(plan, part, chunk)))]
    sections += [(b"CTXT", blob) for blob in ciphertext_blobs]
    return wire.pack(Kind.CHUNK, plan.layout.profile.fingerprint, sections)


def read_chunk(data: Any, plan: "GramPlan", part: int, chunk: int) -> list[Any]:
    """Validate the fit chunk `chunk` of part `part` for `plan`; return its `plan.groups` query ciphertexts.

    Sizes, section counts and META are checked against the plan before any SEAL object is built."""
    what, fix = wire.KIND_NAMES[Kind.CHUNK], wire.FIX_HINTS[Kind.CHUNK]
    limit = chunk_max_bytes(plan)
    if isinstance(data, (bytes, bytearray, memoryview)) and memoryview(data).nbytes > limit:
        raise InvalidCiphertext(f"{what} of {memoryview(data).nbytes} bytes exceeds the {limit} bytes of one chunk "
                                f"of this plan; {fix}")
    layout = plan.layout
    got_kind, fingerprint, sections = wire.unpack(data, Kind.CHUNK, InvalidCiphertext, max_sections=plan.groups + 1)
    if got_kind != Kind.CHUNK:
        raise InvalidCiphertext(f"expected a {what}, got {wire.KIND_NAMES[got_kind]}; {fix}")
    if fingerprint != layout.profile.fingerprint:
        raise ParameterMismatch(f"{what} was made with other CKKS parameters than profile "
                                f"{layout.profile.describe()}; encrypt with keys made for plan.layout.profile")
    grouped = wire.section_map(sections, {b"META": (1, 1), b"CTXT": (plan.groups, plan.groups)}, what,
                               InvalidCiphertext)
    meta = wire.load_json(grouped[b"META"][0], what, InvalidCiphertext)
    if not isinstance(meta, dict):
        raise InvalidCiphertext(f"{what}: META section must be a JSON object")
    expected = _chunk_meta(plan, part, chunk)
    if any(isinstance(v, bool) for v in meta.values()):
        raise InvalidCiphertext(f"{what}: META fields must be ints and strings, not true/false; {fix}")
    if (meta.get("part"), meta.get("chunk")) != (part, chunk):
        raise ParameterMismatch(f"{what} is chunk {meta.get('chunk')!r:.20} of part {meta.get('part')!r:.20}, but "
                                f"chunk {chunk} of part {part} is expected here; send each part's chunks in order")
    if meta != expected:
        wrong = sorted(k for k in set(expected) | set(meta) if meta.get(k) != expected.get(k))
        raise ParameterMismatch(f"{what} META differs from the plan in {wrong[:8]} (expected {expected}); "
                                "encrypt with the plan the server published (GramPlan.from_dict)")
    primes = len(layout.profile.coeff_modulus_bits) - 1
    pid = query_parms_id(layout.profile)
    return [_load_ciphertext(blob, layout.profile, pid, primes, Kind.CHUNK) for blob in grouped[b"CTXT"]]
