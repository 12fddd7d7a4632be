#!/bin/bash
# GPU machine: where does the batch engine crash?  bash bench/gpu/probe_engine.sh (.carry8/ as issue8.sh)
set -u; L=$OUT/log.txt
pip install -q --no-index --no-deps --target /tmp/site .carry8/*.whl >/dev/null 2>&1
eval "$(bash .carry8/gpu-llama-unpack.sh .carry8)"
export PYTHONPATH=$PWD:$PWD/bench:/tmp/site:$PYTHONPATH
python3 bench/gpu/random_model.py tiny .carry8/tok.gguf /tmp/tiny.gguf >/dev/null 2>&1
python3 -c "import numpy; print(numpy.__version__, numpy.__file__)" >>$L 2>&1
t() { echo "=== $1" >>$L; timeout 60 python3 -X faulthandler -c "$2" >>$L 2>&1; echo "rc=$?" >>$L; }
t "A numpy first" "import numpy; from llama_cpp import Llama; Llama('/tmp/tiny.gguf', n_gpu_layers=-1, n_ctx=512, verbose=True); print('ok')"
t "B generator" "import themis_pg.generation.llama as m; from pathlib import Path; m.LlamaGenerator(Path('/tmp/tiny.gguf'), 't', n_ctx=512); print('ok')"
t "C llama first" "import llama_cpp; import themis_pg.generation.llama as m; from pathlib import Path; m.LlamaGenerator(Path('/tmp/tiny.gguf'), 't', n_ctx=512); print('ok')"
t "D args" "from llama_cpp import Llama; Llama('/tmp/tiny.gguf', n_threads=None, n_batch=512, seed=42, n_gpu_layers=-1, n_ctx=512, verbose=True); print('ok')"
for f in "" 1; do echo "=== probe first=$f" >>$L
PROBE_LLAMA_FIRST=$f PROBE_CRASH_LOG=$OUT/crash$f.txt timeout 120 python3 bench/gpu/probe_engine.py /tmp/tiny.gguf split -1 >>$L 2>&1; echo "rc=$?" >>$L; done
grep -v "^llama_\|^load\|^print_info\|^graph_\|^sched\|^\.\|^llm_load\|^create_tensor\|^ggml_\|^CUDA Graph\|^~llama" $L | tail -c 9000; echo ----; cat $OUT/crash*.txt
