#!/usr/bin/env bash
# The real-text grid: daGPAM against softmax on human-written text this machine holds (gettext
# catalogs: French->English and Spanish->English; the Python documentation's reST sources:
# English LM), through examples/own_corpus and scripts/sweep.py, on the CPU.
#
#   bash docs/runs/2026-12-08_real_text/run_grid.sh                    # everything, resumable
#   bash docs/runs/2026-12-08_real_text/run_grid.sh fr-en &            # or two halves side by side,
#   bash docs/runs/2026-12-08_real_text/run_grid.sh es-en lm_en &      # one core each (OMP_NUM_THREADS=1)
#   MAX_UPDATE=3000 bash docs/runs/2026-12-08_real_text/run_grid.sh    # later: every cell trained on to 3000
#
# Rerun the same command after an interruption: prepared data is kept, finished cells are
# skipped, interrupted cells go on from their checkpoint_last.pt (saved every 250 updates).
# The code that trains is the commit in CODE_COMMIT (a copy outside the work tree), so that edits
# to the work tree cannot reach a running grid. Data and checkpoints live under $WORK (not
# committed); run folders (logs, run.json, hypotheses, tensorboard) under this folder.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
WORK=${WORK:-/work/real_text}
COMMIT=$(cat "$HERE/CODE_COMMIT")
CODE=$WORK/code-$COMMIT
if [ ! -d "$CODE" ]; then
    mkdir -p "$CODE.tmp" && git -C "$REPO" archive "$COMMIT" | tar -x -C "$CODE.tmp" && mv "$CODE.tmp" "$CODE" || exit 2
fi
export PYTHONPATH=$CODE OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WORKERS=1 BPE_SIZE=8000 SIZE=tiny
export EXTRA_ARGS="--validate-interval-updates 250 --save-interval-updates 250 --keep-interval-updates 1 --required-batch-size-multiple 1"
MAX_UPDATE=${MAX_UPDATE:-1500}
GROUPS_TO_RUN=${*:-fr-en es-en lm_en}
SEEDS=${SEEDS:-1 2 3}
STAGE="$PY $CODE/examples/own_corpus"
SWEEP="$PY $CODE/scripts/sweep.py own_corpus --max-update $MAX_UPDATE"

prepare() {  # TASK SRC TGT NAME INPUT...
    local task=$1 src=$2 tgt=$3 name=$4; shift 4
    TASK=$task SRC=$src TGT=$tgt DATA_DIR=$WORK/data/$name $STAGE/prepare.py "$@" >> "$HERE/prepare_$name.log" 2>&1 &&
    TASK=$task SRC=$src TGT=$tgt DATA_DIR=$WORK/data/$name $STAGE/preprocess.py >> "$HERE/prepare_$name.log" 2>&1 ||
    { echo "prepare $name failed: see $HERE/prepare_$name.log"; exit 2; }
    cp "$WORK/data/$name/prepared/own_corpus.json" "$HERE/data_$name.json"
}

sweep() {  # TASK SRC TGT NAME SEED SWEEP-ARGS...
    local task=$1 src=$2 tgt=$3 name=$4 seed=$5; shift 5
    TASK=$task SRC=$src TGT=$tgt DATA_DIR=$WORK/data/$name $SWEEP --seeds "$seed" --out "$HERE/$name" \
        --checkpoints "$WORK/checkpoints/$name" "$@" >> "$HERE/sweep_$name.log" 2>&1 ||
        echo "$(date '+%F %T') sweep $name seed $seed $*: exit $? (see sweep_$name.log; rerun to retry)"
}

prepare translation fr en fr-en --catalogs /usr/share/locale/fr/LC_MESSAGES
prepare translation es en es-en --catalogs /usr/share/locale/es/LC_MESSAGES
prepare lm en "" lm_en --text /usr/share/doc/python3.11/html/_sources

for seed in $SEEDS; do  # seed by seed, so that every system has as many seeds at any time
    for group in $GROUPS_TO_RUN; do
        case $group in
        fr-en) sweep translation fr en fr-en "$seed" --lambda-pos 0.2 --lambda fixed trainable --controls baseline_params
               sweep translation fr en fr-en "$seed" --lambda-pos 1 --no-baseline ;;
        es-en) sweep translation es en es-en "$seed" --lambda-pos 0.2 ;;
        lm_en) sweep lm en "" lm_en "$seed" --lambda-pos 0.2 --lambda fixed trainable ;;
        *) echo "unknown group $group: fr-en, es-en, lm_en"; exit 2 ;;
        esac
    done
done
echo "$(date '+%F %T') grid finished ($GROUPS_TO_RUN; MAX_UPDATE=$MAX_UPDATE, seeds $SEEDS)"
