"""scripts/benchmark.py --quick on the CPU: every row there, finite ratios, CSV and PNG written."""

import csv
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import benchmark  # noqa: E402

from gpam_fairseq.attention.mechanisms import MECHANISMS  # noqa: E402


def expected_rows(dtype):
    """(level, shape, variant, path) of every row a --quick run must produce."""
    rows = set()
    for shape in benchmark.QUICK_SHAPES:
        rows.add(("core", shape.name, "sdpa", "one call"))
        rows |= {("attention", shape.name, "stock", p) for p in ("fast", "weights")}
        rows.add(("train", shape.name, "stock", "train"))
        if shape.beam_sentences:
            rows.add(("beam", shape.name, "stock", "beam5"))
        for name in MECHANISMS:
            rows |= {(lv, shape.name, name, p) for lv in ("core", "attention") for p in ("fused", "explicit")}
            rows.add(("train", shape.name, name, "train"))
            if shape.beam_sentences:
                rows.add(("beam", shape.name, name, "beam5"))
    return {row + (dtype,) for row in rows}


def check_rows(rows, want):
    got = {(r["level"], r["shape"], r["variant"], r["path"], r["dtype"]) for r in rows}
    assert got == want, f"missing {sorted(want - got)}, unexpected {sorted(got - want)}"
    assert len(rows) == len(want)
    for r in rows:
        assert r["note"] == "", f"{r['level']}/{r['shape']}/{r['variant']}/{r['path']}: {r['note']}"
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"])
        assert math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0, r
        assert math.isfinite(r["throughput"]) and r["throughput"] > 0, r
        assert math.isnan(r["peak_mem_mb"])  # no honest per-call figure on a CPU: n/a


def test_quick_run_writes_every_row_csv_markdown_and_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    rows = benchmark.main(["--quick", "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --quick's one thread does not leak into the tests
    check_rows(rows, expected_rows("fp32"))
    progress = capsys.readouterr().out
    assert "group 1/" in progress and "done in" in progress

    with open(tmp_path / "benchmark.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [r["variant"] for r in rows]
    assert tuple(table[0]) == benchmark.FIELDS
    for r in table:
        assert math.isfinite(float(r["time_ratio"])) and r["peak_mem_mb"] == "n/a"
    png = (tmp_path / "benchmark.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    md = (tmp_path / "benchmark.md").read_text()
    assert "--quick" in md and "| core | iwslt | fp32 | dagpam | fused |" in md


def test_bf16_rows_on_the_cpu(tmp_path):
    rows = benchmark.main(["--quick", "--dtypes", "bf16", "--levels", "core,attention", "--shapes", "lm512",
                           "--out-dir", str(tmp_path)])
    want = {r for r in expected_rows("bf16") if r[0] in ("core", "attention") and r[1] == "lm512"}
    check_rows(rows, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_a_gpu_names_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda"):
        benchmark.main(["--device", "cuda", "--out-dir", str(tmp_path)])


def test_bad_flag_values_name_the_flag(tmp_path):
    for argv, flag in ((["--dtypes", "fp8"], "--dtypes"), (["--levels", "speed"], "--levels"),
                       (["--shapes", "huge"], "--shapes")):
        with pytest.raises(SystemExit, match=flag):
            benchmark.main(["--quick", *argv, "--out-dir", str(tmp_path)])
