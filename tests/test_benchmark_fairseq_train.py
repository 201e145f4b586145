"""scripts/benchmark_fairseq_train.py: real fairseq-train runs, stock and daGPAM side by side (CPU smoke run),
and scripts/gpu_session.sh, the one command of the GPU checks, is valid shell naming existing flags."""

import csv
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = os.path.join(REPO, "scripts", "benchmark_fairseq_train.py")
sys.path.insert(0, os.path.join(REPO, "scripts"))

import benchmark_fairseq_train as bft  # noqa: E402


def test_quick_run_trains_both_architectures_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--pairs", "iwslt", "--work-dir", str(tmp_path / "data"),
                           "--out-dir", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "fairseq_train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arch"] for r in rows] == ["transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en"]
    assert all(float(r["median_wps"]) > 0 and int(r["updates"]) == 6 for r in rows)
    assert float(rows[0]["ratio_to_stock"]) == 1.0
    assert float(rows[1]["ratio_to_stock"]) == pytest.approx(float(rows[1]["median_wps"]) / float(rows[0]["median_wps"]))
    table = (out / "fairseq_train.md").read_text()
    assert "| iwslt | 1 | transformer_iwslt_de_en |" in table and table in proc.stdout
    # the logs are fairseq-train's own, with our plugin loaded in both runs (identical settings)
    for row in rows:
        log = (out / f"iwslt-{row['arch']}-round1.log").read_text()
        assert f"arch='{row['arch']}'" in log and "gpam_fairseq" in log


def test_median_skips_warm_up_records():
    lines = [f'x | INFO | train_inner | {{"wps": "{w}", "num_updates": "{i}"}}' for i, w in enumerate([1, 2, 10, 12, 11])]
    assert bft.median_wps("\n".join(lines), skip=2) == (11.0, 4)
    with pytest.raises(SystemExit, match="no train_inner record"):
        bft.median_wps("nothing here", skip=0)


@pytest.mark.parametrize("argv, message", [(["--pairs", "iwslt,bert"], "--pairs: unknown"),
                                          (["--device", "cpu", "--precision", "fp16"], "fp16 needs CUDA")])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        bft.parse_args(argv)
    assert message in capsys.readouterr().err


def test_gpu_session_is_valid_shell_and_its_flags_exist():
    path = os.path.join(REPO, "scripts", "gpu_session.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read().replace("\\\n", " ")
    checked = 0
    for line in text.splitlines():
        m = re.search(r"\$py (scripts/\S+\.py)(.*)", line)
        if not m:
            continue
        helptext = subprocess.run([sys.executable, m.group(1), "--help"], capture_output=True, text=True, cwd=REPO).stdout
        for flag in re.findall(r"(--[a-z][a-z0-9-]*)", m.group(2)):
            assert flag in helptext, f"{m.group(1)} has no {flag}"
            checked += 1
    assert checked >= 10
