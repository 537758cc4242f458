#!/usr/bin/env bash
# The whole pipeline on real models and data: `make demo` runs this inside .venv.
# Client A runs SmolLM2, server B runs Gemma-3; the public set is movie dialog.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN=${RUN:-runs/demo}
PUBLIC_ROWS=${PUBLIC_ROWS:-4000}
THREADS=${THREADS:-2}
mkdir -p "$RUN"

stage() { printf '\n=== %s ===\n' "$*"; }

stage "1. assets"
xsilo assets prepare
xsilo assets list

stage "2. hidden-state cache"
for model in smollm2 gemma3; do
  xsilo extract --model $model --data movie-dialog --limit "$PUBLIC_ROWS" --threads "$THREADS"
  xsilo extract --model $model --data bbc --threads "$THREADS"
done
python - <<'PY'
from datamodules.extraction import ExtractionConfig, resolve
from datamodules.cache import StateCache
import os
rows = int(os.environ.get("PUBLIC_ROWS", 4000))
for model in ("smollm2", "gemma3"):
    for data, limit in (("movie-dialog", rows), ("bbc", None)):
        cache = StateCache(resolve(ExtractionConfig(model=model, data=data, limit=limit)).directory)
        print(f"{model:8s} {data:13s} states {cache.n_rows} x {cache.dim}  pooling={cache.manifest['pooling']}  {cache.path}")
PY
