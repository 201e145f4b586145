"""scripts/compare_runs.py on synthetic run folders with known answers (identical outputs: no p-value)."""

import csv
import json
import os
import random
import subprocess
import sys

import pytest

from gpam_fairseq.recipes import compare as compare_runs
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


# --- across seeds and inference cost ----------------------------------------------------------------

def seeded_runs(root, name, make_hyps, refs, seeds, attention="dagpam", **extra):
    return [make_run(root, f"{name}_seed{s}", make_hyps(s), refs, seed=s, attention=attention, **extra) for s in seeds]


def test_across_seeds_identical_systems_give_zero_and_nothing_significant(tmp_path):
    refs = corpus(40)
    seeds = (1, 2, 3)
    base = seeded_runs(tmp_path, "baseline", lambda s: noisy(refs, 0.5, seed=10 + s), refs, seeds, attention="softmax")
    same = seeded_runs(tmp_path, "same", lambda s: noisy(refs, 0.5, seed=10 + s), refs, seeds)
    out = compare_runs.run([*sum((["--baseline", b] for b in base), []), *same, "--csv", str(tmp_path / "c.csv"),
                            "--bootstrap", "50", "--ar-trials", "50"])
    (row,) = out["seed_rows"]
    assert row[0] == "same" and row[3] == "1, 2, 3 (3)" and row[4] == "+0.00, +0.00, +0.00" and row[5] == "+0.000"
    assert row[6] == "n/a (all deltas 0)" and float(row[7]) == 1.0 and row[9] == "no"
    assert not any("disagree" in n for n in out["seed_notes"])
    assert (tmp_path / "c_seeds.csv").exists()


def test_across_seeds_reference_copying_system(tmp_path, capsys):
    """Three seeds: the t-test calls it significant, the exact sign-flip test cannot go below 2/2^3 = 0.25 and
    the output says so; six seeds: both tests do (smallest two-sided sign-flip p = 2/64)."""
    refs = corpus(40)
    for n in (3, 6):
        root = tmp_path / f"n{n}"
        root.mkdir()
        seeds = range(1, n + 1)
        base = seeded_runs(root, "baseline", lambda s: noisy(refs, 0.4 + 0.03 * s, seed=20 + s), refs, seeds,
                           attention="softmax")
        copy = seeded_runs(root, "copy", lambda s: list(refs), refs, seeds)
        out = compare_runs.run([*sum((["--baseline", b] for b in base), []), *copy, "--csv", str(root / "c.csv"),
                                "--bootstrap", "50", "--ar-trials", "50"])
        (row,) = out["seed_rows"]
        deltas = [float(d) for d in row[4].split(", ")]
        assert len(deltas) == n and all(d > 0 for d in deltas)
        assert float(row[6]) < 0.05 and float(row[7]) == pytest.approx(2 / 2 ** n) == float(row[8])
        if n == 3:
            assert row[9] == "t-test only"
            assert any("cannot give p below 0.25 (2/2^3)" in note and "that takes 6 seeds" in note for note in out["seed_notes"])
        else:
            assert row[9] == "yes, both tests" and not any("cannot give" in note for note in out["seed_notes"])
    assert "Across seeds" in capsys.readouterr().out


def test_across_seeds_sign_disagreement_is_said_in_words(tmp_path, capsys):
    for name, ppl, seed in (("lm_base_seed1", 30.0, 1), ("lm_base_seed2", 30.0, 2), ("lm_base_seed3", 30.0, 3),
                            ("lm_gpam_seed1", 29.0, 1), ("lm_gpam_seed2", 31.0, 2), ("lm_gpam_seed3", 29.5, 3)):
        d = tmp_path / name
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"system": name, "seed": seed, "perplexity": ppl}))
    out = compare_runs.run(["--baseline", str(tmp_path / "lm_base_seed1"), "--baseline", str(tmp_path / "lm_base_seed2"),
                            "--baseline", str(tmp_path / "lm_base_seed3"), str(tmp_path / "lm_gpam_seed1"),
                            str(tmp_path / "lm_gpam_seed2"), str(tmp_path / "lm_gpam_seed3"), "--csv", str(tmp_path / "c.csv")])
    (row,) = out["seed_rows"]
    assert row[2] == "perplexity (lower is better)" and row[4] == "-1.00, +1.00, -0.50"
    sentence = ("The seeds disagree in sign for lm_gpam: better than lm_base with seed(s) 1, 3, "
                "worse with seed(s) 2 (perplexity).")
    assert sentence in out["seed_notes"] and sentence in capsys.readouterr().out


def test_inference_cost_columns_with_ratio_to_the_baseline(tmp_path, capsys):
    refs = corpus(20)

    def inference(sps, rss_mib):
        return {"tool": "fairseq-generate", "device": "cpu (2 cores, 1 torch threads)", "batch_size": 128, "beam": 5,
                "sentences_per_s": sps, "tokens_per_s": 10 * sps, "peak_gpu_memory_bytes": None,
                "peak_gpu_memory": "n/a (CPU)", "peak_rss_bytes": rss_mib * 2 ** 20}

    base = make_run(tmp_path, "baseline_seed1", noisy(refs, 0.5, 1), refs, attention="softmax",
                    inference=inference(100.0, 400))
    gpam = make_run(tmp_path, "gpam_seed1", noisy(refs, 0.4, 2), refs, inference=inference(80.0, 500))
    out = compare_runs.run(["--baseline", base, gpam, "--csv", str(tmp_path / "c.csv"), "--bootstrap", "20",
                            "--ar-trials", "20"])
    header, rows = out["inference_header"], out["inference_rows"]
    row = dict(zip(header, rows[1]))
    assert rows[0][0] == "baseline (baseline)" and row["system"] == "gpam"
    assert row["settings"] == "batch 128; beam 5" and row["device"].startswith("cpu")
    i = header.index("sentences/s")
    assert rows[1][i] == "80.0" and rows[1][i + 1] == "0.80" and rows[0][i + 1] == "1.00"
    i = header.index("peak RSS of the process (MiB)")
    assert rows[1][i] == "500" and rows[1][i + 1] == "1.25"
    assert rows[1][header.index("peak GPU memory (MiB)")] == "n/a (CPU)"
    printed = capsys.readouterr().out
    assert "Inference cost" in printed and "| 0.80 |" in printed
    assert (tmp_path / "c_inference.csv").exists()
