#!/bin/bash
# The whole SQL path on the GPU machine, in one command (from the repository root):
# PostgreSQL 15 (the kit) with the schema and the function set, a random-weight embedding
# model of all-MiniLM-L6-v2's shape (bench/gpu/random_model.py fill), ROWS documents
# (bench/sql_search.py --fill), a `themis worker --kinds search,embed` on the GPU, then
# bench/sql_search.py --measure (themis_search at 1 and 16 clients, the 1% filter, a
# 1,000-row change, pgvector HNSW from the same clients).  .carry10/ holds the llama core
# kit, gpu-llama-unpack.sh, the pg15 kit, emb.skel and the wheels (psycopg, gguf, diskcache,
# pydantic and pydantic-settings with their dependencies, pgvector).  The GPU machine has no
# Alembic: the schema is the revisions' SQL files in order, then sql/api/ (what `themis
# migrate` applies).  LOCAL=1 rehearses it here (PG_BIN, no kits).  Env: ROWS (1000000),
# PGCONF (server settings), CALLS (200), VARIANTS (worker settings to compare, e.g.
# "- THEMIS_N_THREADS=1"), PROBE=1 (bench/probe_embed_threads.py first).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
: > "$LOG"
C=${CARRY:-.carry10}
source bench/gpu/pg_setup.sh
python3 bench/gpu/random_model.py fill $C/emb.skel /tmp/emb.gguf >> "$LOG" 2>&1
timeout 200 python3 bench/sql_search.py --dsn "$DSN" --fill "${ROWS:-1000000}" \
  --embedding-model /tmp/emb.gguf >> "$LOG" 2>&1
if [ -n "${PROBE:-}" ]; then  # one query's embedding by thread count and calling thread
  timeout 120 python3 bench/probe_embed_threads.py --model /tmp/emb.gguf --gpu-layers -1 \
    --threads "${PROBE_THREADS:-0,1,2,4}" --batches "${PROBE_BATCHES:-}" > "$OUT/probe_embed.md" \
    2>> "$LOG"
  cat "$OUT/probe_embed.md"
fi
# VARIANTS: worker settings to compare on the same rows ("-" is the default; words are
# space-separated, commas inside one separate its env assignments); the last also runs pgvector.
set -- ${VARIANTS:--}
i=0
for v in "$@"; do
  i=$((i + 1)); only=--themis-only; [ $i -eq $# ] && only=
  env_v=(); [ "$v" != "-" ] && IFS=, read -ra env_v <<< "$v"
  echo "== worker settings: $v" | tee -a "$OUT/sql.md"
  env THEMIS_INDEX_SNAPSHOTS=false THEMIS_MODEL_CACHE=/tmp/models \
    THEMIS_EMBEDDING_MODEL=bench-embedding "${env_v[@]}" timeout 500 \
    python3 -m themis_pg.cli --dsn "$DSN" worker --kinds search,embed > "$OUT/worker$i.log" 2>&1 &
  W=$!
  for _ in $(seq 240); do grep -q " ready " "$OUT/worker$i.log" && break; kill -0 $W 2> /dev/null || break; sleep 0.5; done
  timeout 300 python3 bench/sql_search.py --dsn "$DSN" --measure --calls "${CALLS:-200}" $only \
    --json "$OUT/sql$i.json" >> "$OUT/sql.md" 2>> "$LOG"
  kill $W; wait $W 2>/dev/null
  grep -i "loaded\|rows/s\|ready\|error" "$OUT/worker$i.log" | head -8
done
grep -v '^ \|^{\|^}' "$OUT/sql.md"
su pguser -c "$PG/pg_ctl -D $D/data -m fast stop" > /dev/null
grep -B2 -A25 "Fatal Python error\|Traceback" "$LOG" "$OUT"/worker*.log | head -60
tail -c 1500 "$D/pg.log" >> "$LOG"
tail -3 "$LOG"
true
