#!/bin/bash
# The GPU machine's run for the retrieval issue, in one command (see ../shared/GPU.md):
#   bash bench/gpu/issue7.sh [tests] [probe] [fused] [retrieval] [load] [pgvector] [restart]
#       [embed]
#   (default: the first five)
# from the repository root, with $CARRY (default .carry/) holding the pg15 kit and the cp312
# wheels (psycopg, pgvector; in whl/ or at its top, as sql_path.sh's .carry10/); embed also
# needs the llama core kit, gpu-llama-unpack.sh and emb.skel there (as sql_path.sh).
# Results go to $OUT (at most 8 files come back: logs are appended to one file).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
steps=${*:-tests probe retrieval load pgvector}
C=${CARRY:-.carry}
pip install -q --no-index --no-deps --target /tmp/site $(ls $C/whl/*.whl $C/*.whl 2>/dev/null) \
    2>/dev/null
export PYTHONPATH=$PWD:$PWD/bench:/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; \
  git log -1 --format=%H 2>/dev/null; } > "$OUT/gpu.txt"
LOG="$OUT/logs.txt"
pg_up() {
    [ -d /tmp/pgdata ] && return
    tar -C / -xJf $C/pg15-kit.tar.xz
    id pguser >/dev/null 2>&1 || useradd -m pguser
    su pguser -c "/opt/pg15/bin/initdb -D /tmp/pgdata -U pguser >/dev/null && \
      /opt/pg15/bin/pg_ctl -D /tmp/pgdata -l /tmp/pg.log -w -o \"-p 5433 -k /tmp \
      -c shared_buffers=16GB -c max_worker_processes=32 -c max_parallel_workers=16 \
      -c max_parallel_maintenance_workers=15 -c max_connections=100\" start >/dev/null"
}
DSN="host=/tmp port=5433 user=pguser dbname=postgres"
for step in $steps; do
    echo "== $step" >> "$LOG"
    case $step in
    tests) timeout 300 python3 -m pytest tests/test_store.py -q --noconftest \
               -p no:cacheprovider -o addopts="" --tb=short > "$OUT/tests.txt" 2>&1
           tail -3 "$OUT/tests.txt" ;;
    probe) timeout 120 python3 bench/gpu/probe_small.py > "$OUT/probe.txt" 2>> "$LOG"
           cat "$OUT/probe.txt" ;;
    fused) timeout 300 python3 bench/gpu/probe_fused.py ${FUSED_ARGS:-} > "$OUT/fused.txt" \
               2>> "$LOG"
           cat "$OUT/fused.txt" ;;
    retrieval) timeout 300 python3 bench/retrieval.py ${RETRIEVAL_ARGS:-} --json "$OUT/retrieval.json" \
                   > "$OUT/retrieval.md" 2>> "$LOG"
               cat "$OUT/retrieval.md" ;;
    load) pg_up
          timeout 200 python3 bench/load.py --dsn "$DSN" --fill \
              --connections "${LOAD_CONNECTIONS:-1,8,16,32}" \
              > "$OUT/load.md" 2>> "$LOG"
          cat "$OUT/load.md" ;;
    restart) timeout 200 python3 bench/gpu/probe_fresh_restart.py > "$OUT/restart.md" 2>> "$LOG"
             cat "$OUT/restart.md" ;;
    embed) eval "$(bash $C/gpu-llama-unpack.sh $C)"
           export PYTHONPATH=$PWD:$PWD/bench:/tmp/site:$PYTHONPATH
           python3 bench/gpu/random_model.py fill $C/emb.skel /tmp/emb.gguf >> "$LOG" 2>&1
           timeout 200 python3 bench/probe_embed_threads.py --model /tmp/emb.gguf \
               --gpu-layers -1 --threads 0 --batches 1,8,16 --store-rows 1000000 \
               > "$OUT/embed.md" 2>> "$LOG"
           cat "$OUT/embed.md" ;;
    pgvector) pg_up
              timeout 240 python3 bench/pgvector_peer.py --dsn "$DSN" \
                  --json "$OUT/pgvector.json" > "$OUT/pgvector.md" 2>> "$LOG"
              cat "$OUT/pgvector.md" ;;
    esac
done
[ -f /tmp/pg.log ] && tail -c 2000 /tmp/pg.log >> "$LOG"
true
