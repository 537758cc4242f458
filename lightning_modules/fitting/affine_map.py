"""`AffineMap`: the artifact every solver returns -- y = x @ weight.T + bias in raw coordinates -- and its map
folder: `save_pretrained(dir, config)` / `AffineMap.from_pretrained(dir_or_hub_id)`, written and read by
`serve.formats.maps` (config.json + model.safetensors), the way a Hugging Face config pairs with its model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from serve.formats.maps import MapConfig, load_map_folder, resolve_pretrained, write_map_folder


@dataclass(eq=False)
class AffineMap:
    """y = x @ weight.T + bias, weight (d_y, d_x), bias (d_y,), in raw coordinates. `config` is what its map
    folder records beside it (set by `from_pretrained`; none for a map fresh from a solver)."""

    weight: Tensor
    bias: Tensor
    config: MapConfig | None = field(default=None, repr=False)

    @property
    def d_x(self) -> int:
        return self.weight.shape[1]

    @property
    def d_y(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(device=self.weight.device, dtype=self.weight.dtype)
        return torch.addmm(self.bias, x, self.weight.T) if x.ndim == 2 else x @ self.weight.T + self.bias

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "AffineMap":
        return AffineMap(self.weight.to(device=device, dtype=dtype), self.bias.to(device=device, dtype=dtype),
                         self.config)

    def save_pretrained(self, directory: str | Path, config: MapConfig | None = None) -> Path:
        """Write this map as a map folder (atomically): float32 weights and `config` (default: the one it was
        loaded with). `AffineMap.from_pretrained` (and `AffineAligner.from_pretrained`) read it back."""
        config = config or self.config
        if config is None:
            raise ValueError("save_pretrained needs a MapConfig (how the map was fitted, e.g. "
                             "MapConfig(estimator='ridge', lambdas=[...])): pass config=")
        weight, bias = (t.detach().cpu().double().numpy() for t in (self.weight, self.bias))
        return write_map_folder(directory, weight, bias, config)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, revision: str | None = None) -> "AffineMap":
        """The map of a map folder, or of a hub id (`owner/name`) fetched with huggingface_hub, as float32 tensors
        with its `config`; refuses a folder whose format, version, checksums or shapes do not match."""
        folder = load_map_folder(resolve_pretrained(path_or_hub_id, revision))
        return cls(torch.from_numpy(folder.weight), torch.from_numpy(folder.bias), folder.config)


def compose(head: AffineMap, amap: AffineMap) -> AffineMap:
    """head ∘ amap in raw coordinates: x ↦ head(amap(x)) (head: k × d_y, amap: d_y × d_x)."""
    if head.d_x != amap.d_y:
        raise ValueError(f"compose: the head reads {head.d_x}-d states but the map writes {amap.d_y}-d ones")
    hw, hb = head.weight.to(device=amap.weight.device, dtype=amap.weight.dtype), head.bias.to(amap.bias)
    return AffineMap(hw @ amap.weight, hw @ amap.bias + hb)
