"""Exact resume and determinism of fairseq-train with our models, on the CPU.

A run stopped after N updates (mid-epoch) and resumed from ``checkpoint_last.pt`` must
log the same losses as the uninterrupted run and end with bit-identical weights,
optimizer state and lambdas; dropout and attention dropout are on, lambdas trainable, so
the RNG and data-order state must be restored too. The first leg, being the same command
with the same seed, must reproduce the uninterrupted run's first N losses: same seed, same
result.
"""

import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, USER_DIR
from gpam_fairseq.fairseq_glue.tools import log_records
from gpam_fairseq.recipes.synthetic_corpus import write_corpus

from gpam_fairseq.checkpointing.checkpoints import load_state

BIN = os.path.dirname(sys.executable)
ENV = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
ENV["PATH"] = BIN + os.pathsep + ENV.get("PATH", "")
ENV["OMP_NUM_THREADS"] = "1"

STOP, TOTAL = 7, 16  # stop mid-epoch 1 and end in epoch 2 (checked below)
COMMON = ["--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
          "--dropout", "0.1", "--attention-dropout", "0.1", "--gpam-trainable-lambda", "--seed", "3",
          "--max-tokens", "256", "--required-batch-size-multiple", "1", "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1"]
MODELS = {
    "nmt": ["--arch", "transformer_gpam_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1",
            "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
            "--decoder-ffn-embed-dim", "16", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
    "lm": ["--task", "language_modeling", "--arch", "transformer_lm_gpam", "--decoder-layers", "1",
           "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "16", "--decoder-attention-heads", "2",
           "--tokens-per-sample", "16", "--sample-break-mode", "none", "--gpam-lambda-scope", "head"],
}


def start(name, *args):
    return subprocess.Popen([os.path.join(BIN, name), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, cwd=REPO)


def finish(proc, name="fairseq"):
    out = proc.communicate()[0]
    if proc.returncode != 0:
        pytest.fail(f"{name} failed ({proc.returncode}):\n{out[-5000:]}")
    return out


def cli(name, *args):
    return finish(start(name, *args), name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    raw = str(root / "raw")
    write_corpus(raw, n_train=500, n_valid=16, n_test=16, vocab=20, max_len=6)
    nmt = str(root / "nmt-bin")
    cli("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", f"{raw}/train",
        "--validpref", f"{raw}/valid", "--destdir", nmt, "--workers", "1")
    lm = str(root / "lm-bin")
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{raw}/train.tgt", "--validpref", f"{raw}/valid.tgt",
        "--destdir", lm, "--workers", "1")
    return {"nmt": nmt, "lm": lm}


def start_training(data_bin, kind, save_dir, max_update):
    return start("fairseq-train", data_bin, "--user-dir", USER_DIR, *MODELS[kind], *COMMON,
                 "--max-update", str(max_update), "--save-dir", save_dir)


def losses(out):
    return {int(s["num_updates"]): s["loss"] for s in log_records(out.splitlines(), "train_inner")}


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in opt_a[i]:
            assert torch.equal(torch.as_tensor(opt_a[i][name]), torch.as_tensor(opt_b[i][name])), (i, name)


@pytest.mark.parametrize("kind", ["nmt", "lm"])
def test_resume_reproduces_the_uninterrupted_run(data, kind, tmp_path):
    # the uninterrupted run and the first leg run side by side (independent processes)
    whole_proc = start_training(data[kind], kind, str(tmp_path / "whole"), TOTAL)
    first_proc = start_training(data[kind], kind, str(tmp_path / "split"), STOP)
    whole_log, first_log = finish(whole_proc), finish(first_proc)
    resumed_log = finish(start_training(data[kind], kind, str(tmp_path / "split"), TOTAL))
    whole, first, resumed = losses(whole_log), losses(first_log), losses(resumed_log)

    assert sorted(whole) == list(range(1, TOTAL + 1))
    epoch_ends = [int(s["train_num_updates"]) for s in log_records(whole_log.splitlines(), "train")]
    assert epoch_ends and STOP < epoch_ends[0] < TOTAL, epoch_ends  # stop mid-epoch, end in the next
    assert f"checkpoint_last.pt (epoch 1 @ {STOP} updates)" in resumed_log  # resumed mid-epoch 1
    # same seed, same result: the first leg is the uninterrupted run's beginning
    assert first == {u: whole[u] for u in range(1, STOP + 1)}
    # resumed: the same losses, update by update
    assert resumed == {u: whole[u] for u in range(STOP + 1, TOTAL + 1)}

    a = load_state(str(tmp_path / "whole" / "checkpoint_last.pt"))
    b = load_state(str(tmp_path / "split" / "checkpoint_last.pt"))
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == TOTAL
    assert_same_state(a, b)  # bit for bit: weights, lambdas, Adam moments
    assert any("lambda_pos_theta" in k for k in a["model"])
