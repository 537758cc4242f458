"""The client's side of the private fit, after decryption: raw sufficient statistics, then the one solve path.

The provider never sends its states. It returns, per part p of the public set (0 = train, 1 = val), the
decrypted cross products `cross_p = Σ_rows (z_A - a)(z_B - mu_B)ᵀ` (a = the client's shift, mu_B the
provider's train mean) and publishes per part its row count, Σ z_B, and Σ z_B² (per dim for train, only the
trace for val). With the client's own raw rows that gives exactly the `SufficientStats` a plaintext fit on the
same rows would stream:

    xty_p = cross_p + sum_x_p mu_Bᵀ + a sum_y_pᵀ - n_p a mu_Bᵀ

The val part's yty holds trace/d_B in every dim: `val_mse` and `val_r2` use only its sum.

A public set with anchors (texts the provider gives weight in every fit, e.g. a synthetic set written from its
class descriptions) adds a third part. The client merges it into the train statistics at the share of the weight
it chooses (`AdaptationSettings.anchor_weight`, `fitting.adaptation.with_anchor_stats`); the provider never
learns that share.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.solvers import LAMBDA_ESTIMATORS, LambdaPath, solve, val_mse, val_r2
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.parties.head_probe import check_budgets, head_val_stats, probe
from lightning_modules.settings import FitSettings
from serve.fit_stats import STEP_ROWS
from serve.formats.maps import MapConfig

if TYPE_CHECKING:
    from lightning_modules.models.aligner import AffineAligner
    from lightning_modules.settings import AdaptationSettings, DeviceSettings, ExtractionSettings
    from serve.fit_client import GramReply

PART_NAMES = ("train", "val", "anchor")  # a public set with anchors adds a third part
PUBLIC_MAP = "public-map"  # with --private: the unadapted public-set map, inside the adapted map's folder


class PrivateFitError(ValueError):
    """The reply or the client's states do not fit together; the message names the problem and the fix."""


