"""Bad input through fairseq-train's own path: one clear line, from fairseq or from us, never our stack.

* Every GPAM/attention option, given an invalid value on a real fairseq-train command line (the
  console script: fairseq's training parser, the task set up on a real data folder, the model
  built), stops with one line, ``fairseq-train: error: ...``, naming the flag and the values it
  allows, and exit status 2: argparse's own errors and ours (gpam_fairseq.fairseq_glue.cli_errors) look the
  same. Options are listed from ``gpam_fairseq.options``: a new option without a case here fails
  the coverage test.
* A data folder without a dictionary, or languages that are not in it, fails with fairseq's
  own message, and no frame of the traceback is in gpam_fairseq.
* Options that the attention type does not read are reported in one warning line, once.
"""

import os
import re
import subprocess

import pytest

from cli_runs import BIN, ENV, command, describe, last_line, run_all
from gpam_fairseq.options import ATTENTION_TYPES, FLAG, LAMBDA_SCOPES, NEG_QUERY_INITS, NEG_QUERY_SHARING
from helpers import REPO, USER_DIR
from gpam_fairseq.recipes.synthetic_corpus import write_corpus


NMT = ["--task", "translation", "--arch", "transformer_gpam_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1",
       "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16"]
LM = ["--task", "language_modeling", "--arch", "transformer_lm_gpam", "--decoder-layers", "1", "--decoder-embed-dim", "16",
      "--decoder-ffn-embed-dim", "16", "--tokens-per-sample", "16"]
