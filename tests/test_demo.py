"""`make demo`'s script, run small: it must print the table and write its results."""

import json
import os
import subprocess
import sys

from helpers import REPO


def test_demo_runs_end_to_end_and_prints_the_table(tmp_path):
    out_dir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "quickstart", "demo.py"), "--out", str(out_dir),
         "--max-update", "20", "--train-size", "600", "--test-size", "40"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "toy task" in out  # says plainly that the corpus is synthetic
    assert "| system | attention | BLEU | chrF | parameters | extra vs softmax | train words/s |" in out
    assert "BLEU signature: nrefs:1|case:mixed|eff:no|tok:13a" in out
    assert "tensorboard logs:" in out
    rows = json.loads((out_dir / "results.json").read_text())
    assert [r["attention"] for r in rows] == ["softmax", "dagpam"]
    for r in rows:
        assert r["params"] > 0 and r["wps"] > 0 and 0 <= r["bleu"] <= 100
    assert rows[1]["params"] > rows[0]["params"]
    assert (out_dir / "tensorboard" / "dagpam" / "train").is_dir()
