#!/bin/bash
# The GPU machine's run for the retrieval issue, in one command (see ../shared/GPU.md):
#   bash bench/gpu/issue7.sh        (from the repository root, with .carry/ holding the
#                                   pg15 kit and the psycopg cp312 wheels)
# Writes tests.txt, retrieval.md/json, load.md, pgvector.md/json and their logs to $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=$PWD:$PWD/bench:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
date -u >> "$OUT/gpu.txt"

timeout 150 python3 -m pytest tests/test_store.py -q --noconftest -p no:cacheprovider \
    -o addopts="" > "$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"

timeout 260 python3 bench/retrieval.py --json "$OUT/retrieval.json" \
    > "$OUT/retrieval.md" 2> "$OUT/retrieval.log"
cat "$OUT/retrieval.md"

tar -C / -xJf .carry/pg15-kit.tar.xz
id pguser >/dev/null 2>&1 || useradd -m pguser
su pguser -c "/opt/pg15/bin/initdb -D /tmp/pgdata -U pguser >/dev/null && \
  /opt/pg15/bin/pg_ctl -D /tmp/pgdata -l /tmp/pg.log -w -o \"-p 5433 -k /tmp \
  -c shared_buffers=16GB -c max_worker_processes=32 -c max_parallel_workers=16 \
  -c max_parallel_maintenance_workers=15 -c max_connections=100\" start >/dev/null"
DSN="host=/tmp port=5433 user=pguser dbname=postgres"
timeout 150 python3 bench/load.py --dsn "$DSN" --fill --connections 1,8,16,32 \
    > "$OUT/load.md" 2> "$OUT/load.log"
cat "$OUT/load.md"
timeout 240 python3 bench/pgvector_peer.py --dsn "$DSN" --json "$OUT/pgvector.json" \
    > "$OUT/pgvector.md" 2> "$OUT/pgvector.log"
cat "$OUT/pgvector.md"
tail -c 3000 /tmp/pg.log > "$OUT/pg.log"
