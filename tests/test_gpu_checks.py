"""scripts/gpu_checks.py: one command; without CUDA it says so and succeeds, its table is well formed."""

import csv
import importlib
import os
import subprocess
import sys

from helpers import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu_checks.py")


def load_script():
    return importlib.import_module("gpam_fairseq.measurement.gpu_checks")


def test_skips_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a GPU machine
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("skipped: no CUDA"), proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_lists_the_checks_of_the_issue():
    out = subprocess.run([sys.executable, SCRIPT, "--list"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.split() == ["nmt_2ranks_gloo", "lm_adaptive_2ranks_legacy_ddp", "fp16_loss_scale", "autocast_bf16",
                           "autocast_fp16", "fairseq_bf16_flag"]


def test_log_parsing_and_tables(tmp_path):
    gc = load_script()
    log = ('2026-01-01 | INFO | train_inner | {"epoch": 1, "loss": "5.1", "loss_scale": "64", "num_updates": "10"}\n'
           "noise\n"
           '2026-01-01 | INFO | train_inner | {"epoch": 1, "loss": "4.9", "loss_scale": "128", "num_updates": "20"}\n')
    assert [r["loss_scale"] for r in gc.log_records(log.splitlines(), "train_inner")] == ["64", "128"]
    assert gc.last_error("a\nRuntimeError: boom\nb\n") == "RuntimeError: boom"
    rows = [{"check": "fp16_loss_scale", "result": "PASS", "details": "x"},
            {"check": "nmt_2ranks_gloo", "result": "FAIL", "details": "y"}]
    md = gc.write_tables(rows, str(tmp_path))
    assert md.splitlines()[2] == "| fp16_loss_scale | PASS | x |"
    with open(tmp_path / "gpu_checks.csv") as f:
        assert list(csv.DictReader(f)) == rows
