"""Every evaluation sentence counted, through the real console scripts: stock fairseq drops the last
batch of an evaluated subset when --required-batch-size-multiple (default 8) does not divide it;
with --user-dir gpam_fairseq fairseq-generate gives one hypothesis per test sentence and
fairseq-train's validation loss is the loss over every validation sentence, for the stock
architecture too, while training batches (hence the training loss) stay exactly fairseq's."""

import json
import os

import numpy as np
import pytest

from cli_runs import ENV, checked, command, hypotheses, run_all
from helpers import USER_DIR
from gpam_fairseq.fairseq_glue.evaluation import kept_remainder, subset_size
from gpam_fairseq.recipes.synthetic_corpus import write_corpus

STOCK = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
         "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16",
         "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
LOGGED = "every evaluation sentence counted"


def records(text, tag):
    marker = f"| {tag} | "
    return [json.loads(line.split(marker, 1)[1]) for line in text.splitlines() if marker in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("every")
    raw, data_bin = str(root / "raw"), str(root / "bin")
    write_corpus(raw, n_train=64, n_valid=20, n_test=20, vocab=20, max_len=8)
    checked(run_all({"p": dict(argv=command(
        "fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", f"{raw}/train",
        "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test", "--destdir", data_bin, "--workers", "1"))})["p"])
    # the stock architecture, trained for one update and validated, by fairseq alone and with the plugin
    train = ["--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8", "--max-update", "1", "--seed", "3",
             "--no-epoch-checkpoints", "--log-format", "json", "--num-workers", "0"]
    save = {"stock": str(root / "stock"), "plugin": str(root / "plugin")}
    trained = run_all({
        "stock": dict(argv=command("fairseq-train", data_bin, *STOCK, *train, "--save-dir", save["stock"])),
        "plugin": dict(argv=command("fairseq-train", data_bin, "--user-dir", USER_DIR, *STOCK, *train,
                                    "--save-dir", save["plugin"])),
    })
    ckpt = os.path.join(save["stock"], "checkpoint_last.pt")
    # fairseq alone cannot load its own argparse checkpoints under torch's weights_only default;
    # the plugin allows just argparse.Namespace, fairseq alone needs torch's switch
    alone = {**ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    generate = ["--path", ckpt, "--gen-subset", "test", "--beam", "1", "--batch-size", "8"]
    evaluated = run_all({
        "generate_stock": dict(argv=command("fairseq-generate", data_bin, *generate), env=alone),
        "generate_plugin": dict(argv=command("fairseq-generate", data_bin, "--user-dir", USER_DIR, *generate)),
        # the loss over every validation sentence: fairseq's batching with no multiple asked for
        "validate_all": dict(argv=command("fairseq-validate", data_bin, "--task", "translation", "--path", ckpt, "--valid-subset", "valid",
                                          "--batch-size", "8", "--required-batch-size-multiple", "1",
                                          "--log-format", "json"), env=alone),
    })
    return {**{k: checked(v) for k, v in trained.items()}, **{k: checked(v) for k, v in evaluated.items()},
            "bin": data_bin}


def test_generate_gives_one_hypothesis_per_test_sentence_with_the_plugin(runs):
    assert subset_size(runs["bin"], "test") == 20
    stock = hypotheses(runs["generate_stock"].stdout)
    ours = hypotheses(runs["generate_plugin"].stdout)
    assert len(stock) == 16  # fairseq alone: the last batch of 4 is dropped
    assert sorted(ours) == list(range(20))
    assert {k: ours[k] for k in stock} == stock  # the other hypotheses are the same
    log = runs["generate_plugin"].stdout + runs["generate_plugin"].stderr
    assert log.count(LOGGED) == 1
    assert "kept the last batch of 4 of 20 sentences" in log and "--required-batch-size-multiple 8" in log
    assert LOGGED not in runs["generate_stock"].stdout + runs["generate_stock"].stderr


def test_validation_loss_covers_every_sentence_and_training_is_unchanged(runs):
    stock, ours = (runs[k].stdout + runs[k].stderr for k in ("stock", "plugin"))
    (train_stock,), (train_ours,) = records(stock, "train"), records(ours, "train")
    assert train_ours["train_loss"] == train_stock["train_loss"]  # the same training batches
    (valid_stock,), (valid_ours,) = records(stock, "valid"), records(ours, "valid")
    every = runs["validate_all"].stdout + runs["validate_all"].stderr
    (validate,) = records(every, "valid")
    assert validate["valid_bsz"] == "20"  # fairseq-validate's sentence count: all 20
    assert float(valid_ours["valid_loss"]) == pytest.approx(float(validate["valid_loss"]), abs=1e-3)
    assert abs(float(valid_stock["valid_loss"]) - float(validate["valid_loss"])) > 2e-3  # stock saw 16 of 20
    assert ours.count(LOGGED) == 1  # once, though validation and the training data were both batched


def test_kept_remainder_appends_exactly_the_missing_tail():
    indices = np.arange(10, 30)
    batches = [indices[:8], indices[8:16]]
    kept = kept_remainder(indices, batches, 8)
    assert [list(b) for b in kept[:2]] == [list(b) for b in batches] and list(kept[2]) == list(range(26, 30))
    assert kept_remainder(indices, kept, 8) == kept  # nothing missing: unchanged
