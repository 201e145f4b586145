"""The project's own command lines stop on a user error as argparse and the recipes' stages do: one
line on stderr naming what is wrong, exit status 2 (not Python's 1)."""

import os
import sys

from cli_runs import ENV, run_all
from helpers import REPO


def test_sweep_and_compare_runs_errors_exit_2(tmp_path):
    empty = str(tmp_path / "empty")
    out = run_all({
        "sweep": dict(argv=[sys.executable, os.path.join(REPO, "scripts", "sweep.py"), "ptb", "--quick"],
                      env={**ENV, "DATA_DIR": empty}),
        "sweep_flag": dict(argv=[sys.executable, os.path.join(REPO, "scripts", "sweep.py"), "ptb", "--parallel", "0"],
                           env={**ENV, "DATA_DIR": empty}),
        "compare": dict(argv=[sys.executable, os.path.join(REPO, "scripts", "compare_runs.py"), "--baseline", empty, empty]),
    })
    lines = {name: proc.stderr.strip().splitlines() for name, proc in out.items()}
    assert {name: proc.returncode for name, proc in out.items()} == {"sweep": 2, "sweep_flag": 2, "compare": 2}, lines
    assert lines["sweep"][-1] == (f"sweep: {empty}/data-bin is not binarised: run examples/ptb/prepare.py and "
                                  f"preprocess.py first (same DATA_DIR/SETUP)")
    assert lines["sweep_flag"][-1] == "sweep: --parallel 0: must be 1 or more"
    assert lines["compare"][-1] == f"compare_runs: {empty}: no run.json; run the recipe's evaluate stage for it first"
    assert not any("Traceback" in proc.stderr for proc in out.values())


def test_measurement_command_lines_refuse_with_exit_2():
    """Refusals the measurement scripts raise themselves (after argparse accepted the flags)."""
    script = lambda name, *args: [sys.executable, os.path.join(REPO, "scripts", name), *args]  # noqa: E731
    out = run_all({
        "analyze_collapse": dict(argv=script("analyze_collapse.py", "--random-init")),
        "benchmark": dict(argv=script("benchmark.py", "--levels", "nope")),
        "peak_memory": dict(argv=[sys.executable, "-m", "gpam_fairseq.measurement.peak_memory", "no-such-script"]),
    })
    expected = {"analyze_collapse": "--random-init: needs --arch NAME",
                "benchmark": "benchmark: --levels: unknown 'nope'; choose from ops, core, attention, train, beam",
                "peak_memory": "no console script named 'no-such-script'"}
    for name, proc in out.items():
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines and expected[name] in lines[-1], (name, proc.returncode, lines[-3:])
        assert "Traceback" not in proc.stderr, name
