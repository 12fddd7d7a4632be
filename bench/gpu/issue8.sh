#!/bin/bash
# The GPU machine's run for the continuous-batching issue, in one command:
#   bash bench/gpu/issue8.sh     (from the repository root; .carry8/ holds the llama.cpp kit,
#                                 its unpack script, tok.gguf and the wheels: see
#                                 bench/gpu/random_model.py)
# Makes a random-weight Mistral-7B-shaped Q4_K_M model, then runs llama-batched-bench (the
# engine's ceiling) and bench/generation.py (this engine, sequential calls, llama-server).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
pip install -q --no-index --no-deps --target /tmp/site .carry8/*.whl 2>> "$LOG"
eval "$(bash .carry8/gpu-llama-unpack.sh .carry8)"
export PYTHONPATH=$PWD:$PWD/bench:/tmp/site:$PYTHONPATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; } > "$OUT/gpu.txt"
t0=$(date +%s)
python3 bench/gpu/random_model.py mistral7b .carry8/tok.gguf /tmp/m7b-f16.gguf >> "$LOG" 2>&1
"$LLAMA_BIN/llama-quantize" /tmp/m7b-f16.gguf /tmp/m7b.gguf Q4_K_M 16 > /dev/null 2>> "$LOG"
rm -f /tmp/m7b-f16.gguf
echo "model made in $(( $(date +%s) - t0 )) s; $(ls -la /tmp/m7b.gguf)" | tee -a "$LOG"
timeout 150 "$LLAMA_BIN/llama-batched-bench" -m /tmp/m7b.gguf -c 90000 -b 2048 -ub 512 \
    -npp 1000 -ntg 128 -npl 1,4,16,32,64 -ngl 99 -fa on > "$OUT/batched.txt" 2>> "$LOG"
grep "^|" "$OUT/batched.txt"
timeout ${GEN_TIMEOUT:-330} python3 -X faulthandler bench/generation.py --model /tmp/m7b.gguf --n-gpu-layers -1 \
    --concurrency ${LEVELS:-1,4,16,32,64} --max-tokens 128 --contexts 4 --context-words 200 \
    --n-ctx 2048 --kv ${KV:-split} --sequential-max 32 --llama-server "$LLAMA_BIN/llama-server" \
    --json "$OUT/generation.json" > "$OUT/generation.md" 2>> "$LOG"
cat "$OUT/generation.md"
grep -B2 -A25 "Fatal Python error" "$LOG" | head -60
tail -5 "$LOG"
true
