#!/usr/bin/env bash
# Every GPU measurement and check of the project in one command, for a machine lent for a
# limited time (one H100/H200: 9 minutes with the default budget), and its rehearsal on a CPU:
#
#     bash scripts/gpu_session.sh OUT_DIR [SECONDS]               # the real session (default 540)
#     bash scripts/gpu_session.sh --rehearse OUT_DIR [SECONDS]    # every step on the CPU (default 3600)
#     bash scripts/gpu_session.sh [--rehearse] --dry-run OUT_DIR  # print the plan and the command lines
#
# The rehearsal runs the SAME steps with the SAME command lines; only what the mode sets below
# differs: the device (cpu instead of cuda), the sizes (tiny models and corpora, fewer rounds,
# updates and repeats) and each step's time limit. It writes the same summary.log, step logs and
# result files, so that an argument, a path or a parsing bug shows up before a GPU is lent
# (tests/test_gpu_session.py runs it in `make test`). No nvidia-smi is needed for it.
#
# Steps, most important first, each under its own time limit and all under SECONDS; a step that
# runs out of time is stopped (reported in summary.log as not measured; the fairseq-train steps
# keep the rounds they finished) and the next one runs.
# Planned limits of the real session (the first four add up to 515 s of the 540, 20 s for the header):
#   1. cuda_tests              40 s  the CUDA tests: fast paths against the float64 reference, the
#                                    causal path, fully masked rows, no host syncs, --ddp-backend
#                                    fully_sharded (on a CPU they skip, each with its reason)
#   2. fairseq_train_bf16     150 s  real fairseq-train --bf16, stock against daGPAM, IWSLT and LM-512,
#                                    two interleaved rounds of 40 updates: steady-state words/s and
#                                    peak CUDA memory over the whole run, with their spread
#   3. fairseq_train_fp16     150 s  the same in fp16 (--fp16)
#   4. fairseq_train_wmt_bf16 175 s  the same for WMT-big in bf16
#   -- beyond the 540 s plan, run only when the steps above end early or SECONDS is larger:
#   5. fairseq_train_wmt_fp16 175 s  WMT-big in fp16
#   6. gpu_checks              80 s  scripts/gpu_checks.py: DDP on two ranks, fp16 loss scaling,
#                                    autocast, --bf16 (on a CPU: "skipped: no CUDA")
#   7. benchmark_models        45 s  scripts/benchmark.py, whole training step (time, peak memory) and
#                                    beam search, bf16
#   8. benchmark_modules       30 s  scripts/benchmark.py, attention core and module, bf16
# Re-planned on 2026-12-08 so that peak memory and words/s of real fairseq-train runs come first,
# for the three pairs and both half precisions, each with a spread (two rounds). The limits are
# estimates from the 2026-11-27 H100 session (one IWSLT fairseq-train run of 200 updates took 51 s,
# an LM-512 one of 100 updates 19 s, start-up included): about 22 s for an IWSLT run of 40 updates,
# 15 s for LM-512, 43 s for WMT-big (about four times IWSLT's arithmetic per update). No GPU was
# lent since; the first session will tell.
#
# Every step's output lands in OUT_DIR/<step>.log and its tables under OUT_DIR/results/; the
# summary ends with one line per step and the failed ones named. Exit status: 0 when every step
# exited 0, else 1. Needs fairseq importable by `python3` (or $PYTHON), and fairscale for the
# fully_sharded test (skipped, and said so, without it). The kernel counts and saved bytes
# (benchmark.py --levels ops) are deterministic and measured on a CPU, not here.
set -u
mode=real
dry_run=0
while [[ ${1:-} == --* ]]; do
  case $1 in
    --rehearse) mode=rehearse ;;
    --dry-run) dry_run=1 ;;
    *) echo "gpu_session.sh: unknown option $1; usage: bash scripts/gpu_session.sh [--rehearse] [--dry-run] OUT_DIR [SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
out=${1:?usage: bash scripts/gpu_session.sh [--rehearse] [--dry-run] OUT_DIR [SECONDS]}
py=${PYTHON:-python3}
if (( dry_run )); then
  out=$(realpath -m "$out")  # nothing is written
else
  mkdir -p "$out/results"
  out=$(cd "$out" && pwd)
fi
cd "$(dirname "$0")/.."  # the repository root: the steps name scripts/ and tests/ from there
export PYTHONUNBUFFERED=1

# What the mode changes, and nothing else: device, sizes, time limits (limit_of picks a step's).
if [[ $mode == real ]]; then
  budget=${2:-540}
  device=(--device cuda)
  train_size=(--updates 40 --discard-updates 10 --log-interval 10 --workers 8)
  half=fp16
  rounds=2                          # every fairseq-train comparison: the fewest that give a spread
  rounds_more=2
  bench_size=()
  checks_timeout=40
  train_data=/tmp/gpam_fairseq_train_data
else
  budget=${2:-3600}                 # limits for a loaded CI machine: the steps end long before them
  device=(--device cpu)
  train_size=(--quick --workers 1)  # tiny models, 6 updates, records every 2, the first 2 dropped
  half=memory-efficient-fp16        # fairseq's --fp16 needs CUDA; this is its CPU-capable sibling
  rounds=2                          # the first comparison with a spread, as in the real session
  rounds_more=1                     # the others once each: the same code, fewer seconds of make test
  bench_size=(--quick)
  checks_timeout=40
  train_data=$out/train_data       # never the real session's corpus folder
