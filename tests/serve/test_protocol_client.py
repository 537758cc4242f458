"""docs/protocol.md is enough: a client that imports nothing from encrypted/ or serve/ gets correct answers."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from tests.serve.protocol_client import ProtocolClient
from tests.serve.protocol_label_client import LabelKeys, label

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
        yield srv, fused, export


def test_independent_client_gets_the_plaintext_answers(server):
    srv, fused, _ = server
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


def test_an_independent_label_client_gets_the_argmax_from_section_8_alone(server):
    """The key holder's side of the secure argmax in plain integers, from docs/protocol.md section 8: the labels are
    the plaintext argmax outside the published margin."""
    from serve.harness import ServerThread
    from serve.server import create_app

    _, fused, export = server
    with ServerThread(create_app(export, answers="label", store="memory://"), max_lifetime_s=120) as label_srv:
        client = ProtocolClient(label_srv.url)
        try:
            assert client.model["answers"] == "label"
            keys = LabelKeys()
            X = np.random.default_rng(4).normal(0, 1, (client.layout["lanes"], D))
            labels = label(client, keys, X)
            ref = X @ fused.weight.T.astype(np.float64) + fused.bias
            top = np.sort(ref, axis=1)
            clear = top[:, -1] - top[:, -2] > client.model["label_margin"]
            assert clear.mean() > 0.8
            assert np.array(labels)[clear].tolist() == ref[clear].argmax(1).tolist()
        finally:
            client.close()


@pytest.mark.parametrize("name", ["protocol_client.py", "protocol_label_client.py"])
def test_the_clients_import_only_what_the_spec_allows(name):
    tree = ast.parse(Path(__file__).with_name(name).read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    allowed = {"__future__", "hashlib", "json", "os", "struct", "tempfile", "httpx", "numpy", "tenseal", "secrets",
               "tno", "tests"}  # tno: the label client's key pairs only; tests: the CKKS client above
    assert modules <= allowed
    if name == "protocol_label_client.py":
        assert {"encrypted", "serve"}.isdisjoint(modules)
