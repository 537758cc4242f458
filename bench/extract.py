"""Extraction speed: xsilo's Lightning predict loop vs a plain transformers loop, same batches.

    python bench/extract.py --model smollm2 --rows 256 --threads 2

Both contenders see the identical row batches (sorted by length within shards, as xsilo
forms them) and the same thread count. Rounds are interleaved and the best of `--repeats` is
kept, so load from other processes hurts both alike. Prints the ratio xsilo / plain
(target <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="movie-dialog")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    from transformers import AutoModel

    from datamodules.encoder import load_tokenizer, pool
    from datamodules.extraction import ExtractionConfig, HiddenStateExtractor, extract, resolve, shard_ranges

    cfg = ExtractionConfig(model=args.model, data=args.data, limit=args.rows, batch_size=args.batch_size,
                           max_length=args.max_length)
    job = resolve(cfg)
    shards = shard_ranges(len(job.texts), 2048)
    plan = HiddenStateExtractor(job.model_path, job.texts, shards, job.pooling, -1, args.max_length,
                                "float32", args.batch_size)
    batches = plan.batches(0, 1)

    # Plain loop: tokenizer + model + pooling, nothing else (model loaded once, outside the timer).
    tokenizer = load_tokenizer(job.model_path)
    model = AutoModel.from_pretrained(job.model_path).eval()

    def plain_loop() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for rows in batches:
                enc = tokenizer([job.texts[i] for i in rows], padding=True, truncation=True,
                                max_length=args.max_length, return_tensors="pt")
                out = model(**enc)
                pool(out.last_hidden_state, enc["attention_mask"], job.pooling).float().numpy()
        return time.perf_counter() - t0

    def xsilo_extract() -> float:
        with tempfile.TemporaryDirectory() as root:  # a fresh cache: every row is computed
            t0 = time.perf_counter()
            result = extract(cfg, cache_root=root, threads=args.threads, progress=False)
            assert result.n_rows == len(job.texts) and not result.hit
            return time.perf_counter() - t0  # includes model load, trainer start-up and shard writes

    plain_loop()  # warm-up
    plain, ours = float("inf"), float("inf")
    for _ in range(args.repeats):
        plain = min(plain, plain_loop())
        ours = min(ours, xsilo_extract())
    figures = {"model": args.model, "rows": args.rows, "batch_size": args.batch_size,
               "threads": args.threads, "repeats": args.repeats, "plain_s": round(plain, 3), "xsilo_s": round(ours, 3),
               "ratio": round(ours / plain, 3), "rows_per_s": round(args.rows / ours, 1)}
    print(f"plain transformers loop : {plain:7.2f} s")
    print(f"xsilo extract (Lightning): {ours:7.2f} s  (model load, trainer and atomic shard writes included)")
    print(f"ratio xsilo / plain      : {ours / plain:7.3f}  (target <= 1.1)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
