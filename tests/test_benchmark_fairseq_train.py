"""scripts/benchmark_fairseq_train.py: real fairseq-train runs, stock and daGPAM side by side (CPU smoke run),
and scripts/gpu_session.sh, the one command of the GPU checks, is valid shell naming existing flags."""

import csv
import os
import re
import subprocess
import sys

import benchmark_fairseq_train as bft
import pytest

from gpam_fairseq.fairseq_tools import REPO_ROOT as REPO

SCRIPT = os.path.join(REPO, "scripts", "benchmark_fairseq_train.py")


def test_quick_run_trains_both_architectures_in_interleaved_rounds_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--pairs", "iwslt", "--rounds", "2",
                           "--work-dir", str(tmp_path / "data"), "--out-dir", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "fairseq_train.csv") as f:
        rows = list(csv.DictReader(f))
    stock, ours = "transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en"
    assert [(r["round"], r["arch"]) for r in rows] == [("1", stock), ("1", ours), ("2", stock), ("2", ours)]
    for r in rows:  # 6 updates, records every 2, the first 2 updates discarded: updates 4 and 6 kept
        assert int(r["updates"]) == 6 and int(r["records"]) == 2
        assert float(r["min_wps"]) <= float(r["median_wps"]) <= float(r["max_wps"])
    for s, o in zip(rows[::2], rows[1::2]):
        assert float(s["ratio_to_stock"]) == 1.0
        assert float(o["ratio_to_stock"]) == pytest.approx(float(o["median_wps"]) / float(s["median_wps"]))
    table = (out / "fairseq_train.md").read_text()
    assert "| iwslt | 2 | transformer_iwslt_de_en |" in table and "(rounds " in table and table in proc.stdout
    # the logs are fairseq-train's own, with our plugin loaded in both runs (identical settings)
    for row in rows:
        log = (out / f"iwslt-{row['arch']}-round{row['round']}.log").read_text()
        assert f"arch='{row['arch']}'" in log and "gpam_fairseq" in log


def test_steady_state_drops_updates_not_records_and_summary_spreads():
    lines = [f'x | INFO | train_inner | {{"wps": "{w}", "num_updates": "{u}"}}'
             for u, w in ((10, 1), (20, 2), (30, 10), (40, 12), (50, 11))]
    assert bft.steady_wps("\n".join(lines), discard_updates=20) == (11.0, 10.0, 12.0, 3, 50)
    assert bft.steady_wps("\n".join(lines), discard_updates=0)[3] == 5
    with pytest.raises(SystemExit, match="no train_inner record"):
        bft.steady_wps("nothing here", discard_updates=0)
    with pytest.raises(SystemExit, match="after update 50"):
        bft.steady_wps("\n".join(lines), discard_updates=50)
    run = lambda rnd, arch, wps, ratio: dict(pair="p", round=rnd, arch=arch, median_wps=wps, ratio_to_stock=ratio)
    rows = [run(1, "s", 100.0, 1.0), run(1, "o", 90.0, 0.9), run(2, "s", 120.0, 1.0), run(2, "o", 120.0, 1.0),
            run(3, "s", 80.0, 1.0), run(3, "o", 76.0, 0.95)]
    (s,) = bft.summarise(rows)
    assert (s["stock_wps"], s["stock_min"], s["stock_max"]) == (100.0, 80.0, 120.0)
    assert (s["ratio"], s["ratio_min"], s["ratio_max"]) == (0.95, 0.9, 1.0)
    assert bft.ratio_text(s) == "0.950 (rounds 0.900–1.000)"
    assert "one round" in bft.ratio_text(bft.summarise(rows[:2])[0])


@pytest.mark.parametrize("argv, message", [(["--pairs", "iwslt,bert"], "--pairs: unknown"),
                                          (["--device", "cpu", "--precision", "fp16"], "fp16 needs CUDA"),
                                          (["--updates", "50", "--discard-updates", "50"], "leaves nothing"),
                                          (["--rounds", "0"], "--rounds")])
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
