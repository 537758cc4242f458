"""One forward pass for several views: cache several (pooling, layer) views of one dataset's states while running
the model once per text that no view's cache holds (the ablation's view factor, and any caller that wants
several views of the same texts). Rows already cached for the same texts are reused (`prefill_states`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch

from datamodules.cache import atomic_save_npy, atomic_write_bytes, ensure_writable, shard_name
from datamodules.encoder import DTYPES, load_tokenizer, pool
from datamodules.extraction import ExtractionConfig, cache_hit, finalise, resolve, shard_ranges
from datamodules.prefill import ExtractionBudgetError, cached_text_index, prefill_states
from datamodules.registry import xsilo_home
from serve.formats.views import StateView


def extract_views(model: str, data: str, views: Sequence[tuple[str | None, int]], *, limit: int | None = None,
                  text_column: str | None = None, label_column: str | None = "label",
                  max_length: int | None = StateView.max_length,
                  dtype: str = "float32", batch_size: int = 16, threads: int | None = None,
                  max_extract: int | None = None) -> int:
    """Cache several (pooling, layer) views of one dataset with ONE forward pass per text that no cache of a
    view holds; returns the number of texts run. Rows cached for the same texts are reused (`prefill_states`).

    The new rows go into ordinary caches of a dataset of those texts (under $XSILO_HOME/public/_extra/), and
    each view's cache is then assembled, so every DataModule finds it as a hit. Raises ExtractionBudgetError
    when more than `max_extract` texts would be run.
    """
    from transformers import AutoModel  # loaded only when some view misses texts

    configs = [ExtractionConfig(model=model, data=data, pooling=p, layer=layer, limit=limit, max_length=max_length,
                                dtype=dtype, batch_size=batch_size, text_column=text_column, label_column=label_column)
               for p, layer in views]
    todo, missing = [], {}
    for config in configs:
        job = resolve(config)
        if cache_hit(job.directory):
            continue
        index = cached_text_index(asdict(job.key), skip=job.directory)
        todo.append(config)
        missing.update(dict.fromkeys(t for t in job.texts if t not in index))
    texts = list(missing)
    if texts:
        if max_extract is not None and len(texts) > max_extract:
            raise ExtractionBudgetError(f"{len(texts)} texts of {data!r} need new {model} states for views "
                                        f"{[(c.pooling, c.layer) for c in todo]}; at most {max_extract} may be "
                                        "extracted", len(texts))
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
        extra = xsilo_home() / "public" / "_extra" / f"{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
        extra.parent.mkdir(parents=True, exist_ok=True)
        if not extra.is_file():
            atomic_write_bytes(extra, body)
        jobs = [resolve(dataclasses.replace(c, data=str(extra), limit=None, text_column=None, label_column=None))
                for c in todo]
        if threads:
            torch.set_num_threads(threads)
        tokenizer = load_tokenizer(jobs[0].model_path)
        encoder = AutoModel.from_pretrained(jobs[0].model_path, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        n_layers = encoder.config.get_text_config().num_hidden_layers
        out = [np.zeros((len(texts), job.hidden_size), np.float32) for job in jobs]
        order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                result = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 output_hidden_states=True)
                for array, job in zip(out, jobs):
                    final = job.config.layer in (-1, n_layers)  # as `pooled_states`: the final, normed layer
                    hidden = result.last_hidden_state if final else result.hidden_states[job.config.layer]
                    array[rows] = pool(hidden, enc["attention_mask"], job.pooling).float().numpy()
        for array, job in zip(out, jobs):
            ensure_writable(job.directory)
            shards = shard_ranges(len(texts), 2048)
            for i, (a, b) in enumerate(shards):
                atomic_save_npy(job.directory / shard_name(i), array[a:b])
            finalise(job, shards)
    for config in todo:
        prefill_states(config, max_extract=0)
    return len(texts)
