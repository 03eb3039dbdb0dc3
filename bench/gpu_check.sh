#!/usr/bin/env bash
# One prepared GPU session (the lent machine has torch + transformers, no ray/deepspeed):
#   1. ../shared/bench/gpu_anchor.py (HF Llama eager + compile) and our training step
#      (bench/train_step.py, DeepSpeed engine) on the same 124.7M config, same GPU, same run;
#   2. `zerolm train pretrain` end to end without Ray (bf16, eval, checkpoint, HF export)
#      on a small token folder, then transformers loads the export on the GPU.
# Expects, in git-ignored .gpu/: wheels/ (../shared/wheels/gpu), gpu_anchor.py, tokens/.
# Writes logs to $OUT. Usage: bash bench/gpu_check.sh [steps]
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS=${1:-20}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$HOME/gpu-site" \
    .gpu/wheels/*.whl .gpu/wheels/deepspeed-0.19.8.tar.gz > "$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 3; }
export PYTHONPATH="$HOME/gpu-site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARN

SHAPE="--vocab 32000 --seq 1024 --batch 32"
echo "== anchor: HF LlamaForCausalLM (gpu_anchor.py)"
python3 .gpu/gpu_anchor.py --dim 768 --layers 12 --heads 12 --kv-heads 4 --ffn 2048 $SHAPE --steps "$STEPS" \
    2>&1 | grep -v Warning | tee "$OUT/anchor.log"
echo "== ours: bench/train_step.py (DeepSpeed engine, same shapes)"
python3 bench/train_step.py --device cuda --preset 125m $SHAPE --steps "$STEPS" \
    --modes ours_eager,ours_compile,ours_compile@z0 2>&1 | grep -E '^\{|^mode|x$' | tee "$OUT/ours.log"

echo "== trainer end to end on GPU (no Ray)"
rm -rf /tmp/gpurun
timeout 300 python3 -m zerolm train pretrain --data .gpu/tokens --output /tmp/gpurun --preset 25m \
    --set scaling.launcher=local --set scaling.use_gpu=true --set max_steps=200 --set data.seq_len=512 \
    --set data.micro_batch_size=32 --set log_every=50 --set eval.every=100 --set checkpoint.every=100 \
    --set compile=true --set optim.lr=2e-3 2>&1 | grep -vE "^\[20|Warning|warn" | tail -20 | tee "$OUT/pretrain.log"
python3 - <<'EOF' 2>&1 | grep -v -i warn | tee "$OUT/export.log"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained("/tmp/gpurun/hf", dtype=torch.bfloat16).cuda()
tok = AutoTokenizer.from_pretrained("/tmp/gpurun/hf")
ids = tok("中共中央总书记", return_tensors="pt").input_ids.cuda()
out = m.generate(ids, max_new_tokens=24, do_sample=False)
print("hf export on", torch.cuda.get_device_name(), type(m).__name__, "->", repr(tok.decode(out[0])))
EOF
