"""scripts/benchmark.py: the kernel and saved-bytes budgets that the ops level measures, and
a --quick run of every row (its timings mean nothing on a CPU: the tests check the rows)."""

import csv
import math

import pytest
import torch

from gpam_fairseq.attention.mechanisms import MECHANISMS
from gpam_fairseq.measurement.benchmark import cli, inputs, ops, report

# The budgets of the fused paths, in kernels launched (a fused attention call counting one
# each way, as on a GPU) and bytes kept for the backward pass, against stock fairseq.
MODULE_KERNELS_DAGPAM = 1.25  # every role, per module
STEP_KERNELS_DAGPAM = 1.10  # a whole training step: iwslt and lm512
STEP_KERNELS_DAGPAM_NMT = 1.02  # a whole training step: iwslt and wmt_big
STEP_SAVED_DAGPAM = 1.05  # iwslt and wmt_big, at their real dictionary sizes


@pytest.fixture(scope="module")
def ops_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("ops")
    rows = cli.main(["--levels", "ops", "--types", "softmax,dagpam", "--out-dir", str(out)])
    return {(r["shape"], r["variant"]): r for r in rows}, out


def test_ops_level_rows_and_csv(ops_rows):
    rows, out = ops_rows
    want = {(shape, v) for shape in (*ops.ROLES, *ops.OPS_PAIRS)
            for v in ("stock", "softmax", "dagpam", inputs.RECOMPUTED)}
    assert set(rows) == want
    for r in rows.values():
        assert r["note"] == "" and r["kernels"] > 0 and r["kernels_forward"] > 0
        assert (r["kernels_backward"] == 0) == (r["path"] == "beam step")  # beam steps: forward only
    with open(out / "ops.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == report.OPS_FIELDS and len(table) == len(want)
    md = (out / "benchmark.md").read_text()
    assert "| iwslt | train step | dagpam |" in md and "saved for backward" in md


@pytest.mark.parametrize("role", ops.ROLES)
def test_module_kernel_budget_in_every_role(ops_rows, role):
    rows, _ = ops_rows
    stock, softmax, dagpam = (rows[(role, v)] for v in ("stock", "softmax", "dagpam"))
    assert softmax["kernels"] <= stock["kernels"], (softmax, stock)
    assert dagpam["kernels"] <= MODULE_KERNELS_DAGPAM * stock["kernels"], (dagpam, stock)
    assert dagpam["host_syncs"] == stock["host_syncs"] == 0


@pytest.mark.parametrize("pair", ["iwslt", "lm512"])
def test_training_step_kernel_budget(ops_rows, pair):
    rows, _ = ops_rows
    stock, softmax, dagpam = (rows[(pair, v)] for v in ("stock", "softmax", "dagpam"))
    assert dagpam["kernels"] <= STEP_KERNELS_DAGPAM * stock["kernels"], (dagpam, stock)
    assert softmax["kernels"] <= stock["kernels"]
    assert dagpam["host_syncs"] <= stock["host_syncs"]  # none of ours: fairseq's own


@pytest.mark.parametrize("pair", ["iwslt", "wmt_big"])
def test_training_step_saved_bytes_budget(ops_rows, pair):
    rows, _ = ops_rows
    stock, dagpam, recomputed = rows[(pair, "stock")], rows[(pair, "dagpam")], rows[(pair, inputs.RECOMPUTED)]
    assert dagpam["saved_mib"] <= STEP_SAVED_DAGPAM * stock["saved_mib"], (dagpam, stock)
    assert dagpam["kernels"] <= STEP_KERNELS_DAGPAM_NMT * stock["kernels"], (dagpam, stock)
    # recomputing the attention in the backward pass: less than keeping it, in both currencies
    assert recomputed["saved_mib"] < dagpam["saved_mib"] and recomputed["kernels"] > dagpam["kernels"]
    assert recomputed["kernels"] <= STEP_KERNELS_DAGPAM * stock["kernels"]


def expected_rows(dtype):
    """(level, shape, variant, path) of every timed row a --quick run must produce."""
    rows = set()
    for shape in inputs.QUICK_SHAPES:
        rows.add(("core", shape.name, "sdpa", "one call"))
        rows |= {("attention", shape.name, "stock", p) for p in ("fast", "weights")}
        rows.add(("train", shape.name, "stock", "train"))
        if not shape.is_lm:
            rows.add(("beam", shape.name, "stock", "beam5"))
        for name in MECHANISMS:
            rows |= {(lv, shape.name, name, p) for lv in ("core", "attention") for p in ("fused", "explicit")}
            rows.add(("train", shape.name, name, "train"))
            if not shape.is_lm:
                rows.add(("beam", shape.name, name, "beam5"))
    return {row + (dtype,) for row in rows}


def check_timed_rows(rows, want):
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
    rows = cli.main(["--quick", "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --quick's one thread does not leak into the tests
    counted = [r for r in rows if r["level"] == "ops"]
    timed = [r for r in rows if r["level"] != "ops"]
    assert {(r["shape"], r["variant"]) for r in counted} == {
        (s, v) for s in (*ops.ROLES, *ops.OPS_PAIRS) for v in ("stock", *MECHANISMS, inputs.RECOMPUTED)}
    assert all(r["note"] == "" and r["kernels"] > 0 for r in counted)
    check_timed_rows(timed, expected_rows("fp32"))
    progress = capsys.readouterr().out
    assert "train group 1/" in progress and "done in" in progress

    with open(tmp_path / "benchmark.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [r["variant"] for r in timed]
    assert tuple(table[0]) == report.FIELDS
    for r in table:
        assert math.isfinite(float(r["time_ratio"])) and r["peak_mem_mb"] == "n/a"
    png = (tmp_path / "benchmark.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    md = (tmp_path / "benchmark.md").read_text()
    assert "--quick" in md and "| core | iwslt | fp32 | dagpam | fused |" in md and "| enc_self | module | dagpam |" in md


def test_beam_level_alone_builds_its_own_models(tmp_path):
    """No level depends on another having run first."""
    rows = cli.main(["--quick", "--levels", "beam", "--shapes", "iwslt", "--types", "dagpam",
                     "--out-dir", str(tmp_path)])
    assert {(r["variant"], r["note"]) for r in rows} == {("stock", ""), ("dagpam", "")}


def test_bf16_rows_on_the_cpu(tmp_path):
    rows = cli.main(["--quick", "--dtypes", "bf16", "--levels", "core,attention", "--shapes", "lm512",
                     "--out-dir", str(tmp_path)])
    want = {r for r in expected_rows("bf16") if r[0] in ("core", "attention") and r[1] == "lm512"}
    check_timed_rows(rows, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def refused(argv, capsys):
    """The one line a refusal prints on stderr, after checking its exit status 2."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_cuda_without_a_gpu_names_the_flag(tmp_path, capsys):
    assert "--device cuda" in refused(["--device", "cuda", "--out-dir", str(tmp_path)], capsys)


def test_bad_flag_values_name_the_flag(tmp_path, capsys):
    for argv, flag in ((["--dtypes", "fp8"], "--dtypes"), (["--levels", "speed"], "--levels"),
                       (["--shapes", "huge"], "--shapes"), (["--types", "linear"], "--types")):
        assert flag in refused(["--quick", *argv, "--out-dir", str(tmp_path)], capsys)
