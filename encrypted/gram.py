"""Private fit kernel: Enc(Ẑ_A) in chunks of rows, Enc(G) out with G = Ẑ_Aᵀ Ẑ_B, for each part of the public set.

Chunk c of a part (rows r0 .. r0 + chunk_rows) is one affine layer of `plan.layout` (pairing "inputs"):
W_c = Ẑ_B[chunk rows]ᵀ, target_dim x chunk_rows, the last chunk zero-padded. Its inputs are the columns of
Ẑ_A[chunk rows] (source_dim vectors of chunk_rows values), `layout.lanes` per ciphertext, so a chunk travels as
`plan.groups` query ciphertexts in one message. W_c times column a is row a of Ẑ_A[chunk]ᵀ Ẑ_B[chunk], so the sum
over chunks is row a of G. Rotations are linear, so the server adds the pre-rescale products of every chunk per
group (`EncryptedLinear.accumulate`) and runs the rescale, giant steps and fold once per group and block at the
end (`finish_partials`): each group's result is exactly a reply to one query of the layout.

Client: ``plan = GramPlan.from_dict(published)``; ``keys = ClientKeys.generate(plan.layout.profile,
plan.layout.rotation_steps)``; per chunk ``encrypt_chunk(keys, plan, part, chunk, Z)``; ``decrypt_gram(keys, plan,
replies)``. Server: ``acc = GramAccumulator(plan, part, target_states)``; ``acc.add(message, chunk, public_keys)``
for chunks 0, 1, ...; ``acc.results(public_keys)`` once ``acc.complete``.

Both sides normalise their states (train mean and std), so |G| <= rows of the part by Cauchy-Schwarz, and so is
every partial sum the server holds; `plan_gram` caps the rows of a part to fit the profile's headroom.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from . import messages, wire
from .client import decrypt, encrypt
from .errors import EncryptedError, InvalidKeys, InvalidLayout, ParameterMismatch
from .keys import ClientKeys, PublicKeys
from .layout import COST_RESCALE, COST_ROTATE_LOW, COST_ROTATE_TOP, LinearLayout, plan_layout
from .linear import EncryptedLinear, finish_partials
from .profiles import CkksProfile
from .wire import Kind

GRAM_VERSION = 1
DEFAULT_CHUNK_ROWS = 128
DEFAULT_MAX_ACCUMULATOR_BYTES = 256 << 20
MAX_PARTS = 8
MAX_GROUPS = 128  # query ciphertexts per chunk (each a CTXT section of one message)
MAX_TARGET_DIM = 16384
COST_SLACK = 0.05


def _int(name: str, value: Any, lo: int, hi: int, fix: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidLayout(f"{name} must be an int in [{lo}, {hi}], got {value!r:.60}{'; ' + fix if fix else ''}")
    return value


def max_part_rows(profile: CkksProfile) -> int:
    """Most rows a part may have: |G| <= rows (normalised states) must stay under the reply's headroom
    (q0 ... q_{L-1}) / scale, with a factor 4 for the complex slots and noise."""
    return 2 ** (sum(profile.coeff_modulus_bits[:-2]) - profile.scale_bits - 2)


def _ciphertext_bytes(profile: CkksProfile) -> int:
    """Memory of one query-level ciphertext (2 polynomials over all but the special prime)."""
    return 2 * (len(profile.coeff_modulus_bits) - 1) * profile.poly_modulus_degree * 8


@dataclass(frozen=True)
class GramPlan:
    """Everything both sides of a private fit need: the per-chunk layout, the dims and the rows of each part."""

    layout: LinearLayout  # one chunk's layer: input_dim = chunk_rows, output_dim = target_dim, pairing "inputs"
    source_dim: int  # d_A: the client's columns
    target_dim: int  # d_B: the server's columns
    part_rows: tuple[int, ...]  # rows of each part (0 = train, 1 = val)

    @property
    def chunk_rows(self) -> int:
        return self.layout.input_dim

    @property
    def groups(self) -> int:
        """Query ciphertexts per chunk, and reply blobs per part: `lanes` source columns each."""
        return -(-self.source_dim // self.layout.lanes)

    def check_part(self, part: Any) -> int:
        """`part` if it is an index of this plan's parts, else ParameterMismatch."""
        if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part < len(self.part_rows):
            raise ParameterMismatch(f"part {part!r:.20} does not exist; this plan has parts "
                                    f"0..{len(self.part_rows) - 1}")
        return part

    def chunks(self, part: int) -> int:
        return -(-self.part_rows[self.check_part(part)] // self.chunk_rows)

    def rows(self, part: int, chunk: int) -> int:
        """Rows of the public set in chunk `chunk` of part `part` (chunk_rows, or fewer for the last)."""
        n = self.chunks(part)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 <= chunk < n:
            raise ParameterMismatch(f"chunk {chunk!r:.20} does not exist; part {part} has chunks 0..{n - 1}")
        return min(self.chunk_rows, self.part_rows[part] - chunk * self.chunk_rows)

    def group_columns(self, group: int) -> int:
        """Source columns answered by group `group`'s reply."""
        lanes = self.layout.lanes
        return min(lanes, self.source_dim - group * lanes)

    @property
    def upload_ciphertexts(self) -> int:
        return self.groups * sum(self.chunks(p) for p in range(len(self.part_rows)))

    @property
    def result_ciphertexts(self) -> int:
        return len(self.part_rows) * self.groups * self.layout.blocks

    @property
    def accumulator_bytes(self) -> int:
        """Server memory of one part's accumulators: groups x blocks x giant query-level ciphertexts."""
        L = self.layout
        return self.groups * L.blocks * L.giant * _ciphertext_bytes(L.profile)

    @property
    def layer_bytes(self) -> int:
        """Server memory of one chunk's layer while the chunk is added: blocks x kp encoded diagonals."""
        L = self.layout
        return L.blocks * L.block_rows * _ciphertext_bytes(L.profile) // 2

    @property
    def chunk_max_bytes(self) -> int:
        """Upper bound of one chunk message (a server caps the chunk body with it)."""
        return messages.chunk_max_bytes(self)

    def to_dict(self) -> dict[str, Any]:
        return {"version": GRAM_VERSION, "layout": self.layout.to_dict(), "source_dim": self.source_dim,
                "target_dim": self.target_dim, "part_rows": list(self.part_rows), "chunk_rows": self.chunk_rows,
                "groups": self.groups, "chunks": [self.chunks(p) for p in range(len(self.part_rows))],
                "upload_ciphertexts": self.upload_ciphertexts, "accumulator_bytes": self.accumulator_bytes}

    @classmethod
    def from_dict(cls, data: Any) -> "GramPlan":
        """Rebuild and re-plan a plan a server published; an inconsistent dict raises InvalidLayout."""
        if not isinstance(data, dict):
            raise InvalidLayout(f"a fit plan must be a dict (GramPlan.to_dict()), got {type(data).__name__}")
        if data.get("version") != GRAM_VERSION:
            raise InvalidLayout(f"fit plan version {data.get('version')!r:.20} is not {GRAM_VERSION}; fetch the plan "
                                "again from a server running the same xsilo version")
        fields = {"version", "layout", "source_dim", "target_dim", "part_rows", "chunk_rows", "groups", "chunks",
                  "upload_ciphertexts", "accumulator_bytes"}
        if set(data) != fields:
            raise InvalidLayout(f"a fit plan dict needs exactly the keys {sorted(fields)}, got {sorted(data)[:16]}")
        layout = LinearLayout.from_dict(data["layout"])
        rows = data["part_rows"]
        if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_PARTS:
            raise InvalidLayout(f"fit plan part_rows must be a list of 1 to {MAX_PARTS} ints, got {rows!r:.100}")
        plan = plan_gram(layout.profile, data["source_dim"], data["target_dim"], tuple(rows),
                         chunk_rows=layout.input_dim, baby=layout.baby, max_accumulator_bytes=None)
        if plan.layout != layout or plan.to_dict() != data:
            raise InvalidLayout("fit plan dict is inconsistent (its layout and sizes do not follow from source_dim, "
                                "target_dim, part_rows and chunk_rows); pass exactly what GramPlan.to_dict() produced")
        return plan


def plan_gram(profile: CkksProfile, source_dim: int, target_dim: int, part_rows: Any, *,
              chunk_rows: int = DEFAULT_CHUNK_ROWS, baby: int | None = None,
              max_accumulator_bytes: int | None = DEFAULT_MAX_ACCUMULATOR_BYTES) -> GramPlan:
    """Plan a private fit of (rows x source_dim)ᵀ (rows x target_dim) per part.

    The baby step b minimises the server's rotations and rescales: b - 1 baby rotations per uploaded ciphertext,
    and per group and block of each part g = ceil(kp / b) rescales and g - 1 giant rotations, once. Bigger g holds
    more accumulators (groups x blocks x g ciphertexts per part), so only plans within `max_accumulator_bytes`
    are considered (None: no cap, for a client re-planning what a server chose); of those within 5% of the
    cheapest, the one with the fewest accumulators wins.
    """
    if not isinstance(profile, CkksProfile):
        raise InvalidLayout(f"profile must be a CkksProfile, got {type(profile).__name__}")
    chunk_rows = _int("chunk_rows", chunk_rows, 2, profile.slots)
    if chunk_rows & (chunk_rows - 1):
        raise InvalidLayout(f"chunk_rows must be a power of two (it pads to one), got {chunk_rows}; e.g. 128")
    target_dim = _int("target_dim", target_dim, 1, MAX_TARGET_DIM)
    source_dim = _int("source_dim", source_dim, 1, MAX_GROUPS * 2 * profile.slots // chunk_rows)
    if not isinstance(part_rows, (list, tuple)) or not 1 <= len(part_rows) <= MAX_PARTS:
        raise InvalidLayout(f"part_rows must be a list of 1 to {MAX_PARTS} row counts, got {part_rows!r:.100}")
    limit = max_part_rows(profile)
    part_rows = tuple(_int(f"part_rows[{i}]", n, 1, limit, f"profile {profile.name!r} holds Gram entries up to "
                           f"{limit} rows; split the public set into more parts or use a profile with more headroom")
                      for i, n in enumerate(part_rows))
    if max_accumulator_bytes is not None:
        _int("max_accumulator_bytes", max_accumulator_bytes, 1, 1 << 50)

    first = plan_layout(profile, chunk_rows, target_dim, pairing="inputs", baby=baby)
    lanes, kp, blocks = first.lanes, first.block_rows, first.blocks
    groups = -(-source_dim // lanes)
    if groups > MAX_GROUPS:
        raise InvalidLayout(f"source_dim={source_dim} needs {groups} ciphertexts per chunk of {chunk_rows} rows, at "
                            f"most {MAX_GROUPS}; use a smaller chunk_rows (more lanes per ciphertext)")
    uploads = groups * sum(-(-n // chunk_rows) for n in part_rows)
    finishes = len(part_rows) * groups * blocks
    options = []  # (cost, memory, b)
    for b in ([baby] if baby is not None else range(1, kp + 1)):
        g = -(-kp // b)
        memory = groups * blocks * g * _ciphertext_bytes(profile)
        if max_accumulator_bytes is None or memory <= max_accumulator_bytes:
            cost = uploads * (b - 1) * COST_ROTATE_TOP + finishes * ((g - 1) * COST_ROTATE_LOW + g * COST_RESCALE)
            options.append((cost, memory, b))
    if options:
        # the cost constants hold to about 10% on a loaded machine: of the plans within COST_SLACK of the
        # cheapest, take the one that holds the fewest accumulators
        cheapest = min(cost for cost, _, _ in options)
        best = min((memory, b) for cost, memory, b in options if cost <= (1 + COST_SLACK) * cheapest)
    else:
        least = groups * blocks * (1 if baby is None else -(-kp // baby)) * _ciphertext_bytes(profile)
        raise InvalidLayout(f"a fit of {source_dim} x {target_dim} needs at least {least} bytes of accumulators per "
                            f"part, beyond max_accumulator_bytes={max_accumulator_bytes}; raise the cap or fit "
                            "fewer dims")
    layout = first if baby is not None else plan_layout(profile, chunk_rows, target_dim, pairing="inputs",
                                                        baby=best[1])
    return GramPlan(layout=layout, source_dim=source_dim, target_dim=target_dim, part_rows=part_rows)


def _check_plan(plan: Any) -> GramPlan:
    if not isinstance(plan, GramPlan):
        raise EncryptedError(f"plan must be a GramPlan (GramPlan.from_dict(...)), got {type(plan).__name__}")
    return plan


def encrypt_chunk(keys: ClientKeys, plan: GramPlan, part: int, chunk: int, Z: Any) -> bytes:
    """Encrypt the client's normalised states of chunk `chunk` of part `part`, Z of shape
    (plan.rows(part, chunk), source_dim), into one chunk message (`plan.groups` ciphertexts)."""
    _check_plan(plan)
    if not isinstance(keys, ClientKeys):
        raise EncryptedError(f"keys must be ClientKeys, got {type(keys).__name__}")
    if keys.profile != plan.layout.profile:
        raise ParameterMismatch(f"keys use profile {keys.profile.name!r} but the plan uses "
                                f"{plan.layout.profile.name!r}; generate keys with "
                                "ClientKeys.generate(plan.layout.profile, plan.layout.rotation_steps)")
    rows = plan.rows(part, chunk)
    Z = np.asarray(Z, dtype=np.float64)
    if Z.shape != (rows, plan.source_dim):
        raise ParameterMismatch(f"chunk {chunk} of part {part} must be ({rows}, {plan.source_dim}) states, got "
                                f"shape {Z.shape}")
    padded = np.zeros((plan.chunk_rows, plan.source_dim))
    padded[:rows] = Z  # rows past the part's end are zero (their weights are zero too)
    blobs = []
    for query in encrypt(keys, plan.layout, padded.T):  # the inputs are Z's columns
        _, _, sections = wire.unpack(query, Kind.QUERY, EncryptedError)
        blobs.extend(bytes(payload) for tag, payload in sections if tag == b"CTXT")
    return messages.write_chunk(plan, part, chunk, blobs)


def decrypt_gram(keys: ClientKeys, plan: GramPlan, replies: list[bytes]) -> np.ndarray:
    """G = Ẑ_Aᵀ Ẑ_B of one part, (source_dim, target_dim), from the `plan.groups` replies in group order."""
    _check_plan(plan)
    if isinstance(replies, (bytes, bytearray, memoryview)) or len(replies) != plan.groups:
        raise EncryptedError(f"a part's result is {plan.groups} replies (one per group, in order), got "
                             f"{1 if isinstance(replies, (bytes, bytearray, memoryview)) else len(replies)}")
    return decrypt(keys, plan.layout, list(replies), plan.source_dim)


class GramAccumulator:
    """Server side of one part: adds each chunk's products as it arrives, then finishes once per group.

    Memory: `plan.accumulator_bytes` of accumulators, plus one chunk's layer (`plan.layer_bytes`) while it is being
    added; the accumulators are freed when `results` returns. Thread-safe: chunks are taken one at a time, in order.
    """

    def __init__(self, plan: GramPlan, part: int, target_states: Any):
        self.plan, self.part = _check_plan(plan), plan.check_part(part)
        states = np.array(target_states, dtype=np.float64)  # a copy: the caller may reuse its array
        shape = (plan.part_rows[part], plan.target_dim)
        if states.shape != shape:
            raise EncryptedError(f"target states of part {part} must have shape {shape}, got {states.shape}")
        if not np.all(np.isfinite(states)):
            raise EncryptedError("target states contain NaN or infinity; clean and normalise them first")
        self._states: np.ndarray | None = states
        self._partials: list[Any] | None = [None] * plan.groups
        self._next = 0
        self._state = "open"  # open -> finished (results taken) or broken (an internal failure)
        self._lock = threading.Lock()

    @property
    def next_chunk(self) -> int:
        return self._next

    @property
    def chunks(self) -> int:
        return self.plan.chunks(self.part)

    @property
    def complete(self) -> bool:
        return self._next == self.chunks

    def _usable(self, keys: Any) -> None:
        if self._state == "finished":
            raise EncryptedError(f"part {self.part}'s results were already returned and its memory freed; "
                                 "start a new fit session to fit again")
        if self._state == "broken":
            raise EncryptedError(f"part {self.part}'s accumulator failed internally and holds no usable sums; "
                                 "start a new fit session")
        if not isinstance(keys, PublicKeys):
            raise InvalidKeys(f"keys must be PublicKeys (PublicKeys.from_bytes(client_bytes, plan.layout)), "
                              f"got {type(keys).__name__}")
        keys.require(self.plan.layout)

    def _layer(self, chunk: int) -> EncryptedLinear:
        plan, rows = self.plan, self.plan.rows(self.part, chunk)
        weight = np.zeros((plan.target_dim, plan.chunk_rows))
        start = chunk * plan.chunk_rows
        weight[:, :rows] = self._states[start:start + rows].T
        layer = EncryptedLinear(weight, None, plan.layout.profile, pairing="inputs", baby=plan.layout.baby,
                                allow_zero_blocks=True)
        if layer.layout != plan.layout:
            raise EncryptedError("the chunk's layer does not follow the plan's layout; rebuild the plan with plan_gram")
        return layer

    def add(self, data: Any, chunk: int, keys: PublicKeys) -> None:
        """Validate and add chunk `chunk` (it must be `next_chunk`); a refused message changes nothing."""
        with self._lock:
            self._usable(keys)
            if not isinstance(chunk, int) or isinstance(chunk, bool):
                raise ParameterMismatch(f"chunk index must be an int, got {chunk!r:.20}")
            if self.complete:
                raise ParameterMismatch(f"part {self.part} already holds all {self.chunks} chunks; chunk {chunk} is "
                                        "past the end: fetch the results")
            if chunk != self._next:
                raise ParameterMismatch(f"chunk {chunk} of part {self.part} arrived out of order: chunk {self._next} "
                                        f"is next; send chunks 0..{self.chunks - 1} in order, each once")
            ciphertexts = messages.read_chunk(data, self.plan, self.part, chunk)
            layer = self._layer(chunk)
            try:
                for group, ct in enumerate(ciphertexts):
                    self._partials[group] = layer.accumulate(ct, keys.galois_keys, self._partials[group])
            except BaseException:
                self._state, self._partials = "broken", None
                raise
            self._next += 1
            if self.complete:
                self._states = None  # the weights are no longer needed

    def results(self, keys: PublicKeys) -> list[bytes]:
        """One reply blob per group (decrypt_gram reads them in this order); only once, when `complete`."""
        with self._lock:
            self._usable(keys)
            if not self.complete:
                raise EncryptedError(f"part {self.part} has {self._next} of its {self.chunks} chunks; send the rest "
                                     "before fetching results")
            evaluator = seal.Evaluator(self.plan.layout.profile.context())
            blobs = []
            try:
                for group in range(self.plan.groups):
                    replies = finish_partials(self.plan.layout, evaluator, self._partials[group], keys.galois_keys)
                    self._partials[group] = None
                    blobs.append(messages.write_reply(self.plan.layout, replies, self.plan.group_columns(group)))
            except BaseException:
                self._state, self._partials = "broken", None
                raise
            self._state, self._partials = "finished", None
            return blobs
