#!/usr/bin/env bash
# Tables and curves of the real-text grid from whatever cells have finished:
#   bash docs/runs/2026-12-08_real_text/report.sh
# scripts/compare_runs.py per data set (mean ± sd over seeds, the paired bootstrap and
# approximate randomisation per seed, the tests across seeds, decoding cost, validation curves).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
finished() { for d in "$@"; do [ -e "$d/.evaluate.done" ] && echo "$d"; done; }
for group in fr-en es-en lm_en; do
    runs=$HERE/$group/runs
    [ -d "$runs" ] || continue
    base=$(finished "$runs"/baseline_tiny*_seed*)
    others=$(finished $(ls -d "$runs"/*_seed* | grep -v "/baseline_tiny"))
    [ -n "$base" ] && [ -n "$others" ] || { echo "$group: no finished baseline and other cell yet"; continue; }
    { echo "# $group: scripts/compare_runs.py ($(date '+%F %T'))"; echo
      $PY "$REPO/scripts/compare_runs.py" $(for b in $base; do echo --baseline "$b"; done) $others \
          --csv "$HERE/$group/comparison.csv" --plot "$HERE/$group/valid_curves.png"; } > "$HERE/$group/comparison.md" 2>&1
    echo "$group: $HERE/$group/comparison.md"
done
