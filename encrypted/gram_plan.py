"""The private fit's plan: chunking, moduli and message sizes both parties derive from the same few numbers.

Part p (train, val) is fitted under q_p = 2^k_p with k_p = 2·value_bits + ceil(log2 rows_p) + h_p: both sides
scale their states, normalised by their train part's mean and std, by 2^value_bits, so |G| <= rows of the train
part by Cauchy-Schwarz; h_0 = 2 bits cover the sign and the rounding, h_p = 3 for a val part. No wrap is
possible: each side scales a part down by a power of two (`column_shift`) until every column's squared norm is
at most 2^(ceil(log2 rows) + h_p - 2), so every |G| stays below a quarter of the modulus; the provider's shifts are in
the plan (`target_shifts`), the client's stay with the client. Honest data needs no shift. Every k_p stays within SEAL's 128-bit bound for ring degree
N = 2048 (`CoeffModulus.MaxBitCount`, 54 bits). The answer is switched down to `c0_bits` and `c1_bits`: enough
that the rounding costs G about 2^-output_bits per entry (the mask's rounding is multiplied by the ternary
secret, hence 3 more bits); the encryption noise adds about 3.2·sqrt(rows)·2^-value_bits (`precision_bits`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .errors import InsecureParameters, InvalidLayout, ParameterMismatch, published_dict
from .profiles import max_modulus_bits
from .rlwe import RING_DEGREE, SEED_BYTES, packed_size

GRAM_VERSION = 2
DEFAULT_CHUNK_ROWS = 512
DEFAULT_RESULT_ROWS = 64
DEFAULT_VALUE_BITS = 16
DEFAULT_OUTPUT_BITS = 10
DEFAULT_MAX_ACCUMULATOR_BYTES = 256 << 20
MAX_PARTS = 8
MAX_DIM = 16384
MAX_CHUNK_ROWS = 4096
META_SLACK = 512  # container header, section headers and the META JSON of one message


def _int(name: str, value: Any, lo: int, hi: int, fix: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidLayout(f"{name} must be an int in [{lo}, {hi}], got {value!r:.60}{'; ' + fix if fix else ''}")
    return value


def key_seed_for(public_fingerprint: str) -> bytes:
    """The provider's seed of the re-randomisation key's uniform part: fixed by its public set, so every replica
    agrees and no client chooses it."""
    return hashlib.sha256(b"xsilo private fit key seed\x00" + public_fingerprint.encode()).digest()


@dataclass(frozen=True)
class GramPlan:
    """Everything both sides of a private fit need; `to_dict` is what the provider publishes."""

    source_dim: int  # d_A: the client's columns (message positions of each row's ciphertext)
    target_dim: int  # d_B: the provider's columns (one answer ciphertext each)
    part_rows: tuple[int, ...]  # rows of each part (0 = train, 1 = val)
    key_seed: bytes  # SEED_BYTES: the provider's, for the uniform half of the re-randomisation key
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    result_rows: int = DEFAULT_RESULT_ROWS  # answer rows (target columns) per result message
    value_bits: int = DEFAULT_VALUE_BITS
    output_bits: int = DEFAULT_OUTPUT_BITS
    target_shifts: tuple[int, ...] | None = None  # per part: the provider scales its states by 2^-shift (None: 0s)

    ring_degree = RING_DEGREE

    def __post_init__(self) -> None:
        _int("source_dim", self.source_dim, 1, MAX_DIM)
        _int("target_dim", self.target_dim, 1, MAX_DIM)
        _int("chunk_rows", self.chunk_rows, 1, MAX_CHUNK_ROWS)
        _int("result_rows", self.result_rows, 1, MAX_DIM)
        _int("value_bits", self.value_bits, 8, 20)
        _int("output_bits", self.output_bits, 4, 20)
        if not isinstance(self.part_rows, tuple) or not 1 <= len(self.part_rows) <= MAX_PARTS:
            raise InvalidLayout(f"part_rows must be a tuple of 1 to {MAX_PARTS} row counts, got {self.part_rows!r:.100}")
        for i, rows in enumerate(self.part_rows):
            _int(f"part_rows[{i}]", rows, 1, 1 << 30)
        if not isinstance(self.key_seed, bytes) or len(self.key_seed) != SEED_BYTES:
            raise InvalidLayout(f"key_seed must be {SEED_BYTES} bytes")
        shifts = (0,) * len(self.part_rows) if self.target_shifts is None else self.target_shifts
        if not isinstance(shifts, tuple) or len(shifts) != len(self.part_rows):
            raise InvalidLayout(f"target_shifts must be a tuple of one int per part, got {shifts!r:.100}")
        for i, shift in enumerate(shifts):
            _int(f"target_shifts[{i}]", shift, 0, self.value_bits)
        object.__setattr__(self, "target_shifts", shifts)
        limit = max_modulus_bits(RING_DEGREE)
        for part in range(len(self.part_rows)):
            if self.modulus_bits(part) > limit:
                most = 2 ** (limit - 2 * self.value_bits - 3)  # the val parts' headroom: any part may be one
                raise InsecureParameters(f"part {part} of {self.part_rows[part]} rows needs a {self.modulus_bits(part)}"
                                         f"-bit modulus, over SEAL's 128-bit bound of {limit} bits at ring degree "
                                         f"{RING_DEGREE}; split the public set into parts of at most {most} rows")

    # --- moduli --------------------------------------------------------------------------------------------

    def headroom_bits(self, part: int) -> int:
        return math.ceil(math.log2(self.part_rows[self.check_part(part)])) + (2 if part == 0 else 3)

    def modulus_bits(self, part: int) -> int:
        return 2 * self.value_bits + self.headroom_bits(part)

    def column_shift(self, part: int, squared_norms: Any) -> int:
        """The power of two by which one side scales part `part` down, so that every column's squared norm
        (`squared_norms`: Σ over the part's rows of its normalised values squared, per column) is at most
        2^(ceil(log2 rows) + h - 2): then |G| <= 2^(k - 2 - 2·value_bits) by Cauchy-Schwarz, a quarter of the
        modulus, and nothing wraps (a train part normalised by its own std has squared norms = rows: no shift)."""
        worst = float(np.max(squared_norms, initial=0.0))
        if not math.isfinite(worst):
            raise InvalidLayout("the states' column norms are not finite; clean and normalise them first")
        limit = self.headroom_bits(part) - 2
        excess = math.log2(worst) - limit if worst > 0 else 0.0
        shift = max(0, math.ceil(excess / 2))
        if shift > self.value_bits:
            raise InvalidLayout(f"part {part}'s states have a column of squared norm {worst:.3g}, too large to fit "
                                "even scaled down; normalise each side's states by its train part's mean and std")
        return shift

    def c0_bits(self, part: int) -> int:
        return min(self.modulus_bits(part), self.headroom_bits(part) + self.output_bits + 1)

    def c1_bits(self, part: int) -> int:
        return min(self.modulus_bits(part), self.headroom_bits(part) + self.output_bits + 4)

    @property
    def key_bits(self) -> int:
        """The public key's modulus: the largest part's (a smaller part reduces it, since every q divides it)."""
        return max(self.modulus_bits(p) for p in range(len(self.part_rows)))

    @property
    def secrets(self) -> int:
        """Secrets per client key: one per block of ring_degree message positions (all share each row's mask)."""
        return -(-self.source_dim // RING_DEGREE)

    # --- chunks and results --------------------------------------------------------------------------------

    def check_part(self, part: Any) -> int:
        if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part < len(self.part_rows):
            raise ParameterMismatch(f"part {part!r:.20} does not exist; this plan has parts "
                                    f"0..{len(self.part_rows) - 1}")
        return part

    def chunks(self, part: int) -> int:
        return -(-self.part_rows[self.check_part(part)] // self.chunk_rows)

    def rows(self, part: int, chunk: int) -> int:
        n = self.chunks(part)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 <= chunk < n:
            raise ParameterMismatch(f"chunk {chunk!r:.20} does not exist; part {part} has chunks 0..{n - 1}")
        return min(self.chunk_rows, self.part_rows[part] - chunk * self.chunk_rows)

    @property
    def groups(self) -> int:
        """Result messages per part, `result_rows` target columns each."""
        return -(-self.target_dim // self.result_rows)

    def group_rows(self, group: int) -> int:
        if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < self.groups:
            raise ParameterMismatch(f"group {group!r:.20} does not exist; results have groups 0..{self.groups - 1}")
        return min(self.result_rows, self.target_dim - group * self.result_rows)

    def chunk_bytes(self, part: int, chunk: int) -> int:
        """The body of chunk `chunk` of part `part`: its rows' b at the part's modulus (exact)."""
        return packed_size(self.rows(part, chunk) * self.source_dim, self.modulus_bits(part))

    @property
    def chunk_max_bytes(self) -> int:
        """Upper bound of one chunk message (a server caps the body with it)."""
        body = max(self.chunk_bytes(p, 0) for p in range(len(self.part_rows)))
        return body + SEED_BYTES + META_SLACK

    @property
    def key_bytes(self) -> int:
        return packed_size(self.secrets * RING_DEGREE, self.key_bits)

    @property
    def keys_max_bytes(self) -> int:
        return self.key_bytes + META_SLACK

    def result_bytes(self, part: int, group: int) -> tuple[int, int]:
        rows = self.group_rows(group)
        return (packed_size(rows * self.source_dim, self.c0_bits(part)),
                packed_size(rows * RING_DEGREE, self.c1_bits(part)))

    @property
    def result_max_bytes(self) -> int:
        return max(sum(self.result_bytes(p, 0)) for p in range(len(self.part_rows))) + META_SLACK

    @property
    def accumulator_bytes(self) -> int:
        """Provider memory of one part: target_dim x (source_dim + N) int64 sums."""
        return self.target_dim * (self.source_dim + RING_DEGREE) * 8

    @property
    def upload_bytes(self) -> int:
        return self.key_bytes + sum(self.chunk_bytes(p, c) for p in range(len(self.part_rows))
                                    for c in range(self.chunks(p)))

    @property
    def download_bytes(self) -> int:
        return sum(sum(self.result_bytes(p, g)) for p in range(len(self.part_rows)) for g in range(self.groups))

    @property
    def fingerprint(self) -> bytes:
        """32 bytes naming this plan; every message of the fit carries it in its container header."""
        return hashlib.sha256(wire.dump_json(self.to_dict())).digest()

    def to_dict(self) -> dict[str, Any]:
        parts = range(len(self.part_rows))
        return {"version": GRAM_VERSION, "ring_degree": RING_DEGREE, "source_dim": self.source_dim,
                "target_dim": self.target_dim, "part_rows": list(self.part_rows), "key_seed": self.key_seed.hex(),
                "chunk_rows": self.chunk_rows, "result_rows": self.result_rows, "value_bits": self.value_bits,
                "output_bits": self.output_bits, "modulus_bits": [self.modulus_bits(p) for p in parts],
                "c0_bits": [self.c0_bits(p) for p in parts], "c1_bits": [self.c1_bits(p) for p in parts],
                "chunks": [self.chunks(p) for p in parts], "groups": self.groups,
                "target_shifts": list(self.target_shifts), "accumulator_bytes": self.accumulator_bytes}

    @classmethod
    def from_dict(cls, data: Any) -> "GramPlan":
        """Rebuild a plan a server published; an inconsistent dict raises InvalidLayout."""
        data = published_dict(data, "a fit plan (GramPlan.to_dict())", GRAM_VERSION)
        rows, seed, shifts = data.get("part_rows"), data.get("key_seed"), data.get("target_shifts")
        if not isinstance(rows, list) or not isinstance(seed, str) or len(seed) != 2 * SEED_BYTES \
                or not isinstance(shifts, list):
            raise InvalidLayout("a fit plan needs part_rows and target_shifts (lists) and key_seed (64 hex digits)")
        try:
            plan = cls(data.get("source_dim"), data.get("target_dim"), tuple(rows), bytes.fromhex(seed),
                       chunk_rows=data.get("chunk_rows"), result_rows=data.get("result_rows"),
                       value_bits=data.get("value_bits"), output_bits=data.get("output_bits"),
                       target_shifts=tuple(shifts))
        except ValueError as exc:
            raise InvalidLayout(f"fit plan is unusable: {str(exc)[:200]}") from None
        if plan.to_dict() != data:
            raise InvalidLayout("fit plan dict is inconsistent (its sizes and moduli do not follow from its dims, "
                                "rows and bits); pass exactly what GramPlan.to_dict() produced")
        return plan


def precision_bits(part_rows: Any) -> tuple[int, int]:
    """(value_bits, output_bits) for a public set of these parts. G's error per entry is about
    3.2·sqrt(rows)·2^-value_bits (the encryption noise) plus 2^-output_bits (the answer's rounding), against
    entries of order rows: a public set under 4,096 rows gets at least the bits that keep the relative error what
    4,096 rows have at the defaults (16, 10), and as much again in margin (small sets have small messages, and
    often ill-conditioned solves), so a small fit is at least as exact as a large one."""
    rows = sum(r for r in part_rows if isinstance(r, int) and not isinstance(r, bool) and r > 0) or 1
    missing = max(0, 12 - math.ceil(math.log2(rows)))
    return min(20, DEFAULT_VALUE_BITS + missing), min(20, DEFAULT_OUTPUT_BITS + 2 * missing)


def plan_gram(source_dim: int, target_dim: int, part_rows: Any, key_seed: bytes, *,
              chunk_rows: int = DEFAULT_CHUNK_ROWS, target_shifts: tuple[int, ...] | None = None,
              max_accumulator_bytes: int | None = DEFAULT_MAX_ACCUMULATOR_BYTES) -> GramPlan:
    """Plan a private fit of (rows x source_dim)ᵀ (rows x target_dim) per part, within `max_accumulator_bytes`
    of provider memory per part (None: no cap, for a client re-planning what a server chose). `target_shifts`:
    the provider's `column_shift` per part (None: no shift)."""
    if not isinstance(part_rows, (list, tuple)):
        raise InvalidLayout(f"part_rows must be a list of 1 to {MAX_PARTS} row counts, got {part_rows!r:.100}")
    bits = precision_bits(part_rows)
    plan = GramPlan(source_dim, target_dim, tuple(part_rows), key_seed, chunk_rows=chunk_rows,
                    value_bits=bits[0], output_bits=bits[1], target_shifts=target_shifts)
    if max_accumulator_bytes is not None and plan.accumulator_bytes > max_accumulator_bytes:
        raise InvalidLayout(f"a fit of {source_dim} x {target_dim} needs {plan.accumulator_bytes} bytes of "
                            f"accumulators per part, beyond max_accumulator_bytes={max_accumulator_bytes}; raise the "
                            "cap or fit fewer dims")
    return plan
