#!/usr/bin/env bash
# DPO quality on CPU: the demo's SFT model (run `zerolm demo --no-serve` first), DPO on
# ../shared/data/preference with bad pairs mixed in (identical sides, empty sides,
# missing fields, broken JSON, a prompt longer than the context), then the held-out
# reward accuracy per evaluation and the training loss range (it must stay finite).
#
#   bash bench/dpo_quality.sh [DEMO_WORKDIR] [OUT]      (about 10 minutes on 2 cores)
#
# Knobs (environment): EPOCHS, BETA, LR, LOSS, SEQ, VAL (held-out share).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
DEMO=${1:-zerolm-demo}
OUT=${2:-/tmp/zerolm-dpo-quality}
EPOCHS=${EPOCHS:-2}
BETA=${BETA:-0.1}
LR=${LR:-5e-5}
LOSS=${LOSS:-sigmoid}
SEQ=${SEQ:-256}
VAL=${VAL:-0.2}
mkdir -p "$OUT"
python3 - "$OUT/bad_pairs.jsonl" <<'EOF'
import json, sys
bad = [
    {"conversations": [{"from": "human", "value": "Say hi."}], "chosen": {"from": "gpt", "value": "Hi!"},
     "rejected": {"from": "gpt", "value": "Hi!"}},
    {"prompt": "Say hi.", "chosen": "", "rejected": "Go away."},
    {"prompt": "Say hi.", "chosen": "Hello!"},
    {"prompt": "重复" * 2000, "chosen": "好。", "rejected": "不好。"},
]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for row in bad:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.write('{"prompt": "broken json", \n')
EOF
rm -rf "$OUT/dpo"
time python3 -m zerolm train dpo --init "$DEMO/runs/chat" --data "$DATA/preference/*.json" "$OUT/bad_pairs.jsonl" \
  --output "$OUT/dpo" --set data.seq_len=$SEQ --set data.micro_batch_size=4 --set epochs=$EPOCHS \
  --set data.val_fraction=$VAL --set dpo.beta=$BETA --set dpo.loss=$LOSS --set optim.lr=$LR --set eval.every=25 --set eval.at_start=true \
  --set checkpoint.every=0 --set log_every=5 --set scaling.num_workers=2 --set threads_per_worker=1
python3 - "$OUT/dpo" <<'EOF'
import json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r["loss"] for r in rows if r["kind"] == "train"]
print(json.dumps({"train_loss_min": min(train), "train_loss_max": max(train),
                  "all_finite": all(math.isfinite(x) for x in train)}))
for r in rows:
    if r["kind"] == "eval":
        print(json.dumps({k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in
                          ("step", "val/loss", "val/reward_accuracy", "val/logp_accuracy", "val/margin",
                           "val/kl_chosen") if k in r}))
print(json.dumps({"data": json.loads((run / "data" / "stats.json").read_text())}))
EOF
