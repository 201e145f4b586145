"""`make demo`'s script, run small: it must print the table and write its results."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

_spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "examples", "quickstart", "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


QUICK = ["--max-update", "20", "--train-size", "600", "--test-size", "40"]


def run_demo(out_dir, **env):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "quickstart", "demo.py"), "--out", str(out_dir),
                           *QUICK], capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "demo"
    return out_dir, run_demo(out_dir)


def test_demo_runs_end_to_end_and_prints_the_table(quick_demo):
    out_dir, out = quick_demo
    assert "toy task" in out  # says plainly that the corpus is synthetic
    assert "| system | attention | BLEU | chrF | parameters | extra vs softmax | train words/s |" in out
    assert "BLEU signature: nrefs:1|case:mixed|eff:no|tok:13a" in out
    assert "tensorboard logs:" in out
    rows = json.loads((out_dir / "results.json").read_text())
    assert [r["attention"] for r in rows] == ["softmax", "dagpam"]
    # daGPAM adds one d_h x d_h matrix per attention module: 2 encoder self + 2 decoder self
    # + 2 cross attention, d_h = 64 / 4 heads
    assert rows[1]["params"] - rows[0]["params"] == 6 * 16 * 16
    refs = (out_dir / "raw" / "test.tgt").read_text().splitlines()
    for r in rows:
        assert r["wps"] > 0
        run = out_dir / "runs" / r["attention"]
        hyps = (run / "hyps.txt").read_text().splitlines()
        assert hyps == (out_dir / f"test_{r['attention']}.hyp").read_text().splitlines()
        # the references scored are the test set's, every sentence, in order
        assert (run / "refs.txt").read_text().splitlines() == refs and len(hyps) == 40
        # the BLEU reported is the demo's scoring of those files...
        assert r["bleu"] == demo.score(hyps, refs)["bleu"]
        assert json.loads((run / "run.json").read_text())["bleu"] == r["bleu"]
    # ...and that scoring gives a system that copies the references 100 and the same sentences
    # shuffled across the test set far less (a 20-update model scores near 0 here: no threshold)
    assert demo.score(refs, refs)["bleu"] == pytest.approx(100.0)
    assert demo.score(refs[1:] + refs[:1], refs)["bleu"] < 20
    assert (out_dir / "tensorboard" / "dagpam" / "train").is_dir()


def test_demo_gives_the_same_result_whatever_the_callers_threads_and_kernels(quick_demo, tmp_path):
    """The demo pins the arithmetic of its fairseq commands (one thread; on x86 with AVX2, torch's
    AVX2 kernels and MKL's AVX2 branch): run again with the caller asking for two threads,
    torch's plain C++ kernels and MKL's SSE2 branch (each of which changes the rounding, hence
    the trained weights), it trains bit-identical models and prints the same scores."""
    import torch

    first_dir, first_out = quick_demo
    second_dir = tmp_path / "demo"
    second_out = run_demo(second_dir, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", ATEN_CPU_CAPABILITY="default",
                          MKL_CBWR="COMPATIBLE")
    pinned = "arithmetic pinned for the same result on every run: OMP_NUM_THREADS=1, MKL_NUM_THREADS=1"
    assert pinned in first_out and pinned in second_out
    for system in ("softmax", "dagpam"):
        a, b = (torch.load(d / "checkpoints" / system / "checkpoint_last.pt", map_location="cpu")["model"]
                for d in (first_dir, second_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), system
        assert (first_dir / f"test_{system}.hyp").read_text() == (second_dir / f"test_{system}.hyp").read_text()
    first, second = (json.loads((d / "results.json").read_text()) for d in (first_dir, second_dir))
    assert [(r["bleu"], r["chrf"], r["params"]) for r in first] == [(r["bleu"], r["chrf"], r["params"]) for r in second]