TRAIN = ["--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "512", "--max-update", "1", "--no-save"]
# lambda- >= 1 + lambda+: every row of P_G would sum to 1 + lambda+ - lambda- <= 0
NO_POSITIVE_MASS = ["--gpam-lambda-pos", "1.2", "--gpam-lambda-neg", "2.5"]
REFUSED = ("--gpam-lambda-neg: 2.5 >= 1 + --gpam-lambda-pos (1.2); rows of P_G would sum to 1 + lambda+ - lambda- = "
           "-0.3 <= 0; choose --gpam-lambda-neg < 1 + --gpam-lambda-pos")


def choices(values):
    return "(choose from " + ", ".join(repr(v) for v in values) + ")"


# (model, flags, the line expected: it names the flag and what is allowed)
BAD = [
    ("nmt", ["--attention-type", "linear"], f"argument --attention-type: invalid choice: 'linear' {choices(ATTENTION_TYPES)}"),
    ("lm", ["--attention-type", "linear"], f"argument --attention-type: invalid choice: 'linear' {choices(ATTENTION_TYPES)}"),
    ("nmt", ["--gpam-lambda-pos", "-0.5"], "--gpam-lambda-pos: must be a finite number >= 0, got -0.5"),
    ("nmt", ["--gpam-lambda-pos", "big"], "argument --gpam-lambda-pos: invalid float value: 'big'"),
    ("lm", ["--gpam-lambda-neg", "nan"], "--gpam-lambda-neg: must be a finite number >= 0, got nan"),
    ("nmt", NO_POSITIVE_MASS, REFUSED),
    ("lm", NO_POSITIVE_MASS, REFUSED),
    ("nmt", ["--gpam-trainable-lambda", "--gpam-lambda-neg", "0"],
     "--gpam-lambda-neg: must be > 0 with --gpam-trainable-lambda (lambda = softplus(theta) cannot start at 0), got 0.0"),
    ("nmt", ["--gpam-lambda-scope", "layer"], f"argument --gpam-lambda-scope: invalid choice: 'layer' {choices(LAMBDA_SCOPES)}"),
    ("nmt", ["--gpam-blocks", "enc_self,decoder"], "--gpam-blocks: unknown block 'decoder'; choose from enc_self, dec_self, cross"),
    ("lm", ["--gpam-blocks", "dec_self,cross"], "--gpam-blocks: 'cross' does not exist in a language model, which has only dec_self"),
    ("nmt", ["--gpam-neg-query", "global"], f"argument --gpam-neg-query: invalid choice: 'global' {choices(NEG_QUERY_SHARING)}"),
    ("lm", ["--gpam-neg-query-init", "zeros"], f"argument --gpam-neg-query-init: invalid choice: 'zeros' {choices(NEG_QUERY_INITS)}"),
    ("nmt", ["--gpam-stats-interval", "-3"], "--gpam-stats-interval: expected an integer >= 0 (0 = off), got -3"),
    ("lm", ["--gpam-stats-interval", "often"], "argument --gpam-stats-interval: invalid int value: 'often'"),
    ("nmt", ["--attention-type", "diff", "--encoder-attention-heads", "1"],
     "--encoder-attention-heads/--decoder-attention-heads: --attention-type diff pairs heads 2i, 2i+1 into one "
     "differential head, so the number of heads must be even, got 1"),
]
# flags without a value of their own: only their combinations can be wrong (covered above)
SWITCHES = {"--gpam-trainable-lambda", "--gpam-stats-per-layer", "--gpam-recompute-attention"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    raw = str(root / "raw")
    write_corpus(raw, n_train=100, n_valid=16, n_test=16, vocab=20, max_len=6)
    procs = [
        subprocess.Popen([os.path.join(BIN, "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                          "--trainpref", f"{raw}/train", "--validpref", f"{raw}/valid", "--destdir", str(root / "nmt"),
                          "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO),
        subprocess.Popen([os.path.join(BIN, "fairseq-preprocess"), "--only-source", "--trainpref", f"{raw}/train.tgt",
                          "--validpref", f"{raw}/valid.tgt", "--destdir", str(root / "lm"), "--workers", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO),
    ]
    assert all(p.wait() == 0 for p in procs)
    return {"root": root, "nmt": str(root / "nmt"), "lm": str(root / "lm")}


def test_every_option_has_a_bad_value_case():
    covered = {flag for _, flags, _ in BAD for flag in flags if flag.startswith("--gpam") or flag == "--attention-type"}
    missing = set(FLAG.values()) - SWITCHES - covered
    assert not missing, f"options without a bad-value case: {sorted(missing)}"


IDS = [" ".join(b[1]) + f" ({b[0]})" for b in BAD]


@pytest.fixture(scope="module")
def bad_runs(data):
    """Every case through the fairseq-train console script, side by side."""
    return run_all({
        name: dict(argv=command("fairseq-train", data[model], "--user-dir", USER_DIR, *(NMT if model == "nmt" else LM),
                                *TRAIN, *flags))
        for name, (model, flags, _) in zip(IDS, BAD)
    })


@pytest.mark.parametrize("model,flags,expected", BAD, ids=IDS)
def test_invalid_option_value_one_line_naming_flag_and_allowed_values(bad_runs, model, flags, expected):
    proc = bad_runs[" ".join(flags) + f" ({model})"]
    assert last_line(proc.stderr) == f"fairseq-train: error: {expected}", describe(proc)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


def cli(*args):
    return subprocess.Popen([os.path.join(BIN, "fairseq-train"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)


def test_fairseq_train_warns_once_about_options_the_type_does_not_read(data):
    """The recipes give the same flags to every system: a softmax run with daGPAM's flags trains,
    saying once, in one line, that they have no effect (fairseq-train builds the encoder and the
    decoder from the options, each validating them)."""
    proc = cli(data["nmt"], "--user-dir", USER_DIR, *NMT, *TRAIN, "--attention-type", "softmax",
               "--gpam-lambda-pos", "0.5", "--gpam-neg-query", "per_head", "--gpam-trainable-lambda")
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    reports = [line for line in (out + err).splitlines() if "does not read" in line]
    assert len(reports) == 1, reports
    assert " | WARNING | gpam_fairseq.options | " in reports[0]
    assert reports[0].endswith("--attention-type softmax does not read --gpam-lambda-pos, --gpam-trainable-lambda, "
                               "--gpam-neg-query (set away from their defaults; read by dagpam): they have no effect")


def our_frames(stderr):
    return [line for line in stderr.splitlines() if re.match(r'\s*File ".*gpam_fairseq[/\\]', line)]


def test_bad_data_folders_fail_with_fairseqs_message_not_our_stack(data, tmp_path):
    no_dict = tmp_path / "no_dict"
    no_dict.mkdir()
    for name in os.listdir(data["nmt"]):
        if name != "dict.tgt.txt":
            os.symlink(os.path.join(data["nmt"], name), no_dict / name)
    lm_no_dict = tmp_path / "lm_no_dict"
    lm_no_dict.mkdir()
    for name in os.listdir(data["lm"]):
        if name != "dict.txt":
            os.symlink(os.path.join(data["lm"], name), lm_no_dict / name)
    cases = {
        "missing target dictionary": (
            [str(no_dict), *NMT], rf"FileNotFoundError: \[Errno 2\] No such file or directory: '{no_dict}/dict.tgt.txt'"),
        "languages not in the folder": (
            [data["nmt"], *NMT, "-s", "de", "-t", "en"],
            rf"FileNotFoundError: \[Errno 2\] No such file or directory: '{data['nmt']}/dict.de.txt'"),
        "source equals target": (
            [data["nmt"], *NMT, "-s", "src", "-t", "src"], r"FileNotFoundError: Dataset not found: (train|valid) \("),
        "language model without dict.txt": (
            [str(lm_no_dict), *LM], rf"FileNotFoundError: \[Errno 2\] No such file or directory: '{lm_no_dict}/dict.txt'"),
    }
    procs = {name: cli(argv[0], "--user-dir", USER_DIR, *argv[1:], *TRAIN) for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate()
        assert proc.returncode != 0, name
        last = err.strip().splitlines()[-1]
        assert re.search(cases[name][1], last), f"{name}: {last}"
        assert not our_frames(err), f"{name}: traceback goes through gpam_fairseq:\n" + "\n".join(our_frames(err))
