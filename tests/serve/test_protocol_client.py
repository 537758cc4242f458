"""docs/protocol.md is enough: a client that imports nothing from encrypted/ or serve/ gets correct answers."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from tests.serve.protocol_client import ProtocolClient

pytestmark = [pytest.mark.network, pytest.mark.he]

D, K = 40, 5  # dp = 64, k' = 3 complex rows (the last one carries a real output only)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lightning_modules.parties.export import write_export
    from serve.harness import ServerThread
    from serve.server import create_app

    rng = np.random.default_rng(11)
    source = {"model": "client-model", "model_identity": None, "pooling": "last", "layer": -1, "max_length": 32,
              "dtype": "float32", "hidden_size": D}
    export = write_export(tmp_path_factory.mktemp("protocol") / "export", rng.normal(0, 1 / np.sqrt(D), (24, D)),
                          rng.normal(0, 0.1, 24), rng.normal(0, 1, (K, 24)), rng.normal(0, 0.1, K), source=source,
                          target={"model": "server-model"}, label_names=[f"c{i}" for i in range(K)])
    from serve.formats.exports import load_export
    fused = load_export(export)
    with ServerThread(create_app(export), max_lifetime_s=120) as srv:
        yield srv, fused


def test_independent_client_gets_the_plaintext_answers(server):
    srv, fused = server
    client = ProtocolClient(srv.url)
    try:
        assert client.model["layout"]["pairing"] == "outputs" and client.model["output_noise"] == 0
        rng = np.random.default_rng(0)
        for n in (1, client.layout["lanes"]):  # one input, and a full ciphertext
            X = rng.normal(0, 1, (n, D))
            Y = client.infer(X)
            ref = X @ fused.weight.T.astype(np.float64) + fused.bias
            assert Y.shape == (n, K)
            assert np.linalg.norm(Y - ref) / np.linalg.norm(ref) < 1e-3  # the precision docs/protocol.md states
            assert np.max(np.abs(Y - ref)) < 1e-4
    finally:
        client.close()


def test_the_client_imports_only_what_the_spec_allows():
    tree = ast.parse(Path(__file__).with_name("protocol_client.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules <= {"__future__", "hashlib", "json", "os", "struct", "tempfile", "httpx", "numpy", "tenseal"}
