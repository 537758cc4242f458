"""The one extraction vocabulary: which hidden states of a model are read (numpy-free, torch-free).

`StateView` names the four choices that make two sets of states comparable: pooling, layer, max_length and
dtype. They are declared here once, with their defaults; the recipe's `ExtractionSettings` extends it, the
state cache keys on it, every folder's extraction spec records it, and `xsilo extract` takes it whole
(`--pooling --layer --max_length --dtype`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pooling = Literal["mean", "last", "first"]
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class StateView:
    """Which states are read from a model.

    Args:
        pooling: mean, last or first; null: the model's own (sentence-transformers 1_Pooling, else last
            token for causal LMs, mean otherwise).
        layer: hidden_states index; -1 is the final (normed) layer.
        max_length: truncation length in tokens; null: the model's own limit (capped at 128).
        dtype: compute dtype of the forward pass (float32, bfloat16 or float16); states are stored in it.
    """

    pooling: Pooling | None = None
    layer: int = -1
    max_length: int | None = None
    dtype: Dtype = "float32"

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be a positive number of tokens, got {self.max_length}")

    @property
    def view(self) -> "StateView":
        """The four choices alone (a subclass's other settings dropped)."""
        return StateView(self.pooling, self.layer, self.max_length, self.dtype)
