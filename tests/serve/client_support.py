"""What the client tests share: a provider serving heads (one publishing a feature detector) and a client whose map
reads a tiny real model's states, so that `xsilo query` runs end to end in seconds; the plaintext answer to check
against; and fault-injecting transports (a round-robin balancer over replicas, a server that answers 503 first)."""
from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import numpy as np

from tests.serve.serve_support import PROVIDER_SPEC, write_small_head

D_B = 16  # the provider's state size (the heads' input)


def write_client_map(out: Path, model: Path, d_in: int, d_out: int = D_B, seed: int = 3) -> Path:
    """A client's map folder whose source is the tiny model `model` (its real identity), into the heads' space."""
    from datamodules.models import model_identity
    from serve.formats.maps import write_map_folder

    rng = np.random.default_rng(seed)
    source = {"model": str(model), "model_identity": model_identity(str(model)), "pooling": "last", "layer": -1,
              "max_length": 32, "dtype": "float32", "hidden_size": d_in}
    config = {"estimator": "ridge", "lambdas": [1.0], "chosen_lambda": 1.0, "lambda_path": [[1.0, 0.5]],
              "center": True, "standardize": True, "source": source,
              "target": dict(PROVIDER_SPEC, hidden_size=d_out), "metrics": {}}
    return write_map_folder(out, rng.normal(0, 1, (d_out, d_in)), rng.normal(0, 0.1, d_out), config)


def provider_and_client(root: Path, model: Path, d_in: int = 32) -> dict[str, Path]:
    """Heads `topics` (3 classes, a published detector) and `sentiment` (2 classes), and the client's map."""
    return {"topics": write_small_head(root / "heads" / "topics", d=D_B, k=3, seed=1, feature_ood=True,
                                       labels=["business", "sport", "tech"]),
            "sentiment": write_small_head(root / "heads" / "sentiment", d=D_B, k=2, seed=2,
                                          labels=["negative", "positive"]),
            "map": write_client_map(root / "aligner", model, d_in),
            "model": model}


def plaintext(folders: dict[str, Path], texts: list[str], head: str = "topics") -> tuple[np.ndarray, np.ndarray]:
    """(logits, Mahalanobis scores) the provider's head gives on the client's mapped states, in plaintext."""
    from datamodules.encoder import StateEncoder
    from serve.formats.exports import LinearExport, load_export
    from serve.formats.heads import read_feature_ood_npz
    from serve.ood_client import mahalanobis_scores

    states = StateEncoder(str(folders["model"]), pooling="last", max_length=32)(texts).astype(np.float64)
    amap = LinearExport.from_pretrained(folders["map"], "map")
    mapped = states @ amap.weight.T.astype(np.float64) + amap.bias
    layer = load_export(folders[head], "head")
    logits = mapped @ layer.weight.T.astype(np.float64) + layer.bias
    npz = folders[head] / "feature-ood.npz"
    if not npz.is_file():
        return logits, np.full(len(texts), np.nan)
    means, precision, _ = read_feature_ood_npz(npz.read_bytes(), layer.output_dim, layer.input_dim, "test", "fix")
    return logits, mahalanobis_scores(mapped, means, precision)


class RoundRobin(httpx.BaseTransport):
    """A load balancer without stickiness in front of replicas: request i goes to replica i mod n (a replica that
    refuses the connection makes the client retry, which lands on the next one)."""

    def __init__(self, urls: list[str]):
        self.targets = [httpx.URL(u) for u in urls]
        self.turn = itertools.count()
        self.inner = httpx.HTTPTransport()
        self.sent_to: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        index = next(self.turn) % len(self.targets)
        self.sent_to.append(index)
        target = self.targets[index]
        request.url = request.url.copy_with(host=target.host, port=target.port)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class BusyFirst(httpx.BaseTransport):
    """The real server behind a front that answers the first `times` requests matching `path_part` with 503 busy and
    `Retry-After` (a replica draining, or full), then forwards everything."""

    def __init__(self, times: int, path_part: str = "/infer", retry_after: str = "0"):
        self.left, self.path_part, self.retry_after = times, path_part, retry_after
        self.inner = httpx.HTTPTransport()
        self.refused = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.left > 0 and self.path_part in request.url.path:
            self.left -= 1
            self.refused += 1
            request.read()
            return httpx.Response(503, headers={"Retry-After": self.retry_after},
                                  json={"error": {"code": "busy", "message": "too many HE jobs queued; retry"}})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()