fi
limit_of() {  # limit_of REAL_LIMIT REHEARSAL_LIMIT
  if [[ $mode == real ]]; then echo "$1"; else echo "$2"; fi
}

phase=plan
planned=() ; planned_total=0 ; beyond=()
failed=() ; results=()
deadline=$(( $(date +%s) + budget ))

step() {  # step NAME REAL_LIMIT REHEARSAL_LIMIT COMMAND...
  local name=$1 limit; limit=$(limit_of "$2" "$3"); shift 3
  if [[ $phase == plan ]]; then
    if (( planned_total + limit <= budget )); then
      planned+=("$name ${limit}s"); planned_total=$(( planned_total + limit ))
    else
      beyond+=("$name ${limit}s")
    fi
    return
  fi
  local command; printf -v command '%q ' "$@"  # the exact command line, quoted where needed
  if [[ $phase == dry ]]; then echo "== $name (at most ${limit}s): ${command% }"; return; fi
  local left=$(( deadline - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "== $name: skipped, no time left (not measured)" | tee -a "$out/summary.log"
    failed+=("$name"); results+=("$name: skipped, no time left"); return
  fi
  echo "== $name (at most ${limit}s): ${command% }" | tee -a "$out/summary.log"
  local t0; t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local verdict="exit $rc"
  (( rc == 124 || rc == 137 )) && verdict="exit $rc: stopped at its time limit, results incomplete (not measured)"
  echo "   $verdict after $(( $(date +%s) - t0 ))s" | tee -a "$out/summary.log"
  (( rc != 0 )) && failed+=("$name")
  results+=("$name: $verdict")
  tail -n 25 "$out/$name.log"
}

steps() {
  # the tests that need CUDA; "without_cuda" ones are CPU tests (make test runs them; here they skip on a GPU)
  step cuda_tests 40 600 $py -m pytest -q -rs -p no:cacheprovider -k "(cuda or gpu) and not without_cuda" \
    --junitxml "$out/results/cuda_tests.xml" tests/test_fast_paths.py tests/test_gpu_checks.py \
    tests/test_training_options.py
  step fairseq_train_bf16 150 900 $py scripts/benchmark_fairseq_train.py "${device[@]}" --precision bf16 \
    --pairs iwslt,lm512 --rounds $rounds "${train_size[@]}" --work-dir "$train_data" \
    --out-dir "$out/results/fairseq_train_bf16"
  step fairseq_train_fp16 150 600 $py scripts/benchmark_fairseq_train.py "${device[@]}" --precision $half \
    --pairs iwslt,lm512 --rounds $rounds_more "${train_size[@]}" --work-dir "$train_data" \
    --out-dir "$out/results/fairseq_train_fp16"
  step fairseq_train_wmt_bf16 175 300 $py scripts/benchmark_fairseq_train.py "${device[@]}" --precision bf16 \
    --pairs wmt_big --rounds $rounds_more "${train_size[@]}" --work-dir "$train_data" \
    --out-dir "$out/results/fairseq_train_wmt_bf16"
  step fairseq_train_wmt_fp16 175 300 $py scripts/benchmark_fairseq_train.py "${device[@]}" --precision $half \
    --pairs wmt_big --rounds $rounds_more "${train_size[@]}" --work-dir "$train_data" \
    --out-dir "$out/results/fairseq_train_wmt_fp16"
  step gpu_checks 80 120 $py scripts/gpu_checks.py --out "$out/results/gpu_checks" --timeout $checks_timeout
  step benchmark_models 45 300 $py scripts/benchmark.py "${device[@]}" "${bench_size[@]}" --dtypes bf16 \
    --levels train,beam --shapes iwslt,wmt_big,lm512 --types softmax,dagpam --out-dir "$out/results/benchmark_models"
  step benchmark_modules 30 300 $py scripts/benchmark.py "${device[@]}" "${bench_size[@]}" --dtypes bf16 \
    --levels core,attention --out-dir "$out/results/benchmark_modules"
}

plan_line() {
  echo "mode $mode, budget ${budget}s; planned limits: ${planned[*]} (total ${planned_total}s)"
  (( ${#beyond[@]} )) && echo "beyond the budget, run only if the steps above end early: ${beyond[*]}"
  return 0
}
steps  # plan: the limits of this mode, not run
if (( dry_run )); then
  plan_line
  phase=dry; steps; exit 0
fi
{
  date -u
  if [[ $mode == real ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  else
    echo "REHEARSAL on the CPU ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), $(getconf _NPROCESSORS_ONLN) cores): every step of the real session, tiny sizes, device cpu"
  fi
  $py -c "import torch, fairseq, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'fairseq', fairseq.__version__)" 2>&1 | tail -n 1
  plan_line
} 2>&1 | tee "$out/summary.log"

phase=run
steps
{
  echo "== steps:"
  printf '   %s\n' "${results[@]}"
  if (( ${#failed[@]} )); then echo "FAILED: ${failed[*]}"; else echo "ALL STEPS EXITED 0"; fi
} | tee -a "$out/summary.log"
(( ${#failed[@]} == 0 ))
