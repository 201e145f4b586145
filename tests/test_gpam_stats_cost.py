"""scripts/gpam_stats_cost.py --quick: the measurement of the tensorboard scalars' cost runs, and
each setting logs the scalars on exactly the updates --gpam-stats-interval asks for."""

import os
import re
import subprocess
import sys

from helpers import REPO


def test_gpam_stats_cost_quick():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpam_stats_cost.py"), "--quick"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    logged = {int(m.group(1)): int(m.group(2)) for m in re.finditer(
        r"^repeat 1: interval (\d+): [\d,]+ words/s \(CPU time\), (\d+) updates with daGPAM scalars$", proc.stdout, re.M)}
    # 10 updates (0-9): interval 0 = off, 10 = update 0 only, 1 = every update
    assert logged == {0: 0, 10: 1, 1: 10}
    table = re.findall(r"^\| (\d+) \| ([\d,]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [int(k) for k, _, _ in table] == [0, 10, 1]
    assert table[0][2] == "1.000" and all(float(r.replace(",", "")) > 0 for _, r, _ in table)
