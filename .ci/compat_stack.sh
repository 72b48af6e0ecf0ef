#!/usr/bin/env bash
# The kit on the GPU image's own software, on the CPU: Python 3.12, torch 2.11.0, torchvision 0.26.0,
# numpy 2.5, without ftfy, wcwidth or simplejpeg (what the offline H200 machine of docs/gpu-session.md holds), so an
# API that stack lacks is found here, not in the GPU hour. Run after the tests (README's test command):
#   bash .ci/compat_stack.sh
# Install (first run ~1-2 min: PyPI's Linux torch 2.11 is a CUDA build, ~4.7 GB in the venv, and no
# CPU-only build of 2.11 is on PyPI; kept in $COMPAT_VENV, default /tmp/kit-compat-venv, and reused):
# the venv, and the ftfy / wcwidth wheels downloaded with the command docs/gpu-session.md gives.
# Checks (~1 min on 2 cores, nothing downloaded): the kit imports without ftfy; bench/gpu_bench.py
# --dry-run; then, with the carried wheels installed as on the GPU machine, generated shards through
# stage2/shards.py's check command (decode_on_device: torchvision 0.26's decode_jpeg) and 3 steps of
# train_clip.py. The last line counts the checks (N passed, N failed).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${COMPAT_VENV:-/tmp/kit-compat-venv}
STACK="torch==2.11.0 torchvision==0.26.0 numpy==2.5.5"
# The GPU image's other packages the kit imports (it has them; versions unknown: the newest are taken).
OTHERS="pillow tqdm pyyaml regex pyarrow"
WHEELS="ftfy==6.3.1 wcwidth==0.7.0 simplejpeg==1.9.0"  # simplejpeg: the loader's JPEG decoder

# ---- install (may download) ----
python312=""
for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 python3.12; do
  if "$candidate" -c "" 2>/dev/null; then python312=$candidate; break; fi  # a pyenv shim may exist and fail
done
if [ -z "$python312" ]; then
  echo "compat_stack: no python3.12 here (the GPU image's Python; numpy 2.5 needs >= 3.12): install one" >&2
  exit 1
fi
if [ "$(cat "$VENV/stack.txt" 2>/dev/null)" != "$STACK $OTHERS $WHEELS" ]; then
  begun=$(date +%s)
  rm -rf "$VENV"
  # --no-compile: byte-compiling torch's ~5,000 modules is most of the install's CPU time; Python compiles what it imports.
  { "$python312" -m venv "$VENV" &&
    "$VENV/bin/python" -m pip install -q --no-compile $STACK $OTHERS &&
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$VENV/whl" $WHEELS &&
    echo "$STACK $OTHERS $WHEELS" > "$VENV/stack.txt"; } > "$VENV.install.log" 2>&1 ||
    { tail -20 "$VENV.install.log"; echo "compat_stack: install failed (log: $VENV.install.log)" >&2; exit 1; }
  echo "compat_stack: installed $STACK in $VENV in $(( $(date +%s) - begun )) s"
fi

# ---- checks (nothing downloads) ----
PY="$VENV/bin/python"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
passed=0 failed=0
check() {  # check NAME COMMAND...
  local name=$1 begun=$(date +%s)
  shift
  if "$@" > "$WORK/$name.log" 2>&1; then
    passed=$((passed + 1)); echo "compat_stack: ok   $name ($(( $(date +%s) - begun )) s)"
  else
    failed=$((failed + 1)); echo "compat_stack: FAIL $name"; tail -20 "$WORK/$name.log"
  fi
}
"$PY" -c "import sys, torch, torchvision, numpy; print('compat_stack: Python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__)"
check imports_without_ftfy "$PY" -c "
import importlib.util, sys
assert importlib.util.find_spec('ftfy') is None, 'this venv must lack ftfy, as the GPU image does'
assert importlib.util.find_spec('simplejpeg') is None, 'and simplejpeg'
sys.path[:0] = ['$ROOT', '$ROOT/bench']
import checkpoints, cli, data, demo, evaluate, logs, model, train_clip, train_triplet, training, gpu_bench
from stage1 import nights, objective, other_sources, triplets
from stage2 import augment, contrastive, formats, held_out, shards
from analysis import alignment, curves, probes, zero_shot"
check gpu_bench_dry_run "$PY" bench/gpu_bench.py --dry-run --out "$WORK/bench/gpu_bench.json"
# The carried wheels, installed as docs/gpu-session.md installs them on the GPU machine.
"$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$VENV"/whl/*.whl
export PYTHONPATH="$WORK/site"
check shards "$PY" bench/make_bench_shards.py "$WORK/shards" --samples 256 --per-shard 64 --size 64 --distinct 16
check decode_on_device "$PY" -m stage2.shards "$WORK/shards/{00000..00003}.tar" --batch_size 16 --image_size 32 --workers 1 \
  --batches 2 --device cpu --decode_on_device
check train_clip "$PY" train_clip.py configs/clip_tiny.yaml "--train_data=$WORK/shards/{00000..00003}.tar" \
  "--out_dir=$WORK/run" --max_steps=3 --batch_size=16 --log_every=1 --save_every=100 --workers=1
echo "compat_stack: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
