"""Long runs, kept out of `make test`: `make test-slow`."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_full_demo_learns_the_toy_task(tmp_path):
    """`make demo` at its default settings: both systems must learn the reversal task."""
    out_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "quickstart", "demo.py"), "--out", str(out_dir)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-1500:])
    rows = json.loads((out_dir / "results.json").read_text())
    for r in rows:
        assert r["bleu"] > 50, r  # an untrained or attention-blind model scores near 0
