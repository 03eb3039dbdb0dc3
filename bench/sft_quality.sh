#!/usr/bin/env bash
# SFT quality on CPU with nothing but zerolm commands: clean the shared pretraining
# corpus, train a tokenizer, pack, pretrain a small model, then SFT it on
# ../shared/data/sft and report the held-out val/loss and val/end_rate per evaluation
# (greedy answers through the serving engine that end with <|im_end|> in time).
#
#   bash bench/sft_quality.sh [WORKDIR]      (about an hour on 2 cores)
#
# Knobs (environment): PRETRAIN_STEPS, SFT_EPOCHS, DIM, LAYERS, SEQ, MAX_NEW, EVAL_EVERY, GENERATE, PRECISION
# (amp_bf16: bf16 autocast, faster on CPUs with AVX512-BF16 or AMX; or fp32). The defaults are
# the recipe recorded in docs/benchmarks.md (issue 12).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
W=${1:-/tmp/zerolm-sft-quality}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}
SFT_EPOCHS=${SFT_EPOCHS:-24}
DIM=${DIM:-256}
LAYERS=${LAYERS:-4}
SEQ=${SEQ:-512}
MAX_NEW=${MAX_NEW:-448}
PRECISION=${PRECISION:-amp_bf16}
EVAL_EVERY=${EVAL_EVERY:-312}
GENERATE=${GENERATE:-94}  # held-out prompts answered greedily per eval (94 = all of them)
mkdir -p "$W"
P=$DATA/pretrain
time python3 -m zerolm data run --output "$W/clean" \
  --input "peoples_daily=$P/zh/peoples_daily_199801.txt" --input "news=$P/zh/news_sentences.txt" \
  --input "reviews=$P/zh/reviews_pos.txt" --input "reviews=$P/zh/reviews_neg.txt" \
  --input "wiki=$P/en/wiki_demo.txt" --input "c4=$P/en/c4_demo.jsonl" --input "wikitext=$P/en/wikitext2_valid.txt" \
  --input "zhihu=$P/zh/zhihu_qa_3k.parquet" --set 'read.inputs.7.text_field=[prompt, response]'
time python3 -m zerolm tokenizer train --input "$W/clean" --output "$W/tokenizer" --vocab-size 8000
time python3 -m zerolm pack --input "$W/clean" --tokenizer "$W/tokenizer" --output "$W/tokens"
time python3 -m zerolm train pretrain --data "$W/tokens" --output "$W/base" --preset tiny \
  --set model.overrides.dim=$DIM --set model.overrides.n_layers=$LAYERS --set model.overrides.n_heads=4 \
  --set model.overrides.n_kv_heads=2 --set model.overrides.max_seq_len=1024 \
  --set data.seq_len=$SEQ --set data.micro_batch_size=8 --set max_steps=$PRETRAIN_STEPS --set optim.lr=2e-3 \
  --set eval.every=0 --set checkpoint.every=0 --set log_every=100 --set scaling.launcher=local \
  --set deepspeed.precision=$PRECISION
time python3 -m zerolm train sft --init "$W/base" --data "$DATA/sft/*.json" "$DATA/sft/*.jsonl" --output "$W/chat" \
  --set data.seq_len=$SEQ --set data.micro_batch_size=8 --set epochs=$SFT_EPOCHS --set optim.lr=1e-3 \
  --set 'data.placeholders={name: Zero, author: zerolm}' --set eval.every=$EVAL_EVERY --set eval.generate=$GENERATE \
  --set eval.max_new_tokens=$MAX_NEW --set checkpoint.every=0 --set log_every=50 --set scaling.launcher=local \
  --set deepspeed.precision=$PRECISION
python3 - "$W/chat" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for row in (json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()):
    if row["kind"] == "eval":
        print(json.dumps({k: row[k] for k in ("step", "val/loss", "val/end_rate", "val/answer_tokens") if k in row}))
print(json.dumps({"data": json.loads((run / "data" / "stats.json").read_text())}))
EOF
