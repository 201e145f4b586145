"""scripts/sweep.py end to end in --quick mode on the IWSLT14 fixture archive (tests/test_recipes.py).

One module fixture runs, in order: a first sweep of 2 cells (one daGPAM setting and the baseline,
seed 2) in 2 worker processes, trained to 2 updates; the state a kill during
training leaves is then made for the baseline cell (its stage markers and run.json removed,
checkpoint_last.pt kept); then the full grid (λ 0.1 and 0.3 × seeds 1, 2, with the baseline)
trained to 4 updates in this process: the daGPAM cell trained to 2 updates goes on from its
checkpoint, the "killed" baseline cell resumes from its checkpoint, the 4 others start fresh.
"""

import csv
import json
import os
import re
import statistics
import subprocess
import sys

import pytest

from helpers import REPO
from test_recipes import dirs_env, make_iwslt14_archive, run_stage

SWEEP = os.path.join(REPO, "scripts", "sweep.py")
GRID = ["--quick", "--lambda-pos", "0.1", "0.3", "--seeds", "1", "2", "--max-update", "4"]
SUFFIX = "_base_de-en_postln_seed"


def sweep(env, *args, check=True):
    proc = subprocess.run([sys.executable, SWEEP, "iwslt14", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"sweep failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_iwslt14_archive(str(root / "de-en.tgz"))
    env = dirs_env(root)
    del env["UPDATE_FREQ"]  # --quick sets it
    run_stage("iwslt14", "prepare", env, "--archive", str(root / "de-en.tgz"))
    run_stage("iwslt14", "preprocess", env)
    out = root / "out"
    first = sweep(env, "--quick", "--lambda-pos", "0.3", "--seeds", "2", "--max-update", "2", "--parallel", "2",
                  "--out", str(out))
    killed = out / "runs" / f"baseline{SUFFIX}2"
    for name in (".train.done", ".evaluate.done", "run.json"):
        os.remove(killed / name)
    assert (out / "checkpoints" / f"baseline{SUFFIX}2" / "checkpoint_last.pt").exists()
    full = sweep(env, *GRID, "--out", str(out))
    return {"root": root, "env": env, "out": out, "first": first.stdout, "full": full.stdout}


def test_parallel_workers(swept):
    out, first = swept["out"], swept["first"]
    assert "[sweep] iwslt14: 2 cells (2 settings x 1 seeds)" in first and "(worker 1)" in first and "(worker 2)" in first
    assert "[sweep] 2/2 cells finished" in first
    for name in ("gpam_lp0.3_ln0.3_fixed_negid_shared_all", "baseline"):
        log = (out / "logs" / f"{name}{SUFFIX}2.log").read_text()
        assert "[train]" in log and "[evaluate]" in log  # each worker ran the recipe's stages


def test_interrupted_and_shorter_cells_go_on_from_their_checkpoints(swept):
    out, full = swept["out"], swept["full"]
    assert "6 cells (3 settings x 2 seeds)" in full and "2 new" not in full and "4 new, 1 resume, 1 extend" in full
    extended = out / "runs" / f"gpam_lp0.3_ln0.3_fixed_negid_shared_all{SUFFIX}2"
    resumed = out / "runs" / f"baseline{SUFFIX}2"
    assert f"{extended.name}: extend: trained to 2 of 4 updates, goes on from checkpoint_last.pt" in full
    assert f"{resumed.name}: resume from checkpoint_last.pt" in full
    for run in (extended, resumed):
        log = (run / "train.log").read_text()
        assert "Loaded checkpoint" in log and "@ 2 updates)" in log  # fairseq resumed, it did not restart
        assert (run / "train.0.log").exists()  # the first training's log is kept
        result = read_json(run / "run.json")
        assert result["num_updates"] == 4
    fresh = out / "runs" / f"baseline{SUFFIX}1"
    assert "No existing checkpoint found" in (fresh / "train.log").read_text()
    assert "[sweep] 6/6 cells finished" in full


def test_table_csv_and_plot_come_from_the_run_folders(swept):
    out = swept["out"]
    rows = {r["setting"]: r for r in read_csv(out / "results.csv")}
    assert list(rows) == ["gpam_lp0.1_ln0.1_fixed_negid_shared_all", "gpam_lp0.3_ln0.3_fixed_negid_shared_all", "baseline"]
    for setting, row in rows.items():
        bleu = [read_json(out / "runs" / f"{setting}{SUFFIX}{s}" / "run.json")["bleu"] for s in (1, 2)]
        assert row["seeds"] == "1 2" and row["n"] == "2"
        assert float(row["bleu_mean"]) == pytest.approx(statistics.mean(bleu))
        assert float(row["bleu_std"]) == pytest.approx(statistics.stdev(bleu))
        assert float(row["delta_vs_baseline"]) == pytest.approx(statistics.mean(bleu) - float(rows["baseline"]["bleu_mean"]))
        assert 0 < float(row["best_valid_loss_mean"]) < 20 and float(row["best_valid_loss_std"]) >= 0
    assert rows["gpam_lp0.1_ln0.1_fixed_negid_shared_all"]["lambda_pos"] == "0.1"
    md = (out / "results.md").read_text()
    assert "QUICK MODE" in md and "| baseline | baseline | — |" in md and "| BLEU | Δ vs baseline |" in md
    png = out / "results.png"
    assert png.stat().st_size > 10000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_every_finished_cell(swept):
    out = swept["out"]
    results = sorted((out / "runs").glob("*/run.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    table = (out / "results.csv").read_text()
    again = sweep(swept["env"], *GRID, "--out", str(out)).stdout
    assert again.count("skipped (done)") == 6 and "[train]" not in again and "6 done" in again
    assert {p: p.stat().st_mtime_ns for p in results} == before
    assert (out / "results.csv").read_text() == table


def test_submitit_local_executor_gives_the_in_process_table(swept, tmp_path, monkeypatch):
    """The same cell function as a submitit job array (local executor): same table and outputs as the
    cell this module ran in process."""
    import submitit  # noqa: F401  (the test extra; --slurm needs it)

    from gpam_fairseq.recipes import sweep as sweep_module
    from gpam_fairseq.recipes.definitions import RECIPES

    tiny = ["--quick", "--lambda-pos", "0.1", "--seeds", "1", "--no-baseline", "--max-update", "4"]
    other = swept["root"] / "submitit_out"
    out = sweep(swept["env"], *tiny, "--slurm", "--cluster", "local", "--slurm-time", "10", "--out", str(other)).stdout
    assert "1 job(s) submitted (local)" in out and "[sweep] 1/1 cells finished" in out
    assert any((other / "submitit").rglob("*_result.pkl"))
    # the same grid's table from the in-process run folders, written by the same functions
    for k, v in swept["env"].items():
        monkeypatch.setenv(k, v)
    recipe = RECIPES["iwslt14"]
    cells = sweep_module.build_cells(sweep_module.parser().parse_args(["iwslt14", *tiny]), recipe, str(swept["out"]))
    rows, metric = sweep_module.collect(cells, recipe)
    sweep_module.write_tables(rows, metric, str(tmp_path), [])
    assert (tmp_path / "results.csv").read_text() == (other / "results.csv").read_text()
    assert rows[0]["n"] == 1 and rows[0]["mean"] is not None
    run = f"gpam_lp0.1_ln0.1_fixed_negid_shared_all{SUFFIX}1"
    assert (other / "runs" / run / "hyps.txt").read_text() == (swept["out"] / "runs" / run / "hyps.txt").read_text()


def test_compare_runs_reads_the_sweep_runs_inference_cost_and_seeds(swept, tmp_path):
    runs = swept["out"] / "runs"
    for s in (1, 2):
        inference = read_json(runs / f"baseline{SUFFIX}{s}" / "run.json")["inference"]
        assert inference["tool"] == "fairseq-generate" and inference["batch_size"] == 128 and inference["beam"] == 5
        assert inference["sentences"] == 40 and inference["sentences_per_s"] > 0 and inference["tokens_per_s"] > 0
        assert inference["device"].startswith("cpu") and inference["peak_gpu_memory"] == "n/a (CPU)"
        assert inference["peak_gpu_memory_bytes"] is None and inference["peak_rss_bytes"] > 50 * 2 ** 20
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare_runs.py"),
                           "--baseline", str(runs / f"baseline{SUFFIX}1"), "--baseline", str(runs / f"baseline{SUFFIX}2"),
                           str(runs / f"gpam_lp0.1_ln0.1_fixed_negid_shared_all{SUFFIX}1"),
                           str(runs / f"gpam_lp0.1_ln0.1_fixed_negid_shared_all{SUFFIX}2"),
                           "--csv", str(tmp_path / "c.csv"), "--bootstrap", "20", "--ar-trials", "20"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "c_inference.csv", newline="") as f:
        table = {row["system"]: row for row in csv.DictReader(f)}
    base = table["baseline_base_de-en_postln (baseline)"]
    gpam = table["gpam_lp0.1_ln0.1_fixed_negid_shared_all_base_de-en_postln"]
    assert base["peak GPU memory (MiB)"] == gpam["peak GPU memory (MiB)"] == "n/a (CPU)"
    assert float(base["× baseline"]) == 1.0 and float(gpam["× baseline"]) > 0
    assert gpam["settings"] == "batch 128; beam 5"
    assert "Inference cost" in proc.stdout and "Across seeds" in proc.stdout and "1, 2 (2)" in proc.stdout


def test_refusals_name_the_flag(tmp_path, monkeypatch, capsys):
    """Checked before anything runs: more workers than visible GPUs, --slurm without SLURM, a λ pair the
    options refuse."""
    from gpam_fairseq.recipes import sweep as sweep_module
    from gpam_fairseq.recipes.common import mark_done

    mark_done(str(tmp_path / "data" / "data-bin"), "preprocess")  # what the sweep checks of the data
    for k, v in dirs_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    out = str(tmp_path / "out")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    def refused(argv, pattern):  # one line on stderr, exit status 2
        with pytest.raises(SystemExit) as stop:
            sweep_module.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), lines

    refused(["iwslt14", "--quick", "--lambda-pos", "0.7", "--seeds", "1", "--parallel", "3", "--out", out],
            r"--parallel 3: only 2 GPU\(s\) visible \(0, 1\)")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no sbatch here
    refused(["iwslt14", "--quick", "--lambda-pos", "0.7", "--seeds", "1", "--slurm", "--out", out],
            r"--slurm: no sbatch on PATH; .* or add --cluster local")
    refused(["iwslt14", "--quick", "--lambda-pos", "0.5", "--lambda-neg", "2", "--out", out],
            r"grid cell gpam_lp0.5_ln2_.*--gpam-lambda-neg: 2 >= 1 \+ --gpam-lambda-pos")
    refused(["iwslt14", "--lambda", "learned", "--out", out], r"--lambda 'learned': choose from fixed, trainable")
    assert not os.path.exists(os.path.join(out, "runs"))


@pytest.mark.parametrize("name", ["wmt14_en_de", "wikitext103", "enwik8", "ptb"])
def test_quick_mode_builds_every_recipes_models(name, tmp_path, monkeypatch):
    """--quick's shrunk command lines of the other recipes (adaptive-input cutoffs below the data's
    dictionary) are models fairseq builds, for the baseline, both controls and daGPAM."""
    from gpam_fairseq.fairseq_glue.tools import make_dictionary, parse_training_args, task_without_data
    from gpam_fairseq.recipes import controls
    from gpam_fairseq.recipes import sweep as sweep_module
    from gpam_fairseq.recipes.definitions import RECIPES
    from gpam_fairseq.recipes.stages import Settings, train_command
    import torch

    recipe = RECIPES[name]
    (tmp_path / "data-bin").mkdir()
    (tmp_path / "data-bin" / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(100)))
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    args = sweep_module.parser().parse_args([name, "--quick", "--seeds", "1", "--lambda", "trainable",
                                             "--controls", "baseline_params", "baseline_maps"])
    cells = sweep_module.build_cells(args, recipe, str(tmp_path / "out"))
    assert [c.setting.model for c in cells] == ["gpam", "baseline", "baseline_params", "baseline_maps"]
    counts = {}
    for cell in cells:
        with controls.environment(**cell.spec["env"]):
            cmd = train_command(Settings(recipe))[0]
        assert cmd[cmd.index("--max-update") + 1] == "10" and cmd[cmd.index("--update-freq") + 1] == "1"
        _, cfg = parse_training_args(cmd[2:])
        vocab = make_dictionary(104)  # the fixture dictionary: 100 words + 4 special symbols
        with torch.device("meta"):
            model = task_without_data(cfg, vocab, vocab).build_model(cfg.model)
        counts[cell.setting.model] = controls.count_parameters(model)
    assert counts["baseline_maps"] == counts["baseline"] < counts["gpam"]
    assert abs(counts["baseline_params"] - counts["gpam"]) / counts["gpam"] < 1e-3
