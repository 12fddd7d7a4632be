#!/bin/bash
# themis_rag through SQL on the GPU machine at 64 pgbench clients, against the same engine
# in-process, in one command (from the repository root; bench/sql_rag.py).  The setup is
# bench/gpu/pg_setup.sh's; then a random-weight Mistral-7B-shaped Q4_K_M model
# (random_model.py, llama-quantize), the random MiniLM-shaped embedding model, DOCS documents
# of 200 words, and a `themis worker` with THEMIS_MAX_SEQUENCES=64.  .carry11/ holds what
# .carry10/ does plus tok.gguf and the llama tools kit.  LOCAL=1 rehearses it here with
# GEN=<a generation GGUF> instead of the 7B.  Env: DOCS (2000), CLIENTS (64), CALLS (8),
# MAX_TOKENS (128), ENGINE_ARGS (e.g. --without-kept).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
: > "$LOG"
C=${CARRY:-.carry11}
source bench/gpu/pg_setup.sh
python3 bench/gpu/random_model.py fill $C/emb.skel /tmp/emb.gguf >> "$LOG" 2>&1
if [ -z "${GEN:-}" ]; then
  python3 bench/gpu/random_model.py mistral7b $C/tok.gguf /tmp/m7b-f16.gguf >> "$LOG" 2>&1
  "$LLAMA_BIN/llama-quantize" /tmp/m7b-f16.gguf /tmp/m7b.gguf Q4_K_M 16 > /dev/null 2>> "$LOG"
  rm -f /tmp/m7b-f16.gguf
  GEN=/tmp/m7b.gguf
fi
python3 - "$DSN" "$GEN" >> "$LOG" 2>&1 <<'PY'
import sys
from pathlib import Path
import psycopg
from themis_pg.models.registry import register_model
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    register_model(conn, "bench-gen", "generation", Path(sys.argv[2]), default=True)
PY
timeout 100 python3 bench/sql_search.py --dsn "$DSN" --fill 0 --embedding-model /tmp/emb.gguf \
  >> "$LOG" 2>&1
timeout 100 python3 bench/sql_rag.py --dsn "$DSN" --fill "${DOCS:-2000}" >> "$LOG" 2>&1
export THEMIS_INDEX_SNAPSHOTS=false THEMIS_MODEL_CACHE=/tmp/models \
  THEMIS_EMBEDDING_MODEL=bench-embedding THEMIS_GENERATION_MODEL=bench-gen \
  THEMIS_MAX_SEQUENCES=${CLIENTS:-64} THEMIS_N_CTX=2048
timeout 400 python3 -m themis_pg.cli --dsn "$DSN" worker > "$OUT/worker.log" 2>&1 &
W=$!
for _ in $(seq 360); do grep -q " ready " "$OUT/worker.log" && break; kill -0 $W 2> /dev/null || break; sleep 0.5; done
ARGS="--clients ${CLIENTS:-64} --calls ${CALLS:-8} --max-tokens ${MAX_TOKENS:-128}"
timeout 300 python3 bench/sql_rag.py --dsn "$DSN" --sql --pgbench "$PG/pgbench" $ARGS \
  --json "$OUT/sql_rag.jsonl" 2>> "$LOG"
kill $W; wait $W 2> /dev/null
timeout 300 python3 bench/sql_rag.py --dsn "$DSN" --engine --model "$GEN" $ARGS ${ENGINE_ARGS:-} \
  --json "$OUT/sql_rag.jsonl" 2>> "$LOG"
su pguser -c "$PG/pg_ctl -D $D/data -m fast stop" > /dev/null
grep -B2 -A25 "Fatal Python error\|Traceback" "$LOG" "$OUT/worker.log" | head -60
grep -A12 "pgbench:" "$LOG" | head -30
tail -c 1500 "$D/pg.log" >> "$LOG"
tail -3 "$LOG"
true
