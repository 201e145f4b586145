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
    # what it pinned and what it could not: the CPU and the library versions, printed before the training
    import torch

    assert "      not pinnable, and the same figures need the same:\n        CPU: " in out
    assert f"libraries: Python {sys.version.split()[0]}, torch {torch.__version__}" in out
    assert "not the reference run's arguments: no reference weights to compare with" in out
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
    # the weights hashed are the checkpoint translated, and the hash follows every bit of them
    hashes = {r["attention"]: r["weights_sha256"] for r in rows}
    assert f"softmax {hashes['softmax']}, dagpam {hashes['dagpam']}" in out and len(set(hashes.values())) == 2
    best = out_dir / "checkpoints" / "softmax" / "checkpoint_best.pt"
    assert demo.weights_sha256(str(best)) == hashes["softmax"]
    state = torch.load(best, map_location="cpu", weights_only=False)
    weight = next(t for _, t in sorted(state["model"].items()) if t.is_floating_point() and t.numel())
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))  # one ulp up
    torch.save(state, best.with_name("one_ulp_off.pt"))
    assert demo.weights_sha256(str(best.with_name("one_ulp_off.pt"))) != hashes["softmax"]


def test_the_verdict_says_whether_these_are_the_reference_runs_weights(monkeypatch):
    monkeypatch.setattr(demo, "REFERENCE_WEIGHTS", {"softmax": "a" * 64, "dagpam": "b" * 64})
    default = dict(demo.REFERENCE_ARGS)
    assert "the table above is the README's" in demo.reference_verdict(default, {"softmax": "a" * 64, "dagpam": "b" * 64})
    assert "NOT the reference run's weights" in demo.reference_verdict(default, {"softmax": "a" * 64, "dagpam": "c" * 64})
    assert "not the reference run's arguments" in demo.reference_verdict({**default, "seed": 2}, {"softmax": "a" * 64})


def test_demo_gives_the_same_result_whatever_the_callers_threads_and_kernels(quick_demo, tmp_path):
    """The demo pins the arithmetic of its fairseq commands (one thread; on x86-64 MKL's COMPATIBLE
    branch; with AVX2, torch's AVX2 kernels): run again with the caller asking for two threads,
    torch's plain C++ kernels and MKL's AVX2 branch (each of which changes the rounding, hence the
    trained weights: docs/runs/2026-12-03_demo_reproducibility/), it trains bit-identical models,
    prints the same weights hashes and the same scores."""
    import platform

    import torch

    first_dir, first_out = quick_demo
    second_dir = tmp_path / "demo"
    second_out = run_demo(second_dir, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", ATEN_CPU_CAPABILITY="default",
                          MKL_CBWR="AVX2")
    pinned = "arithmetic pinned for the same result on every run: OMP_NUM_THREADS=1, MKL_NUM_THREADS=1"
    if platform.machine().lower() in ("x86_64", "amd64"):
        pinned += ", MKL_CBWR=COMPATIBLE"
    assert pinned in first_out and pinned in second_out
    for system in ("softmax", "dagpam"):
        a, b = (torch.load(d / "checkpoints" / system / "checkpoint_last.pt", map_location="cpu")["model"]
                for d in (first_dir, second_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), system
        assert (first_dir / f"test_{system}.hyp").read_text() == (second_dir / f"test_{system}.hyp").read_text()
    first, second = (json.loads((d / "results.json").read_text()) for d in (first_dir, second_dir))
    fields = ("bleu", "chrf", "params", "weights_sha256")
    assert [[r[k] for k in fields] for r in first] == [[r[k] for k in fields] for r in second]

