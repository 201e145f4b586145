"""scripts/benchmark_fairseq_train.py: real fairseq-train runs, stock and daGPAM side by side (CPU smoke run),
their words/s and peak memory. (scripts/gpu_session.sh, which runs it on a GPU: tests/test_gpu_session.py.)"""

import csv
import os
import subprocess
import sys

import pytest

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT as REPO
from gpam_fairseq.measurement import benchmark_fairseq_train as bft

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
        # on a CPU the peak is the process's resident memory (Python, torch, fairseq: hundreds of MiB)
        assert r["peak_kind"] == "process_max_rss" and r["cuda_peak_mib"] == ""
        assert 100 < float(r["peak_mib"]) == float(r["max_rss_mib"]) < 20000
    for s, o in zip(rows[::2], rows[1::2]):
        assert float(s["ratio_to_stock"]) == 1.0 and float(s["mem_ratio_to_stock"]) == 1.0
        assert float(o["ratio_to_stock"]) == pytest.approx(float(o["median_wps"]) / float(s["median_wps"]))
        assert float(o["mem_ratio_to_stock"]) == pytest.approx(float(o["peak_mib"]) / float(s["peak_mib"]), rel=1e-3)
    table = (out / "fairseq_train.md").read_text()
    assert "| iwslt | 2 | transformer_iwslt_de_en |" in table and "(rounds " in table and table in proc.stdout
    assert "Peak memory, MiB: peak resident memory of the fairseq-train process" in table
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
    run = lambda rnd, arch, wps, ratio, mem, mem_ratio: dict(
        pair="p", round=rnd, arch=arch, median_wps=wps, ratio_to_stock=ratio, peak_mib=mem, mem_ratio_to_stock=mem_ratio,
        peak_kind="cuda_max_allocated")
    rows = [run(1, "s", 100.0, 1.0, 1000.0, 1.0), run(1, "o", 90.0, 0.9, 1100.0, 1.1),
            run(2, "s", 120.0, 1.0, 1010.0, 1.0), run(2, "o", 120.0, 1.0, 1050.0, 1050 / 1010),
            run(3, "s", 80.0, 1.0, 990.0, 1.0), run(3, "o", 76.0, 0.95, 1200.0, 1200 / 990)]
    (s,) = bft.summarise(rows)
    assert (s["stock_wps"], s["stock_min"], s["stock_max"]) == (100.0, 80.0, 120.0)
    assert (s["ratio"], s["ratio_min"], s["ratio_max"]) == (0.95, 0.9, 1.0)
    assert bft.ratio_text(s) == "0.950 (rounds 0.900–1.000)"
    assert (s["stock_mem"], s["our_mem"], s["our_mem_min"], s["our_mem_max"]) == (1000.0, 1100.0, 1050.0, 1200.0)
    assert bft.ratio_text(s, "mem_ratio") == "1.100 (rounds 1.040–1.212)"
    assert "one round" in bft.ratio_text(bft.summarise(rows[:2])[0])


def test_peak_memory_is_the_runs_across_fairseqs_per_update_resets():
    class FakeCuda:  # CUDA's peak counter: the maximum allocated since the last reset
        def __init__(self):
            self.now, self.peak = 0, 0

        def allocate(self, mib):
            self.now += mib
            self.peak = max(self.peak, self.now)

        def max_memory_allocated(self, device=None):
            return self.peak

        def reset_peak_memory_stats(self, device=None):
            self.peak = self.now

    cuda = FakeCuda()
    run_peak = bft.keep_peak_across_resets(cuda)
    for update_peak in (300, 700, 200):  # three updates, fairseq resetting the counter after each
        cuda.allocate(update_peak)
        cuda.allocate(-update_peak)
        cuda.reset_peak_memory_stats()
    assert cuda.max_memory_allocated() == 0 and run_peak() == 700
    cuda.allocate(50)
    assert run_peak() == 700
    text = 'x | INFO | train_inner | {}\npeak_memory | {"cuda_peak_mib": 12.5, "max_rss_mib": 900.0}\n'
    assert bft.peak_memory(text) == {"cuda_peak_mib": 12.5, "max_rss_mib": 900.0}
    with pytest.raises(SystemExit, match="no peak memory line"):
        bft.peak_memory("fairseq-train crashed")


def test_the_precision_reaches_fairseq_train_the_same_for_both_architectures():
    args = bft.parse_args(["--device", "cpu", "--precision", "bf16", "--quick"])
    commands = [bft.train_command("data", arch, [], [], args, []) for arch in ("a", "b")]
    for cmd in commands:
        assert cmd[1:3] == [os.path.abspath(SCRIPT), "--as-fairseq-train"] and "--bf16" in cmd and "--cpu" in cmd
    assert [t for t in commands[0] if t != "a"] == [t for t in commands[1] if t != "b"]


@pytest.mark.parametrize("argv, message", [(["--pairs", "iwslt,bert"], "--pairs: unknown"),
                                          (["--device", "cpu", "--precision", "fp16"], "fp16 needs CUDA"),
                                          (["--updates", "50", "--discard-updates", "50"], "leaves nothing"),
                                          (["--rounds", "0"], "--rounds")])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        bft.parse_args(argv)
    assert message in capsys.readouterr().err
