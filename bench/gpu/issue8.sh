#!/bin/bash
# The GPU machine's run for the continuous-batching issue, in one command:
#   CARRY=.carry11 bash bench/gpu/issue8.sh   (from the repository root; $CARRY holds the
#                 llama.cpp core and tools kits, their unpack script, tok.gguf and the wheels:
#                 see bench/gpu/random_model.py)
# Random-weight models of two real shapes (SmolLM2-135M Q4_1, Mistral-7B Q4_K_M); on each,
# bench/generation.py (this engine, sequential calls, llama-server).  PROFILE=1 first times
# the engine's steps against bare llama_decode (bench/gpu/profile_engine.sh); CEILING=1 runs
# llama-batched-bench on the 7B (the engine's ceiling); SHARED=1 (default) repeats the 7B run
# with a shared ~150-token head; SMALL=0 skips the 135M model.  Env: LEVELS, KV, SEQ_MAX,
# BATCHES (the engine's n_batch/n_ubatch pairs, e.g. 2048/512,4096/2048; the ceiling runs at
# each), *_TIMEOUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
C=${CARRY:-.carry8}
BATCHES=${BATCHES:-2048/2048}
pip install -q --no-index --no-deps --target /tmp/site $C/*.whl 2>> "$LOG"
eval "$(bash $C/gpu-llama-unpack.sh $C)"
export PYTHONPATH=$PWD:$PWD/bench:/tmp/site:$PYTHONPATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; } > "$OUT/gpu.txt"
gen() {  # model, output name, timeout, extra arguments
  timeout "$3" python3 -X faulthandler bench/generation.py --model "$1" --n-gpu-layers -1 ${4:-} \
    --concurrency "${LEVELS:-1,4,16,32,64}" --max-tokens 128 --contexts 4 --context-words 200 \
    --n-ctx 2048 --kv "${KV:-both}" --batches "$BATCHES" --sequential-max "${SEQ_MAX:-16}" \
    --llama-server "$LLAMA_BIN/llama-server" --json "$OUT/$2.json" > "$OUT/$2.md" 2>> "$LOG"
  cat "$OUT/$2.md"
}
python3 bench/gpu/random_model.py smollm135m $C/tok.gguf /tmp/s135-f16.gguf >> "$LOG" 2>&1
"$LLAMA_BIN/llama-quantize" /tmp/s135-f16.gguf /tmp/s135.gguf Q4_1 16 > /dev/null 2>> "$LOG"
if [ "${PROFILE:-0}" = 1 ]; then
  timeout 120 python3 bench/gpu/decode_floor.py /tmp/s135.gguf > "$OUT/floor.md" 2>> "$LOG"
  timeout 120 python3 bench/gpu/profile_engine.py /tmp/s135.gguf > "$OUT/profile.md" 2>> "$LOG"
  cat "$OUT/floor.md" "$OUT/profile.md"
fi
[ "${SMALL:-1}" = 1 ] && gen /tmp/s135.gguf generation-s135 "${SMALL_TIMEOUT:-150}"
t0=$(date +%s)
python3 bench/gpu/random_model.py mistral7b $C/tok.gguf /tmp/m7b-f16.gguf >> "$LOG" 2>&1
"$LLAMA_BIN/llama-quantize" /tmp/m7b-f16.gguf /tmp/m7b.gguf Q4_K_M 16 > /dev/null 2>> "$LOG"
rm -f /tmp/m7b-f16.gguf
echo "7B model made in $(( $(date +%s) - t0 )) s"
if [ "${CEILING:-0}" = 1 ]; then
  for pair in ${BATCHES//,/ }; do
    b=${pair%/*}; ub=${pair#*/}
    timeout 150 "$LLAMA_BIN/llama-batched-bench" -m /tmp/m7b.gguf -c 90000 -b "$b" -ub "$ub" \
      -npp 1000 -ntg 128 -npl "${LEVELS:-1,4,16,32,64}" -ngl 99 -fa on > "$OUT/batched-$b-$ub.txt" 2>> "$LOG"
    echo "batched-bench -b $b -ub $ub"; grep "^|" "$OUT/batched-$b-$ub.txt"
  done
fi
gen /tmp/m7b.gguf generation "${GEN_TIMEOUT:-300}"
# the same with a ~150-token head shared by every prompt (RAG instructions + a common document)
[ "${SHARED:-1}" = 1 ] && gen /tmp/m7b.gguf generation-shared "${SHARED_TIMEOUT:-200}" "--shared-words 100"
grep -B2 -A25 "Fatal Python error" "$LOG" | head -60
tail -3 "$LOG"
true