def _array(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PrivateFitError(f"{what} must be numbers of shape {shape}, got {type(value).__name__}") from None
    if out.shape != shape:
        raise PrivateFitError(f"{what} has shape {out.shape}, expected {shape}")
    if not np.isfinite(out).all():
        raise PrivateFitError(f"{what} holds NaN/inf; the reply is corrupt: run the fit again")
    return out


def part_stats(parts: Sequence[np.ndarray], reply: "GramReply") -> list[SufficientStats]:
    """The raw `SufficientStats` of each part (train, val, then the anchors if any) from the client's raw states
    and the reply."""
    stats = reply.stats if isinstance(reply.stats, dict) else {}
    published = stats.get("parts")
    if not isinstance(published, list) or not 1 <= len(published) <= len(PART_NAMES):
        raise PrivateFitError("the provider's stats must list 1 to 3 parts (train, val, anchors); the server is not "
                              "an xsilo fit server or is too old")
    if len(parts) != len(published) or len(reply.cross) != len(published):
        raise PrivateFitError(f"the provider published {len(published)} parts but the client has {len(parts)} "
                              f"and the reply {len(reply.cross)}; split the public set as it says (train, val) and "
                              "add the anchor texts' states when it has anchors")
    rows = [np.asarray(p) for p in parts]
    if rows[0].ndim != 2 or rows[0].shape[1] < 1:
        raise PrivateFitError(f"the client's train states must be (rows, d_A), got shape {rows[0].shape}")
    d_a = rows[0].shape[1]
    mu_b = np.asarray(stats.get("mu_B", []), dtype=np.float64).reshape(-1)
    d_b = mu_b.shape[0]
    if d_b < 1:
        raise PrivateFitError("the provider's stats lack mu_B; the server is not an xsilo fit server")
    shift = _array(reply.client_shift, (d_a,), "the reply's client_shift")
    out = []
    for p, (x, pub, cross) in enumerate(zip(rows, published, reply.cross)):
        name = PART_NAMES[p]
        if x.ndim != 2 or x.shape[1] != d_a:
            raise PrivateFitError(f"the client's {name} states must be (rows, {d_a}), got shape {x.shape}")
        if not isinstance(pub, dict) or pub.get("rows") != x.shape[0]:
            got = pub.get("rows") if isinstance(pub, dict) else pub
            raise PrivateFitError(f"the provider's {name} part has {got} rows but the client's has {x.shape[0]}; "
                                  "split the public set with its val_fraction and seed")
        n = x.shape[0]
        sum_x, xtx = np.zeros(d_a), np.zeros((d_a, d_a))
        for lo in range(0, n, STEP_ROWS):  # a block at a time: the parts may be memory-mapped, and large
            block = np.asarray(x[lo:lo + STEP_ROWS], dtype=np.float64)
            if not np.isfinite(block).all():
                raise PrivateFitError(f"the client's {name} states hold NaN/inf; re-extract them")
            sum_x += block.sum(axis=0)
            xtx += block.T @ block
        xty_centred = _array(cross, (d_a, d_b), f"the reply's {name} cross products")
        sum_y = _array(pub.get("sum_y"), (d_b,), f"the provider's {name} sum_y")
        if pub.get("yty_diag") is not None:
            yty = _array(pub["yty_diag"], (d_b,), f"the provider's {name} yty_diag")
        else:
            if name != "val":
                raise PrivateFitError(f"the provider's {name} part lacks yty_diag (standardisation needs it); the "
                                      "server is not an xsilo fit server or is too old")
            trace = _array(pub.get("trace"), (), f"the provider's {name} trace")
            yty = np.full(d_b, float(trace) / d_b)
        xty = xty_centred + np.outer(sum_x, mu_b) + np.outer(shift, sum_y) - n * np.outer(shift, mu_b)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
        out.append(SufficientStats(torch.tensor(float(n), dtype=torch.float64), t(sum_x), t(sum_y),
                                   t(xtx), t(xty), t(yty)))
    return out


@dataclass
class PrivateFit:
    """The fitted map (its `config`: how it was fitted, both states' specs), its λ path and what the fit measured
    (for `save_pretrained`, which records them as metrics {"private_fit": ...})."""

    map: AffineMap
    metrics: dict[str, Any]
    lambda_path: LambdaPath = field(default_factory=LambdaPath.empty)

    @cached_property
    def aligner(self) -> "AffineAligner":
        """The map as a fitted `AffineAligner` (a LightningModule, built only when asked for: saving needs none)."""
        from lightning_modules.models.aligner import AffineAligner

        aligner = AffineAligner.from_map(self.map)
        aligner.lambda_path = self.lambda_path
        return aligner

    def save_pretrained(self, out: str | Path) -> Path:
        """The map folder `xsilo align` writes: the map, its config and these metrics."""
        return self.map.save_pretrained(Path(out), replace(self.map.config, metrics={"private_fit": self.metrics}))


def fit_private(parts: Sequence[np.ndarray], reply: "GramReply", fit: FitSettings, *,
                source_spec: dict[str, Any], public_set: dict[str, Any], head: AffineMap | None = None,
                head_val: SufficientStats | None = None, stats: Sequence[SufficientStats] | None = None) -> PrivateFit:
    """Solve the map from the decrypted reply with `solvers.solve` (the aligner's own path): an `AffineMap` ready
    for `save_pretrained`, its target spec the provider's public-set model spec. `head` and `head_val` (from
    `head_probe`) give the head criterion; `stats` are `part_stats(parts, reply)` when known."""
    stats = list(stats) if stats is not None else part_stats(parts, reply)
    train, val = stats[0], (stats[1] if len(stats) > 1 and stats[1].count else None)
    amap, lam, path = solve(train, val, fit.estimator, fit.lambdas, fit.center, fit.standardize,
                            criterion=fit.criterion, head=head, head_val=head_val, rank=fit.rank,
                            whiten_target=fit.whiten_target)
    path = path if lam is not None else LambdaPath.empty()
    target = {**(public_set.get("model") or {}), "public_set_fingerprint": public_set.get("fingerprint")}
    config = MapConfig(estimator=fit.estimator, lambdas=[float(v) for v in fit.lambdas], chosen_lambda=lam,
                       lambda_path=path.finite_pairs(), lambda_selection=path.as_dict(), criterion=fit.criterion,
                       rank=fit.rank, whiten_target=bool(fit.whiten_target), center=bool(fit.center),
                       standardize=bool(fit.standardize), source=dict(source_spec), target=target)
    metrics = {"public_set": {k: public_set.get(k) for k in ("name", "rows", "fingerprint", "val_fraction", "seed")},
               "rows": {name: len(p) for name, p in zip(PART_NAMES, parts)},  # not the weighted counts of `stats`
               "chosen_lambda": lam,
               "criterion": path.criterion, "chosen": dict(path.chosen), "lambda_path": path.as_dict(),
               "train_r2": val_r2(train, amap),
               "val_mse": val_mse(val, amap) if val is not None else None,
               "val_r2": val_r2(val, amap) if val is not None else None}
    for key in ("bytes_sent", "bytes_received", "provider_ms", "client_ms"):
        metrics[key] = getattr(reply, key, None)
    return PrivateFit(AffineMap(amap.weight, amap.bias, config), metrics, path)


def public_texts_file(texts: list[str], fingerprint: str) -> Path:
    """The provider's public texts as a .jsonl under $XSILO_HOME/public/remote/ (written atomically once), so the
    client's own extraction caches them like any dataset."""
    from datamodules.registry import xsilo_home
    from datamodules.cache import atomic_write_bytes

    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):  # it names a file here: never a path from the network
        raise PrivateFitError(f"the public set's fingerprint {fingerprint[:80]!r} is not 64 hex digits; is the server "
                              "an xsilo server?")
    path = Path(xsilo_home()) / "public" / "remote" / f"{fingerprint[:32]}.jsonl"
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return path


