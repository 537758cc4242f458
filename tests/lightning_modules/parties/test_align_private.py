"""`xsilo align --private DATA`: the public map adapted at home to the client's own unlabelled texts with the class
statistics the provider publishes (`xsilo head fit --publish_ood true`), on tiny random models, two homes.

The privacy claim is tested where the provider sits: a middleware outermost in its app records every request it
receives (method, route, query, body size and sha256). Two clients with different private texts (other texts,
other row counts, another file format and text column) must send the very same requests. Encryption is
randomised: the private fit's ring-LWE kernel draws its secret, noise and mask seeds from
`encrypted.rlwe.random_bytes`, and the encrypted queries use CKKS (SEAL compresses each ciphertext, so even its
size varies with its random mask). The test fixes both: `encrypted.rlwe.random_bytes` becomes a seeded generator,
one for the client's threads and one for the provider's, fresh for each run (so the fit key and every chunk are
the same bytes in both runs whatever the threads' interleaving), and SEAL's PRNG factory is seeded (the same seed
in both runs), so any byte the private texts touched would show as a difference."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from lightning_modules.cli import main
from lightning_modules.fitting.adaptation import TaskStatistics, adapt
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.prior_matching import match_priors
from lightning_modules.fitting.solvers import solve
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.settings import AdaptationSettings, FitSettings
from serve.formats.exports import load_export
from serve.formats.public_states import load_public_states
from serve.formats.splits import public_split
from serve.harness import ServerThread
from serve.server import create_app

from tests.tiny import WORDS, write_tiny_csv

pytestmark = [pytest.mark.network, pytest.mark.he]

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
LAMBDA_FLAG = "[" + ",".join(map(str, LAMBDAS)) + "]"


class Recorder:
    """ASGI middleware: (method, route with session ids masked, query, body bytes, body sha256) per request."""

    def __init__(self, app, log: list):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        digest, size = hashlib.sha256(), [0]

        async def counting():
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                digest.update(body)
                size[0] += len(body)
            return message

        try:
            await self.app(scope, counting, send)
        finally:
            route = re.sub(r"/sessions/[^/]+", "/sessions/{id}", scope["path"])
            self.log.append((scope["method"], route, scope.get("query_string", b"").decode(), size[0],
                             digest.hexdigest()))


def fixed_seal_randomness(mp: pytest.MonkeyPatch) -> None:
    """Every unseeded SEAL context (client and server, same process) becomes one seeded context per parameters."""
    from encrypted import profiles

    real, made = profiles.seal_context, {}

    def seeded(degree, bits, random_seed=None):
        if random_seed is not None:
            return real(degree, bits, random_seed)
        key = (degree, tuple(bits))
        if key not in made:
            made[key] = real(degree, bits, [0x5EED + i for i in range(8)])
        return made[key]

    mp.setattr(profiles, "seal_context", seeded)


def fixed_fit_randomness(mp: pytest.MonkeyPatch) -> None:
    """The private fit's randomness (`encrypted.rlwe.random_bytes`, looked up at call time) from two fresh seeded
    generators: one for the client (the main thread and its encryptor thread, which take turns) and one for the
    provider (its worker threads, one chunk at a time), so the interleaving of the two sides changes no byte."""
    import threading

    from encrypted import rlwe

    client, provider = np.random.default_rng(0x5EED).bytes, np.random.default_rng(0xB0B).bytes

    def seeded(n: int) -> bytes:
        thread = threading.current_thread()
        ours = thread is threading.main_thread() or thread.name.startswith("xsilo-encrypt")
        return (client if ours else provider)(n)

    mp.setattr(rlwe, "random_bytes", seeded)


def private_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 12)))) + f" p{seed}-{j}"
            for j in range(n)]


@pytest.fixture(scope="module")
def parties(tiny_models, tmp_path_factory):
    """The provider's public set and head (with --publish_ood true), and three client runs against fresh servers:
    --private A (60 texts, jsonl), --private B (another 70 texts in a csv column `body`, sampled to 40), none."""
    root = tmp_path_factory.mktemp("align-private")
    provider, client = str(tiny_models["gpt2"]), str(tiny_models["llama"])
    public = write_tiny_csv(root / "public.csv", n=120, seed=8)
    task = write_tiny_csv(root / "task.csv", n=90, seed=9)
    private_a = root / "mine-a.jsonl"
    private_a.write_text("".join(json.dumps({"text": t}) + "\n" for t in private_texts(60, 1)))
    private_b = root / "mine-b.csv"
    private_b.write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(private_texts(70, 2))))
    runs = {"a": ["--private", str(private_a)],
            "b": ["--private", str(private_b), "--extraction.text_column", "body", "--private_limit", "40"],
            "plain": []}
    logs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "provider-home"))
        main(["public-set", "export", "--model", provider, "--data", str(public), "--out", str(root / "pub"),
              "--accelerator", "cpu"])
        main(["head", "fit", "--model", provider, "--task", str(task), "--out", str(root / "heads" / "topics"),
              "--head.epochs", "10", "--publish_ood", "true", "--accelerator", "cpu"])
        mp.setenv("XSILO_HOME", str(root / "client-home"))
        fixed_seal_randomness(mp)
        for name, flags in runs.items():
            fixed_fit_randomness(mp)  # the same draws in every run
            app = create_app(heads=[root / "heads" / "topics"], public=root / "pub", publish_val_logits=True,
                             store="memory://")  # a fresh server each time: nothing carried over
            app.add_middleware(Recorder, log=logs.setdefault(name, []))  # outermost: sees every byte received
            with ServerThread(app, max_lifetime_s=300) as srv:
                main(["align", "--server", srv.url, "--model", client, "--out", str(root / f"map-{name}"),
                      "--head", "topics", "--fit.lambdas", LAMBDA_FLAG, "--accelerator", "cpu", *flags])
    return {"root": root, "client": client, "logs": logs, "private_a": private_a}


def config(parties, name: str) -> dict:
    return json.loads((parties["root"] / f"map-{name}" / "config.json").read_text())


def test_the_provider_receives_the_same_bytes_whatever_the_private_texts(parties):
    logs = parties["logs"]
    assert logs["a"] == logs["b"]  # every request: route, query, body size and body sha256
    routes = [(method, route) for method, route, *_ in logs["a"]]
    assert ("GET", "/v1/heads/topics/feature-ood") in routes and ("POST", "/v1/sessions/{id}/infer") in routes
    assert sum(route.startswith("/v1/fit/sessions/{id}/parts/") for _, route in routes) >= 3  # the encrypted fit
    # --private adds only the download of the published statistics (and the /v1/model read before it)
    added = [r for r in logs["a"] if r not in logs["plain"]]
    assert [(m, r) for m, r, *_ in added] == [("GET", "/v1/heads/topics/feature-ood")]
    assert len(logs["a"]) == len(logs["plain"]) + 2
    # ... and the private texts were used: other texts, another map
    a, b = (config(parties, name)["metrics"]["private_fit"]["adaptation"] for name in ("a", "b"))
    assert (a["private_rows"], b["private_rows"]) == (60, 40)
    w_a, w_b = (AffineMap.from_pretrained(parties["root"] / f"map-{name}").weight for name in ("a", "b"))
    assert float((w_a - w_b).abs().max()) > 1e-3 * float(w_a.abs().max())


def test_the_adapted_map_records_its_adaptation_and_the_plain_run_is_unchanged(parties):
    adapted, plain = config(parties, "a"), config(parties, "plain")
    record = adapted["metrics"]["private_fit"]["adaptation"]
    assert "adaptation" not in plain["metrics"]["private_fit"]
    assert record["public_map"]["chosen_lambda"] == plain["chosen_lambda"] == adapted["chosen_lambda"] == record["lambda"]
    assert record["public_map"]["val_r2"] == plain["metrics"]["private_fit"]["val_r2"]
    assert record["priors"] == "published" and record["head"] == "topics" and len(record["class_shares"]) == 3
    assert (record["weight"], record["rounds"], record["em_iterations"]) == (0.3, 5, 5)
    text = json.dumps(adapted)
    assert "p1-" not in text and "mine-a" not in text  # neither a text nor the file's name is recorded
    w_adapted, w_plain = (AffineMap.from_pretrained(parties["root"] / f"map-{n}").weight for n in ("a", "plain"))
    assert not torch.allclose(w_adapted, w_plain, atol=1e-4)
    # the unadapted public-set map is saved beside the adapted one: the plain run's map, to the float
    beside = AffineMap.from_pretrained(parties["root"] / "map-a" / "public-map")
    assert torch.allclose(beside.weight, w_plain, rtol=0, atol=1e-4 * float(w_plain.abs().max()))
    assert not (parties["root"] / "map-plain" / "public-map").exists()


def stats_of(x: np.ndarray, y: np.ndarray) -> SufficientStats:
    x, y = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in (x, y))
    return SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=False).update(x, y)


def test_the_two_party_adapted_map_equals_the_labs(parties):
    """The lab holds both parties' states and the head: its λ through the head, then `adapt` on the same private
    states, gives the map the two parties made, to the README's 1e-4 of its largest weight (the private fit's
    ring-LWE kernel returns G to about 2^-10 of the normalised Gram; the CKKS kernel it replaced met 1e-6)."""
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, resolve
    from lightning_modules.parties.private_fit import public_texts_file

    root, client = parties["root"], parties["client"]
    pub = load_public_states(root / "pub")
    with pytest.MonkeyPatch.context() as mp:  # the client's own caches, as `xsilo align` filled them
        mp.setenv("XSILO_HOME", str(root / "client-home"))
        path = public_texts_file(pub.texts, pub.manifest["fingerprint"])
        x = StateCache(resolve(ExtractionConfig(model=client, data=str(path), label_column=None)).directory)
        x = x.rows(np.arange(pub.rows)).astype(np.float64)
        job = resolve(ExtractionConfig(model=client, data=str(parties["private_a"]), label_column=None))
        x_private = StateCache(job.directory).rows(np.arange(len(job.texts))).astype(np.float64)
    train_idx, val_idx = public_split(pub.rows, float(pub.manifest["val_fraction"]), int(pub.manifest["seed"]))
    y_train, y_val = (p.astype(np.float64) for p in pub.parts)
    head = load_export(root / "heads" / "topics", "head")
    head_map = AffineMap(torch.from_numpy(head.weight.astype(np.float64)), torch.from_numpy(head.bias.astype(np.float64)))
    fit = FitSettings(lambdas=LAMBDAS)
    train = stats_of(x[train_idx], y_train)
    _, lam, _ = solve(train, stats_of(x[val_idx], y_val), fit.estimator, fit.lambdas, fit.center, fit.standardize,
                      criterion="head", head=head_map,
                      head_val=stats_of(x[val_idx], y_val @ head.weight.T.astype(np.float64) + head.bias))
    ood = head.feature_ood
    task = TaskStatistics.from_arrays(ood.means, ood.precision, ood.priors)
    lab = adapt(train, torch.from_numpy(x_private), task, lam, fit, AdaptationSettings()).map
    lab, matched = match_priors(lab, head_map, torch.from_numpy(x_private), task.priors)  # with the real head
    record = config(parties, "a")["metrics"]["private_fit"]["adaptation"]
    assert record["lambda"] == lam and record["private_rows"] == len(x_private) == 60
    two_party = AffineMap.from_pretrained(root / "map-a")
    w, w_lab = two_party.weight.double(), lab.weight.double()
    assert float((w - w_lab).abs().max()) <= 1e-4 * float(w_lab.abs().max())
    # prior matching moves the intercept by the least shift the head reads as the offsets: the lab's (the real
    # head) and the probe's agree on every logit, and on the intercept to the probe's CKKS noise
    xp = torch.from_numpy(x_private)
    logits, logits_lab = head_map(two_party.to(torch.float64)(xp)), head_map(lab(xp))
    assert float((logits - logits_lab).abs().max()) <= 1e-4 * float(logits_lab.abs().max())
    assert record["prior_matching"]["shares_after"] == matched["shares_after"]
    b, b_lab = two_party.bias.double(), lab.bias.double()
    assert float((b - b_lab).abs().max()) <= 1e-3 * max(float(b_lab.abs().max()), 1.0)


def test_private_errors_are_one_line_naming_the_fix(parties, tmp_path, capsys):
    from lightning_modules.parties.private_fit import align
    from lightning_modules.parties.private_texts import PrivateTextsError, published_task

    from tests.serve.serve_support import write_small_head, write_small_public_states

    base = ["align", "--server", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "map")]
    for flags, fix in ((["--private", "mine.jsonl"], "--head NAME"),
                       (["--private_limit", "5"], "pass --private"),
                       (["--private", "mine.jsonl", "--head", "t", "--fit.estimator", "cca"], "--fit.estimator ridge")):
        with pytest.raises(SystemExit) as exit_info:
            main(base + flags)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fix in err
    # a head without published statistics, and statistics of another width than the public set's
    public = write_small_public_states(tmp_path / "public", n=40, d=16)
    bare = write_small_head(tmp_path / "heads" / "bare", d=16, k=3)
    stats = write_small_head(tmp_path / "heads" / "stats", d=16, k=3, feature_ood=True)
    app = create_app(heads=[bare, stats], public=public, publish_val_logits=True)
    with ServerThread(app, max_lifetime_s=60) as srv:
        with pytest.raises(PrivateTextsError, match="must run xsilo head fit --publish_ood true"):
            align(srv.url, "m", tmp_path / "map", head="bare", private="mine.jsonl")
        with pytest.raises(PrivateTextsError, match="publishes 16-d class statistics but the public set holds 17-d"):
            published_task(srv.url, "stats", 17)
        assert published_task(srv.url, "stats", 16).priors == "uniform"  # a head published before priors were
    # fewer private texts than classes: refused before any encrypted work
    few = tmp_path / "few.txt"
    few.write_text("good film\nbad news\n")
    root = parties["root"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "client-home"))
        app = create_app(heads=[root / "heads" / "topics"], public=root / "pub", publish_val_logits=True,
                         store="memory://")  # a fresh server each time: nothing carried over
        log: list = []
        app.add_middleware(Recorder, log=log)
        with ServerThread(app, max_lifetime_s=60) as srv, pytest.raises(PrivateTextsError, match="fewer than the head's 3"):
            align(srv.url, parties["client"], tmp_path / "map", head="topics", private=str(few),
                  fit=FitSettings(lambdas=LAMBDAS))
    assert not any("/fit/sessions" in route for _, route, *_ in log) and not (tmp_path / "map").exists()
