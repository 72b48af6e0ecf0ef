#!/usr/bin/env bash
# The GPU measurements the README asks for, in one go (~10 minutes on one H100 / H200; not yet run:
# no GPU was lent while the kit was built).
#   1. bench/gpu_bench.py: ViT-B/32 bf16, train_clip.train_step with compile off / on, checkpointing
#      off / on, accum_steps 1 and the recipe's 6; samples/s, MFU / HFU, peak memory, largest micro-batch.
#   2. 200 steps of train_clip.py itself at 224 px through the real loader, on generated JPEG shards:
#      samples/s and data-wait share as the trainer logs them (metrics.jsonl).
# Usage: bash bench/gpu_session.sh [OUT_DIR]      (results under OUT_DIR, default gpu_session/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_session}
mkdir -p "$OUT"
timeout 420 python bench/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"

# 20,000 distinct 224-px JPEG pairs in 20 shards (photo crops, varied captions): written once.
if [ ! -f "$OUT/shards/sizes.json" ]; then
python - "$OUT/shards" <<'PY'
import io, sys
import numpy as np
from PIL import Image
from skimage import data as skdata
from make_data import write_shards
photo = Image.fromarray(skdata.astronaut()).resize((448, 448))
rng = np.random.default_rng(0)
def samples():
    for i in range(20000):
        x, y = rng.integers(0, 224, 2)
        buffer = io.BytesIO()
        photo.crop((x, y, x + 224, y + 224)).rotate(int(rng.integers(0, 4)) * 90).save(buffer, "JPEG", quality=90)
        yield f"{i:06d}", {"jpg": buffer.getvalue(), "txt": f"a photo of an astronaut, crop {x} {y}"}
write_shards(sys.argv[1], samples(), 1000)
PY
fi
WORKERS=$(( $(nproc) > 16 ? 16 : $(nproc) ))
timeout 600 python train_clip.py configs/yfcc15m.yaml --train_data="$OUT/shards/{00000..00019}.tar" \
    --out_dir="$OUT/train_clip" --max_steps=200 --batch_size=1024 --accum_steps=1 --log_every=20 \
    --save_every=100000 --eval_every=0 --eval_tasks= --workers="$WORKERS" 2>&1 | tee "$OUT/train_clip.log"
python - "$OUT/train_clip/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if '"samples_per_s"' in line][1:]  # the first interval warms up
print(json.dumps({"train_clip_samples_per_s": sum(r["samples_per_s"] for r in records) / len(records),
                  "data_wait_share": sum(r["data_wait"] for r in records) / len(records)}))
PY
