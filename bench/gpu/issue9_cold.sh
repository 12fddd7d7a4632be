#!/bin/bash
# The GPU machine's run for the LoRA cold-cache bar, in one command (from the repository
# root): bench/lora_cold.py against PostgreSQL 15 (the kit) on a SmolLM2-135M-shaped and a
# Mistral-7B-shaped random-weight model.  .carry9/ holds the llama core + tools kits,
# gpu-llama-unpack.sh, tok.gguf (bench/gpu/random_model.py), the pg15 kit and the psycopg,
# gguf and diskcache wheels.  The schema is the revisions' SQL files in order (the GPU
# machine has no Alembic; the adapter tables are what the fetch reads).  Env: SEVEN_B=0
# skips the 7B model, TRIALS (default 5).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
C=.carry9
pip install -q --no-index --no-deps --target /tmp/site $C/*.whl 2>> "$LOG"
eval "$(bash $C/gpu-llama-unpack.sh $C)"
export PYTHONPATH=$PWD:$PWD/bench:/tmp/site:$PYTHONPATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; date -u; } \
  > "$OUT/gpu.txt"
tar -C / -xJf $C/pg15-kit.tar.xz
id pguser > /dev/null 2>&1 || useradd -m pguser
su pguser -c "/opt/pg15/bin/initdb -D /tmp/pgdata -U pguser > /dev/null && \
  /opt/pg15/bin/pg_ctl -D /tmp/pgdata -l /tmp/pg.log -w -o '-p 5433 -k /tmp' start > /dev/null"
DSN="host=/tmp port=5433 user=pguser dbname=postgres"
for f in sql/schema_000?.sql; do
  /opt/pg15/bin/psql -q -v ON_ERROR_STOP=1 "$DSN" -f "$f" >> "$LOG" 2>&1 || echo "schema $f failed"
done
cold() {  # model file, output name, timeout
  timeout "$3" python3 -X faulthandler bench/lora_cold.py --dsn "$DSN" --model "$1" \
    --n-gpu-layers -1 --trials "${TRIALS:-5}" --json "$OUT/$2.json" > "$OUT/$2.md" 2>> "$LOG"
  cat "$OUT/$2.md"
}
python3 bench/gpu/random_model.py smollm135m $C/tok.gguf /tmp/s135-f16.gguf >> "$LOG" 2>&1
"$LLAMA_BIN/llama-quantize" /tmp/s135-f16.gguf /tmp/s135.gguf Q4_1 16 > /dev/null 2>> "$LOG"
cold /tmp/s135.gguf cold-s135 "${SMALL_TIMEOUT:-120}"
if [ "${SEVEN_B:-1}" = 1 ] && [ -s "$OUT/cold-s135.json" ]; then
  python3 bench/gpu/random_model.py mistral7b $C/tok.gguf /tmp/m7b-f16.gguf >> "$LOG" 2>&1
  "$LLAMA_BIN/llama-quantize" /tmp/m7b-f16.gguf /tmp/m7b.gguf Q4_K_M 16 > /dev/null 2>> "$LOG"
  rm -f /tmp/m7b-f16.gguf
  cold /tmp/m7b.gguf cold-7b "${GEN_TIMEOUT:-200}"
fi
grep -B2 -A25 "Fatal Python error\|Traceback" "$LOG" | head -60
tail -c 1500 /tmp/pg.log >> "$LOG"
tail -3 "$LOG"
true
