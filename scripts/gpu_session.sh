#!/usr/bin/env bash
# Every GPU check of issues 5 and 6 in one command, for a machine lent for a limited time:
#
#     bash scripts/gpu_session.sh OUT_DIR [SECONDS]
#
# Steps, most important first, each under its own time limit and all under SECONDS (default
# 540): the CUDA tests (fast paths against the float64 reference, no host syncs), the
# reliability checks (scripts/gpu_checks.py), fairseq-train words/s stock vs daGPAM
# (scripts/benchmark_fairseq_train.py), then scripts/benchmark.py (core and module level,
# then whole-model training step and beam search) in bf16. A step that runs out of time is
# stopped and the next one runs; every step's output lands in OUT_DIR/<step>.log and the
# tables under OUT_DIR/results/. Needs fairseq importable by `python3` (or $PYTHON), and
# fairscale for the --ddp-backend fully_sharded test (skipped, and said so, without it).
set -u
out=${1:?usage: bash scripts/gpu_session.sh OUT_DIR [SECONDS]}
budget=${2:-540}
py=${PYTHON:-python3}
mkdir -p "$out/results"
deadline=$(( $(date +%s) + budget ))
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped, no time left" | tee -a "$out/summary.log"; return; fi
  echo "== $name (at most ${limit}s): $*" | tee -a "$out/summary.log"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$out/summary.log"
  tail -n 25 "$out/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, fairseq, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'fairseq', fairseq.__version__)"
} 2>&1 | tee "$out/summary.log"

step cuda_tests 120 $py -m pytest -q -rs -p no:cacheprovider -k "cuda or gpu" tests/test_fast_paths.py tests/test_gpu_checks.py \
  tests/test_training_options.py
step gpu_checks 170 $py scripts/gpu_checks.py --out "$out/results/gpu_checks" --timeout 80
step fairseq_train 170 $py scripts/benchmark_fairseq_train.py --pairs iwslt,lm512,wmt_big --updates 200 \
  --workers 8 --work-dir /tmp/gpam_fairseq_train_data --out-dir "$out/results/fairseq_train"
step benchmark_modules 90 $py scripts/benchmark.py --device cuda --dtypes bf16 --levels core,attention \
  --out-dir "$out/results/benchmark_modules"
step benchmark_models 120 $py scripts/benchmark.py --device cuda --dtypes bf16 --levels train,beam \
  --shapes iwslt,wmt_big,lm512 --out-dir "$out/results/benchmark_models"
cat "$out/summary.log"
