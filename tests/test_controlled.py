"""examples/ptb/controlled/run_controlled.py end to end (--quick) and its synthetic corpus."""

import collections
import csv
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = os.path.join(REPO, "examples", "ptb", "controlled", "run_controlled.py")
_spec = importlib.util.spec_from_file_location("run_controlled", SCRIPT)
run_controlled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_controlled)


def test_synthetic_corpus_is_a_first_order_chain(tmp_path):
    """Each word is followed by at most 4 distinct words, whatever came before it (first order),
    and the chain's own perplexity is that of its 8:4:2:1 successor weights."""
    chain_ppl = run_controlled.write_synthetic_corpus(str(tmp_path))
    successors = collections.defaultdict(set)
    for split in ("train", "valid", "test"):
        with open(tmp_path / f"{split}.txt") as f:
            for line in f:
                words = line.split()
                for prev, word in zip(words, words[1:]):
                    successors[prev].add(word)
    assert len(successors) > 50 and max(len(s) for s in successors.values()) <= 4
    # 4 distinct successors weighted 8:4:2:1 give exp(H) = 3.12; successors drawn twice are likelier
    entropy = -sum(w / 15 * math.log(w / 15) for w in (8, 4, 2, 1))
    assert 2.5 < chain_ppl <= math.exp(entropy) + 0.05
    assert run_controlled.write_synthetic_corpus(str(tmp_path / "again")) == chain_ppl  # deterministic


def test_run_controlled_quick_end_to_end(tmp_path):
    out = tmp_path / "ctrl"
    proc = subprocess.run([sys.executable, SCRIPT, "--synthetic", "--quick", "--attention-types", "softmax,dagpam",
                           "--out-dir", str(out)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chain_ppl = float(re.search(r"the chain's own perplexity on the test words: ([\d.]+)", proc.stdout).group(1))
    assert chain_ppl == pytest.approx(
        run_controlled.write_synthetic_corpus(str(tmp_path / "corpus"), sentences=(400, 40, 40)), abs=1e-3)
    with open(out / "results.csv") as f:
        rows = {r["attention_type"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["softmax", "dagpam"]
    for r in rows.values():
        ppl = float(r["test_ppl"])
        # 4 updates: far from the chain, and from a 150-word model's worst, but a number
        assert math.isfinite(ppl) and chain_ppl < ppl and float(r["valid_ppl"]) > 1
        assert math.isfinite(float(r["residual_ratio_last_layer"])) and -1 <= float(r["mean_cosine_last_layer"]) <= 1
    # daGPAM: one W_Q- (d_h x d_h, d_h = 16 / 2 heads) per layer, 2 layers
    assert int(rows["dagpam"]["parameters"]) - int(rows["softmax"]["parameters"]) == 2 * 8 * 8
    with open(out / "collapse.csv") as f:
        layers = collections.Counter(r["attention_type"] for r in csv.DictReader(f))
    assert layers == {"softmax": 3, "dagpam": 3}  # the input and 2 layers each
    results = (out / "results.md").read_text()
    assert "| softmax |" in results and "| dagpam |" in results and "first-order Markov chain" in results
    assert (out / "collapse.png").stat().st_size > 0
    for t in ("softmax", "dagpam"):
        assert (out / "ckpt" / t / "checkpoint_best.pt").exists() and (out / "logs" / f"{t}.eval.log").exists()
