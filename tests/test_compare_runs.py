"""scripts/compare_runs.py on synthetic run folders with known answers (identical outputs: no p-value)."""

import csv
import json
import os
import random
import subprocess
import sys

import pytest

import compare_runs  # scripts/, on the path through conftest.py
from helpers import REPO

WORDS = "the a cat dog house tree sees likes big small red blue old new fast and".split()


def corpus(n=80, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(n)]


def noisy(refs, p, seed):
    """Each word replaced with probability p: a system of middling quality."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) if rng.random() < p else w for w in r.split()) for r in refs]


def make_run(root, name, hyps, refs, seed=1, attention="dagpam", valid_losses=None, **extra):
    d = root / name
    d.mkdir()
    (d / "hyps.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    (d / "refs.txt").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    run = {"system": name, "attention_type": attention, "seed": seed, "bleu": bleu.corpus_score(hyps, [refs]).score,
           "bleu_signature": str(bleu.get_signature()), "bleu_lowercase": False, "params": 1000, "train_wps": 50.0,
           "files": {"hyps": "hyps.txt", "refs": "refs.txt"}, **extra}
    (d / "run.json").write_text(json.dumps(run), encoding="utf-8")
    if valid_losses:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(str(d / "tensorboard" / "valid"))
        for step, loss in valid_losses:
            w.add_scalar("loss", loss, step)
        w.close()
    return str(d)


@pytest.fixture()
def runs(tmp_path):
    refs = corpus()
    base_hyps = noisy(refs, 0.5, seed=1)
    return {
        "root": tmp_path,
        "refs": refs,
        "baseline": make_run(tmp_path, "baseline_seed1", base_hyps, refs, attention="softmax",
                             valid_losses=[(10, 5.0), (20, 4.0)]),
        "identical": make_run(tmp_path, "same_seed1", list(base_hyps), refs, valid_losses=[(10, 5.1), (20, 4.2)]),
        "copy": make_run(tmp_path, "copy_seed1", list(refs), refs),
        "g1": make_run(tmp_path, "gpam_seed1", noisy(refs, 0.4, seed=2), refs, seed=1),
        "g2": make_run(tmp_path, "gpam_seed2", noisy(refs, 0.3, seed=3), refs, seed=2),
    }


def significance_by_run(sig_rows):
    return {row[0]: row for row in sig_rows}


def test_identical_outputs_give_equal_scores_and_zero_delta(runs, tmp_path):
    _, rows, _, sig = compare_runs.main(["--baseline", runs["baseline"], runs["identical"], "--csv",
                                         str(tmp_path / "c.csv"), "--ar-trials", "2000"])
    row = significance_by_run(sig)["same_seed1"]
    assert row[2] == row[3] and row[4] == "+0.00"
    # sacreBLEU's tests give p = 1/(n+1) for a zero delta by construction: the table
    # says there is nothing to test instead of printing a p that looks significant
    assert row[5] == row[6] == "n/a (identical outputs)"
    assert rows[0][3] == rows[1][3]


def test_reference_copying_system_wins_significantly_with_both_tests(runs, tmp_path):
    _, _, _, sig = compare_runs.main(["--baseline", runs["baseline"], runs["copy"], "--csv", str(tmp_path / "c.csv"),
                                      "--ar-trials", "2000"])
    row = significance_by_run(sig)["copy_seed1"]
    assert float(row[3]) == pytest.approx(100.0) and float(row[4]) > 0
    assert float(row[5]) < 0.05 and float(row[6]) < 0.05


def test_seeds_grouped_as_mean_std_csv_and_plot(runs, tmp_path):
    csv_path, png = tmp_path / "table.csv", tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare_runs.py"), "--baseline",
                           runs["baseline"], runs["g1"], runs["g2"], runs["identical"], "--csv", str(csv_path),
                           "--plot", str(png), "--bootstrap", "200", "--ar-trials", "200"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| system | attention | seeds | BLEU |" in out and "baseline_seed1" not in out.split("\n")[2]
    gpam = [line for line in out.splitlines() if line.startswith("| gpam |")]
    assert len(gpam) == 1 and "| 1, 2 |" in gpam[0] and "±" in gpam[0]
    with open(csv_path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:4] == ["system", "attention", "seeds", "BLEU"] and len(table) == 1 + 3
    assert table[1][0] == "baseline (baseline)"
    sig_csv = tmp_path / "table_significance.csv"
    assert sig_csv.exists() and len(sig_csv.read_text().splitlines()) == 1 + 3
    assert png.exists() and png.stat().st_size > 1000 and "2 validation curves" in out


def test_language_model_runs_and_errors(tmp_path):
    for name, ppl, seed in (("lm_base_seed1", 30.0, 1), ("lm_gpam_seed1", 29.0, 1), ("lm_gpam_seed2", 29.5, 2)):
        d = tmp_path / name
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"system": name, "seed": seed, "perplexity": ppl, "params": 10}))
    _, rows, _, sig = compare_runs.main(["--baseline", str(tmp_path / "lm_base_seed1"), str(tmp_path / "lm_gpam_seed1"),
                                         str(tmp_path / "lm_gpam_seed2"), "--csv", str(tmp_path / "lm.csv")])
    assert sig == [] and rows[1][0] == "lm_gpam" and rows[1][3] == "29.25 ± 0.35"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare_runs.py"), "--baseline",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "no run.json" in proc.stderr