def align(server: str, model: str, out: str | Path, *, fit: FitSettings | None = None,
          extraction: "ExtractionSettings | None" = None, device: "DeviceSettings | None" = None,
          api_key: str | None = None, timeout: float = 300.0, progress=None, head: str | None = None,
          private: str | None = None, private_limit: int | None = None,
          adaptation: "AdaptationSettings | None" = None) -> PrivateFit:
    """`xsilo align`: fit the map from this client's `model` into the provider's states without either side seeing
    the other's: fetch the public texts, check their fingerprint, extract `model`'s states on them (cached), split
    them as the provider did, run the encrypted fit, solve, and save the map folder `out`.

    With `head` (a head the provider serves), λ is chosen through it (criterion auto = head): the provider's
    published logits on its public val rows, and the head queried under HE on the directions the path's maps
    write into (`lightning_modules.parties.head_probe`).

    With `private` (a registry name or a file of the client's own texts; needs `head`), the map saved is the public
    map adapted to those texts with the head's published class statistics (`lightning_modules.parties.private_texts`:
    only the statistics' download is added to the requests, and nothing of the texts crosses)."""
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, cache_hit, extract, resolve
    from datamodules.progress import StageTimes
    from datamodules.states import random_split
    from lightning_modules.fitting.adaptation import with_anchor_stats
    from lightning_modules.parties import private_texts
    from lightning_modules.settings import AdaptationSettings, DeviceSettings, ExtractionSettings
    from serve.fit_client import PrivateFitClient
    from serve.http_client import Traffic

    fit, extraction, device = fit or FitSettings(), extraction or ExtractionSettings(), device or DeviceSettings()
    adaptation = adaptation or AdaptationSettings()
    if private is not None:
        private_texts.check_request(head, fit)
    if fit.criterion == "head" and head is None:
        raise PrivateFitError("--fit.criterion head chooses λ through the provider's head: name it with --head NAME "
                              "(GET /v1/model 'heads'), or use --fit.criterion auto/gcv/val_mse")
    if head is not None and fit.estimator not in LAMBDA_ESTIMATORS:
        raise PrivateFitError(f"--head chooses the ridge λ, but --fit.estimator {fit.estimator} takes none; use one of "
                              f"{', '.join(LAMBDA_ESTIMATORS)}, or align without --head")
    device.apply_threads()
    traffic = Traffic()  # every request of this command, over all its connections: what the provider counts
    times = StageTimes.active or StageTimes()
    stage = times.stage
    with PrivateFitClient(server, api_key=api_key, timeout=timeout, traffic=traffic) as client:
        with stage("fetch the public set"):
            public = client.public_set()
            val_logits = client.val_logits(head) if head is not None else None  # fails fast when not published
            task = (private_texts.published_task(server, head, int(public["hidden_size"]), api_key=api_key,
                                                 timeout=timeout, traffic=traffic)
                    if private is not None and head is not None else None)
            texts = client.public_texts()  # count and fingerprint checked against the server's own
            anchor_texts = client.anchor_texts()  # [] when the set has no anchors

        def extracted(texts: list[str], fingerprint: str, what: str) -> tuple[Any, np.ndarray]:
            path = public_texts_file(texts, fingerprint)
            job = resolve(ExtractionConfig(model=model, data=str(path), pooling=extraction.pooling,
                                           layer=extraction.layer, max_length=extraction.max_length,
                                           dtype=extraction.dtype, batch_size=extraction.batch_size,
                                           label_column=None))
            if job.key.dataset_fingerprint != fingerprint or len(job.texts) != len(texts):
                raise PrivateFitError(f"the {what} read back from {path} do not match the server's fingerprint "
                                      f"{fingerprint[:16]}; delete the file and run `xsilo align` again")
            with stage(f"extract {model} on the {what}"):
                if not cache_hit(job.directory):
                    extract(job.config, **device.extraction_kwargs())
                return job, StateCache(job.directory).rows(np.arange(len(texts)))

        job, states = extracted(texts, public["fingerprint"], "public texts")
        anchor_states = (extracted(anchor_texts, public["anchors"]["fingerprint"], "anchor texts")[1]
                         if anchor_texts else None)
        if task is not None:
            with stage(f"extract {model} on the private texts"):
                x_private = private_texts.private_states(private, job, extraction.text_column, private_limit, device,
                                                         task.classes)
        # prior matching reads the head on the class means' directions too (`head_probe.probe`)
        means = task.stats.means.numpy() if task is not None and adaptation.match_priors else None
        indices = random_split(public["rows"], float(public["val_fraction"]), int(public["seed"]))
        sizes = {name: len(idx) for name, idx in zip(PART_NAMES, indices)}
        if sizes != {name: int(public["parts"][name]) for name in PART_NAMES[:2]}:
            raise PrivateFitError(f"splitting {public['rows']} rows at val_fraction {public['val_fraction']}, seed "
                                  f"{public['seed']} gives {sizes}, but the server's parts are {public['parts']}; "
                                  "use an xsilo of the server's version")
        parts = [states[idx] for idx in indices] + ([anchor_states] if anchor_states is not None else [])
        if head is not None:
            info = client.model_info()
            bound = min(parts[0].shape[1], int(public["hidden_size"]), len(parts[0])) + 2 + (
                0 if means is None else len(means))
            check_budgets(bound, info["heads"][head], info.get("limits") or {}, head,  # before the fit's work
                          val_rows=len(val_logits))
        with stage("encrypted fit"):
            reply = client.fit(parts, public["fingerprint"], progress=progress)
    stats = part_stats(parts, reply)
    if len(stats) > 2:  # the anchors join the train statistics at the share this client chooses
        stats = [with_anchor_stats(stats[0], stats[2], adaptation.anchor_weight), stats[1]]
    surrogate = head_val = None
    probe_metrics: dict[str, Any] = {}
    if head is not None:
        with stage("head probe (encrypted queries)"):
            surrogate, probe_metrics = query_head(server, head, stats[0], fit, api_key=api_key, timeout=timeout,
                                                  traffic=traffic, means=means)
            head_val = head_val_stats(parts[1], val_logits)
    with stage("solve"):
        result = fit_private(parts, reply, fit, source_spec=job.spec(), public_set=public, head=surrogate,
                             head_val=head_val, stats=stats)
    anchors = None if anchor_states is None else {"rows": len(anchor_states), "weight": adaptation.anchor_weight}
    result.metrics["anchors"] = anchors
    if head is not None:
        result.metrics["head"] = {"name": head, **probe_metrics, "val_rows": len(val_logits),  # val logits: charged
                                  "rows_charged": probe_metrics["rows_charged"] + len(val_logits)}
    public_map = None
    if task is not None:
        val = stats[1] if len(stats) > 1 and stats[1].count else None
        with stage("adapt to the private texts"):
            amap, metrics = private_texts.adapted(result.map, result.metrics, stats[0], val, x_private, task, fit,
                                                  adaptation, surrogate)
        if anchors is not None:  # merged into stats[0] above: adapt saw them as public rows
            metrics["adaptation"].update(anchor_rows=anchors["rows"], anchor_weight=anchors["weight"])
        public_map, result = result, PrivateFit(amap, metrics, result.lambda_path)
    result.metrics["traffic"] = traffic.as_dict()  # everything this command sent and received, every query
    result.save_pretrained(out)
    if public_map is not None:  # the unadapted public-set map beside it (after: the save replaces the folder)
        public_map.save_pretrained(Path(out) / PUBLIC_MAP)
    return result


