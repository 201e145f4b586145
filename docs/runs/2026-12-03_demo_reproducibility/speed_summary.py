#!/usr/bin/env python
"""Words/s of the demo's training under MKL's COMPATIBLE branch against its AUTO branch, from the
fairseq-train logs of the interleaved runs of knobs.py (speed.txt): the median of each run's
per-epoch train_wps (30 updates, 1,000 pairs: about 3 updates an epoch), then per branch and system
the runs' values and their ratio.

    python docs/runs/2026-12-03_demo_reproducibility/speed_summary.py /tmp/repro/speed
"""
import glob
import json
import os
import statistics
import sys

folder = sys.argv[1]
runs = {}
for path in sorted(glob.glob(os.path.join(folder, "*_train.log"))):
    name = os.path.basename(path)[:-len("_train.log")]
    config, system = name.rsplit("_", 1)
    with open(path) as f:
        wps = [float(json.loads(line.split("| train | ", 1)[1])["train_wps"]) for line in f if "| train | " in line]
    runs[(config, system)] = statistics.median(wps)
    print(f"{config:14s} {system:8s} median train_wps {runs[(config, system)]:8.0f} over {len(wps)} epochs")
for system in ("softmax", "dagpam"):
    compat = [v for (c, s), v in runs.items() if s == system and c.startswith("compatible")]
    auto = [v for (c, s), v in runs.items() if s == system and c.startswith("auto")]
    if compat and auto:
        print(f"{system}: COMPATIBLE {[round(v) for v in compat]}, AUTO {[round(v) for v in auto]}; "
              f"COMPATIBLE / AUTO (medians) {statistics.median(compat) / statistics.median(auto):.2f}")
