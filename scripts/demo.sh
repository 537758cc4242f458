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

stage "3. fit SmolLM2 -> Gemma-3 on the public set, classifiers on BBC, evaluation table"
# The public set: half dialog, half BBC *training* texts (labels dropped); BBC's val/test never enter it.
PUBLIC=$(xsilo public-set build --config configs/public/bbc.yaml --threads "$THREADS" | tail -1)
xsilo evaluate --source smollm2 --target gemma3 --task bbc --public "$PUBLIC" \
  --public_limit 4000 --standardize true --threads "$THREADS" --out "$RUN/bbc"

stage "4. export: map and head fused into one linear layer"
xsilo export --aligner "$RUN/bbc/aligner.ckpt" --classifier "$RUN/bbc/classifier-target.ckpt" \
  --metrics "$RUN/bbc/metrics.json" --out "$RUN/export" --overwrite true
python - "$RUN/export" <<'PY'
import sys
import numpy as np
import onnxruntime as ort
from lightning_modules.export import load_export
fused = load_export(sys.argv[1])
x = np.random.default_rng(0).standard_normal((4, fused.input_dim)).astype(np.float32)
onnx_out = ort.InferenceSession(f"{sys.argv[1]}/fused.onnx").run(None, {"hidden": x})[0]
print(f"export: {fused.input_dim} -> {fused.output_dim} ({', '.join(fused.manifest['label_names'])}); "
      f"onnxruntime vs numpy max |diff| = {np.abs(onnx_out - fused(x)).max():.2e}")
PY

stage "5. encrypted serving: 100 BBC test queries from SmolLM2, answered under CKKS"
PORT=${PORT:-8765}
xsilo serve --export "$RUN/export" --port "$PORT" --log_level warning > "$RUN/serve.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
python -m serve.demo_check --url "http://127.0.0.1:$PORT" --export "$RUN/export" --data bbc --n 100 --threads "$THREADS" \
  --out "$RUN/serve.json"
xsilo query --server "http://127.0.0.1:$PORT" --text "Shares in the bank rose after record profits" --threads "$THREADS"
kill $SERVER_PID && wait $SERVER_PID 2>/dev/null || true
trap - EXIT

stage "6. OOD detection: VADER movies in-distribution; tweets, NYT, Amazon reviews, TREC out"
VADER_PUBLIC=$(xsilo public-set build --config configs/public/vader-movies.yaml --threads "$THREADS" | tail -1)
xsilo evaluate_ood --source smollm2 --target gemma3 --task vader-movies --task_limit 3000 \
  --ood "[vader-tweets,vader-nyt,vader-amazon,trec]" --ood_limit "${OOD_ROWS:-500}" \
  --public "$VADER_PUBLIC" --public_limit 4000 --standardize true --threads "$THREADS" --out "$RUN/ood"
xsilo export --aligner "$RUN/ood/aligner.ckpt" --classifier "$RUN/ood/classifier-target.ckpt" \
  --ood "$RUN/ood/ood-threshold.json" --out "$RUN/export-ood" --overwrite true
python - "$RUN/export-ood" <<'PY'
import sys
from datamodules.extraction import StateEncoder
from lightning_modules.export import load_export
from lightning_modules.ood_client import ood_from_logits
fused = load_export(sys.argv[1])
src, ood = fused.manifest["source"], fused.manifest["ood"]
encode = StateEncoder(src["model"], pooling=src["pooling"], layer=src["layer"], max_length=src["max_length"], threads=1)
texts = ["A gorgeous, witty, seductive movie.", "The plot is a mess and the acting is even worse.",
         "What is the capital of Australia ?", "The city council approved the new budget on Tuesday."]
scores, flags = ood_from_logits(fused(encode(texts)), ood)
print(f"client-side OOD check on logits: {ood['detector']} > {ood['threshold']:.3f} (keeps {ood['tpr']:.0%} of ID validation)")
for text, score, flag in zip(texts, scores, flags):
    print(f"  {'OOD' if flag else 'in '}  {score:+.3f}  {text}")
PY

stage "7. cross-model generation: a map on paired token positions, the target's LM head writes"
GEN_PUBLIC=${GEN_PUBLIC:-movie-dialog:1200+bbc:200}
PROMPTS='["The capital of France is", "Once upon a time, a little girl", "My favourite food is"]'
for pair in "smollm2 gemma3" "gemma3 smollm2"; do
  set -- $pair
  xsilo evaluate_generation --source $1 --target $2 --public "$GEN_PUBLIC" --max_length 64 \
    --prompts "$PROMPTS" --threads "$THREADS" --out "$RUN/generation/$1-$2"
  xsilo generate --source $1 --target $2 --aligner "$RUN/generation/$1-$2" --max_new_tokens 24 \
    --compare true --threads "$THREADS" "Once upon a time, a little girl"
done

stage "8. report: plots and every figure above, each traced to its JSON file and key"
xsilo report --run "$RUN"
