"""scripts/average_checkpoints.py on real fairseq-train checkpoints: the exact mean, loadable by fairseq-generate."""

import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO, USER_DIR
from gpam_fairseq.recipes.synthetic_corpus import write_corpus

BIN = os.path.dirname(sys.executable)
SCRIPT = os.path.join(REPO, "scripts", "average_checkpoints.py")
import average_checkpoints  # noqa: E402  (scripts/, on the path through conftest.py)


def cli(*args):
    proc = subprocess.run([*args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"{args[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    raw, data_bin, save = str(root / "raw"), str(root / "bin"), str(root / "ckpt")
    write_corpus(raw, n_train=120, n_valid=16, n_test=12, vocab=20, max_len=6)
    cli(os.path.join(BIN, "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt", "--trainpref",
        f"{raw}/train", "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test", "--destdir", data_bin, "--workers", "1")
    # about 2 updates per epoch: 3 epoch checkpoints with different weights
    cli(os.path.join(BIN, "fairseq-train"), data_bin, "--user-dir", USER_DIR, "--arch", "transformer_gpam_iwslt_de_en",
        "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--gpam-trainable-lambda", "--optimizer", "adam", "--lr", "1e-2",
        "--max-tokens", "400", "--max-epoch", "3", "--save-dir", save, "--seed", "1")
    return {"bin": data_bin, "save": save, "root": root}


def test_average_of_last_epoch_checkpoints_is_the_exact_mean(run):
    out = str(run["root"] / "avg.pt")
    average_checkpoints.main(["--inputs", run["save"], "--num-epoch-checkpoints", "2", "--output", out])
    states = [torch.load(os.path.join(run["save"], f"checkpoint{e}.pt"), map_location="cpu") for e in (2, 3)]
    avg = torch.load(out, map_location="cpu")  # weights_only: nothing beyond the plugin's allowlist
    assert list(avg["model"]) == list(states[0]["model"])
    differing = 0
    for k, v in avg["model"].items():
        a, b = states[0]["model"][k], states[1]["model"][k]
        differing += int(not torch.equal(a, b))
        torch.testing.assert_close(v, (a.float() + b.float()) / 2, rtol=0, atol=1e-7)
    assert differing > 0  # the two epochs really differ, so the mean is not trivially one of them
    assert any(k.endswith("lambda_pos_theta") for k in avg["model"])  # trainable daGPAM λs are averaged too

    gen = cli(os.path.join(BIN, "fairseq-generate"), run["bin"], "--user-dir", USER_DIR, "--path", out,
              "--gen-subset", "test", "--beam", "2", "--batch-size", "8", "--required-batch-size-multiple", "1")
    assert len(re.findall(r"^H-\d+", gen, re.M)) == 12


def test_explicit_inputs_and_clear_errors(run, tmp_path):
    out = str(tmp_path / "avg3.pt")
    paths = [os.path.join(run["save"], f"checkpoint{e}.pt") for e in (1, 2, 3)]
    assert average_checkpoints.main(["--inputs", *paths, "--output", out]) == paths
    avg = torch.load(out, map_location="cpu")
    k = next(iter(avg["model"]))
    ref = sum(torch.load(p, map_location="cpu")["model"][k].float() for p in paths) / 3
    torch.testing.assert_close(avg["model"][k], ref, rtol=0, atol=1e-7)

    proc = subprocess.run([sys.executable, SCRIPT, "--inputs", run["save"], "--num-epoch-checkpoints", "9",
                           "--output", out], capture_output=True, text=True)
    assert proc.returncode != 0 and "found 3 checkpoint<epoch>.pt files, need 9" in proc.stderr
