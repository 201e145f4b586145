#!/usr/bin/env bash
# Every GPU measurement and check of the project in one command, for a machine lent for a
# limited time (one H100/H200: about 9 minutes with the default budget):
#
#     bash scripts/gpu_session.sh OUT_DIR [SECONDS]
#
# Steps, most important first, each under its own time limit and all under SECONDS (default
# 540); a step that runs out of time is stopped (and reported as such in summary.log) and the
# next one runs:
#   1. fairseq_train      real fairseq-train words/s, stock against daGPAM, steady state,
#                         IWSLT and LM-512 in three interleaved rounds each (the quotable figure)
#   2. fairseq_train_wmt  the same for WMT-big, one round (no spread: not quotable)
#   3. cuda_tests         the CUDA tests: fast paths against the float64 reference, the causal
#                         path, fully masked rows, no host syncs, --ddp-backend fully_sharded
#   4. benchmark_models   scripts/benchmark.py, whole training step (time, peak memory) and
#                         beam search, bf16
#   5. benchmark_modules  scripts/benchmark.py, attention core and module, bf16
#   6. gpu_checks         scripts/gpu_checks.py: DDP, fp16 loss scaling, long sequences, ...
# Every step's output lands in OUT_DIR/<step>.log and its tables under OUT_DIR/results/.
# Needs fairseq importable by `python3` (or $PYTHON), and fairscale for the fully_sharded test
# (skipped, and said so, without it). The kernel counts and saved bytes (benchmark.py
# --levels ops) are deterministic and measured on a CPU, not here.
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
  if (( limit < 20 )); then echo "== $name: skipped, no time left (not measured)" | tee -a "$out/summary.log"; return; fi
  echo "== $name (at most ${limit}s): $*" | tee -a "$out/summary.log"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local verdict="exit $rc"
  (( rc == 124 || rc == 137 )) && verdict="exit $rc: stopped at its time limit, results incomplete (not measured)"
  echo "   $verdict after $(( $(date +%s) - t0 ))s" | tee -a "$out/summary.log"
  tail -n 25 "$out/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, fairseq, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'fairseq', fairseq.__version__)"
} 2>&1 | tee "$out/summary.log"

train_data=/tmp/gpam_fairseq_train_data
step fairseq_train 300 $py scripts/benchmark_fairseq_train.py --pairs iwslt,lm512 --rounds 3 --updates 120 \
  --discard-updates 40 --log-interval 10 --workers 8 --work-dir "$train_data" --out-dir "$out/results/fairseq_train"
step fairseq_train_wmt 90 $py scripts/benchmark_fairseq_train.py --pairs wmt_big --rounds 1 --updates 100 \
  --discard-updates 40 --log-interval 10 --workers 8 --work-dir "$train_data" --out-dir "$out/results/fairseq_train_wmt"
step cuda_tests 60 $py -m pytest -q -rs -p no:cacheprovider -k "cuda or gpu" tests/test_fast_paths.py tests/test_gpu_checks.py \
  tests/test_training_options.py
step benchmark_models 90 $py scripts/benchmark.py --device cuda --dtypes bf16 --levels train,beam \
  --shapes iwslt,wmt_big,lm512 --types softmax,dagpam --out-dir "$out/results/benchmark_models"
step benchmark_modules 60 $py scripts/benchmark.py --device cuda --dtypes bf16 --levels core,attention \
  --out-dir "$out/results/benchmark_modules"
step gpu_checks 170 $py scripts/gpu_checks.py --out "$out/results/gpu_checks" --timeout 80
cat "$out/summary.log"
