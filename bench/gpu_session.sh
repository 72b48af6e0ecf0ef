#!/usr/bin/env bash
# The GPU measurements the kit asks for, as two commands that each fit a 10-minute job (estimates, not
# yet run: no GPU was lent while the kit was built). docs/gpu-session.md walks through them.
#   bash bench/gpu_session.sh bench [OUT_DIR]   # ~4-5 min (at most 9.5): bench/gpu_bench.py in three parts
#        1. ceiling + eager: the measured bf16 matmul TFLOP/s beside the datasheet's; ViT-B/32 bf16
#           train_clip.train_step, checkpointing off / on x accum_steps 1 / 6; samples/s, MFU (against both), HFU, memory
#        2. compiled: the config's step compiled once (compile time as warmup_s)
#        3. fit: the largest micro-batch at accum_steps 6, without / with checkpointing (what train_clip holds)
#   bash bench/gpu_session.sh train [OUT_DIR]   # ~4-6 min (at most 9.5)
#        4. shards: 215,040 generated JPEG pairs (bench/make_bench_shards.py), enough that 200 steps of
#           1,024 over 64 streams stay inside one epoch
#        5. train_clip.py itself, 200 steps of 1,024 at 224 px through the real loader (libjpeg-turbo + torch's
#           resize in up to 16 workers): samples/s, data wait, the workers it needs if they did not keep up
#        6. the same with --decode_on_device (nvjpeg)
#   bash bench/gpu_session.sh [all] [OUT_DIR]    # both, one after the other (where no job limit applies)
# Every step runs under its own timeout and a failing or timed-out step does not stop the next; each
# writes JSON lines as it goes, and OUT_DIR/session.jsonl gets one line per step (rc, seconds) and the
# summaries. Wheels found in .whl/ (ftfy, wcwidth, simplejpeg: a GPU image may lack them) are installed first.
set -u -o pipefail  # no -e: a failing step must not stop the others
cd "$(dirname "$0")/.."
PART=${1:-all}
OUT=${2:-gpu_session}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SESSION="$OUT/session.jsonl"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels: installed beside the image's packages, not over them
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' | tee -a "$SESSION"
import json, platform, importlib.util, torch, torchvision, numpy
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "numpy": numpy.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "ftfy": importlib.util.find_spec("ftfy") is not None,
                  "simplejpeg": importlib.util.find_spec("simplejpeg") is not None}))
PY

# step NAME SECONDS COMMAND...: runs COMMAND under a timeout, its output in OUT/NAME.log, and records how it ended.
step() {
  local name=$1 limit=$2 begun rc
  shift 2
  begun=$(date +%s)
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "{\"step\": \"$name\", \"rc\": $rc, \"timed_out\": $([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo true || echo false), \"seconds\": $(( $(date +%s) - begun ))}" | tee -a "$SESSION"
}

# summary NAME WORKERS DECODER: samples/s and data-wait share of a train_clip run (the first interval warms
# up), from its metrics.jsonl; whether WORKERS cores kept the GPU fed, and if not, how many it needs.
summary() {
  "$PY" - "$OUT/$1/metrics.jsonl" "$1" "$2" "$3" <<'PY' | tee -a "$SESSION"
import importlib.util, json, math, sys
try:
    records = [json.loads(line) for line in open(sys.argv[1]) if '"samples_per_s"' in line]
except FileNotFoundError:
    records = []
timed, workers = records[1:], int(sys.argv[3])
rate = sum(r["samples_per_s"] for r in timed) / len(timed) if timed else None
wait = sum(r["data_wait"] for r in timed) / len(timed) if timed else None
decoder = sys.argv[4] if sys.argv[4] != "host" else (
    "simplejpeg" if importlib.util.find_spec("simplejpeg") else "PIL (no simplejpeg: see docs/gpu-session.md)")
# Loader-bound (data wait over 5%): the steps ran at what the workers delivered, so each worker's share
# is its delivery, and the GPU's own rate is the rate without the wait.
bound = wait is not None and wait > 0.05 and wait < 1
gpu_rate = rate / (1 - wait) if rate is not None and wait is not None and wait < 1 else None
print(json.dumps({"run": sys.argv[2], "intervals": len(records), "epochs": sorted({r["epoch"] for r in records}),
                  "samples_per_s": rate, "data_wait_share": wait, "workers": workers, "decoder": decoder,
                  "gpu_samples_per_s": gpu_rate,
                  "loader_samples_per_s_per_worker": rate / workers if bound else None,
                  "workers_needed": math.ceil(gpu_rate / (rate / workers)) if bound else f"<= {workers}"}))
PY
}

if [ "$PART" = bench ] || [ "$PART" = all ]; then
  step bench_eager 180 "$PY" bench/gpu_bench.py --parts ceiling,eager --out "$OUT/bench_eager.json"
  step bench_compiled 210 "$PY" bench/gpu_bench.py --parts compiled --out "$OUT/bench_compiled.json"
  step bench_fit 180 "$PY" bench/gpu_bench.py --parts fit --out "$OUT/bench_fit.json"
fi

if [ "$PART" = train ] || [ "$PART" = all ]; then
  WORKERS=$(( $(nproc) > 16 ? 16 : $(nproc) ))
  step shards 180 "$PY" bench/make_bench_shards.py "$OUT/shards" --samples 215040 --per-shard 5120
  SHARDS="$OUT/shards/{00000..00041}.tar"
  COMMON=(train_clip.py configs/yfcc15m.yaml "--train_data=$SHARDS" --max_steps=200 --batch_size=1024 --accum_steps=1
          --log_every=20 --save_every=100000 --eval_every=0 --eval_tasks= --nights_root= "--workers=$WORKERS")
  step train_clip 210 "$PY" "${COMMON[@]}" "--out_dir=$OUT/train_clip"
  summary train_clip "$WORKERS" host
  step train_clip_nvjpeg 180 "$PY" "${COMMON[@]}" "--out_dir=$OUT/train_clip_nvjpeg" --decode_on_device=true
  summary train_clip_nvjpeg "$WORKERS" nvjpeg
fi