def query_head(server: str, head: str, train: SufficientStats, fit: FitSettings, *, api_key: str | None = None,
               timeout: float = 300.0, traffic: Any = None, means: np.ndarray | None = None
               ) -> tuple[AffineMap, dict[str, Any]]:
    """The provider's head as known on every map of the path (`head_probe`), and with `means` (the head's published
    class means) on every map adapted from them: its probe rows queried under HE in one session, and what the probe
    cost (`traffic`, a serve.http_client.Traffic, counts its requests)."""
    from serve.head_client import HeadClient
    from serve.http_client import ServerReplyError

    probe_rows = probe(train, fit.center, fit.standardize, means)
    rows = probe_rows.rows
    with HeadClient(server, head, api_key=api_key, timeout=timeout, traffic=traffic) as client:
        info = client.model_info()
        charged = check_budgets(len(rows), {"lanes": info.layout.lanes}, info.limits, head)
        try:
            logits = client.infer_states(rows)
        except ServerReplyError as exc:
            if exc.status == 429:
                raise PrivateFitError(f"the provider's row budget ran out while the head-aware λ queried head "
                                      f"{head!r} on {len(rows)} rows ({exc.message[:200]}); ask its operator to raise "
                                      "--rows_per_client, or align without --head (λ by GCV)") from None
            raise
        timings = dict(client.last_timings)
    return probe_rows.head(logits), {"probe_rows": len(rows), "rows_charged": charged,
                                     "ciphertexts": timings.get("ciphertexts"), "server_ms": timings.get("server_ms")}
