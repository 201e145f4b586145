#!/bin/bash
# The measurements of docs/analysis.md's "Choosing lambda", in order; each writes NAME.txt here
# (command, date, load, console output, wall-clock) next to its CSV and PNG files.
# Run from the repository root: bash docs/runs/2026-12-03_lambda_map/run_all.sh
set -euo pipefail
OUT=docs/runs/2026-12-03_lambda_map
CTRL=${CTRL:-/tmp/lambda_map/ctrl_trainable}   # the controlled runs' checkpoints (not committed)
CTRL_1000=${CTRL_1000:-/tmp/lambda_map/ctrl_trainable_1000}
PY=.venv/bin/python
export OMP_NUM_THREADS=1
POS=0,0.2,0.5,1,2
NEG=0,0.2,0.5,0.9,0.99,1,1.1,1.19,1.4,1.49,1.9,1.99,2,2.9,2.99
GRID=(--attention-types softmax,dagpam --lambda-pos $POS --lambda-neg $NEG --skip-invalid --neg-query-inits neg_identity,random)

measure() {
  local name=$1; shift
  {
    echo "# command: OMP_NUM_THREADS=1 nice -n 5 $*"
    echo "# date: $(date -u '+%Y-%m-%d %H:%M UTC'); torch $($PY -c 'import torch; print(torch.__version__)'); 2 CPU cores shared with other jobs (load average at start: $(cut -d' ' -f1-3 /proc/loadavg))"
  } > "$OUT/$name.txt"
  local start=$(date +%s)
  nice -n 5 "$@" >> "$OUT/$name.txt" 2>&1
  echo "# wall-clock: $(( $(date +%s) - start )) s" >> "$OUT/$name.txt"
}

if [ "${SKIP_TRAINING:-0}" != 1 ]; then
  measure controlled_trainable_lambda_run $PY examples/ptb/controlled/run_controlled.py --synthetic --small \
    --attention-types dagpam --extra-train-args "--gpam-trainable-lambda --gpam-lambda-scope head" --out-dir "$CTRL"
fi
measure trained_lambda $PY scripts/analyze_collapse.py --trained-lambda "$CTRL" --out-prefix $OUT/controlled
measure pure_d8 $PY scripts/analyze_collapse.py --pure-attention --depth 8 --dim 64 --heads 4 --tokens 32 \
  --seeds 0,1,2,3,4 "${GRID[@]}" --map-layers 2,3,4,last --trained-lambda "$CTRL" --out-prefix $OUT/pure_d8
measure pure_d16 $PY scripts/analyze_collapse.py --pure-attention --depth 16 --dim 64 --heads 4 --tokens 32 \
  --seeds 0,1,2,3,4 "${GRID[@]}" --map-layers 2,3,4,last --trained-lambda "$CTRL" --out-prefix $OUT/pure_d16
measure ptb15_init $PY scripts/analyze_collapse.py --arch transformer_lm_gpam_ptb --random-init --seeds 1,2 \
  "${GRID[@]}" --map-layers 1,8,last --trained-lambda "$CTRL" --out-prefix $OUT/ptb15_init
measure iwslt_init $PY scripts/analyze_collapse.py --arch transformer_gpam_iwslt_de_en --task translation --random-init \
  --seeds 1,2 "${GRID[@]}" --map-layers 1,3,last --trained-lambda "$CTRL" --out-prefix $OUT/iwslt_init

# The same controlled run with 1000 updates instead of 150 (run alongside iwslt_init), so that the
# lambdas have longer to move; its trained_lambda.csv is copied here.
measure controlled_trainable_lambda_run_1000 $PY examples/ptb/controlled/run_controlled.py --synthetic --small \
  --max-update 1000 --attention-types dagpam --extra-train-args "--gpam-trainable-lambda --gpam-lambda-scope head" \
  --out-dir "$CTRL_1000"
cp "$CTRL_1000/trained_lambda.csv" $OUT/controlled_1000_trained_lambda.csv

# Finally every map drawn again from its CSV (nothing measured again; PREFIX_map.csv comes out
# identical): the residual panels' colour scale fitted to the data, and both controlled runs marked.
measure trained_lambda_both $PY scripts/analyze_collapse.py --trained-lambda "$CTRL" "$CTRL_1000" --out-prefix $OUT/controlled_both
measure pure_d8_replot $PY scripts/analyze_collapse.py --from-csv $OUT/pure_d8.csv --map-layers 2,3,4,last \
  --trained-lambda "$CTRL" "$CTRL_1000" --out-prefix $OUT/pure_d8
measure pure_d16_replot $PY scripts/analyze_collapse.py --from-csv $OUT/pure_d16.csv --map-layers 2,3,4,last \
  --trained-lambda "$CTRL" "$CTRL_1000" --out-prefix $OUT/pure_d16
measure ptb15_init_replot $PY scripts/analyze_collapse.py --from-csv $OUT/ptb15_init.csv --map-layers 1,8,last \
  --trained-lambda "$CTRL" "$CTRL_1000" --out-prefix $OUT/ptb15_init
measure iwslt_init_replot $PY scripts/analyze_collapse.py --from-csv $OUT/iwslt_init.csv --map-layers 1,3,last \
  --trained-lambda "$CTRL" "$CTRL_1000" --out-prefix $OUT/iwslt_init
