#!/usr/bin/env bash
# One prepared GPU check of serving (the lent machine has torch + transformers; the
# server's pure-Python dependencies come from .gpu/wheels, see ../shared/bench/README.md):
# bench/serve_throughput.py on a random-init 125m export, concurrency 1, 8, 32, the
# server as shipped (engine process, CUDA graphs), side by side with HF `generate` in
# the same run. The table's batch / step ms columns say whether requests were decoded
# together and how long one decode step took. First bench/decode_step.py: the engine
# alone at batch 1/8/32, eager vs CUDA graphs (and whether the graphs gave the same
# tokens), and a decode step's masked attention per SDPA backend.
# Expects .gpu/wheels/ and .gpu/tokens/tokenizer (git-ignored: carry ".gpu" to the device).
# Usage: bash bench/serve_gpu.sh  (give the device call a 600 s limit: the steps have 150 + 330 s timeouts)
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target "$HOME/gpu-site" .gpu/wheels/*.whl > "$OUT/pip.log" 2>&1 \
    || { tail "$OUT/pip.log"; exit 3; }
export PYTHONPATH="$HOME/gpu-site:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/serve_throughput.py --make-model 125m --tokenizer .gpu/tokens/tokenizer --model /tmp/bm 2>&1 | tail -1
timeout 150 python3 bench/decode_step.py --model /tmp/bm 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/decode_step.log"
timeout 330 python3 bench/serve_throughput.py --model /tmp/bm --concurrency 1,8,32 --requests 2 --prompt-tokens 128 \
    --new-tokens 128 2>&1 | grep -E '^\{|^ +[0-9]|^engine|concurrency' | tee "$OUT/serve.log"
