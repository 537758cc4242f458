"""Several extractions in one process (the OOD stage: 4 sets × 2 models): each model loaded once
(`loaded_model`) vs loaded again for every extraction, as before. Same jobs, fresh caches.

    python bench/extract_many.py --rows 100 --threads 2

Rounds alternate (reload, reuse, reload, reuse, ...) and the best of `--repeats` is kept, so load
from other processes hurts both alike. Prints the ratio reuse / reload and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gemma3", "smollm2"])
    ap.add_argument("--sets", nargs="+", default=["vader-tweets", "vader-nyt", "vader-amazon", "trec"])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from datamodules.encoder import clear_loaded_models
    from datamodules.extraction import ExtractionConfig, extract

    jobs = [ExtractionConfig(model=m, data=d, limit=args.rows, max_length=args.max_length)
            for d in args.sets for m in args.models]

    def run(reuse: bool) -> float:
        clear_loaded_models()
        with tempfile.TemporaryDirectory(prefix="xsilo-bench-") as root:
            t0 = time.perf_counter()
            for cfg in jobs:
                if not reuse:
                    clear_loaded_models()
                result = extract(cfg, cache_root=root, threads=args.threads, progress=False)
                assert not result.hit
            return time.perf_counter() - t0

    best = {"reload": float("inf"), "reuse": float("inf")}
    for _ in range(args.repeats):
        for name in best:
            best[name] = min(best[name], run(name == "reuse"))
    clear_loaded_models()
    ratio = best["reuse"] / best["reload"]
    print(f"{len(jobs)} extractions of {args.rows} rows: reload each time {best['reload']:.1f} s, "
          f"reuse loaded models {best['reuse']:.1f} s, ratio {ratio:.2f}")
    print(json.dumps({"bench": "extract_many", "jobs": len(jobs), "rows": args.rows,
                      "reload_s": round(best["reload"], 2), "reuse_s": round(best["reuse"], 2),
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
