"""Extraction cost of a served head in logits mode and in label-only mode: queries of the best attack on each.

    .venv/bin/python bench/extraction_attack.py [--states DIR] [--budget 5000] [--live-seconds 1200] [--threads 1]

Data: cached Gemma-3 BBC states (`--states`, default the largest gemma3--bbc-train cache under $XSILO_HOME: real
states of real texts, d=640, 5 classes), a ridge head (W, b) fitted on 70% of the rows, the rest held out; without
a cache, synthetic Gaussian clusters (d=640, 5 classes; the output says which). The attacker holds the 70% without
labels and queries a real server (`create_app(heads=...)`, loopback HTTP, real keys and ciphertexts) through
`serve.client.Client` with an identity map. A query is one ciphertext of `lanes` rows; every query is counted.

* Logits mode (the baseline): equation solving. Rows [0; s e_j] give b and W column by column, ceil((d+1)/lanes)
  queries; the figure is the first query after which ||W' - W|| / ||W|| <= `--target`.
* Label-only mode (`answers={head: "label"}`, the secure argmax): decision-boundary search. The attacker labels
  `--pool` of its states and fits a surrogate head to them (directions and scales only). With r the commonest
  label, for every other class i it bisects between the class centroids, scaled by `--scale` and lifted (per the
  surrogate) so that r and i stand far above the rest, to x0 on the r/i boundary; then, for every coordinate j,
  finds the flip along x0 + δ_j e_j + t v, t in [-T, T]: t / δ_j = (w_r - w_i)_j / |(w_r - w_i).v|. `lanes`
  bisections share a query. δ_j follows the attacker's state spread, calibrated on a 32-coordinate pilot; flips
  at a bracket end are checked and searched again with δ / 4. Biases come from bisections between natural states
  of r near class i and their nearest i states; the scales of the pairs from bisections where i and j stand far
  above the rest (per the head stolen so far). Bisection is water-filled: rounds halve the goal width of every
  coordinate's bracket, widest first, in chunks of 64 queries after each of which the stolen head is scored, until
  its error min_a ||a P W' - P W|| / ||P W|| (P the row centring: argmax fixes W only up to a common row and a
  positive scale) reaches `--target`. The live server answers for `--live-seconds` (~0.15 s a query at 512-bit
  argmax keys, which set the cost of a query, not the number an attack needs), the rest of the attack is answered
  by the served head in plaintext with the server's flood noise and fixed point: the output says which queries
  were which, and checks every live answer against the plaintext argmax (differences only inside the noise).

Budget: `--budget` rows per client a day (5,000, more than an honest client needs): the days each attack needs,
and the error and agreement each reaches in one day. The ratio of label-only to logits queries is against the
logits baseline of the same run. The last line is JSON with every figure.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", help="a state-cache folder (shard-*.npy, labels.npy, manifest.json)")
    parser.add_argument("--target", type=float, default=1e-2, help="relative error on the head to reach")
    parser.add_argument("--budget", type=int, default=5000, help="rows per client a day an honest client won't notice")
    parser.add_argument("--live-seconds", type=float, default=1200.0,
                        help="seconds the live label server answers (the whole attack: about 14 min here)")
    parser.add_argument("--scale", type=float, default=100.0, help="scale of the label attack's probes")
    parser.add_argument("--lift", type=float, default=4.0, help="margin of the boundary points over other classes")
    parser.add_argument("--pool", type=int, default=200, help="attacker states labelled first (label attack)")
    parser.add_argument("--max-queries", type=int, default=40000, help="label attack's query cap")
    parser.add_argument("--key-bits", type=int, default=512, help="argmax key size (Paillier/DGK)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before numpy is imported

import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = {"model": "gemma3", "model_identity": None, "pooling": "last", "layer": -1, "max_length": 48,
        "dtype": "float32"}


def default_states() -> Path | None:
    home = Path(os.environ.get("XSILO_HOME", Path.home() / ".cache" / "xsilo")) / "states"
    found = [(json.loads(m.read_text()).get("n_rows", 0), m.parent)
             for m in home.glob("gemma3--bbc-train--*/manifest.json")]
    return max(found)[1] if found else None


def load_data(folder: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(states (n, d) float64, labels (n,), description)."""
    if folder is not None and (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        X = np.concatenate([np.load(folder / s["file"]) for s in manifest["shards"]]).astype(np.float64)
        y = np.load(folder / "labels.npy").astype(int)[:len(X)]
        what = f"{manifest.get('model')} {manifest.get('data')} {manifest.get('split')}"
        return X, y, f"real {what} states ({folder.name})"
    rng = np.random.default_rng(0)
    centres, y = rng.normal(0, 1, (5, 640)), rng.integers(0, 5, 1500)
    return centres[y] + rng.normal(0, 3, (1500, 640)), y, "synthetic Gaussian clusters (no state cache found)"


def ridge_head(X: np.ndarray, y: np.ndarray, k: int, lam: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-all ridge on standardised states (dead dimensions left unscaled), the standardisation folded in."""
    import torch

    from lightning_modules.fitting.standardize import safe_scale

    mu, sd = X.mean(0), safe_scale(torch.from_numpy(X.std(0))).numpy()  # the project's one zero-variance rule
    Z, T = (X - mu) / sd, np.eye(k)[y] - 1.0 / k
    W = (np.linalg.solve(Z.T @ Z + lam * np.eye(Z.shape[1]), Z.T @ T) / sd[:, None]).T
    return W, np.full(k, 1.0 / k) - W @ mu


def write_folders(out: Path, W: np.ndarray, b: np.ndarray) -> tuple[Path, Path]:
    """The provider's head folder `bbc` and the attacker's identity map into the head's states."""
    from serve.formats.heads import write_head_export
    from serve.formats.maps import write_map_folder

    (k, d), spec = W.shape, dict(SPEC, hidden_size=W.shape[1])
    head = write_head_export(out / "bbc", W, b, target=spec, label_names=[f"c{i}" for i in range(k)], metrics={})
    config = {"estimator": "ridge", "lambdas": [1.0], "chosen_lambda": 1.0, "lambda_path": [[1.0, 0.5]],
              "center": True, "standardize": True, "source": spec, "target": spec, "metrics": {}}
    return head, write_map_folder(out / "map", np.eye(d), np.zeros(d), config)


def centred_error(W_hat: np.ndarray, W: np.ndarray) -> float:
    """min_a ||a P W' - P W|| / ||P W||, P the row centring (a > 0; inf when the best a is not positive)."""
    A, B = W_hat - W_hat.mean(0), W - W.mean(0)
    a = float(np.sum(A * B) / max(np.sum(A * A), 1e-300))
    return float(np.linalg.norm(a * A - B) / np.linalg.norm(B)) if a > 0 else math.inf


class Oracle:
    """Labels of probe rows, counted in queries of `lanes` rows: the live server until `live_s` have passed, then the
    served head in plaintext with the server's flood noise and fixed point. Live rows and answers are kept."""

    def __init__(self, client: Any, W: np.ndarray, b: np.ndarray, flood_std: float, fraction_bits: int, live_s: float):
        self.client, self.W, self.b, self.flood_std, self.lanes = client, W, b, flood_std, client.layout.lanes
        self.unit, self.deadline = 2.0 ** fraction_bits, time.monotonic() + live_s
        self.rng = np.random.default_rng(ARGS.seed)
        self.queries, self.live_queries, self.live_seconds, self.max_logit = 0, 0, 0.0, 0.0
        self.live_rows: list[np.ndarray] = []
        self.live_labels: list[np.ndarray] = []

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        z = rows @ self.W.T + self.b
        self.max_logit = max(self.max_logit, float(np.abs(z).max()))
        out = np.argmax(np.rint((z + self.rng.normal(0, self.flood_std, z.shape)) * self.unit), axis=1)
        for start in range(0, len(rows), 16 * self.lanes):  # 16 queries a request burst, while live time is left
            if time.monotonic() >= self.deadline:
                break
            chunk, begun = rows[start:start + 16 * self.lanes], time.perf_counter()
            out[start:start + len(chunk)] = self.client.label_states(chunk)
            self.live_seconds += time.perf_counter() - begun
            self.live_queries += -(-len(chunk) // self.lanes)
            self.live_rows.append(chunk), self.live_labels.append(out[start:start + len(chunk)].copy())
        self.queries += -(-len(rows) // self.lanes)
        return out


class Lines:
    """Parallel bisections along p + u (q - p), u in [0, 1], p labelled a and q labelled b: [lo, hi] brackets the
    flip. A line that meets another label is marked bad and left alone."""

    def __init__(self, p: np.ndarray, q: np.ndarray, a: Any, b: Any):
        self.p, self.q, self.a, self.b = p, q, np.broadcast_to(a, len(p)).copy(), np.broadcast_to(b, len(p)).copy()
        self.lo, self.hi, self.bad = np.zeros(len(p)), np.ones(len(p)), np.zeros(len(p), dtype=bool)

    def step(self, oracle: Oracle, idx: np.ndarray) -> None:
        idx = idx[~self.bad[idx]]
        if len(idx):
            mid = (self.lo[idx] + self.hi[idx]) / 2
            labels = oracle(self.p[idx] + mid[:, None] * (self.q[idx] - self.p[idx]))
            self.lo[idx] = np.where(labels == self.a[idx], mid, self.lo[idx])
            self.hi[idx] = np.where(labels == self.b[idx], mid, self.hi[idx])
            self.bad[idx] |= (labels != self.a[idx]) & (labels != self.b[idx])

    def run(self, oracle: Oracle, steps: int, idx: np.ndarray | None = None, ends: bool = False) -> "Lines":
        """`steps` bisection steps (for lines `idx`), after checking the labels of both ends when `ends`."""
        if ends:
            labels = oracle(np.vstack([self.p, self.q]))
            self.bad |= (labels[:len(self.p)] != self.a) | (labels[len(self.p):] != self.b)
        for _ in range(steps):
            self.step(oracle, np.arange(len(self.p)) if idx is None else idx)
        return self

    def points(self) -> np.ndarray:
        return self.p + ((self.lo + self.hi) / 2)[:, None] * (self.q - self.p)


def label_attack(oracle: Oracle, pool: np.ndarray, X_test: np.ndarray, W: np.ndarray, b: np.ndarray) -> dict:
    """Decision-boundary extraction (module docstring); W and b only score the stolen head after each chunk."""
    k, d = W.shape
    rng = np.random.default_rng(ARGS.seed + 7)
    s, T, chunk, sd = ARGS.scale, 0.3, 64 * oracle.lanes, pool.std(0) + 1e-12
    own = pool[rng.permutation(len(pool))[:ARGS.pool]]
    own_labels = oracle(own)
    ref = int(np.bincount(own_labels, minlength=k).argmax())
    others = [c for c in range(k) if c != ref and np.any(own_labels == c)]
    of, P = {c: own[own_labels == c] for c in range(k)}, len(others)
    Ws = ridge_head(own, own_labels, k)[0]  # the surrogate

    def lift(up: list[int], Wm: np.ndarray) -> np.ndarray:
        """A shift that raises classes `up` equally over the rest per head Wm, by `--lift` x its scaled spread."""
        rest = [c for c in range(k) if c not in up]
        A = np.array([Wm[a] - Wm[c] for a in up for c in rest] + [Wm[a] - Wm[up[0]] for a in up[1:]])
        size = ARGS.lift * s * np.std(own @ Wm.T)
        return size * np.linalg.pinv(A) @ np.r_[np.ones(len(up) * len(rest)), np.zeros(len(up) - 1)]

    lifts = np.array([lift([ref, i], Ws) for i in others])
    base = Lines(s * of[ref].mean(0) + lifts, np.array([s * of[i].mean(0) for i in others]) + lifts, ref, others)
    base.run(oracle, 24, ends=True)
    for n, i in enumerate(others):  # a failed centroid line: lines between random states of the two classes
        for _ in range(8 * base.bad[n]):
            one = Lines(s * of[ref][rng.integers(len(of[ref]))][None] + lifts[n],
                        s * of[i][rng.integers(len(of[i]))][None] + lifts[n], ref, i)
            if not one.run(oracle, 24, ends=True).bad[0]:
                base.p[n], base.q[n], base.lo[n], base.hi[n], base.bad[n] = *one.p, *one.q, *one.lo, *one.hi, False
                break
    x0, v = base.points(), base.q - base.p
    pair_of, coord = np.repeat(np.arange(P), d), np.tile(np.arange(d), P)
    surrogate_t = [s * sd * (Ws[ref] - Ws[i]) / abs((Ws[ref] - Ws[i]) @ v[n]) for n, i in enumerate(others)]
    delta = np.array([T * s * sd / (6 * np.sqrt(np.mean(t ** 2))) for t in surrogate_t])  # t ~ T / 6 (it is small)

    def coordinate_lines(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = x0[pair_of[rows]] - T * v[pair_of[rows]]
        p[np.arange(len(rows)), coord[rows]] += delta[pair_of[rows], coord[rows]]
        return p, p + 2 * T * v[pair_of[rows]]

    lines, tries = Lines(*coordinate_lines(np.arange(P * d)), ref, np.array(others)[pair_of]), np.zeros(P * d, int)

    def m_hat() -> tuple[np.ndarray, np.ndarray]:
        """Estimates of m = (w_ref - w_i) / |(w_ref - w_i).v| and their bracket widths, (pairs, d) each."""
        unit = 2 * T / delta[pair_of, coord]
        return ((lines.lo + lines.hi - 1) / 2 * unit).reshape(P, d), ((lines.hi - lines.lo) * unit).reshape(P, d)

    def restart(rows: np.ndarray, side: np.ndarray | int = 0) -> int:
        """Search `rows` again with delta / 4, the flip beyond q (side 1: now in u > 9/16), p (-1) or unknown (0)."""
        delta[pair_of[rows], coord[rows]] /= 4
        lines.p[rows], lines.q[rows] = coordinate_lines(rows)
        lines.lo[rows], lines.hi[rows] = np.where(side > 0, 9 / 16, 0.0), np.where(side < 0, 7 / 16, 1.0)
        lines.bad[rows], tries[rows] = False, tries[rows] + 1
        return len(rows)

    pilot = np.concatenate([n * d + rng.choice(d, min(32, d), replace=False) for n in range(P)])
    lines.run(oracle, 6, pilot)
    a = (m_hat()[0] * s * sd).ravel()
    rms = np.array([np.sqrt(np.mean(a[pilot[pilot // d == n]] ** 2)) for n in range(P)])
    rest = np.setdiff1d(np.arange(P * d), pilot)  # t about T / 2 by the pilot
    delta[pair_of[rest], coord[rest]] = T * s * sd[coord[rest]] / (2 * np.maximum(rms, 1e-12)[pair_of[rest]])
    lines.p[rest], lines.q[rest] = coordinate_lines(rest)
    near = [of[ref][np.argsort(((of[ref] - of[i].mean(0)) ** 2).sum(1))[:8]] for i in others]  # ref states near i
    far = [of[i][np.argmin(((x[:, None] - of[i][None]) ** 2).sum(-1), axis=1)] for x, i in zip(near, others)]
    bias_pair = np.repeat(np.arange(P), [len(x) for x in near])
    bias = Lines(np.vstack(near), np.vstack(far), ref, np.array(others)[bias_pair]).run(oracle, 10)
    ratio_pairs: list[tuple[int, int]] = []
    ratio = Lines(np.zeros((0, d)), np.zeros((0, d)), 0, 0)

    def stolen() -> tuple[np.ndarray, np.ndarray]:
        """(W', b') from the brackets so far: w'_ref = 0, w'_i = -(w_ref - w_i), on one scale."""
        m, x = m_hat()[0], bias.points()
        use = [(bias_pair == n) & ~bias.bad for n in range(P)]
        M = np.hstack([m, np.array([[-np.mean(x[u] @ m[n]) if u.any() else 0.0] for n, u in enumerate(use)])])
        rows, rhs = [np.eye(P)[0]], [0.0]  # M_n = c_n (w_ref - w_i, b_ref - b_i), c_n > 0: solve for log c
        for (e, f), point, bad in zip(ratio_pairs, ratio.points(), ratio.bad):  # c_f / c_e = M_f.p~ / M_e.p~
            ge, gf = M[e] @ np.append(point, 1.0), M[f] @ np.append(point, 1.0)
            if not bad and ge * gf > 0:
                rows.append(np.eye(P)[f] - np.eye(P)[e]), rhs.append(np.log(gf / ge))
        N = M / np.exp(np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0])[:, None]
        W_hat, b_hat = np.zeros((k, d)), np.zeros(k)
        W_hat[others], b_hat[others] = -N[:, :d], -N[:, d]
        return W_hat, b_hat

    truth, trace = np.argmax(X_test @ W.T + b, axis=1), []

    def refine(todo: np.ndarray) -> bool:
        """One bisection step for lines `todo`, in chunks, scoring the stolen head after each; True when done."""
        for start in range(0, len(todo), chunk):
            lines.step(oracle, todo[start:start + chunk])
            W_hat, b_hat = stolen()
            trace.append({"queries": oracle.queries, "error": centred_error(W_hat, W),
                          "agreement": float(np.mean(np.argmax(X_test @ W_hat.T + b_hat, axis=1) == truth))})
            if trace[-1]["error"] <= ARGS.target or oracle.queries >= ARGS.max_queries:
                return True
        return False

    done = any(refine(rest) for _ in range(3))  # coarse: three steps for every coordinate
    W_hat, spread = stolen()[0], s * np.std(own @ stolen()[0].T)
    ends = []
    for e, i in enumerate(others):  # pair scales, where i and j stand far above the rest per the stolen head
        for f, j in enumerate(others[e + 1:], e + 1):
            up, across = lift([i, j], W_hat), (W_hat[i] - W_hat[j]) * spread / np.sum((W_hat[i] - W_hat[j]) ** 2)
            ratio_pairs += [(e, f)] * 2
            ends += [(g * up + across, g * up - across, i, j) for g in (1.0, 1.5)]
    if ends:
        ratio.__init__(*[np.array(z) for z in zip(*ends)])
        ratio.run(oracle, 16, ends=True)
    edge = np.flatnonzero(((lines.lo == 0) | (lines.hi == 1)) & ~lines.bad)  # flips in an outer eighth: beyond?
    at_p = lines.lo[edge] == 0
    labels = oracle(np.where(at_p[:, None], lines.p[edge], lines.q[edge]))
    beyond = np.where(at_p, labels != lines.a[edge], labels != lines.b[edge])
    restarted, level = restart(edge[beyond], np.where(at_p[beyond], -1, 1)), 1.0
    while not done and level > 1e-6:  # water-filling: each round halves the goal width, widest first
        goal = (level * np.linalg.norm(m_hat()[0], axis=1) / np.sqrt(d))[pair_of]
        while not done:
            rel = m_hat()[1].ravel() / goal
            todo = np.flatnonzero((rel > 1) & ~lines.bad)
            if not len(todo):
                break
            done = refine(todo[np.argsort(-rel[todo])])
            again = np.flatnonzero(((((lines.lo == 0) | (lines.hi == 1)) & (lines.hi - lines.lo <= 1 / 32))
                                    | lines.bad) & (tries < 3) & (not done))  # a flip at an end, or a third class
            restarted += restart(again, np.where(lines.bad[again], 0, np.where(lines.lo[again] == 0, -1, 1)))
        level /= 2
    return {"trace": trace, "reference_class": ref, "restarted_searches": restarted,
            "bias_lines": int((~bias.bad).sum()), "ratio_lines": int((~ratio.bad).sum())}


def logits_attack(client: Any, d: int, W: np.ndarray, X_test: np.ndarray, truth: np.ndarray) -> dict:
    """Equation solving: rows [0; s e_j] answer b and the columns of W; the error after each query."""
    lanes, start = client.layout.lanes, time.perf_counter()
    Y = client.infer_states(np.vstack([np.zeros((1, d)), ARGS.scale * np.eye(d)]))
    seconds, queries, errors = time.perf_counter() - start, math.ceil((d + 1) / lanes), []
    for q in range(1, queries + 1):
        known, W_hat = min(q * lanes, d + 1) - 1, np.zeros_like(W)
        W_hat[:, :known] = (Y[1:known + 1] - Y[0]).T / ARGS.scale
        errors.append(float(np.linalg.norm(W_hat - W) / np.linalg.norm(W)))
    return {"queries": next((q for q, e in enumerate(errors, 1) if e <= ARGS.target), None), "sent": queries,
            "error": errors[-1], "seconds_per_query": seconds / queries,
            "agreement": float(np.mean(np.argmax(X_test @ W_hat.T + Y[0], axis=1) == truth))}


def main() -> None:
    from encrypted import ArgmaxKeys
    from serve.client import Client
    from serve.harness import ServerThread
    from serve.server import create_app

    started = time.perf_counter()
    X, y, described = load_data(Path(ARGS.states) if ARGS.states else default_states())
    (n, d), k = X.shape, int(y.max()) + 1
    order = np.random.default_rng(1).permutation(n)
    train, test = order[:int(0.7 * n)], order[int(0.7 * n):]
    W, b = ridge_head(X[train], y[train], k)
    W32, b32 = W.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)  # as served
    truth = np.argmax(X[test] @ W32.T + b32, axis=1)
    print(f"data: {described}; d={d}, k={k}; head fitted on {len(train)} rows ({len(test)} held out, plaintext "
          f"accuracy {np.mean(truth == y[test]):.3f})")
    with tempfile.TemporaryDirectory() as tmp:
        head, amap = write_folders(Path(tmp), W, b)
        with ServerThread(create_app(heads=[head], store="memory://"), max_lifetime_s=600) as srv, \
                Client(srv.url, head="bbc", aligner=amap, cache=False) as client:
            lanes, logits = client.layout.lanes, logits_attack(client, d, W32, X[test], truth)
        app = create_app(heads=[head], answers={"bbc": "label"}, store="memory://")
        served = app.state.service.heads["bbc"]
        with ServerThread(app, max_lifetime_s=ARGS.live_seconds + 600) as srv, \
                Client(srv.url, head="bbc", aligner=amap, cache=False,
                       argmax_keys=ArgmaxKeys.generate(ARGS.key_bits)) as client:
            oracle = Oracle(client, W32, b32, served.layer.flood_std, served.argmax.fraction_bits, ARGS.live_seconds)
            label = label_attack(oracle, X[train], X[test], W32, b32)
    trace = label.pop("trace")
    reached = next((t for t in trace if t["error"] <= ARGS.target), None)
    final, label_q = reached or trace[-1], reached and reached["queries"]
    none = {"queries": 0, "error": None, "agreement": None}
    day = ([t for t in trace if t["queries"] * lanes <= ARGS.budget] or [none])[-1]
    rows, answers = np.vstack(oracle.live_rows or [np.zeros((0, d))]), np.concatenate(oracle.live_labels or [[]])
    z = np.sort(rows @ W32.T + b32, axis=1)
    margin, wrong = z[:, -1] - z[:, -2], answers != np.argmax(rows @ W32.T + b32, axis=1)
    live_q, per_q = oracle.live_queries, oracle.live_seconds / max(oracle.live_queries, 1)

    def g(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3g}"

    at_live = ([t for t in trace if t["queries"] <= live_q] or [none])[-1]
    milestones = {f"{e:g}": next((t["queries"] for t in trace if t["error"] <= e), None) for e in (.3, .1, .03, .01)}
    ratio = label_q / logits["queries"] if label_q and logits["queries"] else None
    days = {"logits": logits["queries"] * lanes / ARGS.budget,
            "label": (label_q or oracle.queries) * lanes / ARGS.budget}
    print(f"logits mode: equation solving, {logits['sent']} queries of {lanes} rows "
          f"({logits['seconds_per_query']:.3f} s each): error {logits['error']:.1e} (<= {ARGS.target:g} after "
          f"{logits['queries']} queries), held-out label agreement {logits['agreement']:.4f}")
    print(f"label-only mode: decision-boundary search, {ARGS.key_bits}-bit argmax keys (they set the cost of a "
          f"query, not the queries an attack needs), flood noise std {served.layer.flood_std:.4f} per logit")
    print(f"  measured, live server: queries 1-{live_q} ({oracle.live_seconds:.0f} s, {per_q:.3f} s each); of its "
          f"{len(rows)} rows, {int(wrong.sum())} labels differ from the plaintext argmax, all at a top-2 margin <= "
          f"{float(margin[wrong].max()) if wrong.any() else 0:.4f} (differing at margin > 0.05: "
          f"{int((wrong & (margin > 0.05)).sum())} of {int((margin > 0.05).sum())}); the head stolen with them "
          f"(query {at_live['queries']}): error {g(at_live['error'])}, agreement {g(at_live['agreement'])}")
    print(f"  simulated, local plaintext oracle (served float32 head, its flood noise and fixed point): the other "
          f"{oracle.queries - live_q} queries; all live, the attack would take {oracle.queries * per_q / 60:.0f} min")
    print(f"  error <= {ARGS.target:g} (centred, up to scale) after {label_q} queries: error {final['error']:.2e}, "
          f"held-out agreement {final['agreement']:.4f}; {label['restarted_searches']} searches restarted, largest "
          f"probe logit {oracle.max_logit:.0f} (limit 2048); queries to reach error " +
          ", ".join(f"{e}: {q}" for e, q in milestones.items()))
    print(f"ratio label-only / logits queries: {label_q} / {logits['queries']} = "
          f"{'n/a' if ratio is None else f'{ratio:.1f}'}x (target >= 20x)")
    print(f"budget {ARGS.budget} rows a day: logits mode needs {days['logits']:.2f} days (in one day: error "
          f"{logits['error']:.1e}, agreement {logits['agreement']:.4f}); label-only needs {days['label']:.2f} days (in "
          f"one day: error {g(day['error'])}, agreement {g(day['agreement'])})")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(json.dumps({
        "logits_queries": logits["queries"], "label_queries": label_q, "ratio": ratio, "logits_error": logits["error"],
        "label_error": final["error"], "logits_agreement": logits["agreement"], "label_agreement": final["agreement"],
        "budget_rows_per_day": ARGS.budget, "logits_days": days["logits"], "label_days": days["label"],
        "logits_error_one_day": logits["error"], "logits_agreement_one_day": logits["agreement"],
        "label_error_one_day": day["error"], "label_agreement_one_day": day["agreement"], "d": d, "k": k,
        "lanes": lanes, "data": described, "target": ARGS.target, "key_bits": ARGS.key_bits,
        "label_measured": {"queries": live_q, "by": "the live label-only server", "seconds_per_query": per_q,
                           "rows": len(rows), "rows_differing": int(wrong.sum()), "rows_differing_margin_gt_0.05":
                           int((wrong & (margin > 0.05)).sum()), "error_then": at_live["error"],
                           "agreement_then": at_live["agreement"]},
        "label_simulated": {"queries": oracle.queries - live_q, "by": "the served head in plaintext, flood noise "
                            "and fixed point as served (the rest of the same attack)"},
        "logits_seconds_per_query": logits["seconds_per_query"], "scale": ARGS.scale,
        "max_probe_logit": oracle.max_logit, "label_queries_to_error": milestones,
        **label}))


if __name__ == "__main__":
    main()
