"""scripts/gpu_session.sh --rehearse: every step of the real GPU session, on the CPU at tiny sizes, exits 0
and writes the result files the real session writes; the two modes run the same command lines."""

import csv
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from helpers import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu_session.sh")
STEPS = ["cuda_tests", "fairseq_train_bf16", "fairseq_train_fp16", "fairseq_train_wmt_bf16", "fairseq_train_wmt_fp16",
         "gpu_checks", "benchmark_models", "benchmark_modules"]
PLANNED = STEPS[:4]  # within the real session's 540 s; the others run when time is left


def session(*args, timeout=3600):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # the CPU, even on a GPU machine
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session") / "out"
    proc = session("--rehearse", str(out))
    return out, proc


def test_every_step_of_the_rehearsal_exits_0(rehearsal):
    out, proc = rehearsal
    summary = (out / "summary.log").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    assert "REHEARSAL on the CPU" in summary and "nvidia-smi" not in summary
    ran = re.findall(r"^== (\w+) \(at most \d+s\): .*\n   exit (\d+) after \d+s$", summary, re.M)
    assert ran == [(name, "0") for name in STEPS], summary
    assert summary.rstrip().endswith("ALL STEPS EXITED 0")
    for name in STEPS:
        assert (out / f"{name}.log").exists()


def test_the_rehearsal_writes_the_result_files_and_they_parse(rehearsal):
    out, proc = rehearsal
    results = out / "results"
    # the CUDA tests: collected, and on a CPU every one skips with a reason that names CUDA or the GPU
    cases = ET.parse(results / "cuda_tests.xml").getroot().iter("testcase")
    outcomes = {}
    for case in cases:
        skipped = case.find("skipped")
        assert case.find("failure") is None and case.find("error") is None, ET.tostring(case)[:500]
        outcomes[case.get("name")] = skipped.get("message") if skipped is not None else "passed"
    assert any(name.startswith("test_cuda_paths_match_reference") for name in outcomes), outcomes
    for name, outcome in outcomes.items():
        if name.startswith(("test_cuda", "test_fully_sharded_on_a_gpu")):
            assert re.search(r"CUDA|GPU", outcome), (name, outcome)
    # the fairseq-train comparisons: the three pairs in bf16 and in half precision, the first with two
    # rounds (a spread; the real session gives every one two), the others with one in the rehearsal
    for step, precision, pairs, rounds in (("fairseq_train_bf16", "bf16", ["iwslt", "lm512"], 2),
                                           ("fairseq_train_fp16", "memory-efficient-fp16", ["iwslt", "lm512"], 1),
                                           ("fairseq_train_wmt_bf16", "bf16", ["wmt_big"], 1),
                                           ("fairseq_train_wmt_fp16", "memory-efficient-fp16", ["wmt_big"], 1)):
        with open(results / step / "fairseq_train.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["pair"] for r in rows] == [p for p in pairs for _ in range(2 * rounds)]
        for r in rows:
            assert r["precision"] == precision and r["peak_kind"] == "process_max_rss"
            assert float(r["median_wps"]) > 0 and float(r["peak_mib"]) > 0 and r["cuda_peak_mib"] == ""
            assert float(r["max_rss_mib"]) == float(r["peak_mib"]) and float(r["mem_ratio_to_stock"]) > 0
        table = (results / step / "fairseq_train.md").read_text()
        assert ("(rounds " in table) == (rounds > 1) and "Peak memory, MiB" in table
        # the precision flag reached fairseq-train (its logged configuration)
        log = next((results / step).glob("*-round1.log")).read_text()
        flag = {"bf16": "'bf16': True", "memory-efficient-fp16": "'memory_efficient_fp16': True"}[precision]
        assert flag in log, step
    # the benchmarks, bf16 rows of every level asked for
    for step, levels in (("benchmark_models", {"train", "beam"}), ("benchmark_modules", {"core", "attention"})):
        with open(results / step / "benchmark.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["level"] for r in rows} == levels and {r["dtype"] for r in rows} == {"bf16"}
        assert all(float(r["median_ms"]) > 0 for r in rows)
    assert (out / "gpu_checks.log").read_text().startswith("skipped: no CUDA")


def command_lines(*mode):
    """{step: (limit, argv)} of the plan that --dry-run prints."""
    proc = session(*mode, "--dry-run", "/tmp/gpu_session_plan", timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = re.findall(r"^== (\w+) \(at most (\d+)s\): (.*)$", proc.stdout, re.M)
    return {name: (int(limit), shlex.split(cmd)) for name, limit, cmd in steps}, proc.stdout


def test_both_modes_run_the_same_command_lines_but_for_device_sizes_and_limits():
    real, real_plan = command_lines()
    rehearsal, _ = command_lines("--rehearse")
    assert list(real) == list(rehearsal) == STEPS
    # the real plan fits its 540 s with 20 s for the header; the steps after the fourth beyond it
    assert re.search(r"^mode real, budget 540s; planned limits: .* \(total (\d+)s\)$", real_plan, re.M)
    total = int(re.search(r"\(total (\d+)s\)", real_plan).group(1))
    assert total == sum(real[s][0] for s in PLANNED) <= 540 - 20
    beyond = " ".join(f"{s} {real[s][0]}s" for s in STEPS[len(PLANNED):])
    assert f"beyond the budget, run only if the steps above end early: {beyond}" in real_plan
    # in the real session every fairseq-train comparison has two rounds: a spread
    for name in STEPS:
        if name.startswith("fairseq_train"):
            argv = real[name][1]
            assert argv[argv.index("--rounds") + 1] == "2", name
    # what the mode may change: the device (and the half precision it allows), sizes; nothing else
    for name in STEPS:
        assert without_device_and_sizes(real[name][1]) == without_device_and_sizes(rehearsal[name][1]), name


SIZE_FLAGS = {"--updates", "--discard-updates", "--log-interval", "--workers", "--rounds", "--work-dir"}
DEVICE_VALUES = {"cuda", "cpu", "fp16", "memory-efficient-fp16"}


def without_device_and_sizes(argv):
    kept, skip_value = [], False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token in SIZE_FLAGS:
            skip_value = True
        elif token != "--quick" and token not in DEVICE_VALUES:
            kept.append(token)
    return kept


def test_the_flags_of_every_step_exist():
    """Each Python script's flags in the real plan are in its --help (a renamed flag breaks the plan)."""
    real, _ = command_lines()
    checked, helptexts = 0, {}
    for name, (_, argv) in real.items():
        if argv[1] == "-m":
            continue  # pytest
        if argv[1] not in helptexts:
            helptexts[argv[1]] = subprocess.run([sys.executable, argv[1], "--help"], capture_output=True, text=True,
                                                cwd=REPO).stdout
        helptext = helptexts[argv[1]]
        for flag in (t for t in argv[2:] if t.startswith("--")):
            assert flag in helptext, f"{argv[1]} has no {flag}"
            checked += 1
    assert checked >= 30


def test_an_unknown_option_is_refused_in_one_line():
    proc = session("--rehearsal", "/tmp/x", timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "unknown option --rehearsal" in proc.stderr
