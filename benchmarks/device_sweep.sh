#!/usr/bin/env bash
# Issue 9's GPU figures in one command on the lent GPU machine (the `device` tool), sized to its
# 15-minute budget: NEU-DET-sized data (1,800 synthetic images, 224 px), then bench_sweep.py
# --gpu (16 trials, up to 6 epochs, batch 128): resnet18 at 16 trials per GPU, efficientnet_b0 at
# as many as `search --trials-per-gpu auto` measures to fit, each sweep interrupted after 200 s
# and its table written to $OUT as soon as it is done.
# Sized by its first run (results/benchmarks/sweep_efficiency_h200.md): 16 trials of up to 10
# epochs did not finish in 180 s, and a start costs about a minute of the budget.
#
# Here, first (the GPU machine has torch and timm but no Ray and no registry):
#   ../shared/device/pack-ray.sh .device-pkgs
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .device-pkgs \
#     optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 mako==1.4.3 colorlog==6.12.0 greenlet \
#     albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 iterative-stratification==0.1.9 \
#     nvidia-ml-py
# then the device run, carrying .device-pkgs:   bash benchmarks/device_sweep.sh
set -uo pipefail
OUT="${OUT:-/tmp/dt-device-out}"
scratch=$(mktemp -d)
mkdir -p /tmp/site "$OUT"
tar -xJf .device-pkgs/ray-lite.tar.xz -C /tmp/site || exit 1
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .device-pkgs/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# Not installed there: the package's defect_tune.search_spaces is the checkout's search_spaces/.
python3 -c "import defect_tune.search_spaces" 2>/dev/null || ln -sfn ../search_spaces defect_tune/search_spaces
log="$OUT/device_sweep.log"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import ray, torch, timm, optuna; print('ray', ray.__version__, 'torch', torch.__version__, 'timm', timm.__version__, 'optuna', optuna.__version__)"
  python3 -c "import defect_tune.search.sweep, defect_tune.search.trial, defect_tune.raytrain.ingest, defect_tune.data.augment, defect_tune.training.train" || exit 1
  python3 -m defect_tune prepare "$scratch/voc" --format synthetic --synthetic-images 1800 --image-size 224 \
    --out "$scratch/data" --workers 14 | tail -3 || exit 1
} 2>&1 | tee "$log"
[ -f "$scratch/data/meta.json" ] || exit 1

bench() {  # name, then bench_sweep.py's options
  local name=$1; shift
  echo "== $name: $(date -u +%T)" | tee -a "$log"
  python3 benchmarks/bench_sweep.py --gpu --data "$scratch/data" --trials 16 --epochs 6 --batch 128 \
    --sweep-timeout "${SWEEP_TIMEOUT:-200}" --write "$OUT/$name.md" "$@" 2>&1 | tail -40 | tee -a "$log"
}
bench resnet18_tpg16 --model resnet18 --at-once 16
bench efficientnet_b0_auto --model efficientnet_b0 --at-once auto
echo "done: $(date -u +%T)" | tee -a "$log"
