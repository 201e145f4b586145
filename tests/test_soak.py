"""Long runs. The full demo is kept out of `make test` (`make test-slow`); the 2,000-update
soak with trainable lambdas takes about a minute and runs in `make test`."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_full_demo_learns_the_toy_task(tmp_path):
    """`make demo` at its default settings: both systems must learn the reversal task."""
    out_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "quickstart", "demo.py"), "--out", str(out_dir)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-1500:])
    rows = json.loads((out_dir / "results.json").read_text())
    for r in rows:
        assert r["bleu"] > 50, r  # an untrained or attention-blind model scores near 0


def test_2000_updates_with_trainable_lambda_stay_finite_and_in_range(tmp_path):
    """2,000 updates on the demo corpus, trainable lambdas: losses finite, every lambda finite and > 0.

    lambda = softplus(theta) is > 0 by construction (README: "Trainable lambda"); the run checks
    that no theta drifts to inf/NaN or underflows softplus to 0 over a long run. A tiny model
    (1+1 layers, d=16) keeps it around a minute on 2 CPU cores.
    """
    import math

    import torch

    from gpam_fairseq.fairseq_glue.tools import log_records
    from helpers import USER_DIR
    from gpam_fairseq.recipes.synthetic_corpus import write_corpus

    from gpam_fairseq.checkpointing.checkpoints import load_state

    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["OMP_NUM_THREADS"] = "1"
    raw, data_bin, save_dir = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    write_corpus(raw)  # the demo's corpus: 20,000 training pairs
    subprocess.run([os.path.join(bindir, "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                    "--trainpref", f"{raw}/train", "--validpref", f"{raw}/valid", "--destdir", data_bin, "--workers", "2"],
                   check=True, capture_output=True, env=env, cwd=REPO)
    proc = subprocess.run(
        [os.path.join(bindir, "fairseq-train"), data_bin, "--user-dir", USER_DIR,
         "--arch", "transformer_gpam_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1",
         "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
         "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
         "--gpam-trainable-lambda", "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", "100", "--max-tokens", "256", "--max-update", "2000", "--seed", "1",
         "--save-dir", save_dir, "--no-epoch-checkpoints", "--save-interval-updates", "500",
         "--log-format", "json", "--log-interval", "100"],
        capture_output=True, text=True, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stats = log_records(out.splitlines(), "train_inner")
    losses = [float(s["loss"]) for s in stats]
    assert [int(s["num_updates"]) for s in stats][-1] == 2000
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    print(f"\nloss every 100 updates: {losses}")
    for update in (500, 1000, 1500, 2000):
        (path,) = [os.path.join(save_dir, f) for f in os.listdir(save_dir) if f.endswith(f"_{update}.pt")]
        state = load_state(path)["model"]
        thetas = {k: v for k, v in state.items() if "lambda_pos_theta" in k or "lambda_neg_theta" in k}
        assert len(thetas) == 2 * 3  # enc self, dec self, cross (1+1 layers), two thetas each
        lambdas = {k.replace("_theta", ""): torch.nn.functional.softplus(v.float()) for k, v in thetas.items()}
        values = torch.cat([v.flatten() for v in lambdas.values()])
        assert torch.isfinite(values).all() and (values > 0).all(), lambdas
        print(f"update {update}: lambda in [{values.min():.4f}, {values.max():.4f}]")
    for k, v in state.items():
        assert torch.isfinite(v.float()).all(), k
