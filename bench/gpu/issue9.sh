#!/bin/bash
# The GPU machine's run for the LoRA issue, in one command (from the repository root; .carry8/
# as bench/gpu/issue8.sh): bench/lora.py on a SmolLM2-135M-shaped and a Mistral-7B-shaped
# random-weight model, llama-server beside it.  Env: C (concurrency), SEVEN_B=0 skips the 7B.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
pip install -q --no-index --no-deps --target /tmp/site .carry8/*.whl 2>> "$LOG"
eval "$(bash .carry8/gpu-llama-unpack.sh .carry8)"
export PYTHONPATH=$PWD:$PWD/bench:/tmp/site:$PYTHONPATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; } > "$OUT/gpu.txt"
lora() {  # model, output name, timeout
  timeout "$3" python3 -X faulthandler bench/lora.py --model "$1" --n-gpu-layers -1 \
    --concurrency "${C:-32}" --max-tokens 128 --contexts 4 --context-words 200 \
    --llama-server "$LLAMA_BIN/llama-server" --json "$OUT/$2.json" > "$OUT/$2.md" 2>> "$LOG"
  cat "$OUT/$2.md"
}
python3 bench/gpu/random_model.py smollm135m .carry8/tok.gguf /tmp/s135-f16.gguf >> "$LOG" 2>&1
"$LLAMA_BIN/llama-quantize" /tmp/s135-f16.gguf /tmp/s135.gguf Q4_1 16 > /dev/null 2>> "$LOG"
lora /tmp/s135.gguf lora-s135 "${SMALL_TIMEOUT:-100}"
if [ "${SEVEN_B:-1}" = 1 ] && [ -s "$OUT/lora-s135.json" ]; then
  python3 bench/gpu/random_model.py mistral7b .carry8/tok.gguf /tmp/m7b-f16.gguf >> "$LOG" 2>&1
  "$LLAMA_BIN/llama-quantize" /tmp/m7b-f16.gguf /tmp/m7b.gguf Q4_K_M 16 > /dev/null 2>> "$LOG"
  rm -f /tmp/m7b-f16.gguf
  lora /tmp/m7b.gguf lora-7b "${GEN_TIMEOUT:-150}"
fi
grep -B2 -A25 "Fatal Python error\|Traceback" "$LOG" | head -60
tail -3 "$LOG"
true
