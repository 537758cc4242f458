"""Slot layout of the encrypted affine layer (GAZELLE hybrid diagonals with baby-step/giant-step).

A query ciphertext has S = N/2 complex slots. The input is zero-padded to dp (a power of two) and
interleaved with stride Q = S/dp: slot i*Q + q holds lane q's x_i. Each complex slot carries two reals:

- pairing "outputs" (default, lowest latency): one input per lane, and output pairs share complex rows,
  y'_r = y_r + i*y_{r+k'} with k' = ceil(k/2): half the rows, so fewer diagonals and rotations.
- pairing "inputs" (batch throughput): two inputs per lane (x_q + i*x_{q+Q}) and k real rows; a real W
  keeps them apart, so every ciphertext answers 2Q inputs.

Rows are padded to kp (a power of two, at most dp); when there are more than dp rows they are split
into `blocks` of kp rows, one reply ciphertext each.

Per block, u = sum_t z_t * rot(x, t) over kp generalised diagonals z_t[i] = W'[i mod kp, (i+t) mod dp],
written as t = g_i*b + j: b-1 baby rotations of the query, then giant partials combined by Horner's
rule with the one rotation b (after the rescale, so at the cheaper level). Folding u over dp/kp
(rotate-and-add) leaves y' in every slot i*Q+q as y'_q[i mod kp]: each slot holds outputs or zeros.
All rotation steps below are in slots (rows times the stride Q).

Everything after the baby-step products (rescale, giant steps, fold) is linear in them, so the products of many
queries, each against its own weights of the same layout, can be summed and finished once
(`EncryptedLinear.accumulate` / `finish`): the private fit (`encrypted.gram`) sums one layer per chunk of rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidLayout, published_dict
from .profiles import CkksProfile

LAYOUT_VERSION = 1
PAIRINGS = ("outputs", "inputs")

# Relative costs measured with sealapi at N=8192, modulus [60,40,60]: rotation of a query-level
# ciphertext, rotation after the rescale, and one rescale.
COST_ROTATE_TOP, COST_ROTATE_LOW, COST_RESCALE = 1.0, 0.6, 0.33


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class LinearLayout:
    """Everything a client needs to encrypt queries for, and decrypt replies of, one layer."""

    profile: CkksProfile
    input_dim: int  # d
    output_dim: int  # k
    pairing: str  # "outputs" or "inputs"
    padded_input: int  # dp
    stride: int  # Q = slots / dp
    lanes: int  # inputs per query ciphertext: Q, or 2Q when pairing inputs
    complex_rows: int  # k' = ceil(k / 2) when pairing outputs, else k
    block_rows: int  # kp: complex rows per reply ciphertext
    blocks: int  # reply ciphertexts per query ciphertext
    baby: int  # b
    giant: int  # g
    fold: tuple[tuple[int, int], ...] = field(default=())  # (rotation step in slots, radix) stages

    @property
    def rotation_steps(self) -> list[int]:
        """Left-rotation steps whose Galois keys the client must generate, sorted."""
        steps = {step for step, _ in self.fold}
        if self.baby > 1:
            steps.add(self.stride)
        if self.giant > 1:
            steps.add(self.baby * self.stride)
        return sorted(steps)

    @property
    def rotations(self) -> int:
        """Rotations per query ciphertext."""
        per_block = (self.giant - 1) + sum(radix - 1 for _, radix in self.fold)
        return (self.baby - 1) + self.blocks * per_block

    def ciphertexts_for(self, n: int) -> int:
        return -(-n // self.lanes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LAYOUT_VERSION,
            "profile": self.profile.to_dict(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "pairing": self.pairing,
            "padded_input": self.padded_input,
            "stride": self.stride,
            "lanes": self.lanes,
            "complex_rows": self.complex_rows,
            "block_rows": self.block_rows,
            "blocks": self.blocks,
            "baby": self.baby,
            "giant": self.giant,
            "fold": [list(stage) for stage in self.fold],
            "rotation_steps": self.rotation_steps,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "LinearLayout":
        """Rebuild and re-check a layout published by a server; inconsistent dicts raise InvalidLayout."""
        data = published_dict(data, "a layout (LinearLayout.to_dict())", LAYOUT_VERSION)
        try:
            profile = CkksProfile.from_dict(data["profile"])
            ints = {k: data[k] for k in ("input_dim", "output_dim", "padded_input", "stride", "lanes",
                                         "complex_rows", "block_rows", "blocks", "baby", "giant")}
            fold = tuple((s, r) for s, r in data["fold"])
            pairing = data["pairing"]
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidLayout):
                raise
            raise InvalidLayout(f"layout dict is missing or has malformed fields ({exc!r}); "
                                "pass exactly what LinearLayout.to_dict() produced") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in [*ints.values(), *sum(fold, ())]):
            raise InvalidLayout(f"layout fields and fold stages must be ints, got {ints}, fold {fold!r:.200}")
        if pairing not in PAIRINGS:
            raise InvalidLayout(f"layout pairing must be one of {PAIRINGS}, got {pairing!r}")
        layout = cls(profile=profile, fold=fold, pairing=pairing, **ints)
        expected = plan_layout(profile, layout.input_dim, layout.output_dim, pairing=pairing, baby=layout.baby,
                               fold=layout.fold)
        if expected != layout:
            raise InvalidLayout("layout dict is inconsistent (its sizes do not follow from input_dim, output_dim "
                                "and profile); pass exactly what LinearLayout.to_dict() produced")
        if "rotation_steps" in data and data["rotation_steps"] != layout.rotation_steps:
            raise InvalidLayout("layout rotation_steps do not match its fold and baby/giant steps")
        return layout


def _check_fold(fold: tuple[tuple[int, int], ...], first: int, last: int) -> bool:
    """True if the stages cover every multiple of `first` below `last` exactly once."""
    covered = 1
    for step, radix in sorted(fold):
        if step != first * covered or radix < 2:
            return False
        covered *= radix
    return first * covered == last


def _fold_stages(first_step: int, factor: int, max_stages: int) -> tuple[tuple[int, int], ...]:
    """Rotate-and-add stages summing `factor` shifted copies, using at most `max_stages` distinct steps.

    Radix-2 stages need one key each; merging stages (s, r1), (s*r1, r2) into (s, r1*r2) saves a key
    for (r1-1)*(r2-1) extra rotations, so merge the cheapest adjacent pair until the budget fits.
    """
    stages = [2] * int(math.log2(factor))
    while len(stages) > max(max_stages, 1):
        i = min(range(len(stages) - 1), key=lambda j: (stages[j] - 1) * (stages[j + 1] - 1))
        stages[i:i + 2] = [stages[i] * stages[i + 1]]
    out, step = [], first_step
    for radix in stages:
        out.append((step, radix))
        step *= radix
    return tuple(out)


def plan_layout(profile: CkksProfile, input_dim: int, output_dim: int, *, pairing: str = "outputs",
                max_galois_keys: int = 10, baby: int | None = None,
                fold: tuple[tuple[int, int], ...] | None = None) -> LinearLayout:
    """Choose padding, lanes, baby/giant split and fold stages for a (output_dim x input_dim) layer.

    `pairing` is "outputs" (lowest latency) or "inputs" (twice the inputs per ciphertext, for batches).
    `max_galois_keys` caps the distinct rotation steps (each seeded key is ~0.37 MB at N=8192).
    """
    if pairing not in PAIRINGS:
        raise InvalidLayout(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    for name, value in (("input_dim", input_dim), ("output_dim", output_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidLayout(f"{name} must be a positive int, got {value!r}")
    slots = profile.slots
    dp = max(next_pow2(input_dim), 2)
    if dp > slots:
        raise InvalidLayout(f"input_dim={input_dim} does not fit the {slots} slots of profile {profile.name!r}; "
                            "use a profile with a larger poly_modulus_degree (e.g. encrypted.profiles.N16384)")
    stride = slots // dp
    lanes = 2 * stride if pairing == "inputs" else stride
    complex_rows = output_dim if pairing == "inputs" else -(-output_dim // 2)
    kp = min(next_pow2(complex_rows), dp)
    blocks = -(-complex_rows // kp)

    candidates = range(1, kp + 1) if baby is None else [baby]
    best = None
    for b in candidates:
        if not 1 <= b <= kp:
            raise InvalidLayout(f"baby step count {b} must be between 1 and {kp}")
        g = -(-kp // b)
        keys_bs = int(b > 1) + int(g > 1)
        cost = (b - 1) * COST_ROTATE_TOP + blocks * ((g - 1) * COST_ROTATE_LOW + g * COST_RESCALE)
        if best is None or cost < best[0]:
            best = (cost, b, g, keys_bs)
    _, b, g, keys_bs = best

    if fold is None:
        if max_galois_keys < keys_bs + (1 if dp > kp else 0):
            raise InvalidLayout(f"max_galois_keys={max_galois_keys} is too small for this layer; allow at least "
                                f"{keys_bs + 1}")
        fold = _fold_stages(kp * stride, dp // kp, max_galois_keys - keys_bs) if dp > kp else ()
    elif not _check_fold(tuple(fold), kp * stride, dp * stride) and not (dp == kp and not fold):
        raise InvalidLayout(f"fold stages {fold} do not sum the {dp // kp} partial copies of each output")
    return LinearLayout(profile=profile, input_dim=input_dim, output_dim=output_dim, pairing=pairing,
                        padded_input=dp, stride=stride, lanes=lanes, complex_rows=complex_rows, block_rows=kp,
                        blocks=blocks, baby=b, giant=g, fold=tuple(tuple(s) for s in fold))
