"""The last step of the two-party adaptation: the adapted map's intercept moved so that the provider's head, on the
client's own unlabelled texts, predicts each class at the provider's published prior.

An adapted map can still lean towards some classes: the head then scores most of the client's texts in one of them,
and macro-F1 falls while accuracy holds (the study's Rotten rows from MiniLM put 77% of the texts in a class of 54%).
The client can see this at home. It knows the head on every direction its map writes into (the head probe of
`xsilo align`, `parties.head_probe`; the lab holds the real head), so it scores its own mapped texts in plaintext.
It then finds the logit offsets b whose argmax shares match the priors: the column potentials of entropic optimal
transport at a low temperature (Sinkhorn, `adaptation.column_potentials`). Last, it moves the intercept by the least
δ with W_h δ = b, so head(map'(x)) = head(map(x)) + b for every x. The probe's head is zero off the span it read, so
there δ lies in that span, where it equals the provider's: the lab (the real head) and the two parties (the probe's)
shift the logits alike, though not always by the same δ.

Nothing crosses: the probe's queries are the same for any private texts, and the shift never leaves the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_modules.fitting.adaptation import Adaptation, AdaptationError, TaskStatistics, adapt, column_potentials
from lightning_modules.fitting.affine_map import AffineMap

if TYPE_CHECKING:
    from lightning_modules.fitting.stats import SufficientStats
    from lightning_modules.settings import AdaptationSettings, FitSettings

F64 = torch.float64
TEMPERATURE = 0.1  # × the logits' std: near the hard assignment (0.02-0.3 measured alike on the study; 1 too soft)
ITERATIONS = 1000


def prior_offsets(logits: Tensor, priors: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """Offsets b (k,), mean 0, such that argmax(logits + b) over the rows follows `priors` (n, k logits)."""
    scale = temperature * float(logits.std())
    if not scale > 0:
        return torch.zeros(logits.shape[1], dtype=F64)
    offsets = scale * column_potentials(logits.to(F64) / scale, priors.to(F64), ITERATIONS)
    return offsets - offsets.mean()


def class_shares(logits: Tensor) -> list[float]:
    """The share of rows whose argmax is each class."""
    return (torch.bincount(logits.argmax(1), minlength=logits.shape[1]).to(F64) / logits.shape[0]).tolist()


def match_priors(amap: AffineMap, head: AffineMap, x: Tensor, priors: Tensor) -> tuple[AffineMap, dict[str, Any]]:
    """`amap` with its intercept moved so that `head` predicts the client's states `x` at `priors` (module
    docstring); `head` may be the probe's head, equal to the provider's on the map's directions. Returns the map and
    a record of the predicted shares before and after and the offsets (never a text or a state)."""
    w, b0, h_w, h_b = (t.to(F64) for t in (amap.weight, amap.bias, head.weight, head.bias))
    x = x.to(F64)
    if h_w.shape[1] != w.shape[0] or x.ndim != 2 or x.shape[1] != w.shape[1] or priors.shape != (h_w.shape[0],):
        raise AdaptationError(f"prior matching needs a {tuple(w.shape)} map, a head of {w.shape[0]}-d states, "
                              f"(rows, {w.shape[1]}) private states and one prior per class; got head "
                              f"{tuple(h_w.shape)}, states {tuple(x.shape)}, priors {tuple(priors.shape)}")
    logits = (x @ w.T + b0) @ h_w.T + h_b
    offsets = prior_offsets(logits, priors.to(F64))
    shift = torch.linalg.pinv(h_w) @ offsets  # the least δ with W_h δ = b, in the span `head` is known on
    moved = AffineMap(w, b0 + shift)
    reached = h_w @ shift
    record = {"shares_before": class_shares(logits), "shares_after": class_shares(logits + reached),
              "offsets": offsets.tolist(), "offset_error": float((reached - offsets).abs().max())}
    return moved, record


def adapt_to_priors(public: "SufficientStats", private: Tensor, task: TaskStatistics, lam: float, fit: "FitSettings",
                    settings: "AdaptationSettings", head: AffineMap,
                    anchors: tuple[Tensor, Tensor] | None = None) -> Adaptation:
    """The client's step of the two-party recipe, for the lab and the product alike: `adaptation.adapt`, then, with
    `settings.match_priors`, the map matched to the task's priors through `head` (its record under
    "prior_matching")."""
    out = adapt(public, private, task, lam, fit, settings, anchors)
    if settings.match_priors:
        out.map, out.record["prior_matching"] = match_priors(out.map, head, private, task.priors)
    return out
