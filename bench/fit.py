"""Streaming ridge fit (SufficientStats + closed-form solve) vs numpy normal equations vs sklearn Ridge.

    .venv/bin/python bench/fit.py                 # 100k x 1024 -> 1024, 2 threads
    .venv/bin/python bench/fit.py --rows 20000    # quick run

Every contender gets the same float64 arrays and the same thread count (torch.set_num_threads,
threadpoolctl and the *_NUM_THREADS env vars). Rounds are interleaved and the best of `--repeats`
is kept, so load from other processes hurts all contenders alike. Ends with one JSON line.
Targets: streaming fit <= 1.2x numpy; streaming + 10-λ path <= 1.5x one streaming fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dx", type=int, default=1024)
    p.add_argument("--dy", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lam", type=float, default=1e-3, help="relative λ (see lightning_modules.fitting.solvers)")
    p.add_argument("--path", type=int, default=10, help="number of λ in the path")
    p.add_argument("--no-sklearn", action="store_true")
    return p.parse_args()


ARGS = parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_modules.fitting.estimators import fit_ridge, ridge_path, sklearn_alpha
from lightning_modules.fitting.stats import SufficientStats  # noqa: E402


def stream(x: np.ndarray, y: np.ndarray, batch: int, full_yty: bool) -> SufficientStats:
    st = SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=full_yty)
    for s in range(0, len(x), batch):
        st.update(torch.from_numpy(x[s:s + batch]), torch.from_numpy(y[s:s + batch]))
    return st


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    a = ARGS
    torch.set_num_threads(a.threads)
    with threadpool_limits(limits=a.threads):
        g = torch.Generator().manual_seed(0)
        x_t = torch.randn(a.rows, a.dx, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, a.dx, dtype=torch.float64)
        w_true = torch.randn(a.dy, a.dx, generator=g, dtype=torch.float64) / a.dx ** 0.5
        y_t = torch.addmm(torch.randn(a.rows, a.dy, generator=g, dtype=torch.float64), x_t, w_true.T)
        x, y = x_t.numpy(), y_t.numpy()
        stream(x[:64], y[:64], a.batch, True)  # warm-up (first-call allocations, thread pools)
        # numpy's absolute λ: the sklearn-equivalent alpha from a 2048-row sample (only its size matters)
        alpha = sklearn_alpha(stream(x[:2048], y[:2048], a.batch, False), a.lam) * a.rows / 2048
        lams = [float(v) for v in np.logspace(-6, 2, a.path)]

        def numpy_fit():
            xtx = x.T @ x  # numpy uses SYRK for XᵀX
            xtx[np.diag_indices_from(xtx)] += alpha
            return np.linalg.solve(xtx, x.T @ y)

        runs: dict[str, list[float]] = {}
        keep = lambda k, v: runs.setdefault(k, []).append(v)  # noqa: E731
        for _ in range(a.repeats):
            keep("numpy", timed(numpy_fit)[0])
            t_upd, st = timed(lambda: stream(x, y, a.batch, True))
            t_fit, amap = timed(lambda: fit_ridge(st, a.lam))
            t_path, path = timed(lambda: ridge_path(st, lams))
            keep("update_full", t_upd)
            keep("solve", t_fit)
            keep("path_solve", t_path)
            keep("update_diag", timed(lambda: stream(x, y, a.batch, False))[0])
            if not a.no_sklearn:
                from sklearn.linear_model import Ridge
                t_sk, sk = timed(lambda: Ridge(alpha=sklearn_alpha(st, a.lam)).fit(x, y))
                keep("sklearn", t_sk)

        err_sk = float(np.abs(amap.weight.numpy() - sk.coef_).max()) if not a.no_sklearn else None
        err_path = float((path[0].weight - fit_ridge(st, lams[0]).weight).abs().max())

    b = {k: min(v) for k, v in runs.items()}
    med = {k: float(np.median(v)) for k, v in runs.items()}
    rows = [
        ("numpy solve(XᵀX+λI, XᵀY)", b["numpy"]),
        ("stream fit, full yty", b["update_full"] + b["solve"]),
        ("stream fit, diag yty", b["update_diag"] + b["solve"]),
        (f"stream + {a.path}-λ path, full yty", b["update_full"] + b["path_solve"]),
        (f"stream + {a.path}-λ path, diag yty", b["update_diag"] + b["path_solve"]),
    ]
    if "sklearn" in b:
        rows.append(("sklearn Ridge (cholesky)", b["sklearn"]))
    print(f"rows={a.rows} d_x={a.dx} d_y={a.dy} batch={a.batch} threads={a.threads} "
          f"repeats={a.repeats} (best of) torch={torch.__version__} numpy={np.__version__}")
    print(f"{'contender':38s} {'best s':>8s} {'x numpy':>8s}")
    for name, sec in rows:
        print(f"{name:38s} {sec:8.3f} {sec / b['numpy']:8.2f}")
    print("  medians: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()))
    print(f"  breakdown: update full {b['update_full']:.3f}s, update diag {b['update_diag']:.3f}s, "
          f"cholesky solve {b['solve']:.3f}s, eigh + {a.path}-λ path solve {b['path_solve']:.3f}s")
    fit_full, fit_diag = rows[1][1], rows[2][1]
    figures = {
        "rows": a.rows, "d_x": a.dx, "d_y": a.dy, "batch": a.batch, "threads": a.threads,
        "numpy_s": round(b["numpy"], 4), "sklearn_s": round(b["sklearn"], 4) if "sklearn" in b else None,
        "update_full_s": round(b["update_full"], 4), "update_diag_s": round(b["update_diag"], 4),
        "solve_s": round(b["solve"], 4), "path_solve_s": round(b["path_solve"], 4),
        "fit_full_vs_numpy": round(fit_full / b["numpy"], 3),
        "fit_diag_vs_numpy": round(fit_diag / b["numpy"], 3),
        "path_vs_fit_full": round(rows[3][1] / fit_full, 3),
        "path_vs_fit_diag": round(rows[4][1] / fit_diag, 3),
        "path_solve_vs_solve": round(b["path_solve"] / b["solve"], 2),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "max_abs_diff_vs_sklearn": err_sk, "max_abs_diff_path_vs_single": err_path,
    }
    for key, target in (("fit_full_vs_numpy", 1.2), ("fit_diag_vs_numpy", 1.2),
                        ("path_vs_fit_full", 1.5), ("path_vs_fit_diag", 1.5)):
        print(f"  target {key} <= {target}: {'met' if figures[key] <= target else 'MISSED'} ({figures[key]})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
