"""The private fit's three messages, in the `wire` container with the plan's fingerprint in its header:

- fit key (kind 6): META {"secrets"}, PKEY = the client's p_B (secrets x N values at `plan.key_bits`);
- fit chunk (kind 5): META {"part", "chunk", "rows"}, SEED (32 bytes: the rows' masks), BODY = b (rows x d_A
  values at the part's modulus bits), row-major;
- fit result (kind 7): META {"part", "group", "rows"}, CT_0 (rows x d_A at `c0_bits`), CT_1 (rows x N at `c1_bits`).

Every length is exact for the plan, and is checked before anything is unpacked.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import wire
from .errors import InvalidCiphertext, InvalidKeys, ParameterMismatch
from .gram_plan import GramPlan
from .rlwe import RING_DEGREE, SEED_BYTES, pack_bits, packed_size, unpack_bits
from .wire import Kind


def _open(data: Any, kind: Kind, plan: GramPlan, tags: dict[bytes, tuple[int, int]], error: type[Exception],
          limit: int) -> tuple[dict, dict[bytes, list[memoryview]]]:
    what, fix = wire.KIND_NAMES[kind], wire.FIX_HINTS[kind]
    if isinstance(data, (bytes, bytearray, memoryview)) and memoryview(data).nbytes > limit:
        raise error(f"{what} of {memoryview(data).nbytes} bytes exceeds the {limit} bytes this plan allows; {fix}")
    meta, grouped = wire.open_container(data, kind, plan.fingerprint, tags, error, ParameterMismatch,
                                        f"{what} was made for another fit plan; {fix} (GET /v1/fit/plan again)",
                                        max_sections=len(tags))
    if any(isinstance(v, bool) or not isinstance(v, int) for v in meta.values()):
        raise error(f"{what}: META must be a JSON object of ints; {fix}")
    return meta, grouped


def _values(payload: memoryview, count: int, bits: int, what: str, name: str, error: type[Exception]) -> np.ndarray:
    expected = packed_size(count, bits)
    if len(payload) != expected:
        raise error(f"{what}: {name} holds {len(payload)} bytes, not the {expected} of {count} values of {bits} bits")
    return unpack_bits(payload, count, bits)


def write_key(plan: GramPlan, p_b: np.ndarray) -> bytes:
    return wire.pack(Kind.FIT_KEY, plan.fingerprint, [(b"META", wire.dump_json({"secrets": plan.secrets})),
                                                       (b"PKEY", pack_bits(p_b, plan.key_bits))])


def read_key(data: Any, plan: GramPlan) -> np.ndarray:
    """The client's p_B, (secrets, N) int64 in [0, 2^key_bits)."""
    what = wire.KIND_NAMES[Kind.FIT_KEY]
    meta, grouped = _open(data, Kind.FIT_KEY, plan, {b"META": (1, 1), b"PKEY": (1, 1)}, InvalidKeys,
                          plan.keys_max_bytes)
    if meta != {"secrets": plan.secrets}:
        raise InvalidKeys(f"{what} META {meta!r:.100} is not {{'secrets': {plan.secrets}}}; "
                          f"{wire.FIX_HINTS[Kind.FIT_KEY]}")
    count = plan.secrets * RING_DEGREE
    return _values(grouped[b"PKEY"][0], count, plan.key_bits, what, "PKEY", InvalidKeys).reshape(plan.secrets,
                                                                                                  RING_DEGREE)


def write_chunk(plan: GramPlan, part: int, chunk: int, seed: bytes, b: np.ndarray) -> bytes:
    meta = {"part": part, "chunk": chunk, "rows": plan.rows(part, chunk)}
    return wire.pack(Kind.CHUNK, plan.fingerprint, [(b"META", wire.dump_json(meta)), (b"SEED", seed),
                                                     (b"BODY", pack_bits(b, plan.modulus_bits(part)))])


def read_chunk(data: Any, plan: GramPlan, part: int, chunk: int) -> tuple[bytes, np.ndarray]:
    """(seed, b) of chunk `chunk` of part `part`: b is (rows, source_dim) int64 below the part's modulus."""
    what, fix = wire.KIND_NAMES[Kind.CHUNK], wire.FIX_HINTS[Kind.CHUNK]
    rows = plan.rows(part, chunk)
    meta, grouped = _open(data, Kind.CHUNK, plan, {b"META": (1, 1), b"SEED": (1, 1), b"BODY": (1, 1)},
                          InvalidCiphertext, plan.chunk_max_bytes)
    if (meta.get("part"), meta.get("chunk")) != (part, chunk):
        raise ParameterMismatch(f"{what} is chunk {meta.get('chunk')!r:.20} of part {meta.get('part')!r:.20}, but "
                                f"chunk {chunk} of part {part} is expected here; send each part's chunks in order")
    if meta != {"part": part, "chunk": chunk, "rows": rows}:
        raise ParameterMismatch(f"{what} META {meta!r:.100} does not match the plan ({rows} rows); {fix}")
    seed = bytes(grouped[b"SEED"][0])
    if len(seed) != SEED_BYTES:
        raise InvalidCiphertext(f"{what}: SEED must be {SEED_BYTES} bytes, got {len(seed)}; {fix}")
    body = _values(grouped[b"BODY"][0], rows * plan.source_dim, plan.modulus_bits(part), what, "BODY",
                   InvalidCiphertext)
    return seed, body.reshape(rows, plan.source_dim)


def write_result(plan: GramPlan, part: int, group: int, c0: np.ndarray, c1: np.ndarray) -> bytes:
    meta = {"part": part, "group": group, "rows": plan.group_rows(group)}
    return wire.pack(Kind.FIT_RESULT, plan.fingerprint, [(b"META", wire.dump_json(meta)),
                                                          (b"CT_0", pack_bits(c0, plan.c0_bits(part))),
                                                          (b"CT_1", pack_bits(c1, plan.c1_bits(part)))])


def read_result(data: Any, plan: GramPlan, part: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(c0, c1) of result group `group` of part `part`: (rows, source_dim) and (rows, N), switched down."""
    what = wire.KIND_NAMES[Kind.FIT_RESULT]
    rows = plan.group_rows(group)
    meta, grouped = _open(data, Kind.FIT_RESULT, plan, {b"META": (1, 1), b"CT_0": (1, 1), b"CT_1": (1, 1)},
                          InvalidCiphertext, plan.result_max_bytes)
    if meta != {"part": part, "group": group, "rows": rows}:
        raise ParameterMismatch(f"{what} is {meta!r:.100}, expected part {part}, group {group} of {rows} rows; "
                                f"{wire.FIX_HINTS[Kind.FIT_RESULT]}")
    c0 = _values(grouped[b"CT_0"][0], rows * plan.source_dim, plan.c0_bits(part), what, "CT_0", InvalidCiphertext)
    c1 = _values(grouped[b"CT_1"][0], rows * RING_DEGREE, plan.c1_bits(part), what, "CT_1", InvalidCiphertext)
    return c0.reshape(rows, plan.source_dim), c1.reshape(rows, RING_DEGREE)
