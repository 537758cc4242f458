"""The encoding of a label-only head's logits for the secure argmax (`encrypted.argmax`), published by the provider
and read by the client, and the byte bounds of the client's argmax keys: what a server and a client need before any
cryptography, so this module loads none."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidLayout

MAX_VALUE_BITS = 40  # the widest comparison a client's DGK key supports: u > 2^(MAX_VALUE_BITS + 2)
MAGIC = b"XSAK1"  # the argmax public keys' wire format (encrypted.argmax_keys)
MAX_KEY_BITS = 4096
MAX_PUBLIC_BYTES = len(MAGIC) + 6 * (2 + MAX_KEY_BITS // 8)
MAX_CLASSES = 256
MAX_MATCHES = 256  # comparisons one label query may ask for (about 9 s of provider time at 2,048-bit keys)
SPEC_VERSION = 1


@dataclass(frozen=True)
class ArgmaxSpec:
    """The fixed-point encoding of one head's logits for the comparisons, published by the provider.

    Logits must lie in (-2^logit_bits, 2^logit_bits); they are compared at 2^-fraction_bits. The comparisons run
    on value_bits = 1 + logit_bits + fraction_bits + label_bits bits."""

    classes: int
    fraction_bits: int = 10
    logit_bits: int = 11
    statistical_bits: int = 40

    def __post_init__(self) -> None:
        for name in ("classes", "fraction_bits", "logit_bits", "statistical_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidLayout(f"argmax spec field {name!r} must be an int, got {value!r:.40}")
        if not 2 <= self.classes <= MAX_CLASSES:
            raise InvalidLayout(f"label-only answers need 2 to {MAX_CLASSES} classes, got {self.classes}")
        if not (4 <= self.fraction_bits <= 16 and 4 <= self.logit_bits <= 16 and 20 <= self.statistical_bits <= 80):
            raise InvalidLayout("argmax spec out of range: fraction_bits and logit_bits in [4, 16], statistical_bits "
                                "in [20, 80]")
        if self.value_bits > MAX_VALUE_BITS:
            raise InvalidLayout(f"argmax values of {self.value_bits} bits exceed the {MAX_VALUE_BITS} that client "
                                "keys support; lower fraction_bits or logit_bits")

    @property
    def label_bits(self) -> int:
        return (self.classes - 1).bit_length()

    @property
    def value_bits(self) -> int:
        return 1 + self.logit_bits + self.fraction_bits + self.label_bits

    @property
    def mask_bits(self) -> int:
        """The selection and label masks are uniform below 2^mask_bits: 2^-statistical_bits of hiding for any
        value below 2^64, far beyond what a reply can carry (logits past ±2^35 decode to noise), not only for
        values in the comparisons' range."""
        return 64 + self.statistical_bits

    def to_dict(self) -> dict[str, int]:
        return {"version": SPEC_VERSION, "classes": self.classes, "fraction_bits": self.fraction_bits,
                "logit_bits": self.logit_bits, "statistical_bits": self.statistical_bits}

    @classmethod
    def from_dict(cls, data: Any) -> ArgmaxSpec:
        if not isinstance(data, dict) or data.get("version") != SPEC_VERSION:
            raise InvalidLayout(f"argmax spec must be a dict of version {SPEC_VERSION}, as GET /v1/model publishes it")
        return cls(**{key: data.get(key) for key in ("classes", "fraction_bits", "logit_bits", "statistical_bits")})

    def rows_per_query(self, lanes: int) -> int:
        """The most rows one label query may declare: every lane, up to MAX_MATCHES comparisons (k - 1 per row)."""
        return max(1, min(lanes, MAX_MATCHES // (self.classes - 1)))

    def rounds(self) -> list[int]:
        """Candidates left before each round of matches: k, ceil(k/2), ..., down to 2."""
        counts, n = [], self.classes
        while n > 1:
            counts.append(n)
            n = (n + 1) // 2
        return counts

    def fixed_point(self, values: np.ndarray) -> list[int]:
        """round(values * 2^fraction_bits) as Python ints."""
        return [int(v) for v in np.rint(np.asarray(values, dtype=np.float64) * 2.0**self.fraction_bits).ravel()]
