"""The lambda map of scripts/analyze_collapse.py (gpam_fairseq/measurement/collapse/): the grid
--lambda-pos x --lambda-neg reaches the daGPAM math in both modes, (0, 0) is softmax, points
that break the row-sum rule are refused in one line, and the trained-lambda reader returns what
a checkpoint holds."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from gpam_fairseq.measurement.collapse.cli import main as analyze_collapse
from gpam_fairseq.measurement.collapse.grid import lambda_grid
from gpam_fairseq.measurement.collapse.measure import build_random_model, measure_pure
from gpam_fairseq.measurement.collapse.trained import checkpoints_in, read_trained_lambdas, trained_lambdas
from gpam_fairseq.options import GPAMConfigError, GPAMOptions
from helpers import REPO

PURE = dict(depth=4, dim=16, heads=2, tokens=8, batch=2)
SMALL_LM = "--decoder-layers 2 --decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("init", ["neg_identity", "random"])
def test_zero_lambdas_reproduce_softmax_exactly(init):
    """lambda+ = lambda- = 0 gives P_G = P+, the softmax map: every measured number of a float64
    stack is bit for bit that of softmax (same projections, same input), whatever W_Q- is."""
    for seed in (0, 1):
        soft = measure_pure("softmax", seed=seed, **PURE)
        zero = measure_pure("dagpam", seed=seed, options=GPAMOptions(lambda_pos=0.0, lambda_neg=0.0, neg_query_init=init),
                               **PURE)
        assert soft == zero
        # and a point next to it is not softmax: the comparison can fail
        near = measure_pure("dagpam", seed=seed, options=GPAMOptions(lambda_pos=0.0, lambda_neg=0.05, neg_query_init=init),
                               **PURE)
        assert near[2]["residual_ratio"] != soft[2]["residual_ratio"]


def test_pure_grid_every_point_reaches_the_math(tmp_path):
    prefix = str(tmp_path / "pure")
    analyze_collapse(["--pure-attention", "--attention-types", "softmax,dagpam", "--depth", "3", "--dim", "16", "--heads", "2",
             "--tokens", "8", "--batch-size", "2", "--seeds", "0", "--lambda-pos", "0,0.5,2", "--lambda-neg", "0,0.4,1.45",
             "--skip-invalid", "--neg-query-inits", "neg_identity,random", "--out-prefix", prefix])
    rows = read_csv(prefix + ".csv")
    grid = [(p, n) for p in (0.0, 0.5, 2.0) for n in (0.0, 0.4, 1.45) if n < 1 + p]
    assert len(grid) == 8  # (0, 1.45) is dropped
    dag = [r for r in rows if r["attention_type"] == "dagpam"]
    points = {(float(r["lambda_pos"]), float(r["lambda_neg"]), r["neg_query_init"]) for r in dag}
    assert points == {(p, n, i) for p, n in grid for i in ("neg_identity", "random")}
    soft = [r for r in rows if r["attention_type"] == "softmax"]
    assert len(soft) == 4 and all(r["lambda_pos"] == "" and r["neg_query_init"] == "" for r in soft)
    # every point (and both W_Q- starts, apart from lambda- = 0 where W_Q- has no weight) gives its own residual
    layer2 = {(float(r["lambda_pos"]), float(r["lambda_neg"]), r["neg_query_init"]): r["residual_ratio"]
              for r in dag if r["layer"] == "2"}
    with_neg = {k: v for k, v in layer2.items() if k[1] > 0}
    assert len(set(with_neg.values())) == len(with_neg)
    by_lambda = {}
    for (p, n, _), v in layer2.items():
        by_lambda.setdefault((p, n), set()).add(v)
    assert all(len(v) == (2 if n > 0 else 1) for (p, n), v in by_lambda.items())
    # (0, 0) is softmax in the CSV too
    soft2 = next(r for r in soft if r["layer"] == "2")["residual_ratio"]
    assert layer2[(0.0, 0.0, "neg_identity")] == layer2[(0.0, 0.0, "random")] == soft2
    # the summary holds one row per point and layer, and the plots exist
    summary = read_csv(prefix + "_map.csv")
    assert len(summary) == 2 * 8 * 4
    assert all(float(r["row_sum"]) > 0 for r in summary)
    for png in (prefix + ".png", prefix + "_map.png"):
        assert os.path.getsize(png) > 10_000
    # --from-csv draws the same map again from the CSV alone
    again = str(tmp_path / "again")
    analyze_collapse(["--from-csv", prefix + ".csv", "--out-prefix", again])
    with open(prefix + "_map.csv") as f, open(again + "_map.csv") as g:
        assert f.read() == g.read()
    assert os.path.getsize(again + "_map.png") > 10_000


def test_arch_grid_reaches_the_model(tmp_path):
    """--arch ... --random-init: the grid's flags reach the model's daGPAM modules."""
    prefix = str(tmp_path / "arch")
    analyze_collapse(["--arch", "transformer_lm_gpam", "--random-init", "--attention-types", "dagpam", "--fairseq-args", SMALL_LM,
             "--vocab", "40", "--batch-size", "2", "--tokens", "10", "--lambda-pos", "0.2,1", "--lambda-neg", "0.2,0.9",
             "--map-layers", "1,last", "--out-prefix", prefix])
    rows = read_csv(prefix + ".csv")
    assert len(rows) == 4 * 3
    last = {(float(r["lambda_pos"]), float(r["lambda_neg"])): float(r["residual_ratio"]) for r in rows if r["layer"] == "2"}
    assert set(last) == {(0.2, 0.2), (0.2, 0.9), (1.0, 0.2), (1.0, 0.9)}
    assert len(set(last.values())) == 4
    grads = {float(r["grad_norm_wq"]) for r in rows if r["layer"] == "1"}
    assert len(grads) == 4


def test_without_a_grid_the_configured_lambdas_are_kept(tmp_path):
    """No grid: daGPAM is measured with the lambdas and W_Q- start --fairseq-args gives (not the
    defaults), and the CSV says which."""
    prefix = str(tmp_path / "configured")
    analyze_collapse(["--arch", "transformer_lm_gpam", "--random-init", "--attention-types", "dagpam", "--vocab", "40",
             "--fairseq-args", SMALL_LM + " --gpam-lambda-pos 1 --gpam-lambda-neg 0.5 --gpam-neg-query-init random",
             "--batch-size", "2", "--tokens", "10", "--out-prefix", prefix])
    rows = read_csv(prefix + ".csv")
    assert {(r["lambda_pos"], r["lambda_neg"], r["neg_query_init"]) for r in rows} == {("1.0", "0.5", "random")}


def test_grid_with_invalid_points_is_refused_in_one_line(tmp_path):
    with pytest.raises(GPAMConfigError, match=r"\(lambda\+ 0, lambda- 1\), \(lambda\+ 0, lambda- 1\.5\)"):
        lambda_grid([0.0, 1.0], [0.5, 1.0, 1.5])
    assert lambda_grid([0.0, 1.0], [0.5, 1.0, 1.5], skip_invalid=True) == [(0.0, 0.5), (1.0, 0.5), (1.0, 1.0), (1.0, 1.5)]
    prefix = str(tmp_path / "refused")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "analyze_collapse.py"), "--pure-attention",
                           "--depth", "2", "--dim", "8", "--heads", "2", "--lambda-pos", "0,0.2", "--lambda-neg", "0.5,1.2",
                           "--out-prefix", prefix], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--lambda-neg" in lines[0] and "(lambda+ 0, lambda- 1.2)" in lines[0] and "(lambda+ 0.2, lambda- 1.2)" in lines[0]
    assert "--skip-invalid" in lines[0]
    assert "pure attention" not in proc.stdout  # refused before anything ran
    assert not any(name.startswith("refused") for name in os.listdir(tmp_path))


def save_checkpoint(model, path):
    """The dictionary fairseq's trainer saves, as far as our loader (fairseq's
    load_checkpoint_to_cpu) reads it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": None, "cfg": None, "model": model.state_dict(), "extra_state": {},
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                                       "lr_scheduler_state": {"best": None}, "num_updates": 7}]}, path)


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("scope", ["head", "module"])
def test_trained_lambda_reader_returns_what_the_checkpoint_holds(tmp_path, scope):
    model, _ = build_random_model("transformer_lm_gpam", "language_modeling", "dagpam",
                                     SMALL_LM.split() + ["--gpam-trainable-lambda", "--gpam-lambda-scope", scope],
                                     None, 40, seed=1)
    n = 2 if scope == "head" else 1
    known = {}
    with torch.no_grad():
        for l, layer in enumerate(model.decoder.layers):
            m = layer.self_attn.mechanism
            pos = torch.tensor([-1.25 + l, 0.5 - l][:n])
            neg = torch.tensor([0.75 * (l + 1), -2.0 + l][:n])
            m.lambda_pos_theta.copy_(pos)
            m.lambda_neg_theta.copy_(neg)
            known[f"decoder.layers.{l}.self_attn"] = (pos, neg)
    save_dir = tmp_path / "checkpoints" / "run1"
    save_checkpoint(model, str(save_dir / "checkpoint_best.pt"))
    rows = read_trained_lambdas(str(save_dir / "checkpoint_best.pt"))
    assert len(rows) == 2 * n
    for r in rows:
        pos, neg = known[r["module"]]
        h = 0 if r["head"] == "all" else r["head"]
        assert (r["head"] == "all") == (scope == "module")
        assert r["theta_pos"] == pos[h].item() and r["theta_neg"] == neg[h].item()
        # softplus of the stored float32 theta, computed independently in double precision
        assert r["lambda_pos"] == pytest.approx(softplus(pos[h].item()), rel=1e-6)
        assert r["lambda_neg"] == pytest.approx(softplus(neg[h].item()), rel=1e-6)
        assert r["row_sum"] == pytest.approx(1 + r["lambda_pos"] - r["lambda_neg"])
    # the model's own lambdas() (what its forward pass uses) give the same values
    for l, layer in enumerate(model.decoder.layers):
        lp, ln = layer.self_attn.mechanism.lambdas()
        mine = [r for r in rows if r["module"] == f"decoder.layers.{l}.self_attn"]
        assert [r["lambda_pos"] for r in mine] == lp.flatten().tolist()
        assert [r["lambda_neg"] for r in mine] == ln.flatten().tolist()

    # folders: a --save-dir, a recipe run folder (its .train.done names the --save-dir), a tree
    ckpt = str(save_dir / "checkpoint_best.pt")
    assert checkpoints_in(str(save_dir)) == [ckpt]
    run_dir = tmp_path / "runs" / "run1"
    run_dir.mkdir(parents=True)
    (run_dir / ".train.done").write_text(json.dumps({"command": ["data-bin", "--save-dir", str(save_dir), "--seed", "1"]}))
    assert checkpoints_in(str(run_dir)) == [ckpt]
    assert checkpoints_in(str(tmp_path / "checkpoints")) == [ckpt]

    # on the map: the CLI reads them, writes them out and marks them
    prefix = str(tmp_path / "map")
    analyze_collapse(["--pure-attention", "--attention-types", "dagpam", "--depth", "2", "--dim", "8", "--heads", "2", "--tokens", "6",
             "--batch-size", "1", "--lambda-pos", "0.2,1", "--lambda-neg", "0.2,1", "--trained-lambda", str(run_dir),
             "--out-prefix", prefix])
    written = read_csv(prefix + "_trained_lambda.csv")
    assert [float(r["lambda_pos"]) for r in written] == [r["lambda_pos"] for r in rows]
    assert os.path.getsize(prefix + "_map.png") > 10_000


def test_checkpoint_without_trainable_lambdas_is_named(tmp_path):
    from gpam_fairseq.checkpointing.checkpoints import CheckpointError

    model, _ = build_random_model("transformer_lm_gpam", "language_modeling", "dagpam", SMALL_LM.split(), None, 40, seed=1)
    path = str(tmp_path / "fixed" / "checkpoint_last.pt")
    save_checkpoint(model, path)
    assert read_trained_lambdas(path) == []
    with pytest.raises(CheckpointError, match="no checkpoint there holds trainable daGPAM lambdas"):
        trained_lambdas([str(tmp_path / "fixed")])
