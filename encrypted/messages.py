"""Query and reply blobs: one query ciphertext (up to `lanes` inputs) in, one reply ciphertext per block out.
(The private fit's messages are `encrypted.gram_wire`.)"""
from __future__ import annotations

from typing import Any

import tenseal.sealapi as seal

from . import wire
from .errors import InvalidCiphertext, ParameterMismatch
from .layout import LinearLayout
from .profiles import CkksProfile
from .wire import Kind

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
    meta, grouped = wire.open_container(
        data, kind, layout.profile.fingerprint, {b"META": (1, 1), b"CTXT": ciphertexts}, InvalidCiphertext,
        ParameterMismatch, f"{wire.KIND_NAMES[kind]} was made with other CKKS parameters than profile "
                           f"{layout.profile.to_dict()}; encrypt with keys made for layer.layout.profile")
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
    if kind == Kind.QUERY and ct.is_transparent():  # SEAL refuses every product with it
        raise InvalidCiphertext(f"{what}: ciphertext is transparent (its mask polynomial is zero), so it encrypts "
                                f"nothing; {fix}")
    if abs(ct.scale / profile.scale - 1.0) > 1e-9:
        raise InvalidCiphertext(f"{what}: ciphertext scale {ct.scale!r} is not the profile's 2^{profile.scale_bits}; "
                                f"{fix}")
    return ct


def _query_header(data: Any, layout: LinearLayout) -> tuple[int, Any]:
    meta, blobs = _open(data, Kind.QUERY, layout, (1, 1))
    expected = {"input_dim": layout.input_dim, "padded_input": layout.padded_input, "lanes": layout.lanes,
                "pairing": layout.pairing}
    got = {k: meta.get(k) for k in expected}
    if got != expected:
        raise ParameterMismatch(f"query packs {got} but this layer expects {expected}; "
                                "encrypt with this layer's layout (GET it from the server)")
    return _count(meta, layout, "query"), blobs[0]


def query_rows(data: Any, layout: LinearLayout) -> int:
    """The number of inputs a query blob declares, from its header alone (no ciphertext is parsed)."""
    return _query_header(data, layout)[0]


def read_query(data: Any, layout: LinearLayout) -> tuple[Any, int]:
    """Validate a query blob for `layout`; return (ciphertext, number of inputs it packs)."""
    count, blob = _query_header(data, layout)
    primes = len(layout.profile.coeff_modulus_bits) - 1
    ct = _load_ciphertext(blob, layout.profile, query_parms_id(layout.profile), primes, Kind.QUERY)
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
